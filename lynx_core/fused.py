"""The Wan block's elementwise steps, fused, with the official numerics.

The official code keeps LayerNorm, modulation and the gated residuals in fp32 and rounds to the run
dtype once. Written as separate tensor ops that costs about five passes over the hidden state per
step (``x.float()``, the norm, ``* (1 + scale)``, ``+ shift``, ``.to(dtype)``), where ComfyUI's
block runs one ``addcmul`` in the run dtype. Here each step is one pure function of its inputs:

* :func:`norm_modulate`: ``(LN(x.float()) * (1 + scale) + shift).to(x.dtype)``;
* :func:`gated_residual`: ``(x.float() + y.float() * gate).to(x.dtype)``;
* :func:`add_branch`: an adapter branch added to the attention output (in place outside autograd).

Under ``torch.inference_mode()`` they run ``torch.compile``d (one kernel each: the hidden state is
read and written once) where that pays: by default on CUDA; on the CPU only with ``LYNX_COMPILE=1``
(compiling costs seconds there; the eager path below is about as fast as ComfyUI's block, see
bench/README.md). ``LYNX_COMPILE=0`` turns compiling off everywhere; a compile that
fails once logs one warning and the process goes on eagerly. The eager path uses fused ops that compute in fp32 and round once: LayerNorm with
``1 + scale`` / ``shift`` as its affine weights (input in the run dtype, fp32 weights), and
``addcmul`` writing straight into a run-dtype output. On the CPU a mixed-dtype op casts its
operands through full-size fp32 copies, so there, under ``torch.inference_mode()``, a bf16/fp16
gated residual runs the formula's own ops over cache-sized token chunks instead
(:func:`gated_residual_chunked`, equal to the formula bit for bit). Inside an outer ``torch.compile`` (ComfyUI's
TorchCompileModel) the plain formulas are traced, so the outer graph fuses them and never breaks.
Under autograd (training) the same eager ops run out of place, so a checkpointed block recomputes
exactly the numbers of its first forward.
Results equal the formulas up to fp32 rounding (fp32 runs: about 1e-7; bf16 runs: rare 1-ulp flips).
"""
from __future__ import annotations

import functools
import logging
import os
from typing import Callable

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

ENV = "LYNX_COMPILE"
_OFF = ("0", "off", "false", "no", "eager")
_ON = ("1", "on", "true", "yes", "compile")
_state = {"failed": False}
_compiled: dict[str, Callable] = {}


# ------------------------------------------------------------------------------------------------ formulas

def norm_modulate_formula(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float) -> torch.Tensor:
    """The official expression: parameter-free LayerNorm and modulation in fp32, then the run dtype."""
    return (F.layer_norm(x.float(), (x.shape[-1],), eps=eps) * (1 + scale) + shift).to(x.dtype)


def gated_residual_formula(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """The official expression: the gated residual added in fp32, then the run dtype."""
    return (x.float() + y.float() * gate).to(x.dtype)


# ------------------------------------------------------------------------------------------------ policy

def compile_mode(device: torch.device | str | None = None) -> str:
    """"compiled" or "eager": what the fused steps use on ``device`` now (``LYNX_COMPILE``: 0/1/auto)."""
    env = os.environ.get(ENV, "auto").strip().lower()
    if env in _OFF or _state["failed"] or not hasattr(torch, "compile"):
        return "eager"
    if env in _ON:
        return "compiled"
    dev = torch.device(device) if device is not None else torch.device("cpu")
    return "compiled" if dev.type == "cuda" else "eager"


def tracks_grad(*ts: torch.Tensor) -> bool:
    """Whether autograd records an op on ``ts`` (then nothing may be updated in place)."""
    return torch.is_grad_enabled() and any(t.requires_grad for t in ts)


def _try_compiled(name: str, formula: Callable, *args):
    """The compiled formula's result, or None (eager wanted, or compiling failed: warn once).

    Only under ``torch.inference_mode()`` (ComfyUI runs every prompt so): a no-grad forward that
    autograd recomputes later (a checkpointed training block) must round as the recompute does."""
    if not torch.is_inference_mode_enabled() or compile_mode(args[0].device) != "compiled":
        return None
    fn = _compiled.get(name)
    if fn is None:
        fn = _compiled[name] = torch.compile(formula, fullgraph=True)
    try:
        return fn(*args)
    except torch.OutOfMemoryError:
        raise
    except Exception as err:  # no compiler, no Triton, an unsupported op...: eager from now on
        _state["failed"] = True
        log.warning("Lynx: torch.compile of the fused block ops failed (%s: %s); running them eagerly "
                    "(set %s=0 to skip compiling)", type(err).__name__, str(err).splitlines()[0] if str(err) else "",
                    ENV)
        return None


def reset() -> None:
    """Forget compiled functions and a past compile failure (tests, or after changing LYNX_COMPILE)."""
    _compiled.clear()
    _state["failed"] = False


# ------------------------------------------------------------------------------------------------ eager fusions

@functools.lru_cache(maxsize=None)
def _mixed_layer_norm_ok(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether LayerNorm takes a ``dtype`` input with fp32 weights on ``device`` (computing in fp32,
    rounding once): the CPU kernel does; other devices are asked once."""
    if dtype == torch.float32:
        return True
    try:
        x = torch.linspace(-2.0, 3.0, 32, device=device).reshape(2, 16).to(dtype)
        w = torch.linspace(0.5, 1.5, 16, device=device)
        b = torch.linspace(-0.2, 0.2, 16, device=device)
        got = F.layer_norm(x, (16,), w, b, 1e-6)
        want = (F.layer_norm(x.float(), (16,), eps=1e-6) * w + b).to(dtype)
        return got.dtype == dtype and bool(torch.allclose(got.float(), want.float(), rtol=1e-2, atol=1e-2))
    except (RuntimeError, TypeError, NotImplementedError):
        return False


def _same_rows(*ts: torch.Tensor) -> bool:
    """Every row of each [B, ...] tensor equal to its first row (checked on the host only: on an
    accelerator the comparison would wait for the device)."""
    return all(t.shape[0] == 1 or (t.device.type == "cpu" and torch.equal(t, t[:1].expand_as(t))) for t in ts)


def _norm_modulate_eager(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float) -> torch.Tensor:
    c = x.shape[-1]
    per_row = shift.shape[1] == 1 and scale.shape[1] == 1
    if per_row and shift.dtype == scale.dtype == torch.float32 and _mixed_layer_norm_ok(x.device, x.dtype):
        # LayerNorm's affine step is the modulation: (x - mean) * rstd * (1 + scale) + shift in fp32.
        weight = 1 + scale
        if _same_rows(weight, shift):
            return F.layer_norm(x, (c,), weight[0, 0], shift[0, 0], eps)
        return torch.stack([F.layer_norm(x[i], (c,), weight[i, 0], shift[i, 0], eps) for i in range(x.shape[0])])
    normed = F.layer_norm(x.float(), (c,), eps=eps)
    if x.dtype == torch.float32:
        return torch.addcmul(shift, normed, 1 + scale)
    return torch.addcmul(shift, normed, 1 + scale, out=torch.empty_like(x))


# ------------------------------------------------------------------------------------------------ entry points

def norm_modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float) -> torch.Tensor:
    """``(LN(x.float()) * (1 + scale) + shift).to(x.dtype)`` (shift/scale fp32, [B, 1 or L, C])."""
    if torch.compiler.is_compiling():
        return norm_modulate_formula(x, shift, scale, eps)
    out = None if tracks_grad(x, shift, scale) else _try_compiled("norm_modulate", norm_modulate_formula,
                                                                   x, shift, scale, eps)
    return out if out is not None else _norm_modulate_eager(x, shift, scale, eps)


def gated_residual(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor, *, inplace: bool = False) -> torch.Tensor:
    """``(x.float() + y.float() * gate).to(x.dtype)``; ``inplace`` lets the eager path write into
    ``x`` (only outside autograd; pass it only for a tensor nobody else holds)."""
    if torch.compiler.is_compiling():
        return gated_residual_formula(x, y, gate)
    if tracks_grad(x, y, gate):  # the same op and rounding as below, out of place for autograd
        return torch.addcmul(x, y, gate).to(x.dtype)
    out = _try_compiled("gated_residual", gated_residual_formula, x, y, gate)
    if out is not None:
        return out
    # A new output is contiguous whatever x's layout: ComfyUI hands block 0 a transposed view of the
    # patch embedding, and every later step of the block (the cross-attention residual, LayerNorm,
    # this residual again) runs several times slower on that channel-strided layout.
    dest = x if inplace else torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if _chunk_pays(x, y, gate):
        return gated_residual_chunked(x, y, gate, dest)
    # One op, fp32 math (gate is fp32), written in the run dtype; into x itself when the caller owns it.
    return torch.addcmul(x, y, gate, out=dest)


# About 384 KiB of fp32 per chunk: the temporaries stay in a core's L2 cache.
CHUNK_ELEMENTS = 96 * 1024


def _chunk_pays(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor) -> bool:
    """Whether the chunked residual replaces ``addcmul``: on the CPU, where a mixed-dtype op casts
    its operands through full-size fp32 copies, for a run dtype narrower than fp32. Only under
    ``torch.inference_mode()``: a plain no-grad forward may be one that autograd recomputes (a
    checkpointed block) with ``addcmul``, whose fused multiply-add rounds differently."""
    return (x.device.type == "cpu" and x.dtype != torch.float32 and gate.dtype == torch.float32
            and torch.is_inference_mode_enabled() and x.ndim == 3 and x.shape == y.shape and gate.ndim == 3
            and gate.shape[0] in (1, x.shape[0]) and gate.shape[1] in (1, x.shape[1])
            and gate.shape[2] == x.shape[2])


def gated_residual_chunked(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """The formula's own fp32 ops (``y.float() * gate``, ``+ x.float()``, one rounding to ``out``'s
    dtype) over token chunks of ``x``/``y`` [B, L, C] (``gate`` [B or 1, 1 or L, C]), so the fp32
    temporaries are chunk-sized and reused. Equal to :func:`gated_residual_formula` bit for bit;
    ``out`` may be ``x`` itself (each chunk is read before it is written). No autograd."""
    b, tokens, c = x.shape
    step = max(1, CHUNK_ELEMENTS // max(1, b * c))
    buf = torch.empty((b, min(step, tokens), c), dtype=torch.float32, device=x.device)
    per_token = gate.shape[1] != 1
    for start in range(0, tokens, step):
        n = min(step, tokens - start)
        tmp = buf[:, :n]
        g = gate[:, start:start + n] if per_token else gate
        torch.mul(y[:, start:start + n], g, out=tmp)
        tmp.add_(x[:, start:start + n])  # fp32 addition commutes: x.float() + y.float() * gate
        out[:, start:start + n].copy_(tmp)
    return out


def add_branch(out: torch.Tensor, branch: torch.Tensor, scale: float) -> torch.Tensor:
    """``out + scale * branch`` for an adapter branch; ``out`` must be a fresh attention output.

    In place outside autograd, and a scale of exactly 1.0 (the nodes fold the scales into the
    cached values) skips the multiply."""
    if branch.dtype != out.dtype:
        branch = branch.to(out.dtype)
    if tracks_grad(out, branch):
        return out + branch if scale == 1.0 else torch.add(out, branch, alpha=scale)
    return out.add_(branch) if scale == 1.0 else out.add_(branch, alpha=scale)

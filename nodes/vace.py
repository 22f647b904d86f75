"""Lynx on ComfyUI's VACE model (Wan2.1-VACE-14B; Wan2.2 VACE-Fun loads as the same class).

ComfyUI detects a VACE checkpoint by its ``vace_patch_embedding`` and builds a ``VaceWanModel``:
the 40 main Wan blocks plus ``vace_blocks`` that read the control video and add a hint to the
output of every few main blocks. Lynx's per-block replace patches sit on the main blocks only;
ComfyUI adds the VACE hint after each replaced block as after its own, and the VACE blocks run as
ComfyUI wrote them (nothing of Lynx runs on them).

**Reference frames.** ``WanVaceToVideo`` with a ``reference_image`` puts that image's latent in
front of the video latent (``trim_latent`` frames, cut off by ``TrimVideoLatent`` afterwards) and
marks it in VACE's conditioning: those frames of ``vace_frames`` are ``[reference latent,
process_out(0)]`` and their ``vace_mask`` is 0. After ComfyUI's ``extra_conds`` the model call
gets ``vace_context`` = ``[B, n, 96, F, H, W]`` (16 inactive + 16 reactive channels, normalised,
then the 64-channel mask), where such a frame is exactly 0 in channels 16-95. No video frame looks
like that: its mask is 1 where VACE generates, and where the mask is 0 ("keep this pixel") the
reactive half is the VAE latent of mid-grey, which is not the latent mean. A DIFFUSION_MODEL
wrapper reads the leading run of such frames per batch row on every model call, and the block
patches keep the Ref-adapter off their tokens (``lynx_core.ref_mask``). No new input: the
conditioning from WanVaceToVideo says it.

**Reference pass.** ``VaceWanModel`` cannot run without a VACE context, so Lynx Encode Reference
gives it a zero one at strength 0: the hint added after the main blocks is then 0, and the
captured features are those of the main (T2V) blocks, the frozen base the Ref-adapter expects.
"""
from __future__ import annotations

import logging
from typing import Sequence

import torch

from lynx_core.ref_mask import RefMaskedLayout, leading_frames_keep

log = logging.getLogger(__name__)

VACE_LATENT = 16          # channels of one VACE latent half (inactive, reactive)
VACE_CONTEXT = 96         # 2 x 16 latent channels + 64 mask channels (8 x 8 pixels per latent pixel)
WRAPPER_KEY = "lynx_vace"


def is_vace_model(dm) -> bool:
    return getattr(dm, "vace_blocks", None) is not None


def vace_reference_frames(vace_context: torch.Tensor | None) -> list[int]:
    """Per batch row, how many leading latent frames are VACE reference images (see module doc).

    ``vace_context`` is what ComfyUI passes the VACE model: ``[B, n, 96, F, H, W]`` for ``n`` VACE
    inputs; a frame counts when it is a reference frame in any of them. Returns ``[]`` for anything
    else (no VACE conditioning), and 0 for a row whose frames would all count (not WanVaceToVideo's
    layout: nothing is skipped then).
    """
    if not isinstance(vace_context, torch.Tensor) or vace_context.ndim != 6 or vace_context.shape[2] != VACE_CONTEXT:
        return []
    b, n, _c, f = vace_context.shape[:4]
    marks = vace_context[:, :, VACE_LATENT:].movedim(3, 2).reshape(b, n, f, -1)  # [B, n, F, rest]
    blank = (marks == 0).all(dim=-1).any(dim=1)                                   # [B, F]
    leading = torch.cumprod(blank.to(torch.int32), dim=1).sum(dim=1).tolist()
    return [0 if int(k) >= f else int(k) for k in leading]


class VaceRefFrames:
    """The VACE reference frames of the current model call, for the block patches of one run."""

    def __init__(self) -> None:
        self.skip: list[int] = []
        self.frames = 0
        self.masked_calls = 0     # model calls in this run that kept the Ref-adapter off some frames
        self._keep: tuple | None = None
        self._told = False

    def begin_call(self, skip: Sequence[int], frames: int) -> None:
        self.skip, self.frames, self._keep = [int(s) for s in skip], int(frames), None
        if any(self.skip):
            self.masked_calls += 1
            if not self._told:
                self._told = True
                log.info("Lynx: VACE reference image(s) in the first %d latent frame(s); the Ref-adapter skips "
                         "their tokens", max(self.skip))

    def end_call(self) -> None:
        self.skip, self.frames, self._keep = [], 0, None

    def keep(self, x: torch.Tensor) -> torch.Tensor | None:
        """``[B, L, 1]`` bool for the block input ``x`` [B, L, dim], or None (nothing to skip)."""
        if not any(self.skip):
            return None
        key = (x.shape[0], x.shape[1], x.device)
        if self._keep is None or self._keep[0] != key:
            skip = self.skip
            if len(skip) != x.shape[0]:
                if len(set(skip)) != 1:
                    raise ValueError(f"VACE: {len(skip)} rows of VACE conditioning for a batch of {x.shape[0]} rows")
                skip = [skip[0]] * x.shape[0]
            self._keep = (key, leading_frames_keep(skip, self.frames, x.shape[1], device=x.device))
        return self._keep[1]

    def layout(self, x: torch.Tensor, attention) -> RefMaskedLayout | None:
        keep = self.keep(x)
        return None if keep is None else RefMaskedLayout(attention, keep)

    def reset(self) -> None:
        self.end_call()
        self.masked_calls = 0
        self._told = False


def vace_frames_wrapper(frames: VaceRefFrames):
    """DIFFUSION_MODEL wrapper: tells ``frames`` which latent frames of this call are references."""
    def wrapper(executor, x, timestep, *args, **kwargs):
        frames.begin_call(vace_reference_frames(kwargs.get("vace_context")), x.shape[2] if x.ndim == 5 else 0)
        try:
            return executor(x, timestep, *args, **kwargs)
        finally:
            frames.end_call()

    return wrapper


def reference_pass_kwargs(dm, x: torch.Tensor) -> dict:
    """Extra model inputs for the reference pass: for VACE, a zero context at strength 0."""
    if not is_vace_model(dm):
        return {}
    vace_context = torch.zeros((x.shape[0], 1, VACE_CONTEXT, *x.shape[2:]), device=x.device, dtype=x.dtype)
    return {"vace_context": vace_context, "vace_strength": [0.0]}

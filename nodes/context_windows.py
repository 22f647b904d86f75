"""Lynx with ComfyUI's context windows (Context Windows (Manual), WAN Context Windows (Manual)).

Those nodes put a ``context_handler`` in the MODEL's options. ComfyUI's ``calc_cond_batch``, which
the Lynx guider calls for its passes, then slices the latent (and the conds whose length matches)
into windows along the frame axis and runs one batched model call per window: the same rows, in
the same cond order, with the same ``transformer_options["cond_or_uncond"]``. So the Lynx block
patches see each window as an ordinary, shorter call: the identity of every row, the cached
adapter keys/values (which depend on the face, never on the tokens) and the start/end window (per
step, not per call) are the same in every window, and the adapters act in every window.

What does change is the size of one model call, which block swap plans its GPU buffers from: the
plan takes the window's length, as ComfyUI's own memory estimate does.
"""
from __future__ import annotations

from typing import Sequence


def window_latent_shape(shape: Sequence[int], model_options: dict | None) -> tuple[int, ...]:
    """The latent shape one model call sees: ``shape`` with the frame axis cut to the context length."""
    shape = tuple(int(s) for s in shape)
    handler = (model_options or {}).get("context_handler")
    length, dim = getattr(handler, "context_length", None), getattr(handler, "dim", None)
    if not isinstance(length, int) or not isinstance(dim, int) or not 0 <= dim < len(shape):
        return shape
    return shape[:dim] + (min(shape[dim], max(1, length)),) + shape[dim + 1:]

"""The reference pass: run the frozen DiT once at t=0 on the reference latent and keep, per block,
the normalised self-attention input (the features the Ref-adapter attends to during denoising)."""
from __future__ import annotations

import torch

from .block import wan_block_forward

REFERENCE_PROMPT = "image of a face"


def capture_block_fn(store: dict[int, torch.Tensor], rope, attention):
    """A BlockFn that runs each block plainly and records its modulated, normalised input."""
    def fn(index, block, x, e, freqs, context):
        def keep(n1):
            store[index] = n1.detach()
        return wan_block_forward(block, x, e, freqs, context, rope=rope, attention=attention, capture=keep)
    return fn


@torch.no_grad()
def extract_reference_features(model, ref_latent: torch.Tensor, ref_context: torch.Tensor,
                               block_runner=None) -> dict[int, torch.Tensor]:
    """Reference features of lynx_core's WanModel: {block_index: [1, tokens, dim]}.

    ``ref_latent`` is the normalised VAE latent of the 256 px aligned face, [1, 16, 1, 32, 32]
    (256 tokens), ``ref_context`` the text embedding of ``REFERENCE_PROMPT``. The head is skipped.
    ``block_runner(tokens, e, freqs, ctx, block_fn)`` may replace ``model.run_blocks`` (block swap).
    """
    from .wan.rope import apply_rope

    t0 = torch.zeros(ref_latent.shape[0], dtype=torch.long, device=ref_latent.device)
    tokens, _grid, e, _temb, ctx, freqs = model.embed(ref_latent, t0, ref_context)
    store: dict[int, torch.Tensor] = {}
    run = block_runner or model.run_blocks
    run(tokens, e, freqs, ctx, capture_block_fn(store, apply_rope, model.attention))
    return store

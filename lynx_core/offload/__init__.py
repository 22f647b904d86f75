"""Block-swap offload for Wan DiTs: host masters, a copy stream and a ring of GPU buffers.

Typical use (lynx_core's own DiT)::

    plan = plan_block_swap(model.blocks, "auto", "cuda", tokens=32760)
    move_non_block_parts(model, "cuda")
    with BlockSwapper(model.blocks, plan) as swapper:
        v = model(x, t, ctx, block_fn=swapper.wrap(lynx_block_fn))

See docs/offload.md for choosing ``blocks_to_swap``, fp8 host storage, pinning and ComfyUI use.
"""
from .host import (FP8_MAX, default_pin_limit, fp8_dequantize, fp8_quantize, fp8_row_scales,
                   pack_chunks, physical_ram_bytes)
from .plan import (DEFAULT_RESERVE_BYTES, BlockSwapError, SwapPlan, choose_swapped,
                   estimate_activation_bytes, measure_free_bytes, plan_block_swap, wan_video_tokens)
from .swapper import (BlockSwapper, BlockTiming, attach_block_swap, borrow_to_device,
                      move_non_block_parts)

__all__ = [
    "BlockSwapError",
    "BlockSwapper",
    "BlockTiming",
    "DEFAULT_RESERVE_BYTES",
    "FP8_MAX",
    "SwapPlan",
    "attach_block_swap",
    "borrow_to_device",
    "choose_swapped",
    "default_pin_limit",
    "estimate_activation_bytes",
    "fp8_dequantize",
    "fp8_quantize",
    "fp8_row_scales",
    "measure_free_bytes",
    "move_non_block_parts",
    "pack_chunks",
    "physical_ram_bytes",
    "plan_block_swap",
    "wan_video_tokens",
]

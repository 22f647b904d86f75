"""Flow-matching schedule and samplers (UniPC, Euler) for the Wan velocity model."""
from .samplers import SAMPLERS, Interrupted, get_sampler, sample_euler, sample_unipc
from .schedule import flow_sigmas, shift_sigma

__all__ = [
    "SAMPLERS",
    "Interrupted",
    "flow_sigmas",
    "get_sampler",
    "sample_euler",
    "sample_unipc",
    "shift_sigma",
]

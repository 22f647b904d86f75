"""Lynx adapter weights: Perceiver Resampler, ID-adapter and Ref-adapter layers, and their files."""
from .errors import LynxAdapterError
from .io import (
    combined_state,
    load_adapters,
    official_state,
    save_adapters,
    save_adapters_combined,
)
from .keys import OFFICIAL_FILES, combined_to_official, detect_variant, official_to_combined
from .layers import IPAdapterLayer, RefAdapterLayer, RMSNormNoAffine
from .lynx_adapters import AdapterConfig, LynxAdapters
from .resampler import Resampler

__all__ = [
    "AdapterConfig",
    "IPAdapterLayer",
    "LynxAdapterError",
    "LynxAdapters",
    "OFFICIAL_FILES",
    "RMSNormNoAffine",
    "RefAdapterLayer",
    "Resampler",
    "combined_state",
    "combined_to_official",
    "detect_variant",
    "load_adapters",
    "official_state",
    "official_to_combined",
    "save_adapters",
    "save_adapters_combined",
]

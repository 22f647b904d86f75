"""ComfyUI nodes of the Lynx pack (thin: ComfyUI types in, lynx_core calls, ComfyUI types out).

Importing this package needs no ComfyUI: every ``comfy`` import is inside a function, so CI can
check the node schemas without a ComfyUI checkout.
"""
from __future__ import annotations

from .comfy_env import register_model_folders
from .face import LynxEncodeFaceID, LynxFaceSimilarity
from .loaders import LoadLynxAdapters
from .reference import LynxEncodeReference
from .sampling import LynxGuider, LynxSampler
from .training import LynxSaveAdapters, LynxTrainAdapters, LynxTrainingDataset
from .unipc import LynxUniPCSampler
from .video import LynxVideoCombine

NODE_CLASS_MAPPINGS = {
    "LoadLynxAdapters": LoadLynxAdapters,
    "LynxEncodeFaceID": LynxEncodeFaceID,
    "LynxEncodeReference": LynxEncodeReference,
    "LynxSampler": LynxSampler,
    "LynxGuider": LynxGuider,
    "LynxUniPCSampler": LynxUniPCSampler,
    "LynxVideoCombine": LynxVideoCombine,
    "LynxFaceSimilarity": LynxFaceSimilarity,
    "LynxTrainingDataset": LynxTrainingDataset,
    "LynxTrainAdapters": LynxTrainAdapters,
    "LynxSaveAdapters": LynxSaveAdapters,
}

NODE_DISPLAY_NAME_MAPPINGS = {
    "LoadLynxAdapters": "Load Lynx Adapters",
    "LynxEncodeFaceID": "Lynx Encode Face ID",
    "LynxEncodeReference": "Lynx Encode Reference",
    "LynxSampler": "Lynx Sampler",
    "LynxGuider": "Lynx Guider",
    "LynxUniPCSampler": "Lynx UniPC Sampler (official)",
    "LynxVideoCombine": "Lynx Video Combine",
    "LynxFaceSimilarity": "Lynx Face Similarity",
    "LynxTrainingDataset": "Lynx Training Dataset",
    "LynxTrainAdapters": "Lynx Train Adapters",
    "LynxSaveAdapters": "Lynx Save Adapters",
}

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "register_model_folders"]

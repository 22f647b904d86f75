"""LynxVideoCombine: IMAGE frames (+ optional AUDIO) -> a video file in ComfyUI's output folder."""
from __future__ import annotations

import json
import logging
import os

import numpy as np
import torch

from lynx_core.video import save_numbered_video

from . import comfy_env
from .images import to_uint8

log = logging.getLogger(__name__)

FORMATS = ["mp4", "webm", "webp", "gif"]
MIME = {"mp4": "video/mp4", "webm": "video/webm", "webp": "image/webp", "gif": "image/gif"}


def workflow_metadata(prompt, extra_pnginfo) -> dict[str, str]:
    """ComfyUI's own convention: the API prompt under ``prompt``, every extra_pnginfo entry
    (the UI ``workflow`` above all) under its own key, all as JSON."""
    meta: dict[str, str] = {}
    if prompt is not None:
        meta["prompt"] = json.dumps(prompt)
    if isinstance(extra_pnginfo, dict):
        for key, value in extra_pnginfo.items():
            meta[str(key)] = json.dumps(value)
    return meta


def comfy_audio_to_tuple(audio) -> tuple[np.ndarray, int] | None:
    """ComfyUI AUDIO ``{"waveform": [B, C, S] tensor, "sample_rate": int}`` -> (float32 [C, S], rate).

    Only the first item of a batch is used (a video has one sound track).
    """
    if audio is None:
        return None
    if not isinstance(audio, dict) or "waveform" not in audio or "sample_rate" not in audio:
        raise ValueError("audio: expected a ComfyUI AUDIO input (a dict with 'waveform' and 'sample_rate'), e.g. "
                         "from Load Audio")
    waveform = audio["waveform"]
    if not isinstance(waveform, torch.Tensor):
        waveform = torch.as_tensor(np.asarray(waveform))
    if waveform.ndim == 3:
        if waveform.shape[0] > 1:
            log.warning("audio: a batch of %d sound tracks was given; using the first", waveform.shape[0])
        if waveform.shape[0] == 0:
            raise ValueError("audio: the waveform batch is empty")
        waveform = waveform[0]
    if waveform.ndim != 2:
        raise ValueError(f"audio: waveform must be [batch, channels, samples], got shape {tuple(waveform.shape)}")
    try:
        rate = int(audio["sample_rate"])
    except (TypeError, ValueError):
        raise ValueError(f"audio: sample_rate must be an integer, got {audio['sample_rate']!r}") from None
    return waveform.detach().to("cpu", torch.float32).numpy(), rate


class LynxVideoCombine:
    DESCRIPTION = ("Writes the frames as a video (mp4, webm, animated webp or gif) into ComfyUI's output folder "
                   "with a running number (never overwrites), the workflow in the file's metadata, and shows it "
                   "in the node.")
    CATEGORY = "Lynx/video"
    RETURN_TYPES = ("STRING",)
    RETURN_NAMES = ("filename",)
    OUTPUT_TOOLTIPS = ("Full path of the written file.",)
    OUTPUT_NODE = True
    FUNCTION = "combine"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "images": ("IMAGE", {"tooltip": "The video frames (VAE Decode output)."}),
                "frame_rate": ("FLOAT", {"default": 16.0, "min": 0.1, "max": 240.0, "step": 0.1,
                                         "tooltip": "Frames per second (official: 16 for full, 24 for lite)."}),
                "format": (FORMATS, {"default": "mp4",
                           "tooltip": "mp4 (H.264 + AAC sound) and webm (VP9 + Opus sound) play everywhere; webp "
                                      "and gif are animated images and cannot hold sound."}),
                "filename_prefix": ("STRING", {"default": "Lynx/lynx",
                                    "tooltip": "Name inside the output folder; sub-folders allowed. A 5-digit counter "
                                               "is appended (lynx_00001.mp4, ...)."}),
                "crf": ("INT", {"default": 19, "min": 0, "max": 63,
                                "tooltip": "Quality of mp4/webm: lower is better and larger (19 is visually lossless "
                                           "for H.264)."}),
                "save_metadata": ("BOOLEAN", {"default": True,
                                  "tooltip": "Store the workflow and prompt in the file (mp4/webm tags, webp EXIF, "
                                             "gif comment), so dragging the file into ComfyUI restores the graph."}),
            },
            "optional": {
                "audio": ("AUDIO", {"tooltip": "Optional sound track. mp4 and webm keep it, cut or padded with "
                                               "silence to the video length. webp and gif cannot hold sound: the "
                                               "video is written without it and a warning is logged."}),
            },
            "hidden": {"prompt": "PROMPT", "extra_pnginfo": "EXTRA_PNGINFO"},
        }

    def combine(self, images, frame_rate, format, filename_prefix, crf, save_metadata, audio=None,
                prompt=None, extra_pnginfo=None):
        if format not in FORMATS:
            raise ValueError(f"format: unknown choice {format!r}; use one of {FORMATS}")
        out_dir = comfy_env.output_directory()
        frames = to_uint8(images, "images")
        sound = comfy_audio_to_tuple(audio)
        meta = workflow_metadata(prompt, extra_pnginfo) if save_metadata else {}
        # The number is reserved with an exclusive create, so ComfyUI instances sharing one output
        # folder never write the same file; a failed write removes its reservation again.
        path = save_numbered_video(frames, out_dir, filename_prefix or "Lynx/lynx", fps=float(frame_rate),
                                   format=format, metadata=meta, crf=int(crf), audio=sound)
        # Lexical, like the prefix check: a symlinked sub-folder is reported under its own name.
        subfolder = os.path.relpath(path.parent, os.path.abspath(out_dir)).replace(os.sep, "/")
        entry = {"filename": path.name, "subfolder": "" if subfolder == "." else subfolder, "type": "output",
                 "format": MIME[format], "frame_rate": float(frame_rate)}
        return {"ui": {"videos": [entry]}, "result": (str(path),)}

"""LynxVideoCombine: IMAGE frames (+ optional AUDIO) -> a video file in ComfyUI's output folder."""
from __future__ import annotations

import json
import logging
import os
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch

from lynx_core.video import next_free_path, write_video

from . import comfy_env

log = logging.getLogger(__name__)

FORMATS = ["mp4", "webm", "webp", "gif"]
MIME = {"mp4": "video/mp4", "webm": "video/webm", "webp": "image/webp", "gif": "image/gif"}
AUDIO_CODEC = {"mp4": "aac", "webm": "libopus"}


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


def frames_to_uint8(images: torch.Tensor) -> np.ndarray:
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[0] == 0:
        raise ValueError("images: expected a non-empty IMAGE batch [frames, H, W, C] (e.g. from VAE Decode)")
    arr = images.detach().to("cpu", torch.float32)[..., :3]
    return (arr.clamp(0, 1).numpy() * 255.0 + 0.5).astype(np.uint8)


def mux_audio(video_path: Path, audio: dict, fmt: str) -> None:
    """Add ``audio`` (ComfyUI AUDIO: waveform [B, C, S], sample_rate) to a written mp4/webm, in place.

    The video stream is copied packet by packet; the audio is encoded (AAC for mp4, Opus for webm)
    and cut to the video's duration.
    """
    import av

    waveform = audio["waveform"]
    rate = int(audio["sample_rate"])
    wav = waveform[0].detach().to("cpu", torch.float32).clamp(-1, 1).numpy()  # [C, S]
    if wav.ndim == 1:
        wav = wav[None]
    wav = wav[:2]
    tmp = video_path.with_name(f".{video_path.stem}.audio.{fmt}")
    try:
        with av.open(str(video_path)) as src, av.open(str(tmp), "w", format=fmt) as dst:
            vin = src.streams.video[0]
            duration = float(vin.duration * vin.time_base) if vin.duration else None
            vout = dst.add_stream_from_template(vin)
            dst.metadata.update(src.metadata)
            layout = "stereo" if wav.shape[0] == 2 else "mono"
            out_rate = 48000 if fmt == "webm" else rate
            aout = dst.add_stream(AUDIO_CODEC[fmt], rate=out_rate, layout=layout)
            if duration is not None:
                wav = wav[:, : max(1, int(round(duration * rate)))]
            for packet in src.demux(vin):
                if packet.dts is None:
                    continue
                packet.stream = vout
                dst.mux(packet)
            frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(wav.reshape(1, -1) if layout == "mono" else wav.T.reshape(1, -1)),
                                               format="flt", layout=layout)
            frame.sample_rate = rate
            frame.time_base = Fraction(1, rate)
            frame.pts = 0
            resampler = av.AudioResampler(format=aout.codec_context.format.name, layout=layout, rate=out_rate)
            for rs in resampler.resample(frame) + resampler.resample(None):
                for packet in aout.encode(rs):
                    dst.mux(packet)
            for packet in aout.encode(None):
                dst.mux(packet)
        os.replace(tmp, video_path)
    finally:
        if tmp.exists():
            tmp.unlink()


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
                           "tooltip": "mp4 (H.264) and webm (VP9) play everywhere and carry audio; webp and gif "
                                      "are animated images (no audio)."}),
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
                "audio": ("AUDIO", {"tooltip": "Optional sound track (mp4/webm only), cut to the video length."}),
            },
            "hidden": {"prompt": "PROMPT", "extra_pnginfo": "EXTRA_PNGINFO"},
        }

    def combine(self, images, frame_rate, format, filename_prefix, crf, save_metadata, audio=None,
                prompt=None, extra_pnginfo=None):
        if format not in FORMATS:
            raise ValueError(f"format: unknown choice {format!r}; use one of {FORMATS}")
        out_dir = comfy_env.output_directory()
        frames = frames_to_uint8(images)
        path = next_free_path(out_dir, filename_prefix or "Lynx/lynx", format)
        meta = workflow_metadata(prompt, extra_pnginfo) if save_metadata else {}
        path = write_video(frames, path, fps=float(frame_rate), format=format, metadata=meta, crf=int(crf))
        if audio is not None:
            if format in AUDIO_CODEC:
                mux_audio(path, audio, format)
            else:
                log.warning("audio: %s files cannot hold sound; the audio input is ignored (use mp4 or webm)", format)
        subfolder = path.parent.resolve().relative_to(out_dir.resolve()).as_posix()
        entry = {"filename": path.name, "subfolder": "" if subfolder == "." else subfolder, "type": "output",
                 "format": MIME[format], "frame_rate": float(frame_rate)}
        return {"ui": {"videos": [entry]}, "result": (str(path),)}

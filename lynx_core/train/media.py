"""Reading training targets and identity photos as uint8 RGB frames, and fitting them to a bucket.

An image is a 1-frame video. Videos are decoded only as far as training needs (``frames_needed``),
so a long clip costs no more than its first seconds. Resizing scales the picture until it covers
the bucket (aspect kept) and crops the centre, so nothing is stretched.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "IMAGE_EXTS",
    "VIDEO_EXTS",
    "MediaError",
    "is_image",
    "is_video",
    "is_media",
    "read_image",
    "read_frames",
    "resize_center_crop",
]

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff")
VIDEO_EXTS = (".mp4", ".webm", ".mov", ".mkv", ".avi", ".gif")


class MediaError(ValueError):
    """A target or identity photo cannot be read (the message names the file and what to do)."""


def is_image(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTS


def is_video(path: Path) -> bool:
    return path.suffix.lower() in VIDEO_EXTS


def is_media(path: Path) -> bool:
    return is_image(path) or is_video(path)


def read_image(path: Path) -> np.ndarray:
    """One picture as uint8 RGB [H, W, 3], turned upright by its EXIF orientation."""
    from PIL import Image, ImageOps

    try:
        with Image.open(path) as im:
            im = ImageOps.exif_transpose(im)
            return np.ascontiguousarray(np.asarray(im.convert("RGB")))
    except Exception as exc:  # PIL raises many types for broken files
        raise MediaError(f"cannot read image {path}: {exc}. Re-save it as PNG or JPEG, or remove it "
                         "from the dataset.") from exc


def _read_video(path: Path, frames_needed: int) -> np.ndarray:
    if path.suffix.lower() == ".gif":
        from PIL import Image, ImageSequence

        with Image.open(path) as im:
            frames = []
            for frame in ImageSequence.Iterator(im):
                frames.append(np.asarray(frame.convert("RGB")))
                if len(frames) >= frames_needed:
                    break
    else:
        import av

        frames = []
        with av.open(str(path)) as container:
            for frame in container.decode(video=0):
                frames.append(frame.to_ndarray(format="rgb24"))
                if len(frames) >= frames_needed:
                    break
    if not frames:
        raise MediaError(f"target {path} has no video frames. Re-encode it (for example "
                         "`ffmpeg -i in.mp4 -c:v libx264 -pix_fmt yuv420p out.mp4`) or remove it.")
    return np.stack(frames)


def read_frames(path: Path, frames_needed: int | None = None) -> np.ndarray:
    """uint8 RGB [F, H, W, 3]: an image as one frame, a video's first ``frames_needed`` frames (all if None)."""
    path = Path(path)
    if not path.is_file():
        raise MediaError(f"target {path} does not exist. Fix the path in metadata.jsonl or remove the entry.")
    if is_image(path):
        return read_image(path)[None]
    if not is_video(path):
        raise MediaError(f"{path} is neither an image ({', '.join(IMAGE_EXTS)}) nor a video "
                         f"({', '.join(VIDEO_EXTS)}); convert it or remove it.")
    try:
        return _read_video(path, frames_needed if frames_needed is not None else 1 << 62)
    except MediaError:
        raise
    except Exception as exc:
        raise MediaError(f"cannot decode target {path}: {exc}. Re-encode it (for example "
                         "`ffmpeg -i in.mp4 -c:v libx264 -pix_fmt yuv420p out.mp4`) or remove it.") from exc


def resize_center_crop(frames: np.ndarray, height: int, width: int) -> np.ndarray:
    """uint8 [F, H, W, 3] -> uint8 [F, height, width, 3]: scale to cover (aspect kept), crop the centre.

    Antialiased bicubic, so downscaling does not alias; the identity when the size already fits.
    """
    f, h, w, _ = frames.shape
    if (h, w) == (height, width):
        return frames
    scale = max(height / h, width / w)
    # Rounding up guarantees coverage; the crop then removes at most a pixel of slack.
    new_h, new_w = max(height, int(np.ceil(h * scale - 1e-6))), max(width, int(np.ceil(w * scale - 1e-6)))
    x = torch.from_numpy(np.array(frames, dtype=np.float32)).permute(0, 3, 1, 2)
    x = F.interpolate(x, size=(new_h, new_w), mode="bicubic", antialias=True, align_corners=False)
    top, left = (new_h - height) // 2, (new_w - width) // 2
    x = x[:, :, top:top + height, left:left + width]
    return x.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous().numpy()

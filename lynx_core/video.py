"""Writing and reading the generated clips (PyAV for mp4/webm, Pillow for webp/gif).

Formats written by :func:`write_video`:

* ``mp4``: H.264 (libx264), yuv420p, constant quality ``crf``. 4:2:0 needs even sizes, so an odd
  width/height is padded by one row/column that repeats the edge pixels (the file is then one
  pixel larger). Metadata is written as container tags with ``movflags=use_metadata_tags``, so
  any key (e.g. ``workflow``, ``prompt``, ``comment``) survives and ffprobe shows it.
* ``webm``: VP9 (libvpx-vp9), yuv420p, constant quality ``crf``; same padding; Matroska tags
  (stored upper-case by the muxer; :func:`probe` reports them lower-case).
* ``webp``: animated WebP via Pillow, ``duration = 1000/fps`` ms per frame, ``loop`` (0 =
  forever), quality 90. Metadata goes into EXIF the way ComfyUI's own animated-WebP saver does
  it: key ``prompt`` → tag 0x0110, every other key → 0x010F, 0x010E, … (at most 6), each value
  stored as the string ``"<key>:<value>"``.
* ``gif``: Pillow, one adaptive 256-colour palette per frame, duration rounded to GIF's 10 ms
  units. GIF has no key/value text chunks; the whole metadata dict is stored as one JSON object in
  the GIF comment extension.

Pillow merges consecutive identical frames of a GIF into one longer frame, so a GIF of a
static clip reads back with fewer frames; the other formats keep every frame.
Files are written under a temporary name and renamed at the end, so a failed write never
leaves a truncated file at ``path``.
"""
from __future__ import annotations

import json
import logging
import os
import re
from fractions import Fraction
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np

logger = logging.getLogger(__name__)

__all__ = ["FORMATS", "write_video", "read_video", "probe", "next_free_path", "to_uint8_frames"]

FORMATS = ("mp4", "webm", "webp", "gif")
_PIL_FORMATS = {"webp": "WEBP", "gif": "GIF"}
_EXIF_PROMPT_TAG = 0x0110
_EXIF_FIRST_TAG = 0x010F
_EXIF_MAX_EXTRA = 6

ArrayLike = Any  # numpy array or torch tensor; torch is imported lazily


# --------------------------------------------------------------------------------------------
# Frames
# --------------------------------------------------------------------------------------------

def to_uint8_frames(frames: ArrayLike) -> np.ndarray:
    """[F,H,W,3] uint8, or float in [0,1] (numpy or torch, any device) → uint8 numpy [F,H,W,3].

    Floats are clamped to [0,1], scaled by 255 and rounded (the official post-processing).
    """
    if hasattr(frames, "detach") and hasattr(frames, "cpu"):  # torch.Tensor without importing torch
        t = frames.detach().cpu()
        if t.is_floating_point():
            t = t.float()
        frames = t.numpy()
    arr = np.asarray(frames)
    if arr.ndim != 4 or arr.shape[-1] != 3:
        raise ValueError(
            f"frames must have shape [frames, height, width, 3] (got {tuple(arr.shape)}); "
            "pass RGB frames, e.g. a ComfyUI IMAGE batch."
        )
    if arr.shape[0] < 1 or arr.shape[1] < 1 or arr.shape[2] < 1:
        raise ValueError(f"frames must contain at least one non-empty frame (got shape {tuple(arr.shape)}).")
    if arr.dtype == np.uint8:
        return np.ascontiguousarray(arr)
    if np.issubdtype(arr.dtype, np.floating):
        if not np.isfinite(arr).all():
            raise ValueError("frames contain NaN or infinite values; check the decoded latents.")
        return np.round(np.clip(arr.astype(np.float32), 0.0, 1.0) * 255.0).astype(np.uint8)
    raise TypeError(f"frames must be uint8 or float in [0, 1] (got dtype {arr.dtype}).")


def _pad_even(arr: np.ndarray) -> np.ndarray:
    ph, pw = arr.shape[1] % 2, arr.shape[2] % 2
    if ph or pw:
        arr = np.pad(arr, ((0, 0), (0, ph), (0, pw), (0, 0)), mode="edge")
    return arr


def _resolve_format(path: Path, format: Optional[str]) -> tuple[Path, str]:
    suffix = path.suffix.lower().lstrip(".")
    if format is None:
        if suffix not in FORMATS:
            raise ValueError(
                f"cannot tell the video format from {path.name!r}; use one of the extensions "
                f"{', '.join(FORMATS)} or pass format=."
            )
        return path, suffix
    fmt = str(format).lower().lstrip(".")
    if fmt not in FORMATS:
        raise ValueError(f"unknown video format {format!r}; choose one of: {', '.join(FORMATS)}.")
    if not suffix:
        return path.with_name(path.name + "." + fmt), fmt
    if suffix != fmt:
        raise ValueError(f"path {path.name!r} has extension .{suffix} but format={fmt!r}; make them agree.")
    return path, fmt


def _check_metadata(metadata: Optional[dict]) -> dict[str, str]:
    if not metadata:
        return {}
    out: dict[str, str] = {}
    for k, v in metadata.items():
        if not isinstance(k, str) or not re.fullmatch(r"[A-Za-z0-9_.\-]+", k):
            raise ValueError(f"metadata key {k!r} must be a non-empty ASCII word (letters, digits, _ . -).")
        out[k] = v if isinstance(v, str) else json.dumps(v)
    return out


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------

def write_video(
    frames: ArrayLike,
    path: Union[str, Path],
    fps: float,
    format: Optional[str] = None,
    metadata: Optional[dict[str, str]] = None,
    crf: int = 19,
    loop: int = 0,
) -> Path:
    """Write frames to ``path`` and return the final path (an extension is added if missing).

    ``crf`` applies to mp4/webm (lower = better; H.264 0–51, VP9 0–63); ``loop`` to webp/gif
    (0 = forever). Non-string metadata values are stored as JSON. See the module doc for what
    each format keeps.
    """
    path, fmt = _resolve_format(Path(path), format)
    try:
        fps_f = float(fps)
    except (TypeError, ValueError):
        raise TypeError(f"fps must be a number (got {fps!r}).") from None
    if not (0 < fps_f <= 1000):
        raise ValueError(f"fps must be in (0, 1000] (got {fps}).")
    if isinstance(crf, bool) or int(crf) != crf or not 0 <= int(crf) <= 63:
        raise ValueError(f"crf must be an integer in [0, 63] (got {crf!r}); 19 is visually lossless for H.264.")
    if isinstance(loop, bool) or int(loop) != loop or int(loop) < 0:
        raise ValueError(f"loop must be an integer ≥ 0 (got {loop!r}); 0 loops forever.")
    arr = to_uint8_frames(frames)
    meta = _check_metadata(metadata)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.partial.{fmt}")
    try:
        if fmt in ("mp4", "webm"):
            _write_av(arr, tmp, fps_f, fmt, meta, int(crf))
        else:
            _write_pil(arr, tmp, fps_f, fmt, meta, int(loop))
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    logger.info("wrote %s (%d frames, %dx%d, %g fps)", path, arr.shape[0], arr.shape[2], arr.shape[1], fps_f)
    return path


def _write_av(arr: np.ndarray, path: Path, fps: float, fmt: str, meta: dict[str, str], crf: int) -> None:
    import av

    if arr.shape[1] % 2 or arr.shape[2] % 2:
        logger.info("padding %dx%d to even size for 4:2:0 %s", arr.shape[2], arr.shape[1], fmt)
    arr = _pad_even(arr)
    rate = Fraction(fps).limit_denominator(1001)
    if fmt == "mp4":
        codec, container_fmt = "libx264", "mp4"
        container_opts = {"movflags": "use_metadata_tags+faststart"}
        codec_opts = {"crf": str(crf), "preset": "medium"}
    else:
        codec, container_fmt = "libvpx-vp9", "webm"
        container_opts = {}
        # b:v 0 turns crf into pure constant-quality mode in libvpx.
        codec_opts = {"crf": str(crf), "b:v": "0", "deadline": "good", "cpu-used": "4", "row-mt": "1"}
    with av.open(str(path), mode="w", format=container_fmt, options=container_opts) as container:
        for k, v in meta.items():
            container.metadata[k] = v
        stream = container.add_stream(codec, rate=rate, options=codec_opts)
        stream.width, stream.height = arr.shape[2], arr.shape[1]
        stream.pix_fmt = "yuv420p"
        for i, img in enumerate(arr):
            frame = av.VideoFrame.from_ndarray(img, format="rgb24")
            frame.pts = i
            frame.time_base = 1 / rate
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)


def _write_pil(arr: np.ndarray, path: Path, fps: float, fmt: str, meta: dict[str, str], loop: int) -> None:
    from PIL import Image

    images = [Image.fromarray(img, "RGB") for img in arr]
    duration = 1000.0 / fps
    kwargs: dict[str, Any] = {"save_all": True, "append_images": images[1:], "loop": loop}
    if fmt == "webp":
        kwargs.update(duration=int(round(duration)), quality=90, method=4)
        if meta:
            kwargs["exif"] = _webp_exif(meta)
    else:
        images = [im.convert("P", palette=Image.Palette.ADAPTIVE, colors=256) for im in images]
        kwargs.update(append_images=images[1:], duration=duration, disposal=1, optimize=False)
        if meta:
            kwargs["comment"] = json.dumps(meta, ensure_ascii=False).encode("utf-8")
    images[0].save(path, format=_PIL_FORMATS[fmt], **kwargs)


def _webp_exif(meta: dict[str, str]) -> bytes:
    from PIL import Image

    exif = Image.Exif()
    tag = _EXIF_FIRST_TAG
    extra = [k for k in meta if k != "prompt"]
    if len(extra) > _EXIF_MAX_EXTRA:
        raise ValueError(
            f"webp can carry at most {_EXIF_MAX_EXTRA} metadata keys besides 'prompt' "
            f"(got {len(extra)}: {extra}); merge them into one JSON value or use mp4/webm."
        )
    if "prompt" in meta:
        exif[_EXIF_PROMPT_TAG] = f"prompt:{meta['prompt']}"
    for k in extra:
        exif[tag] = f"{k}:{meta[k]}"
        tag -= 1
    return exif.tobytes()


# --------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------

def _existing(path: Union[str, Path]) -> Path:
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"video file not found: {p}")
    return p


def _is_pil_format(p: Path) -> bool:
    if p.suffix.lower() in (".gif", ".webp"):
        return True
    with open(p, "rb") as f:
        head = f.read(12)
    return head[:6] in (b"GIF87a", b"GIF89a") or (head[:4] == b"RIFF" and head[8:12] == b"WEBP")


def read_video(path: Union[str, Path]) -> np.ndarray:
    """Decode every frame to uint8 RGB [F,H,W,3] (mp4/webm via PyAV, webp/gif via Pillow)."""
    p = _existing(path)
    if _is_pil_format(p):
        from PIL import Image, ImageSequence

        with Image.open(p) as im:
            frames = [np.asarray(f.convert("RGB")) for f in ImageSequence.Iterator(im)]
    else:
        import av

        with av.open(str(p)) as container:
            frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    if not frames:
        raise ValueError(f"{p} contains no video frames.")
    return np.stack(frames)


def probe(path: Union[str, Path]) -> dict[str, Any]:
    """Frame count, size, fps, codec name and metadata of a written clip (without decoding mp4/webm)."""
    p = _existing(path)
    if _is_pil_format(p):
        return _probe_pil(p)
    import av

    with av.open(str(p)) as container:
        stream = container.streams.video[0]
        n = stream.frames
        if not n:  # Matroska does not store a frame count: count packets instead.
            n = sum(1 for pkt in container.demux(stream) if pkt.size)
        rate = stream.average_rate or stream.guessed_rate or stream.base_rate
        meta = dict(container.metadata)
        if "matroska" in container.format.name:
            # Matroska tag names are upper case by convention (ffmpeg writes them so).
            meta = {k.lower(): v for k, v in meta.items()}
        return {
            "frames": int(n),
            "width": int(stream.codec_context.width),
            "height": int(stream.codec_context.height),
            "fps": float(rate) if rate else 0.0,
            "codec": stream.codec_context.name,
            "metadata": meta,
        }


def _probe_pil(p: Path) -> dict[str, Any]:
    from PIL import Image

    with Image.open(p) as im:
        n = getattr(im, "n_frames", 1)
        im.load()  # WebP only fills in the frame duration once a frame is decoded
        duration = im.info.get("duration") or 0
        meta: dict[str, str] = {}
        if im.format == "WEBP":
            exif = im.getexif()
            for tag in [_EXIF_PROMPT_TAG] + [_EXIF_FIRST_TAG - j for j in range(_EXIF_MAX_EXTRA)]:
                val = exif.get(tag)
                if isinstance(val, bytes):
                    val = val.decode("utf-8", "replace")
                if isinstance(val, str) and ":" in val:
                    k, v = val.split(":", 1)
                    meta[k] = v
        else:
            comment = im.info.get("comment")
            if comment:
                try:
                    parsed = json.loads(comment.decode("utf-8") if isinstance(comment, bytes) else comment)
                    if isinstance(parsed, dict):
                        meta = {str(k): str(v) for k, v in parsed.items()}
                except (ValueError, UnicodeDecodeError):
                    meta = {"comment": comment.decode("utf-8", "replace") if isinstance(comment, bytes) else str(comment)}
        return {
            "frames": int(n),
            "width": im.width,
            "height": im.height,
            "fps": 1000.0 / duration if duration else 0.0,
            "codec": im.format.lower(),
            "metadata": meta,
        }


# --------------------------------------------------------------------------------------------
# Output naming
# --------------------------------------------------------------------------------------------

def next_free_path(directory: Union[str, Path], prefix: str, ext: str) -> Path:
    """``directory/<prefix>_00001.<ext>``, numbered one past the highest existing number.

    ``prefix`` may contain sub-folders ("videos/lynx" → directory/videos/lynx_00001.mp4); the
    folder is created. The counter is shared across extensions (lynx_00003.mp4 exists → the next
    webp is lynx_00004.webp) so the files of one run keep one number. The returned path never
    exists at the time of the call; the prefix may not leave ``directory``.
    """
    base = Path(directory)
    prefix = str(prefix).replace("\\", "/").strip()
    ext = str(ext).strip().lstrip(".")
    if not prefix or prefix.endswith("/"):
        raise ValueError(f"filename prefix {prefix!r} needs a file name part, e.g. 'lynx' or 'videos/lynx'.")
    if not ext or not re.fullmatch(r"[A-Za-z0-9]+", ext):
        raise ValueError(f"extension {ext!r} must be letters/digits, e.g. 'mp4'.")
    target = base / prefix
    root = base.resolve()
    folder = target.parent.resolve()
    if folder != root and root not in folder.parents:
        raise ValueError(f"filename prefix {prefix!r} points outside the output folder {base}; use a relative sub-folder.")
    name = target.name
    folder.mkdir(parents=True, exist_ok=True)
    folder = target.parent
    pattern = re.compile(re.escape(name) + r"_(\d{5,})(?:\..*)?$")
    highest = 0
    for entry in folder.iterdir():
        m = pattern.match(entry.name)
        if m:
            highest = max(highest, int(m.group(1)))
    counter = highest + 1
    while True:
        candidate = folder / f"{name}_{counter:05d}.{ext}"
        if not candidate.exists():
            return candidate
        counter += 1

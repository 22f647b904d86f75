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
static clip reads back with fewer frames (the total duration is kept); the other formats keep
every frame. libwebp merges them in webp too (a clip of identical frames even became a still
image with no duration); the writer re-splits such frames with transparent no-op frames, so a
webp reads back with every frame and ``duration`` ms each. A one-frame clip stays a still image.

Audio (``write_video(..., audio=(samples, sample_rate))``, ``samples`` float [channels, samples]
in [-1, 1]): mp4 gets AAC (at the input rate when AAC supports it, else 48 kHz), webm gets Opus
(always 48 kHz, Opus's own rate). The sound is cut, or padded at the end with silence, to exactly
the video's duration ``frames / fps``, so the tracks end together. Mono and stereo are kept; more
channels are reduced to the first two (logged). webp and gif cannot hold sound: the audio is
dropped with a logged warning and the animation is written as usual.
Files are written under a temporary name of their own (unique per call, created exclusively)
and renamed at the end, so a failed write never leaves a truncated file at ``path`` and two
writers never share a temporary file. Frames with NaN/inf are refused (naming the frames) rather
than written black.

Output names (:func:`reserve_numbered_path`, :func:`save_numbered_video`) are numbered
``<prefix>_00001.<ext>`` and reserved by an exclusive create, so concurrent writers (two ComfyUI
instances sharing one output folder) never pick the same number. The prefix is resolved against
the output folder lexically, as ComfyUI does: symlinked sub-folders work, ``..`` escapes and
absolute paths are refused, and bad prefixes (NUL byte, names over 255 bytes, a folder part that
is a file) or an unwritable folder raise an error that names ``filename_prefix`` or the folder.
"""
from __future__ import annotations

import errno
import io
import json
import logging
import os
import re
import secrets
import struct
from fractions import Fraction
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np

logger = logging.getLogger(__name__)

__all__ = [
    "FORMATS",
    "AUDIO_FORMATS",
    "write_video",
    "read_video",
    "probe",
    "next_free_path",
    "reserve_numbered_path",
    "save_numbered_video",
    "check_finite_frames",
    "to_uint8_frames",
    "prepare_audio",
]

FORMATS = ("mp4", "webm", "webp", "gif")
AUDIO_FORMATS = ("mp4", "webm")  # the containers that carry a sound track
# (encoder, rate used when the encoder cannot take the input rate; None: always this rate)
_AUDIO_CODECS = {"mp4": ("aac", 48000), "webm": ("libopus", None)}
_OPUS_RATE = 48000
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
        check_finite_frames(arr, "frames")
        return np.round(np.clip(arr.astype(np.float32), 0.0, 1.0) * 255.0).astype(np.uint8)
    raise TypeError(f"frames must be uint8 or float in [0, 1] (got dtype {arr.dtype}).")


def _frame_ranges(indices: list[int], limit: int = 8) -> str:
    """[0, 1, 2, 5, 9, 10] -> "0-2, 5, 9-10" (at most ``limit`` runs, then "…")."""
    runs: list[list[int]] = []
    for i in indices:
        if runs and i == runs[-1][1] + 1:
            runs[-1][1] = i
        else:
            runs.append([i, i])
    text = ", ".join(f"{a}" if a == b else f"{a}-{b}" for a, b in runs[:limit])
    return text + (", …" if len(runs) > limit else "")


def check_finite_frames(frames: np.ndarray, input_name: str = "frames") -> None:
    """Raise ValueError naming ``input_name`` and the frames that hold NaN or ±inf.

    Converting such frames to uint8 silently turns them black, so this must run before any
    clamp or cast. ``frames`` is float [F, ...] (numpy).
    """
    arr = np.asarray(frames)
    if not np.issubdtype(arr.dtype, np.floating):
        return
    finite = np.isfinite(arr.reshape(arr.shape[0], -1)).all(axis=1)
    if finite.all():
        return
    bad = np.flatnonzero(~finite).tolist()
    raise ValueError(
        f"{input_name}: frame(s) {_frame_ranges(bad)} of {arr.shape[0]} (counting from 0) contain NaN or "
        "infinite values, which would be written as black pixels. Usually the VAE decode overflowed in fp16: "
        "decode in bf16 or fp32 (ComfyUI: --bf16-vae or --fp32-vae). Otherwise the diffusion model or the Lynx "
        "adapters produced NaN: run them in bf16 or fp32 instead of fp16 and check the sampler's output."
    )


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


def prepare_audio(audio: tuple[ArrayLike, int], n_frames: int, fps: float) -> tuple[np.ndarray, int]:
    """Check ``(samples [C, S] or [S], sample_rate)`` and fit it to ``n_frames / fps`` seconds.

    Returns float32 [C, S'] (C = 1 or 2) clamped to [-1, 1], cut or padded at the end with
    silence to ``round(n_frames * sample_rate / fps)`` samples, and the sample rate.
    """
    if not isinstance(audio, (tuple, list)) or len(audio) != 2:
        raise TypeError(
            f"audio must be a (samples, sample_rate) pair with samples shaped [channels, samples] "
            f"(got {type(audio).__name__}); pass None for no sound."
        )
    samples, rate = audio
    if isinstance(rate, bool) or not isinstance(rate, (int, np.integer)) or not 1000 <= int(rate) <= 384000:
        raise ValueError(f"audio sample rate must be an integer in [1000, 384000] Hz (got {rate!r}).")
    rate = int(rate)
    if hasattr(samples, "detach") and hasattr(samples, "cpu"):
        samples = samples.detach().cpu().float().numpy()
    wav = np.asarray(samples)
    if wav.ndim == 1:
        wav = wav[None]
    if wav.ndim != 2 or wav.shape[0] < 1:
        raise ValueError(
            f"audio samples must have shape [channels, samples] (got {tuple(wav.shape)}); "
            "take one item of a batched waveform first."
        )
    if not np.issubdtype(wav.dtype, np.floating):
        raise TypeError(f"audio samples must be float in [-1, 1] (got dtype {wav.dtype}).")
    if wav.shape[0] > 2:
        logger.warning("audio has %d channels; keeping the first two (stereo)", wav.shape[0])
        wav = wav[:2]
    wav = wav.astype(np.float32)
    if not np.isfinite(wav).all():
        raise ValueError("audio samples contain NaN or infinite values.")
    target = int(round(n_frames * rate / fps))
    have = wav.shape[1]
    if have > target:
        logger.info("audio is %.3f s, the video %.3f s: cutting the sound to the video", have / rate, target / rate)
        wav = wav[:, :target]
    elif have < target:
        logger.info("audio is %.3f s, the video %.3f s: padding the end with silence", have / rate, target / rate)
        wav = np.pad(wav, ((0, 0), (0, target - have)))
    return np.ascontiguousarray(np.clip(wav, -1.0, 1.0)), rate


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
    audio: Optional[tuple[np.ndarray, int]] = None,
) -> Path:
    """Write frames to ``path`` and return the final path (an extension is added if missing).

    ``crf`` applies to mp4/webm (lower = better; H.264 0–51, VP9 0–63); ``loop`` to webp/gif
    (0 = forever). Non-string metadata values are stored as JSON. ``audio`` is
    ``(float32 [channels, samples] in [-1, 1], sample_rate)`` or None: mp4 stores it as AAC and
    webm as Opus, cut or padded with silence to the video's duration; webp/gif drop it with a
    logged warning. See the module doc for what each format keeps.
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
    sound = prepare_audio(audio, arr.shape[0], fps_f) if audio is not None else None
    if sound is not None and fmt not in AUDIO_FORMATS:
        logger.warning(
            "%s files cannot hold sound; writing %s without the audio (use mp4 or webm to keep it)", fmt, path.name
        )
        sound = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = _create_temp_beside(path, fmt)
    except OSError as e:
        raise _folder_error(path.parent, e) from e
    try:
        if fmt in ("mp4", "webm"):
            _write_av(arr, tmp, fps_f, fmt, meta, int(crf), sound)
        else:
            _write_pil(arr, tmp, fps_f, fmt, meta, int(loop))
        os.replace(tmp, path)
    except OSError as e:
        if e.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)):
            raise _folder_error(path.parent, e) from e
        raise
    finally:
        if os.path.lexists(tmp):
            tmp.unlink()
    logger.info(
        "wrote %s (%d frames, %dx%d, %g fps%s)", path, arr.shape[0], arr.shape[2], arr.shape[1], fps_f,
        ", with audio" if sound is not None else "",
    )
    return path


def _add_audio_stream(container: Any, fmt: str, rate: int, channels: int) -> Any:
    import av

    codec, fallback = _AUDIO_CODECS[fmt]
    if codec not in av.codecs_available:
        raise RuntimeError(
            f"this PyAV build has no {codec} encoder, needed for sound in {fmt}; install the PyAV wheel from PyPI "
            "(`pip install -U av`) or write without audio."
        )
    supported = av.codec.Codec(codec, "w").audio_rates or ()
    if fallback is None:
        out_rate = _OPUS_RATE
    else:
        out_rate = rate if not supported or rate in supported else fallback
    if out_rate != rate:
        logger.info("resampling the audio from %d Hz to %d Hz for %s", rate, out_rate, codec)
    return container.add_stream(codec, rate=out_rate, layout="stereo" if channels == 2 else "mono")


def _audio_chunk(wav: np.ndarray, start: int, stop: int, rate: int) -> Any:
    import av

    layout = "stereo" if wav.shape[0] == 2 else "mono"
    frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(wav[:, start:stop]), format="fltp", layout=layout)
    frame.sample_rate = rate
    frame.time_base = Fraction(1, rate)
    frame.pts = start
    return frame


def _write_av(
    arr: np.ndarray,
    path: Path,
    fps: float,
    fmt: str,
    meta: dict[str, str],
    crf: int,
    sound: Optional[tuple[np.ndarray, int]] = None,
) -> None:
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
        astream = _add_audio_stream(container, fmt, sound[1], sound[0].shape[0]) if sound is not None else None
        for i, img in enumerate(arr):
            frame = av.VideoFrame.from_ndarray(img, format="rgb24")
            frame.pts = i
            frame.time_base = 1 / rate
            for packet in stream.encode(frame):
                container.mux(packet)
            if astream is not None:
                # Feed the sound that plays during this frame, so the muxer interleaves the two
                # tracks as it goes instead of buffering the whole video.
                wav, sr = sound  # type: ignore[misc]
                lo, hi = int(round(i * sr / fps)), int(round((i + 1) * sr / fps))
                if i == len(arr) - 1:
                    hi = wav.shape[1]
                if hi > lo:
                    for packet in astream.encode(_audio_chunk(wav, lo, hi, sr)):
                        container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
        if astream is not None:
            for packet in astream.encode(None):
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
    buf = io.BytesIO()
    images[0].save(buf, format=_PIL_FORMATS[fmt], **kwargs)
    data = buf.getvalue()
    if fmt == "webp":
        data = _webp_keep_every_frame(data, arr.shape[0], arr.shape[2], arr.shape[1], kwargs["duration"], loop)
    with open(path, "wb") as f:
        f.write(data)


# libwebp's animation encoder never stores a frame that looks like the one before it (within
# its lossy tolerance): it lengthens the earlier frame instead, and a clip whose frames are all
# alike comes out as a still image with no duration at all. The helpers below undo that on the
# RIFF level: each lengthened frame is followed by fully transparent, alpha-blended frames of the
# same rectangle (they leave the picture as it is), so the file has one frame per source frame
# and the clip's whole duration. Files without merged frames are left byte-for-byte as encoded.
_WEBP_IMAGE_CHUNKS = (b"ALPH", b"VP8 ", b"VP8L")
_VP8X_ANIMATION, _VP8X_ALPHA = 0x02, 0x10
_ANMF_NO_BLEND, _ANMF_DISPOSE = 0x02, 0x01


def _riff_chunks(data: bytes) -> list[tuple[bytes, bytes]]:
    if data[:4] != b"RIFF" or data[8:12] != b"WEBP":
        raise ValueError("Pillow did not produce a WebP RIFF file")
    chunks, i = [], 12
    while i + 8 <= len(data):
        size = int.from_bytes(data[i + 4:i + 8], "little")
        chunks.append((data[i:i + 4], data[i + 8:i + 8 + size]))
        i += 8 + size + (size & 1)
    return chunks


def _riff_chunk(tag: bytes, payload: bytes) -> bytes:
    return tag + struct.pack("<I", len(payload)) + payload + (b"\0" if len(payload) & 1 else b"")


def _u24(value: int) -> bytes:
    return int(value).to_bytes(3, "little")


def _transparent_frame(width: int, height: int) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGBA", (width, height), (0, 0, 0, 0)).save(buf, format="WEBP", lossless=True)
    return b"".join(_riff_chunk(t, p) for t, p in _riff_chunks(buf.getvalue()) if t in _WEBP_IMAGE_CHUNKS)


def _webp_keep_every_frame(data: bytes, n_frames: int, width: int, height: int, duration: int, loop: int) -> bytes:
    chunks = _riff_chunks(data)
    # (x, y, w, h, duration ms, flags, image chunks) per stored frame
    frames: list[tuple[int, int, int, int, int, int, bytes]] = []
    for tag, p in chunks:
        if tag == b"ANMF":
            frames.append((int.from_bytes(p[0:3], "little") * 2, int.from_bytes(p[3:6], "little") * 2,
                           int.from_bytes(p[6:9], "little") + 1, int.from_bytes(p[9:12], "little") + 1,
                           int.from_bytes(p[12:15], "little"), p[15], p[16:]))
    if not frames:  # everything merged into a still image
        still = b"".join(_riff_chunk(t, p) for t, p in chunks if t in _WEBP_IMAGE_CHUNKS)
        frames = [(0, 0, width, height, n_frames * duration, _ANMF_NO_BLEND, still)]
    if len(frames) >= n_frames or duration <= 0:
        return data
    out_frames: list[bytes] = []
    blanks: dict[tuple[int, int], bytes] = {}
    for x, y, w, h, dur, flags, body in frames:
        repeat = dur // duration if dur % duration == 0 and dur >= duration else 1
        first_flags = flags & ~_ANMF_DISPOSE if repeat > 1 else flags
        first_dur = duration if repeat > 1 else dur
        out_frames.append(_anmf(x, y, w, h, first_dur, first_flags, body))
        if repeat > 1:
            blank = blanks.setdefault((w, h), _transparent_frame(w, h))
            for k in range(1, repeat):
                # alpha-blended and transparent: the canvas stays as the frame left it; the last
                # copy carries the frame's own dispose-to-background, if it had one
                last = k == repeat - 1
                out_frames.append(_anmf(x, y, w, h, duration, (flags & _ANMF_DISPOSE) if last else 0, blank))
    if len(out_frames) != n_frames:
        logger.debug("webp: %d frames stored for %d source frames", len(out_frames), n_frames)
    tags = dict(chunks)
    vp8x_flags = (tags[b"VP8X"][0] if b"VP8X" in tags else 0) | _VP8X_ANIMATION | _VP8X_ALPHA
    anim = tags.get(b"ANIM") or (b"\0\0\0\0" + struct.pack("<H", loop))
    body = _riff_chunk(b"VP8X", bytes([vp8x_flags, 0, 0, 0]) + _u24(width - 1) + _u24(height - 1))
    if b"ICCP" in tags:
        body += _riff_chunk(b"ICCP", tags[b"ICCP"])
    body += _riff_chunk(b"ANIM", anim) + b"".join(out_frames)
    for tag in (b"EXIF", b"XMP "):
        if tag in tags:
            body += _riff_chunk(tag, tags[tag])
    return b"RIFF" + struct.pack("<I", 4 + len(body)) + b"WEBP" + body


def _anmf(x: int, y: int, w: int, h: int, duration: int, flags: int, body: bytes) -> bytes:
    head = _u24(x // 2) + _u24(y // 2) + _u24(w - 1) + _u24(h - 1) + _u24(duration) + bytes([flags])
    return _riff_chunk(b"ANMF", head + body)


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
    """Frame count, size, fps, codec name, metadata and audio of a written clip (without decoding mp4/webm).

    ``audio`` is None or ``{codec, sample_rate, channels, duration}`` (``duration`` None for webm).
    """
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
        audio = None
        if container.streams.audio:
            a = container.streams.audio[0]
            audio = {
                "codec": a.codec_context.name,
                "sample_rate": int(a.codec_context.sample_rate),
                "channels": int(a.codec_context.channels),
                # Matroska stores no per-stream duration.
                "duration": float(a.duration * a.time_base) if a.duration else None,
            }
        return {
            "frames": int(n),
            "width": int(stream.codec_context.width),
            "height": int(stream.codec_context.height),
            "fps": float(rate) if rate else 0.0,
            "codec": stream.codec_context.name,
            "metadata": meta,
            "audio": audio,
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
            "audio": None,
        }


# --------------------------------------------------------------------------------------------
# Output naming
# --------------------------------------------------------------------------------------------

_NAME_MAX = 255  # bytes per file or folder name (ext4, xfs, btrfs, APFS; NTFS counts 255 characters)
_COUNTER_WIDTH = 5
_OPEN_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)


def _create_temp_beside(path: Path, fmt: str) -> Path:
    """A new, empty, uniquely named hidden file next to ``path`` (exclusive create).

    Every write gets its own temporary file, so two writers never share one; the stem is cut
    so the temporary name stays within the file-name limit whenever the final name does.
    """
    stem = path.stem[:120]
    for _ in range(100):
        tmp = path.with_name(f".{stem}.{secrets.token_hex(6)}.partial.{fmt}")
        try:
            os.close(os.open(tmp, _OPEN_FLAGS, 0o666))
        except FileExistsError:
            continue
        return tmp
    raise FileExistsError(errno.EEXIST, f"could not create a temporary file next to {path}")


def _folder_error(folder: Path, exc: OSError) -> OSError:
    """An OSError from creating or writing in ``folder``, reworded to say what to do."""
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return PermissionError(
            exc.errno,
            f"the output folder {folder} is not writable ({exc.strerror}); make it writable for the user "
            "running ComfyUI, or start ComfyUI with --output-directory set to a writable folder.",
        )
    if exc.errno == errno.ENAMETOOLONG:
        return OSError(
            exc.errno, f"the path in {folder} is too long for the file system; use a shorter filename_prefix."
        )
    if exc.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)):
        return OSError(
            exc.errno, f"no space left (or quota exceeded) on the disk of the output folder {folder}; free some space."
        )
    return OSError(exc.errno, f"cannot write into the output folder {folder}: {exc.strerror or exc}")


def _split_prefix(directory: Union[str, Path], prefix: str, ext: str) -> tuple[Path, list[str], str]:
    """(output folder, sub-folder names, file name) of ``prefix``, checked and resolved lexically.

    Lexical, the way ComfyUI's ``folder_paths.get_save_image_path`` does it: the prefix is
    joined to the output folder and normalised without following links, so a symlinked
    sub-folder of the output folder is accepted while ``..`` escapes and absolute paths are not.
    """
    raw = str(prefix)
    if "\x00" in raw:
        raise ValueError(
            f"filename_prefix {raw!r} contains a NUL character (\\x00), which no file system allows in a "
            "name; remove it (it usually comes from pasted binary text)."
        )
    cleaned = raw.replace("\\", "/").strip()
    if not cleaned or cleaned.endswith("/"):
        raise ValueError(f"filename_prefix {raw!r} needs a file name part, e.g. 'lynx' or 'videos/lynx'.")
    if cleaned.startswith("/") or re.match(r"[A-Za-z]:", cleaned):
        raise ValueError(
            f"filename_prefix {raw!r} is an absolute path; give a name relative to the output folder "
            f"{directory}, e.g. 'Lynx/lynx'."
        )
    root = os.path.abspath(directory)
    target = os.path.normpath(os.path.join(root, cleaned))
    if target == root or os.path.commonpath([root, target]) != root:
        raise ValueError(
            f"filename_prefix {raw!r} points outside the output folder {root} ('..' may not leave it); "
            "use a relative sub-folder, e.g. 'Lynx/lynx'."
        )
    parts = list(Path(os.path.relpath(target, root)).parts)
    name = parts.pop()
    for part, shown in [(p, p) for p in parts] + [(name, f"{name}_{'0' * _COUNTER_WIDTH}1.{ext}")]:
        size = len(os.fsencode(shown))
        if size > _NAME_MAX:
            raise ValueError(
                f"filename_prefix {raw[:40]!r}… makes the name {shown[:40]!r}… {size} bytes long; file systems "
                f"allow {_NAME_MAX} bytes per file or folder name (the counter and extension add "
                f"{len(shown) - len(part)} to the file name); shorten it."
            )
    return Path(root), parts, name


def _make_folder(root: Path, parts: list[str], prefix: str) -> Path:
    folder = root
    for part in parts:
        folder = folder / part
        if os.path.lexists(folder) and not folder.is_dir():
            raise ValueError(
                f"filename_prefix {prefix!r}: {folder.relative_to(root).as_posix()!r} in the output folder {root} "
                "is an existing file (or a broken link), not a folder; choose another sub-folder name or move "
                "that file away."
            )
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise _folder_error(folder, e) from e
    return folder


def _highest_number(folder: Path, name: str) -> int:
    pattern = re.compile(re.escape(name) + r"_(\d{5,})(?:\..*)?$")
    highest = 0
    try:
        entries = list(os.scandir(folder))
    except OSError as e:
        raise _folder_error(folder, e) from e
    for entry in entries:
        m = pattern.match(entry.name)
        if m:
            highest = max(highest, int(m.group(1)))
    return highest


def _check_ext(ext: str) -> str:
    ext = str(ext).strip().lstrip(".")
    if not ext or not re.fullmatch(r"[A-Za-z0-9]+", ext):
        raise ValueError(f"extension {ext!r} must be letters/digits, e.g. 'mp4'.")
    return ext


def next_free_path(directory: Union[str, Path], prefix: str, ext: str) -> Path:
    """``directory/<prefix>_00001.<ext>``, numbered one past the highest existing number.

    ``prefix`` may contain sub-folders ("videos/lynx" → directory/videos/lynx_00001.mp4); the
    folder is created. The counter is shared across extensions (lynx_00003.mp4 exists → the next
    webp is lynx_00004.webp) so the files of one run keep one number. The returned path does not
    exist at the time of the call, but nothing holds it: when several processes may write into
    one folder use :func:`reserve_numbered_path`. The prefix may not leave ``directory``
    (checked lexically; see :func:`_split_prefix`).
    """
    ext = _check_ext(ext)
    root, parts, name = _split_prefix(directory, prefix, ext)
    folder = _make_folder(root, parts, str(prefix))
    counter = _highest_number(folder, name) + 1
    while True:
        candidate = folder / f"{name}_{counter:05d}.{ext}"
        if not os.path.lexists(candidate):
            return candidate
        counter += 1


def reserve_numbered_path(directory: Union[str, Path], prefix: str, ext: str) -> Path:
    """Like :func:`next_free_path`, but the name is taken: an empty placeholder file is created
    with an exclusive create (``O_EXCL``), so two writers at the same instant, even two ComfyUI
    instances sharing one output folder, always get different numbers. Write the real file over
    the placeholder with :func:`write_video` (it renames its finished temporary file onto it), or
    use :func:`save_numbered_video`, which also removes the placeholder when the write fails.
    """
    ext = _check_ext(ext)
    root, parts, name = _split_prefix(directory, prefix, ext)
    folder = _make_folder(root, parts, str(prefix))
    counter = _highest_number(folder, name) + 1
    while True:
        candidate = folder / f"{name}_{counter:05d}.{ext}"
        try:
            os.close(os.open(candidate, _OPEN_FLAGS, 0o666))
        except FileExistsError:  # taken by a file, a folder or a concurrent writer: try the next
            counter += 1
            continue
        except OSError as e:
            raise _folder_error(folder, e) from e
        return candidate


def save_numbered_video(
    frames: ArrayLike,
    directory: Union[str, Path],
    prefix: str,
    fps: float,
    format: str,
    **options: Any,
) -> Path:
    """Write ``frames`` to the next free ``directory/<prefix>_NNNNN.<format>`` and return it.

    The name is reserved first (:func:`reserve_numbered_path`); if the write fails, the empty
    placeholder is removed again, so a failure leaves neither a half file nor an empty one.
    ``options`` are :func:`write_video`'s (``metadata``, ``crf``, ``loop``, ``audio``).
    """
    fmt = str(format).lower().lstrip(".")
    if fmt not in FORMATS:
        raise ValueError(f"unknown video format {format!r}; choose one of: {', '.join(FORMATS)}.")
    path = reserve_numbered_path(directory, prefix, fmt)
    try:
        return write_video(frames, path, fps=fps, format=fmt, **options)
    except BaseException:
        _discard_placeholder(path)
        raise


def _discard_placeholder(path: Path) -> None:
    try:
        if path.stat().st_size == 0:
            path.unlink()
    except OSError:
        pass

"""The training cache: a dataset folder encoded once into safetensors shards, plus a JSON manifest.

Layout of a cache folder::

    manifest.json                 what the cache holds, with every fingerprint (written last, atomically)
    latents/<key>.safetensors     per target: "latent" [16, F', h, w]
    texts/<key>.safetensors       per caption: "text" [Lt, text_dim] (trimmed)
    target_faces/<key>.safetensors per target: "embeddings" [k, 512] of its first / middle frame faces
    faces/<key>.safetensors       per identity photo: "embedding" [512] (unit ArcFace), "crop"
                                  [256, 256, 3] uint8 (aligned reference crop); no tensors if no face
    refs/<key>.safetensors        per identity photo with a face: "ref_latent" [16, 1, 32, 32]
    fixed/<key>.safetensors       "reference_text", "empty_text", "negative_text", "grey_ref_latent"

Each shard's name is a hash of everything its content depends on (the source file's fingerprint,
the encoder identifiers, the settings that matter for it), so a changed source or setting re-encodes
exactly the shards it changes and reuses the rest; the manifest records why. Shards and the manifest
are written to a temporary name and renamed, so an interrupted build never leaves a half-written file.
Nothing is pickled.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import uuid
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import Tensor

from ..reference import REFERENCE_PROMPT
from .buckets import bucket_tokens, check_frame_count, describe_buckets, frames_to_use, resolution_for
from .dataset import DatasetError, DatasetScan, TargetItem, scan_dataset
from .media import MediaError, read_frames, read_image, resize_center_crop
from .types import FixedEmbeddings, TrainSample

logger = logging.getLogger(__name__)

__all__ = ["CacheSettings", "DataEncoders", "CacheEntry", "TrainCache", "CacheError", "build_cache",
           "DEFAULT_NEGATIVE_PROMPT", "MANIFEST"]

MANIFEST = "manifest.json"
FORMAT = "lynx-train-cache"
VERSION = 1
SHARD_DIRS = ("latents", "texts", "target_faces", "faces", "refs", "fixed")
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
REF_SIZE = 256
GREY = 127

# Wan2.1's standard English negative prompt (the one lynx_core's demo uses).
DEFAULT_NEGATIVE_PROMPT = (
    "Bright tones, overexposed, blurred background, static, subtitles, style, works, paintings, images, overall "
    "gray, worst quality, low quality, JPEG compression residue, ugly, incomplete, extra fingers, poorly drawn "
    "hands, poorly drawn faces, deformed, disfigured, misshapen limbs, fused fingers, still picture, messy "
    "background, three legs, many people in the background, walking backwards")


class CacheError(DatasetError):
    """The cache cannot be built or opened; the message names the input and the fix."""


# -- settings and encoders -------------------------------------------------------------------------
@dataclass
class CacheSettings:
    """Data-side options (docs/training-data.md). ``from_dict`` refuses unknown keys."""

    resolutions: list[list[int]] | None = None   # [[h, w], ...] buckets to choose from; None: pixel_area
    pixel_area: int = 480 * 832                  # target area when resolutions is None (aspect kept)
    multiple: int = 16                           # bucket sides are multiples of this
    max_frames: int = 81                         # 4k+1; a video trains with its first 4k+1 <= this frames
    frame_stride: int = 1                        # take every n-th frame of a video
    verify_threshold: float | None = 0.4         # ArcFace cosine identity photo vs target; None = no check
    copy_threshold: float = 0.99                 # above this the identity photo is warned as the target itself
    heldout: float = 0.0                         # fraction of targets (all their pairs) kept for the eval loss
    heldout_list: list[str] = field(default_factory=list)  # target paths or pair keys always held out
    seed: int = 0                                # the held-out split's seed
    allow_empty_captions: bool = False           # a target without .txt trains with the empty prompt
    hash_sources: str = "stat"                   # "stat" (path, size, mtime) or "content" (sha256)
    face_select: str = "largest"                 # which face of an identity photo / target frame
    negative_prompt: str = DEFAULT_NEGATIVE_PROMPT
    reference_prompt: str = REFERENCE_PROMPT
    dtype: str = "float32"                       # storage dtype of latents and text embeddings

    def __post_init__(self) -> None:
        self.validate()

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "CacheSettings":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise CacheError(f"unknown data setting(s) {unknown}; the data settings are: {sorted(known)}.")
        return cls(**values)

    def validate(self) -> None:
        try:
            check_frame_count(self.max_frames)
        except ValueError as exc:
            raise CacheError(str(exc)) from None
        if self.frame_stride < 1:
            raise CacheError(f"frame_stride = {self.frame_stride} must be >= 1.")
        if self.multiple < 8 or self.multiple % 8:
            raise CacheError(f"multiple = {self.multiple} must be a multiple of 8 (16 for Wan's 2x2 patches).")
        if self.resolutions is not None:
            self.resolutions = [list(map(int, r)) for r in self.resolutions]
            if not self.resolutions:
                raise CacheError("resolutions is empty; give [[height, width], ...] or null to use pixel_area.")
            for r in self.resolutions:
                if len(r) != 2 or min(r) <= 0 or r[0] % self.multiple or r[1] % self.multiple:
                    raise CacheError(f"resolution {r} must be [height, width], both positive multiples of "
                                     f"{self.multiple}.")
        elif self.pixel_area < self.multiple ** 2:
            raise CacheError(f"pixel_area = {self.pixel_area} is smaller than one {self.multiple}x{self.multiple} "
                             "tile; use e.g. 480*832 = 399360.")
        if self.verify_threshold is not None and not -1.0 <= self.verify_threshold <= 1.0:
            raise CacheError(f"verify_threshold = {self.verify_threshold} must be a cosine in [-1, 1] or null (off).")
        if not 0.0 <= self.heldout < 1.0:
            raise CacheError(f"heldout = {self.heldout} must be a fraction in [0, 1).")
        if self.hash_sources not in ("stat", "content"):
            raise CacheError(f"hash_sources = {self.hash_sources!r} must be 'stat' or 'content'.")
        if self.face_select not in ("largest", "index", "all"):
            raise CacheError(f"face_select = {self.face_select!r} must be 'largest', 'index' or 'all'.")
        if self.dtype not in _DTYPES:
            raise CacheError(f"dtype = {self.dtype!r} must be one of {sorted(_DTYPES)}.")

    @property
    def torch_dtype(self) -> torch.dtype:
        return _DTYPES[self.dtype]

    @property
    def frames_needed(self) -> int:
        return (self.max_frames - 1) * self.frame_stride + 1

    def resolution(self, height: int, width: int) -> tuple[int, int]:
        return resolution_for(height, width, self.resolutions, self.pixel_area, self.multiple)


def _describe_analyzer(face: Any) -> str:
    parts = [type(face).__name__]
    for attr in ("detector_spec", "arcface_path", "arcface_backend", "det_thresh", "det_size"):
        if hasattr(face, attr):
            parts.append(f"{attr}={getattr(face, attr)}")
    return ";".join(parts)


@dataclass
class DataEncoders:
    """The frozen encoders, handed in (ComfyUI's VAE/CLIP in the graph, diffusers or tiny ones standalone).

    encode_video(frames uint8 [F, H, W, 3]) -> Tensor [16, (F-1)//4+1, H/8, W/8] (normalised latent)
    encode_text(str) -> Tensor [L, text_dim] (trimmed to the real tokens)
    face: a lynx_core.face.FaceAnalyzer (or anything with the same ``encode``)
    The identifiers name the models (file + dtype, say): they are part of every fingerprint, so a
    different model never reuses a cache made by another.
    """

    encode_video: Callable[[np.ndarray], Tensor]
    encode_text: Callable[[str], Tensor]
    face: Any
    vae_id: str
    text_encoder_id: str
    face_id: str = ""

    def __post_init__(self) -> None:
        if not self.vae_id or not self.text_encoder_id:
            raise CacheError("DataEncoders needs vae_id and text_encoder_id (for example the model file names): "
                             "they decide when the cache can be reused.")
        if not self.face_id:
            self.face_id = _describe_analyzer(self.face)

    def ids(self) -> dict[str, str]:
        return {"vae": self.vae_id, "text_encoder": self.text_encoder_id, "face": self.face_id}


@dataclass(frozen=True)
class CacheEntry:
    """One training pair as the trainer sees it (without loading its tensors)."""

    key: str                      # "person/target.mp4#person/id/photo.jpg"
    bucket: tuple[int, int, int]  # latent (frames, height, width)
    tokens: int                   # patch tokens (1x2x2 patches)
    heldout: bool
    target: str
    identity: str
    text_tokens: int
    similarity: float | None      # ArcFace cosine identity photo vs target (None: not verified)


# -- small helpers ---------------------------------------------------------------------------------
def _hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _pixels_sha(frame: np.ndarray) -> str:
    h = hashlib.sha256(str(frame.shape).encode())
    h.update(np.ascontiguousarray(frame).tobytes())
    return h.hexdigest()


def _source_fp(path: Path, mode: str) -> dict[str, Any]:
    st = path.stat()
    if mode == "content":
        return {"size": st.st_size, "sha256": _file_sha256(path)}
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _atomic_save(tensors: dict[str, Tensor], path: Path, metadata: dict[str, str]) -> None:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _atomic_write_json(obj: Any, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=1, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _shard_metadata(path: Path) -> dict[str, str]:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return dict(f.metadata() or {})


def _load(path: Path) -> dict[str, Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


def _as_latent(out: Any, frames: int, height: int, width: int, what: str) -> Tensor:
    t = torch.as_tensor(out)
    if t.ndim == 5 and t.shape[0] == 1:
        t = t[0]
    expected = ((frames - 1) // 4 + 1, height // 8, width // 8)
    if t.ndim != 4 or tuple(t.shape[1:]) != expected:
        raise CacheError(f"encode_video returned shape {tuple(t.shape)} for {what} ({frames} frames of "
                         f"{width}x{height}); expected [C, {expected[0]}, {expected[1]}, {expected[2]}] "
                         "(Wan VAE: (F-1)//4+1 latent frames, 8x smaller). Check the VAE callable.")
    if not torch.isfinite(t).all():
        raise CacheError(f"encode_video returned non-finite values for {what}; check the VAE and its dtype.")
    return t


def _as_text(out: Any, what: str) -> Tensor:
    t = torch.as_tensor(out)
    if t.ndim == 3 and t.shape[0] == 1:
        t = t[0]
    if t.ndim != 2 or t.shape[0] == 0:
        raise CacheError(f"encode_text returned shape {tuple(t.shape)} for {what}; expected [L, text_dim] with "
                         "L >= 1 (the embedding trimmed to its real tokens).")
    if not torch.isfinite(t).all():
        raise CacheError(f"encode_text returned non-finite values for {what}; check the text encoder.")
    return t


def _store(t: Tensor, dtype: torch.dtype) -> Tensor:
    return t.detach().to("cpu", dtype).contiguous()


# -- the cache -------------------------------------------------------------------------------------
class TrainCache:
    """An encoded dataset: ``len()``, ``entries``, ``sample(i)``, ``fixed``, ``fingerprint``, ``dropped``.

    Build (or reuse) with :meth:`build`; open a built one (other processes, resume) with :meth:`open`.
    """

    def __init__(self, folder: Path, manifest: dict[str, Any]) -> None:
        self.folder = Path(folder)
        self.manifest = manifest
        self.entries: list[CacheEntry] = [
            CacheEntry(e["key"], tuple(e["bucket"]), e["tokens"], e["heldout"], e["target"], e["identity"],
                       e["text_tokens"], e["similarity"]) for e in manifest["entries"]]
        self._paths = manifest["entries"]
        self._faces: dict[str, dict[str, Tensor]] = {}
        self._fixed: FixedEmbeddings | None = None
        self.rebuild_reasons: list[str] = list(manifest.get("rebuild_reasons", []))
        self.stats: dict[str, dict[str, int]] = dict(manifest.get("stats", {}))

    # -- construction --
    @classmethod
    def build(cls, dataset: str | Path, cache_dir: str | Path, encoders: DataEncoders,
              settings: CacheSettings | None = None) -> "TrainCache":
        return build_cache(dataset, cache_dir, encoders, settings)

    @classmethod
    def open(cls, cache_dir: str | Path) -> "TrainCache":
        folder = Path(cache_dir)
        path = folder / MANIFEST
        if not path.is_file():
            raise CacheError(f"{folder} is not a training cache (no {MANIFEST}); build it first from the dataset "
                             "folder (TrainCache.build or `python -m lynx_core train` with dataset = the folder).")
        try:
            manifest = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise CacheError(f"{path} is not valid JSON ({exc.msg}); delete the cache folder and rebuild it.") from exc
        if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
            raise CacheError(f"{path} is a {manifest.get('format')!r} v{manifest.get('version')} manifest, not "
                             f"{FORMAT} v{VERSION}; delete the cache folder and rebuild it.")
        cache = cls(folder, manifest)
        missing = [p for p in cache._all_shards() if not (folder / p).is_file()]
        if missing:
            raise CacheError(f"the cache in {folder} is incomplete: {len(missing)} shard(s) are missing (first: "
                             f"{missing[0]}); rebuild it from the dataset folder.")
        return cache

    def _all_shards(self) -> list[str]:
        out = {self.manifest["fixed"]}
        for e in self._paths:
            out.update((e["latent"], e["text"], e["face"], e["ref"]))
        return sorted(out)

    # -- API --
    def __len__(self) -> int:
        return len(self.entries)

    @property
    def fingerprint(self) -> str:
        return self.manifest["fingerprint"]

    @property
    def dropped(self) -> list[tuple[str, str]]:
        return [tuple(d) for d in self.manifest["dropped"]]  # type: ignore[misc]

    @property
    def warnings(self) -> list[str]:
        return list(self.manifest["warnings"])

    @property
    def settings(self) -> dict[str, Any]:
        return dict(self.manifest["settings"])

    @property
    def buckets(self) -> list[tuple[int, int, int]]:
        return [e.bucket for e in self.entries]

    def indices(self, heldout: bool = False) -> list[int]:
        """Entry indices of the training split (or of the held-out split)."""
        return [i for i, e in enumerate(self.entries) if e.heldout == heldout]

    def describe(self) -> str:
        """Counts, buckets and drops in a few lines (for logs and the pre-training plan)."""
        train, held = len(self.indices(False)), len(self.indices(True))
        lines = [f"training cache {self.folder}: {len(self)} pair(s) ({train} train, {held} held out), "
                 f"fingerprint {self.fingerprint[:16]}", describe_buckets(self.buckets)]
        if self.dropped:
            lines.append(f"{len(self.dropped)} dropped:")
            lines += [f"  {f}: {r}" for f, r in self.dropped]
        lines += [f"warning: {w}" for w in self.warnings]
        return "\n".join(lines)

    @property
    def fixed(self) -> FixedEmbeddings:
        if self._fixed is None:
            t = _load(self.folder / self.manifest["fixed"])
            self._fixed = FixedEmbeddings(t["reference_text"], t["empty_text"], t["negative_text"],
                                          t["grey_ref_latent"])
        return self._fixed

    def sample(self, i: int) -> TrainSample:
        if not -len(self) <= i < len(self):
            raise IndexError(f"sample {i} out of range for a cache of {len(self)} pair(s).")
        rec = self._paths[i]
        face = self._face(rec["face"])
        ref = self._face(rec["ref"])
        latent = _load(self.folder / rec["latent"])["latent"]
        text = _load(self.folder / rec["text"])["text"]
        return TrainSample(latent=latent, text=text, face_embedding=face["embedding"],
                           ref_latent=ref["ref_latent"], key=rec["key"])

    def _face(self, rel: str) -> dict[str, Tensor]:
        # Identity shards are small and shared by many pairs: keep them in memory.
        if rel not in self._faces:
            self._faces[rel] = _load(self.folder / rel)
        return self._faces[rel]

    def reference_crop(self, i: int) -> np.ndarray:
        """The 256-px aligned face crop of entry i's identity photo (uint8 [256, 256, 3]), for previews."""
        rec = self._paths[i]
        return _load(self.folder / rec["face"])["crop"].numpy()


# -- building --------------------------------------------------------------------------------------
def _why(old: dict[str, Any] | None, new_settings: dict, new_encoders: dict, new_sources: dict,
         new_captions: dict[str, str]) -> list[str]:
    if old is None:
        return ["no previous cache: encoding everything"]
    reasons = []
    for name, value in new_encoders.items():
        if old.get("encoders", {}).get(name) != value:
            reasons.append(f"{name} changed: {old.get('encoders', {}).get(name)!r} -> {value!r}")
    for name, value in new_settings.items():
        if old.get("settings", {}).get(name) != value:
            reasons.append(f"setting {name} changed: {old.get('settings', {}).get(name)!r} -> {value!r}")
    old_sources = old.get("sources", {})
    added = sorted(set(new_sources) - set(old_sources))
    removed = sorted(set(old_sources) - set(new_sources))
    changed = sorted(k for k in set(new_sources) & set(old_sources) if new_sources[k] != old_sources[k])
    for label, names in (("new", added), ("removed", removed), ("changed", changed)):
        if names:
            reasons.append(f"{len(names)} {label} source file(s): {', '.join(names[:10])}"
                           + (" ..." if len(names) > 10 else ""))
    old_captions = old.get("captions", {})
    recaptioned = sorted(k for k in set(new_captions) & set(old_captions) if new_captions[k] != old_captions[k])
    if recaptioned:
        reasons.append(f"{len(recaptioned)} changed caption(s): {', '.join(recaptioned[:10])}"
                       + (" ..." if len(recaptioned) > 10 else ""))
    return reasons


class _Builder:
    def __init__(self, scan: DatasetScan, folder: Path, enc: DataEncoders, s: CacheSettings) -> None:
        self.scan, self.folder, self.enc, self.s = scan, folder, enc, s
        self.dtype = s.torch_dtype
        self.encoded = {d: 0 for d in SHARD_DIRS}
        self.reused = {d: 0 for d in SHARD_DIRS}
        self.warnings: list[str] = []
        self.dropped: list[tuple[str, str]] = []
        self.used: set[str] = set()

    def shard(self, kind: str, key_parts: dict[str, Any]) -> tuple[str, bool]:
        rel = f"{kind}/{_hash(key_parts)[:32]}.safetensors"
        exists = (self.folder / rel).is_file()
        self.used.add(rel)
        (self.reused if exists else self.encoded)[kind] += 1
        return rel, exists

    def save(self, rel: str, tensors: dict[str, Tensor], metadata: dict[str, str]) -> None:
        _atomic_save(tensors, self.folder / rel, metadata)

    def warn(self, msg: str) -> None:
        logger.warning("%s", msg)
        self.warnings.append(msg)

    # -- fixed embeddings --
    def fixed(self) -> str:
        s, enc = self.s, self.enc
        rel, exists = self.shard("fixed", {"v": VERSION, "text": enc.text_encoder_id, "vae": enc.vae_id,
                                           "ref": s.reference_prompt, "neg": s.negative_prompt, "dtype": s.dtype})
        if not exists:
            with torch.no_grad():
                grey = np.full((1, REF_SIZE, REF_SIZE, 3), GREY, np.uint8)
                tensors = {
                    "reference_text": _as_text(enc.encode_text(s.reference_prompt), "the reference prompt"),
                    "empty_text": _as_text(enc.encode_text(""), "the empty prompt"),
                    "negative_text": _as_text(enc.encode_text(s.negative_prompt), "the negative prompt"),
                    "grey_ref_latent": _as_latent(enc.encode_video(grey), 1, REF_SIZE, REF_SIZE, "the grey image"),
                }
            self.save(rel, {k: _store(v, self.dtype) for k, v in tensors.items()}, {"kind": "fixed"})
        return rel

    # -- identity photos --
    def identity(self, photo: str, fp: dict) -> tuple[str, str | None, dict[str, str]]:
        """(face shard, reference-latent shard or None when no face, face shard metadata).

        Detection + ArcFace (slow, keyed on the face models) and the VAE of the crop (keyed on the
        VAE) are separate shards, so a new VAE never re-runs the detector.
        """
        s, enc = self.s, self.enc
        rel, exists = self.shard("faces", {"v": VERSION, "src": photo, "fp": fp, "face": enc.face_id,
                                           "select": s.face_select})
        if exists:
            meta = _shard_metadata(self.folder / rel)
        else:
            image = read_image(self.scan.root / photo)
            meta = {"kind": "face", "source": photo, "pixels": _pixels_sha(image)}
            ident = enc.face.encode(image[None], select=s.face_select, on_no_face="skip")
            if ident.embedding is None or ident.reference_crop is None:
                meta["face"] = "none"
                self.save(rel, {}, meta)
            else:
                emb = ident.embedding.detach().float().cpu()
                meta["face"] = "found"
                self.save(rel, {"embedding": (emb / torch.linalg.vector_norm(emb)).contiguous(),
                                "crop": torch.from_numpy(np.array(ident.reference_crop, dtype=np.uint8))}, meta)
        if meta.get("face") != "found":
            return rel, None, meta
        ref_rel, ref_ok = self.shard("refs", {"v": VERSION, "face": rel, "vae": enc.vae_id, "dtype": s.dtype})
        if not ref_ok:
            crop = _load(self.folder / rel)["crop"].numpy()
            with torch.no_grad():
                ref = _as_latent(enc.encode_video(crop[None]), 1, REF_SIZE, REF_SIZE, f"the face crop of {photo}")
            self.save(ref_rel, {"ref_latent": _store(ref, self.dtype)}, {"kind": "ref", "source": photo})
        return rel, ref_rel, meta

    # -- targets --
    def _decode(self, item: TargetItem) -> tuple[np.ndarray, np.ndarray]:
        """(first source frame, the frames training uses: strided, 4k+1, resized and cropped to the bucket)."""
        s = self.s
        raw = read_frames(self.scan.root / item.path, s.frames_needed)
        n = frames_to_use(len(raw), s.max_frames, s.frame_stride)
        height, width = s.resolution(raw.shape[1], raw.shape[2])
        return raw[0], resize_center_crop(raw[::s.frame_stride][:n], height, width)

    def target(self, item: TargetItem, fp: dict) -> dict[str, Any]:
        s, enc = self.s, self.enc
        media = {"max_frames": s.max_frames, "stride": s.frame_stride, "res": s.resolutions,
                 "area": None if s.resolutions else s.pixel_area, "multiple": s.multiple}
        lat_rel, lat_ok = self.shard("latents", {"v": VERSION, "src": item.path, "fp": fp, "vae": enc.vae_id,
                                                 "media": media, "dtype": s.dtype})
        frames = None
        if lat_ok:
            meta = _shard_metadata(self.folder / lat_rel)
        else:
            first, frames = self._decode(item)
            n, height, width = frames.shape[:3]
            with torch.no_grad():
                lat = _as_latent(enc.encode_video(frames), n, height, width, f"target {item.path}")
            meta = {"kind": "latent", "source": item.path, "frames": str(n), "size": f"{height}x{width}",
                    "pixels": _pixels_sha(first)}
            self.save(lat_rel, {"latent": _store(lat, self.dtype)}, meta)
        n = int(meta["frames"])
        size = [int(v) for v in meta["size"].split("x")]
        target_embs = None
        if s.verify_threshold is not None:
            # Keyed on the source frames the check looks at, so a setting that only changes other
            # frames (max_frames of a photo, say) reuses the detections.
            picks = sorted({0, n // 2})
            tf_rel, tf_ok = self.shard("target_faces", {"v": VERSION, "src": item.path, "fp": fp,
                                                        "face": enc.face_id, "size": size,
                                                        "frames": [p * s.frame_stride for p in picks]})
            if not tf_ok:
                if frames is None:
                    frames = self._decode(item)[1]
                embs = []
                for fi in picks:
                    ident = enc.face.encode(frames[fi][None], select="largest", on_no_face="skip")
                    if ident.embedding is not None:
                        embs.append(ident.embedding.detach().float().cpu())
                emb = torch.stack(embs) if embs else torch.zeros(0, 512)
                self.save(tf_rel, {"embeddings": emb.contiguous()}, {"kind": "target_faces", "source": item.path})
            target_embs = _load(self.folder / tf_rel)["embeddings"]
        txt_rel, txt_ok = self.shard("texts", {"v": VERSION, "caption": item.caption,
                                               "text": enc.text_encoder_id, "dtype": s.dtype})
        if not txt_ok:
            with torch.no_grad():
                txt = _as_text(enc.encode_text(item.caption), f"the caption of {item.path}")
            self.save(txt_rel, {"text": _store(txt, self.dtype)}, {"kind": "text"})
        from safetensors import safe_open

        with safe_open(str(self.folder / lat_rel), "pt") as f:
            shape = f.get_slice("latent").get_shape()
        with safe_open(str(self.folder / txt_rel), "pt") as f:
            text_tokens = f.get_slice("text").get_shape()[0]
        return {"latent": lat_rel, "text": txt_rel, "bucket": [int(x) for x in shape[1:]],
                "pixels": meta.get("pixels", ""), "text_tokens": int(text_tokens), "target_faces": target_embs}


def _split_heldout(targets: list[str], explicit: dict[str, bool], heldout_list: Sequence[str],
                   fraction: float, seed: int, keys: set[str]) -> tuple[set[str], set[str]]:
    """(held-out targets, held-out pair keys): explicit choices first, then a seeded fraction of the rest."""
    known_targets = set(targets)
    unknown = [h for h in heldout_list if h not in known_targets and h not in keys]
    if unknown:
        raise CacheError(f"heldout_list names {unknown}, which are neither targets nor pair keys of the dataset; "
                         "use paths relative to the dataset folder like 'anna/clip1.mp4'.")
    held = {t for t in targets if explicit.get(t) is True} | {h for h in heldout_list if h in known_targets}
    held_keys = {h for h in heldout_list if h in keys}
    free = [t for t in targets if t not in held and explicit.get(t) is None]
    if fraction > 0 and free:
        want = max(int(round(fraction * len(targets))), 1) - len(held)
        # Keep at least one target to train on unless some are explicitly marked for training.
        room = len(free) if any(v is False for v in explicit.values()) else len(free) - 1
        want = max(0, min(want, room))
        if want == 0 and not held:
            logger.warning("heldout = %g but there are too few targets to split; nothing is held out.", fraction)
        ranked = sorted(free, key=lambda t: hashlib.sha256(f"{seed}:{t}".encode()).hexdigest())
        held.update(ranked[:want])
    return held, held_keys


def build_cache(dataset: str | Path, cache_dir: str | Path, encoders: DataEncoders,
                settings: CacheSettings | None = None) -> TrainCache:
    """Encode ``dataset`` into ``cache_dir`` (reusing every shard that is still valid) and open it.

    Raises DatasetError/CacheError/MediaError naming the input and the fix; drops pairs that fail the
    identity check and reports them in ``.dropped`` (and in the log).
    """
    s = settings or CacheSettings()
    s.validate()
    folder = Path(cache_dir)
    folder.mkdir(parents=True, exist_ok=True)
    scan = scan_dataset(dataset, s.allow_empty_captions)
    root = scan.root
    photos = scan.identity_photos
    sources = {p: _source_fp(root / p, s.hash_sources) for p in sorted({t.path for t in scan.targets} | set(photos))}
    settings_dict = asdict(s)
    old = None
    if (folder / MANIFEST).is_file():
        try:
            old = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
        except (json.JSONDecodeError, OSError):
            logger.warning("%s is unreadable; rebuilding the cache's index.", folder / MANIFEST)
    captions = {t.path: t.caption for t in scan.targets}
    reasons = _why(old, settings_dict, encoders.ids(), sources, captions)
    if old is not None and old.get("dataset") != str(root):
        reasons.insert(0, f"dataset folder changed: {old.get('dataset')} -> {root}")

    b = _Builder(scan, folder, encoders, s)
    fixed_rel = b.fixed()

    faces: dict[str, tuple[str, str | None, dict[str, str]]] = {}
    bad_media: list[str] = []
    for k, photo in enumerate(photos):
        try:
            faces[photo] = b.identity(photo, sources[photo])
        except MediaError as exc:
            bad_media.append(str(exc))
            continue
        if faces[photo][1] is None:
            b.warn(f"no face found in identity photo {photo}; its pairs are dropped. Use a photo where the face "
                   "is clearly visible, frontal and at least ~40 px wide.")
        if (k + 1) % 50 == 0:
            logger.info("identity photos: %d/%d", k + 1, len(photos))
    if not bad_media and not any(ref is not None for _, ref, _ in faces.values()):
        raise CacheError(f"no face found in any of the {len(photos)} identity photo(s) "
                         f"({', '.join(photos[:10])}{' ...' if len(photos) > 10 else ''}). Use photos where the face "
                         "is clearly visible, frontal and at least ~40 px wide, or check the face detector.")

    targets: dict[str, dict[str, Any]] = {}
    for k, item in enumerate(scan.targets):
        try:
            targets[item.path] = b.target(item, sources[item.path])
        except MediaError as exc:
            bad_media.append(str(exc))
        if (k + 1) % 50 == 0:
            logger.info("targets: %d/%d", k + 1, len(scan.targets))
    if bad_media:
        raise MediaError(f"{len(bad_media)} file(s) of the dataset cannot be used:\n  " + "\n  ".join(bad_media))

    records: list[dict[str, Any]] = []
    for item in scan.targets:
        t = targets[item.path]
        for photo in item.identities:
            rel, ref_rel, meta = faces[photo]
            if ref_rel is None:
                b.dropped.append((item.path, f"identity photo {photo} has no detectable face"))
                continue
            if meta.get("pixels") and meta["pixels"] == t["pixels"]:
                b.warn(f"identity photo {photo} has the same pixels as target {item.path} (its first frame): "
                       "the model may learn to copy-paste it; use a different photo of the person.")
            sim = None
            if t["target_faces"] is not None:
                embs = t["target_faces"]
                if embs.shape[0] == 0:
                    b.dropped.append((item.path, "no face found in its first/middle frame, so the identity "
                                                 f"check against {photo} cannot pass (set verify_threshold = null "
                                                 "to skip the check)"))
                    continue
                emb = _load(folder / rel)["embedding"]
                sim = float((embs @ emb).mean())
                if sim < s.verify_threshold:  # type: ignore[operator]
                    b.dropped.append((item.path, f"ArcFace similarity {sim:.3f} to identity photo {photo} is under "
                                                 f"verify_threshold {s.verify_threshold}"))
                    continue
                if sim > s.copy_threshold:
                    b.warn(f"identity photo {photo} is nearly the target {item.path} itself (ArcFace similarity "
                           f"{sim:.4f} > {s.copy_threshold}): copy-paste risk; prefer another photo.")
            records.append({"key": f"{item.path}#{photo}", "target": item.path, "identity": photo,
                            "latent": t["latent"], "text": t["text"], "face": rel, "ref": ref_rel, "bucket": t["bucket"],
                            "tokens": bucket_tokens(t["bucket"]), "text_tokens": t["text_tokens"],
                            "similarity": None if sim is None else round(sim, 6)})
    for f, r in b.dropped:
        logger.warning("dropped %s: %s", f, r)
    if not records:
        raise CacheError(f"every pair of {root} was dropped ({len(b.dropped)}); first: {b.dropped[0][0]}: "
                         f"{b.dropped[0][1]}. Lower verify_threshold (or set it to null) or fix the photos.")

    kept_targets = list(dict.fromkeys(r["target"] for r in records))
    explicit = {t.path: t.heldout for t in scan.targets if t.heldout is not None}
    kept_keys = {r["key"] for r in records}
    all_keys = {f"{t.path}#{i}" for t in scan.targets for i in t.identities}
    heldout_list = []
    for h in s.heldout_list:
        if h not in kept_targets and h not in kept_keys and (h in captions or h in all_keys):
            b.warn(f"heldout_list names {h}, whose pairs were all dropped; it is neither trained nor evaluated.")
        else:
            heldout_list.append(h)
    held, held_keys = _split_heldout(kept_targets, explicit, heldout_list, s.heldout, s.seed, kept_keys)
    for r in records:
        r["heldout"] = r["target"] in held or r["key"] in held_keys
    if all(r["heldout"] for r in records):
        raise CacheError("every pair is held out, none is left to train on; hold out fewer targets "
                         "(heldout, heldout_list or \"heldout\" in metadata.jsonl).")

    body = {"entries": [{k: r[k] for k in ("key", "latent", "text", "face", "ref", "heldout")} for r in records],
            "fixed": fixed_rel, "format": FORMAT, "version": VERSION}
    manifest = {
        "format": FORMAT, "version": VERSION, "dataset": str(root), "source": scan.source,
        "encoders": encoders.ids(), "settings": settings_dict, "sources": sources, "captions": captions,
        "entries": records, "fixed": fixed_rel, "dropped": [list(d) for d in b.dropped],
        "warnings": b.warnings, "fingerprint": _hash(body), "rebuild_reasons": reasons,
        "stats": {"encoded": b.encoded, "reused": b.reused}, "shards": sorted(b.used),
    }
    if old is not None and old.get("fingerprint") == manifest["fingerprint"] and not any(b.encoded.values()):
        logger.info("training cache %s is up to date (fingerprint %s)", folder, manifest["fingerprint"][:16])
    else:
        logger.info("training cache %s: encoded %s, reused %s; why: %s", folder, b.encoded, b.reused,
                    "; ".join(reasons) or "nothing changed")
    _atomic_write_json(manifest, folder / MANIFEST)
    _remove_unreferenced(folder, manifest)
    return TrainCache.open(folder)


def _remove_unreferenced(folder: Path, manifest: dict[str, Any]) -> None:
    """Delete shards this build did not use (after the new manifest is safely written), so the cache
    does not grow with every changed setting. Shards of dropped pairs stay: they are in "shards"."""
    keep = set(manifest["shards"])
    removed = 0
    for kind in SHARD_DIRS:
        d = folder / kind
        if not d.is_dir():
            continue
        for p in d.glob("*.safetensors"):
            if f"{kind}/{p.name}" not in keep:
                p.unlink()
                removed += 1
    if removed:
        logger.info("removed %d unused shard(s) from %s", removed, folder)

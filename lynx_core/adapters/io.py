"""Loading and saving Lynx adapter files (safetensors only).

Loading reads every file's safetensors header first, so a wrong or incomplete set of files is
rejected from shapes alone, before gigabytes are read. The module tree is then built on the
``meta`` device and the loaded tensors are assigned into it, so the weights exist once in RAM.
"""
from __future__ import annotations

import json
import logging
import os
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional, Sequence, Union

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from .errors import LynxAdapterError
from .keys import (
    OFFICIAL_FILES,
    KeyInfo,
    block_to_official_index,
    classify_key,
    combined_to_official,
    detect_variant,
    internal_key,
    official_to_combined,
)
from .lynx_adapters import AdapterConfig, LynxAdapters, wan_size_name

logger = logging.getLogger(__name__)

# Key maps and variant detection live in .keys; they are part of this module's public API too.
__all__ = [
    "LynxAdapterError", "adapter_file_parts", "load_adapters", "save_adapters", "save_adapters_combined",
    "detect_variant",
    "official_to_combined", "combined_to_official", "official_state", "combined_state",
]

Source = Union[str, Path, Sequence[Union[str, Path]]]

_PICKLE_SUFFIXES = {".ckpt", ".pt", ".pth", ".bin", ".pkl", ".pickle"}
_MAX_HEADER_BYTES = 100 * 1024 * 1024
_FLOAT_DTYPES = {"F64", "F32", "F16", "BF16"}
_FP8_DTYPES = {"F8_E4M3", "F8_E5M2"}
# Official resampler: 64-wide heads (20 x 64 = 1280); files do not record the head split.
_DEFAULT_DIM_HEAD = 64

_WHERE_TO_GET = (
    "Lynx adapters come as .safetensors: the official ByteDance/lynx folders lynx_full/ and "
    "lynx_lite/, or the combined re-published files (e.g. Kijai/WanVideo_comfy, folder Lynx)"
)


# ---------------------------------------------------------------------------------- headers
@dataclass(frozen=True)
class _Header:
    path: Path
    tensors: dict[str, tuple[str, tuple[int, ...]]]  # key -> (safetensors dtype, shape)
    metadata: dict[str, str]


def _read_header(path: Path) -> _Header:
    """Parse and sanity-check a safetensors header without reading the tensor data."""
    if not path.is_file():
        raise LynxAdapterError(f"adapter file {path} does not exist; {_WHERE_TO_GET}")
    if path.suffix.lower() in _PICKLE_SUFFIXES:
        raise LynxAdapterError(
            f"{path}: only .safetensors adapter files are accepted. {path.suffix} files are Python "
            f"pickles, which can run arbitrary code when loaded. {_WHERE_TO_GET}; or convert a "
            f"checkpoint you trust with safetensors.torch.save_file"
        )
    size = path.stat().st_size
    with path.open("rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            raise _not_safetensors(path, "the file is shorter than a safetensors header")
        n = int.from_bytes(head, "little")
        if n <= 0 or n > _MAX_HEADER_BYTES or n > size - 8:
            if head[:2] == b"PK" or head[:1] == b"\x80":
                raise _not_safetensors(path, "it is a PyTorch pickle/zip checkpoint with a .safetensors name")
            raise _not_safetensors(path, f"the header length field ({n}) does not fit a {size}-byte file")
        try:
            header = json.loads(fh.read(n).decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise _not_safetensors(path, f"the header is not valid JSON ({exc})") from None
    if not isinstance(header, dict):
        raise _not_safetensors(path, "the header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    tensors: dict[str, tuple[str, tuple[int, ...]]] = {}
    spans: list[tuple[int, int, int]] = []  # (begin, end, expected byte count or -1 when unknown)
    try:
        for key, info in header.items():
            dtype, shape = str(info["dtype"]), tuple(int(d) for d in info["shape"])
            begin, end = (int(v) for v in info["data_offsets"])
            tensors[key] = (dtype, shape)
            spans.append((begin, end, _nbytes(dtype, shape)))
    except (KeyError, TypeError, ValueError, IndexError):
        raise _not_safetensors(path, f"the header entry {key!r} is malformed") from None
    _check_layout(path, spans, size - 8 - n)
    return _Header(path, tensors, {str(k): str(v) for k, v in dict(metadata).items()})


# Byte size per element of every safetensors dtype (unknown ones skip the size check; the
# dtype check later names them).
_DTYPE_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "I16": 2, "U16": 2, "F16": 2,
                "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}


def _nbytes(dtype: str, shape: tuple[int, ...]) -> int:
    if dtype not in _DTYPE_BYTES or any(d < 0 for d in shape):
        return -1
    count = 1
    for d in shape:
        count *= d
    return count * _DTYPE_BYTES[dtype]


def _check_layout(path: Path, spans: list[tuple[int, int, int]], data_bytes: int) -> None:
    """The header's offsets must tile the data exactly, as safetensors requires.

    safetensors reports a broken layout against whichever key it meets first, often an intact
    one; the fault is the file's (an interrupted download or a bad write), so say that instead.
    """
    redownload = "download the file again (or write it again if you made it)"
    need = max((end for _, end, _ in spans), default=0)
    if need > data_bytes:
        raise LynxAdapterError(
            f"{path} is truncated: its header describes {need} bytes of tensor data but only "
            f"{max(data_bytes, 0)} are there (an interrupted download?); {redownload}"
        )
    problems = []
    for begin, end, expected in spans:
        if begin < 0 or end < begin:
            problems.append(f"a tensor's offsets [{begin}, {end}] are out of range")
        elif expected >= 0 and end - begin != expected:
            problems.append(f"a tensor's data span holds {end - begin} bytes where its dtype and shape need {expected}")
    cursor = 0
    for begin, end, _ in sorted(spans):
        if begin < cursor:
            problems.append(f"two tensors' data overlap (bytes {begin} to {min(end, cursor)})")
        elif begin > cursor:
            problems.append(f"bytes {cursor} to {begin} belong to no tensor")
        cursor = max(cursor, end)
    if cursor < data_bytes:
        problems.append(f"the file has {data_bytes - cursor} bytes after the last tensor")
    if problems:
        shown = "; ".join(problems[:3]) + (f"; and {len(problems) - 3} more" if len(problems) > 3 else "")
        raise LynxAdapterError(
            f"{path} is corrupt: its header does not match its data ({shown}). The whole file is damaged, "
            f"not one weight; {redownload}"
        )


def _not_safetensors(path: Path, why: str) -> LynxAdapterError:
    return LynxAdapterError(
        f"{path} is not a valid safetensors file: {why}. Only .safetensors adapter files are "
        f"accepted (pickle formats can run code when loaded). {_WHERE_TO_GET}; download it again "
        f"if it is one of those"
    )


def adapter_file_parts(path: Union[str, Path]) -> frozenset[str]:
    """Which adapter parts (``"resampler"``, ``"ip"``, ``"ref"``) a file holds, from its header alone.

    Raises LynxAdapterError for files that cannot be loaded (not safetensors, truncated, keys
    that are not Lynx adapter keys), so a file list can offer only usable files cheaply.
    """
    header = _read_header(Path(path))
    parts = set()
    for key in header.tensors:
        info = classify_key(key)
        if info is None:
            raise LynxAdapterError(f"{path}: key {key!r} is not a Lynx adapter key")
        parts.add(info.part)
    return frozenset(parts)


# ---------------------------------------------------------------------------------- sources
def _resolve_sources(source: Source) -> tuple[list[Path], Optional[Path]]:
    """-> (files, folder) where folder is set for the official per-variant folder layout."""
    if isinstance(source, (str, Path)):
        path = Path(source).expanduser()
        if path.is_dir():
            return _official_folder_files(path), path
        if not path.exists():
            raise LynxAdapterError(
                f"Lynx adapter path {path} does not exist; put the files under models/lynx/ "
                f"(lynx_full/, lynx_lite/ or combined .safetensors files). {_WHERE_TO_GET}"
            )
        return [path], None
    files = [Path(p).expanduser() for p in source]
    if not files:
        raise LynxAdapterError("no Lynx adapter files were given")
    for p in files:
        if p.is_dir():
            raise LynxAdapterError(f"{p} is a folder; in a list of adapter sources give files only")
    if len(set(files)) != len(files):
        raise LynxAdapterError(f"the same adapter file is listed twice: {[str(p) for p in files]}")
    return files, None


def _official_folder_files(folder: Path) -> list[Path]:
    present = {name: folder / name for name in OFFICIAL_FILES.values() if (folder / name).is_file()}
    missing = [n for n in (OFFICIAL_FILES["resampler"], OFFICIAL_FILES["ip_layers"]) if n not in present]
    if missing:
        found = sorted(p.name for p in folder.glob("*.safetensors"))
        raise LynxAdapterError(
            f"{folder} is not a Lynx variant folder: {', '.join(missing)} missing. A variant folder holds "
            f"resampler.safetensors + ip_layers.safetensors (+ ref_layers.safetensors for full), as "
            f"ByteDance/lynx lynx_full/ and lynx_lite/. .safetensors found there: {found or 'none'}. "
            f"For combined/re-published files pass the file paths instead of the folder"
        )
    return list(present.values())


# ---------------------------------------------------------------------------------- parsing
@dataclass(frozen=True)
class _Entry:
    path: Path
    file_key: str
    dtype: str
    shape: tuple[int, ...]
    info: KeyInfo


_PART_OF_FILE = {"resampler": "resampler", "ip_layers": "ip", "ref_layers": "ref"}


def _classify_headers(headers: list[_Header], folder: Optional[Path]) -> list[tuple[_Header, dict[str, KeyInfo]]]:
    parsed = []
    for header in headers:
        infos: dict[str, KeyInfo] = {}
        unknown = []
        for key in header.tensors:
            info = classify_key(key)
            if info is None:
                unknown.append(key)
            else:
                infos[key] = info
        if unknown:
            shown = ", ".join(f"{k!r} {list(header.tensors[k][1])}" for k in sorted(unknown)[:8])
            raise LynxAdapterError(
                f"{header.path}: {len(unknown)} key(s) are not Lynx adapter keys, e.g. {shown}. Expected "
                f"official keys ('0.to_k_ip.weight', '0.to_k_ref.weight', 'latents', ...) or combined keys "
                f"('blocks.0.cross_attn.ip_adapter.to_k_ip.weight', 'blocks.0.self_attn.ref_adapter.*'). "
                f"A Wan base checkpoint belongs in ComfyUI's diffusion model loader, not here"
            )
        if not infos:
            raise LynxAdapterError(f"{header.path} holds no tensors; download it again")
        for key, (dtype, _) in header.tensors.items():
            if dtype not in _FLOAT_DTYPES | _FP8_DTYPES:
                raise LynxAdapterError(
                    f"{header.path}: key {key!r} is stored as {dtype}; adapter weights must be floating point"
                )
        prefixes = {i.prefix for i in infos.values() if i.part == "resampler"}
        if len(prefixes) > 1:
            raise LynxAdapterError(
                f"{header.path}: resampler keys appear under several prefixes {sorted(prefixes)}; "
                f"a file must hold one resampler"
            )
        if folder is not None:
            want = _PART_OF_FILE[header.path.stem]
            wrong = [k for k, i in infos.items() if i.part != want]
            if wrong:
                raise LynxAdapterError(
                    f"{header.path}: holds {infos[wrong[0]].part} keys (e.g. {wrong[0]!r}) but a file named "
                    f"{header.path.name} must hold only {header.path.stem} keys; the files were renamed or "
                    f"swapped, download the variant folder again"
                )
        parsed.append((header, infos))
    return parsed


def _collect_entries(
    parsed: list[tuple[_Header, dict[str, KeyInfo]]], variant: str
) -> dict[str, _Entry]:
    entries: dict[str, _Entry] = {}
    for header, infos in parsed:
        for key, info in infos.items():
            try:
                name = internal_key(info, variant)
            except LynxAdapterError as exc:
                raise LynxAdapterError(f"{header.path}: key {key!r}: {exc}") from None
            if name in entries:
                other = entries[name]
                raise LynxAdapterError(
                    f"the same adapter weight is given twice: {other.path} key {other.file_key!r} and "
                    f"{header.path} key {key!r}; pass each part (resampler, ID layers, Ref layers) once"
                )
            dtype, shape = header.tensors[key]
            entries[name] = _Entry(header.path, key, dtype, shape, info)
    return entries


def _dim(entries: dict[str, _Entry], key: str, axis: int, default: int) -> int:
    # Missing or odd-shaped anchors fall back to the official value; the strict shape check that
    # follows then reports the key itself, with both shapes.
    e = entries.get(key)
    return e.shape[axis] if e is not None and len(e.shape) > axis else default


def _infer_config(
    entries: dict[str, _Entry],
    variant: str,
    headers: list[_Header],
    dim: Optional[int],
    num_blocks: Optional[int],
    resampler_heads: Optional[int],
) -> tuple[AdapterConfig, dict[str, int]]:
    """Config of the adapters the files describe (or of the model the caller expects)."""
    ip_blocks = sorted({int(k.split(".")[1]) for k in entries if k.startswith("ip_layers.")})
    ref_blocks = sorted({int(k.split(".")[1]) for k in entries if k.startswith("ref_layers.")})
    file_names = ", ".join(str(h.path) for h in headers)
    if not ip_blocks:
        raise LynxAdapterError(
            f"no ID-adapter layers (to_k_ip/to_v_ip) in {file_names}; Lynx needs ip_layers as well "
            f"(official ip_layers.safetensors or a combined ..._ip_layers file)"
        )
    if not any(k.startswith("resampler.") for k in entries):
        raise LynxAdapterError(
            f"no resampler weights in {file_names}; Lynx also needs the Perceiver Resampler: pass the "
            f"variant folder, or add the resampler file (official resampler.safetensors or e.g. "
            f"lynx_{variant}_resampler_fp32.safetensors) to the list of files"
        )
    anchor = f"ip_layers.{ip_blocks[0]}"
    file_dim = _dim(entries, f"{anchor}.to_k_ip.weight", 0, 5120)
    id_dim = _dim(entries, f"{anchor}.to_k_ip.weight", 1, 5120 if variant == "full" else 2048)
    regs = entries.get(f"{anchor}.registers")
    n_registers = regs.shape[1] if regs is not None and len(regs.shape) == 3 else 0
    step = 1 if variant == "full" else 2
    file_blocks = max((ip_blocks[-1] // step + 1) * step, ref_blocks[-1] + 1 if ref_blocks else 0)

    r_dim = _dim(entries, "resampler.latents", 2, 1280)
    inner = _dim(entries, "resampler.layers.0.0.to_q.weight", 0, r_dim)
    depth = len({int(k.split(".")[2]) for k in entries if k.startswith("resampler.layers.")}) or 4
    if resampler_heads is None:
        meta = next((h.metadata["lynx.resampler_heads"] for h in headers if "lynx.resampler_heads" in h.metadata), None)
        if meta is not None and meta.isdigit():
            resampler_heads = int(meta)
        elif inner % _DEFAULT_DIM_HEAD == 0:
            resampler_heads = inner // _DEFAULT_DIM_HEAD
        else:
            raise LynxAdapterError(
                f"cannot tell the resampler's head count (attention width {inner} is not a multiple of 64); "
                f"pass resampler_heads"
            )
    if resampler_heads <= 0 or inner % resampler_heads:
        raise LynxAdapterError(f"resampler_heads={resampler_heads} does not divide the attention width {inner}")

    config = AdapterConfig(
        variant=variant,
        dim=dim if dim is not None else file_dim,
        num_blocks=num_blocks if num_blocks is not None else file_blocks,
        id_dim=id_dim,
        n_registers=n_registers,
        ip_bias=variant == "full",
        ip_every=step,
        with_ref=bool(ref_blocks),
        resampler_dim=r_dim,
        resampler_depth=depth,
        resampler_heads=resampler_heads,
        resampler_dim_head=inner // resampler_heads,
        num_queries=_dim(entries, "resampler.latents", 1, 16),
        embedding_dim=_dim(entries, "resampler.proj_in.weight", 1, 512),
        ff_mult=max(1, _dim(entries, "resampler.layers.0.1.1.weight", 0, 4 * r_dim) // max(r_dim, 1)),
    )
    return config, {"dim": file_dim, "num_blocks": file_blocks}


def _display_key(name: str, entries: dict[str, _Entry], config: AdapterConfig) -> tuple[str, str]:
    """(files, key as it would be spelled in those files) for an internal name that is missing."""
    part = name.split(".", 1)[0]
    want = {"resampler": "resampler", "ip_layers": "ip", "ref_layers": "ref"}[part]
    same = [e for e in entries.values() if e.info.part == want]
    files = ", ".join(sorted({str(e.path) for e in same})) or f"(no {part} file given)"
    style = same[0].info.style if same else "official"
    prefix = same[0].info.prefix if same else ""
    rest = name.split(".", 1)[1]
    if part == "resampler":
        return files, prefix + rest
    block, leaf = rest.split(".", 1)
    if style == "combined":
        kind = "cross_attn.ip_adapter" if part == "ip_layers" else "self_attn.ref_adapter"
        return files, f"{prefix}blocks.{block}.{kind}.{leaf}"
    idx = int(block) // config.ip_every if part == "ip_layers" else int(block)
    return files, f"{idx}.{leaf}"


def _by_part(names: Iterable[str]) -> dict[str, list[str]]:
    groups: dict[str, list[str]] = defaultdict(list)
    for n in names:
        groups[n.split(".", 1)[0]].append(n)
    return groups


def _block(name: str) -> int:
    return int(name.split(".")[1])


def _blocks_text(blocks: list[int]) -> str:
    if len(blocks) > 2 and blocks == list(range(blocks[0], blocks[-1] + 1)):
        return f"{blocks[0]} to {blocks[-1]}"
    return ", ".join(map(str, blocks[:12])) + (", ..." if len(blocks) > 12 else "")


def _describe_problems(
    entries: dict[str, _Entry],
    config: AdapterConfig,
    expected: dict[str, tuple[int, ...]],
    mismatch: list[str],
    missing: list[str],
    unexpected: list[str],
    per_part: int = 3,
) -> list[str]:
    """One line per problem, a few per file part; whole missing/extra blocks are summed up in one line."""
    lines: list[str] = []
    hidden = 0
    for names in _by_part(mismatch).values():
        for k in names[:per_part]:
            e = entries[k]
            lines.append(f"  {e.path}: key '{e.file_key}': expected shape {list(expected[k])}, found {list(e.shape)}")
        hidden += max(0, len(names) - per_part)

    expected_per_block: dict[tuple[str, int], int] = defaultdict(int)
    for k in expected:
        if not k.startswith("resampler."):
            expected_per_block[(k.split(".", 1)[0], _block(k))] += 1
    for part, names in _by_part(missing).items():
        single = names
        if part != "resampler":
            per_block: dict[int, list[str]] = defaultdict(list)
            for k in names:
                per_block[_block(k)].append(k)
            whole = sorted(b for b, ks in per_block.items() if len(ks) == expected_per_block[(part, b)])
            if whole:
                first = per_block[whole[0]][0]
                files, key = _display_key(first, entries, config)
                lines.append(
                    f"  {files}: no weights for blocks {_blocks_text(whole)} (e.g. key '{key}' is missing, "
                    f"expected shape {list(expected[first])})"
                )
            single = [k for k in names if _block(k) not in whole]
        for k in single[:per_part]:
            files, key = _display_key(k, entries, config)
            lines.append(f"  {files}: key '{key}' is missing (expected shape {list(expected[k])})")
        hidden += max(0, len(single) - per_part)

    expected_blocks = {(p, b) for p, b in expected_per_block}
    for part, names in _by_part(unexpected).items():
        extra_blocks = sorted({_block(k) for k in names if part != "resampler" and (part, _block(k)) not in expected_blocks})
        single = [k for k in names if part == "resampler" or _block(k) not in extra_blocks]
        if extra_blocks:
            e = entries[next(k for k in names if _block(k) == extra_blocks[0])]
            lines.append(
                f"  {e.path}: blocks {_blocks_text(extra_blocks)} are not part of a Lynx {config.variant} adapter "
                f"for {config.num_blocks} blocks (e.g. key '{e.file_key}' {list(e.shape)})"
            )
        for k in single[:per_part]:
            e = entries[k]
            lines.append(
                f"  {e.path}: key '{e.file_key}' {list(e.shape)} is not part of a Lynx {config.variant} adapter"
            )
        hidden += max(0, len(single) - per_part)
    if hidden:
        lines.append(f"  ... and {hidden} more key(s) like these")
    return lines


def _check_shapes(
    entries: dict[str, _Entry],
    config: AdapterConfig,
    file_sizes: dict[str, int],
    expected_by_caller: dict[str, Optional[int]],
) -> None:
    expected = {k: tuple(v.shape) for k, v in LynxAdapters(config, device="meta").state_dict().items()}
    mismatch = [k for k in expected if k in entries and entries[k].shape != expected[k]]
    missing = [k for k in expected if k not in entries]
    unexpected = [k for k in entries if k not in expected]
    if not (mismatch or missing or unexpected):
        return
    lines = _describe_problems(entries, config, expected, mismatch, missing, unexpected)

    hints = []
    if expected_by_caller["dim"] is not None and file_sizes["dim"] != config.dim:
        hints.append(
            f"the adapter files are {file_sizes['dim']}-wide ({wan_size_name(file_sizes['dim'], file_sizes['num_blocks'])}) "
            f"but the model is {config.dim}-wide ({wan_size_name(config.dim, config.num_blocks)}); load the Wan "
            f"model the adapters were made for (the released Lynx adapters need Wan 14B, 5120-wide with 40 "
            f"blocks: Wan2.1-T2V-14B or Wan2.2-A14B)"
        )
    if expected_by_caller["num_blocks"] is not None and file_sizes["num_blocks"] != config.num_blocks:
        hints.append(f"the files cover {file_sizes['num_blocks']} blocks but the model has {config.num_blocks}")
    if "resampler.proj_out.weight" in mismatch and not hints:
        found = entries["resampler.proj_out.weight"].shape[0]
        hints.append(
            f"the resampler makes {found}-wide tokens but the ID layers take {config.id_dim}-wide ones: "
            f"resampler and ip_layers come from different variants (full: 5120, lite: 2048)"
        )
    broken = sorted({int(k.split(".")[1]) for k in missing if not k.startswith("resampler.")})
    if broken and not hints:
        hints.append(f"blocks with missing weights: {broken[:12]}; a file may be truncated or from another model")
    hints.append("use the files of one Lynx variant together, downloaded completely")
    what = (
        f"the model ({config.dim}-wide, {config.num_blocks} blocks)"
        if any(v is not None for v in expected_by_caller.values())
        else "each other"
    )
    raise LynxAdapterError(
        f"Lynx adapter files do not fit {what}:\n" + "\n".join(lines) + "\nHow to fix: " + "; ".join(hints)
    )


# ---------------------------------------------------------------------------------- loading
def _cast(t: Tensor, dtype: Optional[torch.dtype], key: str) -> Tensor:
    if dtype is not None:
        return t.to(dtype)
    if t.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
        # fp8 has no matmul on most devices; bf16 is what the official code runs in.
        logger.info("adapter weight %s is fp8; upcasting to bf16", key)
        return t.to(torch.bfloat16)
    return t


def _non_finite(t: Tensor) -> Optional[tuple[int, int]]:
    """(NaN count, inf count) of ``t``, or None when every value is finite (the common, cheap case)."""
    if t.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
        t = t.to(torch.bfloat16)  # isfinite has no fp8 kernels; the values are the same
    if bool(torch.isfinite(t).all()):
        return None
    return int(torch.isnan(t).sum()), int(torch.isinf(t).sum())


def _non_finite_error(path: Path, bad: list[tuple[str, tuple[int, int]]]) -> LynxAdapterError:
    shown = ", ".join(f"'{k}' ({n} NaN, {i} inf)" for k, (n, i) in bad[:6])
    more = f" and {len(bad) - 6} more" if len(bad) > 6 else ""
    total = sum(n + i for _, (n, i) in bad)
    return LynxAdapterError(
        f"{path}: {total} weight value(s) are NaN or infinite, in {len(bad)} key(s): {shown}{more}. With them "
        f"every output would be NaN (a black or noise video). The file is corrupt, or it was saved from a training "
        f"run that diverged: download it again, or use an earlier checkpoint of the training"
    )


def load_adapters(
    source: Source,
    dtype: Optional[torch.dtype] = None,
    device: Union[str, torch.device] = "cpu",
    *,
    variant: Optional[str] = None,
    dim: Optional[int] = None,
    num_blocks: Optional[int] = None,
    resampler_heads: Optional[int] = None,
) -> LynxAdapters:
    """Load Lynx adapters from a variant folder, one combined file, or a list of files.

    The variant and all sizes come from the keys and shapes. ``variant``/``dim``/``num_blocks``
    make the load fail early (naming file, key and both shapes) when the files do not fit the Wan
    model they are meant for. ``dtype=None`` keeps the stored dtypes (fp8 is upcast to bf16).
    The returned module is in eval mode with ``requires_grad`` off.
    """
    files, folder = _resolve_sources(source)
    headers = [_read_header(p) for p in files]
    parsed = _classify_headers(headers, folder)
    all_keys = [k for _, infos in parsed for k in infos]
    try:
        found_variant = detect_variant(all_keys)
    except LynxAdapterError as exc:
        raise LynxAdapterError(f"{', '.join(str(p) for p in files)}: {exc}") from None
    if variant is not None and variant != found_variant:
        raise LynxAdapterError(
            f"Lynx {variant} adapters were asked for, but {', '.join(str(p) for p in files)} hold the "
            f"{found_variant} ID-adapter (full: biases and 16 registers on every block; lite: no bias, "
            f"every 2nd block); pick the {variant} files or set the variant to {found_variant}"
        )
    entries = _collect_entries(parsed, found_variant)
    if folder is not None and found_variant == "full" and not any(k.startswith("ref_layers.") for k in entries):
        raise LynxAdapterError(
            f"{folder} holds the full ID-adapter but no ref_layers.safetensors; the official lynx_full "
            f"folder has resampler, ip_layers and ref_layers: download ref_layers.safetensors into it"
        )
    config, file_sizes = _infer_config(entries, found_variant, headers, dim, num_blocks, resampler_heads)
    _check_shapes(entries, config, file_sizes, {"dim": dim, "num_blocks": num_blocks})
    if config.variant == "full" and not config.with_ref:
        logger.warning("no Ref-adapter weights among %s: only the ID-adapter will be used", files)
    if config.variant == "lite" and config.with_ref:
        logger.info("lite ID-adapter combined with full Ref-adapter layers")

    by_file: dict[Path, list[tuple[str, _Entry]]] = defaultdict(list)
    for name, entry in entries.items():
        by_file[entry.path].append((name, entry))
    state: dict[str, Tensor] = {}
    for path, items in by_file.items():
        try:
            raw = load_file(str(path), device="cpu")
        except Exception as exc:  # safetensors raises its own error type for corrupt data
            raise LynxAdapterError(f"{path}: could not read the tensors ({exc}); download the file again") from None
        bad = [(entry.file_key, counts) for _, entry in items
               if (counts := _non_finite(raw[entry.file_key])) is not None]
        if bad:
            raise _non_finite_error(path, bad)
        for name, entry in items:
            state[name] = _cast(raw.pop(entry.file_key), dtype, name)
            if dtype == torch.float16 and _non_finite(state[name]) is not None:
                # The file is fine; its values exceed fp16's range (65504) and became inf.
                raise LynxAdapterError(
                    f"{path}: key '{entry.file_key}' has values beyond the fp16 range, so loading it as fp16 "
                    f"gives inf; set dtype to bf16 or fp32 instead"
                )
        del raw

    adapters = LynxAdapters(config, device="meta")
    adapters.load_state_dict(state, strict=True, assign=True)
    adapters.to(device)
    adapters.eval()
    adapters.requires_grad_(False)
    logger.info("loaded %s from %s", adapters.summary(), ", ".join(str(p) for p in files))
    return adapters


# ---------------------------------------------------------------------------------- saving
def official_state(adapters: LynxAdapters) -> dict[str, dict[str, Tensor]]:
    """``{'resampler': ..., 'ip_layers': ..., 'ref_layers': ...}`` with the official file keys."""
    out: dict[str, dict[str, Tensor]] = {"resampler": {}, "ip_layers": {}}
    if adapters.has_ref:
        out["ref_layers"] = {}
    for name, tensor in adapters.state_dict().items():
        part, rest = name.split(".", 1)
        if part == "resampler":
            out[part][rest] = tensor
            continue
        block, leaf = rest.split(".", 1)
        idx = block_to_official_index(int(block), adapters.variant) if part == "ip_layers" else int(block)
        out[part][f"{idx}.{leaf}"] = tensor
    return out


def combined_state(adapters: LynxAdapters, include_resampler: bool = True) -> dict[str, Tensor]:
    """The adapters under combined names (``blocks.N.cross_attn.ip_adapter.*`` ...)."""
    out: dict[str, Tensor] = {}
    for name, tensor in adapters.state_dict().items():
        part, rest = name.split(".", 1)
        if part == "resampler":
            if include_resampler:
                out[name] = tensor
            continue
        block, leaf = rest.split(".", 1)
        kind = "cross_attn.ip_adapter" if part == "ip_layers" else "self_attn.ref_adapter"
        out[f"blocks.{block}.{kind}.{leaf}"] = tensor
    return out


def file_metadata(adapters: LynxAdapters, part: str) -> dict[str, str]:
    """The safetensors header entries our adapter files carry (load_adapters reads the head split back)."""
    return {
        "format": "pt",
        "lynx.variant": adapters.variant,
        "lynx.part": part,
        "lynx.resampler_heads": str(adapters.config.resampler_heads),
    }


def _refuse_overwrite(paths: Iterable[Path], overwrite: bool) -> None:
    if overwrite:
        return
    existing = [str(p) for p in paths if p.exists()]
    if existing:
        raise LynxAdapterError(
            f"refusing to overwrite existing adapter file(s) {existing}; choose another folder/name or pass overwrite=True"
        )


def _write(tensors: dict[str, Tensor], path: Path, dtype: Optional[torch.dtype], metadata: dict[str, str]) -> None:
    ready = {}
    for key, t in tensors.items():
        if t.is_meta:
            raise LynxAdapterError(f"cannot save {key}: the adapters were built on the meta device and hold no data")
        t = t.detach().to("cpu")
        ready[key] = (t.to(dtype) if dtype is not None else t).contiguous()
    # Write next to the target and rename, so an interrupted save never leaves a half file behind.
    tmp = path.with_name(path.name + ".partial")
    try:
        save_file(ready, str(tmp), metadata=metadata)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def save_adapters(
    adapters: LynxAdapters, folder: Union[str, Path], dtype: Optional[torch.dtype] = None, overwrite: bool = False
) -> list[Path]:
    """Write the official layout (resampler / ip_layers [/ ref_layers].safetensors) into ``folder``."""
    folder = Path(folder)
    parts = official_state(adapters)
    targets = {part: folder / OFFICIAL_FILES[part] for part in parts}
    _refuse_overwrite(targets.values(), overwrite)
    folder.mkdir(parents=True, exist_ok=True)
    for part, tensors in parts.items():
        _write(tensors, targets[part], dtype, file_metadata(adapters, part))
    logger.info("saved %s to %s", adapters.summary(), folder)
    return list(targets.values())


def save_adapters_combined(
    adapters: LynxAdapters,
    path: Union[str, Path],
    dtype: Optional[torch.dtype] = None,
    overwrite: bool = False,
    include_resampler: bool = True,
) -> Path:
    """Write one file in the combined naming (resampler keys under ``resampler.``)."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise LynxAdapterError(f"{path}: combined adapter files must end in .safetensors")
    _refuse_overwrite([path], overwrite)
    path.parent.mkdir(parents=True, exist_ok=True)
    _write(combined_state(adapters, include_resampler), path, dtype, file_metadata(adapters, "combined"))
    return path

"""The safetensors container format: header parsing with clear errors, dtype names, tensor order.

Only the container is handled here; ``readers.SafetensorsSource`` reads the tensors. ``read_header``
refuses every header the ``safetensors`` library refuses, and a few more it lets through
(duplicate names, headers not starting with ``{``), so that a file lycotools reads is one every
other tool reads the same way.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import torch

from ..errors import BadInput

# safetensors dtype names <-> torch dtypes
DTYPE_NAMES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "F8_E4M3FNUZ": torch.float8_e4m3fnuz,
    "F8_E5M2FNUZ": torch.float8_e5m2fnuz,
    "F8_E8M0": torch.float8_e8m0fnu,
    "U16": torch.uint16,
    "U32": torch.uint32,
    "U64": torch.uint64,
    "C64": torch.complex64,
}
TORCH_TO_NAME = {v: k for k, v in DTYPE_NAMES.items()}

# Bits per element of every dtype the safetensors format defines (safetensors 0.8), readable by
# torch or not: the header's sizes are checked with these before lycotools says it cannot read one.
DTYPE_BITS: dict[str, int] = {
    "BOOL": 8, "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8,
    "F8_E8M0": 8, "F8_E4M3FNUZ": 8, "F8_E5M2FNUZ": 8, "I16": 16, "U16": 16, "F16": 16, "BF16": 16,
    "I32": 32, "U32": 32, "F32": 32, "C64": 64, "F64": 64, "I64": 64, "U64": 64,
}

# The order in which safetensors' own serializer lays out tensors: by dtype (this order), then by
# name. Writing in the same order makes our files byte-identical to ``safetensors.torch.save`` and
# makes the A1111/kohya ``sshs_model_hash`` (a hash of the data section) agree with theirs.
_DTYPE_RANK = [
    "U64", "I64", "F64", "C64", "F32", "U32", "I32", "BF16", "F16", "U16", "I16",
    "F8_E5M2FNUZ", "F8_E4M3FNUZ", "F8_E8M0", "F8_E4M3", "F8_E5M2", "I8", "U8", "BOOL",
]
DTYPE_ORDER = {name: i for i, name in enumerate(_DTYPE_RANK)}

MAX_HEADER = 100_000_000  # safetensors itself refuses headers over 100 MB (decimal)
MAX_DEPTH = 16  # a header nests 3 levels (file, entry, shape); safetensors' JSON parser stops at 128


def dtype_name(dtype: torch.dtype) -> str:
    try:
        return TORCH_TO_NAME[dtype]
    except KeyError:
        raise ValueError(f"dtype {dtype} cannot be stored in safetensors") from None


def serial_order(entries):
    """Sort (name, dtype_name, ...) tuples the way safetensors' serializer does."""
    return sorted(entries, key=lambda e: (DTYPE_ORDER.get(e[1], 99), e[0]))


def header_bytes(infos: list[tuple[str, str, tuple, int, int]], metadata: dict[str, str] | None) -> bytes:
    """Serialize a header exactly as safetensors does (compact JSON, space padding to 8 bytes).

    ``infos`` are (name, dtype_name, shape, begin, end) in data order.
    """
    parts = []
    if metadata:
        meta = ",".join(f"{json.dumps(k)}:{json.dumps(str(v))}" for k, v in sorted(metadata.items()))
        parts.append(f'"__metadata__":{{{meta}}}')
    for name, dt, shape, begin, end in infos:
        shp = ",".join(str(int(s)) for s in shape)
        parts.append(f'{json.dumps(name)}:{{"dtype":"{dt}","shape":[{shp}],"data_offsets":[{begin},{end}]}}')
    text = ("{" + ",".join(parts) + "}").encode("utf-8")
    pad = (8 - len(text) % 8) % 8
    return text + b" " * pad


def read_header(path: Path) -> tuple[dict, dict[str, str], int]:
    """Parse and validate a safetensors header.

    Returns (tensor entries, metadata, data start offset). Every way a file can be broken gives a
    ``BadInput`` naming the problem, and never later than here: a header that passes describes
    tensors lying side by side in the data section, covering it exactly, each of the size its dtype
    and shape say, so no tensor can be read from the header's bytes, from another tensor's bytes,
    or from past the end of the file.
    """
    size = os.path.getsize(path)
    if size == 0:
        raise BadInput(path, "file is empty")
    if size < 8:
        raise BadInput(path, f"not a safetensors file: only {size} bytes, too short for a header")
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        if n > MAX_HEADER:
            raise BadInput(path, f"not a safetensors file: header length {n} is implausible")
        if 8 + n > size:
            raise BadInput(path, f"truncated safetensors file: header claims {n} bytes but the file has {size - 8}")
        raw = f.read(n)
    if len(raw) != n:
        raise BadInput(path, "file changed while its header was read")
    header = _parse_json(path, raw)
    metadata = _metadata(path, header.pop("__metadata__", None))
    data_len = size - 8 - n
    spans = []
    for name, entry in header.items():
        dtype, shape, (begin, end) = _entry(path, name, entry)
        if end > data_len:
            raise BadInput(
                path,
                f"header claims more data than the file holds: tensor {_q(name)} ends at byte {end} "
                f"but the data section has {data_len} bytes (file truncated?)",
            )
        _check_size(path, name, dtype, shape, end - begin, size)
        spans.append((begin, end, name))
    _check_layout(path, spans, data_len)
    for name, entry in header.items():
        if entry["dtype"] not in DTYPE_NAMES:
            raise BadInput(path, f"tensor {_q(name)} has dtype {entry['dtype']}, which lycotools cannot read")
    return header, metadata, 8 + n


class _HeaderError(ValueError):
    """A JSON-level problem found while parsing (duplicate key, NaN, ...): becomes a ``BadInput``."""


def _parse_json(path: Path, raw: bytes) -> dict:
    """The header as a dict, refusing what JSON allows but a safetensors header must not have.

    The format says the header starts with ``{`` and may be padded with spaces; Python's ``json``
    also takes duplicate keys (keeping the last, so two tensors could share a name), NaN and
    Infinity, and ``-0`` as an integer, all of which safetensors' own parser refuses or drops.
    """
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise BadInput(path, f"corrupted safetensors header: not valid UTF-8 (byte {e.start})") from None
    if not text.startswith("{"):
        raise BadInput(path, "corrupted safetensors header: not valid JSON (it does not start with '{')")
    try:
        header, end = json.JSONDecoder(
            object_pairs_hook=_no_duplicates, parse_constant=_no_constant, parse_int=_int
        ).raw_decode(text)
    except _HeaderError as e:
        raise BadInput(path, f"corrupted safetensors header: {e}") from None
    except (ValueError, RecursionError) as e:
        raise BadInput(path, f"corrupted safetensors header: not valid JSON ({e.__class__.__name__})") from None
    if text[end:].strip(" "):
        raise BadInput(path, "corrupted safetensors header: bytes other than space padding after the JSON object")
    _check_strings(path, header, 1)
    return header


def _no_duplicates(pairs: list) -> dict:
    """``object_pairs_hook``: a key twice in one object is an error, not "the last one wins"."""
    out = dict(pairs)
    if len(out) != len(pairs):
        seen = set()
        dup = next(k for k, _ in pairs if k in seen or seen.add(k))
        raise _HeaderError(f"key {_q(dup)} appears twice")
    return out


def _no_constant(name: str):
    """``parse_constant``: NaN and Infinity are not JSON, and safetensors refuses them."""
    raise _HeaderError(f"{name} is not valid JSON")


def _int(text: str):
    """``parse_int``: ``-0`` is a float to safetensors' parser (so not a size); keep it one here."""
    return -0.0 if text == "-0" else int(text)


def _check_strings(path: Path, obj, depth: int):
    """Refuse nesting deeper than a header can be and strings that are not UTF-8 (JSON lets a
    ``\\ud800`` escape through as a lone surrogate, which no file name or tensor name can hold)."""
    if depth > MAX_DEPTH:
        raise BadInput(path, "corrupted safetensors header: nested deeper than a safetensors header is")
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, list) else ()
    for k, v in items:
        for s in (k, v):
            if isinstance(s, str):
                try:
                    s.encode("utf-8")
                except UnicodeEncodeError:
                    raise BadInput(path, f"corrupted safetensors header: string {_q(s)} is not valid UTF-8") from None
        if isinstance(v, (dict, list)):
            _check_strings(path, v, depth + 1)


def _metadata(path: Path, meta) -> dict[str, str]:
    """``__metadata__``: absent, null, or a map of strings to strings, as safetensors requires."""
    if meta is None:
        return {}
    if not isinstance(meta, dict):
        raise BadInput(path, "corrupted safetensors header: __metadata__ is not a JSON object")
    for k, v in meta.items():
        if not isinstance(v, str):
            raise BadInput(path, f"corrupted safetensors header: metadata {_q(k)} is not a string")
    return meta


def _natural(x) -> bool:
    """A JSON integer >= 0 (``true`` and ``1.0`` are not sizes)."""
    return type(x) is int and x >= 0


def _entry(path: Path, name: str, e) -> tuple[str, list[int], list[int]]:
    """One tensor's (dtype, shape, data_offsets), each of the type the format says. Fields other
    than these three are ignored, as safetensors ignores them."""
    def bad(what):
        return BadInput(path, f"corrupted safetensors header: tensor {_q(name)} {what}")

    if not isinstance(e, dict):
        raise bad("is not a JSON object")
    for field in ("dtype", "shape", "data_offsets"):
        if field not in e:
            raise bad(f"has no {field}")
    dtype, shape, offsets = e["dtype"], e["shape"], e["data_offsets"]
    if not isinstance(dtype, str) or dtype not in DTYPE_BITS:
        raise bad(f"has unknown dtype {json.dumps(dtype)[:40]}")
    if not isinstance(shape, list) or not all(_natural(s) for s in shape):
        raise bad("has a shape that is not a list of non-negative integers")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(_natural(o) for o in offsets):
        raise bad("has data_offsets that are not two non-negative integers")
    if offsets[0] > offsets[1]:
        raise bad(f"has data_offsets {offsets} that end before they begin")
    return dtype, shape, offsets


def _check_size(path: Path, name: str, dtype: str, shape: list[int], nbytes: int, file_size: int):
    """The shape's byte size must be the tensor's span. Python integers cannot overflow, so the
    shape is bounded by the file instead: even a tensor with no elements may not claim dimensions
    whose other sides would need more bytes than the file has (torch could not even make it)."""
    bits, numel, extent = DTYPE_BITS[dtype], 1, 1
    for s in shape:
        numel *= s
        extent *= max(s, 1)
        if extent * bits > 8 * file_size:
            raise BadInput(path, f"corrupted safetensors header: tensor {_q(name)} has shape {shape[:8]}, larger than the file")
    if numel * bits % 8:
        raise BadInput(path, f"corrupted safetensors header: tensor {_q(name)} does not fill a whole number of bytes")
    if numel * bits // 8 != nbytes:
        raise BadInput(
            path,
            f"corrupted safetensors header: tensor {_q(name)} shape {shape} and dtype {dtype} need "
            f"{numel * bits // 8} bytes but its data_offsets span {nbytes}",
        )


def _check_layout(path: Path, spans: list[tuple[int, int, str]], data_len: int):
    """Tensors, sorted by offset, must tile the data section: from byte 0, without gaps or overlaps,
    to its very end (safetensors refuses the same files; trailing bytes could hide anything)."""
    pos, prev = 0, None
    for begin, end, name in sorted(spans):
        if begin < pos:
            raise BadInput(path, f"corrupted safetensors header: tensors {_q(prev)} and {_q(name)} overlap in the data section")
        if begin > pos:
            raise BadInput(
                path, f"corrupted safetensors header: bytes {pos} to {begin} of the data section, before tensor {_q(name)}, belong to no tensor"
            )
        pos, prev = end, name
    if pos != data_len:
        raise BadInput(path, f"corrupted safetensors header: the last {data_len - pos} bytes of the file belong to no tensor")


def _q(text) -> str:
    """A name quoted for a one-line message, cut short: a hostile name can be megabytes long."""
    text = str(text)
    return repr(text) if len(text) <= 80 else repr(text[:77]) + "..."

"""The safetensors container format: header parsing with clear errors, dtype names, tensor order.

Only the container is handled here; ``readers.SafetensorsSource`` reads the tensors. ``read_header``
refuses every header the ``safetensors`` library refuses, and a few more it lets through
(duplicate names, headers not starting with ``{``), so that a file lycotools reads is one every
other tool reads the same way.
"""

from __future__ import annotations

import json
import math
import os
import re
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
    fast = _fast_header(raw, size - 8 - n, size)
    if fast is not None:
        return fast[0], fast[1], 8 + n
    return (*_checked_header(path, raw, size, n), 8 + n)


def _checked_header(path: Path, raw: bytes, size: int, n: int) -> tuple[dict, dict[str, str]]:
    """The strict parse and every check, one by one: the reference ``_fast_header`` must agree with,
    and the path that names the problem of a header the fast one does not take."""
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
    return header, metadata


# The fast path. Python's C JSON parser takes a header in a fraction of the time the strict parser
# (a Python hook called for every object and every integer) needs; it is used only where it provably
# gives what the strict parse and checks give, and anything else goes the strict way, which then says
# what is wrong exactly as before:
# * no ``-0`` number (C json makes it the integer 0), no \u escape of a surrogate (a lone one is not
#   UTF-8) or of ``:`` (see below), no NaN/Infinity (``parse_constant`` raises), nothing after the
#   object but spaces;
# * every value the standard form: tensors {dtype, shape, data_offsets} with lists of integers, and
#   __metadata__ null or a map of strings, so nothing nests deeper than 3 levels;
# * no duplicate key anywhere: each key/value pair of the text has exactly one ``:`` outside strings,
#   so (colons in the text) - (colons in the parsed strings) counts the pairs of the text; it equals
#   the number of pairs the parsed dicts hold only if no pair was dropped as a duplicate (the strings
#   of a dropped pair would only add colons). Without a ``\u003a`` escape, parsed strings hold their
#   colons literally.
# * then the size, offset and layout checks, on the same numbers the strict path checks.
_FAST_DECODER = json.JSONDecoder(parse_constant=lambda name: _no_constant(name))
_NEGATIVE_ZERO = re.compile(r"[\[,:][ \t\n\r]*-0")
_ESCAPES_REFUSED = re.compile(r"\\u(?:[dD][89a-fA-F]|003[aA])")
_INT_ONLY = frozenset((int,))


def _fast_header(raw: bytes, data_len: int, file_size: int) -> tuple[dict, dict[str, str]] | None:
    """(tensor entries, metadata) when the header is well formed and standard; None when the strict
    path must decide (it raises, or returns the same thing)."""
    if raw[:1] != b"{":
        return None
    try:
        text = raw.decode("utf-8")
        if ("-0" in text and _NEGATIVE_ZERO.search(text)) or ("\\u" in text and _ESCAPES_REFUSED.search(text)):
            return None
        header, end = _FAST_DECODER.raw_decode(text)
    except (ValueError, RecursionError):  # _HeaderError (NaN) is a ValueError
        return None
    if end != len(text) and text[end:].strip(" "):
        return None
    colons = "".join(header).count(":")
    pairs = len(header)
    metadata = header.pop("__metadata__", None)
    if metadata is None:
        metadata = {}
    elif type(metadata) is not dict:
        return None
    elif metadata:
        values = metadata.values()
        if not _STR_ONLY.issuperset(map(type, values)):
            return None
        colons += "".join(metadata).count(":") + "".join(values).count(":")
        pairs += len(metadata)
    pairs += 3 * len(header)
    if text.count(":") - colons != pairs:
        return None  # a duplicate key somewhere (or a string the count cannot see through)
    bits_of, limit = DTYPE_BITS, 8 * file_size
    spans = []
    for e in header.values():
        if type(e) is not dict or len(e) != 3:
            return None
        try:
            dtype, shape, offsets = e["dtype"], e["shape"], e["data_offsets"]
        except KeyError:
            return None
        if type(dtype) is not str or dtype not in DTYPE_NAMES or type(shape) is not list or type(offsets) is not list \
                or len(offsets) != 2 or not _INT_ONLY.issuperset(map(type, shape)) \
                or not _INT_ONLY.issuperset(map(type, offsets)):
            return None
        begin, end = offsets
        if begin < 0 or begin > end or end > data_len or (shape and min(shape) < 0):
            return None
        numel, bits = math.prod(shape), bits_of[dtype]
        extent = numel if numel else math.prod([s or 1 for s in shape])
        if extent * bits > limit or numel * bits != 8 * (end - begin):
            return None
        spans.append((begin, end))
    spans.sort()
    pos = 0
    for begin, end in spans:
        if begin != pos:
            return None
        pos = end
    if pos != data_len:
        return None
    return header, metadata


_STR_ONLY = frozenset((str,))


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

"""The safetensors container format: header parsing with clear errors, dtype names, tensor order.

Only the container is handled here; tensors are read through ``safetensors.safe_open`` (mmap).
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
    "U16": torch.uint16,
    "U32": torch.uint32,
    "U64": torch.uint64,
    "C64": torch.complex64,
}
TORCH_TO_NAME = {v: k for k, v in DTYPE_NAMES.items()}

# The order in which safetensors' own serializer lays out tensors: by dtype (this order), then by
# name. Writing in the same order makes our files byte-identical to ``safetensors.torch.save`` and
# makes the A1111/kohya ``sshs_model_hash`` (a hash of the data section) agree with theirs.
_DTYPE_RANK = [
    "U64", "I64", "F64", "C64", "F32", "U32", "I32", "BF16", "F16", "U16", "I16",
    "F8_E4M3", "F8_E5M2", "I8", "U8", "BOOL",
]
DTYPE_ORDER = {name: i for i, name in enumerate(_DTYPE_RANK)}

MAX_HEADER = 100 * 1024 * 1024  # safetensors itself refuses headers over 100 MB


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
    ``BadInput`` naming the problem: empty, truncated, not JSON, offsets past the end of the file.
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
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BadInput(path, f"corrupted safetensors header: not valid JSON ({e.__class__.__name__})") from e
    if not isinstance(header, dict):
        raise BadInput(path, "corrupted safetensors header: not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    data_start = 8 + n
    data_len = size - data_start
    for name, e in header.items():
        if not isinstance(e, dict) or "data_offsets" not in e or "dtype" not in e or "shape" not in e:
            raise BadInput(path, f"corrupted safetensors header: bad entry for tensor {name!r}")
        begin, end = e["data_offsets"]
        if e["dtype"] not in DTYPE_NAMES:
            raise BadInput(path, f"tensor {name!r} has unsupported dtype {e['dtype']}")
        if end > data_len or begin > end:
            raise BadInput(
                path,
                f"header claims more data than the file holds: tensor {name!r} ends at byte {end} "
                f"but the data section has {data_len} bytes (file truncated?)",
            )
        numel = 1
        for s in e["shape"]:
            numel *= int(s)
        item = torch.empty((), dtype=DTYPE_NAMES[e["dtype"]]).element_size()
        if numel * item != end - begin:
            raise BadInput(path, f"corrupted safetensors header: tensor {name!r} shape does not match its byte size")
    return header, {str(k): str(v) for k, v in metadata.items()}, data_start

"""The fast safetensors header path (C json + counts) against the strict one it stands in for.

``read_header`` first tries ``_fast_header``, which must either decline (None) or give exactly what
the strict parse and checks give: the same entries in the same order and the same metadata. Every
header below (real fixture headers, random mutations, and JSON tricks aimed at the counts: duplicate
keys hidden behind colons, ``\\u003a`` escapes, surrogates, ``-0``, NaN, nesting) is read both ways.
"""

import importlib.util
import json
import os
import random
import struct
from pathlib import Path

import pytest

from lycotools.errors import BadInput
from lycotools.io import safetensors_format as sf

FIX = Path(__file__).resolve().parent.parent / "fixtures"
SOURCES = [
    "adapters/sd1_kohya_lora.safetensors",
    "adapters/sd1_lokr.safetensors",
    "adapters/sd1_peft_adalora/adapter_model.safetensors",
    "adapters/sdxl_kohya_locon.safetensors",
    "embeddings/kohya.safetensors",
    "embeddings/sdxl.safetensors",
]


def _hostile():
    spec = importlib.util.spec_from_file_location("_hostile", Path(__file__).with_name("test_hostile_readers.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _both(tmp_path: Path, blob: bytes):
    """(strict outcome, read_header outcome, whether the fast path took it); an outcome is
    ("ok", entries as items, metadata as items, data start) or ("bad", message)."""
    p = tmp_path / "h.safetensors"
    p.write_bytes(blob)

    def outcome(fn):
        try:
            header, meta, start = fn(p)
            return "ok", [(k, dict(v)) for k, v in header.items()], list(meta.items()), start
        except BadInput as e:
            return "bad", e.message

    real = sf._fast_header
    try:
        sf._fast_header = lambda *a: None
        strict = outcome(sf.read_header)
    finally:
        sf._fast_header = real
    size = len(blob)
    took = False
    if size >= 8:
        n = struct.unpack("<Q", blob[:8])[0]
        if 8 + n <= size:
            took = real(blob[8:8 + n], size - 8 - n, size) is not None
    return strict, outcome(sf.read_header), took


def _st(text: str, data: bytes) -> bytes:
    h = text.encode("utf-8", "surrogatepass")
    return struct.pack("<Q", len(h)) + h + data


def _tricks(text: str, data: bytes, rng: random.Random):
    """Headers built to fool a counting duplicate check or a C parser."""
    h = json.loads(text)
    names = [k for k in h if k != "__metadata__"]
    name = rng.choice(names)
    e = h[name]
    raw = json.dumps(h, separators=(",", ":"))
    ent = json.dumps(e, separators=(",", ":"))
    yield _st(raw, data)
    yield _st(json.dumps(h, indent=2), data)  # whitespace around every token
    yield _st(raw + "   ", data)
    meta = {"a:b": "c:d", "time": "2024-01-05T10:00:00", "k": "v"}
    yield _st(json.dumps({"__metadata__": meta, **{k: v for k, v in h.items() if k != "__metadata__"}},
                         separators=(",", ":")), data)
    # duplicates whose dropped copy carries colons, so a plain colon count would balance
    yield _st(raw.replace("{", '{"x:y":1,"x:y":{"a":"b"},', 1), data)
    yield _st(raw.replace("{", "{" + json.dumps(name) + ':{"p":"q:r"},', 1), data)
    yield _st(raw.replace("{", '{"__metadata__":{"k":"a:b","k":"c"},', 1), data)
    yield _st(raw.replace("{", '{"__metadata__":{"k:":"a","k:":"b"},', 1), data)
    yield _st(raw.replace('"dtype":', '"dtype":"F:32","dtype":', 1), data)
    yield _st(raw.replace('"shape":', '"shape":[1],"shape":', 1), data)
    yield _st(raw.replace('"data_offsets":', '"data_offsets":{"a:b":"c:d:e"},"data_offsets":', 1), data)
    yield _st(raw.replace(ent, ent[:-1] + ',"z":{"q":1,"q":2}}', 1), data)
    # escapes: a colon or a surrogate spelled as \u, in names and metadata
    yield _st(raw.replace("{", '{"__metadata__":{"a\\u003ab":"c"},', 1), data)
    yield _st(raw.replace("{", '{"__metadata__":{"a\\u003Ab":"c","a:b":"d"},', 1), data)
    yield _st(raw.replace("{", '{"__metadata__":{"e":"\\ud83d\\ude00"},', 1), data)
    yield _st(raw.replace("{", '{"__metadata__":{"e":"\\udc00"},', 1), data)
    yield _st(raw.replace("{", '{"__metadata__":{"e":"\\\\u003a"},', 1), data)
    yield _st(raw.replace("{", '{"__metadata__":{"e":"\\u00e9 caf\\u00e9"},', 1), data)
    yield _st(raw.replace(json.dumps(name), json.dumps(name)[:-1] + '\\u003a"', 1), data)
    # numbers
    begin, end = e["data_offsets"]
    old = '"data_offsets":' + json.dumps([begin, end], separators=(",", ":"))
    for new in (f'"data_offsets":[-0,{end}]', f'"data_offsets":[ -0 ,{end}]', f'"data_offsets":[{begin}, {end}]',
                f'"data_offsets":[{begin}.0,{end}]', f'"data_offsets":[{begin},Infinity]', f'"data_offsets":[{begin},{end}e0]',
                f'"data_offsets":[{begin},{end}],"x":' + "[" * 20 + "]" * 20,
                f'"data_offsets":[{begin},{end}],"x":' + "[" * 3000 + "]" * 3000):
        yield _st(raw.replace(old, new, 1), data)
    if e["shape"]:
        yield _st(raw.replace('"shape":[', '"shape":[-0,', 1), data)
        yield _st(raw.replace('"shape":[', '"shape":[true,', 1), data)
    yield _st(raw.replace("{", '{"__metadata__":{"n":"-0"},', 1), data)
    yield _st(raw.replace("{", '{"__metadata__":null,', 1), data)
    yield _st(raw.replace("{", '{"__metadata__":{},', 1), data)
    yield _st(raw.replace("{", '{"__metadata__":{"a":1},', 1), data)
    yield _st(raw.replace("{", '{"__metadata__":[],', 1), data)
    yield _st(raw + "x", data)
    yield _st(raw[:-1], data)
    yield _st(" " + raw, data)
    yield _st(raw, data + b"\0")
    yield _st(raw, data[:-1])


@pytest.mark.parametrize("src", SOURCES)
def test_fast_header_agrees_with_the_strict_path(tmp_path, src):
    hostile = _hostile()
    text, data = hostile._split(FIX / src)
    rng = random.Random(hash(src) & 0xFFFF)
    blobs = list(_tricks(text, data, rng)) + [hostile._mutate(rng, text, data)[0] for _ in range(150)]
    took = 0
    for i, blob in enumerate(blobs):
        strict, got, fast = _both(tmp_path, blob)
        assert got == strict, f"{src} #{i}: {got[:2]} != {strict[:2]}"
        if fast:
            assert strict[0] == "ok", f"{src} #{i}: the fast path took a header the strict path refuses"
            took += 1
    assert took > 10  # the fast path does take the ordinary headers


def test_fast_header_takes_ordinary_files():
    for p in sorted(FIX.rglob("*.safetensors")):
        if p.parent.name == "bad":
            continue
        blob = p.read_bytes()
        n = struct.unpack("<Q", blob[:8])[0]
        assert sf._fast_header(blob[8:8 + n], len(blob) - 8 - n, len(blob)) is not None, p
        assert os.path.getsize(p) == len(blob)

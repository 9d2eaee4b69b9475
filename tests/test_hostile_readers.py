"""Hostile inputs to the readers: every broken or malicious file is one ``BadInput`` line naming it.

Safetensors headers are checked against the ``safetensors`` library itself (whatever it refuses,
lycotools refuses), on mutations of real fixture headers made at test time. Pickles are built
opcode by opcode to claim gigabytes from a few hundred bytes, nest without end, or hide
TorchScript; each must be refused before torch acts on it.
"""

import json
import os
import pickle
import random
import re
import struct
import subprocess
import sys
import textwrap
import warnings
import zipfile
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open
from safetensors.torch import save_file

from lycotools.cli import main
from lycotools.errors import BadInput
from lycotools.io.readers import open_source

FIX = Path(__file__).resolve().parent.parent / "fixtures"
REPO = Path(__file__).resolve().parent.parent


# ------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------


def _read_all(src):
    return {k: src.get(k) for k in src.keys()}


def _outcome(path):
    """("ok", tensors) or ("bad", message); anything else raised is a test failure."""
    try:
        with open_source(path) as src:
            return "ok", _read_all(src)
    except BadInput as e:
        line = e.line()
        assert str(path) in line and "\n" not in line, line
        return "bad", e.message


def _reference(path):
    """What the safetensors library makes of the file: its tensors, or None if it refuses it."""
    try:
        with safe_open(str(path), "pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}
    except Exception:
        return None


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))


def _split(path):
    b = Path(path).read_bytes()
    n = struct.unpack("<Q", b[:8])[0]
    return b[8:8 + n].decode(), b[8 + n:]


def _st(header, data: bytes, raw: bool = False) -> bytes:
    """A safetensors file from a header (a dict, or JSON text when ``raw``) and a data section."""
    text = header if raw else json.dumps(header, separators=(",", ":"))
    h = text.encode("utf-8", "surrogatepass") if isinstance(text, str) else text
    return struct.pack("<Q", len(h)) + h + data


# ------------------------------------------------------------------------------------------------
# safetensors: differential against the safetensors library
# ------------------------------------------------------------------------------------------------

SOURCES = [
    "adapters/sd1_kohya_lora.safetensors",
    "adapters/sd1_lokr.safetensors",
    "adapters/sd1_peft_adalora/adapter_model.safetensors",  # has empty tensors sharing offsets
    "embeddings/kohya.safetensors",
    "embeddings/sdxl.safetensors",
]
BAD_VALUES = [-1, -0.0, 1.5, True, None, "4", [], {}, [1], 2**64, 10**30]
DTYPES = ["F32", "F16", "BF16", "U8", "I64", "F8_E4M3", "F8_E8M0", "F4", "F6_E2M3", "C64", "f32", "F4X", 5, ["F32"]]


def _mutate(rng: random.Random, text: str, data: bytes) -> tuple[bytes, str]:
    """One random mutation of a real header (as JSON or as bytes); returns (file, description)."""
    h = json.loads(text)
    names = [k for k in h if k != "__metadata__"]
    name = rng.choice(names)
    e = h[name]
    kind = rng.randrange(22)
    if kind == 0:
        i = rng.randrange(2)
        e["data_offsets"][i] += rng.choice([-8, -4, -2, -1, 1, 2, 4, 8])
    elif kind == 1:
        e["data_offsets"][rng.randrange(2)] = rng.choice(BAD_VALUES)
    elif kind == 2:
        e["data_offsets"] = rng.choice([[0], [0, 0, 0], e["data_offsets"][::-1], "0,4", None, [-16, 0]])
    elif kind == 3 and e["shape"]:
        e["shape"][rng.randrange(len(e["shape"]))] += rng.choice([-1, 1, 2])
    elif kind == 4:
        e["shape"] = e["shape"] + [rng.choice(BAD_VALUES + [0, 1, 2])]
    elif kind == 5:
        e["shape"] = rng.choice([[], [0, 2**64 - 1], [0, 2**70], "4", None, [[4]]])
    elif kind == 6:
        e["dtype"] = rng.choice(DTYPES)
    elif kind == 7:  # another tensor's offsets: an overlap unless both are empty
        other = h[rng.choice(names)]
        e["data_offsets"] = list(other["data_offsets"])
    elif kind == 8:
        del e[rng.choice(["dtype", "shape", "data_offsets"])]
    elif kind == 9:
        e[rng.choice(["extra", "offsets", "dtype2"])] = rng.choice([1, "x", None, [1, 2], {"a": 1}])
    elif kind == 10:
        h[name] = rng.choice([[], "x", 1, None])
    elif kind == 11:
        h["__metadata__"] = rng.choice([None, {}, {"a": 1}, {"a": None}, {"a": {"b": "c"}}, [], "x", {"a": "b"}])
    elif kind == 12:
        h["\ud800" + name] = h.pop(name)
    elif kind == 13:  # a duplicate tensor name, key inside an entry, or metadata key (text level)
        raw = json.dumps(h, separators=(",", ":"))
        dup = rng.choice([
            ("{", "{" + json.dumps(name) + ":" + json.dumps(e) + ",", 1),
            ('"dtype":', '"dtype":"F32","dtype":', 1),
            ('"__metadata__":{', '"__metadata__":{"k":"a","k":"b",', 1),
            ("{", '{"__metadata__":{},"__metadata__":{},', 1),
        ])
        return _st(raw.replace(*dup), data, raw=True), "duplicate"
    elif kind == 14:  # the data section one byte short or long, or cut anywhere
        whole = _st(h, data)
        cut = rng.choice([len(whole) - 1, len(whole) + 1, rng.randrange(len(whole))])
        return (whole[:cut] if cut < len(whole) else whole + b"\0"), f"length {cut}"
    elif kind == 15:  # the header length field off
        hb = json.dumps(h, separators=(",", ":")).encode()
        n = len(hb) + rng.choice([-8, -1, 1, 8, 1 << 20, 100_000_001, 2**63])
        return struct.pack("<Q", n) + hb + data, f"n={n}"
    elif kind == 16:  # a byte of the header replaced
        hb = bytearray(json.dumps(h, separators=(",", ":")).encode())
        i = rng.randrange(len(hb))
        hb[i] = rng.choice([0xFF, 0xC3, 0x80, 0x00, 0x22, 0x7D, 0x20, ord("-"), ord("9")])
        return struct.pack("<Q", len(hb)) + bytes(hb) + data, f"byte {i}"
    elif kind == 17:  # padding: leading whitespace, trailing non-space
        raw = json.dumps(h, separators=(",", ":"))
        raw = rng.choice([" " + raw, "\n" + raw, raw + "\n", raw + "\t", raw + "\0", raw + "   ", raw + " x"])
        return _st(raw, data, raw=True), "padding"
    elif kind == 18:  # JSON oddities: NaN, -0, 0.0, 0e0, nesting in an unknown field
        raw = json.dumps(h, separators=(",", ":"))
        begin, end = e["data_offsets"]
        old = '"data_offsets":' + json.dumps([begin, end], separators=(",", ":"))
        new = rng.choice([
            f'"data_offsets":[NaN,{end}]', f'"data_offsets":[-0,{end}]', f'"data_offsets":[{begin}.0,{end}]',
            f'"data_offsets":[{begin}e0,{end}]', '"x":' + "[" * 200 + "]" * 200 + "," + old,
            '"x":' + "[" * 10 + "]" * 10 + "," + old,
        ])
        return _st(raw.replace(old, new, 1), data, raw=True), "json oddity"
    elif kind == 19:  # all tensors shifted: a gap at the start
        for k in names:
            h[k]["data_offsets"] = [o + 4 for o in h[k]["data_offsets"]]
        return _st(h, data + b"\0" * 4), "gap"
    elif kind == 20:
        return _st(h, data + b"\0" * rng.choice([1, 8, 64])), "trailing bytes"
    # kind 21 (and the rare no-ops above): unchanged, must be read the same by both
    return _st(h, data), f"kind {kind}"


def test_safetensors_differential_against_the_library(tmp_path):
    """Whatever the safetensors library refuses, lycotools refuses with one line naming the file;
    what both read, both read the same (about 400 mutations of real headers)."""
    rng = random.Random(20240611)
    p = tmp_path / "m.safetensors"
    counts = {"both refuse": 0, "both read": 0, "only lycotools refuses": 0}
    for src in SOURCES:
        text, data = _split(FIX / src)
        for i in range(80):
            blob, what = _mutate(rng, text, data)
            p.write_bytes(blob)
            ref = _reference(p)
            got, value = _outcome(p)
            if ref is None:
                assert got == "bad", f"{src} #{i} ({what}): safetensors refuses it, lycotools read it"
                counts["both refuse"] += 1
            elif got == "ok":
                assert value.keys() == ref.keys() and all(_same(value[k], ref[k]) for k in ref), f"{src} #{i} ({what})"
                counts["both read"] += 1
            else:
                counts["only lycotools refuses"] += 1
    assert counts["both refuse"] > 150 and counts["both read"] > 20 and counts["only lycotools refuses"] > 10, counts


def _one(dtype="F32", shape=(4,), offsets=(0, 16)):
    return {"dtype": dtype, "shape": list(shape), "data_offsets": list(offsets)}


# (file bytes, message): the stricter cases, each named; several were read as weights before
STRICT = {
    "negative begin reads the header as weights": (_st({"a": _one(offsets=(-16, 0))}, b""), "non-negative"),
    "overlap": (_st({"a": _one(), "b": _one()}, b"\0" * 16), "'a' and 'b' overlap"),
    "overlap inside": (_st({"a": _one(shape=(8,), offsets=(0, 32)), "b": _one(offsets=(8, 24))}, b"\0" * 32), "overlap"),
    "gap": (_st({"a": _one(offsets=(4, 20))}, b"\0" * 20), "belong to no tensor"),
    "trailing bytes": (_st({"a": _one()}, b"\0" * 17), "belong to no tensor"),
    "duplicate name": (_st('{"a":%s,"a":%s}' % (json.dumps(_one()), json.dumps(_one())), b"\0" * 16, raw=True), "'a' appears twice"),
    "duplicate metadata key": (_st('{"__metadata__":{"k":"1","k":"2"},"a":%s}' % json.dumps(_one()), b"\0" * 16, raw=True), "appears twice"),
    "lone surrogate name": (_st('{"\\ud800":%s}' % json.dumps(_one()), b"\0" * 16, raw=True), "not valid UTF-8"),
    "invalid utf-8": (_st(b'{"\xff":' + json.dumps(_one()).encode() + b"}", b"\0" * 16, raw=True), "not valid UTF-8"),
    "leading space": (_st(" " + json.dumps({"a": _one()}), b"\0" * 16, raw=True), "start with '{'"),
    "newline padding": (_st(json.dumps({"a": _one()}) + "\n", b"\0" * 16, raw=True), "space padding"),
    "bool offsets": (_st({"a": _one(dtype="U8", shape=(1,), offsets=(False, True))}, b"\0"), "non-negative integers"),
    "float shape": (_st({"a": _one(shape=(4.0,))}, b"\0" * 16), "shape"),
    "bool shape": (_st({"a": _one(shape=(True,), offsets=(0, 4))}, b"\0" * 4), "shape"),
    "negative zero offset": (_st('{"a":{"dtype":"F32","shape":[4],"data_offsets":[-0,16]}}', b"\0" * 16, raw=True), "non-negative"),
    "three offsets": (_st({"a": _one(offsets=(0, 16, 16))}, b"\0" * 16), "two non-negative"),
    "dtype list": (_st({"a": _one(dtype=["F32"])}, b"\0" * 16), "unknown dtype"),
    "dtype int": (_st({"a": _one(dtype=4)}, b"\0" * 16), "unknown dtype"),
    "dtype F4": (_st({"a": _one(dtype="F4", shape=(32,))}, b"\0" * 16), "has dtype F4, which lycotools cannot read"),
    "shape too big for the span": (_st({"a": _one(shape=(5,))}, b"\0" * 16), "need 20 bytes"),
    "empty tensor of absurd size": (_st({"a": _one(shape=(0, 2**64 - 1), offsets=(0, 0))}, b""), "larger than the file"),
    "metadata nested": (_st({"__metadata__": {"a": {"b": "c"}}, "a": _one()}, b"\0" * 16), "not a string"),
    "metadata number": (_st({"__metadata__": {"a": 1}, "a": _one()}, b"\0" * 16), "not a string"),
    "metadata null value": (_st({"__metadata__": {"a": None}, "a": _one()}, b"\0" * 16), "not a string"),
    "metadata list": (_st({"__metadata__": [], "a": _one()}, b"\0" * 16), "not a JSON object"),
    "NaN": (_st('{"a":{"dtype":"F32","shape":[NaN],"data_offsets":[0,16]}}', b"\0" * 16, raw=True), "NaN"),
    "deep nesting": (_st('{"a":{"x":' + "[" * 5000 + "]" * 5000 + "}}", b"", raw=True), "JSON|nested"),
    "header over 100 MB": (struct.pack("<Q", 100_000_001) + b"{}" + b" " * 64, "implausible"),
}


@pytest.mark.parametrize("case", STRICT)
def test_stricter_than_the_library(tmp_path, case):
    blob, message = STRICT[case]
    p = tmp_path / "s.safetensors"
    p.write_bytes(blob)
    got, value = _outcome(p)
    assert got == "bad", f"{case}: read as {list(value)}"
    assert re.search(message, value), value


def test_accepted_oddities(tmp_path):
    """What safetensors accepts and lycotools must keep reading: null metadata, unknown fields,
    empty tensors sharing an offset, an empty file, F8_E8M0 / FNUZ dtypes."""
    p = tmp_path / "o.safetensors"
    for header, data in [
        ({"__metadata__": None, "a": _one()}, b"\0" * 16),
        ({"a": dict(_one(), extra=[1, {"x": None}])}, b"\0" * 16),
        ({"a": _one(shape=(0, 3), offsets=(0, 0)), "b": _one(shape=(0,), offsets=(0, 0)), "c": _one()}, b"\0" * 16),
        ({}, b""),
        ({"a": _one(dtype="F8_E8M0", shape=(16,))}, b"\x7f" * 16),
        ({"a": _one(dtype="F8_E4M3FNUZ", shape=(16,))}, b"\0" * 16),
    ]:
        p.write_bytes(_st(header, data))
        assert _reference(p) is not None
        got, value = _outcome(p)
        assert got == "ok", (header, value)


def test_truncated_after_open_is_an_error_naming_the_file(tmp_path):
    p = tmp_path / "t.safetensors"
    save_file({"a": torch.ones(1000), "b": torch.zeros(1000)}, str(p))
    src = open_source(p)
    os.truncate(p, 4000)
    with pytest.raises(BadInput, match="file ended while reading") as e:
        _read_all(src)
    assert str(p) in e.value.line()


# ------------------------------------------------------------------------------------------------
# pickles
# ------------------------------------------------------------------------------------------------


def _op_str(s: str) -> bytes:
    b = s.encode()
    return b"X" + struct.pack("<I", len(b)) + b


def _op_long(n: int) -> bytes:
    b = pickle.encode_long(n)
    return b"\x8a" + bytes([len(b)]) + b


def _op_global(module: str, name: str) -> bytes:
    return b"c" + f"{module}\n{name}\n".encode()


def _dict_of(value_ops: bytes, key: str = "x") -> bytes:
    """A protocol-2 pickle of ``{key: <value_ops>}``."""
    return b"\x80\x02}" + _op_str(key) + value_ops + b"s."


def _zip_pickle(path: Path, pkl: bytes, records: dict | None = None):
    """A zip-format torch file around a hand-made ``data.pkl``."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        z.writestr("archive/data.pkl", pkl)
        z.writestr("archive/byteorder", "little")
        for k, v in (records or {}).items():
            z.writestr(f"archive/data/{k}", v)
        z.writestr("archive/version", "3\n")
    return path


def _resave_zip(src: Path, dst: Path, edit):
    """Copy a torch zip file, passing its ``data.pkl`` through ``edit``."""
    with zipfile.ZipFile(src) as zi, zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as zo:
        for info in zi.infolist():
            data = zi.read(info.filename)
            zo.writestr(info.filename, edit(data) if info.filename.endswith("/data.pkl") else data)
    return dst


def _hostile_pickles(d: Path) -> dict[str, Path]:
    """Files of a few hundred bytes (or KB) whose pickles would make torch allocate gigabytes."""
    d.mkdir(exist_ok=True)
    out = {}
    big = 10**10
    out["bytearray"] = _zip_pickle(d / "bytearray.pt", _dict_of(_op_global("builtins", "bytearray") + _op_long(big) + b"\x85R"))
    out["tensor constructor"] = _zip_pickle(d / "ctor.pt", _dict_of(_op_global("torch", "FloatTensor") + _op_long(big) + b"\x85R"))
    out["untyped storage"] = _zip_pickle(d / "storage.pt", _dict_of(_op_global("torch.storage", "UntypedStorage") + _op_long(big) + b"\x85R"))
    # one 100 kB string encoded as UTF-32 twenty thousand times: 8 GB from a 300 kB file
    calls = _op_global("_codecs", "encode") + b"r\x01\x00\x00\x00" + _op_str("a" * 100_000) + b"r\x02\x00\x00\x00"
    calls += _op_str("utf-32") + b"r\x03\x00\x00\x00\x86Ra"
    calls += b"j\x01\x00\x00\x00j\x02\x00\x00\x00j\x03\x00\x00\x00\x86Ra" * 20_000
    out["repeated copies"] = _zip_pickle(d / "copies.pt", _dict_of(b"]" + calls))
    # real files whose storage record claims 10^10 elements
    torch.save({"w": torch.arange(4, dtype=torch.float32)}, d / "small.pt")
    out["zip storage claim"] = _resave_zip(d / "small.pt", d / "zipclaim.pt", lambda b: b.replace(b"cpuq\x06K\x04", b"cpuq\x06" + _op_long(big), 1))
    torch.save({"w": torch.arange(4, dtype=torch.float32)}, d / "legacy.pt", _use_new_zipfile_serialization=False)
    raw = (d / "legacy.pt").read_bytes()
    assert b"cpuq\x06K\x04N" in raw
    (d / "legacyclaim.pt").write_bytes(raw.replace(b"cpuq\x06K\x04N", b"cpuq\x06" + _op_long(big) + b"N", 1))
    out["legacy storage claim"] = d / "legacyclaim.pt"
    return out


class _TorchLoadCalled(BaseException):
    pass


@pytest.fixture
def no_torch_load(monkeypatch):
    """Make reaching ``torch.load`` an error the readers cannot catch."""
    def refuse(*a, **k):
        raise _TorchLoadCalled()

    monkeypatch.setattr(torch, "load", refuse)


@pytest.mark.parametrize("case", ["bytearray", "tensor constructor", "untyped storage", "repeated copies",
                                  "zip storage claim", "legacy storage claim"])
def test_allocation_claims_refused_before_torch_load(tmp_path, case, no_torch_load):
    path = _hostile_pickles(tmp_path)[case]
    assert path.stat().st_size < 500_000
    with pytest.raises(BadInput) as e:
        open_source(path)
    assert str(path) in e.value.line() and "\n" not in e.value.line()


def test_allocation_claims_under_an_address_space_limit(tmp_path):
    """In a child process whose address space is capped 1.5 GB above what it uses, each hostile
    pickle is a BadInput: no allocation of the claimed gigabytes is even attempted."""
    files = _hostile_pickles(tmp_path / "h")
    script = textwrap.dedent(f"""
        import json, resource
        from lycotools.errors import BadInput
        from lycotools.io.readers import open_source
        vm = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmSize:")) * 1024
        hard = resource.getrlimit(resource.RLIMIT_AS)[1]
        cap = vm + (1536 << 20) if hard == resource.RLIM_INFINITY else min(vm + (1536 << 20), hard)
        resource.setrlimit(resource.RLIMIT_AS, (cap, hard))
        out = {{}}
        for name, path in {json.dumps({k: str(v) for k, v in files.items()})}.items():
            try:
                open_source(path)
                out[name] = "read"
            except BadInput as e:
                out[name] = "bad" if path in e.line() else "bad, unnamed"
            except BaseException as e:
                out[name] = type(e).__name__
        print(json.dumps(out))
    """)
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    got = json.loads(r.stdout.strip().splitlines()[-1])
    assert got == {k: "bad" for k in files}, got


def _nested_dicts(depth: int) -> bytes:
    return b"\x80\x02" + (b"}" + _op_str("a")) * depth + b"}" + b"s" * depth + b"."


def _shared_dicts(depth: int) -> bytes:
    """d0 = {}; d(i+1) = {"a": di, "b": di}: 2**depth leaves from a few hundred bytes."""
    ops = b"\x80\x02}r\x00\x00\x00\x00"
    for i in range(depth):
        get = b"j" + struct.pack("<I", i)
        ops += b"}" + _op_str("a") + get + b"s" + _op_str("b") + get + b"s" + b"r" + struct.pack("<I", i + 1)
    return ops + b"."  # the last dict is on top of the stack


def _self_dict() -> bytes:
    return b"\x80\x02}q\x00" + _op_str("a") + b"h\x00s."


def _deep_list_value(depth: int) -> bytes:
    return _dict_of(b"]" * depth + b"a" * (depth - 1), key="steps")


def _save(obj):
    return lambda p: torch.save(obj, p)


def _scripted(p):
    torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), str(p))


def _raw(pkl: bytes, zipped: bool = True):
    return lambda p: _zip_pickle(p, pkl) if zipped else p.write_bytes(pkl)


# name: (writer of the file, what the message says)
STRUCTURED = {
    "deep dicts": (_raw(_nested_dicts(5000)), "nests more than"),
    "dict holding itself": (_raw(_self_dict()), "nests more than"),
    "shared sub-dicts": (_raw(_shared_dicts(60)), "keys are far longer"),
    "deeply nested value": (_raw(_deep_list_value(5000)), "nests more than"),
    "stride-0 view of 40 GB": (_save({"w": torch.zeros(1).expand(100_000, 100_000)}), "larger than the whole file"),
    "quantized": (_save({"q": torch.quantize_per_tensor(torch.ones(4), 0.1, 0, torch.qint8)}), "quantized tensors"),
    "sparse": (_save({"s": torch.eye(3).to_sparse()}), "sparse_coo tensor"),
    "TorchScript": (_scripted, "TorchScript"),
    "plain pickle": (_raw(pickle.dumps({"w": [1.0, 2.0]}, protocol=2), zipped=False), "magic number"),
}


def _structured(d: Path, name: str) -> Path:
    d.mkdir(exist_ok=True)
    path = d / (name.replace(" ", "_") + ".pt")
    STRUCTURED[name][0](path)
    return path


@pytest.mark.parametrize("name", STRUCTURED)
def test_structural_hostile_pickles(tmp_path, name):
    """Deep or self-referencing nesting, shared sub-dicts (a billion keys), tensors lycotools
    cannot use (stride-0 giants, quantized, sparse), TorchScript: each a BadInput naming the file."""
    path = _structured(tmp_path, name)
    with pytest.raises(BadInput) as e:
        open_source(path)
    assert STRUCTURED[name][1] in e.value.message
    assert str(path) in e.value.line() and "\n" not in e.value.line()


def _torch_reads(path) -> bool:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.load(path, weights_only=True)
        return True
    except Exception:
        return False


@pytest.mark.parametrize("legacy", [False, True])
def test_pickle_protocols_follow_torch_and_stay_quiet(tmp_path, legacy):
    """torch.save with pickle protocols 0..5: read when torch's weights-only loader reads it,
    otherwise one BadInput line; never one of torch's warnings on the user's terminal."""
    sd = OrderedDict(w=torch.randn(3, 4), b=torch.arange(5))
    for proto in range(6):
        p = tmp_path / f"p{proto}.pt"
        torch.save(sd, p, pickle_protocol=proto, _use_new_zipfile_serialization=not legacy)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            got, value = _outcome(p)
        assert not caught, [str(w.message) for w in caught]
        assert (got == "ok") == _torch_reads(p), (proto, value)
        if got == "ok":
            assert all(torch.equal(value[k], sd[k]) for k in sd)
    assert _outcome(tmp_path / "p2.pt")[0] == "ok"


def test_cut_and_corrupted_pickles(tmp_path):
    """A real checkpoint cut short or with bytes changed is read or refused, nothing else."""
    rng = random.Random(7)
    sd = {f"k{i}": torch.randn(16, 16) for i in range(4)}
    for legacy in (False, True):
        src = tmp_path / f"src{legacy}.pt"
        torch.save({"state_dict": sd, "global_step": 3}, src, _use_new_zipfile_serialization=not legacy)
        whole = src.read_bytes()
        for i in range(40):
            b = bytearray(whole)
            if i % 2:
                b = b[: rng.randrange(len(b))]
            else:
                for _ in range(rng.randrange(1, 4)):
                    b[rng.randrange(len(b))] = rng.randrange(256)
            p = tmp_path / f"c{legacy}{i}.ckpt"
            p.write_bytes(bytes(b))
            _outcome(p)


SIGBUS_SCRIPT = """
import os, sys, torch
from safetensors.torch import save_file
from lycotools.errors import BadInput
from lycotools.io.readers import open_source
d = sys.argv[1]
torch.save({"w": torch.randn(1024, 1024)}, d + "/m.ckpt")
save_file({"w": torch.randn(1024, 1024)}, d + "/m.safetensors")
for name in ("m.ckpt", "m.safetensors"):
    src = open_source(d + "/" + name)
    os.truncate(d + "/" + name, 0)  # cut while open, as a download being replaced
    try:
        print(name, float(src.get("w").float().sum()) == float(src.get("w").float().sum()))
    except BadInput as e:
        print(name, "bad" if name in e.line() else "unnamed")
"""


def test_no_sigbus_when_a_file_is_cut_while_open(tmp_path):
    r = subprocess.run([sys.executable, "-c", SIGBUS_SCRIPT, str(tmp_path)], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert r.returncode == 0, f"returncode {r.returncode}: {r.stderr[-1500:]}"
    assert r.stdout.split() == ["m.ckpt", "True", "m.safetensors", "bad"], r.stdout


# ------------------------------------------------------------------------------------------------
# shard indexes and config files
# ------------------------------------------------------------------------------------------------


def test_shard_index_and_configs(tmp_path):
    outside = tmp_path / "outside.safetensors"
    save_file({"a": torch.ones(2)}, str(outside))
    d = tmp_path / "model"
    d.mkdir()
    save_file({"a": torch.ones(2)}, str(d / "s1.safetensors"))
    idx = d / "m.safetensors.index.json"
    for weight_map, msg in [
        ({"a": "../outside.safetensors"}, "inside the index's folder"),
        ({"a": str(outside)}, "inside the index's folder"),
        ({"a": "../../etc/passwd"}, "inside the index's folder"),
        ({"a": "m.safetensors.index.json"}, "not a .safetensors or torch file"),
        ({"a": ["s1.safetensors"]}, "weight_map"),
        (["s1.safetensors"], "weight_map"),
        ("s1.safetensors", "weight_map"),
    ]:
        idx.write_text(json.dumps({"weight_map": weight_map}))
        with pytest.raises(BadInput, match=msg) as e:
            open_source(idx)
        assert str(idx) in e.value.line()
    for text in ("[]", '"x"', "{", '{"weight_map": {"a": "s1.safetensors"}, "metadata": [1]}'):
        idx.write_text(text)
        with pytest.raises(BadInput, match="not a valid shard index"):
            open_source(idx)
    idx.write_text(json.dumps({"weight_map": {"a": "s1.safetensors"}}))
    assert torch.equal(open_source(idx).get("a"), torch.ones(2))

    peft = tmp_path / "peft"
    peft.mkdir()
    save_file({"x": torch.ones(2)}, str(peft / "adapter_model.safetensors"))
    diff = tmp_path / "pipe"
    (diff / "unet").mkdir(parents=True)
    save_file({"x": torch.ones(2)}, str(diff / "unet" / "diffusion_pytorch_model.safetensors"))
    for text in ("[1, 2]", "null", '"r"', "{"):
        (peft / "adapter_config.json").write_text(text)
        with pytest.raises(BadInput, match="not a valid PEFT adapter config"):
            open_source(peft)
        (diff / "unet" / "config.json").write_text(text)
        with pytest.raises(BadInput, match="not a valid diffusers config"):
            open_source(diff)
    (diff / "unet" / "config.json").write_text("{}")
    (diff / "scheduler").mkdir()
    (diff / "scheduler" / "scheduler_config.json").write_text('{"prediction_type": ["v_prediction"]}')
    assert open_source(diff).prediction is None


# ------------------------------------------------------------------------------------------------
# through the command line
# ------------------------------------------------------------------------------------------------


def _cli_cases(d: Path) -> dict[str, Path]:
    d.mkdir(exist_ok=True)
    out = {}
    for name in ("overlap", "negative begin reads the header as weights", "duplicate name", "dtype F4", "trailing bytes"):
        p = d / f"{name.split()[0]}.safetensors"
        p.write_bytes(STRICT[name][0])
        out[name] = p
    hostile = _hostile_pickles(d / "h")
    out["bytearray"] = hostile["bytearray"]
    out["legacy storage claim"] = hostile["legacy storage claim"]
    for name in ("deep dicts", "stride-0 view of 40 GB", "TorchScript"):
        out[name] = _structured(d / "s", name)
    return out


def test_cli_one_line_exit_2(tmp_path):
    for name, path in _cli_cases(tmp_path).items():
        r = CliRunner().invoke(main, ["inspect", str(path)])
        lines = [l for l in r.stderr.splitlines() if l.strip()]
        assert r.exit_code == 2, (name, r.exit_code, r.stderr, r.stdout)
        assert len(lines) == 1 and lines[0].startswith(f"lycotools: error: {path}: "), (name, r.stderr)
        assert "Traceback" not in r.stderr and "Exception raised from" not in r.stderr


def test_cli_subprocess_overlap(tmp_path):
    """The real command, as a user runs it: before, this file printed a report and exited 0."""
    p = tmp_path / "overlap.safetensors"
    p.write_bytes(STRICT["overlap"][0])
    r = subprocess.run([sys.executable, "-m", "lycotools.cli", "inspect", str(p)], capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 2
    assert r.stderr.splitlines() == [f"lycotools: error: {p}: corrupted safetensors header: tensors 'a' and 'b' overlap in the data section"]

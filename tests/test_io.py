"""The tensor layer's containers: lazy readers, the atomic streaming writer, hashes, bad input."""

import hashlib
import json
import os
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import save, save_file

from lycotools.errors import BadInput
from lycotools.io.readers import open_source
from lycotools.io.writer import SafetensorsWriter, save_tensors


def _tensors(n=6, size=300, seed=0):
    g = torch.Generator().manual_seed(seed)
    t = {f"w{i}": torch.randn(size, size, generator=g).to(torch.float16 if i % 2 else torch.float32) for i in range(n)}
    t["alpha"] = torch.tensor(4.0)
    t["idx"] = torch.arange(5, dtype=torch.int64)
    return t


def _kohya_hashes(tensors, metadata):
    """kohya's definition (docs/cli.md#hashes): serialize with only the ss_* metadata; hash the data section
    (sshs_model_hash) and the 64 KiB at offset 1 MiB (sshs_legacy_hash)."""
    b = save(tensors, metadata={k: v for k, v in metadata.items() if k.startswith("ss_")} or None)
    n = struct.unpack("<Q", b[:8])[0]
    return hashlib.sha256(b[8 + n:]).hexdigest(), hashlib.sha256(b[0x100000:0x110000]).hexdigest()[:8]


def _data_section(path):
    b = open(path, "rb").read()
    n = struct.unpack("<Q", b[:8])[0]
    return json.loads(b[8:8 + n]), b[8 + n:]


def _direct_writes(monkeypatch, refuse: str | None = None):
    """Send every planned output through the O_DIRECT sink, in 64 KiB blocks (many block edges
    inside tensors); ``refuse`` makes the filesystem refuse O_DIRECT at "open" or at "write"."""
    from lycotools.io import writer

    monkeypatch.setattr(writer, "_DIRECT_MIN", 0)
    monkeypatch.setenv("LYCOTOOLS_DIRECT_IO", "1")  # whatever filesystem the tests run on
    monkeypatch.setattr(writer._DirectSink, "CHUNK", 64 << 10)
    real_open, real_pwrite, direct_fds = os.open, os.pwrite, set()

    def fake_open(path, flags, *a):
        if flags & getattr(os, "O_DIRECT", 0) and refuse == "open":
            raise OSError(22, "Invalid argument")
        fd = real_open(path, flags, *a)
        if flags & getattr(os, "O_DIRECT", 0):
            direct_fds.add(fd)
        return fd

    def fake_pwrite(fd, data, offset):
        if fd in direct_fds and refuse == "write":
            raise OSError(22, "Invalid argument")
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(os, "open", fake_open)
    monkeypatch.setattr(os, "pwrite", fake_pwrite)
    return direct_fds


@pytest.mark.parametrize("mode", ["planned", "spooled", "direct", "direct-refused-open", "direct-refused-write"])
def test_writer_matches_safetensors_and_kohya_hashes(tmp_path, mode, monkeypatch):
    t = _tensors()
    meta = {"ss_network_dim": "4", "modelspec.title": "x"}
    out = tmp_path / "a.safetensors"
    if mode.startswith("direct"):
        if not hasattr(os, "O_DIRECT"):
            pytest.skip("no O_DIRECT on this platform")
        fds = _direct_writes(monkeypatch, refuse=mode.split("-")[-1] if "refused" in mode else None)
        save_tensors(out, t, meta)
        assert bool(fds) == (mode != "direct-refused-open")
    elif mode == "planned":
        save_tensors(out, t, meta)
    else:
        with SafetensorsWriter(out, meta) as w:
            for k in reversed(list(t)):  # arrival order must not matter
                w.add(k, t[k])
    src = open_source(out)
    mh, lh = _kohya_hashes(t, meta)
    assert src.metadata["sshs_model_hash"] == mh
    assert src.metadata["sshs_legacy_hash"] == lh
    assert src.metadata["ss_network_dim"] == "4"
    # same tensor layout and data bytes as safetensors' own serializer
    ref = tmp_path / "ref.safetensors"
    save_file(t, str(ref), metadata=src.metadata)
    h1, d1 = _data_section(out)
    h2, d2 = _data_section(ref)
    assert d1 == d2
    h1.pop("__metadata__"), h2.pop("__metadata__")
    assert h1 == h2
    for k, v in t.items():
        assert torch.equal(src.get(k), v)
    assert sorted(os.listdir(tmp_path)) == ["a.safetensors", "ref.safetensors"]  # no temp files left


def test_direct_io_only_on_local_filesystems(tmp_path, monkeypatch):
    from lycotools.io.writer import direct_io_ok

    if not hasattr(os, "O_DIRECT"):
        assert not direct_io_ok(tmp_path)
        return
    monkeypatch.setenv("LYCOTOOLS_DIRECT_IO", "0")
    assert not direct_io_ok(tmp_path)
    monkeypatch.setenv("LYCOTOOLS_DIRECT_IO", "1")
    assert direct_io_ok(tmp_path)
    monkeypatch.delenv("LYCOTOOLS_DIRECT_IO")
    if os.path.isdir("/proc/self") and os.path.isdir("/dev/shm"):
        assert not direct_io_ok(Path("/dev/shm"))  # tmpfs: no O_DIRECT to gain
    if os.path.isdir("/proc/self"):
        assert not direct_io_ok(Path("/proc/self"))


@pytest.mark.parametrize("direct", [False, True])
def test_writer_is_atomic_and_deterministic(tmp_path, direct, monkeypatch):
    if direct and hasattr(os, "O_DIRECT"):
        _direct_writes(monkeypatch)
    t = _tensors(n=2, size=10)
    out = tmp_path / "o.safetensors"
    with pytest.raises(RuntimeError):
        with SafetensorsWriter(out, {}) as w:
            w.add("a", t["w0"])
            raise RuntimeError("interrupted")
    assert os.listdir(tmp_path) == []  # no partial output, no temp file
    save_tensors(out, t, {"a": "b"})
    first = out.read_bytes()
    save_tensors(out, t, {"a": "b"}, overwrite=True)
    assert out.read_bytes() == first


def test_writer_refuses_existing_and_input(tmp_path):
    out = tmp_path / "o.safetensors"
    save_tensors(out, {"a": torch.ones(2)})
    before = out.read_bytes()
    with pytest.raises(BadInput, match="already exists"):
        save_tensors(out, {"a": torch.zeros(2)})
    with pytest.raises(BadInput, match="overwrite an input"):
        save_tensors(out, {"a": torch.zeros(2)}, inputs=[out], overwrite=True)
    assert out.read_bytes() == before


def test_lazy_reader_reads_on_demand(tmp_path):
    p = tmp_path / "m.safetensors"
    save_file({"a": torch.ones(3, 4), "b": torch.zeros(2, dtype=torch.float16)}, str(p), metadata={"k": "v"})
    src = open_source(p)
    assert src.shape("a") == (3, 4) and src.dtype("b") == torch.float16
    assert src._fh is None  # nothing read before a tensor is asked for
    assert torch.equal(src.get("a"), torch.ones(3, 4))
    assert src.metadata == {"k": "v"}


def test_sharded_and_pickles(tmp_path):
    save_file({"a": torch.ones(2)}, str(tmp_path / "m-00001.safetensors"))
    save_file({"b": torch.zeros(3)}, str(tmp_path / "m-00002.safetensors"))
    idx = tmp_path / "m.safetensors.index.json"
    idx.write_text(json.dumps({"metadata": {}, "weight_map": {"a": "m-00001.safetensors", "b": "m-00002.safetensors"}}))
    src = open_source(idx)
    assert sorted(src.keys()) == ["a", "b"] and torch.equal(src.get("b"), torch.zeros(3))
    assert sorted(open_source(tmp_path).keys()) == ["a", "b"]  # the folder holding one index

    sd = {"model.x.weight": torch.ones(2, 2)}
    torch.save({"state_dict": sd, "global_step": 7}, tmp_path / "w.ckpt")
    src = open_source(tmp_path / "w.ckpt")
    assert src.keys() == ["model.x.weight"] and src.extras["global_step"] == 7
    torch.save(sd, tmp_path / "plain.pt")
    assert open_source(tmp_path / "plain.pt").keys() == ["model.x.weight"]


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo PWNED > " + str(_Evil.marker),))


def test_pickle_with_code_is_refused_and_never_run(tmp_path):
    _Evil.marker = tmp_path / "pwned"
    torch.save({"x": _Evil()}, tmp_path / "evil.ckpt")  # saving runs nothing
    assert not _Evil.marker.exists()
    with pytest.raises(BadInput, match="refused"):
        open_source(tmp_path / "evil.ckpt")
    assert not _Evil.marker.exists()


@pytest.mark.parametrize(
    "content, message",
    [
        (b"", "empty"),
        (b"hello", "too short"),
        (b"this is plain text, not a model at all" * 3, "implausible|truncated"),
        (struct.pack("<Q", 40) + b'{"a": 1', "truncated"),
        (struct.pack("<Q", 8) + b"not json", "not valid JSON"),
        (struct.pack("<Q", 64) + json.dumps({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}).encode().ljust(64) + b"\0" * 8,
         "more data than the file holds"),
    ],
)
def test_bad_safetensors(tmp_path, content, message):
    p = tmp_path / "bad.safetensors"
    p.write_bytes(content)
    with pytest.raises(BadInput, match=message) as e:
        open_source(p)
    assert str(p) in e.value.line()


def test_missing_and_unknown(tmp_path):
    with pytest.raises(BadInput, match="no such file"):
        open_source(tmp_path / "nope.safetensors")
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(BadInput, match="unknown file type"):
        open_source(tmp_path / "x.txt")
    (tmp_path / "junk.ckpt").write_bytes(b"\x00garbage" * 10)
    with pytest.raises(BadInput, match="not a readable torch pickle"):
        open_source(tmp_path / "junk.ckpt")


def test_prefetch_keeps_order_and_raises(tmp_path):
    from lycotools.io.readers import prefetch

    t = {f"k{i}": torch.full((3,), float(i)) for i in range(7)}
    save_file(t, str(tmp_path / "m.safetensors"))
    src = open_source(tmp_path / "m.safetensors")
    keys = sorted(t)
    got = [(k, v) for k, v in prefetch(keys, src.get)]
    assert [k for k, _ in got] == keys and all(torch.equal(v, t[k]) for k, v in got)

    def boom(k):
        if k == "k3":
            raise BadInput(tmp_path, "broken tensor")
        return src.get(k)

    seen = []
    with pytest.raises(BadInput, match="broken tensor"):
        for k, _ in prefetch(keys, boom):
            seen.append(k)
    assert seen == ["k0", "k1", "k2"]
    for k, _ in prefetch(keys, src.get, depth=1):  # leaving early stops the reader thread
        break


def test_streaming_threads_nest_and_restore():
    import gc
    import threading

    from lycotools.alloc import streaming_threads

    before, gc_before = torch.get_num_threads(), gc.isenabled()
    inside = []
    gate = threading.Barrier(2)

    def job():
        with streaming_threads():
            gate.wait()  # both streams open at once, as two batch jobs
            inside.append((torch.get_num_threads(), gc.isenabled()))
            gate.wait()

    ts = [threading.Thread(target=job) for _ in range(2)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    assert all(n == max(1, min(before, cores - 2)) and not g for n, g in inside)
    assert torch.get_num_threads() == before and gc.isenabled() == gc_before

"""Lazy readers for every container a model file comes in.

``open_source(path)`` returns a ``Source``: a read-only, lazy mapping from key to tensor. Nothing
is read until ``get`` is called. Supported:

* ``.safetensors`` (with metadata; each tensor read on demand), sharded safetensors with an ``*.index.json``;
* torch pickles (``.ckpt .pt .pth .bin``), with or without a ``state_dict`` wrapper, read with
  ``torch.load(weights_only=True)``: a pickle that would run code is refused and nothing in it runs;
* diffusers folders (``unet/ text_encoder/ text_encoder_2/ vae/``), keys prefixed by component;
* PEFT adapter folders (``adapter_model.safetensors`` + ``adapter_config.json``).
"""

from __future__ import annotations

import _compat_pickle
import functools
import io
import json
import math
import os
import pickle
import pickletools
import queue
import threading
import warnings
import zipfile
from pathlib import Path
from typing import Iterator

import torch

from ..errors import BadInput
from .paths import DIFFUSERS_COMPONENTS, PICKLE_SUFFIXES
from .threads import signals_to_main_thread
from .safetensors_format import DTYPE_NAMES, read_header

_WEIGHT_NAMES = (
    "diffusion_pytorch_model.safetensors",
    "model.safetensors",
    "diffusion_pytorch_model.safetensors.index.json",
    "model.safetensors.index.json",
    "diffusion_pytorch_model.bin",
    "pytorch_model.bin",
)


class Source:
    """A lazy, read-only tensor mapping. Subclasses fill ``_index``: key -> (loader, shape, dtype)."""

    kind = "unknown"

    def __init__(self, path: Path):
        self.path = Path(path)
        self.metadata: dict[str, str] = {}
        self.extras: dict[str, object] = {}  # non-tensor values found in pickles (names, steps, ...)
        self.config: dict | None = None  # adapter_config.json of a PEFT folder
        self._index: dict[str, tuple] = {}

    # mapping protocol
    def keys(self) -> list[str]:
        return list(self._index)

    def __contains__(self, key) -> bool:
        return key in self._index

    def __iter__(self) -> Iterator[str]:
        return iter(self._index)

    def __len__(self) -> int:
        return len(self._index)

    def shape(self, key: str) -> tuple[int, ...]:
        return self._index[key][1]

    def dtype(self, key: str) -> torch.dtype:
        return self._index[key][2]

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: v[1] for k, v in self._index.items()}

    def numel(self, key: str) -> int:
        return math.prod(self.shape(key))

    def get(self, key: str) -> torch.Tensor:
        loader = self._index[key][0]
        return loader()

    def get_many(self, keys) -> list[torch.Tensor]:
        """``[get(k) for k in keys]``; a source may read them together (each still its own tensor)."""
        return [self.get(k) for k in keys]

    def close(self):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class SafetensorsSource(Source):
    """A safetensors file; each tensor is read from disk when asked for, straight into its own buffer.

    Reading with ``readinto`` rather than keeping the file memory-mapped means the pages of tensors
    already processed do not stay in this process's resident set: streaming a whole checkpoint keeps
    peak RSS near the largest tensor, not the file size. (The header is validated first, so a broken
    file fails with one clear line before anything is read.)
    """

    kind = "safetensors"

    def __init__(self, path: Path):
        super().__init__(path)
        header, self.metadata, self._data_start = read_header(self.path)
        self._fh = None
        self._open_lock = threading.Lock()
        self._offsets: dict[str, tuple[int, int]] = {}
        offsets, index, tensor = self._offsets, self._index, self._tensor
        for name, e in header.items():  # shapes and offsets are lists of ints: read_header checked
            offsets[name] = tuple(e["data_offsets"])
            index[name] = (functools.partial(tensor, name), tuple(e["shape"]), DTYPE_NAMES[e["dtype"]])

    def _tensor(self, name):
        _, shape, dtype = self._index[name]
        begin, end = self._offsets[name]
        out = torch.empty(shape, dtype=dtype)
        if end == begin:
            return out
        self._read_into(memoryview(out.reshape(-1).view(torch.uint8).numpy()), self._data_start + begin, name)
        return out

    def _open(self) -> int:
        if self._fh is None:
            with self._open_lock:
                if self._fh is None:
                    self._fh = os.open(self.path, os.O_RDONLY)
        return self._fh

    def _read_into(self, buf: memoryview, offset: int, name: str):
        got, fh = 0, self._open()
        while got < len(buf):  # positioned reads: safe from several threads (prefetch)
            n = os.preadv(fh, [buf[got:]], offset + got)
            if not n:
                raise BadInput(self.path, f"file ended while reading tensor {name!r} (truncated?)")
            got += n

    def get_many(self, keys) -> list[torch.Tensor]:
        """The tensors of ``keys``, small neighbours read with one read: the hundreds of alphas and
        rank-1 factors of a LoRA cost one system call, not one each. Every tensor has its own buffer,
        exactly as ``get`` gives it; big tensors are read one by one, as ``get`` reads them."""
        keys = list(keys)
        out: list = [None] * len(keys)
        order = sorted(range(len(keys)), key=lambda i: self._offsets[keys[i]])
        run: list[int] = []
        for i in order:
            begin, end = self._offsets[keys[i]]
            if end - begin > _BULK_TENSOR:
                out[i] = self._tensor(keys[i])
                continue
            if run:
                first, last = self._offsets[keys[run[0]]][0], self._offsets[keys[run[-1]]][1]
                if begin - last > _BULK_GAP or end - first > _BULK_SPAN:
                    self._read_run(keys, run, out)
                    run = []
            run.append(i)
        if run:
            self._read_run(keys, run, out)
        return out

    def _read_run(self, keys: list, run: list[int], out: list):
        start = self._offsets[keys[run[0]]][0]
        stop = max(self._offsets[keys[i]][1] for i in run)
        buf = memoryview(bytearray(stop - start))
        self._read_into(buf, self._data_start + start, keys[run[0]])
        for i in run:
            _, shape, dtype = self._index[keys[i]]
            begin, end = self._offsets[keys[i]]
            if end == begin:
                out[i] = torch.empty(shape, dtype=dtype)
            else:  # a tensor over a bytearray of its own bytes: writable, shares nothing
                out[i] = torch.frombuffer(bytearray(buf[begin - start:end - start]), dtype=dtype).view(shape)

    def close(self):
        if self._fh is not None:
            os.close(self._fh)
            self._fh = None


_BULK_TENSOR = 1 << 20  # tensors above this are read alone, straight into their own buffer
_BULK_GAP = 1 << 16  # bytes of other tensors a read may pass over to join two runs
_BULK_SPAN = 1 << 24  # the most one read takes


class ShardedSource(Source):
    """Several safetensors shards joined by an index json (``weight_map``)."""

    kind = "sharded-safetensors"

    def __init__(self, index_path: Path):
        super().__init__(index_path)
        index = _read_json(index_path, "shard index")
        weight_map = index.get("weight_map")
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise BadInput(index_path, "not a valid shard index: weight_map is not a map of tensor names to shard files")
        meta = index.get("metadata") or {}
        if not isinstance(meta, dict):
            raise BadInput(index_path, "not a valid shard index: metadata is not a JSON object")
        self.metadata = {str(k): str(v) for k, v in meta.items()}
        self.shards: dict[str, Source] = {}
        for key, shard in weight_map.items():
            if shard not in self.shards:
                shard_path = _shard_path(Path(index_path), shard)
                if not shard_path.exists():
                    raise BadInput(index_path, f"shard {shard} listed in the index is missing")
                self.shards[shard] = _open_weights_file(shard_path)
            src = self.shards[shard]
            if key not in src:
                raise BadInput(Path(index_path).parent / shard, f"tensor {key!r} listed in the index is not in this shard")
            self._index[key] = (lambda s=src, k=key: s.get(k), src.shape(key), src.dtype(key))

    def close(self):
        for s in self.shards.values():
            s.close()


MAX_NESTING = 64  # dict/list levels in a pickle; state dicts nest two or three


def _read_json(path: Path, what: str) -> dict:
    """A JSON object from a small config or index file; anything else is a ``BadInput``."""
    try:
        obj = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as e:
        raise BadInput(path, f"not a valid {what}: {_first_line(str(e)) or e.__class__.__name__}") from None
    if not isinstance(obj, dict):
        raise BadInput(path, f"not a valid {what}: not a JSON object")
    return obj


def _shard_path(index_path: Path, shard: str) -> Path:
    """The file a shard index names, which must lie in the index's own folder or below it: an
    index saying ``../../etc/passwd`` or ``/abs/path`` is not read. Checked on the name, not the
    resolved path, so folders of symlinks (the Hugging Face cache) keep working."""
    parts = shard.replace("\\", "/").split("/")
    if not shard or shard.startswith("/") or ":" in parts[0] or any(p in ("", ".", "..") for p in parts):
        raise BadInput(index_path, f"shard {shard!r} listed in the index is not a file name inside the index's folder")
    if shard.endswith(".index.json") or Path(shard).suffix not in PICKLE_SUFFIXES | {".safetensors"}:
        raise BadInput(index_path, f"shard {shard!r} listed in the index is not a .safetensors or torch file")
    return index_path.parent / shard


def _flatten(obj, path: Path, size: int) -> tuple[dict, dict]:
    """(tensors, extras) of a loaded pickle, keys joined with ``.``.

    Walked with a bounded stack, not recursion: a pickle can nest thousands of levels, refer to
    itself, or share one sub-dict under many keys (each sharing doubling the keys to make), so
    the depth and the total length of the keys made are both bounded.
    """
    tensors: dict[str, torch.Tensor] = {}
    extras: dict[str, object] = {}
    budget = size + (1 << 20)  # characters of keys: far more than any real checkpoint has
    todo = [(obj, "", 0)]
    while todo:
        node, prefix, depth = todo.pop()
        if isinstance(node, torch.Tensor):
            tensors[prefix.rstrip(".")] = node
            continue
        if isinstance(node, dict):
            items = list(node.items())
        elif isinstance(node, (list, tuple)) and node and all(isinstance(x, (torch.Tensor, dict)) for x in node):
            items = list(enumerate(node))
        else:
            if _nested_deeper(node, MAX_NESTING - depth):
                raise BadInput(path, f"not a model: the pickle nests more than {MAX_NESTING} levels deep")
            extras[prefix.rstrip(".")] = node
            continue
        if depth >= MAX_NESTING:
            raise BadInput(path, f"not a model: the pickle nests more than {MAX_NESTING} levels deep")
        for k, v in reversed(items):
            key = f"{prefix}{_key_text(path, k)}."
            budget -= len(key)
            if budget < 0:
                raise BadInput(path, "not a model: the pickle's keys are far longer than the file (shared sub-dicts?)")
            todo.append((v, key, depth + 1))
    return tensors, extras


def _key_text(path: Path, k) -> str:
    """A dict key as text: a string, or an integer of sane size (str() of a 5000-digit one raises)."""
    if isinstance(k, str):
        return k
    if type(k) is int and abs(k) < 10**18:
        return str(k)
    raise BadInput(path, f"not a model: a key of type {type(k).__name__} in the pickle")


def _nested_deeper(obj, limit: int) -> bool:
    """Whether a plain value nests containers more than ``limit`` levels deep (or in a cycle)."""
    if not isinstance(obj, (list, tuple, dict, set, frozenset)):
        return False
    if limit <= 0:
        return True
    return any(_nested_deeper(v, limit - 1) for v in (obj.values() if isinstance(obj, dict) else obj))


def _check_tensor(path: Path, key: str, t: torch.Tensor, size: int):
    """Tensors lycotools can use: dense, in memory, no bigger than the file. A pickle can also
    rebuild sparse, quantized or meta tensors, or views that repeat a few bytes (stride 0) into
    terabytes that the first ``.float()`` would allocate."""
    key = key if len(key) <= 80 else key[:77] + "..."
    if t.layout != torch.strided or t.is_quantized or t.is_nested or t.device.type != "cpu":
        kind = "quantized" if t.is_quantized else "nested" if t.is_nested else str(t.layout).removeprefix("torch.")
        raise BadInput(path, f"tensor {key!r} is a {kind if t.device.type == 'cpu' else t.device.type} tensor, which lycotools cannot read")
    if t.numel() * t.element_size() > size:
        raise BadInput(path, f"not a model: tensor {key!r} of shape {tuple(t.shape)} is larger than the whole file")


class PickleSource(Source):
    """A torch pickle read with ``weights_only=True``: code in the pickle is refused, never run."""

    kind = "pickle"

    def __init__(self, path: Path):
        super().__init__(path)
        size = self.path.stat().st_size
        obj = _safe_torch_load(self.path)
        if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
            for k, v in obj.items():
                if k != "state_dict" and not isinstance(v, (dict, torch.Tensor)):
                    if _nested_deeper(v, MAX_NESTING):
                        raise BadInput(path, f"not a model: the pickle nests more than {MAX_NESTING} levels deep")
                    self.extras[_key_text(self.path, k)] = v
            obj = obj["state_dict"]
        if isinstance(obj, torch.Tensor):
            obj = {"": obj}
        if not isinstance(obj, dict):
            raise BadInput(path, f"not a model: the pickle holds a {type(obj).__name__}, not a dict of tensors")
        tensors, extras = _flatten(obj, self.path, size)
        self.extras.update(extras)
        for k, t in tensors.items():
            _check_tensor(self.path, k, t, size)
            self._index[k] = (lambda t=t: t, tuple(t.shape), t.dtype)


def _safe_torch_load(path: Path):
    """``torch.load(weights_only=True)``, after a scan that bounds what the pickle may allocate.

    Not memory-mapped: a mapped file that is truncated or replaced while in use kills the process
    with SIGBUS; read, it gives an error naming the file. torch's warnings (pickle protocol,
    TypedStorage deprecation) are about torch, not the user's file, and are not shown.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _check_pickle(path)
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=False)
        except pickle.UnpicklingError as e:
            msg = str(e)
            code_lines = [ln.strip() for ln in msg.splitlines() if "Unsupported global" in ln or "GLOBAL" in ln]
            if code_lines:
                raise BadInput(
                    path,
                    f"refused: this pickle would import or run code, which lycotools never executes "
                    f"({_first_line(code_lines[0]).rstrip('.')})",
                    hint="convert it with a trusted tool, or ask its author for a .safetensors file",
                ) from e
            detail = next((ln.strip() for ln in msg.splitlines() if ln.strip().startswith("Unsupported")), "")
            raise BadInput(path, f"not a readable torch pickle (corrupted{': ' + _first_line(detail) if detail else ''})") from e
        except MemoryError:
            raise
        except Exception as e:  # whatever torch raises on a malformed file: never a traceback
            raise BadInput(path, f"not a readable torch pickle ({_first_line(str(e)) or e.__class__.__name__})") from e


def _first_line(text: str) -> str:
    """torch's messages run on with hints and C++ backtraces: keep the first line, cut short."""
    line = (text.strip().splitlines() or [""])[0].strip()
    return line if len(line) <= 200 else line[:197] + "..."


def _check_pickle(path: Path):
    """Refuse a pickle whose claims exceed its file before torch acts on them.

    ``weights_only`` stops code, not sizes: a storage's record says how many bytes to allocate, and
    the allowed ``bytearray``, storage and tensor constructors take any size; ``_codecs.encode`` or
    ``set`` applied again and again to one shared big argument multiply it. The pickle is run first
    with every global replaced by a stand-in (``_Scan``) that only records what would be asked for.
    """
    size = path.stat().st_size
    try:
        calls = _scan_zip(path, size) if zipfile.is_zipfile(path) else _scan_legacy(path, size)
    except BadInput:
        raise
    except MemoryError:
        raise BadInput(path, "not a readable torch pickle (it claims more memory than the file could fill)") from None
    except Exception as e:  # the scan's own parse errors: torch would fail too
        raise BadInput(path, f"not a readable torch pickle ({_first_line(str(e)) or e.__class__.__name__})") from e
    asked = 0
    for name, args in calls:
        if name in _UNREADABLE:
            raise BadInput(path, f"the pickle holds {_UNREADABLE[name]}, which lycotools cannot read")
        asked += _call_cost(name, args)
        if asked > 2 * size + (1 << 20):
            raise BadInput(path, f"corrupted torch pickle: it asks for far more memory than the file holds ({name})")


# Rebuild functions torch allows whose tensors lycotools cannot use, and which allocate or copy
# whatever the pickle says (so they are refused before torch runs them).
_UNREADABLE = {
    "torch._utils._rebuild_qtensor": "quantized tensors",
    "torch._utils._rebuild_device_tensor_from_cpu_tensor": "tensors of a device other than the CPU",
    "torch._utils._rebuild_device_tensor_from_numpy": "tensors of a device other than the CPU",
}


def _call_cost(name: str, args: tuple) -> int:
    """Bytes a call can allocate, as far as its arguments say: sized arguments count their
    length; for a constructor taking sizes (``bytearray``, storages, tensors), the product of its
    integer arguments, at up to 16 bytes an element."""
    cost = sum(len(a) for a in args if isinstance(a, (str, bytes, list, tuple, dict, set)))
    short = name.rsplit(".", 1)[-1]
    if short in ("bytearray", "UntypedStorage") or short.endswith(("Storage", "Tensor")):
        n = 1
        for i in _ints(args, 4):
            n *= max(i, 0)
        cost += n * (1 if short in ("bytearray", "UntypedStorage") else 16)
    return cost


def _ints(obj, depth: int):
    """The integers in an argument list, through tuples, lists and stand-ins (``torch.Size(...)``)."""
    if isinstance(obj, bool):
        return
    if isinstance(obj, int):
        yield obj
    elif depth and isinstance(obj, (tuple, list, _Made)):
        for x in (obj.args if isinstance(obj, _Made) else obj):
            yield from _ints(x, depth - 1)


class _Made:
    """What a call to a stand-in returns: accepts whatever the pickle then does to an object."""

    def __init__(self, args=()):
        self.args = args

    def __setitem__(self, k, v):
        pass

    def __setstate__(self, state):
        pass

    def append(self, x):
        pass

    def extend(self, xs):
        pass

    def add(self, x):
        pass


class _Global:
    """Stand-in for a global a pickle names: calling it (REDUCE, NEWOBJ) records the call."""

    pickled_name = ""
    calls: list = []

    def __new__(cls, *args, **kwargs):
        cls.calls.append((cls.pickled_name, args + tuple(kwargs.values())))
        if cls.pickled_name == "torch._tensor._rebuild_from_type_v2" and len(args) >= 3:
            func, fargs = args[0], args[2]  # torch calls func(*args) for it
            if isinstance(func, type) and issubclass(func, _Global) and isinstance(fargs, tuple):
                func(*fargs)
        return _Made(args)


class _Scan(pickle.Unpickler):
    """Runs a pickle's opcodes with every global a ``_Global`` stand-in: nothing is imported or
    called; the storages it would load (persistent ids) and the calls it would make are kept."""

    def __init__(self, data: bytes):
        super().__init__(io.BytesIO(data), encoding="bytes")
        self.calls: list = []
        self.storages: list = []

    def find_class(self, module, name):
        if (module, name) in _compat_pickle.NAME_MAPPING:  # python 2 names, as torch maps them
            module, name = _compat_pickle.NAME_MAPPING[(module, name)]
        module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        return type("_Global", (_Global,), {"pickled_name": f"{module}.{name}", "calls": self.calls})

    def persistent_load(self, pid):
        self.storages.append(pid)
        return _Made()


def _storage_claim(pid) -> tuple[str, int] | None:
    """(key, bytes) of a storage persistent id ``('storage', type, key, location, numel, ...)``."""
    if not isinstance(pid, tuple) or len(pid) < 5 or pid[0] not in ("storage", b"storage"):
        return None
    stype, key, numel = pid[1], pid[2], pid[4]
    if isinstance(key, bytes):
        key = key.decode("ascii", "replace")
    if not (isinstance(stype, type) and issubclass(stype, _Global)) or type(numel) is not int or numel < 0:
        raise ValueError(f"storage {key!r} is described wrongly")
    module, _, short = stype.pickled_name.rpartition(".")
    if short == "UntypedStorage":
        return str(key), numel
    dtype = getattr(torch, short, None) if module == "torch" and short.endswith("Storage") else None
    dtype = getattr(dtype, "dtype", None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"storage {key!r} has unknown type {stype.pickled_name}")
    return str(key), numel * dtype.itemsize


def _run_scan(data: bytes) -> _Scan:
    """Scan one pickle already read into memory (so no length it claims can make a read allocate)."""
    for _ in pickletools.genops(data):  # validates every opcode and length before anything runs
        pass
    scan = _Scan(data)
    scan.value = scan.load()
    return scan


def _scan_zip(path: Path, size: int) -> list:
    """Scan a zip-format torch file's ``data.pkl``; each storage must fit its own record."""
    with zipfile.ZipFile(path) as z:
        infos = z.infolist()
        if not infos or "/" not in infos[0].filename:
            raise ValueError("not a torch zip archive")
        prefix = infos[0].filename.split("/", 1)[0] + "/"
        records = {}
        for info in infos:
            if info.file_size > size:
                raise BadInput(path, f"corrupted torch pickle: record {info.filename} unpacks to more than the file's size")
            if info.filename in records:
                raise BadInput(path, f"corrupted torch pickle: record {info.filename} appears twice")
            records[info.filename] = info.file_size
        if prefix + "constants.pkl" in records or any(n.startswith(prefix + "code/") for n in records):
            raise BadInput(path, "a TorchScript archive, not a checkpoint: lycotools does not run TorchScript",
                           hint="save the model's state_dict() with torch.save, or as .safetensors")
        if prefix + "data.pkl" not in records:
            raise ValueError("no data.pkl in the archive")
        scan = _run_scan(z.read(prefix + "data.pkl"))
    for key, nbytes in filter(None, map(_storage_claim, scan.storages)):
        have = records.get(f"{prefix}data/{key}")
        if have is None:
            raise BadInput(path, f"corrupted torch pickle: storage {key!r} has no record in the archive")
        if nbytes > have:
            raise BadInput(path, f"corrupted torch pickle: storage {key!r} claims {nbytes} bytes but its record holds {have}")
    return scan.calls


def _scan_legacy(path: Path, size: int) -> list:
    """Scan a legacy (non-zip) torch file: its magic number, protocol, system info and main
    pickles. Storages are read from after them, so together they cannot be larger than the file."""
    calls, claims = [], {}
    with open(path, "rb") as f:
        for i in range(4):
            start = f.tell()
            for _ in pickletools.genops(_Bounded(f, size)):
                pass
            end = f.tell()
            f.seek(start)
            scan = _run_scan(f.read(end - start))
            if i == 0 and scan.value != torch.serialization.MAGIC_NUMBER:
                raise BadInput(path, "not a torch file: it does not start with torch's magic number")
            calls += scan.calls
            claims.update(filter(None, map(_storage_claim, scan.storages)))
    if sum(claims.values()) > size:
        raise BadInput(path, f"corrupted torch pickle: its storages claim {sum(claims.values())} bytes, more than the file's {size}")
    return calls


class _Bounded:
    """A file whose reads never ask for more than is left in it: a pickle's length fields can
    claim gigabytes, and a buffered ``read(n)`` allocates ``n`` bytes before it finds out."""

    def __init__(self, f, size: int):
        self.f, self.size = f, size

    def read(self, n: int = -1) -> bytes:
        left = max(self.size - self.f.tell(), 0)
        return self.f.read(left if n < 0 else min(n, left))

    def readline(self) -> bytes:
        return self.f.readline(max(self.size - self.f.tell(), 0))

    def tell(self) -> int:
        return self.f.tell()


def _scheduler_prediction(path: Path) -> str | None:
    """"v" or "eps" from a diffusers scheduler config's ``prediction_type``; None if absent or unreadable."""
    try:
        kind = json.loads(path.read_text()).get("prediction_type")
    except (OSError, ValueError, AttributeError, RecursionError):
        return None
    if not isinstance(kind, str):
        return None
    return {"v_prediction": "v", "epsilon": "eps"}.get(kind)


class DiffusersFolderSource(Source):
    """A diffusers pipeline folder; keys are ``<component>.<key within the component>``.

    CLIP text-encoder keys are given in the ``text_model.``-level form whatever transformers version
    wrote them (transformers 5's ``CLIPTextModel`` drops that level on disk).
    """

    kind = "diffusers"

    def __init__(self, path: Path):
        super().__init__(path)
        self.parts: dict[str, Source] = {}
        self.configs: dict[str, dict] = {}
        for comp in DIFFUSERS_COMPONENTS:
            folder = self.path / comp
            if not folder.is_dir():
                continue
            weights = _component_weights(folder)
            if weights is None:
                continue
            src = _open_weights_file(weights)
            self.parts[comp] = src
            cfg = folder / "config.json"
            if cfg.exists():
                self.configs[comp] = _read_json(cfg, "diffusers config")
            add_level = comp.startswith("text_encoder") and not any(k.startswith("text_model.") for k in src.keys())
            for k in src.keys():
                canon = k
                if add_level and not k.startswith("text_projection"):
                    canon = "text_model." + k
                self._index[f"{comp}.{canon}"] = (lambda s=src, k=k: s.get(k), src.shape(k), src.dtype(k))
        if not self.parts:
            raise BadInput(path, "folder holds no diffusers components (unet/, text_encoder/, vae/ with weights)")
        mi = self.path / "model_index.json"
        if mi.exists():
            try:
                self.metadata = {"model_index": mi.read_text(errors="replace")}
            except OSError as e:
                raise BadInput(mi, f"cannot read: {e.strerror or e}") from None
        self.prediction = _scheduler_prediction(self.path / "scheduler" / "scheduler_config.json")

    def close(self):
        for s in self.parts.values():
            s.close()


class PeftFolderSource(Source):
    """A PEFT adapter folder: ``adapter_model.safetensors``/``.bin`` and ``adapter_config.json``."""

    kind = "peft"

    def __init__(self, path: Path):
        super().__init__(path)
        self.config = _read_json(self.path / "adapter_config.json", "PEFT adapter config")
        for name in ("adapter_model.safetensors", "adapter_model.bin"):
            if (self.path / name).exists():
                self.inner = _open_weights_file(self.path / name)
                break
        else:
            raise BadInput(path, "PEFT folder has adapter_config.json but no adapter_model.safetensors or .bin")
        self.metadata = dict(self.inner.metadata)
        self._index = dict(self.inner._index)

    def get_many(self, keys) -> list[torch.Tensor]:
        return self.inner.get_many(keys)

    def close(self):
        self.inner.close()


def prefetch(keys, get, depth: int = 2):
    """Yield ``(key, get(key))`` in order while a thread reads up to ``depth`` tensors ahead, so disk
    reads overlap the caller's math. ``get`` must be safe to call from another thread (the readers'
    ``get`` is: safetensors tensors are read with positioned reads)."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    done = object()

    def work():
        signals_to_main_thread()
        try:
            for k in keys:
                if stop.is_set():
                    return
                q.put((k, get(k)))
            q.put(done)
        except BaseException as e:  # handed to the consumer, raised there
            q.put(e)

    t = threading.Thread(target=work, name="lycotools-prefetch", daemon=True)
    t.start()
    try:
        while True:
            item = q.get()
            if item is done:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        while t.is_alive():  # unblock a producer waiting on a full queue
            try:
                q.get(timeout=0.05)
            except queue.Empty:
                pass


def diffusers_model_weights(path: Path, class_name: str, subfolder: str,
                            weights: str = "diffusion_pytorch_model.safetensors") -> Path | None:
    """The weights file of a single diffusers model folder (``config.json`` whose ``_class_name``
    contains ``class_name``), given the folder itself or a pipeline holding it in ``subfolder``."""
    for d in (path, path / subfolder):
        if (d / "config.json").exists() and (d / weights).exists():
            try:
                cfg = json.loads((d / "config.json").read_text())
            except (ValueError, RecursionError):
                continue
            if isinstance(cfg, dict) and class_name in str(cfg.get("_class_name", "")):
                return d / weights
    return None


def _component_weights(folder: Path) -> Path | None:
    for name in _WEIGHT_NAMES:
        if (folder / name).exists():
            return folder / name
    found = sorted(folder.glob("*.safetensors"))
    return found[0] if len(found) == 1 else None


def _open_weights_file(path: Path) -> Source:
    name = path.name
    if name.endswith(".index.json"):
        return ShardedSource(path)
    if path.suffix == ".safetensors":
        return SafetensorsSource(path)
    if path.suffix in PICKLE_SUFFIXES:
        return PickleSource(path)
    raise BadInput(path, f"unknown file type {path.suffix or '(no extension)'}: expected .safetensors, .ckpt, .pt, .pth or .bin")


def open_source(path) -> Source:
    """Open any supported model file or folder lazily; raise ``BadInput`` with a clear message."""
    path = Path(path)
    if not path.exists():
        raise BadInput(path, "no such file or folder")
    if path.is_dir():
        if (path / "adapter_config.json").exists():
            return PeftFolderSource(path)
        if (path / "model_index.json").exists() or any((path / c).is_dir() for c in DIFFUSERS_COMPONENTS):
            return DiffusersFolderSource(path)
        indexes = sorted(path.glob("*.safetensors.index.json"))
        if len(indexes) == 1:
            return ShardedSource(indexes[0])
        raise BadInput(path, "folder is neither a diffusers model, a PEFT adapter nor a sharded checkpoint")
    if path.stat().st_size == 0:
        raise BadInput(path, "file is empty")
    return _open_weights_file(path)

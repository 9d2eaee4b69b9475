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

import json
import os
import pickle
import queue
import threading
import zipfile
from pathlib import Path
from typing import Iterator

import torch

from ..errors import BadInput
from .safetensors_format import DTYPE_NAMES, read_header

PICKLE_SUFFIXES = {".ckpt", ".pt", ".pth", ".bin"}
DIFFUSERS_COMPONENTS = ("unet", "text_encoder", "text_encoder_2", "vae")
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
        n = 1
        for s in self.shape(key):
            n *= s
        return n

    def get(self, key: str) -> torch.Tensor:
        loader = self._index[key][0]
        return loader()

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
        for name, e in header.items():
            self._offsets[name] = tuple(e["data_offsets"])
            self._index[name] = (lambda n=name: self._tensor(n), tuple(int(s) for s in e["shape"]), DTYPE_NAMES[e["dtype"]])

    def _tensor(self, name):
        _, shape, dtype = self._index[name]
        begin, end = self._offsets[name]
        out = torch.empty(shape, dtype=dtype)
        if end == begin:
            return out
        if self._fh is None:
            with self._open_lock:
                if self._fh is None:
                    self._fh = os.open(self.path, os.O_RDONLY)
        buf = memoryview(out.reshape(-1).view(torch.uint8).numpy())
        got, offset = 0, self._data_start + begin
        while got < end - begin:  # positioned reads: safe from several threads (prefetch)
            n = os.preadv(self._fh, [buf[got:]], offset + got)
            if not n:
                raise BadInput(self.path, f"file ended while reading tensor {name!r} (truncated?)")
            got += n
        return out

    def close(self):
        if self._fh is not None:
            os.close(self._fh)
            self._fh = None


class ShardedSource(Source):
    """Several safetensors shards joined by an index json (``weight_map``)."""

    kind = "sharded-safetensors"

    def __init__(self, index_path: Path, key_prefix: str = ""):
        super().__init__(index_path)
        try:
            index = json.loads(Path(index_path).read_text())
            weight_map = index["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise BadInput(index_path, f"not a valid shard index: {e}") from e
        self.metadata = {str(k): str(v) for k, v in (index.get("metadata") or {}).items()}
        self.shards: dict[str, Source] = {}
        for key, shard in weight_map.items():
            if shard not in self.shards:
                shard_path = Path(index_path).parent / shard
                if not shard_path.exists():
                    raise BadInput(index_path, f"shard {shard} listed in the index is missing")
                self.shards[shard] = _open_weights_file(shard_path)
            src = self.shards[shard]
            if key not in src:
                raise BadInput(shard_path, f"tensor {key!r} listed in the index is not in this shard")
            self._index[key_prefix + key] = (lambda s=src, k=key: s.get(k), src.shape(key), src.dtype(key))

    def close(self):
        for s in self.shards.values():
            s.close()


def _flatten(obj, prefix: str, tensors: dict, extras: dict):
    if isinstance(obj, torch.Tensor):
        tensors[prefix.rstrip(".")] = obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            _flatten(v, f"{prefix}{k}.", tensors, extras)
    elif isinstance(obj, (list, tuple)) and obj and all(isinstance(x, (torch.Tensor, dict)) for x in obj):
        for i, v in enumerate(obj):
            _flatten(v, f"{prefix}{i}.", tensors, extras)
    else:
        extras[prefix.rstrip(".")] = obj


class PickleSource(Source):
    """A torch pickle read with ``weights_only=True``: code in the pickle is refused, never run."""

    kind = "pickle"

    def __init__(self, path: Path):
        super().__init__(path)
        obj = _safe_torch_load(self.path)
        if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
            for k, v in obj.items():
                if k != "state_dict" and not isinstance(v, (dict, torch.Tensor)):
                    self.extras[str(k)] = v
            obj = obj["state_dict"]
        if isinstance(obj, torch.Tensor):
            obj = {"": obj}
        if not isinstance(obj, dict):
            raise BadInput(path, f"not a model: the pickle holds a {type(obj).__name__}, not a dict of tensors")
        tensors: dict[str, torch.Tensor] = {}
        _flatten(obj, "", tensors, self.extras)
        for k, t in tensors.items():
            self._index[k] = (lambda t=t: t, tuple(t.shape), t.dtype)


def _safe_torch_load(path: Path):
    try:
        is_zip = zipfile.is_zipfile(path)
        return torch.load(path, map_location="cpu", weights_only=True, mmap=is_zip)
    except pickle.UnpicklingError as e:
        msg = str(e)
        code_lines = [ln.strip() for ln in msg.splitlines() if "Unsupported global" in ln or "GLOBAL" in ln]
        if code_lines:
            raise BadInput(
                path,
                f"refused: this pickle would import or run code, which lycotools never executes "
                f"({code_lines[0].rstrip('.')})",
                hint="convert it with a trusted tool, or ask its author for a .safetensors file",
            ) from e
        detail = next((ln.strip() for ln in msg.splitlines() if ln.strip().startswith("Unsupported")), "")
        raise BadInput(path, f"not a readable torch pickle (corrupted{': ' + detail if detail else ''})") from e
    except (RuntimeError, EOFError, ValueError, OSError, zipfile.BadZipFile) as e:
        first = (str(e).splitlines() or [e.__class__.__name__])[0]
        raise BadInput(path, f"not a readable torch pickle ({first})") from e


def _scheduler_prediction(path: Path) -> str | None:
    """"v" or "eps" from a diffusers scheduler config's ``prediction_type``; None if absent or unreadable."""
    try:
        kind = json.loads(path.read_text()).get("prediction_type")
    except (OSError, ValueError, AttributeError):
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
                try:
                    self.configs[comp] = json.loads(cfg.read_text())
                except ValueError as e:
                    raise BadInput(cfg, f"not valid JSON: {e}") from e
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
            self.metadata = {"model_index": mi.read_text()}
        self.prediction = _scheduler_prediction(self.path / "scheduler" / "scheduler_config.json")

    def close(self):
        for s in self.parts.values():
            s.close()


class PeftFolderSource(Source):
    """A PEFT adapter folder: ``adapter_model.safetensors``/``.bin`` and ``adapter_config.json``."""

    kind = "peft"

    def __init__(self, path: Path):
        super().__init__(path)
        cfg = self.path / "adapter_config.json"
        try:
            self.config = json.loads(cfg.read_text())
        except (OSError, ValueError) as e:
            raise BadInput(cfg, f"cannot read the PEFT adapter config: {e}") from e
        for name in ("adapter_model.safetensors", "adapter_model.bin"):
            if (self.path / name).exists():
                self.inner = _open_weights_file(self.path / name)
                break
        else:
            raise BadInput(path, "PEFT folder has adapter_config.json but no adapter_model.safetensors or .bin")
        self.metadata = dict(self.inner.metadata)
        self._index = dict(self.inner._index)

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
            except ValueError:
                continue
            if class_name in str(cfg.get("_class_name", "")):
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


def is_model_path(path: Path) -> bool:
    """Whether a path looks like something ``open_source`` reads (used when walking folders)."""
    path = Path(path)
    if path.is_dir():
        return (path / "adapter_config.json").exists() or (path / "model_index.json").exists() or any(
            (path / c).is_dir() for c in DIFFUSERS_COMPONENTS
        )
    return path.suffix in PICKLE_SUFFIXES | {".safetensors"} or path.name.endswith(".index.json")


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

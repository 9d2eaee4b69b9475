"""One view over a checkpoint in any layout: weights by (component, diffusers key), read lazily.

A single-file checkpoint and a diffusers folder of the same model give the same view, so commands
can pair a base and a tuned model in different layouts, or write either layout.
"""

from __future__ import annotations

import torch

from ..errors import BadInput
from ..io.readers import Source, open_source
from . import checkpoint as ckpt


class CheckpointView:
    def __init__(self, source: Source):
        self.source = source
        shapes = source.shapes()
        self.info = ckpt.detect_source(source)
        if self.info.arch == "unknown":
            raise BadInput(source.path, "not a Stable Diffusion checkpoint lycotools recognises (SD1.x, SD2.x, SDXL)")
        self.arch = self.info.arch
        self.layout = self.info.layout
        self._entries: dict[tuple[str, str], tuple] = {}  # (comp, dkey) -> (source key, mapping or None)
        self._cache: tuple[str, torch.Tensor] | None = None
        if self.layout == "diffusers":
            self.keymap = None
            for key in source.keys():
                comp, _, dkey = key.partition(".")
                self._entries[(comp, dkey)] = (key, None, shapes[key])
        else:
            self.keymap = ckpt.CheckpointKeyMap.from_single_file(shapes, self.arch)
            for m in self.keymap.mappings:
                t = torch.empty(shapes[m.single_key], device="meta")
                shp = tuple(ckpt.single_to_diffusers_tensor(m, t).shape)
                self._entries[(m.component, m.diffusers_key)] = (m.single_key, m, shp)

    @classmethod
    def open(cls, path) -> "CheckpointView":
        return cls(open_source(path))

    @property
    def path(self):
        return self.source.path

    def keys(self) -> list[tuple[str, str]]:
        return list(self._entries)

    def components(self) -> list[str]:
        return sorted({c for c, _ in self._entries})

    def __contains__(self, ck) -> bool:
        return ck in self._entries

    def shape(self, comp: str, dkey: str) -> tuple:
        return self._entries[(comp, dkey)][2]

    def dtype(self, comp: str, dkey: str) -> torch.dtype:
        return self.source.dtype(self._entries[(comp, dkey)][0])

    def source_key(self, comp: str, dkey: str) -> str:
        return self._entries[(comp, dkey)][0]

    def get(self, comp: str, dkey: str) -> torch.Tensor:
        skey, mapping, _ = self._entries[(comp, dkey)]
        if mapping is None:
            return self.source.get(skey)
        if self._cache is not None and self._cache[0] == skey:
            raw = self._cache[1]
        else:
            raw = self.source.get(skey)
            if mapping.transform is not None and mapping.transform != "squeeze":
                self._cache = (skey, raw)  # in_proj chunks: read once for q, k and v
        return ckpt.single_to_diffusers_tensor(mapping, raw)

    def single_map(self):
        """The single-file key map of this model (derived from diffusers names for a folder)."""
        if self.keymap is None:
            comp_shapes: dict[str, dict] = {}
            for (comp, dkey), (_, _, shp) in self._entries.items():
                comp_shapes.setdefault(comp, {})[dkey] = shp
            self.keymap = ckpt.CheckpointKeyMap.for_diffusers(comp_shapes, self.arch)
        return self.keymap

    def ldm_module(self, comp: str, module: str) -> str | None:
        """The ldm/sgm module path (no ``model.diffusion_model.`` prefix) of a UNet module."""
        m = self.single_map().to_single(comp, module + ".weight")
        if m is None:
            return None
        key = m.single_key[: -len(".weight")]
        return key[len(ckpt.UNET_PREFIX):] if key.startswith(ckpt.UNET_PREFIX) else key

    def close(self):
        self.source.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class SingleFileSource(Source):
    """A diffusers folder read as the single-file checkpoint it converts to: ldm/sgm keys and
    tensors (OpenCLIP q/k/v concatenated back into ``in_proj``), built lazily one key at a time.
    ``dropped`` lists the folder's keys that have no single-file place."""

    kind = "diffusers-as-single-file"

    def __init__(self, view: CheckpointView):
        super().__init__(view.path)
        self.view = view
        self.metadata = dict(view.source.metadata)
        self.prediction = view.info.prediction  # from the folder's scheduler config
        km = view.single_map()
        groups: dict[str, list] = {}
        for m in km.mappings:
            groups.setdefault(m.single_key, []).append(m)
        mapped = {(m.component, m.diffusers_key) for m in km.mappings}
        self.dropped = [f"{c}.{k}" for c, k in view.keys() if (c, k) not in mapped]
        for key, maps in groups.items():
            shape = tuple(km.single_shapes[key])
            dtype = view.dtype(maps[0].component, maps[0].diffusers_key)
            self._index[key] = (lambda maps=maps, nd=len(shape): self._build(maps, nd), shape, dtype)

    def _build(self, maps, ndim: int) -> torch.Tensor:
        view = self.view
        if len(maps) == 1 and not isinstance(maps[0].transform, tuple):
            m = maps[0]
            return ckpt.diffusers_to_single_tensor(m, view.get(m.component, m.diffusers_key), ndim)
        parts = sorted(maps, key=lambda m: m.transform[1])
        return torch.cat([view.get(m.component, m.diffusers_key) for m in parts], dim=0)

    def close(self):
        self.view.close()

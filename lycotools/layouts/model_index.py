"""Which checkpoint weight each adapter module changes.

A ``ModelIndex`` lists a model's modules (diffusers names, per component) with their weight
shapes, the kohya flat form of every name (diffusers-named and ldm/sgm-named UNet modules both),
and, where the model came from a single file, the single-file key of every weight. It is built
from a real checkpoint (any layout) or from the template of a standard architecture, and
``resolve`` maps an adapter ``ModuleId`` to a ``Target``, or to ``None``: the caller reports it.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch

from . import checkpoint as ckpt
from .adapter_keys import ModuleId, flatten_path

TEXT_ENCODERS = ("text_encoder", "text_encoder_2")


def unflatten_conv_shape(shape, layer_shape) -> tuple | None:
    """The conv weight shape ``(out, in, kh, kw)`` that a flattened conv ΔW ``(out, in·kh·kw)`` stands for,
    with the kernel of ``layer_shape`` (the model's layer, or the standard model's); None when ``shape`` is
    not 2-D, the layer is not a conv, or the kernel does not divide.

    LyCORIS stores LoHa, and LoKr with a decomposed ``w2`` (``lokr_w2_b`` of shape (r, in·k·k), the 2023
    layout), flattened for convs; so do LoRA files with 2-D factors on 1x1 convs. The output channels come
    from ``shape``, so a model of another width still gets its own ``in``."""
    shape, layer_shape = tuple(int(s) for s in shape), tuple(int(s) for s in layer_shape)
    if len(shape) != 2 or len(layer_shape) < 3:
        return None
    kk = 1
    for k in layer_shape[2:]:
        kk *= k
    if shape[1] % kk:
        return None
    return (shape[0], shape[1] // kk, *layer_shape[2:])


def shape_matches(shape, layer_shape) -> bool:
    """Whether a ΔW of ``shape`` (as the adapter's factors give it) is exactly a weight of ``layer_shape``:
    the same shape, or the flattened conv layout of it (``unflatten_conv_shape``)."""
    shape, layer_shape = tuple(int(s) for s in shape), tuple(int(s) for s in layer_shape)
    return shape == layer_shape or unflatten_conv_shape(shape, layer_shape) == layer_shape


@dataclass(frozen=True)
class Target:
    component: str
    module: str  # diffusers module path within the component
    shape: tuple  # weight shape
    has_bias: bool = False

    @property
    def weight_key(self) -> str:
        return f"{self.component}.{self.module}.weight"


@dataclass
class ModelIndex:
    arch: str
    modules: dict[str, dict[str, tuple]] = field(default_factory=dict)  # comp -> module path -> weight shape
    biases: dict[str, set] = field(default_factory=dict)  # comp -> module paths that have a bias
    flat: dict[str, dict[str, str]] = field(default_factory=dict)  # comp -> flat name -> module path
    ldm: dict[str, dict[str, str]] = field(default_factory=dict)  # comp -> ldm dotted module path -> module path
    keymap: object = None  # CheckpointKeyMap when known
    # ModuleId -> Target | None, for the shared, never-changed standard templates only (None: no memo)
    _memo: dict | None = field(default=None, repr=False, compare=False)

    # ---- construction --------------------------------------------------------------------------
    @classmethod
    def from_component_shapes(cls, arch: str, comp_shapes: dict[str, dict[str, tuple]], keymap=None) -> "ModelIndex":
        idx = cls(arch=arch, keymap=keymap)
        for comp, shapes in comp_shapes.items():
            mods, flat, biases = {}, {}, set()
            for key, shape in shapes.items():
                if key.endswith(".weight"):
                    path = key[: -len(".weight")]
                    mods[path] = tuple(shape)
                    flat[flatten_path(path)] = path
                elif key.endswith(".bias"):
                    biases.add(key[: -len(".bias")])
            idx.modules[comp], idx.flat[comp], idx.biases[comp] = mods, flat, biases
        if keymap is not None:
            for m in keymap.mappings:
                if m.component != "unet" or not m.diffusers_key.endswith(".weight"):
                    continue
                single = m.single_key
                if single.startswith(ckpt.UNET_PREFIX):
                    single = single[len(ckpt.UNET_PREFIX):]
                ldm_path = single[: -len(".weight")]
                dpath = m.diffusers_key[: -len(".weight")]
                idx.ldm.setdefault("unet", {})[ldm_path] = dpath
                idx.flat["unet"].setdefault(flatten_path(ldm_path), dpath)
        return idx

    @classmethod
    def template(cls, arch: str) -> "ModelIndex":
        return _template_index(arch)

    @classmethod
    def from_source(cls, source) -> "ModelIndex":
        """Index a real checkpoint (single file or diffusers folder) from its keys and shapes."""
        shapes = source.shapes()
        info = ckpt.detect_checkpoint(shapes)
        if info.layout == "diffusers":
            comp_shapes = ckpt.split_diffusers_flat(shapes)
            keymap = None
            try:
                keymap = ckpt.CheckpointKeyMap.for_diffusers(comp_shapes, info.arch)
            except ImportError:
                raise
            except Exception:
                keymap = None
            return cls.from_component_shapes(info.arch, comp_shapes, keymap)
        keymap = ckpt.CheckpointKeyMap.from_single_file(shapes, info.arch if info.arch != "unknown" else None)
        comp_shapes: dict[str, dict[str, tuple]] = {}
        for m in keymap.mappings:
            t = torch.empty(shapes[m.single_key], device="meta")
            comp_shapes.setdefault(m.component, {})[m.diffusers_key] = tuple(ckpt.single_to_diffusers_tensor(m, t).shape)
        return cls.from_component_shapes(info.arch, comp_shapes, keymap)

    # ---- resolution -----------------------------------------------------------------------------
    def _components_for(self, mid: ModuleId) -> tuple[str, ...]:
        present = tuple(self.modules)
        if mid.component == "te":
            order = TEXT_ENCODERS
        elif mid.component == "any":
            order = ("unet",) + TEXT_ENCODERS
        else:
            order = (mid.component,)
        return tuple(c for c in order if c in present)

    def resolve(self, mid: ModuleId) -> Target | None:
        memo = self._memo
        if memo is not None:
            try:
                return memo[mid]
            except KeyError:
                pass
        target = None
        for comp in self._components_for(mid):
            path = self._lookup(comp, mid)
            if path is not None:
                target = Target(comp, path, self.modules[comp][path], path in self.biases.get(comp, ()))
                break
        if memo is not None:
            if len(memo) >= _MEMO_MAX:  # files of ever new names: keep the memory bounded
                memo.clear()
            memo[mid] = target
        return target

    def _lookup(self, comp: str, mid: ModuleId) -> str | None:
        te = comp in TEXT_ENCODERS
        if mid.flat:
            names = [mid.path]
            if te and not mid.path.startswith(("text_model_", "text_projection")):
                names.append("text_model_" + mid.path)  # transformers 5 trees drop the text_model level
            for n in names:
                if n in self.flat.get(comp, {}):
                    return self.flat[comp][n]
            return None
        if mid.naming == "ldm":
            return self.ldm.get(comp, {}).get(mid.path)
        path = mid.path
        if te:
            path = ckpt.canonical_te_key(path)
        if path in self.modules.get(comp, {}):
            return path
        return None

    def ldm_module(self, target: Target) -> str | None:
        """The ldm/sgm module path of a target (no ``model.diffusion_model.`` prefix), when known."""
        m = self.single_key(target)
        if m is None:
            return None
        key = m.single_key[: -len(".weight")]
        return key[len(ckpt.UNET_PREFIX):] if key.startswith(ckpt.UNET_PREFIX) else key

    def single_key(self, target: Target):
        """The single-file key mapping (with its transform) of a target's weight, when known."""
        if self.keymap is None:
            return None
        return self.keymap.to_single(target.component, target.module + ".weight")


@ckpt._locked
@functools.lru_cache(maxsize=None)
def _template_index(arch: str) -> ModelIndex:
    comp_shapes = ckpt.template_shapes(arch)
    keymap = ckpt.CheckpointKeyMap.for_diffusers(comp_shapes, arch)
    idx = ModelIndex.from_component_shapes(arch, comp_shapes, keymap)
    idx._memo = {}  # every adapter of a folder asks the template about the same names
    return idx


_MEMO_MAX = 200_000

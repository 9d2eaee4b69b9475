"""Stable Diffusion checkpoint layouts: detection, and the single-file <-> diffusers key map.

Two layouts hold the same weights:

* **single-file** (ldm for SD1/SD2, sgm for SDXL): one dict with prefixes ``model.diffusion_model.``
  (UNet), ``first_stage_model.`` (VAE), ``cond_stage_model.transformer.`` (SD1 CLIP),
  ``cond_stage_model.model.`` (SD2 OpenCLIP), ``conditioner.embedders.{0,1}.*`` (SDXL);
* **diffusers**: one state dict per component (``unet``, ``text_encoder``, ``text_encoder_2``,
  ``vae``), here flattened with the component name as prefix (``unet.conv_in.weight``).

The key map is *not* a second copy of diffusers' conversion tables: it is read off by running
diffusers' own converters (``convert_ldm_unet_checkpoint``, ``convert_ldm_vae_checkpoint``,
``convert_ldm_clip_checkpoint``, ``convert_open_clip_checkpoint``) on small "tag" tensors whose values
say which source key and element they came from. The reverse direction (diffusers -> single file)
derives candidate single-file keys with the ldm index formulas and then checks them by running the
forward map on them; a mismatch raises.

Canonical diffusers keys for CLIP text encoders always have the ``text_model.`` level
(``text_model.encoder.layers.0.self_attn.q_proj.weight``; ``text_projection.weight`` stays top
level), whichever transformers version wrote the folder (transformers 5 ``CLIPTextModel`` drops it).
"""

from __future__ import annotations

import functools
import json
import threading
import re
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Iterable, Mapping

import torch

from . import cache as _cache

# Building maps imports diffusers/transformers lazily, which is not thread-safe, and the lru_caches
# would otherwise compute the same map twice: one lock serialises the builders (batch mode, -j N).
_BUILD_LOCK = threading.RLock()


def _locked(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with _BUILD_LOCK:
            return fn(*args, **kwargs)

    wrapper.cache_clear = getattr(fn, "cache_clear", None)
    return wrapper

COMPONENTS = ("unet", "text_encoder", "text_encoder_2", "vae")
ARCHS = ("sd1", "sd2", "sdxl", "sdxl-refiner")

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIXES = ("first_stage_model.", "vae.")
SD1_CLIP_PREFIX = "cond_stage_model.transformer."
SD2_OPENCLIP_PREFIX = "cond_stage_model.model."
SDXL_CLIP_PREFIX = "conditioner.embedders.0.transformer."
SDXL_OPENCLIP_PREFIX = "conditioner.embedders.1.model."
REFINER_OPENCLIP_PREFIX = "conditioner.embedders.0.model."

# which text-encoder prefixes (single file) each arch uses, and the converter kind
_TE_LAYOUT = {
    "sd1": {"text_encoder": (SD1_CLIP_PREFIX, "clip")},
    "sd2": {"text_encoder": (SD2_OPENCLIP_PREFIX, "openclip")},
    "sdxl": {
        "text_encoder": (SDXL_CLIP_PREFIX, "clip"),
        "text_encoder_2": (SDXL_OPENCLIP_PREFIX, "openclip"),
    },
    "sdxl-refiner": {"text_encoder_2": (REFINER_OPENCLIP_PREFIX, "openclip")},
}

_UNET_MARKERS = ("input_blocks.", "middle_block.", "output_blocks.", "time_embed.", "out.")


# ----------------------------------------------------------------------------------------------
# key canonicalisation
# ----------------------------------------------------------------------------------------------


def canonical_te_key(key: str) -> str:
    """Text-encoder key in the canonical ``text_model.`` form (adds the level if missing)."""
    if key.startswith("text_model.") or key.startswith("text_projection."):
        return key
    return "text_model." + key


def canonical_te_state(sd: Mapping[str, object]) -> dict:
    """Canonicalise a CLIP text-encoder state dict (or shape dict); drops ``position_ids`` buffers."""
    out = {}
    for k, v in sd.items():
        ck = canonical_te_key(k)
        if ck.endswith("embeddings.position_ids"):
            continue
        out[ck] = v
    return out


def split_diffusers_flat(flat: Mapping[str, object]) -> dict[str, dict]:
    """``{"unet.conv_in.weight": x}`` -> ``{"unet": {"conv_in.weight": x}}`` (known components only)."""
    out: dict[str, dict] = {}
    for k, v in flat.items():
        comp, _, rest = k.partition(".")
        if comp in COMPONENTS and rest:
            out.setdefault(comp, {})[rest] = v
    return out


# ----------------------------------------------------------------------------------------------
# detection
# ----------------------------------------------------------------------------------------------


@dataclass
class CheckpointInfo:
    arch: str  # "sd1" | "sd2" | "sdxl" | "sdxl-refiner" | "unknown"
    layout: str  # "single-file" | "diffusers"
    components: dict[str, str] = field(default_factory=dict)  # component -> key prefix
    prediction: str | None = None  # "eps" | "v" | None
    inpainting: bool = False
    notes: list[str] = field(default_factory=list)


def _has_prefix(keys: Iterable[str], prefix: str) -> bool:
    return any(k.startswith(prefix) for k in keys)


def _unet_arch_from_keys(ukeys: Mapping[str, tuple], notes: list[str]) -> str:
    """Arch from bare UNet keys (ldm names or diffusers names), by real widths or by structure."""
    ldm = any(k.startswith("input_blocks.") for k in ukeys)
    # cross-attention context width
    ctx = None
    for k, s in ukeys.items():
        if k.endswith("attn2.to_k.weight") and len(s) == 2:
            ctx = s[1]
            break
    has_add = any(k.startswith("label_emb.0.0.") or k.startswith("add_embedding.") for k in ukeys)
    if ldm:
        levels = 1 + sum(1 for k in ukeys if re.fullmatch(r"input_blocks\.\d+\.0\.op\.weight", k))
    else:
        levels = len({m.group(1) for k in ukeys if (m := re.match(r"down_blocks\.(\d+)\.", k))})
    proj = next((s for k, s in ukeys.items() if k.endswith(".proj_in.weight")), None)
    if ctx in (768, 1024, 2048, 1280):
        arch = {768: "sd1", 1024: "sd2", 2048: "sdxl", 1280: "sdxl-refiner"}[ctx]
        if arch in ("sd1", "sd2") and has_add:
            notes.append("UNet has label_emb/add_embedding with an SD1/SD2 context width")
        return arch
    if has_add:
        return "sdxl" if levels == 3 else "sdxl-refiner" if levels == 4 else "unknown"
    if proj is not None:
        return "sd2" if len(proj) == 2 else "sd1"
    return "unknown"


def detect_checkpoint(shapes: Mapping[str, tuple]) -> CheckpointInfo:
    """Tell the architecture and layout of a file from its key -> shape dict.

    ``shapes`` is either a whole single-file checkpoint or a diffusers folder flattened with the
    component names as prefixes (``unet.``, ``text_encoder.``, ``text_encoder_2.``, ``vae.``).
    Detection is structural, so tiny test models with real structure are recognised too.
    """
    shapes = {k: tuple(v) for k, v in shapes.items()}
    keys = shapes.keys()
    notes: list[str] = []
    comps: dict[str, str] = {}

    diffusers_like = any(
        _has_prefix(keys, p)
        for p in ("unet.", "text_encoder.", "text_encoder_2.", "vae.encoder.down_blocks.", "vae.decoder.up_blocks.")
    )
    single_like = any(
        _has_prefix(keys, p)
        for p in (UNET_PREFIX, "first_stage_model.", "cond_stage_model.", "conditioner.embedders.")
    )

    if diffusers_like and not single_like:
        layout = "diffusers"
        for c in COMPONENTS:
            if _has_prefix(keys, c + "."):
                comps[c] = c + "."
        ukeys = {k[5:]: s for k, s in shapes.items() if k.startswith("unet.")}
        if "text_encoder_2" in comps:
            arch = "sdxl" if "text_encoder" in comps else "sdxl-refiner"
        elif ukeys:
            arch = _unet_arch_from_keys(ukeys, notes)
            if "text_encoder" in comps and arch in ("sdxl", "sdxl-refiner"):
                notes.append("SDXL-like UNet but only one text encoder")
        elif "text_encoder" in comps:
            te = {k: s for k, s in shapes.items() if k.startswith("text_encoder.")}
            width = next((s[-1] for k, s in te.items() if k.endswith("token_embedding.weight")), None)
            arch = {768: "sd1", 1024: "sd2"}.get(width, "unknown")
        else:
            arch = "unknown"
        conv_in = shapes.get("unet.conv_in.weight")
        prediction = None
        notes.append("diffusers layout: the prediction type lives in scheduler/scheduler_config.json, not the weights")
    else:
        layout = "single-file"
        if _has_prefix(keys, SDXL_OPENCLIP_PREFIX):
            arch = "sdxl"
            comps["text_encoder_2"] = SDXL_OPENCLIP_PREFIX
            if _has_prefix(keys, SDXL_CLIP_PREFIX):
                comps["text_encoder"] = SDXL_CLIP_PREFIX
        elif _has_prefix(keys, REFINER_OPENCLIP_PREFIX):
            arch = "sdxl-refiner"
            comps["text_encoder_2"] = REFINER_OPENCLIP_PREFIX
        elif _has_prefix(keys, SD2_OPENCLIP_PREFIX):
            arch = "sd2"
            comps["text_encoder"] = SD2_OPENCLIP_PREFIX
        elif _has_prefix(keys, SD1_CLIP_PREFIX):
            arch = "sd1"
            comps["text_encoder"] = SD1_CLIP_PREFIX
        else:
            arch = None
        if _has_prefix(keys, UNET_PREFIX):
            comps["unet"] = UNET_PREFIX
        elif any(k.startswith(m) for k in keys for m in _UNET_MARKERS[:3]):
            comps["unet"] = ""
            notes.append("bare UNet keys (no model.diffusion_model. prefix)")
        for p in VAE_PREFIXES:
            if _has_prefix(keys, p):
                comps["vae"] = p
                break
        up = comps.get("unet")
        ukeys = {}
        if up is not None:
            ukeys = {k[len(up):]: s for k, s in shapes.items() if k.startswith(up)}
            if up == "":
                ukeys = {k: s for k, s in ukeys.items() if k.startswith(_UNET_MARKERS) or k.startswith("label_emb.")}
        if arch is None:
            arch = _unet_arch_from_keys(ukeys, notes) if ukeys else "unknown"
        conv_in = shapes.get((up or "") + "input_blocks.0.0.weight") if up is not None else None
        if "v_pred" in keys or _has_prefix(keys, "edm_vpred."):
            prediction = "v"
        elif arch == "sd2":
            prediction = None
            notes.append("SD2 512-base (eps) and 768-v files have identical keys")
        elif arch in ("sd1", "sdxl", "sdxl-refiner"):
            prediction = "eps"
            notes.append("no v_pred marker key: eps assumed")
        else:
            prediction = None
        if "ztsnr" in keys:
            notes.append("ztsnr marker: zero-terminal-SNR model")
        if _has_prefix(keys, "model_ema."):
            notes.append("has model_ema.* (EMA copy) keys")
        if "edm_mean" in keys:
            notes.append("edm_mean/edm_std present (Playground v2.5 style)")

    inpainting = False
    if conv_in is not None and len(conv_in) == 4:
        if conv_in[1] == 9:
            inpainting = True
        elif conv_in[1] == 8:
            notes.append("UNet has 8 input channels (instruct-pix2pix style)")
    if not comps:
        notes.append("no Stable Diffusion components found")
    return CheckpointInfo(arch=arch, layout=layout, components=comps, prediction=prediction,
                          inpainting=inpainting, notes=notes)


def detect_source(source) -> CheckpointInfo:
    """``detect_checkpoint`` of a source's shapes, with the prediction type the weights cannot show taken
    from where the model says it: a diffusers folder's scheduler config, or a single file's
    ``modelspec.prediction_type`` (SD2 512-base and 768-v files have the same keys)."""
    info = detect_checkpoint(source.shapes())
    said = getattr(source, "prediction", None)
    if said is None:
        said = {"v": "v", "v_prediction": "v", "epsilon": "eps", "eps": "eps"}.get(
            (getattr(source, "metadata", None) or {}).get("modelspec.prediction_type", ""))
    if said is not None and info.arch != "unknown" and info.prediction != "v":
        info.prediction = said
        info.notes = [n for n in info.notes if "prediction type lives" not in n and "identical keys" not in n]
    return info


# ----------------------------------------------------------------------------------------------
# the key map, read off diffusers' converters
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class KeyMapping:
    single_key: str  # full single-file key, with its prefix
    component: str  # "unet" | "text_encoder" | "text_encoder_2" | "vae"
    diffusers_key: str  # canonical diffusers key inside the component
    transform: object  # None | "squeeze" | "transpose" | ("chunk", i, n)


_TAG_BASE = 64  # values are source_index * 64 + element index (tag tensors have <= 18 elements)


def _tag_shape(key: str, ndim: int) -> tuple[int, ...]:
    if key.endswith("in_proj_weight"):
        return (6, 3)
    if key.endswith("in_proj_bias"):
        return (6,)
    if ndim == 0:
        return ()
    if ndim == 1:
        return (2,)
    return (2, 3) + (1,) * (ndim - 2)


def _make_tags(shapes: Mapping[str, tuple]) -> tuple[dict[str, torch.Tensor], list[str]]:
    order = sorted(shapes)
    tags = {}
    for i, k in enumerate(order):
        shp = _tag_shape(k, len(shapes[k]))
        n = 1
        for d in shp:
            n *= d
        tags[k] = (torch.arange(n, dtype=torch.float64) + i * _TAG_BASE).reshape(shp)
    return tags, order


def _read_tag(out: torch.Tensor, tags: Mapping[str, torch.Tensor], order: list[str], where: str):
    flat = out.detach().reshape(-1).to(torch.float64)
    if flat.numel() == 0:
        raise RuntimeError(f"empty converter output for {where}")
    ids = torch.div(flat, _TAG_BASE, rounding_mode="floor").to(torch.int64)
    if not bool((ids == ids[0]).all()):
        raise RuntimeError(f"converter output {where} mixes several source keys")
    src = order[int(ids[0])]
    t = tags[src]
    if out.shape == t.shape and torch.equal(out, t):
        return src, None
    if out.ndim == 2 and t.ndim == 2 and out.shape == t.shape[::-1] and torch.equal(out, t.T):
        return src, "transpose"
    if out.ndim < t.ndim and out.numel() == t.numel() and torch.equal(out, t.reshape(out.shape)):
        return src, "squeeze"
    if out.ndim == t.ndim and out.ndim >= 1 and out.shape[0] and t.shape[0] % out.shape[0] == 0:
        n = t.shape[0] // out.shape[0]
        for i, c in enumerate(t.chunk(n, dim=0)):
            if c.shape == out.shape and torch.equal(c, out):
                return src, ("chunk", i, n)
    raise RuntimeError(f"cannot tell how {where} was made from {src}")


def _unet_converter_config(ukeys: Iterable[str], arch: str) -> dict:
    ukeys = list(ukeys)
    ops = sorted(int(m.group(1)) for k in ukeys if (m := re.fullmatch(r"input_blocks\.(\d+)\.0\.op\.weight", k)))
    if ops:
        lpb = ops[0] - 1
    else:  # a single level: every input block after conv_in is a layer
        n = {m.group(1) for k in ukeys if (m := re.match(r"input_blocks\.(\d+)\.", k))}
        lpb = max(len(n) - 1, 1)
    cfg: dict = {"layers_per_block": lpb}
    if any(k.startswith("label_emb.0.0.") for k in ukeys):
        if arch in ("sdxl", "sdxl-refiner", "unknown"):
            cfg["addition_embed_type"] = "text_time"
        else:
            cfg["class_embed_type"] = "projection"
    return cfg


def _convert_component(kind: str, sub: dict[str, torch.Tensor], prefix: str, arch: str) -> dict:
    from diffusers.loaders import single_file_utils as sfu

    if kind == "unet":
        cfg = _unet_converter_config((k[len(UNET_PREFIX):] for k in sub), arch)
        return sfu.convert_ldm_unet_checkpoint(sub, cfg)
    if kind == "vae":
        levels = {m.group(1) for k in sub if (m := re.match(r".*encoder\.down\.(\d+)\.", k))}
        n = len(levels)
        cfg = {"down_block_types": ["DownEncoderBlock2D"] * n, "up_block_types": ["UpDecoderBlock2D"] * n}
        return sfu.convert_ldm_vae_checkpoint(sub, cfg)
    if kind == "clip":
        out = sfu.convert_ldm_clip_checkpoint(sub, remove_prefix=prefix)
        return {canonical_te_key(k): v for k, v in out.items()}
    if kind == "openclip":
        # hidden_size is only read when the file has no text_projection: it must be the tag rows
        dummy = SimpleNamespace(config=SimpleNamespace(hidden_size=2))
        return sfu.convert_open_clip_checkpoint(dummy, sub, prefix=prefix)
    raise ValueError(kind)


def _component_prefixes(info: CheckpointInfo, arch: str) -> dict[str, tuple[str, str]]:
    """component -> (single-file prefix, converter kind)."""
    out = {}
    if "unet" in info.components:
        out["unet"] = (info.components["unet"], "unet")
    if "vae" in info.components:
        out["vae"] = (info.components["vae"], "vae")
    for comp, (prefix, kind) in _TE_LAYOUT.get(arch, {}).items():
        if comp in info.components:
            out[comp] = (info.components[comp], kind)
    return out


def _transform_to_json(tr):
    return list(tr) if isinstance(tr, tuple) else tr


def _transform_from_json(tr):
    return tuple(tr) if isinstance(tr, list) else tr


@_locked
@functools.lru_cache(maxsize=32)
def _build_map_cached(items: frozenset, arch: str | None):
    shapes = dict(items)
    info = detect_checkpoint(shapes)
    if info.layout != "single-file":
        raise ValueError("CheckpointKeyMap.from_single_file needs single-file (ldm/sgm) keys")
    arch = arch or info.arch
    key = [arch, sorted((k, list(s)) for k, s in shapes.items())]
    hit = _cache.load("keymap", key)
    if hit is not None:
        mappings = tuple(KeyMapping(a, b, c, _transform_from_json(d)) for a, b, c, d in hit["mappings"])
        return arch, mappings, tuple(hit["unmapped"]), info
    result = _build_map(shapes, info, arch)
    _cache.save("keymap", key, {"mappings": [[m.single_key, m.component, m.diffusers_key, _transform_to_json(m.transform)]
                                             for m in result[1]], "unmapped": list(result[2])})
    return result


def _build_map(shapes: dict, info, arch: str):
    comp_prefixes = _component_prefixes(info, arch)
    mappings: list[KeyMapping] = []
    used: set[str] = set()
    for comp, (prefix, kind) in comp_prefixes.items():
        sub_shapes = {k: s for k, s in shapes.items() if k.startswith(prefix)}
        if comp == "unet" and prefix == "":
            sub_shapes = {k: s for k, s in sub_shapes.items()
                          if k.startswith(_UNET_MARKERS) or k.startswith("label_emb.")}
        if comp == "text_encoder" and kind == "clip":
            sub_shapes = {k: s for k, s in sub_shapes.items() if not k.endswith("embeddings.position_ids")}
        if not sub_shapes:
            continue
        # convert with the standard prefix so that the converters find the keys
        std = UNET_PREFIX if comp == "unet" else prefix
        renamed = {std + k[len(prefix):]: s for k, s in sub_shapes.items()}
        tags, order = _make_tags(renamed)
        converted = _convert_component(kind, tags, std, arch)
        for dkey, val in converted.items():
            if val is None:  # the converter looked up a key the file does not have
                continue
            src, tr = _read_tag(val, tags, order, f"{comp}:{dkey}")
            single = prefix + src[len(std):]
            mappings.append(KeyMapping(single, comp, dkey, tr))
            used.add(single)
    mappings.sort(key=lambda m: (COMPONENTS.index(m.component), m.diffusers_key))
    unmapped = sorted(k for k in shapes if k not in used)
    return arch, tuple(mappings), tuple(unmapped), info


class CheckpointKeyMap:
    """Key map between a single-file checkpoint and diffusers component state dicts."""

    def __init__(self, arch: str, mappings: Iterable[KeyMapping], unmapped_single: Iterable[str],
                 single_shapes: Mapping[str, tuple]):
        self.arch = arch
        self.mappings: list[KeyMapping] = list(mappings)
        self.unmapped_single: list[str] = list(unmapped_single)
        self.single_shapes: dict[str, tuple] = dict(single_shapes)
        self._by_single: dict[str, list[KeyMapping]] = {}
        self._by_diffusers: dict[tuple[str, str], KeyMapping] = {}
        for m in self.mappings:
            self._by_single.setdefault(m.single_key, []).append(m)
            self._by_diffusers[(m.component, m.diffusers_key)] = m
        for lst in self._by_single.values():
            lst.sort(key=lambda m: m.transform[1] if isinstance(m.transform, tuple) else 0)

    # -- construction ------------------------------------------------------------------------
    @classmethod
    def from_single_file(cls, shapes: Mapping[str, tuple], arch: str | None = None) -> "CheckpointKeyMap":
        """Build from a single-file key -> shape dict by running diffusers' converters on tag tensors."""
        shapes = {k: tuple(int(d) for d in v) for k, v in shapes.items()}
        arch_, mappings, unmapped, _ = _build_map_cached(frozenset(shapes.items()), arch)
        return cls(arch_, mappings, unmapped, shapes)

    @classmethod
    def for_diffusers(cls, component_shapes: Mapping[str, Mapping[str, tuple]], arch: str) -> "CheckpointKeyMap":
        """Build from diffusers component key -> shape dicts (the single-file key set is derived).

        Text-encoder keys may come in either transformers form; they are canonicalised.
        Raises ``ValueError`` if the derived single-file keys do not map back, through diffusers'
        converters, onto exactly the given diffusers key set.
        """
        if arch not in ARCHS:
            raise ValueError(f"unknown arch {arch!r}; expected one of {ARCHS}")
        frozen = tuple(sorted(
            (comp, frozenset((k, tuple(int(d) for d in s)) for k, s in
                             (canonical_te_state(sd) if comp.startswith("text_encoder") else sd).items()))
            for comp, sd in component_shapes.items() if sd
        ))
        return _for_diffusers_cached(frozen, arch)

    # -- lookup ------------------------------------------------------------------------------
    def to_diffusers(self, single_key: str) -> list[KeyMapping]:
        """All mappings fed by a single-file key ([] if unmapped; 3 for an OpenCLIP in_proj)."""
        return list(self._by_single.get(single_key, ()))

    def to_single(self, component: str, diffusers_key: str) -> KeyMapping | None:
        if component.startswith("text_encoder"):
            diffusers_key = canonical_te_key(diffusers_key)
        return self._by_diffusers.get((component, diffusers_key))

    def diffusers_keys(self) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {}
        for m in self.mappings:
            out.setdefault(m.component, []).append(m.diffusers_key)
        return out

    def __len__(self) -> int:
        return len(self.mappings)

    def __repr__(self) -> str:
        return f"CheckpointKeyMap(arch={self.arch!r}, {len(self.mappings)} mappings, {len(self.unmapped_single)} unmapped)"


# ----------------------------------------------------------------------------------------------
# reverse: derive single-file keys from diffusers keys
# ----------------------------------------------------------------------------------------------

_RESNET_TO_LDM = {
    "norm1": "in_layers.0", "conv1": "in_layers.2", "norm2": "out_layers.0", "conv2": "out_layers.3",
    "time_emb_proj": "emb_layers.1", "conv_shortcut": "skip_connection",
}
_VAE_ATTN_TO_LDM = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
_OPENCLIP_LAYER_TO_LDM = {
    "layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj",
    "self_attn.out_proj": "attn.out_proj",
}


def _ldm_unet_candidates(keys: Iterable[str]) -> dict[str, str]:
    """diffusers UNet key -> ldm UNet key (no prefix), by the ldm index formulas."""
    from diffusers.loaders.single_file_utils import DIFFUSERS_TO_LDM_MAPPING

    keys = list(keys)
    fixed = {}
    for group in ("layers", "class_embed_type", "addition_embed_type"):
        fixed.update(DIFFUSERS_TO_LDM_MAPPING["unet"][group])
    down_res = [int(m.group(1)) for k in keys if (m := re.match(r"down_blocks\.\d+\.resnets\.(\d+)\.", k))]
    lpb = max(down_res) + 1 if down_res else 1
    up_attn_blocks = {int(m.group(1)) for k in keys if (m := re.match(r"up_blocks\.(\d+)\.attentions\.", k))}
    out = {}
    for k in keys:
        if k in fixed:
            out[k] = fixed[k]
            continue
        m = re.fullmatch(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", k)
        if m:
            b, kind, l, rest = int(m.group(1)), m.group(2), int(m.group(3)), m.group(4)
            i = 1 + b * (lpb + 1) + l
            out[k] = f"input_blocks.{i}.0.{_resnet_rest(rest)}" if kind == "resnets" else f"input_blocks.{i}.1.{rest}"
            continue
        m = re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", k)
        if m:
            i = 1 + int(m.group(1)) * (lpb + 1) + lpb
            out[k] = f"input_blocks.{i}.0.op.{m.group(2)}"
            continue
        m = re.fullmatch(r"mid_block\.(resnets|attentions)\.(\d+)\.(.+)", k)
        if m:
            kind, j, rest = m.group(1), int(m.group(2)), m.group(3)
            out[k] = (f"middle_block.{2 * j}.{_resnet_rest(rest)}" if kind == "resnets"
                      else f"middle_block.{2 * j + 1}.{rest}")
            continue
        m = re.fullmatch(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", k)
        if m:
            b, kind, l, rest = int(m.group(1)), m.group(2), int(m.group(3)), m.group(4)
            i = b * (lpb + 1) + l
            out[k] = f"output_blocks.{i}.0.{_resnet_rest(rest)}" if kind == "resnets" else f"output_blocks.{i}.1.{rest}"
            continue
        m = re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", k)
        if m:
            b = int(m.group(1))
            i = b * (lpb + 1) + lpb
            slot = 2 if b in up_attn_blocks else 1
            out[k] = f"output_blocks.{i}.{slot}.conv.{m.group(2)}"
            continue
        raise ValueError(f"unet key {k!r} has no single-file (ldm) counterpart")
    return out


def _resnet_rest(rest: str) -> str:
    name, _, tail = rest.rpartition(".")
    return f"{_RESNET_TO_LDM.get(name, name)}.{tail}"


def _ldm_vae_candidates(keys: Iterable[str]) -> dict[str, str]:
    from diffusers.loaders.single_file_utils import DIFFUSERS_TO_LDM_MAPPING

    keys = list(keys)
    fixed = DIFFUSERS_TO_LDM_MAPPING["vae"]
    n_up = len({m.group(1) for k in keys if (m := re.match(r"decoder\.up_blocks\.(\d+)\.", k))})
    out = {}
    for k in keys:
        if k in fixed:
            out[k] = fixed[k]
            continue
        m = re.fullmatch(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", k)
        if m:
            out[k] = f"encoder.down.{m.group(1)}.block.{m.group(2)}.{m.group(3).replace('conv_shortcut', 'nin_shortcut')}"
            continue
        m = re.fullmatch(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", k)
        if m:
            out[k] = f"encoder.down.{m.group(1)}.downsample.conv.{m.group(2)}"
            continue
        m = re.fullmatch(r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(.+)", k)
        if m:
            out[k] = f"{m.group(1)}.mid.block_{int(m.group(2)) + 1}.{m.group(3).replace('conv_shortcut', 'nin_shortcut')}"
            continue
        m = re.fullmatch(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.+)\.(weight|bias)", k)
        if m and m.group(2) in _VAE_ATTN_TO_LDM:
            out[k] = f"{m.group(1)}.mid.attn_1.{_VAE_ATTN_TO_LDM[m.group(2)]}.{m.group(3)}"
            continue
        m = re.fullmatch(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", k)
        if m:
            j = n_up - 1 - int(m.group(1))
            out[k] = f"decoder.up.{j}.block.{m.group(2)}.{m.group(3).replace('conv_shortcut', 'nin_shortcut')}"
            continue
        m = re.fullmatch(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", k)
        if m:
            j = n_up - 1 - int(m.group(1))
            out[k] = f"decoder.up.{j}.upsample.conv.{m.group(2)}"
            continue
        raise ValueError(f"vae key {k!r} has no single-file (ldm) counterpart")
    return out


def _openclip_candidates(keys: Iterable[str]) -> dict[str, tuple[str, object]]:
    """diffusers (canonical HF) key -> (OpenCLIP key, expected transform)."""
    from diffusers.loaders.single_file_utils import DIFFUSERS_TO_LDM_MAPPING

    fixed = DIFFUSERS_TO_LDM_MAPPING["openclip"]["layers"]
    out = {}
    for k in keys:
        if k in fixed:
            out[k] = (fixed[k], "transpose" if k == "text_projection.weight" else None)
            continue
        m = re.fullmatch(r"text_model\.encoder\.layers\.(\d+)\.self_attn\.([qkv])_proj\.(weight|bias)", k)
        if m:
            out[k] = (f"transformer.resblocks.{m.group(1)}.attn.in_proj_{m.group(3)}",
                      ("chunk", "qkv".index(m.group(2)), 3))
            continue
        m = re.fullmatch(r"text_model\.encoder\.layers\.(\d+)\.(.+)\.(weight|bias)", k)
        if m and m.group(2) in _OPENCLIP_LAYER_TO_LDM:
            out[k] = (f"transformer.resblocks.{m.group(1)}.{_OPENCLIP_LAYER_TO_LDM[m.group(2)]}.{m.group(3)}", None)
            continue
        raise ValueError(f"text encoder key {k!r} has no OpenCLIP counterpart")
    return out


def _single_shape(shape: tuple, transform, vae_attn: bool) -> tuple:
    if transform == "transpose":
        return tuple(reversed(shape))
    if isinstance(transform, tuple):
        return (shape[0] * transform[2],) + tuple(shape[1:])
    if vae_attn and len(shape) == 2:
        return tuple(shape) + (1, 1)
    return tuple(shape)


@_locked
@functools.lru_cache(maxsize=32)
def _for_diffusers_cached(frozen: tuple, arch: str) -> CheckpointKeyMap:
    component_shapes = {comp: dict(items) for comp, items in frozen}
    key = [arch, {c: sorted((k, list(s)) for k, s in sd.items()) for c, sd in component_shapes.items()}]
    hit = _cache.load("fordiffusers", key)
    if hit is not None:
        return CheckpointKeyMap.from_single_file({k: tuple(s) for k, s in hit}, arch=arch)
    km = _for_diffusers(component_shapes, arch)
    _cache.save("fordiffusers", key, [[k, list(s)] for k, s in km.single_shapes.items()])
    return km


def _for_diffusers(component_shapes: dict, arch: str) -> CheckpointKeyMap:
    te_layout = _TE_LAYOUT[arch]
    single_shapes: dict[str, tuple] = {}
    for comp, shapes in component_shapes.items():
        if comp == "unet":
            for dk, lk in _ldm_unet_candidates(shapes).items():
                single_shapes[UNET_PREFIX + lk] = tuple(shapes[dk])
        elif comp == "vae":
            for dk, lk in _ldm_vae_candidates(shapes).items():
                vae_attn = ".mid_block.attentions.0." in dk and dk.endswith("weight") and "group_norm" not in dk
                single_shapes["first_stage_model." + lk] = _single_shape(shapes[dk], None, vae_attn)
        elif comp in te_layout:
            prefix, kind = te_layout[comp]
            if kind == "clip":
                for dk, s in shapes.items():
                    single_shapes[prefix + dk] = tuple(s)
            else:
                for dk, (lk, tr) in _openclip_candidates(shapes).items():
                    single_shapes[prefix + lk] = _single_shape(shapes[dk], tr, False)
        else:
            raise ValueError(f"component {comp!r} is not part of a {arch} checkpoint")
    km = CheckpointKeyMap.from_single_file(single_shapes, arch=arch)
    got = {(m.component, m.diffusers_key) for m in km.mappings}
    want = {(c, k) for c, s in component_shapes.items() for k in s}
    if got != want:
        missing = sorted(want - got)[:5]
        extra = sorted(got - want)[:5]
        raise ValueError(
            f"derived single-file keys do not map back onto the diffusers keys "
            f"(missing {len(want - got)}: {missing}; extra {len(got - want)}: {extra})"
        )
    if km.unmapped_single:
        raise ValueError(f"derived single-file keys left unmapped: {km.unmapped_single[:5]}")
    return km


# ----------------------------------------------------------------------------------------------
# tensors
# ----------------------------------------------------------------------------------------------


def single_to_diffusers_tensor(mapping: KeyMapping, tensor: torch.Tensor) -> torch.Tensor:
    """Apply a mapping's transform to the single-file tensor, giving the diffusers tensor."""
    tr = mapping.transform
    if tr is None:
        return tensor
    if tr == "squeeze":
        return tensor.reshape(tensor.shape[:2]) if tensor.ndim > 2 else tensor
    if tr == "transpose":
        return tensor.T.contiguous()
    if isinstance(tr, tuple) and tr[0] == "chunk":
        _, i, n = tr
        rows = tensor.shape[0] // n
        return tensor.narrow(0, i * rows, rows).clone()
    raise ValueError(f"unknown transform {tr!r}")


def diffusers_to_single_tensor(mapping: KeyMapping, tensor: torch.Tensor, single_ndim: int | None = None) -> torch.Tensor:
    """Invert a mapping's transform for one tensor (chunks must be concatenated by the caller)."""
    tr = mapping.transform
    if tr is None:
        return tensor
    if tr == "squeeze":
        nd = single_ndim or 4
        return tensor.reshape(tuple(tensor.shape) + (1,) * (nd - tensor.ndim))
    if tr == "transpose":
        return tensor.T.contiguous()
    raise ValueError(f"transform {tr!r} is not invertible one tensor at a time")


def single_to_diffusers_state_dicts(sd: Mapping[str, torch.Tensor], arch: str | None = None) -> dict[str, dict[str, torch.Tensor]]:
    """Split a single-file state dict into diffusers component state dicts (canonical TE keys).

    Keys diffusers does not convert (EMA, scheduler buffers, SD2 TE layer 23, ...) are dropped:
    see ``CheckpointKeyMap.from_single_file(...).unmapped_single``.
    """
    km = CheckpointKeyMap.from_single_file({k: tuple(v.shape) for k, v in sd.items()}, arch=arch)
    out: dict[str, dict[str, torch.Tensor]] = {}
    for m in km.mappings:
        out.setdefault(m.component, {})[m.diffusers_key] = single_to_diffusers_tensor(m, sd[m.single_key])
    return out


def diffusers_to_single_state_dict(components: Mapping[str, Mapping[str, torch.Tensor]], arch: str) -> dict[str, torch.Tensor]:
    """Join diffusers component state dicts into one single-file (ldm/sgm) state dict.

    ``components`` maps "unet" / "text_encoder" / "text_encoder_2" / "vae" to state dicts (text
    encoders in either transformers form). The OpenCLIP q/k/v are concatenated back into
    ``in_proj_weight``/``in_proj_bias``, VAE attention weights become 1x1 convs, ``text_projection``
    is transposed back. Output keys carry the arch's prefixes (``model.diffusion_model.``,
    ``first_stage_model.``, ``cond_stage_model.transformer.``/``.model.``, ``conditioner.embedders.*``).
    Only weights are written: no EMA, scheduler buffers, ``logit_scale`` or marker keys.
    """
    comps = {c: (canonical_te_state(sd) if c.startswith("text_encoder") else dict(sd))
             for c, sd in components.items() if sd}
    km = CheckpointKeyMap.for_diffusers({c: {k: tuple(v.shape) for k, v in sd.items()} for c, sd in comps.items()}, arch)
    out: dict[str, torch.Tensor] = {}
    for single_key, maps in km._by_single.items():
        if len(maps) == 1 and not isinstance(maps[0].transform, tuple):
            m = maps[0]
            out[single_key] = diffusers_to_single_tensor(m, comps[m.component][m.diffusers_key],
                                                         len(km.single_shapes[single_key]))
        else:
            parts = sorted(maps, key=lambda m: m.transform[1])
            if [m.transform for m in parts] != [("chunk", i, len(parts)) for i in range(len(parts))]:
                raise ValueError(f"{single_key}: incomplete split {[m.transform for m in parts]}")
            out[single_key] = torch.cat([comps[m.component][m.diffusers_key] for m in parts], dim=0)
    return dict(sorted(out.items()))


# ----------------------------------------------------------------------------------------------
# templates of real architectures (no weights)
# ----------------------------------------------------------------------------------------------

_CONFIG_DIR = Path(__file__).parent / "configs"

# arch -> component -> (config file, model class)
_TEMPLATES = {
    "sd1": {"unet": ("sd15_unet.json", "unet"), "vae": ("sd_vae.json", "vae"),
            "text_encoder": ("clip_vit_l14_text.json", "clip")},
    "sd2": {"unet": ("sd21_unet.json", "unet"), "vae": ("sd_vae.json", "vae"),
            "text_encoder": ("openclip_vit_h14_text.json", "clip")},
    "sdxl": {"unet": ("sdxl_base_unet.json", "unet"), "vae": ("sdxl_vae.json", "vae"),
             "text_encoder": ("clip_vit_l14_text.json", "clip"),
             "text_encoder_2": ("openclip_vit_bigg14_text.json", "clip_proj")},
    "sdxl-refiner": {"unet": ("sdxl_refiner_unet.json", "unet"), "vae": ("sdxl_vae.json", "vae"),
                     "text_encoder_2": ("openclip_vit_bigg14_text.json", "clip_proj")},
}


def load_config(name: str) -> dict:
    """A shipped config from ``lycotools/layouts/configs``."""
    cfg = json.loads((_CONFIG_DIR / name).read_text())
    return {k: v for k, v in cfg.items() if not k.startswith("_")}


def _instantiate_meta(kind: str, cfg: dict):
    with torch.device("meta"):
        if kind == "unet":
            from diffusers import UNet2DConditionModel
            return UNet2DConditionModel(**cfg)
        if kind == "vae":
            from diffusers import AutoencoderKL
            return AutoencoderKL(**cfg)
        from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection
        c = CLIPTextConfig(**cfg)
        return CLIPTextModelWithProjection(c) if kind == "clip_proj" else CLIPTextModel(c)


@_locked
@functools.lru_cache(maxsize=8)
def _template_cached(arch: str):
    key = [arch, {c: load_config(f) for c, (f, _) in _TEMPLATES[arch].items()}]
    hit = _cache.load("template", key)
    if hit is not None:
        return {c: {k: tuple(s) for k, s in sd.items()} for c, sd in hit.items()}
    out = {}
    for comp, (fname, kind) in _TEMPLATES[arch].items():
        model = _instantiate_meta(kind, load_config(fname))
        sd = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        out[comp] = canonical_te_state(sd) if comp.startswith("text_encoder") else sd
    _cache.save("template", key, {c: {k: list(s) for k, s in sd.items()} for c, sd in out.items()})
    return out


def template_shapes(arch: str) -> dict[str, dict[str, tuple[int, ...]]]:
    """Key -> shape of each diffusers component of a real architecture (canonical keys, no weights)."""
    if arch not in _TEMPLATES:
        raise ValueError(f"unknown arch {arch!r}; expected one of {tuple(_TEMPLATES)}")
    return {c: dict(s) for c, s in _template_cached(arch).items()}


def template_single_shapes(arch: str) -> dict[str, tuple[int, ...]]:
    """Key -> shape of the single-file (ldm/sgm) checkpoint of a real architecture (weights diffusers maps)."""
    km = CheckpointKeyMap.for_diffusers(template_shapes(arch), arch)
    return dict(km.single_shapes)


__all__ = [
    "CheckpointInfo", "CheckpointKeyMap", "KeyMapping", "canonical_te_key", "canonical_te_state",
    "detect_checkpoint", "diffusers_to_single_state_dict", "diffusers_to_single_tensor",
    "single_to_diffusers_state_dicts", "single_to_diffusers_tensor", "split_diffusers_flat",
    "template_shapes", "template_single_shapes", "load_config",
]

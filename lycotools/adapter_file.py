"""An adapter file read through the tensor layer: modules parsed, conventions normalised, targets resolved.

``AdapterFile.open(path)`` reads any adapter container and convention, gives every module its
canonical tensors (PEFT alphas from ``adapter_config.json`` or diffusers' ``lora_adapter_metadata``
folded into an ``alpha`` tensor, PEFT DoRA magnitudes turned into ``dora_scale``), and parses each
with ``lycotools.adapters.parse_module``. ``resolve(index)`` then names the weight each module
changes; modules that match nothing are kept in ``unmatched``, never dropped silently.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field

import torch

from .adapters import AdapterModule, parse_module
from .io.readers import Source, open_source
from .layouts.adapter_keys import KeyGroups, ModuleId, group_keys
from .layouts.model_index import ModelIndex, Target


@dataclass
class LoadedModule:
    name: str
    id: ModuleId
    module: AdapterModule | None = None
    error: str | None = None
    target: Target | None = None


@dataclass
class AdapterFile:
    source: Source
    groups: KeyGroups
    modules: list[LoadedModule] = field(default_factory=list)
    peft_config: dict | None = None
    arch: str | None = None
    index: ModelIndex | None = None

    @property
    def path(self):
        return self.source.path

    @property
    def convention(self) -> str:
        if not self.groups.conventions:
            return "unknown"
        return max(self.groups.conventions.items(), key=lambda kv: kv[1])[0]

    @property
    def parsed(self) -> list[LoadedModule]:
        return [m for m in self.modules if m.module is not None]

    @property
    def unmatched(self) -> list[LoadedModule]:
        return [m for m in self.parsed if m.target is None]

    @property
    def errors(self) -> list[LoadedModule]:
        return [m for m in self.modules if m.error is not None]

    @classmethod
    def open(cls, path_or_source) -> "AdapterFile":
        src = path_or_source if isinstance(path_or_source, Source) else open_source(path_or_source)
        return cls.from_source(src)

    @classmethod
    def from_source(cls, src: Source) -> "AdapterFile":
        groups = group_keys(src.keys())
        config = src.config or _diffusers_metadata_config(src.metadata)
        af = cls(source=src, groups=groups, peft_config=config)
        for name, sufs in groups.modules.items():
            mid = groups.ids[name]
            lm = LoadedModule(name=name, id=mid)
            try:
                tensors = {s: src.get(k) for s, k in sufs.items()}
                tensors, extra = _normalise(mid, tensors, config)
                lm.module = parse_module(name, tensors, extra)
            except ValueError as e:
                lm.error = str(e)
            af.modules.append(lm)
        return af

    def resolve(self, index: ModelIndex) -> "AdapterFile":
        """Attach each parsed module's target weight in ``index`` (None when it matches nothing)."""
        self.index, self.arch = index, index.arch
        for lm in self.parsed:
            lm.target = index.resolve(lm.id)
        return self


# ------------------------------------------------------------------------------------------------
# PEFT / diffusers specifics
# ------------------------------------------------------------------------------------------------


def _diffusers_metadata_config(metadata: dict) -> dict | None:
    raw = metadata.get("lora_adapter_metadata")
    if not raw:
        return None
    try:
        flat = json.loads(raw)
    except ValueError:
        return None
    # keys are "<component>.<field>"; keep the first component's fields as the global ones
    out: dict = {}
    for k, v in flat.items():
        comp, _, fld = k.partition(".")
        out.setdefault(comp, {})[fld] = v
    return {"components": out}


def _pattern_value(patterns: dict, name: str, default):
    for pat, val in (patterns or {}).items():
        if re.fullmatch(rf"(.*\.)?({pat})", name) or re.match(pat, name) and pat.startswith("^"):
            return val
    return default


def _config_for(mid: ModuleId, config: dict | None) -> dict | None:
    if config is None:
        return None
    if "components" in config:
        comp = {"te": "text_encoder", "any": "unet"}.get(mid.component, mid.component)
        return config["components"].get(comp)
    return config


def _normalise(mid: ModuleId, tensors: dict[str, torch.Tensor], config: dict | None):
    """Turn PEFT/diffusers tensors into the canonical LyCORIS form; return (tensors, extra)."""
    extra: dict = {}
    cfg = _config_for(mid, config)
    if "lora_magnitude_vector" in tensors:  # PEFT DoRA: output-axis magnitude, shape (out,) or (1,out,1,1)
        mag = tensors.pop("lora_magnitude_vector")
        down = tensors.get("lora_down.weight")
        ndim = down.dim() if down is not None else 2
        tensors["dora_scale"] = mag.reshape(-1, *([1] * (ndim - 1)))
    if {"lora_A", "lora_B", "lora_E"} <= set(tensors):  # AdaLoRA
        extra["lora_alpha"] = float((cfg or {}).get("lora_alpha", 0) or 0)
        extra["init_r"] = int((cfg or {}).get("init_r", tensors["lora_E"].shape[0]))
        return tensors, extra
    if {"lora_A", "lora_B"} <= set(tensors):  # "mochi"-style PEFT keys without .weight
        tensors["lora_down.weight"] = tensors.pop("lora_A")
        tensors["lora_up.weight"] = tensors.pop("lora_B")
    if cfg and "alpha" not in tensors:
        _alpha_from_config(mid, tensors, cfg)
    return tensors, extra


def _alpha_from_config(mid: ModuleId, tensors: dict, cfg: dict):
    """Fold PEFT's config alpha into an alpha tensor so that alpha/rank is PEFT's scale."""
    name = mid.path
    peft_type = str(cfg.get("peft_type", "LORA")).upper()
    if "lora_down.weight" in tensors:
        r = int(tensors["lora_down.weight"].shape[0])
        alpha = _pattern_value(cfg.get("alpha_pattern"), name, cfg.get("lora_alpha", cfg.get("alpha", r)))
        alpha = float(alpha if alpha is not None else r)
        if cfg.get("use_rslora"):
            alpha = alpha * math.sqrt(r)  # PEFT scales rsLoRA by alpha/sqrt(r)
        tensors["alpha"] = torch.tensor(alpha, dtype=torch.float32)
    elif peft_type in ("LOHA", "LOKR") or any(k.startswith(("hada_", "lokr_")) for k in tensors):
        alpha = float(_pattern_value(cfg.get("alpha_pattern"), name, cfg.get("alpha", cfg.get("r", 1))))
        rank = None
        for k in ("hada_w1_b", "lokr_w1_b", "lokr_w2_b"):
            if k in tensors:
                rank = int(tensors[k].shape[0])
        if rank is None and "lokr_w1" in tensors and "lokr_w2" in tensors:
            # PEFT scales full-block LoKr by alpha/r where LyCORIS uses 1: fold PEFT's scale into w1
            r = int(_pattern_value(cfg.get("rank_pattern"), name, cfg.get("r", 1)))
            tensors["lokr_w1"] = tensors["lokr_w1"].float() * (alpha / r)
            return
        tensors["alpha"] = torch.tensor(alpha, dtype=torch.float32)

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
from pathlib import Path

import torch

try:  # the regular-expression parser, to vet PEFT patterns before they are matched
    from re import _constants as _sre, _parser as _sre_parse
except ImportError:  # Python < 3.11
    import sre_constants as _sre
    import sre_parse as _sre_parse

from .adapters import AdapterModule, parse_module
from .adapters.base import BrokenModule
from .errors import BadInput
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
    broken: bool = False  # a known algorithm with wrong tensors (not merely an algorithm lycotools cannot parse)


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
        _check_config(config, src)
        af = cls(source=src, groups=groups, peft_config=config)
        wanted = [k for sufs in groups.modules.values() for k in sufs.values()]
        pulled = dict(zip(wanted, src.get_many(wanted)))  # read together: one read for many small tensors
        for name, sufs in groups.modules.items():
            mid = groups.ids[name]
            lm = LoadedModule(name=name, id=mid)
            try:
                tensors = {s: pulled[k] for s, k in sufs.items()}
                tensors, extra = _normalise(mid, tensors, config)
                lm.module = parse_module(name, tensors, extra)
            except BrokenModule as e:
                lm.error, lm.broken = str(e), True
            except (ValueError, TypeError, ZeroDivisionError) as e:
                lm.error = str(e).splitlines()[0] if str(e) else e.__class__.__name__
            af.modules.append(lm)
        return af

    def check_fit(self) -> None:
        """BadInput naming the file and the first module that cannot change the weight it resolved to
        (sizes stored in the adapter checked against the layer before anything is built from them)."""
        for lm in self.parsed:
            if lm.target is not None:
                why = lm.module.fit_error(lm.target.shape, lm.target.has_bias)
                if why:
                    raise BadInput(self.path, f"{lm.name}: {why} ({lm.target.component} {lm.target.module})")

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


# PEFT configs carry regular expressions (rank_pattern / alpha_pattern keys) that are matched against every
# module name: a pattern whose matching can take exponential (or high polynomial) time is refused up front.
_REPEATS = (_sre.MAX_REPEAT, _sre.MIN_REPEAT) + ((_sre.POSSESSIVE_REPEAT,) if hasattr(_sre, "POSSESSIVE_REPEAT") else ())
_MAX_UNBOUNDED = 3  # .*a.*b.*c is fine on module names; more free repeats multiply the backtracking


def _repeat_risk(items, in_repeat: bool, stats: dict) -> None:
    for op, av in items:
        if op in _REPEATS:
            lo, hi, sub = av
            if hi > 1:
                stats["nested"] |= in_repeat
                stats["unbounded"] += hi == _sre.MAXREPEAT
            _repeat_risk(sub, in_repeat or hi > 1, stats)
        elif op == _sre.BRANCH:
            stats["nested"] |= in_repeat  # alternatives inside a repetition can overlap: (a|a)*
            for branch in av[1]:
                _repeat_risk(branch, in_repeat, stats)
        elif op == _sre.SUBPATTERN:
            _repeat_risk(av[-1], in_repeat, stats)
        elif op in (_sre.ASSERT, _sre.ASSERT_NOT):
            _repeat_risk(av[1], in_repeat, stats)
        elif op == getattr(_sre, "ATOMIC_GROUP", None):
            _repeat_risk(av, in_repeat, stats)
        elif op == _sre.GROUPREF_EXISTS:
            for branch in av[1:]:
                if branch is not None:
                    _repeat_risk(branch, in_repeat, stats)


def check_pattern(pat) -> None:
    """ValueError for a pattern that is not a regular expression or whose matching could take very long
    (a repetition inside a repetition such as ``(a+)+``, alternatives inside one, or many free repetitions)."""
    if not isinstance(pat, str) or len(pat) > 1000:
        raise ValueError(f"pattern {str(pat)[:60]!r} is not a module-name pattern")
    try:
        tree = _sre_parse.parse(pat)
    except re.error as e:
        raise ValueError(f"pattern {pat!r} is not a regular expression ({e.msg})") from None
    stats = {"nested": False, "unbounded": 0}
    _repeat_risk(tree, False, stats)
    if stats["nested"] or stats["unbounded"] > _MAX_UNBOUNDED:
        raise ValueError(f"pattern {pat!r} nests repetitions or repeats too freely; matching it against module "
                         "names could take exponential time")


def _check_number(what: str, v, *, integer: bool = False, minimum: float | None = None):
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    if ok and integer:
        ok = float(v).is_integer()
    if ok and minimum is not None:
        ok = v >= minimum
    if not ok:
        kind = "an integer" if integer else "a finite number"
        raise ValueError(f"{what} is {v!r}; {kind}{f' ≥ {minimum:g}' if minimum is not None else ''} expected")


def _check_config(config: dict | None, src: Source) -> None:
    """BadInput naming adapter_config.json (or the file whose metadata holds the config) for a config whose
    numbers or patterns cannot be used: checked once, before any module is read through it."""
    if not config:
        return
    path = Path(src.path)
    where = path / "adapter_config.json" if path.is_dir() else path
    parts = config["components"].values() if isinstance(config.get("components"), dict) else [config]
    try:
        for cfg in parts:
            if not isinstance(cfg, dict):
                raise ValueError(f"{cfg!r} is not a config object")
            for key in ("r", "init_r"):
                if cfg.get(key) is not None:
                    _check_number(key, cfg[key], integer=True, minimum=0)
            for key in ("lora_alpha", "alpha"):
                if cfg.get(key) is not None:
                    _check_number(key, cfg[key])
            for key in ("rank_pattern", "alpha_pattern"):
                patterns = cfg.get(key)
                if patterns is None:
                    continue
                if not isinstance(patterns, dict):
                    raise ValueError(f"{key} is not an object of pattern: value")
                for pat, val in patterns.items():
                    check_pattern(pat)
                    if not (key == "rank_pattern" and isinstance(val, list)):  # AdaLoRA stores rank masks
                        _check_number(f"{key}[{pat!r}]", val, integer=key == "rank_pattern",
                                      minimum=1 if key == "rank_pattern" else None)
    except ValueError as e:
        raise BadInput(where, f"adapter config: {e}") from None


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

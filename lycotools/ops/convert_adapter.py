"""``convert`` for adapters: any convention in, kohya / lycoris / peft / diffusers / comfy out.

Every module is read through ``AdapterFile`` (canonical LyCORIS tensors, PEFT/diffusers alphas already
folded into an ``alpha``), resolved against the model it targets, and written in the target's naming:

* ``kohya``: ``lora_unet_*`` / ``lora_te*_*`` (diffusers-named UNet for SD1/SD2, ldm-named for SDXL),
  ``lora_down/lora_up/alpha``; plain LoRA/LoCon only.
* ``lycoris``: the same names with any algorithm's canonical suffixes.
* ``peft``: one PEFT folder per component (``OUT/unet``, ``OUT/text_encoder``[, ``OUT/text_encoder_2``]),
  ``adapter_model.safetensors`` + ``adapter_config.json`` (``r``/``lora_alpha`` the most common values,
  ``rank_pattern``/``alpha_pattern`` for the others). Text-encoder module paths follow the transformers 5
  trees: ``CLIPTextModel`` has no ``text_model.`` level, ``CLIPTextModelWithProjection`` keeps it.
* ``diffusers``: ``unet.<path>.lora_A.weight`` / ``lora_B`` and ``text_encoder[_2].text_model.<path>...``,
  what ``pipe.load_lora_weights`` reads. Alphas go in the ``lora_adapter_metadata`` header (diffusers' own
  format), so the factors stay bit-exact; ``fold_alpha`` bakes alpha/r into the factors instead
  (alpha = rank, the exporter's convention, for loaders that ignore the header).
* ``comfy``: ``diffusion_model.<ldm path>.<suffix>`` for the UNet, kohya names for the text encoders.

Lossless changes are made silently: AdaLoRA (``lora_E`` folded into ``lora_down``, alpha rescaled to PEFT's
``lora_alpha/init_r``), factor reshapes to the layer's ndim. Anything else the target cannot hold is
refused (``BadInput``, nothing written) unless ``algo="lora"`` asks for an SVD to plain LoRA, which is
reported per layer.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .. import validate
from ..devices import ADAPTER_DTYPES as DTYPES
from ..adapter_file import AdapterFile, LoadedModule
from ..adapters import lokr as lokr_math
from ..errors import BadInput
from ..finite import HINT, NonFinite
from ..io.metadata import lycotools_record, modelspec, network_metadata
from ..io.writer import atomic_folder, check_output, check_output_folder, save_tensors, write_text_atomic
from ..layouts.adapter_keys import kohya_module_name
from ..linalg import MODES, kept_energy, layer_seed, spectrum_for_mode
from . import factorize

ADAPTER_TARGETS = ("kohya", "lycoris", "peft", "diffusers", "comfy")
TE_COMPONENTS = ("text_encoder", "text_encoder_2")
PEFT_COMPONENTS = ("unet",) + TE_COMPONENTS

# what each target can hold (module "kinds", see _kind)
HOLDS = {
    "kohya": {"lora"},
    "lycoris": {"lora", "lora_mid", "lora_sparse", "dora", "dora_in", "loha", "lokr", "full", "norm", "ia3", "oft",
                "boft", "glora", "loha_dora", "lokr_dora"},
    "peft": {"lora", "dora", "loha", "lokr"},
    "diffusers": {"lora"},
    "comfy": {"lora", "lora_mid", "dora_in", "loha", "lokr", "full", "norm"},
}
KIND_TEXT = {
    "lora_mid": "Tucker LoCon (lora_mid)", "lora_sparse": "LoRA with a sparse residual", "dora": "DoRA",
    "dora_in": "DoRA (input axis)", "loha": "LoHa", "lokr": "LoKr", "full": "full diff", "norm": "norm diff",
    "ia3": "(IA)3", "oft": "OFT", "boft": "BOFT", "glora": "GLoRA", "loha_dora": "LoHa with DoRA",
    "lokr_dora": "LoKr with DoRA",
}
_NEEDS_BASE = {"dora", "dora_in", "ia3", "oft", "boft", "glora", "loha_dora", "lokr_dora"}
_META_DROP = ("sshs_", "lora_adapter_metadata", "format", "lycotools.")


@dataclass
class AdapterOptions:
    to: str = "kohya"
    algo: str | None = None  # None: keep; "lora": SVD anything else to plain LoRA
    rank: int | None = None
    mode: str = "fixed"
    mode_param: float | None = None
    max_rank: int | None = None
    base: str | None = None
    dtype: str | None = None  # None: keep the input dtypes
    fold_alpha: bool = False  # diffusers: bake alpha/r into the factors (alpha = rank)
    drop_unsupported: bool = False
    seed: int = 0
    no_date: bool = False
    allow_nonfinite: bool = False  # copy NaN/Inf values through (a warning) instead of refusing the file

    def __post_init__(self):
        if self.to not in ADAPTER_TARGETS:
            raise BadInput(None, f"unknown adapter target {self.to!r}; expected one of {', '.join(ADAPTER_TARGETS)}")
        validate.lora_rule(self.algo, self.mode, MODES, self.rank, self.max_rank, self.mode_param)
        if self.algo == "lora" and self.mode == "fixed" and self.rank is None:
            raise BadInput(None, "--algo lora needs --rank N (or --mode MODE --mode-param P)")
        validate.adapter_dtype(self.dtype, DTYPES)


@dataclass
class LayerRecord:
    name: str  # output module name
    source: str  # input module name
    component: str
    module: str
    algo_in: str
    algo_out: str
    rank_in: int | None
    rank_out: int | None
    rel_error: float = 0.0
    kept_energy: float | None = None
    note: str = ""


@dataclass
class AdapterResult:
    output: Path
    target: str
    arch: str
    layers: list[LayerRecord] = field(default_factory=list)
    dropped: list[tuple[str, str]] = field(default_factory=list)  # (module, why)
    lossless_changes: list[str] = field(default_factory=list)

    @property
    def lossy_layers(self) -> list[LayerRecord]:
        return [l for l in self.layers if l.rel_error > 0 or l.note.startswith("lossy")]

    @property
    def worst_error(self) -> float:
        return max((l.rel_error for l in self.layers), default=0.0)

    def summary(self) -> dict:
        return {
            "output": str(self.output), "target": self.target, "arch": self.arch, "modules": len(self.layers),
            "lossy_layers": len(self.lossy_layers), "worst_rel_error": self.worst_error,
            "dropped": [{"module": m, "why": w} for m, w in self.dropped],
            "lossless_changes": self.lossless_changes,
            "layers": [dataclasses.asdict(l) for l in self.layers],
        }


# ------------------------------------------------------------------------------------------------
# reading
# ------------------------------------------------------------------------------------------------


def open_adapter(path) -> AdapterFile:
    """Open an adapter file/folder; a folder of per-component PEFT folders (what ``--to peft`` writes) is
    read as one adapter, each part's modules pinned to its component."""
    p = Path(path)
    if p.is_dir() and not (p / "adapter_config.json").exists():
        parts = [p / c for c in PEFT_COMPONENTS if (p / c / "adapter_config.json").exists()]
        if parts:
            files = [AdapterFile.open(s) for s in parts]
            modules = []
            for s, af in zip(parts, files):
                for lm in af.modules:
                    lm.id = dataclasses.replace(lm.id, component=s.name)
                    modules.append(lm)
            first = files[0]
            combined = AdapterFile(source=first.source, groups=first.groups, modules=modules,
                                   peft_config=first.peft_config)
            combined._parts = files  # keep the sources open
            return combined
    return AdapterFile.open(p)


def _resolve(af: AdapterFile, opts: AdapterOptions, path):
    from ..layouts.model_index import ModelIndex
    from ..ops.inspect import guess_adapter_arch

    if opts.base:
        from ..io.readers import open_source

        index = ModelIndex.from_source(open_source(opts.base))
        arch = index.arch
    else:
        arch, index, _ = guess_adapter_arch(af)
        if index is None:
            raise BadInput(path, "cannot tell which model this adapter is for (no module matches SD1, SD2 or SDXL)",
                           hint="pass --base CHECKPOINT")
    af.resolve(index)
    return arch, index


# ------------------------------------------------------------------------------------------------
# module kinds and lossless normalisation
# ------------------------------------------------------------------------------------------------


def _kind(mod) -> str:
    t = mod.tensors
    if mod.algo == "lora":
        if "dora_scale" in t:
            return "dora" if _dora_out_axis(t) else "dora_in"
        if "lora_mid.weight" in t:
            return "lora_mid"
        if "bias_values" in t:
            return "lora_sparse"
        return "lora"
    if mod.algo in ("loha", "lokr") and "dora_scale" in t:
        return f"{mod.algo}_dora"
    return mod.algo


def _dora_out_axis(t) -> bool:
    ds = t["dora_scale"]
    return ds.dim() < 2 or ds.shape[1] == 1


def _adalora_to_lora(mod) -> dict[str, torch.Tensor] | None:
    """AdaLoRA as a plain LoRA with the same ΔW: down = A ⊙ E, up = B, alpha/k = lora_alpha/init_r."""
    t = mod.tensors
    k = int(t["lora_A"].shape[0])
    if k == 0:
        return None
    a = t["lora_A"]
    down = (a.float() * t["lora_E"].float().reshape(-1, *([1] * (a.dim() - 1)))).to(a.dtype)
    return {"lora_up.weight": t["lora_B"], "lora_down.weight": down,
            "alpha": torch.tensor(mod.scale * k, dtype=torch.float32)}


def _fit_lora(t: dict, shape: tuple) -> dict:
    """LoRA factors with the layer's ndim: 4-D (down (r,in,kh,kw), up (out,r,1,1)) for convs, 2-D for Linear."""
    up, down = t["lora_up.weight"], t["lora_down.weight"]
    r = down.shape[0]
    out = dict(t)
    if len(shape) == 4:
        if down.dim() != 4 and down[0].numel() == math.prod(shape[1:]):
            out["lora_down.weight"] = down.reshape(r, *shape[1:])
        if up.dim() != 4:
            out["lora_up.weight"] = up.reshape(up.shape[0], r, 1, 1)
    elif len(shape) == 2:
        if down.dim() == 4 and down.shape[2:] == (1, 1):
            out["lora_down.weight"] = down.reshape(r, -1)
        if up.dim() == 4:
            out["lora_up.weight"] = up.reshape(up.shape[0], r)
    if "dora_scale" in t:
        ds = t["dora_scale"]
        if _dora_out_axis(t):
            out["dora_scale"] = ds.reshape(-1, *([1] * (len(shape) - 1)))
    return out


# ------------------------------------------------------------------------------------------------
# conversion
# ------------------------------------------------------------------------------------------------


@dataclass
class _Out:
    lm: LoadedModule
    kind: str
    tensors: dict[str, torch.Tensor]
    record: LayerRecord


def convert_adapter(input_path, output, opts: AdapterOptions, *, overwrite: bool = False, report_path=None,
                    quiet: bool = False) -> AdapterResult:
    output = Path(output)
    _check_output(output, [input_path, opts.base], opts.to, overwrite)

    af = open_adapter(input_path)
    if not af.modules:
        raise BadInput(input_path, "no adapter modules found in this file")
    if af.errors:
        bad = af.errors[0]
        raise BadInput(input_path, f"{len(af.errors)} module(s) cannot be read: {bad.error}")
    arch, index = _resolve(af, opts, input_path)
    if opts.base:  # the model the adapter is for (a guessed standard model may differ in width)
        af.check_fit()
    result = AdapterResult(output=output, target=opts.to, arch=arch)
    if af.unmatched and opts.drop_unsupported:
        for lm in af.unmatched:
            result.dropped.append((lm.name, f"matches no layer of a {arch} model"))
    elif af.unmatched:
        names = ", ".join(lm.name for lm in af.unmatched[:3])
        raise BadInput(input_path, f"{len(af.unmatched)} module(s) match no layer of a {arch} model: {names}",
                       hint="pass --base CHECKPOINT for a non-standard model, or --drop-unsupported")
    if af.groups.embeddings:
        if opts.to == "lycoris" or opts.to == "kohya":
            pass  # kept below
        else:
            result.dropped.append((f"{len(af.groups.embeddings)} bundled embedding tensor(s)",
                                   f"{opts.to} files cannot carry bundled embeddings"))
    keep = opts.algo is None  # values copied as they are; an SVD (--algo lora) cannot factor NaN/Inf
    tally = NonFinite(opts.allow_nonfinite and keep, hint=HINT if keep else
                      "an SVD cannot factor it; --allow-nonfinite applies without --algo lora")
    for lm in af.parsed:
        if lm.target is not None:
            tally.check_all(input_path, lm.name, lm.module.tensors)
    base_view = None
    outs: list[_Out] = []
    refused: list[tuple[str, str]] = []
    for lm in af.parsed:
        mod, tgt = lm.module, lm.target
        if tgt is None:
            continue
        kind = _kind(mod)
        tensors = dict(mod.tensors)
        rank_in = mod.rank
        algo_in = kind
        if kind == "adalora":
            tensors = _adalora_to_lora(mod)
            if tensors is None:
                result.lossless_changes.append(f"{lm.name}: AdaLoRA module pruned to rank 0 (ΔW = 0), not written")
                continue
            kind = "lora"
            if "AdaLoRA lora_E folded into lora_down (exact)" not in result.lossless_changes:
                result.lossless_changes.append("AdaLoRA lora_E folded into lora_down (exact)")
        rec = LayerRecord(name="", source=lm.name, component=tgt.component, module=tgt.module, algo_in=algo_in,
                          algo_out=kind, rank_in=rank_in, rank_out=rank_in)
        change = opts.algo == "lora" and (kind != "lora" or (opts.mode == "fixed" and rank_in > opts.rank)
                                          or opts.mode != "fixed")
        if change:
            if kind in _NEEDS_BASE and base_view is None:
                if not opts.base:
                    raise BadInput(input_path, f"{lm.name}: {KIND_TEXT.get(kind, kind)} depends on the base weight; "
                                   "converting it to LoRA needs --base CHECKPOINT")
                from ..layouts.model_view import CheckpointView

                base_view = CheckpointView.open(opts.base)
            if kind == "norm" or len(tgt.shape) < 2:
                refused.append((lm.name, f"{KIND_TEXT.get(kind, kind)} of a 1-D weight has no LoRA form"))
                continue
            tensors, rec = _to_lora(lm, kind, tensors, rec, opts, base_view)
            kind = "lora"
        elif kind not in HOLDS[opts.to]:
            refused.append((lm.name, f"--to {opts.to} cannot hold {KIND_TEXT.get(kind, kind)}"))
            continue
        if kind in ("lora", "dora") and "lora_up.weight" in tensors:
            tensors = _fit_lora(tensors, tgt.shape)
        outs.append(_Out(lm, kind, tensors, rec))
    if refused:
        if not opts.drop_unsupported:
            what = Counter(w for _, w in refused)
            desc = "; ".join(f"{w}: {n}" for w, n in what.items())
            raise BadInput(input_path, f"{len(refused)} module(s) cannot be converted ({desc}); "
                           f"first: {refused[0][0]}; nothing written",
                           hint="use --algo lora --rank N to turn them into plain LoRA by SVD, "
                                "--to lycoris to keep them, or --drop-unsupported to leave them out")
        for name, why in refused:
            result.dropped.append((name, why))
    if not outs:
        raise BadInput(input_path, "nothing left to write")
    if opts.to == "peft":
        _check_peft(outs, input_path)

    writer = {"kohya": _write_flat, "lycoris": _write_flat, "comfy": _write_flat, "diffusers": _write_diffusers,
              "peft": _write_peft}[opts.to]
    if not tally.found:
        for o in outs:
            tally.check_all(input_path, o.lm.name, o.tensors)
    writer(af, outs, arch, index, output, opts, overwrite, input_path, result)
    tally.warn()
    result.layers = [o.record for o in outs]
    if report_path:
        write_text_atomic(report_path, json.dumps(result.summary(), indent=1, default=str), [input_path])
    return result


def _check_output(output: Path, inputs, to: str, overwrite: bool):
    if to == "peft":
        check_output_folder(output, inputs, overwrite)
        if output.exists() and not output.is_dir():
            raise BadInput(output, "--to peft writes a folder, and this path is a file")
    else:
        check_output(output, inputs, overwrite)


def _to_lora(lm, kind, tensors, rec: LayerRecord, opts: AdapterOptions, base_view):
    """Plain LoRA of the module's effective ΔW by SVD (exact for small layers), the error reported."""
    mod, tgt = lm.module, lm.target
    shape = tuple(tgt.shape)
    hint = mod.weight_shape_hint() if rec.algo_in != "adalora" else None
    if hint is not None and math.prod(hint) != math.prod(shape):
        raise BadInput(lm.name, f"this module builds a {list(hint)} ΔW but the {tgt.component} layer {tgt.module} of a "
                       f"standard model is {list(shape)}", hint="pass --base CHECKPOINT (the model the adapter is for)")
    if kind in _NEEDS_BASE:
        w = base_view.get(tgt.component, tgt.module + ".weight").float()
        bias = None
        merged, _ = mod.apply(w, 1.0, bias)
        delta = merged - w
    elif rec.algo_in == "adalora":  # folded into LoRA tensors already
        from ..adapters import parse_module

        delta = parse_module(lm.name, tensors).delta(shape)
    else:
        delta = mod.delta(shape)
    M = delta.reshape(shape[0], -1)
    param = float(opts.rank if opts.mode == "fixed" else opts.mode_param)
    max_rank = opts.max_rank or (opts.rank if opts.mode != "fixed" else None)
    svd, r = spectrum_for_mode(M, opts.mode, param, max_rank, seed=layer_seed(opts.seed, lm.name))
    f = factorize.lora_from_svd(delta, svd, r)
    notes = []
    if "diff_b" in mod.tensors or "b_norm" in mod.tensors:
        notes.append("lossy: the bias change (diff_b) has no LoRA form and is not written")
    rec.algo_out, rec.rank_out, rec.rel_error = "lora", r, f.error
    rec.kept_energy = kept_energy(svd, r)
    if notes:
        rec.note = "; ".join(notes)
    dt = _main_dtype(mod.tensors)
    out = {k: (v if k == "alpha" else v.to(dt)) for k, v in f.tensors.items()}
    return out, rec


def _main_dtype(tensors) -> torch.dtype:
    for k, v in tensors.items():
        if k != "alpha" and v.is_floating_point():
            return v.dtype
    return torch.float32


def _check_peft(outs: list[_Out], path):
    for comp in PEFT_COMPONENTS:
        kinds = {o.kind for o in outs if o.lm.target.component == comp}
        if len(kinds) > 1:
            raise BadInput(path, f"{comp}: a PEFT adapter holds one method, this one mixes {sorted(kinds)}",
                           hint="use --to lycoris, or --algo lora --rank N")


# ------------------------------------------------------------------------------------------------
# writers
# ------------------------------------------------------------------------------------------------


def _cast(t: torch.Tensor, suffix: str, opts: AdapterOptions) -> torch.Tensor:
    if suffix == "alpha":
        return t.to(torch.float32).reshape(())
    if opts.dtype and t.is_floating_point():
        return t.to(DTYPES[opts.dtype])
    return t


def _kohya_name(arch, index, tgt) -> str:
    ldm = index.ldm_module(tgt) if tgt.component == "unet" and arch.startswith("sdxl") else None
    return kohya_module_name(arch, tgt.component, tgt.module, ldm)


def _kept_metadata(src_meta: dict) -> dict:
    return {k: v for k, v in src_meta.items() if not k.startswith(_META_DROP)}


def _record(opts: AdapterOptions, input_path, result: AdapterResult) -> dict:
    options = {k: v for k, v in dataclasses.asdict(opts).items() if k not in ("no_date",) and v is not None}
    rec = lycotools_record("convert", [{"role": "input", "name": Path(input_path).name}], options)
    if result.lossy_layers or result.dropped:
        rec["lycotools.convert.lossy"] = json.dumps({
            "lossy_layers": len(result.lossy_layers), "worst_rel_error": result.worst_error,
            "dropped": [m for m, _ in result.dropped]}, sort_keys=True)
    return rec


def _network_meta(arch, outs, opts, src_meta):
    kinds = {o.kind for o in outs}
    ranks = [o.record.rank_out for o in outs if o.record.rank_out]
    alphas = [float(o.tensors["alpha"]) for o in outs if "alpha" in o.tensors]
    dim = Counter(ranks).most_common(1)[0][0] if ranks else src_meta.get("ss_network_dim", "1")
    alpha = Counter(alphas).most_common(1)[0][0] if alphas else dim
    lycoris = kinds - {"lora"}
    module = "lycoris.kohya" if lycoris else "networks.lora"
    meta = network_metadata(arch, module, dim, alpha, None)
    args = src_meta.get("ss_network_args")
    if args and opts.algo is None and (src_meta.get("ss_network_module", module) == module):
        meta["ss_network_args"] = args
    elif opts.algo == "lora":
        meta["ss_network_args"] = json.dumps({"algo": "lora", "converted_by": "lycotools convert"}, sort_keys=True)
    return meta


def _flat_entries(af, outs, arch, index, opts) -> dict[str, torch.Tensor]:
    sd: dict[str, torch.Tensor] = {}
    for o in outs:
        tgt = o.lm.target
        if opts.to == "comfy" and tgt.component == "unet":
            ldm = index.ldm_module(tgt)
            if ldm is None:
                raise BadInput(af.path, f"{o.lm.name}: no ldm name known for UNet module {tgt.module}")
            name = "diffusion_model." + ldm
        else:
            name = _kohya_name(arch, index, tgt)
        o.record.name = name
        for suf, t in o.tensors.items():
            key = f"{name}.{suf}"
            if key in sd:
                raise BadInput(af.path, f"two modules of the input both write {key}")
            sd[key] = _cast(t, suf, opts)
    if af.groups.embeddings and opts.to in ("kohya", "lycoris"):
        for k in af.groups.embeddings:
            sd[k] = af.source.get(k)
    return sd


def _write_flat(af, outs, arch, index, output, opts, overwrite, input_path, result):
    sd = _flat_entries(af, outs, arch, index, opts)
    meta = _kept_metadata(af.source.metadata)
    meta.update(_network_meta(arch, outs, opts, af.source.metadata))
    kind = "lycoris" if any(o.kind != "lora" for o in outs) else "lora"
    meta.update(modelspec(arch, kind, output.stem, no_date=opts.no_date))
    meta["ss_output_name"] = output.stem
    meta.update(_record(opts, input_path, result))
    save_tensors(output, sd, meta, inputs=[input_path], overwrite=overwrite)


def _te_tree_path(comp: str, module: str) -> str:
    """A text-encoder module path as the transformers 5 module tree names it (PEFT keys and patterns)."""
    if comp == "text_encoder" and module.startswith("text_model."):
        return module[len("text_model."):]
    return module


def _peft_module_path(tgt) -> str:
    return _te_tree_path(tgt.component, tgt.module) if tgt.component in TE_COMPONENTS else tgt.module


def _lora_config(entries: list[tuple[str, int, float]], use_dora: bool) -> dict:
    """PEFT LoraConfig fields for modules (path, rank, alpha): most common r/alpha, patterns for the rest."""
    ranks = Counter(r for _, r, _ in entries)
    r = max(ranks.items(), key=lambda kv: (kv[1], -kv[0]))[0]
    alphas = Counter(a for _, _, a in entries)
    alpha = max(alphas.items(), key=lambda kv: (kv[1], -kv[0]))[0]
    rank_pattern = {p: rr for p, rr, _ in entries if rr != r}
    alpha_pattern = {p: _num(a) for p, _, a in entries if a != alpha}
    return {
        "peft_type": "LORA", "r": r, "lora_alpha": _num(alpha), "target_modules": sorted(p for p, _, _ in entries),
        "rank_pattern": rank_pattern, "alpha_pattern": alpha_pattern, "lora_dropout": 0.0, "bias": "none",
        "use_dora": use_dora, "use_rslora": False, "init_lora_weights": True, "fan_in_fan_out": False,
        "lora_bias": False,
    }


def _loha_config(cfg: dict, group: list, path) -> dict:
    """PEFT LoHaConfig: ``alpha`` instead of ``lora_alpha``; ``use_effective_conv2d`` says whether k×k convs
    carry Tucker cores (hada_t1/t2), so every k×k conv module must agree."""
    tucker = {"hada_t1" in o.tensors for o in group if len(o.lm.target.shape) == 4 and o.lm.target.shape[2:] != (1, 1)}
    if len(tucker) > 1:
        raise BadInput(path, "PEFT LoHa has one use_effective_conv2d setting; this file mixes Tucker and plain "
                       "LoHa on k×k convs", hint="use --to lycoris")
    return {
        "peft_type": "LOHA", "r": cfg["r"], "alpha": cfg["lora_alpha"], "target_modules": cfg["target_modules"],
        "rank_pattern": cfg["rank_pattern"], "alpha_pattern": cfg["alpha_pattern"], "rank_dropout": 0.0,
        "module_dropout": 0.0, "use_effective_conv2d": bool(tucker and tucker.pop()), "init_weights": True,
    }


def _lokr_blocks(o: _Out) -> tuple[tuple[int, int], tuple[int, int]]:
    """((a, b), (c, d)) of a LoKr module: out = a·b, in = c·d, W1 (a, c), W2 (b, d[, k...])."""
    t = o.tensors
    a, c = (t["lokr_w1"].shape if "lokr_w1" in t else (t["lokr_w1_a"].shape[0], t["lokr_w1_b"].shape[1]))
    if "lokr_w2" in t:
        b, d = t["lokr_w2"].shape[:2]
    elif "lokr_t2" in t:
        b, d = t["lokr_w2_a"].shape[1], t["lokr_w2_b"].shape[1]
    else:  # a factored conv W2 is stored flat: (b, r) @ (r, d·kh·kw)
        k = math.prod(o.lm.target.shape[2:]) if len(o.lm.target.shape) > 2 else 1
        b, d = t["lokr_w2_a"].shape[0], t["lokr_w2_b"].shape[1] // k
    return (int(a), int(b)), (int(c), int(d))


def _lokr_rank_alpha(o: _Out) -> tuple[int, float]:
    """The (r, alpha) PEFT needs to rebuild this module's blocks with this module's scale: PEFT decides
    which blocks are factored from r (as LyCORIS does) and always scales by alpha/r, where LyCORIS uses
    1 when both blocks are full. A module with both blocks full gets the smallest r that keeps W2 full."""
    t = o.tensors
    for k in ("lokr_w1_b", "lokr_w2_b"):
        if k in t:
            r = int(t[k].shape[0])
            break
    else:
        (_, b), (_, d) = _lokr_blocks(o)
        r = max(1, math.ceil(max(b, d) / 2))
    return r, float(o.lm.module.scale) * r


def _lokr_config(cfg: dict, group: list, path) -> dict:
    """PEFT LoKrConfig. PEFT rebuilds every module's blocks from one ``decompose_factor``, one
    ``decompose_both`` and each module's r, so all three must reproduce the file's shapes; a file they
    cannot (blocks split another way, a factored W1 beside a full one at the same small rank) is refused."""
    blocks = {o.lm.name: _lokr_blocks(o) for o in group}
    out_in = {n: (ab[0] * ab[1], cd[0] * cd[1]) for n, (ab, cd) in blocks.items()}
    candidates = [-1] + sorted({v for (ab, cd) in blocks.values() for v in (*ab, *cd)})
    factor = next((f for f in candidates if all(
        (lokr_math.factorization(out_in[n][0], f), lokr_math.factorization(out_in[n][1], f)) == blocks[n]
        for n in blocks)), None)
    if factor is None:
        raise BadInput(path, "PEFT LoKr splits every layer with one decompose_factor; no factor gives this file's "
                       "block shapes", hint="use --to lycoris")
    both = any("lokr_w1_a" in o.tensors for o in group)
    tucker = {"lokr_t2" in o.tensors for o in group
              if len(o.lm.target.shape) == 4 and o.lm.target.shape[2:] != (1, 1) and "lokr_w2" not in o.tensors}
    if len(tucker) > 1:
        raise BadInput(path, "PEFT LoKr has one use_effective_conv2d setting; this file mixes Tucker and plain "
                       "LoKr on k×k convs", hint="use --to lycoris")
    for o in group:  # PEFT's own rule for which blocks are factored, at the r it will be given
        r, _ = _lokr_rank_alpha(o)
        (a, b), (c, d) = blocks[o.lm.name]
        full_w1, full_w2 = not (both and r < max(a, c) / 2), r >= max(b, d) / 2
        if full_w1 != ("lokr_w1" in o.tensors) or full_w2 != ("lokr_w2" in o.tensors):
            raise BadInput(path, f"PEFT LoKr would lay out module {o.lm.name} differently at rank {r} "
                           f"(W1 {'full' if full_w1 else 'factored'}, W2 {'full' if full_w2 else 'factored'})",
                           hint="use --to lycoris")
    return {
        "peft_type": "LOKR", "r": cfg["r"], "alpha": cfg["lora_alpha"], "target_modules": cfg["target_modules"],
        "rank_pattern": cfg["rank_pattern"], "alpha_pattern": cfg["alpha_pattern"], "rank_dropout": 0.0,
        "module_dropout": 0.0, "use_effective_conv2d": bool(tucker and tucker.pop()), "decompose_both": both,
        "decompose_factor": factor, "rank_dropout_scale": False, "init_weights": True,
    }


def _num(a: float):
    return int(a) if float(a).is_integer() else float(a)


def _alpha_of(o: _Out) -> float:
    if "alpha" in o.tensors:
        return float(o.tensors["alpha"])
    return float(o.tensors["lora_down.weight"].shape[0])


def _write_diffusers(af, outs, arch, index, output, opts, overwrite, input_path, result):
    sd: dict[str, torch.Tensor] = {}
    per_comp: dict[str, list] = {}
    for o in outs:
        tgt = o.lm.target
        t = o.tensors
        r = int(t["lora_down.weight"].shape[0])
        alpha = _alpha_of(o)
        up, down = t["lora_up.weight"], t["lora_down.weight"]
        if opts.fold_alpha and alpha != r:
            s = alpha / r
            up = (up.float() * s).to(up.dtype)
            alpha = float(r)
            o.record.note = (o.record.note + "; " if o.record.note else "") + f"alpha/r = {s:g} folded into lora_up"
        name = f"{tgt.component}.{tgt.module}"
        o.record.name = name
        # text encoders: diffusers' own training-script form. diffusers 0.42 cannot infer the format of a TE
        # state dict holding only PEFT-named MLP keys (lora_A) and raises; lora_linear_layer loads in every case
        a, b = ("lora_linear_layer.down", "lora_linear_layer.up") if tgt.component in TE_COMPONENTS else ("lora_A", "lora_B")
        sd[f"{name}.{a}.weight"] = _cast(down, "lora_down.weight", opts)
        sd[f"{name}.{b}.weight"] = _cast(up, "lora_up.weight", opts)
        per_comp.setdefault(tgt.component, []).append((_peft_module_path(tgt), r, alpha))
    flat_cfg = {}
    for comp, entries in per_comp.items():
        cfg = _lora_config(entries, False)
        cfg.pop("peft_type")
        for k, v in cfg.items():
            flat_cfg[f"{comp}.{k}"] = v
    meta = {"format": "pt"}
    if not opts.fold_alpha:  # folded: alpha = rank everywhere, which is what loaders assume without metadata
        meta["lora_adapter_metadata"] = json.dumps(flat_cfg, indent=2, sort_keys=True)
    meta.update({k: v for k, v in _kept_metadata(af.source.metadata).items() if k.startswith(("ss_", "modelspec."))})
    meta.update(modelspec(arch, "lora", output.stem, no_date=opts.no_date))
    meta.update(_record(opts, input_path, result))
    save_tensors(output, sd, meta, inputs=[input_path], overwrite=overwrite)


def _write_peft(af, outs, arch, index, output, opts, overwrite, input_path, result):
    by_comp: dict[str, list[_Out]] = {}
    for o in outs:
        by_comp.setdefault(o.lm.target.component, []).append(o)
    output = Path(output)
    with atomic_folder(output) as tmp:
        for comp, group in by_comp.items():
            folder = tmp / comp
            folder.mkdir()
            sd, entries = {}, []
            kind = group[0].kind
            use_dora = kind == "dora"
            for o in group:
                tgt, t = o.lm.target, o.tensors
                path = _peft_module_path(tgt)
                o.record.name = f"{comp}/{path}"
                key = f"base_model.model.{path}"
                if kind in ("loha", "lokr"):
                    if kind == "loha":
                        entries.append((path, int(t["hada_w1_b"].shape[0]), _alpha_of(o)))
                    else:
                        entries.append((path, *_lokr_rank_alpha(o)))
                    for suf, v in t.items():
                        if suf.startswith(("hada_", "lokr_")):
                            sd[f"{key}.{suf}"] = _cast(v, suf, opts)
                    continue
                r = int(t["lora_down.weight"].shape[0])
                entries.append((path, r, _alpha_of(o)))
                sd[f"{key}.lora_A.weight"] = _cast(t["lora_down.weight"], "lora_down.weight", opts)
                sd[f"{key}.lora_B.weight"] = _cast(t["lora_up.weight"], "lora_up.weight", opts)
                if use_dora:
                    ds = t["dora_scale"].reshape(-1)
                    if len(tgt.shape) == 4:
                        ds = ds.reshape(1, -1, 1, 1)
                    sd[f"{key}.lora_magnitude_vector"] = _cast(ds, "dora_scale", opts)
            cfg = _lora_config(entries, use_dora)
            if kind == "loha":
                cfg = _loha_config(cfg, group, input_path)
            elif kind == "lokr":
                cfg = _lokr_config(cfg, group, input_path)
            cfg.update({"base_model_name_or_path": None, "task_type": None, "inference_mode": True,
                        "modules_to_save": None, "revision": None})
            (folder / "adapter_config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
            meta = {"format": "pt"}
            meta.update(modelspec(arch, "lora", f"{output.name}/{comp}", no_date=opts.no_date))
            meta.update(_record(opts, input_path, result))
            save_tensors(folder / "adapter_model.safetensors", sd, meta)


def print_summary(result: AdapterResult):
    import click

    def say(line):
        click.echo(line, err=True)

    n = len(result.layers)
    lossy = result.lossy_layers
    say(f"lycotools: wrote {result.output} ({result.target}, {result.arch}, {n} modules)")
    for c in result.lossless_changes:
        say(f"lycotools: note: {c}")
    if lossy:
        worst = max(lossy, key=lambda l: l.rel_error)
        say(f"lycotools: warning: lossy: {len(lossy)} of {n} modules changed by SVD to plain LoRA; worst relative "
            f"ΔW error {worst.rel_error:.4g} ({worst.name}, rank {worst.rank_in} -> {worst.rank_out})")
        notes = [l for l in lossy if l.note]
        for l in notes[:5]:
            say(f"lycotools: warning: {l.name}: {l.note}")
    if result.dropped:
        say(f"lycotools: warning: lossy: {len(result.dropped)} module(s) left out: "
            + "; ".join(f"{m} ({w})" for m, w in result.dropped[:5]))
    if not lossy and not result.dropped:
        say("lycotools: lossless: every module keeps its ΔW exactly")

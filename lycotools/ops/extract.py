"""``extract``: fine-tuned minus base into a LoRA, LoCon, LoHa, LoKr or full-diff adapter.

Streams one weight pair at a time from both models (positioned reads), in any pair of layouts; each ΔW is
factored in float32 by a seeded randomized SVD (exact where small or where the mode needs the
whole spectrum), and each module is written to disk as soon as it is made.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from ..devices import ADAPTER_DTYPES as DTYPES, device_of
from .. import validate
from ..errors import BadInput
from ..finite import NonFinite
from ..io.metadata import lycotools_record, modelspec, network_metadata
from ..io.writer import SafetensorsWriter, check_output, write_text_atomic
from ..layouts.adapter_keys import kohya_module_name
from ..layouts.model_view import CheckpointView
from ..linalg import (MODES, LayerSpectrum, allocate_budget, kept_energy, layer_seed, lora_cost, parse_budget,
                      spectrum_for_mode, truncated_svd)
from . import factorize

ALGOS = ("lora", "locon", "loha", "lokr", "full")
NOISE_RTOL = 1e-5  # --budget: singular values below this fraction of a layer's largest are float noise, never paid for
HIGH_ERROR = 0.5  # a layer extracted with a relative Frobenius error above this (under 75% of its energy) is named
PARTS = ("unet", "te", "te1", "te2")
_TE_SKIP = ("embeddings.",)


@dataclass
class ExtractOptions:
    algo: str = "locon"
    rank: int = 32
    conv_rank: int | None = None
    mode: str = "fixed"
    mode_param: float | None = None
    conv_mode_param: float | None = None
    max_rank: int | None = None
    budget: str | None = None
    parts: tuple = ("unet", "te")
    tucker: bool = False
    include_norms: bool = False
    min_diff: float = 0.0
    device: str = "cpu"
    dtype: str = "fp16"
    seed: int = 0
    loha_steps: int = 200
    full_fallback: bool = True  # store a layer whole when its rank would not save space
    lokr_factor: int = -1
    no_date: bool = False

    def __post_init__(self):
        if self.algo not in ALGOS:
            raise BadInput(None, f"unknown --algo {self.algo!r}; expected one of {', '.join(ALGOS)}")
        if self.dtype not in DTYPES:
            raise BadInput(None, f"unknown --dtype {self.dtype!r}; expected fp16, bf16 or fp32")
        if self.mode not in MODES:
            raise BadInput(None, f"unknown --mode {self.mode!r}; expected one of {', '.join(MODES)}")
        for name, v in (("--rank", self.rank), ("--conv-rank", self.conv_rank), ("--max-rank", self.max_rank)):
            validate.positive_int(name, v)
        validate.mode_param(self.mode, self.mode_param)
        if self.conv_mode_param is not None:
            validate.mode_param(self.mode, self.conv_mode_param, name="--conv-mode-param")
        validate.budget("--budget", self.budget)
        validate.finite("--min-diff", self.min_diff, 0.0, optional=False)
        validate.positive_int("--loha-steps", self.loha_steps, minimum=0, optional=False)
        if self.lokr_factor != -1:
            validate.positive_int("--lokr-factor (-1: balanced)", self.lokr_factor, optional=False)

    @property
    def file_alpha(self) -> float:
        """The alpha every LoRA module of the file gets (alpha = rank for a fixed rank)."""
        if self.mode == "fixed" and not self.budget:
            return float(self.rank)
        return float(self.max_rank or self.rank)

    def param_for(self, conv3: bool) -> float:
        if self.mode == "fixed":
            return float(self.conv_rank if conv3 and self.conv_rank else self.rank)
        p = self.conv_mode_param if conv3 and self.conv_mode_param is not None else self.mode_param
        return float(p)


@dataclass
class LayerReport:
    name: str
    component: str
    module: str
    shape: tuple
    kind: str  # lora | tucker | loha | lokr | full | norm
    rank: int | None
    kept_energy: float | None
    rel_error: float
    params: int
    note: str = ""


@dataclass
class ExtractResult:
    output: Path
    layers: list[LayerReport] = field(default_factory=list)
    unchanged: dict[str, int] = field(default_factory=dict)
    changed: dict[str, int] = field(default_factory=dict)
    skipped_bias: int = 0
    params: int = 0

    def part_summary(self) -> dict:
        out = {}
        for comp in sorted(set(self.unchanged) | set(self.changed)):
            ranks = [l.rank for l in self.layers if l.component == comp and l.rank]
            out[comp] = {
                "changed_layers": self.changed.get(comp, 0),
                "unchanged_layers": self.unchanged.get(comp, 0),
                "rank_min": min(ranks) if ranks else None,
                "rank_max": max(ranks) if ranks else None,
                "stored_whole": sum(l.component == comp and l.kind == "full" for l in self.layers),
                # modules with no rank to show: LoKr with both blocks whole, norms, layers the budget left out
                "lokr_whole_blocks": sum(l.component == comp and l.kind == "lokr" and not l.rank for l in self.layers),
                "norms": sum(l.component == comp and l.kind == "norm" for l in self.layers),
                "no_budget": sum(l.component == comp and l.kind == "skipped" for l in self.layers),
            }
        return out

    def poor_layers(self, threshold: float = HIGH_ERROR) -> list[LayerReport]:
        """Stored layers whose relative Frobenius error is above ``threshold``, worst first."""
        return sorted((l for l in self.layers if l.params and l.rel_error > threshold), key=lambda l: -l.rel_error)


def _parts_to_components(parts, arch: str) -> set[str]:
    comps = set()
    for p in parts:
        if p == "unet":
            comps.add("unet")
        elif p == "te":
            comps |= {"text_encoder", "text_encoder_2"}
        elif p == "te1":
            comps.add("text_encoder")
        elif p == "te2":
            comps.add("text_encoder_2")
        else:
            raise BadInput(None, f"unknown part {p!r}; expected one of {', '.join(PARTS)}")
    return comps


def _layer_kind(comp: str, key: str, shape: tuple, algo: str, include_norms: bool) -> str | None:
    """What to do with a weight: 'linear', 'conv1', 'conv3', 'norm', or None (skip)."""
    if not key.endswith(".weight"):
        return None
    if comp.startswith("text_encoder") and any(s in key for s in _TE_SKIP):
        return None
    if len(shape) == 2:
        return "linear"
    if len(shape) == 4:
        if shape[2:] == (1, 1):
            return "conv1"
        return "conv3" if algo != "lora" else None
    if len(shape) == 1 and include_norms and "norm" in key:
        return "norm"
    return None


def _check_pair(base: CheckpointView, tuned: CheckpointView, comps: set[str]):
    if base.arch != tuned.arch:
        bk = {k for k in base.keys() if k[0] in comps}
        tk = {k for k in tuned.keys() if k[0] in comps}
        diff = sorted(bk ^ tk)
        first = f"{diff[0][0]}.{diff[0][1]}" if diff else "(none)"
        raise BadInput(tuned.path, f"architecture mismatch: base is {base.arch}, this is {tuned.arch}; first differing key: {first}")
    for ck in base.keys():
        if ck[0] not in comps:
            continue
        if ck not in tuned:
            raise BadInput(tuned.path, f"architecture mismatch with the base: key {ck[0]}.{ck[1]} is missing")
        if base.shape(*ck) != tuned.shape(*ck):
            raise BadInput(tuned.path, f"architecture mismatch with the base: {ck[0]}.{ck[1]} has shape "
                           f"{list(tuned.shape(*ck))}, base has {list(base.shape(*ck))}")
    for ck in tuned.keys():
        if ck[0] in comps and ck not in base:
            raise BadInput(tuned.path, f"architecture mismatch with the base: key {ck[0]}.{ck[1]} is not in the base")


def _finite(t: torch.Tensor, path, key: str):
    if t.is_floating_point() and not bool(torch.isfinite(t).all()):
        raise BadInput(path, f"weight {key} contains NaN or infinite values")


def extract(base_path, tuned_path, output, opts: ExtractOptions, *, overwrite: bool = False,
            report_path=None, quiet: bool = False) -> ExtractResult:
    dev = device_of(opts.device)
    output = check_output(output, [base_path, tuned_path], overwrite)
    base = CheckpointView.open(base_path)
    tuned = CheckpointView.open(tuned_path)
    comps = _parts_to_components(opts.parts, base.arch)
    _check_pair(base, tuned, comps)
    out_dtype = DTYPES[opts.dtype]

    layers = []
    for comp, key in base.keys():
        if comp not in comps:
            continue
        kind = _layer_kind(comp, key, base.shape(comp, key), opts.algo, opts.include_norms)
        if kind:
            layers.append((comp, key, kind))

    result = ExtractResult(output=output)
    allocated = None
    if opts.budget:
        allocated = _allocate(base, tuned, layers, opts, dev, quiet)

    arch = base.arch
    meta_algo = opts.algo
    lycoris_format = opts.algo in ("loha", "lokr", "full") or opts.tucker
    with SafetensorsWriter(output, {}, inputs=[base_path, tuned_path], overwrite=overwrite) as w:
        bar = tqdm(layers, desc=f"extract {Path(tuned_path).name}", unit="layer", file=sys.stderr, disable=quiet)
        for comp, key, kind in bar:
            module = key[: -len(".weight")]
            tb = base.get(comp, key).to(dev, torch.float32)
            tt = tuned.get(comp, key).to(dev, torch.float32)
            _finite(tb, base.path, key)
            _finite(tt, tuned.path, key)
            delta = tt - tb
            del tb, tt
            bias_delta = None
            bkey = module + ".bias"
            if (comp, bkey) in base and (comp, bkey) in tuned:
                bias_delta = tuned.get(comp, bkey).float() - base.get(comp, bkey).float()
                if not bool(bias_delta.abs().max() > opts.min_diff):
                    bias_delta = None
            changed = bool(delta.abs().max() > opts.min_diff) if delta.numel() else False
            if not changed and bias_delta is None:
                result.unchanged[comp] = result.unchanged.get(comp, 0) + 1
                continue
            result.changed[comp] = result.changed.get(comp, 0) + 1
            name = kohya_module_name(arch, comp, module, base.ldm_module(comp, module) if comp == "unet" and arch.startswith("sdxl") else None)
            rep = _extract_layer(name, comp, module, kind, delta, bias_delta, opts, allocated, result)
            out = {s: t.detach().to("cpu", torch.float32 if s == "alpha" else out_dtype).contiguous()
                   for s, t in rep[0].items()}
            NonFinite(hint="a wider --dtype (fp32, bf16) holds it").check_all(tuned.path, name, out)
            for suffix, t in out.items():
                w.add(f"{name}.{suffix}", t)
            result.layers.append(rep[1])
            result.params += rep[1].params
        bar.close()
        ranks = [l.rank for l in result.layers if l.rank]
        dim = max(ranks) if ranks else 0
        alpha = opts.file_alpha if opts.algo in ("lora", "locon") else dim
        network_module = "lycoris.kohya" if lycoris_format else "networks.lora"
        args = {"algo": meta_algo, "mode": opts.mode}
        if opts.algo in ("locon", "loha", "lokr") and not opts.budget:
            args["conv_dim"] = opts.conv_rank or opts.rank
            args["conv_alpha"] = alpha
        meta = network_metadata("sd2-v" if arch == "sd2" and base.info.prediction == "v" else arch,
                                network_module, dim, alpha, args)
        meta.update(modelspec(arch, "lycoris" if lycoris_format else "lora", output.stem, no_date=opts.no_date,
                              prediction=("v" if base.info.prediction == "v" else None)))
        meta["ss_sd_model_name"] = Path(base_path).name
        meta["ss_output_name"] = output.stem
        meta.update(lycotools_record(
            "extract",
            [{"role": "base", "name": Path(base_path).name}, {"role": "tuned", "name": Path(tuned_path).name}],
            {k: v for k, v in opts.__dict__.items() if k not in ("no_date",)},
        ))
        meta["lycotools.extract.parts"] = json.dumps(result.part_summary(), sort_keys=True)
        w.metadata.update(meta)
    if report_path:
        _write_report(report_path, result, opts)
    return result


def _extract_layer(name, comp, module, kind, delta, bias_delta, opts: ExtractOptions, allocated, result):
    shape = tuple(delta.shape)
    seed = layer_seed(opts.seed, name)
    if kind == "norm":
        t = {"w_norm": delta}
        if bias_delta is not None:
            t["b_norm"] = bias_delta
        return t, LayerReport(name, comp, module, shape, "norm", None, 1.0, 0.0, sum(v.numel() for v in t.values()))
    diff_b = bias_delta if opts.include_norms else None
    if bias_delta is not None and diff_b is None:
        result.skipped_bias += 1
    if opts.algo == "full":
        f = factorize.full_diff(delta, diff_b)
        return f.tensors, LayerReport(name, comp, module, shape, "full", None, 1.0, 0.0, f.params)
    M = delta.reshape(shape[0], -1)
    conv3 = kind == "conv3"
    full_params = M.numel()
    if allocated is not None:
        r = allocated.get(name, 0)
        if r <= 0:
            return {}, LayerReport(name, comp, module, shape, "skipped", 0, 0.0, 1.0, 0, "no budget left for this layer")
        svd = truncated_svd(M, r, seed=seed)
    else:
        param = opts.param_for(conv3)
        svd, r = spectrum_for_mode(M, opts.mode, param, opts.max_rank, seed=seed)
    if opts.algo in ("lora", "locon") and opts.full_fallback and lora_cost(shape, r) >= full_params:
        f = factorize.full_diff(delta, diff_b)
        return f.tensors, LayerReport(name, comp, module, shape, "full", None, 1.0, 0.0, f.params,
                                      f"rank {r} would not save space; stored whole")
    if opts.algo == "loha":
        f = factorize.loha_refine(delta, svd, min(r, svd.S.numel()), steps=opts.loha_steps, seed=seed)
        kind_name = "loha"
    elif opts.algo == "lokr":
        f = factorize.lokr_nearest(delta, r, factor=opts.lokr_factor)
        kind_name = "lokr"
    elif conv3 and opts.tucker:
        f = factorize.lora_tucker(delta, r)
        kind_name = "tucker"
    else:
        f = factorize.lora_from_svd(delta, svd, r)
        kind_name = "lora"
        _uniform_alpha(f.tensors, r, opts.file_alpha)
    if diff_b is not None:
        result.skipped_bias += 1  # low-rank modules carry no bias term in any consumer's format
    ke = kept_energy(svd, r) if kind_name in ("lora", "loha") else None
    return f.tensors, LayerReport(name, comp, module, shape, kind_name, f.rank, ke, f.error, f.params, f.note)


def _uniform_alpha(tensors: dict, r: int, alpha: float):
    """Store the file's one alpha and fold alpha/r into ``lora_up`` so ΔW stays exact.

    diffusers reads a single alpha per file for SD attention modules (its per-module
    ``alpha_pattern`` names do not match them), so files whose modules have different ranks must
    not rely on per-module alpha = rank.
    """
    if alpha == r:
        return
    tensors["lora_up.weight"] = tensors["lora_up.weight"] * (r / alpha)
    tensors["alpha"] = torch.tensor(float(alpha), dtype=torch.float32)


def _allocate(base, tuned, layers, opts: ExtractOptions, dev, quiet) -> dict[str, int]:
    """Global budget: one pass collecting each layer's spectrum, then ranks where S² per parameter is largest."""
    spectra, total_full = [], 0
    cap = opts.max_rank or 256
    for comp, key, kind in tqdm(layers, desc="spectra", unit="layer", file=sys.stderr, disable=quiet):
        if kind == "norm":
            continue
        d = (tuned.get(comp, key).to(dev, torch.float32) - base.get(comp, key).to(dev, torch.float32))
        if not bool(d.abs().max() > opts.min_diff):
            continue
        shape = tuple(d.shape)
        module = key[: -len(".weight")]
        name = kohya_module_name(base.arch, comp, module, base.ldm_module(comp, module) if comp == "unet" and base.arch.startswith("sdxl") else None)
        M = d.reshape(shape[0], -1)
        total_full += M.numel()
        s = truncated_svd(M, min(cap, min(M.shape)), seed=layer_seed(opts.seed, name))
        per = lora_cost(shape, 1)
        # up to the first rank whose LoRA is no smaller than the layer: a layer the budget takes that far is
        # stored whole (exact, --full-fallback); capping one rank below left it at that rank's error
        whole_at = -(-M.numel() // per)
        S = s.S.cpu()
        floor = float(S[0]) * NOISE_RTOL if S.numel() else 0.0
        scores = [float(x) ** 2 for x in S if float(x) > floor]  # no budget spent on rounding noise
        spectra.append(LayerSpectrum(name, scores, per, M.numel(), 0, min(whole_at, cap)))
    bpp = torch.empty((), dtype=DTYPES[opts.dtype]).element_size()
    try:
        budget = parse_budget(opts.budget, total_full, bpp)
    except ValueError as e:
        raise BadInput(None, f"--budget: {e}") from e
    return allocate_budget(spectra, budget)


def _write_report(path, result: ExtractResult, opts: ExtractOptions):
    doc = {
        "output": str(result.output),
        "params": result.params,
        "parts": result.part_summary(),
        "bias_changes_not_stored": result.skipped_bias,
        "layers": [
            {"name": l.name, "component": l.component, "module": l.module, "shape": list(l.shape), "kind": l.kind,
             "rank": l.rank, "kept_energy": l.kept_energy, "rel_error": l.rel_error, "params": l.params,
             **({"note": l.note} if l.note else {})}
            for l in result.layers
        ],
    }
    write_text_atomic(path, json.dumps(doc, indent=1))

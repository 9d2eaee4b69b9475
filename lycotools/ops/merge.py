"""``merge``: adapters into a checkpoint (bake), adapters into one adapter, checkpoints with checkpoints.

Everything streams: the output header is planned from the input's keys, then each tensor is read
(positioned reads), changed if an adapter (or the merge method) touches it, cast and written before the next
one is read, so peak memory stays near one tensor plus the adapters.

Math (docs/adapters.md#multiplier): a ratio m applies as ``W + m·ΔW`` with ΔW = scale·f(factors)
(scale applied once), DoRA/IA3/OFT by their own rules through ``AdapterModule.apply``. Several
adapters on one weight apply in the order given. OpenCLIP q/k/v land in their third of
``in_proj_weight``; ``text_projection`` is transposed back.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from ..adapter_file import AdapterFile
from ..adapters import AdapterModule
from ..adapters.lora import to_tensors as lora_tensors
from ..alloc import streaming_threads
from .. import validate
from ..devices import ADAPTER_DTYPES, CHECKPOINT_DTYPES as DTYPES, cast_to, device_of
from ..errors import BadInput
from ..finite import NonFinite, check_adapter, is_finite
from ..io.metadata import lycotools_record, modelspec, network_metadata
from ..io.readers import DiffusersFolderSource, _component_weights, open_source, prefetch
from ..io.writer import SafetensorsWriter, atomic_folder, check_output, check_output_folder
from ..layouts import checkpoint as ckpt
from ..layouts.adapter_keys import kohya_module_name
from ..layouts.model_index import ModelIndex, unflatten_conv_shape
from ..layouts.model_view import CheckpointView, SingleFileSource
from ..linalg import (LayerSpectrum, allocate_budget, exact_svd, layer_seed, lora_cost, parse_budget,
                      svd_of_product, truncated_svd)

SLOTS = ["BASE"] + [f"IN{i:02d}" for i in range(12)] + ["MID"] + [f"OUT{i:02d}" for i in range(12)]
# LoRA Block Weight layouts (docs/formats.md#lora-block-weight): list positions -> slot names of the 26-slot layout.
LAYOUTS = {
    26: SLOTS,
    17: ["BASE", "IN01", "IN02", "IN04", "IN05", "IN07", "IN08", "MID",
         "OUT03", "OUT04", "OUT05", "OUT06", "OUT07", "OUT08", "OUT09", "OUT10", "OUT11"],
    12: ["BASE", "IN04", "IN05", "IN07", "IN08", "MID", "OUT00", "OUT01", "OUT02", "OUT03", "OUT04", "OUT05"],
    20: ["BASE"] + [f"IN{i:02d}" for i in range(9)] + ["MID"] + [f"OUT{i:02d}" for i in range(9)],
}
SDXL_LENGTHS, SD_LENGTHS = (12, 20), (17, 26)
# Named presets: the LoRA-Block-Weight extension's default table (17-value lists); on SDXL they
# apply to the same slot names.
PRESETS = {name: [float(v) for v in values.split(",")] for name, values in (
    ("NONE", "0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0"),
    ("ALL", "1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1"),
    ("INS", "1,1,1,1,0,0,0,0,0,0,0,0,0,0,0,0,0"),
    ("IND", "1,0,0,0,1,1,1,0,0,0,0,0,0,0,0,0,0"),
    ("INALL", "1,1,1,1,1,1,1,0,0,0,0,0,0,0,0,0,0"),
    ("MIDD", "1,0,0,0,1,1,1,1,1,1,1,1,0,0,0,0,0"),
    ("OUTD", "1,0,0,0,0,0,0,0,1,1,1,1,0,0,0,0,0"),
    ("OUTS", "1,0,0,0,0,0,0,0,0,0,0,0,1,1,1,1,1"),
    ("OUTALL", "1,0,0,0,0,0,0,0,1,1,1,1,1,1,1,1,1"),
    ("ALL0.5", "0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5"),
)}
CKPT_METHODS = ("weighted-sum", "add-difference", "ties", "dare")
ADAPTER_METHODS = ("concat", "svd")


# ------------------------------------------------------------------------------------------------
# small helpers
# ------------------------------------------------------------------------------------------------


def parse_spec(text: str) -> tuple[str, float]:
    """``path[:ratio]`` -> (path, ratio). A trailing ``:number`` is a ratio unless the whole text is a path."""
    text = str(text)
    if ":" in text and not Path(text).exists():
        head, _, tail = text.rpartition(":")
        try:
            ratio = float(tail)
        except ValueError:
            return text, 1.0
        check_ratio(head, ratio)
        return head, ratio
    return text, 1.0


def check_ratio(path, ratio):
    """A ratio is any finite number (a negative one subtracts the adapter, which users do)."""
    try:
        validate.finite("the ratio", ratio, optional=False)
    except BadInput as e:
        raise BadInput(path, e.message) from None


def check_specs(specs):
    for path, ratio in specs:
        check_ratio(path, ratio)


def out_dtype_of(name: str | None):
    if name is None:
        return None
    if name not in DTYPES:
        raise BadInput(None, f"unknown --dtype {name!r}; expected one of {', '.join(DTYPES)}")
    return DTYPES[name]


def _file_hash(src) -> str | None:
    """The input's stored ``sshs_model_hash``, bare hex (files from older lycotools carry a ``0x`` prefix)."""
    h = src.metadata.get("sshs_model_hash") if src is not None else None
    return h[2:] if h and h.startswith("0x") else h


def _kept_metadata(meta: dict) -> dict:
    return {k: v for k, v in meta.items() if not k.startswith(("modelspec.", "lycotools.", "sshs_"))}


# ------------------------------------------------------------------------------------------------
# block weights
# ------------------------------------------------------------------------------------------------


def ldm_slot(path: str) -> int | None:
    """26-slot index of a UNet ldm/sgm module path (no ``model.diffusion_model.`` prefix)."""
    m = re.match(r"input_blocks\.(\d+)\.", path)
    if m:
        return 1 + int(m.group(1))
    if path.startswith("middle_block."):
        return 13
    m = re.match(r"output_blocks\.(\d+)\.", path)
    if m:
        return 14 + int(m.group(1))
    if path.startswith("out."):
        return 25
    return None  # time embedding, label embedding: not in any block (weight 1)


def block_weight_values(text: str) -> list[float] | None:
    """The numbers of a ``--block-weights`` list (None for a preset name), each finite, in a count some
    layout takes (12/20 SDXL, 17/26 SD1/SD2); the count is checked against the model in ``parse_block_weights``."""
    t = str(text).strip()
    if t.upper() in PRESETS:
        return None
    try:
        values = [float(v) for v in re.split(r"[,\s]+", t) if v]
    except ValueError:
        raise BadInput(None, f"--block-weights {text!r}: not a list of numbers or a preset "
                             f"({', '.join(PRESETS)})") from None
    bad = [v for v in values if not math.isfinite(v)]
    if bad:
        raise BadInput(None, f"--block-weights {text!r}: {bad[0]} is not a finite number")
    if len(values) not in LAYOUTS:
        raise BadInput(None, f"--block-weights has {len(values)} values; a block-weight list has "
                             f"{' or '.join(map(str, sorted(LAYOUTS)))} (SDXL 12/20, SD1/SD2 17/26)")
    return values


def parse_block_weights(text: str, arch: str) -> list[float]:
    """A LoRA-Block-Weight list (12/17/20/26 values, commas) or preset name -> 26 slot weights.

    Slots a shorter layout does not list keep weight 1 (what the LBW extension does)."""
    t = str(text).strip()
    sdxl = arch.startswith("sdxl")
    values = block_weight_values(t)
    if values is None:
        values, layout = PRESETS[t.upper()], LAYOUTS[17]
    else:
        n = len(values)
        allowed = SDXL_LENGTHS if sdxl else SD_LENGTHS
        if n not in allowed:
            raise BadInput(None, f"--block-weights has {n} values; a {arch} model takes "
                                 f"{' or '.join(map(str, allowed))} (BASE, IN.., MID, OUT..)")
        layout = LAYOUTS[n]
    weights = [1.0] * 26
    for name, v in zip(layout, values):
        weights[SLOTS.index(name)] = float(v)
    return weights


# ------------------------------------------------------------------------------------------------
# bake: adapters into a checkpoint
# ------------------------------------------------------------------------------------------------


@dataclass
class BakeOptions:
    dtype: str | None = None
    block_weights: tuple = ()  # one spec for all adapters, or one per adapter
    allow_partial: bool = False
    device: str = "cpu"
    no_date: bool = False
    allow_nonfinite: bool = False  # write NaN/Inf an adapter brings (a warning) instead of refusing

    def __post_init__(self):
        out_dtype_of(self.dtype)
        for spec in self.block_weights or ():
            block_weight_values(spec)


@dataclass
class BakeResult:
    output: Path
    arch: str
    modules: int = 0  # adapter modules merged
    weights_changed: int = 0  # checkpoint tensors changed
    skipped: list = field(default_factory=list)  # (adapter, module name, why)


@dataclass
class _Edit:
    mapping: object  # KeyMapping or None (diffusers key)
    mods: list  # [(AdapterModule, ratio)]


def _move(mod: AdapterModule, dev) -> AdapterModule:
    if dev.type == "cpu":
        return mod
    return AdapterModule(mod.name, mod.algo, {k: v.to(dev) for k, v in mod.tensors.items()}, dict(mod.extra))


def _module_fits(lm) -> str | None:
    return lm.module.fit_error(lm.target.shape, lm.target.has_bias)


def _arch_hint(af: AdapterFile) -> str:
    from .inspect import UnsupportedFamily

    try:
        from .inspect import guess_adapter_arch

        arch, _, _ = guess_adapter_arch(af)
        return arch
    except (ImportError, UnsupportedFamily):  # a Flux/SD3/... adapter: say that, not which modules do not fit
        raise
    except Exception:
        return None


def plan_adapters(src, index: ModelIndex, specs, opts: BakeOptions, dev, tally: NonFinite | None = None):
    """Resolve each adapter against the checkpoint; return (weight edits, bias edits, result info).

    Edits are keyed by the checkpoint's source key; several adapters (and q/k/v thirds) share one key.
    """
    arch = index.arch
    bw_specs = list(opts.block_weights or ())
    if bw_specs and len(bw_specs) not in (1, len(specs)):
        raise BadInput(None, f"--block-weights given {len(bw_specs)} times for {len(specs)} adapters; "
                             "give it once (all adapters) or once per adapter")
    weights_edits: dict[str, list[_Edit]] = {}
    bias_edits: dict[str, list[_Edit]] = {}
    skipped, merged = [], 0
    single = index.keymap is not None and src.kind != "diffusers"
    for ai, (apath, ratio) in enumerate(specs):
        af = AdapterFile.open(apath).resolve(index)
        bw = None
        if bw_specs:
            bw = parse_block_weights(bw_specs[0] if len(bw_specs) == 1 else bw_specs[ai], arch)
        bad = [(lm.name, lm.error) for lm in af.errors]
        usable = []
        for lm in af.parsed:
            if lm.target is None:
                bad.append((lm.name, f"matches no module of this {arch} checkpoint"))
                continue
            why = _module_fits(lm)
            if why:
                bad.append((lm.name, why))
                continue
            usable.append(lm)
        for lm in usable:
            (tally or NonFinite()).check_all(apath, lm.name, lm.module.tensors)
        if not af.modules:
            raise BadInput(apath, "holds no adapter modules (is it an adapter file?)")
        if bad and (not opts.allow_partial or not usable):
            guess = _arch_hint(af)
            first = ", ".join(n for n, _ in bad[:3])
            msg = f"{len(bad)} of {len(af.modules)} adapter modules do not fit the {arch} checkpoint " \
                  f"{Path(src.path).name} (first: {first}; {bad[0][1]})"
            hint = None
            if guess and guess != arch:
                hint = f"this adapter looks like a {guess} adapter"
            elif usable:
                hint = "--allow-partial merges the modules that fit and warns about the rest"
            raise BadInput(apath, msg, hint=hint)
        for n, why in bad:
            skipped.append((str(apath), n, why))
        for lm in usable:
            t = lm.target
            r = ratio
            if bw is not None:
                slot = 0 if t.component.startswith("text_encoder") else None
                if t.component == "unet" and index.keymap is not None:
                    km = index.single_key(t)
                    if km is not None:
                        slot = ldm_slot(km.single_key[len(ckpt.UNET_PREFIX):] if km.single_key.startswith(ckpt.UNET_PREFIX) else km.single_key)
                if slot is not None:
                    r = ratio * bw[slot]
            mod = _move(lm.module, dev)
            if single:
                km = index.single_key(t)
                if km is None:
                    raise BadInput(apath, f"{lm.name}: no single-file key for {t.component}.{t.module}")
                wkey, mapping = km.single_key, km
            else:
                wkey, mapping = f"{t.component}.{t.module}.weight", None
            _add_edit(weights_edits, wkey, mapping, mod, r)
            impl = lm.module.impl
            if t.has_bias and hasattr(impl, "bias_delta") and impl.bias_delta(lm.module.tensors) is not None:
                if single:
                    bkm = index.keymap.to_single(t.component, t.module + ".bias")
                    if bkm is not None:
                        _add_edit(bias_edits, bkm.single_key, bkm, mod, r)
                else:
                    _add_edit(bias_edits, f"{t.component}.{t.module}.bias", None, mod, r)
            merged += 1
    return weights_edits, bias_edits, merged, skipped


def _add_edit(edits, key, mapping, mod, ratio):
    lst = edits.setdefault(key, [])
    for e in lst:
        if e.mapping == mapping:
            e.mods.append((mod, ratio))
            return
    lst.append(_Edit(mapping, [(mod, ratio)]))


def _write_back(t: torch.Tensor, mapping, new: torch.Tensor) -> torch.Tensor:
    """Put a diffusers-form tensor back into the (float32 working copy of the) source tensor."""
    if mapping is None or mapping.transform is None:
        return new.reshape(t.shape)
    tr = mapping.transform
    if tr == "squeeze":
        return new.reshape(t.shape)
    if tr == "transpose":
        return new.T.contiguous().reshape(t.shape)
    if isinstance(tr, tuple) and tr[0] == "chunk":
        _, i, n = tr
        rows = t.shape[0] // n
        t.narrow(0, i * rows, rows).copy_(new.reshape(t.narrow(0, i * rows, rows).shape))
        return t
    raise ValueError(f"unknown transform {tr!r}")


def apply_edits(raw: torch.Tensor, edits: list[_Edit], dev, bias: bool = False) -> torch.Tensor:
    t = raw.to(dev, torch.float32, copy=True)
    for e in edits:
        view = t if e.mapping is None else ckpt.single_to_diffusers_tensor(e.mapping, t)
        w = view
        for mod, r in e.mods:
            if bias:
                w = w + r * mod.impl.bias_delta(mod.tensors).to(w.device, torch.float32).reshape(w.shape)
            else:
                w, _ = mod.apply(w, r, None, inplace=True)  # w is always this function's own buffer
        t = _write_back(t, e.mapping, w)
    return t


def _convert(raw, key, weights_edits, bias_edits, out_dtype, dev, tally: NonFinite):
    """The output tensor for one key: unchanged bytes where nothing applies and the dtype is kept.

    A changed tensor with NaN/Inf is refused (``tally``) unless the checkpoint's own tensor already held
    them; untouched tensors are copied as they are, and those holding NaN/Inf are counted for a warning
    (the user's model, not lycotools' doing: one ``aminmax`` pass, ~0.2 s of one core for 2 GB)."""
    target = out_dtype if (out_dtype is not None and raw.is_floating_point()) else raw.dtype
    edits = weights_edits.get(key) or bias_edits.get(key)
    if edits:
        t = cast_to(apply_edits(raw, edits, dev, bias=key not in weights_edits), target)
        mods = lambda: ", ".join(m.name for e in edits for m, _ in e.mods)  # noqa: E731 (only on a failure)
        tally.check_made(None, lambda: f"{key} (with {mods()})", key, raw, t)
        return t, True
    if not is_finite(raw):
        tally.inherited.append(key)
    if target == raw.dtype:
        return raw, False
    return cast_to(raw, target), False


def bake(checkpoint, specs, output, opts: BakeOptions, *, overwrite=False, quiet=False) -> BakeResult:
    """Merge adapters ``specs`` = [(path, ratio)] into ``checkpoint``, writing ``output``."""
    check_specs(specs)
    dev = device_of(opts.device)
    out_dtype = out_dtype_of(opts.dtype)
    inputs = [checkpoint] + [p for p, _ in specs]
    src = open_source(checkpoint)
    info = ckpt.detect_source(src)
    if info.arch == "unknown":
        raise BadInput(checkpoint, "not a Stable Diffusion checkpoint lycotools recognises (SD1.x, SD2.x, SDXL)")
    diffusers_out = isinstance(src, DiffusersFolderSource)
    output = Path(output)
    if diffusers_out:
        check_output_folder(output, inputs, overwrite)
    else:
        if output.suffix != ".safetensors":
            raise BadInput(output, "the output of a merge is a .safetensors file")
        check_output(output, inputs, overwrite)
    index = ModelIndex.from_source(src)
    tally = NonFinite(opts.allow_nonfinite)
    w_edits, b_edits, merged, skipped = plan_adapters(src, index, specs, opts, dev, tally)
    res = BakeResult(output=output, arch=info.arch, modules=merged, skipped=skipped)

    names = [Path(checkpoint).name] + [Path(p).name for p, _ in specs]
    meta = _kept_metadata(src.metadata) if not diffusers_out else {}
    meta.update(modelspec(info.arch, None, output.stem, merged_from=names, no_date=opts.no_date,
                          prediction=("v" if info.prediction == "v" else None)))
    recipe = {"method": "bake", "checkpoint": Path(checkpoint).name,
              "adapters": [{"name": Path(p).name, "ratio": r} for p, r in specs]}
    if opts.block_weights:
        recipe["block_weights"] = list(opts.block_weights)
    meta.update(lycotools_record(
        "merge",
        [{"role": "checkpoint", "name": Path(checkpoint).name, "sshs_model_hash": _file_hash(src)}]
        + [{"role": "adapter", "name": Path(p).name, "ratio": r} for p, r in specs],
        {"dtype": opts.dtype, "device": opts.device, "allow_partial": opts.allow_partial,
         "block_weights": list(opts.block_weights or ())},
    ))
    meta["lycotools.merge.recipe"] = json.dumps(recipe, sort_keys=True)

    if diffusers_out:
        res.weights_changed = _bake_diffusers(src, output, w_edits, b_edits, out_dtype, dev, meta, overwrite, quiet,
                                              tally)
    else:
        res.weights_changed = _bake_single(src, output, w_edits, b_edits, out_dtype, dev, meta, inputs, overwrite, quiet,
                                           tally)
    tally.warn()
    src.close()
    return res


def _plan_of(src, keys, out_dtype, name_of=lambda k: k):
    plan = []
    for k in keys:
        dt = src.dtype(k)
        if out_dtype is not None and dt.is_floating_point:
            dt = out_dtype
        plan.append((name_of(k), dt, src.shape(k)))
    return plan


def _bake_single(src, output, w_edits, b_edits, out_dtype, dev, meta, inputs, overwrite, quiet, tally) -> int:
    changed = 0
    plan = _plan_of(src, src.keys(), out_dtype)
    with SafetensorsWriter(output, meta, inputs=inputs, overwrite=overwrite, plan=plan) as w, streaming_threads():
        for key, raw in tqdm(prefetch(w.expected_order, src.get), total=len(plan), desc=f"merge {output.name}",
                             unit="tensor", file=sys.stderr, disable=quiet, leave=False):
            t, did = _convert(raw, key, w_edits, b_edits, out_dtype, dev, tally)
            changed += did
            w.add(key, t)
    return changed


def _bake_diffusers(src: DiffusersFolderSource, output: Path, w_edits, b_edits, out_dtype, dev, meta,
                    overwrite, quiet, tally) -> int:
    """Write a diffusers folder: configs/tokenizers copied, each component's weights rewritten."""
    changed = 0
    with atomic_folder(output) as tmp:
        weight_files = {c: _component_weights(src.path / c) for c in src.parts}
        for child in sorted(src.path.iterdir()):
            if child.is_dir():
                skip = set()
                if child.name in src.parts:
                    wf = weight_files[child.name]
                    skip = {p.name for p in child.iterdir()
                            if p.suffix in (".safetensors", ".bin") or p.name.endswith(".index.json") or p == wf}
                shutil.copytree(child, tmp / child.name, ignore=lambda d, names, s=skip, c=child:
                                [n for n in names if Path(d) == c and n in s])
            else:
                shutil.copy2(child, tmp / child.name)
        for comp, part in src.parts.items():
            add_level = comp.startswith("text_encoder") and not any(k.startswith("text_model.") for k in part.keys())

            def canon(k, comp=comp, add_level=add_level):
                if add_level and not k.startswith("text_projection"):
                    return f"{comp}.text_model.{k}"
                return f"{comp}.{k}"

            fname = "diffusion_pytorch_model.safetensors" if comp in ("unet", "vae") else "model.safetensors"
            plan = _plan_of(part, part.keys(), out_dtype)
            with SafetensorsWriter(tmp / comp / fname, dict(meta, **{"format": "pt"}), plan=plan) as w, \
                    streaming_threads():
                for k, raw in tqdm(prefetch(w.expected_order, part.get), total=len(plan), desc=f"merge {comp}",
                                   unit="tensor", file=sys.stderr, disable=quiet, leave=False):
                    t, did = _convert(raw, canon(k), w_edits, b_edits, out_dtype, dev, tally)
                    changed += did
                    w.add(k, t)
    return changed


# ------------------------------------------------------------------------------------------------
# adapter + adapter
# ------------------------------------------------------------------------------------------------


@dataclass
class AdapterMergeOptions:
    method: str = "concat"
    rank: int | None = None
    conv_rank: int | None = None
    budget: str | None = None
    densify: bool = False
    dtype: str = "fp16"
    device: str = "cpu"
    seed: int = 0
    no_date: bool = False
    allow_partial: bool = False
    allow_nonfinite: bool = False  # keep NaN/Inf factors (a warning) instead of refusing

    def __post_init__(self):
        if self.method not in ADAPTER_METHODS:
            raise BadInput(None, f"--method {self.method!r} does not merge adapters; use concat or svd")
        validate.positive_int("--rank", self.rank)
        validate.positive_int("--conv-rank", self.conv_rank)
        validate.budget("--budget", self.budget)
        if self.method == "svd" and self.rank is None and self.budget is None:
            raise BadInput(None, "--method svd needs --rank N (and optionally --conv-rank) or --budget")
        validate.adapter_dtype(self.dtype, ADAPTER_DTYPES)


@dataclass
class AdapterMergeResult:
    output: Path
    arch: str
    modules: int = 0
    ranks: dict = field(default_factory=dict)
    errors: dict = field(default_factory=dict)  # module -> relative Frobenius error of the truncation


def _is_plain_lora(mod: AdapterModule) -> bool:
    t = mod.tensors
    return (mod.algo == "lora" and "lora_mid.weight" not in t and "dora_scale" not in t
            and "bias_values" not in t)


_W_DEPENDENT = ("ia3", "oft", "boft", "glora", "norm")


def _factors(mod: AdapterModule, s: float, shape, dev):
    """(up (out, r), down (r, K)) of s·ΔW for a plain LoRA, as float32 matrices."""
    up = mod.tensors["lora_up.weight"].to(dev, torch.float32)
    down = mod.tensors["lora_down.weight"].to(dev, torch.float32)
    return up.reshape(up.shape[0], -1) * (s * mod.scale), down.reshape(down.shape[0], -1)


def _dense(mod: AdapterModule, s: float, shape, dev) -> torch.Tensor:
    d = mod.delta(shape).to(dev)
    return (s * d).reshape(shape[0], -1)


def _exact_rank(S: torch.Tensor, m: int, n: int) -> int:
    if S.numel() == 0 or float(S[0]) == 0:
        return 0
    tol = float(S[0]) * max(m, n) * torch.finfo(torch.float32).eps
    return int((S > tol).sum())


def merge_adapters(specs, output, opts: AdapterMergeOptions, *, overwrite=False, quiet=False) -> AdapterMergeResult:
    check_specs(specs)
    dev = device_of(opts.device)
    out_dtype = out_dtype_of(opts.dtype)
    output = check_output(output, [p for p, _ in specs], overwrite)
    files = [AdapterFile.open(p) for p, _ in specs]
    for (path, _), af in zip(specs, files):
        if not af.modules:
            raise BadInput(path, "holds no adapter modules (is it an adapter file?)")
        broken = [lm for lm in af.modules if lm.broken]
        if broken:
            raise BadInput(path, f"{len(broken)} module(s) cannot be read: {broken[0].error}")
    # NaN/Inf factors can be concatenated as they are, never factored by an SVD
    concat_only = opts.method == "concat" and not opts.densify
    tally = NonFinite(opts.allow_nonfinite and concat_only,
                      hint="--allow-nonfinite writes it anyway" if concat_only else
                      "an SVD cannot factor it; --allow-nonfinite applies to --method concat without --densify")
    for (path, _), af in zip(specs, files):
        check_adapter(af, tally, path)
    fast = _kohya_groups(specs, files, opts)
    if fast is not None:
        arch, groups, names, shapes = fast
    else:
        arch, groups, names, shapes = _resolved_groups(specs, files, opts)
    if not groups:
        raise BadInput(specs[0][0], "no adapter module to merge")

    ranks_for = {}
    if opts.method == "svd" and opts.budget:
        ranks_for = _budget_ranks(groups, shapes, opts, dev)

    res = AdapterMergeResult(output=output, arch=arch or "unknown")
    tensors: dict[str, torch.Tensor] = {}
    bar = tqdm(list(groups.items()), desc=f"merge {output.name}", unit="module", file=sys.stderr, disable=quiet, leave=False)
    for key, items in bar:
        shape = shapes[key]
        name = names[key]
        if opts.method == "concat":
            up, down = _concat(items, shape, opts, dev)
            err = 0.0
        else:
            conv3 = len(shape) == 4 and shape[2] * shape[3] > 1
            r = ranks_for[key] if ranks_for else (opts.conv_rank if conv3 and opts.conv_rank else opts.rank)
            up, down, err = _svd_merge(items, shape, int(r), opts, dev, name)
        if up.shape[1] == 0:
            continue
        r = up.shape[1]
        if len(shape) > 2:
            up4 = up.reshape(shape[0], r, *([1] * (len(shape) - 2)))
            down4 = down.reshape(r, *shape[1:])
        else:
            up4, down4 = up, down
        for suf, v in lora_tensors(up4, down4, float(r)).items():
            tensors[f"{name}.{suf}"] = v.to("cpu", torch.float32 if suf == "alpha" else out_dtype).contiguous()
        res.ranks[name] = r
        res.errors[name] = err
        res.modules += 1
    bar.close()
    dims = sorted(set(res.ranks.values()))
    dim = dims[0] if len(dims) == 1 else "Dynamic"
    meta = network_metadata(arch, "networks.lora", dim, dim, {"algo": "lora", "merge": opts.method})
    meta.update(modelspec(arch, "lora", output.stem, merged_from=[Path(p).name for p, _ in specs],
                          no_date=opts.no_date))
    meta.update(lycotools_record(
        "merge", [{"role": "adapter", "name": Path(p).name, "ratio": r, "sshs_model_hash": _file_hash(f.source)}
                  for (p, r), f in zip(specs, files)],
        {k: v for k, v in opts.__dict__.items() if k != "no_date"},
    ))
    meta["lycotools.merge.recipe"] = json.dumps(
        {"method": opts.method, "adapters": [{"name": Path(p).name, "ratio": r} for p, r in specs],
         "rank": opts.rank, "conv_rank": opts.conv_rank, "budget": opts.budget}, sort_keys=True)
    from ..io.writer import save_tensors

    if not tally.found:  # finite inputs: NaN/Inf here is the sum overflowing --dtype
        for k, v in tensors.items():
            tally.check(specs[0][0], f"merged {k} (at --dtype {opts.dtype})", v)
    save_tensors(output, tensors, meta, inputs=[p for p, _ in specs], overwrite=overwrite)
    tally.warn()
    return res


def _check_summable(lm, path):
    if lm.module.algo in _W_DEPENDENT or lm.module.has_dora:
        raise BadInput(path, f"{lm.name}: {lm.module.algo}{' (DoRA)' if lm.module.has_dora else ''} "
                             "changes W multiplicatively and cannot be summed into a LoRA",
                       hint="bake it into the checkpoint instead")


_LDM_FLAT = re.compile(r"(input_blocks|middle_block|output_blocks|out)_")


def _kohya_groups(specs, files, opts):
    """Fast path: every module of every file has a kohya flat name (lora_unet_*, lora_te*_*) in one
    UNet naming style, so modules group by name and keep it; no model template is needed."""
    styles = set()
    for af in files:
        for lm in af.modules:
            mid = lm.id
            if lm.module is None or not mid.flat or not lm.name.startswith(("lora_unet_", "lora_te")):
                return None
            if mid.component == "unet":
                styles.add("ldm" if _LDM_FLAT.match(mid.path) else "diffusers")
    if len(styles) > 1:
        return None
    from .inspect import metadata_arch

    arch = next((a for a in (metadata_arch(af.source.metadata) for af in files) if a), None)
    if arch is None and any(lm.name.startswith("lora_te2_") for af in files for lm in af.modules):
        arch = "sdxl"
    groups, names, shapes = {}, {}, {}
    for (path, ratio), af in zip(specs, files):
        for lm in af.parsed:
            _check_summable(lm, path)
            groups.setdefault(lm.name, []).append((lm.module, ratio, path))
            names[lm.name] = lm.name
    for key, items in groups.items():
        shapes[key] = _group_shape(items, None)
        if len(shapes[key]) == 2 and any(m.algo in ("loha", "lokr") for m, _, _ in items):
            return None  # a flattened LoHa/LoKr conv: the model's kernel size is needed
    return arch, groups, names, shapes


def _resolved_groups(specs, files, opts):
    """General path: resolve every module against the standard model the first adapter is for."""
    from .inspect import guess_adapter_arch

    arch, index, _ = guess_adapter_arch(files[0])
    if index is None:
        raise BadInput(specs[0][0], "cannot tell which model this adapter is for (no module matches SD1, SD2 or SDXL)")
    groups: dict[tuple, list] = {}
    targets: dict[tuple, object] = {}
    for (path, ratio), af in zip(specs, files):
        af.resolve(index)
        bad = [lm.name for lm in af.parsed if lm.target is None] + [lm.name for lm in af.errors]
        if bad and not opts.allow_partial:
            raise BadInput(path, f"{len(bad)} of {len(af.modules)} modules match no {arch} module "
                                 f"(first: {', '.join(bad[:3])})",
                           hint="all adapters must be for the same model; --allow-partial skips them")
        for lm in af.parsed:
            if lm.target is None:
                continue
            _check_summable(lm, path)
            key = (lm.target.component, lm.target.module)
            groups.setdefault(key, []).append((lm.module, ratio, path))
            targets[key] = lm.target
    names, shapes = {}, {}
    for key, items in groups.items():
        t = targets[key]
        shapes[key] = _group_shape(items, tuple(t.shape))
        ldm = None
        if t.component == "unet" and arch.startswith("sdxl"):
            km = index.single_key(t)
            if km is not None:
                ldm = km.single_key[len(ckpt.UNET_PREFIX):-len(".weight")]
        names[key] = kohya_module_name(arch, t.component, t.module, ldm)
    return arch, groups, names, shapes


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


def _group_shape(items, template_shape) -> tuple:
    """The weight shape of one module from its adapters' own shapes (the model may be any size).

    The standard model's shape when it fits; else the highest-rank shape the adapters give (a
    flattened LoHa/LoKr conv takes the kernel of the standard model's layer)."""
    hints = [(tuple(m.weight_shape_hint()), p) for m, _, p in items if m.weight_shape_hint() is not None]
    if not hints:
        return template_shape
    n = _numel(hints[0][0])
    for h, p in hints:
        if _numel(h) != n:
            raise BadInput(p, f"{items[0][0].name}: ΔW of shape {h} does not match {hints[0][0]} from another adapter",
                           hint="all adapters must be for the same model")
    if template_shape is not None and _numel(template_shape) == n:
        return template_shape
    best = max((h for h, _ in hints), key=len)
    if template_shape is not None:
        return unflatten_conv_shape(best, template_shape) or best
    return best


def _concat(items, shape, opts, dev):
    ups, downs = [], []
    for mod, ratio, path in items:
        if _is_plain_lora(mod):
            u, d = _factors(mod, ratio, shape, dev)
        else:
            if not opts.densify:
                raise BadInput(path, f"{mod.name}: a {mod.algo} module has no LoRA factors to concatenate",
                               hint="--densify turns its ΔW into an exact LoRA block by SVD, or use --method svd")
            M = _dense(mod, ratio, shape, dev)
            s = exact_svd(M)
            k = _exact_rank(s.S, *M.shape)
            u, d = s.U[:, :k] * s.S[:k], s.Vh[:k]
        ups.append(u)
        downs.append(d)
    return torch.cat(ups, 1), torch.cat(downs, 0)


def _sum_svd(items, shape, dev, k_hint: int, seed: int):
    """SVD of Σ ratio·ΔW: from stacked factors (no dense ΔW) when every input is a plain LoRA."""
    if all(_is_plain_lora(m) for m, _, _ in items):
        ups, downs = zip(*(_factors(m, r, shape, dev) for m, r, _ in items))
        return svd_of_product(torch.cat(ups, 1), torch.cat(downs, 0)), None
    M = None
    for m, r, _ in items:
        d = _dense(m, r, shape, dev)
        M = d if M is None else M + d
    return truncated_svd(M, k_hint, seed=seed, exact=True), M


def _svd_merge(items, shape, r, opts, dev, name):
    s, _ = _sum_svd(items, shape, dev, r, layer_seed(opts.seed, name))
    r = max(0, min(r, s.S.numel()))
    up, down = s.U[:, :r] * s.S[:r], s.Vh[:r]
    tot = float(s.total_energy)
    kept = float(s.S[:r].double().square().sum())
    err = (max(tot - kept, 0.0) / tot) ** 0.5 if tot > 0 else 0.0
    return up, down, err


def _budget_ranks(groups, shapes, opts, dev) -> dict:
    """Ranks per module that maximise the kept energy within ``--budget`` parameters."""
    layers, keys, total = [], list(groups), 0
    for i, key in enumerate(keys):
        items, shape = groups[key], shapes[key]
        k = min(shape[0], lora_cost(shape) - shape[0])
        s, _ = _sum_svd(items, shape, dev, max(k, 1), opts.seed)
        total += sum(int(m.num_params) for m, _, _ in items)
        layers.append(LayerSpectrum(name=str(i), scores=[float(x) ** 2 for x in s.S.tolist()],
                                    cost_per_rank=lora_cost(shape), max_rank=s.S.numel()))
    try:
        budget = parse_budget(opts.budget, total_params=total)
        ranks = allocate_budget(layers, budget)
    except ValueError as e:
        raise BadInput(None, f"--budget {opts.budget!r}: {e}") from None
    return {key: ranks[str(i)] for i, key in enumerate(keys)}


# ------------------------------------------------------------------------------------------------
# checkpoint + checkpoint
# ------------------------------------------------------------------------------------------------


@dataclass
class ModelMergeOptions:
    method: str = "weighted-sum"
    alpha: float = 0.5
    block_weights: str | None = None  # per-block alphas (26-slot list or LBW layout)
    density: float = 1.0  # TIES: fraction of each delta kept (sd-mecha's k)
    drop_rate: float = 0.9  # DARE: probability of dropping an entry (sd-mecha's probability)
    seed: int = 0
    dtype: str | None = None
    device: str = "cpu"
    no_date: bool = False
    allow_nonfinite: bool = False  # write NaN/Inf the inputs hold (a warning) instead of refusing

    def __post_init__(self):
        if self.method not in CKPT_METHODS:
            raise BadInput(None, f"--method {self.method!r} does not merge checkpoints; use {', '.join(CKPT_METHODS)}")
        validate.finite("--alpha", self.alpha, optional=False)
        validate.finite("--density", self.density, 0.0, 1.0, lo_open=True, optional=False)
        validate.finite("--drop-rate", self.drop_rate, 0.0, 1.0, hi_open=True, optional=False)
        if self.block_weights is not None:
            block_weight_values(self.block_weights)
        out_dtype_of(self.dtype)


def _ties(deltas: list[torch.Tensor], k: float) -> torch.Tensor:
    """TIES (sd-mecha ``ties_sum``): trim each delta to its top-k fraction by |x|, elect the sign by
    the sum of signs, average the entries that agree with it."""
    trimmed = []
    for d in deltas:
        n = d.numel()
        kk = max(int((1 - k) * n), 1)
        thr = d.reshape(-1).abs().float().kthvalue(kk).values
        trimmed.append(d * (d.abs() >= thr))
    D = torch.stack(trimmed)
    signs = torch.sign(D)
    elected = torch.sign(signs.sum(0))
    keep = (signs == elected).float()
    return torch.nan_to_num((D * keep).sum(0) / keep.sum(0), nan=0.0, posinf=0.0, neginf=0.0)


def _dare(deltas: list[torch.Tensor], p: float, seed: int) -> torch.Tensor:
    """DARE (sd-mecha ``dropout``, overlap 1): keep each entry of each delta with probability 1−p,
    average the kept entries, rescale by 1/(1−p)."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    total = torch.zeros_like(deltas[0])
    count = torch.zeros_like(deltas[0])
    for d in deltas:
        mask = (torch.rand(d.shape, generator=g) >= p).to(d.device, d.dtype)
        total += d * mask
        count += mask
    scale = 1.0 if p >= 1.0 else (1.0 - p)
    return total / count.clamp(min=1) / scale


def _key_slot(key: str) -> int | None:
    for p in (ckpt.UNET_PREFIX, "unet."):
        if key.startswith(p):
            return ldm_slot(key[len(p):]) if p == ckpt.UNET_PREFIX else None
    if key.startswith(("cond_stage_model.", "conditioner.", "text_encoder")):
        return 0
    return None


def merge_models(paths, output, opts: ModelMergeOptions, *, overwrite=False, quiet=False) -> Path:
    n = len(paths)
    if opts.method == "weighted-sum" and n != 2:
        raise BadInput(None, "weighted-sum merges exactly two models (A B)")
    if opts.method == "add-difference" and n != 3:
        raise BadInput(None, "add-difference needs three models: A B C (A + alpha·(B − C))")
    if opts.method in ("ties", "dare") and n < 2:
        raise BadInput(None, f"{opts.method} needs a base and at least one model: BASE MODEL [MODEL...]")
    dev = device_of(opts.device)
    out_dtype = out_dtype_of(opts.dtype)
    output = Path(output)
    if output.suffix != ".safetensors":
        raise BadInput(output, "the output of a merge is a .safetensors file")
    check_output(output, paths, overwrite)
    srcs = []
    for p in paths:  # diffusers folders are read as the single file they convert to
        s = open_source(p)
        srcs.append(SingleFileSource(CheckpointView(s)) if isinstance(s, DiffusersFolderSource) else s)
    a = srcs[0]
    infos = [ckpt.detect_source(s) for s in srcs]
    archs = [i.arch for i in infos]
    for p, arch in zip(paths[1:], archs[1:]):
        if arch != archs[0]:
            raise BadInput(p, f"architecture mismatch: {arch} vs {archs[0]} ({Path(paths[0]).name})")
    # keys that a diffusers folder has no place for (EMA copies, position ids, ...) keep the first
    # model's tensor; between single files a missing key is a real mismatch
    unmerged = set()
    for p, s in zip(paths, srcs):
        for k in a.keys():
            if k not in s:
                if not isinstance(s, SingleFileSource) or k.startswith(("model.diffusion_model.", "first_stage_model.")):
                    raise BadInput(p, f"key {k} of {Path(paths[0]).name} is missing", hint="merge models of the same architecture")
                unmerged.add(k)
            elif tuple(s.shape(k)) != tuple(a.shape(k)):
                raise BadInput(p, f"key {k} has shape {tuple(s.shape(k))}, not {tuple(a.shape(k))} as in {Path(paths[0]).name}")
    if unmerged and not quiet:
        print(f"lycotools: note: {len(unmerged)} key(s) only in {Path(paths[0]).name} (e.g. {min(unmerged)}) "
              "are kept from it unmerged: the diffusers folders have no such weights", file=sys.stderr)
    bw = parse_block_weights(opts.block_weights, archs[0]) if opts.block_weights else None
    meta = _kept_metadata(a.metadata)
    info = infos[0]
    meta.update(modelspec(info.arch, None, output.stem, merged_from=[Path(p).name for p in paths], no_date=opts.no_date,
                          prediction=("v" if info.prediction == "v" else None)))
    meta.update(lycotools_record("merge", [{"role": f"model{i}", "name": Path(p).name, "sshs_model_hash": _file_hash(s)}
                                           for i, (p, s) in enumerate(zip(paths, srcs))],
                                 {k: v for k, v in opts.__dict__.items() if k != "no_date"}))
    meta["lycotools.merge.recipe"] = json.dumps({"method": opts.method, "alpha": opts.alpha,
                                                 "models": [Path(p).name for p in paths],
                                                 "block_weights": opts.block_weights,
                                                 "density": opts.density, "drop_rate": opts.drop_rate,
                                                 "seed": opts.seed}, sort_keys=True)
    plan = _plan_of(a, a.keys(), out_dtype)
    tally = NonFinite(opts.allow_nonfinite)
    with SafetensorsWriter(output, meta, inputs=paths, overwrite=overwrite, plan=plan) as w, streaming_threads():
        for key, raws in tqdm(prefetch(w.expected_order, lambda k: [s.get(k) for s in srcs if k in s]), total=len(plan),
                              desc=f"merge {output.name}", unit="tensor", file=sys.stderr, disable=quiet, leave=False):
            raw = raws[0]
            target = out_dtype if (out_dtype is not None and raw.is_floating_point()) else raw.dtype
            if not raw.is_floating_point() or key in unmerged:
                w.add(key, cast_to(raw, target))
                continue
            alpha = opts.alpha
            if bw is not None:
                slot = _key_slot(key)
                if slot is not None:
                    alpha = bw[slot]
            ts = [t.to(dev, torch.float32) for t in raws]
            if opts.method == "weighted-sum":
                out = torch.lerp(ts[0], ts[1], alpha) if alpha not in (0, 1) else ts[int(alpha)]
            elif opts.method == "add-difference":
                out = ts[0] + alpha * (ts[1] - ts[2])
            elif opts.method == "ties":
                out = ts[0] + alpha * _ties([t - ts[0] for t in ts[1:]], opts.density)
            else:
                out = ts[0] + alpha * _dare([t - ts[0] for t in ts[1:]], opts.drop_rate, layer_seed(opts.seed, key))
            out = cast_to(out, target)
            if not is_finite(out):
                culprit = next((p for p, t in zip(paths, raws) if not is_finite(t)), None)
                tally.check(culprit, f"tensor {key}" + ("" if culprit else " after the merge"), out)
            w.add(key, out)
    for s in srcs:
        s.close()
    tally.warn()
    return output

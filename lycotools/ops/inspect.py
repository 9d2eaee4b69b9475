"""Say what a model file is: checkpoint, adapter, embedding or unknown, with the facts users need."""

from __future__ import annotations

from collections import Counter

from ..adapter_file import AdapterFile
from ..io.readers import open_source
from ..layouts import checkpoint as ckpt
from ..layouts.embeddings import detect_embedding
from ..layouts.model_index import ModelIndex

DTYPE_SHORT = {
    "torch.float32": "fp32", "torch.float16": "fp16", "torch.bfloat16": "bf16", "torch.float64": "fp64",
    "torch.float8_e4m3fn": "fp8_e4m3fn", "torch.float8_e5m2": "fp8_e5m2",
}
ADAPTER_ARCHS = ("sd1", "sd2", "sdxl", "sdxl-refiner")
_META_ARCH = (
    ("sdxl_refiner", "sdxl-refiner"), ("sdxl", "sdxl"), ("stable-diffusion-xl-v1-refiner", "sdxl-refiner"),
    ("stable-diffusion-xl", "sdxl"), ("sd_v2", "sd2"), ("stable-diffusion-v2", "sd2"),
    ("sd_v1", "sd1"), ("stable-diffusion-v1", "sd1"),
)


def short_dtype(dt) -> str:
    return DTYPE_SHORT.get(str(dt), str(dt).replace("torch.", ""))


def inspect_path(path) -> dict:
    """A JSON-able report of one file or folder. Raises ``BadInput`` for unreadable input."""
    with open_source(path) as src:
        report = {"path": str(path), "container": src.kind}
        emb = detect_embedding(src)
        if emb is not None:
            report.update(kind="embedding", format=emb.format, token=emb.token, vectors=emb.vectors,
                          widths=emb.widths, target=emb.target)
        else:
            info = ckpt.detect_source(src)
            if info.arch != "unknown" and src.kind != "peft":
                report.update(_checkpoint_report(src, info))
            else:
                af = AdapterFile.from_source(src)
                if af.modules:
                    report.update(_adapter_report(af))
                else:
                    report.update(kind="unknown", keys=len(src), sample_keys=src.keys()[:5])
        report["metadata"] = {k: v for k, v in src.metadata.items() if len(v) < 2000}
        return report


def _checkpoint_report(src, info) -> dict:
    comps: dict[str, dict] = {}
    dtypes: Counter = Counter()
    prefixes = sorted(info.components.items(), key=lambda kv: -len(kv[1]))
    total = 0
    for key in src.keys():
        n = src.numel(key)
        total += n
        dtypes[short_dtype(src.dtype(key))] += n
        comp = next((c for c, p in prefixes if key.startswith(p)), "other")
        entry = comps.setdefault(comp, {"params": 0, "tensors": 0})
        entry["params"] += n
        entry["tensors"] += 1
    return {
        "kind": "checkpoint",
        "arch": info.arch,
        "layout": info.layout,
        "prediction": info.prediction,
        "inpainting": info.inpainting,
        "components": comps,
        "params": total,
        "dtype": dtypes.most_common(1)[0][0] if dtypes else None,
        "dtypes": dict(dtypes),
        "notes": list(info.notes),
    }


def metadata_arch(metadata: dict) -> str | None:
    text = " ".join(metadata.get(k, "") for k in ("ss_base_model_version", "modelspec.architecture"))
    for needle, arch in _META_ARCH:
        if needle in text:
            return arch
    if metadata.get("ss_v2") == "True":
        return "sd2"
    return None


def guess_adapter_arch(af: AdapterFile) -> tuple[str | None, ModelIndex | None, bool]:
    """The standard architecture an adapter targets: (arch, index, shapes_match).

    Names decide first (how many modules resolve), then whether the shapes are those of the real
    model, then the ndim of each factor (SD1's 1x1-conv proj_in vs SD2's Linear), then metadata.
    """
    hint = metadata_arch(af.source.metadata)
    best, best_score = None, None
    for arch in ADAPTER_ARCHS:
        idx = ModelIndex.template(arch)
        resolved = shape_ok = ndim_ok = 0
        for lm in af.parsed:
            t = idx.resolve(lm.id)
            if t is None:
                continue
            resolved += 1
            h = lm.module.weight_shape_hint()
            if h is None:
                continue
            if tuple(h) == tuple(t.shape):
                shape_ok += 1
            if lm.module.algo == "lora" and "lora_mid.weight" not in lm.module.tensors and len(h) == len(t.shape):
                ndim_ok += 1  # only plain LoRA keeps the layer's ndim (SD1 1x1-conv proj_in vs SD2 Linear)
        score = (resolved, shape_ok, ndim_ok, arch == hint)
        if best_score is None or score > best_score:
            best, best_score = arch, score
    if not best_score or best_score[0] == 0:
        return hint, None, False
    return best, ModelIndex.template(best), best_score[1] == best_score[0]


def _range(values):
    values = [v for v in values if v is not None]
    if not values:
        return None
    lo, hi = min(values), max(values)
    return [lo, hi]


def _main_dtype(src) -> str | None:
    counts: Counter = Counter()
    for k in src.keys():
        dt = src.dtype(k)
        if dt.is_floating_point:
            counts[short_dtype(dt)] += src.numel(k)
    return counts.most_common(1)[0][0] if counts else None


def _adapter_report(af: AdapterFile) -> dict:
    arch, index, shapes_match = guess_adapter_arch(af)
    if index is not None:
        af.resolve(index)
    parsed = af.parsed
    algos = Counter(lm.module.algo + ("+dora" if lm.module.has_dora else "") for lm in parsed)
    targets = Counter(lm.target.component for lm in parsed if lm.target is not None)
    notes = []
    if index is not None and not shapes_match:
        notes.append(f"module names match {arch} but tensor shapes are not those of the standard {arch} model "
                     "(a custom or scaled-down model?)")
    if af.groups.leftovers:
        notes.append(f"{len(af.groups.leftovers)} keys fit no adapter convention")
    return {
        "kind": "adapter",
        "format": af.convention,
        "conventions": dict(af.groups.conventions),
        "arch": arch,
        "algorithms": dict(algos),
        "modules": len(af.modules),
        "rank": _range([lm.module.rank for lm in parsed]),
        "alpha": _range([lm.module.alpha for lm in parsed]),
        "params": sum(lm.module.num_params for lm in parsed),
        "dtype": _main_dtype(af.source),
        "targets": dict(targets),
        "unmatched": [lm.name for lm in af.unmatched] if index is not None else [],
        "errors": [lm.error for lm in af.errors],
        "leftover_keys": af.groups.leftovers[:20],
        "embeddings": sorted({k.split(".")[1] for k in af.groups.embeddings if k.count(".") >= 1}),
        "peft_type": (af.peft_config or {}).get("peft_type"),
        "notes": notes,
    }


def format_report(r: dict) -> str:
    """One human line (plus indented details) per file."""
    p, kind = r["path"], r.get("kind")
    if kind == "checkpoint":
        comps = ", ".join(f"{c} {v['params'] / 1e6:.1f}M" for c, v in r["components"].items())
        pred = f", {r['prediction']}" if r.get("prediction") else ""
        head = f"{p}: checkpoint, {r['arch']}{pred}, {r['layout']} layout, {r['dtype']}, {r['params'] / 1e6:.2f}M params ({comps})"
    elif kind == "adapter":
        algos = ", ".join(f"{a}×{n}" for a, n in sorted(r["algorithms"].items()))
        rank = "-" if not r["rank"] else (f"{r['rank'][0]}" if r["rank"][0] == r["rank"][1] else f"{r['rank'][0]}–{r['rank'][1]}")
        alpha = "-" if not r["alpha"] else (f"{r['alpha'][0]:g}" if r["alpha"][0] == r["alpha"][1] else f"{r['alpha'][0]:g}–{r['alpha'][1]:g}")
        tg = ", ".join(f"{c} {n}" for c, n in r["targets"].items())
        head = (f"{p}: adapter, {r['format']} format, for {r['arch'] or 'unknown model'}, {r['modules']} modules "
                f"({algos}), rank {rank}, alpha {alpha}, {r['params'] / 1e6:.3f}M params, {r['dtype']}"
                + (f"; targets: {tg}" if tg else ""))
        extra = []
        if r["unmatched"]:
            extra.append(f"  {len(r['unmatched'])} modules match no weight of {r['arch']}: "
                         + ", ".join(r["unmatched"][:5]) + (" ..." if len(r["unmatched"]) > 5 else ""))
        for e in r["errors"][:5]:
            extra.append(f"  unreadable module: {e}")
        for n in r["notes"]:
            extra.append(f"  note: {n}")
        return "\n".join([head] + extra)
    elif kind == "embedding":
        head = (f"{p}: embedding, {r['format']} format, token {r['token'] or '(none stored)'}, "
                f"{r['vectors']} vector(s), for {r['target']}")
    else:
        head = f"{p}: unknown ({r.get('keys', 0)} tensors; not a checkpoint, adapter or embedding lycotools knows)"
    if kind == "checkpoint" and r.get("notes"):
        head += "\n" + "\n".join(f"  note: {n}" for n in r["notes"])
    return head

"""Say what a model file is: checkpoint, adapter, embedding or unknown, with the facts users need."""

from __future__ import annotations

import functools
import re
from collections import Counter
from pathlib import Path

from ..adapter_file import AdapterFile
from ..errors import BadInput, LycoError, _import_error
from ..io.readers import open_source
from ..layouts import checkpoint as ckpt
from ..layouts.embeddings import detect_embedding
from ..layouts.model_index import ModelIndex, shape_matches

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
    parts = peft_component_folders(path)
    if parts:
        return _peft_components_report(path, parts)
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
                    report.update(kind="unknown", keys=len(src), sample_keys=src.keys()[:5], family=guess_family(af))
        report["metadata"] = {k: v for k, v in src.metadata.items() if len(v) < 2000}
        return report


# ------------------------------------------------------------------------------------------------
# inspect in worker processes (-j N over many files): the same reports, the same errors
# ------------------------------------------------------------------------------------------------


def inspect_in_worker(path) -> tuple[bool, object]:
    """``inspect_path`` in a worker process: (True, report), or (False, the failure in picklable parts)
    for ``raise_from_worker`` to raise again in the parent as the same error (same class, same line)."""
    try:
        return True, inspect_path(path)
    except LycoError as e:
        return False, ("lyco", type(e), dict(e.__dict__))
    except MemoryError as e:
        return False, ("memory", str(e))
    except Exception as e:  # a bug, or a missing package: what errors.unexpected_line reads of it
        missing = _import_error(e)
        return False, ("other", e.__class__.__name__, str(e), None if missing is None else (missing.name, str(missing)))


def raise_from_worker(result: tuple[bool, object]) -> dict:
    """The report of ``inspect_in_worker``, or its failure raised as the error ``inspect_path`` raised."""
    ok, value = result
    if ok:
        return value
    if value[0] == "lyco":
        _, cls, state = value
        e = cls.__new__(cls)
        e.__dict__.update(state)
        Exception.__init__(e, e.line())
        raise e
    if value[0] == "memory":
        raise MemoryError(value[1])
    _, name, text, missing = value
    if missing is not None:
        raise ImportError(missing[1], name=missing[0])
    raise type(name, (Exception,), {})(text)


def peft_component_folders(path) -> list[Path]:
    """The per-component PEFT folders (``unet/``, ``text_encoder/``...) of a folder that ``convert --to peft``
    wrote; [] for anything else."""
    from .convert_adapter import PEFT_COMPONENTS

    p = Path(path)
    if not p.is_dir() or (p / "adapter_config.json").exists():
        return []
    return [p / c for c in PEFT_COMPONENTS if (p / c / "adapter_config.json").exists()]


def _peft_components_report(path, parts: list[Path]) -> dict:
    """One adapter report for a folder of per-component PEFT folders, each part's modules pinned to its
    component (read as ``convert`` reads it)."""
    from .convert_adapter import open_adapter

    af = open_adapter(path)
    try:
        report = {"path": str(path), "container": "peft-components"}
        report.update(_adapter_report(af))
        report["components"] = [q.name for q in parts]
        report["metadata"] = {k: v for k, v in af.source.metadata.items() if len(v) < 2000}
        return report
    finally:
        for part in getattr(af, "_parts", [af]):
            part.source.close()


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


def guess_adapter_arch(af: AdapterFile, *, refuse_other_families: bool = True
                       ) -> tuple[str | None, ModelIndex | None, bool]:
    """The standard architecture an adapter targets: (arch, index, shapes_match).

    Names decide first (how many modules resolve), then whether the shapes are those of the real
    model (a flattened conv layout counts as the conv's shape), then the ndim of each factor (SD1's
    1x1-conv proj_in vs SD2's Linear), then metadata.

    When no module is an SD1/SD2/SDXL module and the names are those of another family lycotools
    does not support yet (Flux.1, SD3, Qwen-Image, Wan...: ``guess_family``), raise ``BadInput``
    saying so (``UnsupportedFamily``), unless ``refuse_other_families`` is False (inspect).
    """
    hint = metadata_arch(af.source.metadata)
    best, best_score = None, None
    counts = [[0, 0, 0] for _ in ADAPTER_ARCHS]  # per arch: resolved, shape_ok, ndim_ok
    for lm in af.parsed:
        h = _UNSET  # the module's ΔW shape, asked once, when first needed
        for c, t in zip(counts, _arch_targets(lm.id)):
            if t is None:
                continue
            c[0] += 1
            if h is _UNSET:
                h = _shape_key(lm.module.weight_shape_hint())
            if h is None:
                continue
            if _shape_matches(h, t.shape):
                c[1] += 1
            if lm.module.algo == "lora" and "lora_mid.weight" not in lm.module.tensors and len(h) == len(t.shape):
                c[2] += 1  # only plain LoRA keeps the layer's ndim (SD1 1x1-conv proj_in vs SD2 Linear)
    for arch, (resolved, shape_ok, ndim_ok) in zip(ADAPTER_ARCHS, counts):
        score = (resolved, shape_ok, ndim_ok, arch == hint)
        if best_score is None or score > best_score:
            best, best_score = arch, score
    if not best_score or best_score[0] == 0:
        family = guess_family(af) if refuse_other_families else None
        if family is not None:
            raise UnsupportedFamily(af.path, family)
        return hint, None, False
    return best, ModelIndex.template(best), best_score[1] == best_score[0]


_UNSET = object()
_ARCH_TARGETS: dict = {}  # ModuleId -> its Target (or None) in each ADAPTER_ARCHS template


def _arch_targets(mid) -> tuple:
    try:
        return _ARCH_TARGETS[mid]
    except KeyError:
        pass
    targets = tuple(ModelIndex.template(arch).resolve(mid) for arch in ADAPTER_ARCHS)
    if len(_ARCH_TARGETS) >= 200_000:  # files of ever new names: keep the memory bounded
        _ARCH_TARGETS.clear()
    _ARCH_TARGETS[mid] = targets
    return targets


def _shape_key(h):
    return None if h is None else tuple(int(s) for s in h)


@functools.lru_cache(maxsize=4096)  # a few hundred distinct (ΔW, layer) shape pairs across all files
def _shape_matches(h: tuple, layer_shape: tuple) -> bool:
    return shape_matches(h, layer_shape)


# ------------------------------------------------------------------------------------------------
# adapters for model families lycotools does not support yet
# ------------------------------------------------------------------------------------------------


class UnsupportedFamily(BadInput):
    """An adapter for a model family lycotools does not support (yet): exit 2, one line saying which."""

    def __init__(self, path, family: str):
        self.family = family
        super().__init__(path, f"{_a(family)} LoRA; lycotools does not support {family} yet")


def _a(word: str) -> str:
    vowel_sound = word[:1].lower() in "aeiou" or word.startswith(("SD", "LTX"))  # "an SD3", "an LTX-Video"
    return ("an " if vowel_sound else "a ") + word


# Module-path patterns (separators normalised to "_", prefixes such as lora_unet_, lycoris_, transformer.,
# diffusion_model., base_model.model. removed) that only one family has. Names: docs/formats.md#unsupported-model-families and the
# diffusers model classes. Several families share layouts (Flux.1's double blocks and HunyuanVideo's,
# SD3/Flux/Qwen's add_q_proj): the most specific patterns come first and the family with most hits wins.
_FAMILY_PATTERNS = (
    ("Chroma", r"distilled_guidance_layer"),
    ("Flux.2", r"(double_stream_modulation|single_stream_modulation|to_qkv_mlp_proj|ff_linear_(in|out))"),
    ("HunyuanVideo", r"(token_refiner|double_blocks_\d+_(img|txt)_(mlp_fc\d|mod_linear|attn_(q|k)_norm))"),
    ("Flux.1", r"(double_blocks_\d+_(img|txt)_(attn|mlp|mod)|single_blocks_\d+_(linear\d|modulation)"
               r"|single_transformer_blocks_\d+_)"),
    ("SD3", r"joint_blocks_\d+_(x|context)_block"),
    ("Qwen-Image", r"^transformer_blocks_\d+_((img|txt)_(mlp|mod))"),
    ("Z-Image", r"(^layers_\d+_(attention|feed_forward|adaln)|^(noise|context)_refiner_\d+_)"),
    ("Wan", r"^blocks_\d+_(self_attn|cross_attn|attn1|attn2|ffn)"),
    ("LTX-Video", r"^transformer_blocks_\d+_attn[12]_"),
    ("SD3", r"^transformer_blocks_\d+_(attn_add_[qkv]_proj|attn_to_add_out|ff_context|norm1_context)"),
    ("DiT", r"^transformer_blocks_\d+_(attn_to_[qkv]|attn_to_out|ff_net|norm1_linear)"),
)
_FOREIGN_PREFIXES = ("lora_unet_", "lora_transformer_", "lycoris_", "transformer_", "diffusion_model_",
                     "model_diffusion_model_", "base_model_model_", "unet_")


def _family_path(name: str) -> str:
    p = name.lower().replace(".", "_")
    changed = True
    while changed:
        changed = False
        for pre in _FOREIGN_PREFIXES:
            # "transformer_" is a prefix, "transformer_blocks_" a module path: keep the latter
            if p.startswith(pre) and not (pre == "transformer_" and re.match(r"transformer_blocks_\d", p)):
                p, changed = p[len(pre):], True
    return p


def guess_family(af: AdapterFile) -> str | None:
    """The model family an adapter's module names belong to, when it is one lycotools does not support
    (Flux.1, Flux.2, Chroma, SD3, Qwen-Image, Z-Image, Wan, HunyuanVideo, LTX-Video); None otherwise.

    A guess from names (and, where names are shared, the hidden width and block count): Flux.1 and
    Flux.2 share original names (Flux.2-dev is 6144 wide); diffusers-named double-stream blocks
    (``transformer_blocks.N.attn.to_q``/``add_q_proj``) are SD3 (1536 or 2432 wide), or Flux.1 (3072
    wide, 19 blocks), HunyuanVideo (20) or Qwen-Image (60)."""
    names = [lm.name for lm in af.modules] + [k.rsplit(".", 2)[0] for k in af.groups.leftovers]
    paths = [_family_path(n) for n in names]
    hits: Counter = Counter()
    for p in paths:
        for family, pat in _FAMILY_PATTERNS:
            if re.search(pat, p):
                hits[family] += 1
                break
    if not hits:
        return None
    family = hits.most_common(1)[0][0]
    width = _hidden_width(af)
    if family == "Flux.1" and width in (4096, 6144):
        return "Flux.2"
    if family in ("SD3", "DiT") and "joint_blocks" not in " ".join(paths):
        blocks = [int(m.group(1)) for p in paths for m in [re.match(r"transformer_blocks_(\d+)_", p)] if m]
        last = max(blocks, default=0)
        if width in (1536, 2432):
            return "SD3"
        if last >= 38 or (width == 3072 and last >= 20):
            return "Qwen-Image"
        if width == 3072:
            return "HunyuanVideo" if last == 19 else "Flux.1"
        return "SD3" if family == "SD3" else "Flux.1"
    return family


def _hidden_width(af: AdapterFile) -> int | None:
    """The most common input width of the attention q/qkv projections (the model's hidden size)."""
    widths: Counter = Counter()
    for lm in af.parsed:
        p = _family_path(lm.name)
        if re.search(r"(attn_(to_q|qkv)|attn_add_q_proj|self_attn_q)$", p):
            h = lm.module.weight_shape_hint()
            if h is not None and len(h) == 2:
                widths[int(h[1])] += 1
    return widths.most_common(1)[0][0] if widths else None


def _range(values):
    values = [v for v in values if v is not None]
    if not values:
        return None
    lo, hi = min(values), max(values)
    return [lo, hi]


def _main_dtype(src) -> str | None:
    per_dtype: dict = {}  # in order of first appearance, as the names are counted below
    for k in src.keys():
        dt = src.dtype(k)
        if dt.is_floating_point:
            per_dtype[dt] = per_dtype.get(dt, 0) + src.numel(k)
    counts: Counter = Counter()
    for dt, n in per_dtype.items():
        counts[short_dtype(dt)] += n
    return counts.most_common(1)[0][0] if counts else None


# what inspect calls each algorithm (the "algorithms" counts keep the internal names)
ALGO_NAMES = {"lora": "LoRA", "lora+dora": "DoRA", "loha": "LoHa", "lokr": "LoKr", "full": "full diff",
              "norm": "norm", "ia3": "IA3", "oft": "OFT", "boft": "BOFT", "glora": "GLoRA", "adalora": "AdaLoRA"}
_KEY_STYLES = {
    "lycoris": "LyCORIS standalone (lycoris_*)",
    "peft": "PEFT (lora_A/lora_B)",
    "diffusers": "diffusers (unet.*, text_encoder.*)",
    "diffusers-legacy": "diffusers legacy (lora.down/up, lora_linear_layer)",
    "diffusers-attnprocs": "diffusers attn-procs (processor.to_q_lora)",
    "comfy": "ComfyUI (diffusion_model.*)",
}


def key_style(af: AdapterFile) -> str:
    """The key naming convention, said apart from the algorithm: kohya's flat names hold LoRA/LoCon for
    kohya's own networks and LoHa/LoKr/... for LyCORIS, so they are 'kohya/LyCORIS' names."""
    conv = af.convention
    if conv == "kohya":
        prefixes = sorted({m.split("_")[0] + "_" + m.split("_")[1] + "_" for m in af.groups.modules if m.count("_") >= 2},
                          key=lambda x: (x != "lora_unet_", x))
        return f"kohya/LyCORIS ({', '.join(p + '*' for p in prefixes)})"
    return _KEY_STYLES.get(conv, conv)


def algorithm_label(algos: dict) -> str:
    """``LoKr``, ``LoRA + DoRA``...: the algorithms of the file by module count, in readable names."""
    if not algos:
        return "none"
    return " + ".join(ALGO_NAMES.get(a, a) for a, _ in sorted(algos.items(), key=lambda kv: (-kv[1], kv[0])))


def _adapter_report(af: AdapterFile) -> dict:
    arch, index, shapes_match = guess_adapter_arch(af, refuse_other_families=False)
    if index is not None:
        af.resolve(index)
    family = guess_family(af) if index is None else None
    parsed = af.parsed
    algos = Counter(lm.module.algo + ("+dora" if lm.module.has_dora else "") for lm in parsed)
    targets = Counter(lm.target.component for lm in parsed if lm.target is not None)
    notes = []
    if family is not None:
        notes.append(f"module names are those of {_a(family)} model (a guess from the names); lycotools does not "
                     f"support {family} yet: other commands refuse this file")
    if index is not None and not shapes_match:
        notes.append(f"module names match {arch} but tensor shapes are not those of the standard {arch} model "
                     "(a custom or scaled-down model?)")
    if af.groups.leftovers:
        notes.append(f"{len(af.groups.leftovers)} keys fit no adapter convention")
    return {
        "kind": "adapter",
        "format": af.convention,
        "keys": key_style(af),
        "algorithm": algorithm_label(dict(algos)),
        "family": family,
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
        target = (f"{r['family']} (not supported yet)" if r.get("family") else r["arch"] or "unknown model")
        comps = f"; components: {', '.join(r['components'])}" if r.get("components") else ""
        head = (f"{p}: adapter, keys: {r.get('keys', r['format'])}, algorithm: {r.get('algorithm', '?')}, "
                f"for {target}, {r['modules']} modules "
                f"({algos}), rank {rank}, alpha {alpha}, {r['params'] / 1e6:.3f}M params, {r['dtype']}"
                + (f"; targets: {tg}" if tg else "") + comps)
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
        token = r["token"] or f"(none stored; A1111 and ComfyUI name it after the file: {Path(p).stem})"
        head = (f"{p}: embedding, {r['format']} format, token {token}, "
                f"{r['vectors']} vector(s), for {r['target']}")
    elif r.get("family"):
        head = (f"{p}: unknown ({r.get('keys', 0)} tensors in no adapter convention lycotools reads; the names are "
                f"those of {_a(r['family'])} model, which lycotools does not support yet)")
    else:
        head = f"{p}: unknown ({r.get('keys', 0)} tensors; not a checkpoint, adapter or embedding lycotools knows)"
    if kind == "checkpoint" and r.get("notes"):
        head += "\n" + "\n".join(f"  note: {n}" for n in r["notes"])
    return head

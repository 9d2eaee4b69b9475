"""Adapter key conventions: split file keys into (module, canonical suffix) and say which convention.

Every convention in the references is read here and normalised to one form: a module id
``(component, path, naming)`` and LyCORIS's canonical suffixes (``lora_down.weight``, ``hada_w1_a``,
...). Which checkpoint weight a module changes is decided later, by ``ModelIndex.resolve``.

Conventions read:
* kohya / LyCORIS flat names: ``lora_unet_*``, ``lora_te_*``, ``lora_te1_*``, ``lora_te2_*`` with
  diffusers-named or ldm/sgm-named UNet modules, and LyCORIS' standalone ``lycoris_*``;
* PEFT / diffusers dotted names: ``lora_A/lora_B`` (``.weight``, ``.default.weight``), ``lora.down/up``,
  ``lora_linear_layer.down/up``, old attn-procs ``processor.to_q_lora.down``, prefixes ``unet.``,
  ``text_encoder.``, ``text_encoder_2.``, ``base_model.model.``; AdaLoRA ``lora_A/B/E``; DoRA
  ``lora_magnitude_vector``;
* ComfyUI ``diffusion_model.<ldm path>`` names;
* LyCORIS bundled embeddings ``bundle_emb.*`` (kept aside).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

# Canonical LyCORIS suffixes (what the algorithm modules read)
CANONICAL_SUFFIXES = (
    "lora_down.weight", "lora_up.weight", "lora_mid.weight", "alpha", "dora_scale", "scale",
    "hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2",
    "lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t1", "lokr_t2",
    "diff", "diff_b", "w_norm", "b_norm", "on_input", "oft_blocks", "rescale",
    "a1.weight", "a2.weight", "b1.weight", "b2.weight", "bm.weight",
    "bias_indices", "bias_values", "bias_size",
)

# Dotted conventions: file suffix -> canonical suffix. Longest first so that the most specific wins.
_DOTTED_SUFFIXES = sorted(
    [
        ("lora_A.default.weight", "lora_down.weight"),
        ("lora_B.default.weight", "lora_up.weight"),
        ("lora_linear_layer.down.weight", "lora_down.weight"),
        ("lora_linear_layer.up.weight", "lora_up.weight"),
        ("lora.down.weight", "lora_down.weight"),
        ("lora.up.weight", "lora_up.weight"),
        ("lora_A.weight", "lora_down.weight"),
        ("lora_B.weight", "lora_up.weight"),
        ("lora_B.bias", "lora_up.bias"),
        ("lora_magnitude_vector", "lora_magnitude_vector"),
        ("lora_A", "lora_A"),
        ("lora_B", "lora_B"),
        ("lora_E", "lora_E"),
        ("weight", "weight"),  # IA3, only when the module also has on_input
    ]
    + [(s, s) for s in CANONICAL_SUFFIXES],
    key=lambda p: -len(p[0]),
)

# kohya flat prefixes -> component ("te" means: the one text encoder of an SD1/SD2 model)
FLAT_PREFIXES = (
    ("lora_unet_", "unet"),
    ("lora_te1_", "text_encoder"),
    ("lora_te2_", "text_encoder_2"),
    ("lora_te3_", "text_encoder_3"),
    ("lora_te_", "te"),
    ("lycoris_", "any"),
    ("lora_prior_unet_", "prior"),
    ("lora_prior_te_", "prior_te"),
    ("oft_unet_", "unet"),
)
DOTTED_PREFIXES = (
    ("unet.base_model.model.", "unet", "diffusers"),
    ("unet.", "unet", "diffusers"),
    ("text_encoder_2.", "text_encoder_2", "diffusers"),
    ("text_encoder.", "text_encoder", "diffusers"),
    ("base_model.model.", "any", "diffusers"),
    ("diffusion_model.", "unet", "ldm"),
    ("model.diffusion_model.", "unet", "ldm"),
    ("transformer.", "transformer", "diffusers"),
)


@dataclass(frozen=True)
class ModuleId:
    """Where an adapter module points, before resolution against a model."""

    component: str  # unet | te | text_encoder | text_encoder_2 | any | ...
    path: str  # flat (underscores) for kohya names, dotted otherwise
    flat: bool  # kohya-style flattened path
    naming: str  # "diffusers" | "ldm" | "unknown" (flat names may be either)


@dataclass
class KeyGroups:
    modules: dict[str, dict[str, str]] = field(default_factory=dict)  # module name -> {canonical suffix: file key}
    ids: dict[str, ModuleId] = field(default_factory=dict)
    conventions: dict[str, int] = field(default_factory=dict)  # convention name -> module count
    embeddings: list[str] = field(default_factory=list)  # bundle_emb.* keys
    leftovers: list[str] = field(default_factory=list)  # keys that fit no convention


def _flat_split(key: str):
    head, _, suffix = key.partition(".")
    for prefix, comp in FLAT_PREFIXES:
        if head.startswith(prefix):
            conv = "lycoris" if prefix == "lycoris_" else "kohya"
            return head, suffix, ModuleId(comp, head[len(prefix):], True, "unknown"), conv
    return None


def _dotted_split(key: str):
    for fsuffix, canon in _DOTTED_SUFFIXES:
        if key.endswith("." + fsuffix):
            module = key[: -len(fsuffix) - 1]
            break
        if fsuffix.startswith("lora.") and key.endswith("_" + fsuffix):  # attn procs: to_q_lora.down.weight
            module = key[: -len(fsuffix) - 1]
            break
    else:
        return None
    conv = "peft" if canon in ("lora_A", "lora_B", "lora_E") or "lora_A" in fsuffix or "lora_B" in fsuffix else "diffusers"
    if "lora_linear_layer" in fsuffix or fsuffix.startswith("lora."):
        conv = "diffusers-legacy"
    comp, naming, path = "any", "diffusers", module
    for prefix, c, n in DOTTED_PREFIXES:
        if module.startswith(prefix):
            comp, naming, path = c, n, module[len(prefix):]
            if n == "ldm":
                conv = "comfy"
            break
    while path.startswith("base_model.model."):  # PeftModel wrappers nest this prefix
        path = path[len("base_model.model."):]
    # attn-procs names: ...attn1.processor.to_q_lora -> ...attn1.to_q
    if path.endswith("_lora") or ".processor." in path:
        conv = "diffusers-attnprocs"
        path = path.replace(".processor.", ".")
        if path.endswith("_lora"):
            path = path[: -len("_lora")]
        if path.endswith("to_out"):
            path += ".0"
    return module, canon, ModuleId(comp, path, False, naming), conv


@functools.lru_cache(maxsize=1 << 16)  # the same names recur in every file of a collection
def _split(key: str):
    """(module, canonical suffix, ModuleId, convention) of a key, or None when it fits no convention."""
    split = _flat_split(key) if "." in key else None
    if split is None:
        split = _dotted_split(key)
    return split


def group_keys(keys) -> KeyGroups:
    """Group adapter file keys into modules with canonical suffixes."""
    g = KeyGroups()
    convs: dict[str, str] = {}
    for key in keys:
        if key.startswith("bundle_emb."):
            g.embeddings.append(key)
            continue
        split = _split(key) if len(key) <= 400 else _split.__wrapped__(key)
        if split is None:
            g.leftovers.append(key)
            continue
        module, suffix, mid, conv = split
        g.modules.setdefault(module, {})[suffix] = key
        g.ids[module] = mid
        convs[module] = conv
    # a bare ".weight" is IA3 only next to "on_input"; otherwise the key is not an adapter key
    for module, sufs in list(g.modules.items()):
        if "weight" in sufs and "on_input" not in sufs:
            g.leftovers.append(sufs.pop("weight"))
        if not sufs:
            del g.modules[module], g.ids[module], convs[module]
    for conv in convs.values():
        g.conventions[conv] = g.conventions.get(conv, 0) + 1
    return g


def flatten_path(path: str) -> str:
    return path.replace(".", "_")


def kohya_module_name(arch: str, component: str, module: str, ldm_module: str | None = None) -> str:
    """The kohya/LyCORIS module name every consumer loads (docs/formats.md#kohya-and-lycoris-names): diffusers-named UNet modules
    for SD1/SD2, ldm/sgm-named for SDXL; ``lora_te_`` for one text encoder, ``lora_te1_/lora_te2_`` for two.
    Text-encoder paths keep the ``text_model.`` level."""
    if component == "unet":
        path = ldm_module if arch.startswith("sdxl") and ldm_module else module
        return "lora_unet_" + flatten_path(path)
    if not module.startswith(("text_model.", "text_projection")):
        module = "text_model." + module
    if arch == "sdxl":
        prefix = "lora_te1_" if component == "text_encoder" else "lora_te2_"
    else:
        prefix = "lora_te_"
    return prefix + flatten_path(module)

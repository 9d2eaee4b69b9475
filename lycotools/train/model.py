"""Build a base checkpoint into diffusers/transformers modules locally (no hub access).

Any checkpoint the tensor layer reads (``CheckpointView``: single file, sharded, pickle, diffusers folder)
is built into ``UNet2DConditionModel``, ``CLIPTextModel`` / ``CLIPTextModelWithProjection`` and
``AutoencoderKL``. Configs come from the diffusers folder itself (``*/config.json``), from ``--config
FOLDER`` (a diffusers folder holding configs and a tokenizer), or, for a single file whose shapes match
a standard model, from the configs shipped in ``lycotools/layouts/configs``. Tokenizers come from
``--config``/``--tokenizer``, the checkpoint folder or a ``tokenizer/`` folder beside the file, else the CLIP
tokenizers shipped with lycotools (``layouts.tokenizers``): nothing is downloaded.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import BadInput
from ..layouts import checkpoint as ckpt
from ..layouts.model_view import CheckpointView

# arch -> component -> shipped config file
SHIPPED = {
    "sd1": {"unet": "sd15_unet.json", "vae": "sd_vae.json", "text_encoder": "clip_vit_l14_text.json"},
    "sd2": {"unet": "sd21_unet.json", "vae": "sd_vae.json", "text_encoder": "openclip_vit_h14_text.json"},
    "sdxl": {"unet": "sdxl_base_unet.json", "vae": "sdxl_vae.json", "text_encoder": "clip_vit_l14_text.json",
             "text_encoder_2": "openclip_vit_bigg14_text.json"},
    "sdxl-refiner": {"unet": "sdxl_refiner_unet.json", "vae": "sdxl_vae.json",
                     "text_encoder_2": "openclip_vit_bigg14_text.json"},
}
TOKENIZER_DIRS = {"text_encoder": "tokenizer", "text_encoder_2": "tokenizer_2"}

# Stable Diffusion's training noise schedule (all SD1/SD2/SDXL releases)
SD_SCHEDULE = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
               "clip_sample": False}


@dataclass
class BaseModel:
    arch: str
    path: Path
    view: CheckpointView
    unet: torch.nn.Module
    vae: torch.nn.Module | None
    text_encoders: dict[str, torch.nn.Module]  # "text_encoder" / "text_encoder_2" -> module
    tokenizers: dict[str, object] = field(default_factory=dict)
    prediction_type: str = "epsilon"
    schedule: dict = field(default_factory=lambda: dict(SD_SCHEDULE))

    @property
    def te_names(self) -> list[str]:
        return [c for c in ("text_encoder", "text_encoder_2") if c in self.text_encoders]


def _read_json(p: Path) -> dict:
    return {k: v for k, v in json.loads(p.read_text()).items() if not k.startswith("_")}


def _component_configs(view: CheckpointView, config_dir: Path | None) -> tuple[dict, str]:
    """comp -> config dict, and where they came from."""
    folder = config_dir
    if folder is None and view.layout == "diffusers" and Path(view.path).is_dir():
        folder = Path(view.path)
    comps = view.components()
    if folder is not None:
        out = {}
        for c in comps:
            p = folder / c / "config.json"
            if not p.exists():
                raise BadInput(folder, f"no {c}/config.json", hint="--config must be a diffusers folder of the same model")
            out[c] = _read_json(p)
        return out, str(folder)
    shipped = SHIPPED.get(view.arch)
    if shipped is None:
        raise BadInput(view.path, f"no shipped config for arch {view.arch}", hint="pass --config DIFFUSERS_FOLDER")
    tmpl = ckpt.template_shapes(view.arch)
    for c in comps:
        if c not in tmpl:
            continue
        mine = {k: view.shape(c, k) for (cc, k) in view.keys() if cc == c}
        theirs = tmpl[c]
        bad = [k for k, s in theirs.items() if k in mine and tuple(mine[k]) != tuple(s)]
        missing = [k for k in theirs if k not in mine and not k.endswith("position_ids")]
        if bad or len(missing) > len(theirs) // 10:
            raise BadInput(view.path, f"{c} does not match the standard {view.arch} model the shipped configs describe "
                                      f"({len(bad)} shapes differ, {len(missing)} weights missing)",
                           hint="pass --config DIFFUSERS_FOLDER holding this model's configs and tokenizer")
    return {c: ckpt.load_config(shipped[c]) for c in comps if c in shipped}, "shipped"


def _build_te(cfg: dict, comp: str, sd: dict):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    c = CLIPTextConfig(**{k: v for k, v in cfg.items() if k not in ("architectures", "transformers_version", "dtype",
                                                                     "torch_dtype")})
    with_proj = any(k.startswith("text_projection") for k in sd) or "WithProjection" in str(cfg.get("architectures"))
    with _empty():
        model = CLIPTextModelWithProjection(c) if with_proj else CLIPTextModel(c)
    own = model.state_dict()
    has_level = any(k.startswith("text_model.") for k in own)
    fixed = {}
    for k, v in sd.items():
        k2 = k if has_level or not k.startswith("text_model.") else k[len("text_model."):]
        fixed[k2] = v
    if "position_ids" in str(list(own)):
        for k in own:
            if k.endswith("position_ids") and k not in fixed:
                fixed[k] = own[k]
    missing, unexpected = model.load_state_dict(_f32(fixed), strict=False, assign=True)
    missing = [k for k in missing if not k.endswith("position_ids")]
    if missing:
        raise BadInput(None, f"{comp}: {len(missing)} weights missing from the checkpoint (e.g. {missing[0]})")
    return model


def _empty():
    """Build modules without initialising weights (parameters on meta, buffers real): the checkpoint fills them."""
    from accelerate import init_empty_weights

    return init_empty_weights(include_buffers=False)


def _f32(sd: dict) -> dict:
    return {k: (v.float() if v.is_floating_point() else v) for k, v in sd.items()}


def _load_tokenizer(comp: str, dirs: list[Path]):
    from transformers import CLIPTokenizer

    for d in dirs:
        t = d / TOKENIZER_DIRS[comp]
        if (t / "vocab.json").exists() or (t / "tokenizer.json").exists():  # transformers 5 saves tokenizer.json only
            return CLIPTokenizer.from_pretrained(str(t), local_files_only=True)
    return None


def _shipped_tokenizer(arch: str, comp: str, te):
    """The CLIP tokenizer shipped with lycotools for this text encoder, or None when its embedding is smaller
    than the 49408-token vocabulary (a non-standard encoder)."""
    from ..layouts import tokenizers

    if not tokenizers.fits(getattr(te.config, "vocab_size", None)):
        return None
    return tokenizers.clip_tokenizer(tokenizers.kind_for(arch, comp))


def load_base(path, config_dir=None, tokenizer_dir=None, *, need_vae=True, v_pred: bool | None = None) -> BaseModel:
    from diffusers import AutoencoderKL, UNet2DConditionModel

    path = Path(path)
    if not path.exists():
        raise BadInput(path, "no such file or folder")
    view = CheckpointView.open(path)
    cfg_dir = Path(config_dir) if config_dir else None
    cfgs, _ = _component_configs(view, cfg_dir)
    comps: dict[str, dict] = {}
    for c, k in view.keys():
        if c != "vae" or need_vae:  # without the VAE its weights are not even read
            comps.setdefault(c, {})[k] = view.get(c, k)

    def build(cls, comp: str, hint: str | None = None):
        with _empty():
            model = cls(**cfgs[comp])
        missing, _ = model.load_state_dict(_f32(comps.pop(comp)), strict=False, assign=True)
        if missing:
            raise BadInput(path, f"{comp}: {len(missing)} weights missing (e.g. {missing[0]})", hint=hint)
        return model

    if "unet" not in comps:
        raise BadInput(path, "the checkpoint has no UNet")
    unet = build(UNet2DConditionModel, "unet", hint="the config does not fit this checkpoint; pass --config")
    vae = None
    if need_vae:
        if "vae" not in comps:
            raise BadInput(path, "the checkpoint has no VAE (needed to encode the images)")
        vae = build(AutoencoderKL, "vae")
    tes = {c: _build_te(cfgs[c], c, comps[c]) for c in ("text_encoder", "text_encoder_2") if c in comps}
    dirs = [d for d in (Path(tokenizer_dir) if tokenizer_dir else None, cfg_dir, path if path.is_dir() else None,
                        path.parent) if d is not None]
    toks = {}
    for c in tes:
        tok = _load_tokenizer(c, dirs)
        if tok is None:
            tok = _shipped_tokenizer(view.arch, c, tes[c])
        if tok is None:
            raise BadInput(path, f"no tokenizer for {c} (looked for {TOKENIZER_DIRS[c]}/ in "
                                 f"{', '.join(str(d) for d in dirs)}; the shipped CLIP tokenizer's 49408 ids do not "
                                 f"fit its {tes[c].config.vocab_size}-token embedding)",
                           hint="pass --config DIFFUSERS_FOLDER (or --tokenizer) holding the tokenizer; nothing is downloaded")
        toks[c] = tok
    schedule = dict(SD_SCHEDULE)
    pred = "epsilon"
    sched_dir = (cfg_dir or (path if path.is_dir() else None))
    if sched_dir is not None and (sched_dir / "scheduler" / "scheduler_config.json").exists():
        sc = _read_json(sched_dir / "scheduler" / "scheduler_config.json")
        for k in ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule"):
            if k in sc:
                schedule[k] = sc[k]
        pred = sc.get("prediction_type", pred) or pred
    elif getattr(view.info, "prediction", None) == "v":  # a single file's v_pred key or modelspec.prediction_type
        pred = "v_prediction"
    if v_pred is not None:
        pred = "v_prediction" if v_pred else "epsilon"
    for m in (unet, vae, *tes.values()):
        if m is not None:
            m.requires_grad_(False)
            m.eval()
    return BaseModel(arch=view.arch, path=path, view=view, unet=unet, vae=vae, text_encoders=tes, tokenizers=toks,
                     prediction_type=pred, schedule=schedule)

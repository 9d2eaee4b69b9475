"""``convert`` for checkpoints: single file (ldm/sgm, safetensors or pickle) <-> diffusers folder.

* ``--to diffusers``: ``unet/``, ``vae/``, ``text_encoder/``[, ``text_encoder_2/``] weights (one planned,
  streamed writer per component) and configs: from ``--config FOLDER`` (its tokenizer/scheduler folders and
  ``model_index.json`` are copied too), else the shipped standard configs when the shapes are those of a
  standard model, else configs inferred from the shapes (head counts and norm groups are then guesses,
  said on stderr). ``tokenizer/`` (and ``tokenizer_2/``) not copied from ``--config`` are the CLIP tokenizers
  lycotools ships, for text encoders that embed the 49408 CLIP tokens; ``scheduler/`` and
  ``model_index.json`` are always written, so ``from_pretrained`` loads the folder as it is. The folder is
  written beside the target and renamed into place when complete.
* ``--to single-file``: the ldm/sgm layout through the tensor layer's key maps (OpenCLIP q/k/v joined,
  VAE attention as 1x1 convs, ``text_projection`` transposed), streamed with a planned writer; a single-file
  input is re-saved (pickle -> safetensors, ``--dtype``, ``--prune``).
* ``--dtype``: floating-point weights only; integer buffers are kept.
* ``--prune``: drops EMA weights, optimizer/scheduler state and the diffusion-schedule buffers.
"""

from __future__ import annotations

import json
import math
import shutil
import sys
from pathlib import Path

import click
import torch
from tqdm import tqdm

from ..alloc import streaming_threads
from ..devices import CHECKPOINT_DTYPES as DTYPES, cast_to
from ..errors import BadInput
from ..finite import NonFinite
from ..io.metadata import lycotools_record, modelspec
from ..io.readers import prefetch
from ..io.writer import SafetensorsWriter, atomic_folder, check_output, check_output_folder
from ..layouts import checkpoint as ckpt
from ..layouts.model_view import CheckpointView, SingleFileSource

PRUNE_PREFIXES = ("model_ema.", "ema_model.", "optimizer", "optimizer_states", "lr_scheduler", "lr_schedulers",
                  "callbacks", "loops.", "ema.")
PRUNE_KEYS = {"betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod",
              "sqrt_one_minus_alphas_cumprod", "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod",
              "sqrt_recipm1_alphas_cumprod", "posterior_variance", "posterior_log_variance_clipped",
              "posterior_mean_coef1", "posterior_mean_coef2", "logvar", "global_step", "epoch"}
WEIGHT_FILES = {"unet": "diffusion_pytorch_model.safetensors", "vae": "diffusion_pytorch_model.safetensors",
                "text_encoder": "model.safetensors", "text_encoder_2": "model.safetensors"}
CLASSES = {"unet": ("diffusers", "UNet2DConditionModel"), "vae": ("diffusers", "AutoencoderKL"),
           "text_encoder": ("transformers", "CLIPTextModel"),
           "text_encoder_2": ("transformers", "CLIPTextModelWithProjection")}
TOKENIZERS = (("tokenizer", "text_encoder"), ("tokenizer_2", "text_encoder_2"))
_KIND = {"unet": "unet", "vae": "vae", "text_encoder": "clip", "text_encoder_2": "clip_proj"}


def _say(quiet, line):
    if not quiet:
        click.echo(line, err=True)


def _out_dtype(t_dtype: torch.dtype, opts) -> torch.dtype:
    if opts.dtype and t_dtype.is_floating_point:
        return DTYPES[opts.dtype]
    return t_dtype


def cast_to_option(t: torch.Tensor, opts) -> torch.Tensor:
    """A floating tensor cast to ``--dtype`` when one is given (other dtypes untouched; fp8
    saturates, see ``devices.cast_to``), contiguous."""
    return cast_to(t, _out_dtype(t.dtype, opts))


def pruned(key: str) -> bool:
    return key.startswith(PRUNE_PREFIXES) or key in PRUNE_KEYS


def convert_checkpoint(path, output, opts, *, overwrite: bool = False, quiet: bool = False) -> dict:
    view = CheckpointView.open(path)
    if getattr(opts, "prediction", None):
        view.info.prediction = opts.prediction
    tally = NonFinite(getattr(opts, "allow_nonfinite", False))
    try:
        if opts.to == "diffusers":
            res = _to_diffusers(view, Path(path), Path(output), opts, overwrite, quiet, tally)
        else:
            res = _to_single(view, Path(path), Path(output), opts, overwrite, quiet, tally)
    finally:
        view.close()
    tally.warn()
    return res


def _cast_checked(t, name: str, opts, tally: NonFinite, path):
    """The tensor at the output dtype. NaN/Inf the input already held are written as they were (counted for
    one warning); an overflow the cast itself makes (fp32 beyond fp16's range) is refused unless
    --allow-nonfinite."""
    out = cast_to_option(t, opts)
    tally.check_made(path, f"tensor {name} overflows --dtype {opts.dtype}", name, t, out)
    return out


# ------------------------------------------------------------------------------------------------
# single file -> diffusers folder
# ------------------------------------------------------------------------------------------------


def _component_keys(view: CheckpointView) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for comp, dkey in view.keys():
        out.setdefault(comp, []).append(dkey)
    return out


def _disk_key(comp: str, dkey: str) -> str:
    """transformers 5's CLIPTextModel state dict has no ``text_model.`` level; WithProjection keeps it."""
    if comp == "text_encoder" and dkey.startswith("text_model."):
        return dkey[len("text_model."):]
    return dkey


def _to_diffusers(view, path: Path, output: Path, opts, overwrite, quiet, tally) -> dict:
    check_output_folder(output, [path, opts.config], overwrite)
    if output.exists() and not output.is_dir():
        raise BadInput(output, "--to diffusers writes a folder, and this path is a file")
    if opts.prune:
        pass  # a diffusers folder never holds EMA/optimizer/schedule keys: nothing more to drop
    comps = _component_keys(view)
    shapes = {c: {k: tuple(view.shape(c, k)) for k in keys} for c, keys in comps.items()}
    config_dir = Path(opts.config) if opts.config else None
    configs, how = _configs(view.arch, shapes, config_dir, view.info)
    dropped = list(getattr(view.keymap, "unmapped_single", []) or [])
    with atomic_folder(output) as tmp:
        total = sum(len(v) for v in comps.values())
        bar = tqdm(total=total, desc=f"convert {path.name}", unit="tensor", file=sys.stderr, disable=quiet)
        for comp, keys in comps.items():
            folder = tmp / comp
            folder.mkdir()
            (folder / "config.json").write_text(json.dumps(configs[comp], indent=2, sort_keys=True) + "\n")
            plan = [(_disk_key(comp, k), _out_dtype(view.dtype(comp, k), opts), shapes[comp][k]) for k in keys]
            back = {_disk_key(comp, k): k for k in keys}
            with SafetensorsWriter(folder / WEIGHT_FILES[comp], {"format": "pt"}, plan=plan, hashes=False) as w:
                for name in w.expected_order:
                    t = view.get(comp, back[name])
                    w.add(name, _cast_checked(t, name, opts, tally, path))
                    bar.update(1)
        bar.close()
        _pipeline_files(tmp, view, comps, config_dir, opts)
    _say(quiet, f"lycotools: wrote {output} (diffusers {view.arch}: {', '.join(sorted(comps))}; configs {how})")
    if dropped:
        _say(quiet, f"lycotools: warning: lossy: {len(dropped)} key(s) diffusers has no place for were left out "
                    f"(first: {dropped[0]})")
    return {"output": str(output), "arch": view.arch, "components": sorted(comps), "configs": how,
            "dropped": dropped}


def _pipeline_files(folder: Path, view, comps, config_dir: Path | None, opts):
    copied = set()
    if config_dir is not None:
        for sub in ("tokenizer", "tokenizer_2", "scheduler", "feature_extractor"):
            if (config_dir / sub).is_dir():
                shutil.copytree(config_dir / sub, folder / sub)
                copied.add(sub)
    sdxl = "text_encoder_2" in comps
    if "scheduler" not in copied:
        (folder / "scheduler").mkdir()
        (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(_scheduler(view), indent=2) + "\n")
        copied.add("scheduler")
        if view.arch == "sd2" and view.info.prediction is None:
            click.echo("lycotools: note: SD2 512 (epsilon) and 768-v (v_prediction) checkpoints have the same keys and "
                       "this one does not say which it is: the scheduler was written with prediction_type epsilon "
                       "(a 768-v model needs v_prediction: pass --config with its diffusers folder, or edit "
                       "scheduler/scheduler_config.json)", err=True)
    mi = None
    if config_dir is not None and (config_dir / "model_index.json").exists():
        mi = json.loads((config_dir / "model_index.json").read_text())
    if mi is None:
        import diffusers

        mi = {"_class_name": "StableDiffusionXLPipeline" if sdxl else "StableDiffusionPipeline",
              "_diffusers_version": diffusers.__version__}
        if not sdxl:
            mi.update({"safety_checker": [None, None], "feature_extractor": [None, None],
                       "requires_safety_checker": False})
    for comp in comps:
        mi[comp] = list(CLASSES[comp])
    sched = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    mi["scheduler"] = ["diffusers", sched.get("_class_name", "EulerDiscreteScheduler")]
    unfit = _shipped_tokenizers(folder, view, comps, copied)
    for tok, te in TOKENIZERS:
        if te in comps:
            mi[tok] = ["transformers", "CLIPTokenizer"] if tok in copied else [None, None]
    (folder / "model_index.json").write_text(json.dumps(mi, indent=2, sort_keys=True) + "\n")
    for tok, te, vocab in unfit:
        click.echo(f"lycotools: note: no {tok}/ written: {te} embeds {vocab} tokens, not the 49408 of the CLIP tokenizer "
                   f"lycotools ships; pass --config FOLDER to copy the model's own, or give {tok}= to from_pretrained",
                   err=True)


def _shipped_tokenizers(folder: Path, view, comps, copied: set) -> list[tuple[str, str, int | None]]:
    """Write the shipped CLIP tokenizer (``layouts.tokenizers``: CLIP-L for SD1 and SDXL's first encoder, OpenCLIP
    padding for SD2 and SDXL's second) for each text encoder without one from ``--config``, when the encoder's
    embedding holds the 49408 CLIP tokens. Returns (tokenizer, encoder, vocab size) of the encoders left without."""
    from ..layouts import tokenizers

    unfit = []
    for tok, te in TOKENIZERS:
        if te not in comps or tok in copied:
            continue
        emb = next((k for k in comps[te] if k.endswith("embeddings.token_embedding.weight")), None)
        vocab = int(view.shape(te, emb)[0]) if emb is not None else None
        if tokenizers.fits(vocab):
            tokenizers.write_tokenizer_folder(folder / tok, tokenizers.kind_for(view.arch, te))
            copied.add(tok)
        else:
            unfit.append((tok, te, vocab))
    return unfit


def _scheduler(view) -> dict:
    import diffusers

    pred = "v_prediction" if getattr(view.info, "prediction", None) == "v" else "epsilon"
    base = {"_diffusers_version": diffusers.__version__, "beta_start": 0.00085, "beta_end": 0.012,
            "beta_schedule": "scaled_linear", "num_train_timesteps": 1000, "prediction_type": pred,
            "steps_offset": 1, "timestep_spacing": "leading", "trained_betas": None}
    if view.arch.startswith("sdxl"):
        return dict(base, _class_name="EulerDiscreteScheduler", interpolation_type="linear", use_karras_sigmas=False)
    return dict(base, _class_name="DDIMScheduler", clip_sample=False, set_alpha_to_one=False)


# ---- configs -----------------------------------------------------------------------------------


def _meta_shapes(comp: str, cfg: dict) -> dict:
    sd = {k: tuple(v.shape) for k, v in ckpt._instantiate_meta(_KIND[comp], cfg).state_dict().items()}
    return ckpt.canonical_te_state(sd) if comp.startswith("text_encoder") else sd


def _fits(comp: str, cfg: dict, shapes: dict) -> bool:
    try:
        want = _meta_shapes(comp, cfg)
    except ImportError:  # a missing package is not a config that does not fit
        raise
    except Exception:
        return False
    want = {k: v for k, v in want.items() if not k.endswith("position_ids")}
    have = {k: v for k, v in shapes.items() if not k.endswith("position_ids")}
    return want == have


def _configs(arch: str, shapes: dict, config_dir: Path | None, info) -> tuple[dict, str]:
    out, how = {}, set()
    templates = ckpt._TEMPLATES.get(arch, {})
    for comp, shp in shapes.items():
        if config_dir is not None:
            f = config_dir / comp / "config.json"
            if not f.exists():
                raise BadInput(config_dir, f"--config folder has no {comp}/config.json")
            cfg = json.loads(f.read_text())
            clean = {k: v for k, v in cfg.items() if not k.startswith("_") and k not in ("architectures", "transformers_version", "dtype", "torch_dtype", "model_type")}
            if not _fits(comp, clean, shp):
                raise BadInput(config_dir, f"{comp}/config.json does not describe this checkpoint's {comp} (shapes differ)")
            out[comp] = cfg
            how.add("from --config")
            continue
        if comp in templates:
            cfg = ckpt.load_config(templates[comp][0])
            if _fits(comp, cfg, shp):
                out[comp] = _with_class(comp, cfg)
                how.add("standard")
                continue
        cfg = _infer(comp, shp, arch, shapes)
        if not _fits(comp, cfg, shp):
            raise BadInput(None, f"cannot build a {comp} config that fits this checkpoint's shapes",
                           hint="pass --config FOLDER (a diffusers folder of the same architecture)")
        out[comp] = _with_class(comp, cfg)
        how.add("inferred from shapes (head counts, norm groups and sample size are guesses; "
                "pass --config for exact ones)")
    return out, ", ".join(sorted(how))


def _with_class(comp: str, cfg: dict) -> dict:
    cfg = dict(cfg)
    if comp in ("unet", "vae"):
        import diffusers

        cfg["_class_name"] = CLASSES[comp][1]
        cfg["_diffusers_version"] = diffusers.__version__
    else:
        cfg.setdefault("architectures", [CLASSES[comp][1]])
        cfg.setdefault("model_type", "clip_text_model")
    return cfg


def _count(shapes, fmt: str) -> int:
    n = 0
    while any(k.startswith(fmt.format(n) + ".") for k in shapes):
        n += 1
    return n


def _groups(channels) -> int:
    g = 0
    for c in channels:
        g = math.gcd(g, int(c))
    return min(32, g) if g else 32


def _infer(comp: str, s: dict, arch: str, all_shapes: dict) -> dict:
    if comp == "unet":
        return _infer_unet(s, arch, all_shapes)
    if comp == "vae":
        return _infer_vae(s, arch)
    return _infer_clip(comp, s, arch)


def _infer_unet(s: dict, arch: str, all_shapes: dict) -> dict:
    n_down = _count(s, "down_blocks.{}")
    n_up = _count(s, "up_blocks.{}")
    chans = [s[f"down_blocks.{i}.resnets.0.conv1.weight"][0] for i in range(n_down)]
    lpb = _count(s, "down_blocks.0.resnets.{}")
    down_types, up_types, depth = [], [], []
    for i in range(n_down):
        attn = f"down_blocks.{i}.attentions.0.proj_in.weight" in s
        down_types.append("CrossAttnDownBlock2D" if attn else "DownBlock2D")
        depth.append(_count(s, f"down_blocks.{i}.attentions.0.transformer_blocks.{{}}") or 1)
    for i in range(n_up):
        attn = f"up_blocks.{i}.attentions.0.proj_in.weight" in s
        up_types.append("CrossAttnUpBlock2D" if attn else "UpBlock2D")
    to_k = next(v for k, v in s.items() if k.endswith("attn2.to_k.weight"))
    proj_in = next(v for k, v in s.items() if k.endswith("proj_in.weight"))
    heads = [8] * n_down if arch == "sd1" else [max(1, c // 64) for c in chans]
    cfg = {
        "sample_size": {"sd1": 64, "sd2": 96, "sdxl": 128, "sdxl-refiner": 128}.get(arch, 64),
        "in_channels": s["conv_in.weight"][1], "out_channels": s["conv_out.weight"][0],
        "layers_per_block": lpb, "block_out_channels": chans, "down_block_types": down_types,
        "up_block_types": up_types, "cross_attention_dim": to_k[1], "attention_head_dim": heads,
        "use_linear_projection": len(proj_in) == 2, "norm_num_groups": _groups(chans),
        "transformer_layers_per_block": depth if any(d != 1 for d in depth) else 1,
    }
    if "add_embedding.linear_1.weight" in s:
        in_dim = s["add_embedding.linear_1.weight"][1]
        te2 = all_shapes.get("text_encoder_2", {})
        pooled = te2["text_projection.weight"][0] if "text_projection.weight" in te2 else 1280
        cfg.update({"addition_embed_type": "text_time", "projection_class_embeddings_input_dim": in_dim,
                    "addition_time_embed_dim": (in_dim - pooled) // 6})
    return cfg


def _infer_vae(s: dict, arch: str) -> dict:
    n = _count(s, "encoder.down_blocks.{}")
    chans = [s[f"encoder.down_blocks.{i}.resnets.0.conv1.weight"][0] for i in range(n)]
    cfg = {
        "in_channels": s["encoder.conv_in.weight"][1], "out_channels": s["decoder.conv_out.weight"][0],
        "down_block_types": ["DownEncoderBlock2D"] * n, "up_block_types": ["UpDecoderBlock2D"] * n,
        "block_out_channels": chans, "latent_channels": s["decoder.conv_in.weight"][1],
        "layers_per_block": _count(s, "encoder.down_blocks.0.resnets.{}"), "norm_num_groups": _groups(chans),
        "sample_size": 1024 if arch.startswith("sdxl") else 512,
        "scaling_factor": 0.13025 if arch.startswith("sdxl") else 0.18215,
    }
    if arch.startswith("sdxl"):
        cfg["force_upcast"] = True
    return cfg


def _infer_clip(comp: str, s: dict, arch: str) -> dict:
    tok = s["text_model.embeddings.token_embedding.weight"]
    hidden = tok[1]
    cfg = {
        "vocab_size": tok[0], "hidden_size": hidden,
        "intermediate_size": s["text_model.encoder.layers.0.mlp.fc1.weight"][0],
        "num_hidden_layers": _count(s, "text_model.encoder.layers.{}"),
        "num_attention_heads": max(1, hidden // 64),
        "max_position_embeddings": s["text_model.embeddings.position_embedding.weight"][0],
        "hidden_act": "quick_gelu" if arch == "sd1" or (arch == "sdxl" and comp == "text_encoder") else "gelu",
        "bos_token_id": 49406 if tok[0] > 49407 else 0, "eos_token_id": 49407 if tok[0] > 49407 else 2,
        "pad_token_id": 1,
    }
    if "text_projection.weight" in s:
        cfg["projection_dim"] = s["text_projection.weight"][0]
    return cfg


# ------------------------------------------------------------------------------------------------
# -> single file
# ------------------------------------------------------------------------------------------------


def _to_single(view, path: Path, output: Path, opts, overwrite, quiet, tally) -> dict:
    check_output(output, [path], overwrite)
    meta = {k: v for k, v in view.source.metadata.items()
            if not k.startswith(("sshs_", "lycotools.", "format", "model_index"))}
    meta.update(modelspec(view.arch, None, output.stem, no_date=opts.no_date,
                          prediction=("v" if getattr(view.info, "prediction", None) == "v" else None)))
    options = {k: v for k, v in opts.__dict__.items() if v not in (None, False) and k not in ("no_date",)}
    meta.update(lycotools_record("convert", [{"role": "input", "name": path.name}], options))
    dropped: list[str] = []
    if view.layout == "diffusers":
        src = SingleFileSource(view)
        dropped = src.dropped
        plan = [(k, _out_dtype(src.dtype(k), opts), src.shape(k)) for k in src.keys()]
        with SafetensorsWriter(output, meta, inputs=[path], overwrite=overwrite, plan=plan) as w:
            for key in tqdm(w.expected_order, desc=f"convert {path.name}", unit="tensor", file=sys.stderr,
                            disable=quiet):
                w.add(key, _cast_checked(src.get(key), key, opts, tally, path))
    else:
        src = view.source
        keys = [k for k in src.keys() if not (opts.prune and pruned(k))]
        dropped = [k for k in src.keys() if opts.prune and pruned(k)]
        plan = [(k, _out_dtype(src.dtype(k), opts), tuple(src.shape(k))) for k in keys]
        with SafetensorsWriter(output, meta, inputs=[path], overwrite=overwrite, plan=plan) as w, streaming_threads():
            for key, t in tqdm(prefetch(w.expected_order, src.get), total=len(plan), desc=f"convert {path.name}",
                               unit="tensor", file=sys.stderr, disable=quiet):
                w.add(key, _cast_checked(t, key, opts, tally, path))
    extras = getattr(view.source, "extras", None) or {}
    _say(quiet, f"lycotools: wrote {output} (single file {view.arch}"
                + (f", {opts.dtype}" if opts.dtype else "") + ")")
    if dropped:
        what = "pruned" if view.layout != "diffusers" else "left out (no single-file key)"
        _say(quiet, f"lycotools: {'note' if opts.prune else 'warning'}: {len(dropped)} key(s) {what}"
                    f" (first: {dropped[0]})")
    if extras:
        _say(quiet, f"lycotools: note: {len(extras)} non-tensor pickle entr{'y' if len(extras) == 1 else 'ies'} "
                    "(training state) not carried into safetensors")
    return {"output": str(output), "arch": view.arch, "dropped": dropped}

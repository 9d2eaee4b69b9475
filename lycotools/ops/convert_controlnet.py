"""``convert`` for ControlNet files: the original layout (``control_model.*``, one file) <-> diffusers'
``ControlNetModel`` (a folder with ``config.json`` + ``diffusion_pytorch_model.safetensors``).

The ControlNet trunk is a copy of the UNet's encoder half, so its keys go through the tensor layer's UNet
key map (``control_model.X`` is read as ``model.diffusion_model.X``); the ControlNet-only parts map as

    control_model.zero_convs.{i}.0        <-> controlnet_down_blocks.{i}
    control_model.middle_block_out.0      <-> controlnet_mid_block
    control_model.input_hint_block.{0}    <-> controlnet_cond_embedding.conv_in
    control_model.input_hint_block.{2k}   <-> controlnet_cond_embedding.blocks.{k-1}   (the convs between SiLUs)
    control_model.input_hint_block.{last} <-> controlnet_cond_embedding.conv_out

T2I-Adapter layouts live in ``convert_t2i.py``; Control-LoRA extraction and densifying in ``control_lora.py``.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import click
import torch

from ..errors import BadInput
from ..io.metadata import lycotools_record
from ..io.readers import SafetensorsSource, diffusers_model_weights, open_source
from ..io.writer import SafetensorsWriter, atomic_folder, check_output, check_output_folder
from ..layouts import checkpoint as ckpt
from .convert_checkpoint import _groups, cast_to_option

CN = "control_model."
UNET = ckpt.UNET_PREFIX  # "model.diffusion_model."
WEIGHTS = "diffusion_pytorch_model.safetensors"


def controlnet_layout(keys) -> str | None:
    """'original', 'diffusers' or None."""
    keys = list(keys)
    if any(k.startswith(CN + "zero_convs.") for k in keys):
        return "original"
    if any(k.startswith("controlnet_cond_embedding.") for k in keys):
        return "diffusers"
    return None


def controlnet_folder_weights(path: Path) -> Path | None:
    """A diffusers ControlNet folder (config.json + weights, or a pipeline's controlnet/ subfolder)."""
    return diffusers_model_weights(path, "ControlNet", "controlnet", WEIGHTS)


def _open(path: Path):
    if path.is_dir():
        w = controlnet_folder_weights(path)
        if w is None:
            raise BadInput(path, "not a diffusers ControlNet folder")
        return SafetensorsSource(w), w.parent
    return open_source(path), None


def _extra_original(dkey: str, hint_idx: list[int]) -> str | None:
    m = re.fullmatch(r"controlnet_down_blocks\.(\d+)\.(weight|bias)", dkey)
    if m:
        return f"{CN}zero_convs.{m[1]}.0.{m[2]}"
    m = re.fullmatch(r"controlnet_mid_block\.(weight|bias)", dkey)
    if m:
        return f"{CN}middle_block_out.0.{m[1]}"
    m = re.fullmatch(r"controlnet_cond_embedding\.(conv_in|conv_out|blocks\.(\d+))\.(weight|bias)", dkey)
    if m:
        if m[1] == "conv_in":
            i = 0
        elif m[1] == "conv_out":
            i = hint_idx[-1]
        else:
            i = 2 * (int(m[2]) + 1)
        return f"{CN}input_hint_block.{i}.{m[3]}"
    return None


def _arch(shapes_unet: dict) -> str:
    keys = shapes_unet.keys()
    if any("label_emb" in k or k.startswith("add_embedding") for k in keys):
        return "sdxl"
    proj = next((v for k, v in shapes_unet.items() if k.endswith("proj_in.weight")), None)
    return "sd2" if proj is not None and len(proj) == 2 else "sd1"


def convert_controlnet(path, output, opts, *, overwrite: bool = False, quiet: bool = False) -> dict:
    path, output = Path(path), Path(output)
    src, folder = _open(path)
    try:
        layout = controlnet_layout(src.keys())
        if opts.to == "diffusers":
            if layout != "original":
                raise BadInput(path, "this ControlNet is already in the diffusers layout")
            return _to_diffusers(src, path, output, opts, overwrite, quiet)
        if layout != "diffusers":
            raise BadInput(path, "this ControlNet is already in the original (single-file) layout")
        return _to_original(src, folder, path, output, opts, overwrite, quiet)
    finally:
        src.close()


def _to_diffusers(src, path, output, opts, overwrite, quiet) -> dict:
    check_output_folder(output, [path, opts.config], overwrite)
    shapes = src.shapes()
    extra = ("zero_convs.", "middle_block_out.", "input_hint_block.")
    trunk = {UNET + k[len(CN):]: v for k, v in shapes.items() if k.startswith(CN) and not k[len(CN):].startswith(extra)}
    hint_idx = sorted({int(k.split(".")[2]) for k in shapes if k.startswith(CN + "input_hint_block.")})
    arch = _arch({k[len(UNET):]: v for k, v in trunk.items()})
    km = ckpt.CheckpointKeyMap.from_single_file(trunk, arch)
    entries: dict[str, tuple[str, object]] = {}  # diffusers key -> (original key, mapping or None)
    for m in km.mappings:
        entries[m.diffusers_key] = (CN + m.single_key[len(UNET):], m)
    for k in shapes:
        if not k.startswith(tuple(CN + e for e in extra)):
            continue
        rest = k[len(CN):]
        m = re.fullmatch(r"zero_convs\.(\d+)\.0\.(weight|bias)", rest)
        if m:
            entries[f"controlnet_down_blocks.{m[1]}.{m[2]}"] = (k, None)
            continue
        m = re.fullmatch(r"middle_block_out\.0\.(weight|bias)", rest)
        if m:
            entries[f"controlnet_mid_block.{m[1]}"] = (k, None)
            continue
        m = re.fullmatch(r"input_hint_block\.(\d+)\.(weight|bias)", rest)
        if m:
            i = int(m[1])
            name = "conv_in" if i == hint_idx[0] else "conv_out" if i == hint_idx[-1] else f"blocks.{hint_idx.index(i) - 1}"
            entries[f"controlnet_cond_embedding.{name}.{m[2]}"] = (k, None)
    used = {v[0] for v in entries.values()}
    left = [k for k in shapes if k not in used]
    dshapes = {}
    for dk, (ok, m) in entries.items():
        t = torch.empty(shapes[ok], device="meta")
        dshapes[dk] = tuple(ckpt.single_to_diffusers_tensor(m, t).shape) if m is not None else tuple(shapes[ok])
    cfg = _config(dshapes, arch, Path(opts.config) if opts.config else None)
    with atomic_folder(output) as tmp:
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
        plan = [(dk, cast_to_option(torch.empty((), dtype=src.dtype(ok)), opts).dtype, dshapes[dk]) for dk, (ok, _) in entries.items()]
        with SafetensorsWriter(tmp / WEIGHTS, {"format": "pt"}, plan=plan, hashes=False) as w:
            for dk in w.expected_order:
                ok, m = entries[dk]
                t = src.get(ok)
                if m is not None:
                    t = ckpt.single_to_diffusers_tensor(m, t)
                w.add(dk, cast_to_option(t, opts))
    if not quiet:
        click.echo(f"lycotools: wrote {output} (diffusers ControlNetModel, {arch})", err=True)
        if left:
            click.echo(f"lycotools: warning: lossy: {len(left)} key(s) with no diffusers place left out "
                       f"(first: {left[0]})", err=True)
    return {"output": str(output), "arch": arch, "dropped": left}


def _to_original(src, folder, path, output, opts, overwrite, quiet) -> dict:
    check_output(output, [path], overwrite)
    shapes = src.shapes()
    trunk = {k: v for k, v in shapes.items() if not k.startswith("controlnet_")}
    arch = _arch(trunk)
    km = ckpt.CheckpointKeyMap.for_diffusers({"unet": trunk}, arch)
    hint_blocks = sorted({int(k.split(".")[2]) for k in shapes if k.startswith("controlnet_cond_embedding.blocks.")})
    hint_idx = [0] + [2 * (b + 1) for b in hint_blocks] + [2 * (len(hint_blocks) + 1)]
    entries: dict[str, tuple[str, object]] = {}  # original key -> (diffusers key, mapping or None)
    for m in km.mappings:
        entries[CN + m.single_key[len(UNET):]] = (m.diffusers_key, m)
    for k in shapes:
        if k.startswith("controlnet_"):
            ok = _extra_original(k, hint_idx)
            if ok is None:
                raise BadInput(path, f"unknown ControlNet key {k}")
            entries[ok] = (k, None)
    left = [k for k in shapes if k not in {v[0] for v in entries.values()}]
    plan = []
    for ok, (dk, m) in entries.items():
        shp = tuple(km.single_shapes[UNET + ok[len(CN):]]) if m is not None else tuple(shapes[dk])
        plan.append((ok, cast_to_option(torch.empty((), dtype=src.dtype(dk)), opts).dtype, shp))
    meta = lycotools_record("convert", [{"role": "input", "name": path.name}], {"to": "single-file", "dtype": opts.dtype})
    with SafetensorsWriter(output, meta, inputs=[path], overwrite=overwrite, plan=plan) as w:
        for ok in w.expected_order:
            dk, m = entries[ok]
            t = src.get(dk)
            if m is not None:
                t = ckpt.diffusers_to_single_tensor(m, t, len(km.single_shapes[UNET + ok[len(CN):]]))
            w.add(ok, cast_to_option(t, opts))
    if not quiet:
        click.echo(f"lycotools: wrote {output} (ControlNet, original layout, {arch})", err=True)
        if left:
            click.echo(f"lycotools: warning: lossy: {len(left)} key(s) left out (first: {left[0]})", err=True)
    return {"output": str(output), "arch": arch, "dropped": left}


def _config(d: dict, arch: str, config_dir: Path | None) -> dict:
    import diffusers

    if config_dir is not None:
        f = config_dir / "config.json" if (config_dir / "config.json").exists() else config_dir / "controlnet" / "config.json"
        if not f.exists():
            raise BadInput(config_dir, "--config folder has no config.json (or controlnet/config.json)")
        cfg = json.loads(f.read_text())
    else:
        cfg = _infer(d, arch)
        cfg["_class_name"] = "ControlNetModel"
        cfg["_diffusers_version"] = diffusers.__version__
    clean = {k: v for k, v in cfg.items() if not k.startswith("_")}
    try:
        with torch.device("meta"):
            model = diffusers.ControlNetModel(**clean)
        want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    except Exception as e:
        raise BadInput(config_dir, f"the ControlNet config cannot be built: {e}") from None
    if want != d:
        raise BadInput(config_dir, "the ControlNet config does not fit this file's shapes",
                       hint="pass --config FOLDER holding the ControlNet's config.json")
    return cfg


def _count(d, fmt):
    n = 0
    while any(k.startswith(fmt.format(n) + ".") for k in d):
        n += 1
    return n


def _infer(d: dict, arch: str) -> dict:
    n = _count(d, "down_blocks.{}")
    chans = [d[f"down_blocks.{i}.resnets.0.conv1.weight"][0] for i in range(n)]
    types = ["CrossAttnDownBlock2D" if f"down_blocks.{i}.attentions.0.proj_in.weight" in d else "DownBlock2D"
             for i in range(n)]
    depth = [_count(d, f"down_blocks.{i}.attentions.0.transformer_blocks.{{}}") or 1 for i in range(n)]
    nb = _count(d, "controlnet_cond_embedding.blocks.{}")
    emb = [d["controlnet_cond_embedding.conv_in.weight"][0]] + [
        d[f"controlnet_cond_embedding.blocks.{2 * i + 1}.weight"][0] for i in range(nb // 2)]
    to_k = next(v for k, v in d.items() if k.endswith("attn2.to_k.weight"))
    proj_in = next(v for k, v in d.items() if k.endswith("proj_in.weight"))
    cfg = {
        "in_channels": d["conv_in.weight"][1], "conditioning_channels": d["controlnet_cond_embedding.conv_in.weight"][1],
        "down_block_types": types, "block_out_channels": chans, "layers_per_block": _count(d, "down_blocks.0.resnets.{}"),
        "cross_attention_dim": to_k[1], "attention_head_dim": 8 if arch == "sd1" else [max(1, c // 64) for c in chans],
        "use_linear_projection": len(proj_in) == 2, "norm_num_groups": _groups(chans),
        "conditioning_embedding_out_channels": emb,
        "transformer_layers_per_block": depth if any(x != 1 for x in depth) else 1,
    }
    if "add_embedding.linear_1.weight" in d:
        in_dim = d["add_embedding.linear_1.weight"][1]
        cfg.update({"addition_embed_type": "text_time", "projection_class_embeddings_input_dim": in_dim,
                    "addition_time_embed_dim": (in_dim - 1280) // 6})
    return cfg

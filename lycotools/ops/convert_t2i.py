"""``convert`` for T2I-Adapters (full adapter): the original TencentARC layout <-> diffusers' ``T2IAdapter``.

Original (``.pth`` / ``.safetensors``)          diffusers (``adapter.`` prefix, folder with config.json)
    conv_in                                      adapter.conv_in
    body.{L*n + j}.block{1,2}                    adapter.body.{L}.resnets.{j}.block{1,2}
    body.{L*n}.in_conv                           adapter.body.{L}.in_conv
with n = res blocks per level (2 in every released adapter). The mapping is a pure renaming, so a round trip
is bit-exact. Not handled (refused with a message): the light adapter and ``down_opt`` (strided-conv
downsampling, which diffusers' full adapter does not have).
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import click
import torch

from ..errors import BadInput
from ..io.metadata import lycotools_record
from ..io.readers import SafetensorsSource, diffusers_model_weights, open_source
from ..io.writer import SafetensorsWriter, atomic_folder, check_output, check_output_folder
from .convert_checkpoint import cast_to_option

WEIGHTS = "diffusion_pytorch_model.safetensors"
_ORIG = re.compile(r"body\.(\d+)\.(block1|block2|in_conv)\.(weight|bias)")
_DIFF = re.compile(r"adapter\.body\.(\d+)\.(?:resnets\.(\d+)\.(block1|block2)|(in_conv))\.(weight|bias)")


def t2i_layout(keys) -> str | None:
    """'original', 'diffusers' or None (light adapters and other files: None)."""
    keys = set(keys)
    if "adapter.conv_in.weight" in keys and any(k.startswith("adapter.body.") for k in keys):
        return "diffusers"
    if "conv_in.weight" in keys and "body.0.block1.weight" in keys and not any(
            k.startswith(("input_blocks.", "zero_convs.", "down_blocks.")) for k in keys):
        return "original"
    return None


def t2i_folder_weights(path: Path) -> Path | None:
    """A diffusers T2IAdapter folder (config.json + weights, or a pipeline's adapter/ subfolder)."""
    return diffusers_model_weights(path, "T2IAdapter", "adapter", WEIGHTS)


def _open(path: Path):
    if path.is_dir():
        w = t2i_folder_weights(path)
        if w is None:
            raise BadInput(path, "not a diffusers T2IAdapter folder")
        return SafetensorsSource(w)
    return open_source(path)


def _res_blocks(keys) -> int:
    """Res blocks per level, from the original keys: every released adapter has 4 levels; the in_conv
    indices (level starts) must be multiples of it."""
    keys = list(keys)
    body = {int(m[1]) for k in keys if (m := _ORIG.fullmatch(k))}
    if not body:
        return 2
    n = max(body) + 1
    starts = [int(m[1]) for k in keys if (m := _ORIG.fullmatch(k)) and m[2] == "in_conv"]
    if n % 4 == 0 and all(i % (n // 4) == 0 for i in starts):
        return n // 4
    return math.gcd(n, *starts) if starts else n


def original_to_diffusers_keys(keys, nrb: int | None = None) -> dict[str, str]:
    """{original key: diffusers key}; BadInput-free: unknown keys are left out (the caller refuses them)."""
    keys = list(keys)
    nrb = nrb or _res_blocks(keys)
    out = {}
    for k in keys:
        if k in ("conv_in.weight", "conv_in.bias"):
            out[k] = "adapter." + k
            continue
        m = _ORIG.fullmatch(k)
        if m:
            i = int(m[1])
            L, j = divmod(i, nrb)
            if m[2] == "in_conv":
                out[k] = f"adapter.body.{L}.in_conv.{m[3]}"
            else:
                out[k] = f"adapter.body.{L}.resnets.{j}.{m[2]}.{m[3]}"
    return out


def diffusers_to_original_keys(keys) -> dict[str, str]:
    keys = list(keys)
    nrb = 1 + max((int(m[2]) for k in keys if (m := _DIFF.fullmatch(k)) and m[2] is not None), default=1)
    out = {}
    for k in keys:
        if k in ("adapter.conv_in.weight", "adapter.conv_in.bias"):
            out[k] = k[len("adapter."):]
            continue
        m = _DIFF.fullmatch(k)
        if m:
            L = int(m[1])
            if m[4]:
                out[k] = f"body.{L * nrb}.in_conv.{m[5]}"
            else:
                out[k] = f"body.{L * nrb + int(m[2])}.{m[3]}.{m[5]}"
    return out


def infer_config(dshapes: dict) -> dict:
    """A ``T2IAdapter`` config from the diffusers shapes (full adapter; SDXL when the unshuffle factor is 16)."""
    cin = dshapes["adapter.conv_in.weight"][1]
    levels = 1 + max(int(m[1]) for k in dshapes if (m := _DIFF.fullmatch(k)))
    channels = [dshapes[f"adapter.body.{L}.resnets.0.block1.weight"][0] for L in range(levels)]
    nrb = 1 + max(int(m[2]) for k in dshapes if (m := _DIFF.fullmatch(k)) and m[2] is not None)
    # cin = in_channels * factor²: RGB 192 / 1-channel 64 at 8 (SD1/2), RGB 768 / 1-channel 256 at 16 (SDXL)
    factor, in_ch = {192: (8, 3), 64: (8, 1), 768: (16, 3), 256: (16, 1)}.get(cin, (None, None))
    if factor is None:
        for f in (8, 16):
            if cin % (f * f) == 0:
                factor, in_ch = f, cin // (f * f)
                break
        else:
            raise BadInput(None, f"cannot tell the T2I-Adapter's input channels from conv_in ({cin} channels)",
                           hint="pass --config FOLDER holding the adapter's config.json")
    import diffusers

    return {"_class_name": "T2IAdapter", "_diffusers_version": diffusers.__version__, "in_channels": in_ch,
            "channels": channels, "num_res_blocks": nrb, "downscale_factor": factor,
            "adapter_type": "full_adapter_xl" if factor == 16 else "full_adapter"}


def _check_config(cfg: dict, dshapes: dict, where):
    import diffusers

    clean = {k: v for k, v in cfg.items() if not k.startswith("_")}
    try:
        with torch.device("meta"):
            model = diffusers.T2IAdapter(**clean)
        want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    except Exception as e:
        raise BadInput(where, f"the T2IAdapter config cannot be built: {e}") from None
    if want != {k: tuple(v) for k, v in dshapes.items()}:
        raise BadInput(where, "the T2IAdapter config does not fit this file's shapes",
                       hint="pass --config FOLDER holding the adapter's config.json")


def convert_t2i(path, output, opts, *, overwrite: bool = False, quiet: bool = False) -> dict:
    path, output = Path(path), Path(output)
    src = _open(path)
    try:
        shapes = src.shapes()
        layout = t2i_layout(shapes)
        if layout is None:
            raise BadInput(path, "not a full T2I-Adapter (light adapters are not supported)")
        if opts.to == "diffusers":
            if layout != "original":
                raise BadInput(path, "this T2I-Adapter is already in the diffusers layout")
            return _to_diffusers(src, shapes, path, output, opts, overwrite, quiet)
        if layout != "diffusers":
            raise BadInput(path, "this T2I-Adapter is already in the original (TencentARC) layout")
        return _to_original(src, shapes, path, output, opts, overwrite, quiet)
    finally:
        src.close()


def _unknown(path, shapes, mapping):
    left = [k for k in shapes if k not in mapping]
    if left:
        what = "down_opt (strided-conv downsampling) " if any("down_opt" in k for k in left) else ""
        raise BadInput(path, f"{len(left)} T2I-Adapter key(s) {what}have no place in the other layout "
                             f"(first: {left[0]})")


def _to_diffusers(src, shapes, path, output, opts, overwrite, quiet) -> dict:
    check_output_folder(output, [path, opts.config], overwrite)
    mapping = original_to_diffusers_keys(shapes)
    _unknown(path, shapes, mapping)
    dshapes = {mapping[k]: tuple(v) for k, v in shapes.items()}
    if opts.config:
        c = Path(opts.config)
        f = c / "config.json" if (c / "config.json").exists() else c / "adapter" / "config.json"
        if not f.exists():
            raise BadInput(c, "--config folder has no config.json (or adapter/config.json)")
        cfg = json.loads(f.read_text())
    else:
        cfg = infer_config(dshapes)
    _check_config(cfg, dshapes, Path(opts.config) if opts.config else path)
    inv = {v: k for k, v in mapping.items()}
    plan = [(dk, cast_to_option(torch.empty((), dtype=src.dtype(inv[dk])), opts).dtype, dshapes[dk]) for dk in dshapes]
    with atomic_folder(output) as tmp:
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
        with SafetensorsWriter(tmp / WEIGHTS, {"format": "pt"}, plan=plan, hashes=False) as w:
            for dk in w.expected_order:
                w.add(dk, cast_to_option(src.get(inv[dk]), opts))
    if not quiet:
        click.echo(f"lycotools: wrote {output} (diffusers T2IAdapter, {cfg['adapter_type']}, "
                   f"{len(dshapes)} tensors)", err=True)
    return {"output": str(output), "layout": "diffusers", "config": cfg}


def _to_original(src, shapes, path, output, opts, overwrite, quiet) -> dict:
    check_output(output, [path], overwrite)
    mapping = diffusers_to_original_keys(shapes)
    _unknown(path, shapes, mapping)
    inv = {v: k for k, v in mapping.items()}
    plan = [(ok, cast_to_option(torch.empty((), dtype=src.dtype(dk)), opts).dtype, tuple(shapes[dk])) for ok, dk in inv.items()]
    meta = lycotools_record("convert", [{"role": "input", "name": path.name}],
                            {"to": "single-file", "dtype": opts.dtype, "kind": "t2i-adapter"})
    with SafetensorsWriter(output, meta, inputs=[path], overwrite=overwrite, plan=plan) as w:
        for ok in w.expected_order:
            w.add(ok, cast_to_option(src.get(inv[ok]), opts))
    if not quiet:
        click.echo(f"lycotools: wrote {output} (T2I-Adapter, original TencentARC layout, {len(inv)} tensors)",
                   err=True)
    return {"output": str(output), "layout": "original"}

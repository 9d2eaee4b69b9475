"""Control-LoRA: a ControlNet whose UNet-copy weights are stored as low-rank deltas against a base UNet.

Extraction (``convert CONTROLNET --to control-lora --base BASE --rank N``), as Stability's format is loaded by
ComfyUI (W = W_base + (up.flatten(1) @ down.flatten(1)).reshape(W.shape), no alpha, no scale):

* every ControlNet weight whose name matches a base UNet key (``model.diffusion_model.<name>``) and has >= 2
  dims: diff = W_control - W_base, truncated SVD at rank r (capped at min(out, in·kh·kw), seeded per layer),
  ``<name>.up`` = U·S ([out, r] or [out, r, 1, 1]) and ``<name>.down`` = Vh ([r, in] or [r, in, kh, kw]);
  stored dense as ``<name>`` when r·(in + out) >= in·out (the factors would be larger);
* matching 1-D parameters (biases, norms) and the ControlNet-only parts (``input_hint_block.*``,
  ``zero_convs.*``, ``middle_block_out.*``) are stored whole;
* a marker ``lora_controlnet`` (empty tensor); names carry no ``control_model.`` prefix.

Stability's own node also clamps the factors to their 99th percentile; this one does not (it would break
exactness at full rank), so its files are at least as close to the ControlNet.

Densifying (``convert CONTROL_LORA --to controlnet --base BASE``) gives back a full ControlNet in the original
layout (``control_model.*``).
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import click
import torch
from tqdm import tqdm

from ..errors import BadInput
from ..io.metadata import lycotools_record, modelspec
from ..io.writer import SafetensorsWriter, check_output, write_text_atomic
from ..layouts import checkpoint as ckpt
from ..linalg import layer_seed, relative_error, truncated_svd
from .convert_checkpoint import DTYPES

CN = "control_model."
UNET = ckpt.UNET_PREFIX
MARKER = "lora_controlnet"
EXTRA = ("input_hint_block.", "zero_convs.", "middle_block_out.")


def is_control_lora(keys) -> bool:
    return MARKER in set(keys)


def is_unprefixed_controlnet(keys) -> bool:
    keys = list(keys)
    return MARKER not in keys and any(k.startswith("zero_convs.") for k in keys) and any(
        k.startswith("input_blocks.") for k in keys)


# --------------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------------


class ControlNetWeights:
    """A ControlNet file/folder in any layout, seen in the original layout without the prefix."""

    def __init__(self, path):
        from .convert_controlnet import _arch, _extra_original, _open, controlnet_layout

        self.path = Path(path)
        self.src, _ = _open(self.path)
        shapes = self.src.shapes()
        layout = controlnet_layout(shapes)
        self.entries: dict[str, tuple[str, object, tuple]] = {}  # name -> (source key, mapping, shape)
        if layout == "diffusers":
            trunk = {k: v for k, v in shapes.items() if not k.startswith("controlnet_")}
            self.arch = _arch(trunk)
            km = ckpt.CheckpointKeyMap.for_diffusers({"unet": trunk}, self.arch)
            for m in km.mappings:
                self.entries[m.single_key[len(UNET):]] = (m.diffusers_key, m, tuple(km.single_shapes[m.single_key]))
            blocks = sorted({int(k.split(".")[2]) for k in shapes if k.startswith("controlnet_cond_embedding.blocks.")})
            hint_idx = [0] + [2 * (b + 1) for b in blocks] + [2 * (len(blocks) + 1)]
            for k in shapes:
                if k.startswith("controlnet_"):
                    ok = _extra_original(k, hint_idx)
                    if ok is None:
                        raise BadInput(self.path, f"unknown ControlNet key {k}")
                    self.entries[ok[len(CN):]] = (k, None, tuple(shapes[k]))
        elif layout == "original" or is_unprefixed_controlnet(shapes):
            for k, v in shapes.items():
                name = k[len(CN):] if k.startswith(CN) else k
                self.entries[name] = (k, None, tuple(v))
            self.arch = _arch({n: s for n, (_, _, s) in self.entries.items() if not n.startswith(EXTRA)})
        else:
            self.src.close()
            raise BadInput(self.path, "not a ControlNet (original or diffusers layout)")
        self.layout = layout or "original"

    def names(self) -> list[str]:
        return list(self.entries)

    def shape(self, name) -> tuple:
        return self.entries[name][2]

    def dtype(self, name) -> torch.dtype:
        return self.src.dtype(self.entries[name][0])

    def get(self, name) -> torch.Tensor:
        key, m, shp = self.entries[name]
        t = self.src.get(key)
        if m is not None:
            t = ckpt.diffusers_to_single_tensor(m, t, len(shp))
        return t

    def close(self):
        self.src.close()


class BaseUNet:
    """The base checkpoint's UNet by ldm name (no ``model.diffusion_model.`` prefix), any layout."""

    def __init__(self, path):
        from ..layouts.model_view import CheckpointView

        self.path = Path(path)
        self.view = CheckpointView.open(path)
        self.arch = self.view.arch
        km = self.view.single_map()
        self.km = km
        self.maps: dict[str, object] = {}
        for m in km.mappings:
            if m.component == "unet" and m.single_key.startswith(UNET):
                self.maps[m.single_key[len(UNET):]] = m
        self.shapes = {n: tuple(km.single_shapes[UNET + n]) for n in self.maps}

    def dtype(self, name) -> torch.dtype:
        m = self.maps[name]
        return self.view.dtype(m.component, m.diffusers_key)

    def get(self, name) -> torch.Tensor:
        m = self.maps[name]
        if self.view.layout != "diffusers":
            return self.view.source.get(m.single_key)
        return ckpt.diffusers_to_single_tensor(m, self.view.get("unet", m.diffusers_key), len(self.shapes[name]))

    def close(self):
        self.view.close()


def _base_arch(arch: str) -> str:
    return "sdxl" if arch.startswith("sdxl") else "sd2" if arch.startswith("sd2") else arch


def _check_pair(cn_arch: str, cn_shapes: dict, base: BaseUNet, path):
    """Every trunk weight must exist in the base UNet with the same shape."""
    missing = [n for n in cn_shapes if n not in base.shapes]
    differ = [n for n in cn_shapes if n in base.shapes and tuple(base.shapes[n]) != tuple(cn_shapes[n])]
    if _base_arch(base.arch) != cn_arch or missing or differ:
        what = f"{len(missing)} weight(s) missing" if missing else f"{len(differ)} weight(s) of another shape"
        first = (missing or differ or [""])[0]
        raise BadInput(base.path, f"this base ({base.arch}) does not fit the {cn_arch} ControlNet {Path(path).name}"
                                  + (f": {what} (first: {first})" if first else ""),
                       hint="pass the base model the ControlNet was trained from")


# --------------------------------------------------------------------------------------------------
# ControlNet -> Control-LoRA
# --------------------------------------------------------------------------------------------------


def _plan_entry(name: str, shape: tuple, rank: int):
    """('lowrank', r) or ('dense', None) for a >= 2-D trunk weight."""
    out = shape[0]
    inn = 1
    for d in shape[1:]:
        inn *= d
    r = max(1, min(rank, out, inn))
    if r * (inn + out) >= inn * out:
        return "dense", None
    return "lowrank", r


def extract_control_lora(path, output, opts, *, overwrite: bool = False, report_path=None, quiet: bool = False) -> dict:
    path, output = Path(path), Path(output)
    if not opts.base:
        raise BadInput(path, "--to control-lora needs --base BASE (the checkpoint the ControlNet was trained from)")
    if not opts.rank or opts.rank < 1:
        raise BadInput(path, "--to control-lora needs --rank N (N >= 1)", hint="Stability's files use 128 or 256")
    if opts.dtype and opts.dtype.startswith("fp8"):
        raise BadInput(path, "fp8 is not a Control-LoRA dtype; use fp32, fp16 or bf16")
    out_dtype = DTYPES[opts.dtype or "fp16"]
    check_output(output, [path, opts.base], overwrite)
    cn = ControlNetWeights(path)
    base = None
    try:
        base = BaseUNet(opts.base)
        trunk = {n: cn.shape(n) for n in cn.names() if not n.startswith(EXTRA)}
        _check_pair(cn.arch, trunk, base, path)
        kinds: dict[str, tuple] = {}
        plan = []
        for n in cn.names():
            fp = cn.dtype(n).is_floating_point
            dt = out_dtype if fp else cn.dtype(n)
            shp = cn.shape(n)
            if n in trunk and len(shp) >= 2:
                kind, r = _plan_entry(n, shp, opts.rank)
                kinds[n] = (kind, r)
                if kind == "lowrank":
                    up = (shp[0], r) + (1,) * (len(shp) - 2)
                    down = (r,) + tuple(shp[1:])
                    plan += [(n + ".up", dt, up), (n + ".down", dt, down)]
                    continue
            else:
                kinds[n] = ("whole", None)
            plan.append((n, dt, shp))
        plan.append((MARKER, torch.float32, (0,)))
        options = {"to": "control-lora", "rank": opts.rank, "dtype": opts.dtype or "fp16", "seed": opts.seed}
        meta = modelspec(cn.arch, "control-lora", output.stem, no_date=opts.no_date)
        meta.update(lycotools_record("convert", [{"role": "controlnet", "name": path.name},
                                                 {"role": "base", "name": Path(opts.base).name}], options))
        meta["lycotools.control_lora_rank"] = str(opts.rank)
        layers: list[dict] = []
        pending: dict[str, torch.Tensor] = {}
        with SafetensorsWriter(output, meta, inputs=[path, Path(opts.base)], overwrite=overwrite, plan=plan) as w:
            for key in tqdm(w.expected_order, desc=f"control-lora {path.name}", unit="tensor", file=sys.stderr,
                            disable=quiet, leave=False):
                if key in pending:
                    w.add(key, pending.pop(key))
                    continue
                if key == MARKER:
                    w.add(key, torch.zeros(0, dtype=torch.float32))
                    continue
                n = re.sub(r"\.(up|down)$", "", key) if key not in kinds else key
                kind, r = kinds[n]
                t = cn.get(n)
                if kind == "whole":
                    w.add(key, t.to(out_dtype).contiguous() if t.is_floating_point() else t.contiguous())
                    continue
                diff = t.float() - base.get(n).float()
                flat = diff.flatten(1)
                if kind == "dense":
                    w.add(key, t.to(out_dtype).contiguous())
                    layers.append({"name": n, "shape": list(t.shape), "stored": "dense", "rank": None, "error": 0.0})
                    continue
                svd = truncated_svd(flat, r, seed=layer_seed(opts.seed, n))
                up = svd.U[:, :r] * svd.S[:r]
                down = svd.Vh[:r]
                up_c = up.to(out_dtype)
                down_c = down.to(out_dtype)
                err = relative_error(flat, up_c.float() @ down_c.float()) if float(flat.abs().max()) > 0 else 0.0
                layers.append({"name": n, "shape": list(t.shape), "stored": "lowrank", "rank": r, "error": err})
                up_c = up_c.reshape((t.shape[0], r) + (1,) * (t.dim() - 2)).contiguous()
                down_c = down_c.reshape((r,) + tuple(t.shape[1:])).contiguous()
                pending[n + ".up"] = up_c
                pending[n + ".down"] = down_c
                w.add(key, pending.pop(key))
    finally:
        cn.close()
        if base is not None:
            base.close()
    low = [l for l in layers if l["stored"] == "lowrank"]
    res = {"output": str(output), "arch": cn.arch, "rank": opts.rank, "lowrank": len(low),
           "dense": sum(l["stored"] == "dense" for l in layers),
           "whole": sum(k == "whole" for k, _ in kinds.values()),
           "mean_error": sum(l["error"] for l in low) / len(low) if low else 0.0,
           "max_error": max((l["error"] for l in low), default=0.0), "layers": layers}
    if report_path:
        write_text_atomic(report_path, json.dumps(res, indent=2) + "\n")
    if not quiet:
        worst = max(low, key=lambda l: l["error"])["name"] if low else "-"
        click.echo(f"lycotools: wrote {output} (Control-LoRA, {cn.arch}, rank {opts.rank}): {res['lowrank']} low-rank, "
                   f"{res['dense']} dense (rank would not save space), {res['whole']} stored whole; relative error "
                   f"mean {res['mean_error']:.4g}, max {res['max_error']:.4g} ({worst})", err=True)
    return res


# --------------------------------------------------------------------------------------------------
# Control-LoRA -> ControlNet
# --------------------------------------------------------------------------------------------------


def densify_control_lora(path, output, opts, *, overwrite: bool = False, quiet: bool = False) -> dict:
    from ..io.readers import open_source

    path, output = Path(path), Path(output)
    if not opts.base:
        raise BadInput(path, "--to controlnet needs --base BASE (the checkpoint this Control-LoRA is paired with)")
    if opts.dtype and opts.dtype.startswith("fp8"):
        raise BadInput(path, "fp8 is not a ControlNet dtype here; use fp32, fp16 or bf16")
    check_output(output, [path, opts.base], overwrite)
    src = open_source(path)
    base = None
    try:
        shapes = src.shapes()
        if MARKER not in shapes:
            raise BadInput(path, "not a Control-LoRA (no lora_controlnet marker)")
        names: dict[str, str] = {}  # name -> 'lowrank' | 'whole'
        for k in shapes:
            if k == MARKER:
                continue
            m = re.fullmatch(r"(.+)\.(up|down)", k)
            if m and (m[1] + ".up") in shapes and (m[1] + ".down") in shapes:
                names[m[1]] = "lowrank"
            else:
                names[k] = "whole"
        base = BaseUNet(opts.base)
        from .convert_controlnet import _arch

        trunk = {}
        for n, kind in names.items():
            if n.startswith(EXTRA):
                continue
            if kind == "lowrank":
                up, down = shapes[n + ".up"], shapes[n + ".down"]
                trunk[n] = (up[0],) + tuple(down[1:])
            else:
                trunk[n] = tuple(shapes[n])
        arch = _arch(trunk)
        _check_pair(arch, trunk, base, path)
        plan = []
        for n, kind in names.items():
            dt = src.dtype(n + ".up") if kind == "lowrank" else src.dtype(n)
            if kind == "lowrank":
                dt = base.dtype(n)
            if opts.dtype and dt.is_floating_point:
                dt = DTYPES[opts.dtype]
            shp = trunk[n] if n in trunk else tuple(shapes[n])
            plan.append((CN + n, dt, shp))
        meta = lycotools_record("convert", [{"role": "control-lora", "name": path.name},
                                            {"role": "base", "name": Path(opts.base).name}],
                                {"to": "controlnet", "dtype": opts.dtype})
        dts = {k: d for k, d, _ in plan}
        with SafetensorsWriter(output, meta, inputs=[path, Path(opts.base)], overwrite=overwrite, plan=plan) as w:
            for key in tqdm(w.expected_order, desc=f"densify {path.name}", unit="tensor", file=sys.stderr,
                            disable=quiet, leave=False):
                n = key[len(CN):]
                if names[n] == "lowrank":
                    W = base.get(n).float()
                    up, down = src.get(n + ".up").float(), src.get(n + ".down").float()
                    t = W + (up.flatten(1) @ down.flatten(1)).reshape(W.shape)
                else:
                    t = src.get(n)
                w.add(key, t.to(dts[key]).contiguous())
    finally:
        src.close()
        if base is not None:
            base.close()
    n_low = sum(v == "lowrank" for v in names.values())
    if not quiet:
        click.echo(f"lycotools: wrote {output} (ControlNet, original layout, {arch}): {n_low} low-rank weight(s) "
                   f"densified against {Path(opts.base).name}, {len(names) - n_low} stored whole", err=True)
    return {"output": str(output), "arch": arch, "densified": n_low, "whole": len(names) - n_low}

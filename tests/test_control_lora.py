"""`lycotools convert --to control-lora` (ControlNet -> Control-LoRA against a base) and `--to controlnet`
(densify back), on a tiny ControlNet built from the SD1 fixture UNet with known low-rank deltas."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open
from safetensors.torch import load_file

from lycotools.cli import main

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
FIX = ROOT / "fixtures"
SD1_PIPE = FIX / "sd1" / "diffusers"
SD1_BASE = FIX / "sd1" / "base.safetensors"
SDXL_BASE = FIX / "sdxl" / "base.safetensors"
EXTRA = ("input_hint_block.", "zero_convs.", "middle_block_out.")
TRUE_RANK = 2

logging.getLogger("diffusers").setLevel(logging.ERROR)


def run(*args, code=0):
    res = CliRunner().invoke(main, ["convert", *map(str, args)])
    assert res.exit_code == code, (res.exit_code, res.output)
    return res


@pytest.fixture(scope="module")
def controlnet(tmp_path_factory):
    """(diffusers folder, original-layout file, {name: true delta}) of a ControlNet made from the SD1 UNet,
    its UNet-copy >= 2-D weights perturbed by rank-2 deltas, its ControlNet-only parts randomised."""
    from diffusers import ControlNetModel, UNet2DConditionModel

    tmp = tmp_path_factory.mktemp("cl")
    unet = UNet2DConditionModel.from_pretrained(str(SD1_PIPE / "unet"))
    cn = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(4, 4, 8, 8))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in cn.named_parameters():
            if name.startswith(("controlnet_", )):
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
            elif p.dim() >= 2:
                out, inn = p.shape[0], p[0].numel()
                a = torch.randn(out, TRUE_RANK, generator=g) * 0.1
                b = torch.randn(TRUE_RANK, inn, generator=g) * 0.1
                p.add_((a @ b).reshape(p.shape))
            else:
                p.add_(torch.randn(p.shape, generator=g) * 0.01)
    d = tmp / "cn_diffusers"
    cn.save_pretrained(str(d))
    orig = tmp / "cn.safetensors"
    run(d, "--to", "single-file", "-o", orig)
    return d, orig


def _base_unet() -> dict:
    sd = load_file(str(SD1_BASE))
    p = "model.diffusion_model."
    return {k[len(p):]: v for k, v in sd.items() if k.startswith(p)}


def _densify(cl: dict, base: dict) -> dict:
    out = {}
    for k, v in cl.items():
        if k == "lora_controlnet":
            continue
        if k.endswith(".up"):
            n = k[:-3]
            W = base[n].float()
            out[n] = W + (v.float().flatten(1) @ cl[n + ".down"].float().flatten(1)).reshape(W.shape)
        elif not k.endswith(".down"):
            out[k] = v
    return out


def test_extract_full_rank_is_exact(controlnet, tmp_path):
    d, orig = controlnet
    out = tmp_path / "cl.safetensors"
    rep = tmp_path / "rep.json"
    res = run(orig, "--to", "control-lora", "--base", SD1_BASE, "--rank", 4, "--dtype", "fp32", "--no-date",
              "--report", rep, "-o", out)
    assert "Control-LoRA" in res.output
    cl = load_file(str(out))
    assert "lora_controlnet" in cl and cl["lora_controlnet"].numel() == 0
    assert not any(k.startswith("control_model.") for k in cl)
    ref = {k[len("control_model."):]: v for k, v in load_file(str(orig)).items()}
    n_low = sum(k.endswith(".up") for k in cl)
    assert n_low > 10
    for k in cl:  # shapes of the factors
        if k.endswith(".up"):
            n = k[:-3]
            W = ref[n]
            r = cl[k].shape[1]
            assert cl[k].shape == (W.shape[0], r) + (1,) * (W.dim() - 2)
            assert cl[n + ".down"].shape == (r,) + tuple(W.shape[1:])
            assert r * (W.shape[0] + W[0].numel()) < W.numel()  # else it must be dense
            assert n not in cl
    n_dense = 0
    for n, W in ref.items():  # every UNet-copy weight: factors, or dense when factors would not be smaller
        if n.startswith(EXTRA) or W.dim() < 2:
            continue
        out_, in_ = W.shape[0], W[0].numel()
        r = min(4, out_, in_)
        assert (n in cl) == (r * (in_ + out_) >= in_ * out_) == (n + ".up" not in cl), n
        n_dense += n in cl
    assert n_dense > 0
    got = _densify(cl, _base_unet())
    assert sorted(got) == sorted(ref)
    for k, v in ref.items():
        if k.startswith(EXTRA) or v.dim() < 2:
            assert torch.equal(got[k], v), k  # stored whole, bit-identical
        else:
            assert torch.allclose(got[k].float(), v.float(), atol=2e-5, rtol=1e-4), (k, (got[k] - v).abs().max())
    report = json.loads(rep.read_text())
    assert report["lowrank"] == n_low and report["max_error"] < 1e-4
    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
    assert meta["modelspec.architecture"].endswith("/control-lora") and "lycotools.options" in meta
    assert "sshs_model_hash" in meta
    # same inputs + seed -> same bytes; the diffusers folder gives the same file
    again = tmp_path / "again.safetensors"
    run(d, "--to", "control-lora", "--base", SD1_BASE, "--rank", 4, "--dtype", "fp32", "--no-date", "-q", "-o", again)
    a, b = load_file(str(out)), load_file(str(again))
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_lower_rank_is_best_rank_k(controlnet, tmp_path):
    _, orig = controlnet
    out = tmp_path / "cl1.safetensors"
    run(orig, "--to", "control-lora", "--base", SD1_BASE, "--rank", 1, "--dtype", "fp32", "-q", "-o", out)
    cl = load_file(str(out))
    base = _base_unet()
    ref = {k[len("control_model."):]: v for k, v in load_file(str(orig)).items()}
    checked = 0
    for k in cl:
        if not k.endswith(".up"):
            continue
        n = k[:-3]
        diff = (ref[n].float() - base[n].float()).flatten(1)
        U, S, Vh = torch.linalg.svd(diff, full_matrices=False)
        best = (U[:, :1] * S[:1]) @ Vh[:1]
        approx = cl[k].float().flatten(1) @ cl[n + ".down"].float().flatten(1)
        assert torch.allclose(approx, best, atol=1e-4 * float(S[0]) + 1e-6), n
        assert cl[k].shape[1] == 1
        checked += 1
    assert checked > 10


def test_fp16_default_and_densify_round_trip(controlnet, tmp_path):
    from diffusers import ControlNetModel

    d, orig = controlnet
    cl = tmp_path / "cl16.safetensors"
    run(orig, "--to", "control-lora", "--base", SD1_BASE, "--rank", 4, "-q", "-o", cl)
    with safe_open(str(cl), "pt") as f:
        assert all(f.get_slice(k).get_dtype() == "F16" for k in f.keys() if k != "lora_controlnet")
    full = tmp_path / "cn_full.safetensors"
    run(cl, "--to", "controlnet", "--base", SD1_BASE, "--dtype", "fp32", "-q", "-o", full)
    got = load_file(str(full))
    ref = load_file(str(orig))
    assert sorted(got) == sorted(ref)
    for k, v in ref.items():
        assert torch.allclose(got[k], v.float(), atol=2e-3, rtol=2e-3), k
    # the densified ControlNet is an ordinary ControlNet: diffusers loads it
    loaded = ControlNetModel.from_single_file(str(full), config=str(d)).state_dict()
    mine = ControlNetModel.from_pretrained(str(d)).state_dict()
    assert sorted(loaded) == sorted(mine)


def test_wrong_base_and_bad_usage(controlnet, tmp_path):
    _, orig = controlnet
    out = tmp_path / "x.safetensors"
    res = run(orig, "--to", "control-lora", "--base", SDXL_BASE, "--rank", 4, "-o", out, code=2)
    assert "lycotools: error:" in res.output and not out.exists()
    assert not list(tmp_path.iterdir())
    run(orig, "--to", "control-lora", "--rank", 4, "-o", out, code=2)  # no --base
    run(orig, "--to", "control-lora", "--base", SD1_BASE, "-o", out, code=2)  # no --rank
    assert not out.exists()
    cl = tmp_path / "cl.safetensors"
    run(orig, "--to", "control-lora", "--base", SD1_BASE, "--rank", 2, "-q", "-o", cl)
    run(cl, "--to", "kohya", "-o", tmp_path / "y.safetensors", code=2)  # not a Control-LoRA target
    run(cl, "--to", "controlnet", "--base", SDXL_BASE, "-o", tmp_path / "z.safetensors", code=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cl.safetensors"]


def test_unprefixed_controlnet_input(controlnet, tmp_path):
    from safetensors.torch import save_file

    _, orig = controlnet
    sd = {k[len("control_model."):]: v for k, v in load_file(str(orig)).items()}
    bare = tmp_path / "bare.safetensors"
    save_file(sd, str(bare))
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    run(bare, "--to", "control-lora", "--base", SD1_BASE, "--rank", 3, "--no-date", "-q", "-o", a)
    run(orig, "--to", "control-lora", "--base", SD1_BASE, "--rank", 3, "--no-date", "-q", "-o", b)
    x, y = load_file(str(a)), load_file(str(b))
    assert sorted(x) == sorted(y) and all(torch.equal(x[k], y[k]) for k in x)


def test_diffusers_base_gives_the_same_file(controlnet, tmp_path):
    """The base may be in any layout: the SD1 fixture as a diffusers folder gives the same Control-LoRA."""
    _, orig = controlnet
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    run(orig, "--to", "control-lora", "--base", SD1_BASE, "--rank", 2, "--dtype", "fp32", "--no-date", "-q", "-o", a)
    run(orig, "--to", "control-lora", "--base", SD1_PIPE, "--rank", 2, "--dtype", "fp32", "--no-date", "-q", "-o", b)
    x, y = load_file(str(a)), load_file(str(b))
    assert sorted(x) == sorted(y)
    for k in x:
        assert torch.allclose(x[k], y[k], atol=1e-6), k

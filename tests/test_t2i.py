"""`lycotools convert` for T2I-Adapters: original TencentARC layout <-> diffusers `T2IAdapter`, bit-exact."""

from __future__ import annotations

import logging
import os

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from lycotools.cli import main
from lycotools.ops.convert_t2i import diffusers_to_original_keys, original_to_diffusers_keys, t2i_layout

os.environ.setdefault("HF_HUB_OFFLINE", "1")
logging.getLogger("diffusers").setLevel(logging.ERROR)


def run(*args, code=0):
    res = CliRunner().invoke(main, ["convert", *map(str, args)])
    assert res.exit_code == code, (res.exit_code, res.output)
    return res


def _adapter(adapter_type="full_adapter", factor=8, in_channels=3, channels=(32, 64, 64, 64)):
    from diffusers import T2IAdapter

    a = T2IAdapter(in_channels=in_channels, channels=list(channels), num_res_blocks=2, downscale_factor=factor,
                   adapter_type=adapter_type)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in a.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    return a


def test_key_map_matches_tencentarc_names():
    sd = {k: None for k in _adapter(channels=(32, 64, 128, 128)).state_dict()}
    m = diffusers_to_original_keys(sd)
    orig = set(m.values())
    assert "conv_in.weight" in orig and "body.2.in_conv.weight" in orig and "body.4.in_conv.bias" in orig
    assert {f"body.{i}.block{b}.weight" for i in range(8) for b in (1, 2)} <= orig
    assert not any("in_conv" in k and k not in ("body.2.in_conv.weight", "body.2.in_conv.bias",
                                                "body.4.in_conv.weight", "body.4.in_conv.bias") for k in orig)
    assert m["adapter.body.3.resnets.1.block2.weight"] == "body.7.block2.weight"
    back = original_to_diffusers_keys(orig)
    assert back == {v: k for k, v in m.items()}
    assert t2i_layout(orig) == "original" and t2i_layout(sd) == "diffusers"


@pytest.mark.parametrize("kind", [("full_adapter", 8, 3), ("full_adapter", 8, 1), ("full_adapter_xl", 16, 3)])
def test_round_trip_and_diffusers_load(tmp_path, kind):
    from diffusers import T2IAdapter

    adapter_type, factor, cin = kind
    a = _adapter(adapter_type, factor, cin)
    ref = a.state_dict()
    # a TencentARC-style file made by renaming (independent of the converter: the released names)
    orig_sd = {}
    for k, v in ref.items():
        k2 = k[len("adapter."):]
        parts = k2.split(".")
        if parts[0] == "body":
            L = int(parts[1])
            if parts[2] == "in_conv":
                k2 = f"body.{2 * L}.in_conv.{parts[3]}"
            else:
                k2 = f"body.{2 * L + int(parts[3])}.{parts[4]}.{parts[5]}"
        orig_sd[k2] = v.contiguous()
    orig = tmp_path / "t2i.safetensors"
    save_file(orig_sd, str(orig))
    out = tmp_path / "t2i_diffusers"
    run(orig, "--to", "diffusers", "-o", out)
    loaded = T2IAdapter.from_pretrained(str(out))
    assert loaded.config.adapter_type == adapter_type and loaded.config.downscale_factor == factor
    assert loaded.config.in_channels == cin
    got = loaded.state_dict()
    assert sorted(got) == sorted(ref) and all(torch.equal(got[k], ref[k]) for k in ref)
    back = tmp_path / "back.safetensors"
    run(out, "--to", "single-file", "-o", back)
    b = load_file(str(back))
    assert sorted(b) == sorted(orig_sd) and all(torch.equal(b[k], orig_sd[k]) for k in b)


def test_pth_input_dtype_and_refusals(tmp_path):
    a = _adapter()
    inv = diffusers_to_original_keys(a.state_dict())
    orig_sd = {inv[k]: v for k, v in a.state_dict().items()}
    pth = tmp_path / "t2iadapter_canny.pth"
    torch.save(orig_sd, str(pth))
    out = tmp_path / "o"
    run(pth, "--to", "diffusers", "--dtype", "fp16", "-q", "-o", out)
    got = load_file(str(out / "diffusion_pytorch_model.safetensors"))
    assert all(got[k].dtype == torch.float16 and torch.equal(got[k], v.half()) for k, v in a.state_dict().items())
    run(out, "--to", "diffusers", "-o", tmp_path / "again", code=2)  # already diffusers
    run(pth, "--to", "kohya", "-o", tmp_path / "k.safetensors", code=2)
    bad = dict(orig_sd)
    bad["body.2.down_opt.op.weight"] = torch.zeros(64, 64, 3, 3)
    badf = tmp_path / "bad.safetensors"
    save_file({k: v.contiguous() for k, v in bad.items()}, str(badf))
    res = run(badf, "--to", "diffusers", "-o", tmp_path / "bad_out", code=2)
    assert "down_opt" in res.output and not (tmp_path / "bad_out").exists()

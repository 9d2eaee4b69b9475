"""Checkpoint layouts: detection, and the single-file <-> diffusers map read off diffusers' converters."""

from __future__ import annotations

import math
from pathlib import Path
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

from diffusers import AutoencoderKL, UNet2DConditionModel
from diffusers.loaders import single_file_utils as sfu
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from lycotools.layouts.checkpoint import (
    CheckpointKeyMap,
    KeyMapping,
    canonical_te_state,
    detect_checkpoint,
    diffusers_to_single_state_dict,
    single_to_diffusers_state_dicts,
    single_to_diffusers_tensor,
    template_shapes,
    template_single_shapes,
)

# ----------------------------------------------------------------------------------------------
# tiny models with the real structure
# ----------------------------------------------------------------------------------------------


def _clip(hidden=32, layers=2, proj_dim=None):
    cfg = CLIPTextConfig(vocab_size=99, hidden_size=hidden, intermediate_size=37, num_hidden_layers=layers,
                         num_attention_heads=4, max_position_embeddings=77, projection_dim=proj_dim or hidden,
                         bos_token_id=0, eos_token_id=2, pad_token_id=1)
    return CLIPTextModelWithProjection(cfg) if proj_dim else CLIPTextModel(cfg)


def _vae():
    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16, 16),
                         down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
                         layers_per_block=2, norm_num_groups=8, sample_size=32)


def _sd_unet(ctx, linear, in_channels=4):
    return UNet2DConditionModel(
        sample_size=8, in_channels=in_channels, out_channels=4, layers_per_block=2,
        block_out_channels=(32, 32, 64, 64), norm_num_groups=8, cross_attention_dim=ctx,
        attention_head_dim=8, use_linear_projection=linear,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    )


def _sdxl_unet(ctx, pooled):
    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(32, 32, 64),
        norm_num_groups=16, cross_attention_dim=ctx, attention_head_dim=(2, 4, 8), use_linear_projection=True,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2, 2), addition_embed_type="text_time", addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=pooled + 6 * 8,
    )


def _randomize(model):
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    return model


_CACHE: dict = {}


def tiny(arch: str):
    """(components state dicts in canonical form, models) for a tiny model of ``arch``."""
    if arch in _CACHE:
        return _CACHE[arch]
    torch.manual_seed(0)
    if arch == "sd1":
        models = {"unet": _sd_unet(32, False), "vae": _vae(), "text_encoder": _clip(32)}
    elif arch == "sd1-inpaint":
        models = {"unet": _sd_unet(32, False, in_channels=9), "vae": _vae(), "text_encoder": _clip(32)}
    elif arch == "sd2":
        models = {"unet": _sd_unet(48, True), "vae": _vae(), "text_encoder": _clip(48, layers=3)}
    elif arch == "sdxl":
        models = {"unet": _sdxl_unet(32 + 48, 16), "vae": _vae(), "text_encoder": _clip(32),
                  "text_encoder_2": _clip(48, layers=2, proj_dim=16)}
    else:
        raise ValueError(arch)
    for m in models.values():
        _randomize(m)
    comps = {c: (canonical_te_state(m.state_dict()) if c.startswith("text_encoder") else dict(m.state_dict()))
             for c, m in models.items()}
    _CACHE[arch] = (comps, models)
    return _CACHE[arch]


def _assert_same(a: dict, b: dict):
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype, k
        assert a[k].shape == b[k].shape, k
        assert torch.equal(a[k], b[k]), k


ARCH_OF = {"sd1": "sd1", "sd1-inpaint": "sd1", "sd2": "sd2", "sdxl": "sdxl"}

# ----------------------------------------------------------------------------------------------
# the transformers 5 trap the canonical form exists for
# ----------------------------------------------------------------------------------------------


def test_clip_state_dict_levels_are_canonicalised():
    raw_plain = _clip(32).state_dict()
    raw_proj = _clip(32, proj_dim=16).state_dict()
    # whichever form this transformers writes, the canonical form has the text_model. level
    for raw in (raw_plain, raw_proj):
        can = canonical_te_state(raw)
        assert "text_model.encoder.layers.0.self_attn.q_proj.weight" in can
        assert all(k.startswith("text_model.") or k.startswith("text_projection.") for k in can)
    assert "text_projection.weight" in canonical_te_state(raw_proj)


# ----------------------------------------------------------------------------------------------
# round trips
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["sd1", "sd2", "sdxl"])
def test_diffusers_single_diffusers_round_trip(arch):
    comps, _ = tiny(arch)
    single = diffusers_to_single_state_dict(comps, ARCH_OF[arch])
    back = single_to_diffusers_state_dicts(single)
    assert sorted(back) == sorted(comps)
    for c in comps:
        _assert_same(back[c], comps[c])


@pytest.mark.parametrize("arch", ["sd1", "sd2", "sdxl"])
def test_single_diffusers_single_round_trip(arch):
    comps, _ = tiny(arch)
    single = diffusers_to_single_state_dict(comps, ARCH_OF[arch])
    # extras a real file carries that diffusers does not convert
    extra = {"alphas_cumprod": torch.rand(1000), "model_ema.decay": torch.tensor(0.9999),
             "model_ema.diffusion_modelinput_blocks00weight": torch.rand(3)}
    if arch == "sd2":
        extra["cond_stage_model.model.text_projection"] = torch.rand(48, 48)
        extra["cond_stage_model.model.logit_scale"] = torch.tensor(1.0)
    if arch == "sdxl":
        extra["conditioner.embedders.1.model.logit_scale"] = torch.tensor(1.0)
        extra["conditioner.embedders.0.transformer.text_model.embeddings.position_ids"] = torch.arange(77)[None]
    full = {**single, **extra}
    km = CheckpointKeyMap.from_single_file({k: tuple(v.shape) for k, v in full.items()})
    assert set(km.unmapped_single) == set(extra)
    diff = single_to_diffusers_state_dicts(full)
    again = diffusers_to_single_state_dict(diff, ARCH_OF[arch])
    _assert_same(again, single)


@pytest.mark.parametrize("arch", ["sd1", "sd2", "sdxl"])
def test_single_file_converts_back_with_diffusers_own_converters(arch):
    comps, models = tiny(arch)
    single = diffusers_to_single_state_dict(comps, ARCH_OF[arch])
    unet = sfu.convert_ldm_unet_checkpoint(single, dict(models["unet"].config))
    _assert_same(unet, comps["unet"])
    vae = sfu.convert_ldm_vae_checkpoint(single, dict(models["vae"].config))
    _assert_same(vae, comps["vae"])
    if arch == "sd1":
        te = sfu.convert_ldm_clip_checkpoint(single)
        _assert_same(canonical_te_state(te), comps["text_encoder"])
    elif arch == "sd2":
        te = sfu.convert_open_clip_checkpoint(models["text_encoder"], single, prefix="cond_stage_model.model.")
        _assert_same(te, comps["text_encoder"])
    else:
        te = sfu.convert_ldm_clip_checkpoint(single, remove_prefix="conditioner.embedders.0.transformer.")
        _assert_same(canonical_te_state(te), comps["text_encoder"])
        te2 = sfu.convert_open_clip_checkpoint(models["text_encoder_2"], single,
                                               prefix="conditioner.embedders.1.model.")
        _assert_same(te2, comps["text_encoder_2"])


def test_single_file_prefixes_and_transforms():
    comps, _ = tiny("sdxl")
    single = diffusers_to_single_state_dict(comps, "sdxl")
    prefixes = ("model.diffusion_model.", "first_stage_model.", "conditioner.embedders.0.transformer.text_model.",
                "conditioner.embedders.1.model.")
    assert all(k.startswith(prefixes) for k in single)
    # OpenCLIP q/k/v fused, text_projection stored as [hidden, proj] (x @ P)
    w = single["conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight"]
    assert w.shape == (3 * 48, 48)
    assert single["conditioner.embedders.1.model.text_projection"].shape == (48, 16)
    assert single["first_stage_model.encoder.mid.attn_1.q.weight"].shape == (16, 16, 1, 1)
    assert single["model.diffusion_model.label_emb.0.0.weight"].shape == comps["unet"]["add_embedding.linear_1.weight"].shape
    km = CheckpointKeyMap.from_single_file({k: tuple(v.shape) for k, v in single.items()})
    qkv = km.to_diffusers("conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight")
    assert [m.diffusers_key for m in qkv] == [
        f"text_model.encoder.layers.0.self_attn.{x}_proj.weight" for x in "qkv"]
    assert [m.transform for m in qkv] == [("chunk", i, 3) for i in range(3)]
    assert km.to_single("text_encoder_2", "text_projection.weight").transform == "transpose"
    assert km.to_single("vae", "encoder.mid_block.attentions.0.to_q.weight").transform == "squeeze"
    assert km.to_single("vae", "encoder.mid_block.attentions.0.to_q.weight").single_key == (
        "first_stage_model.encoder.mid.attn_1.q.weight")
    # text-encoder lookups accept the transformers-5 form too
    assert km.to_single("text_encoder", "encoder.layers.1.mlp.fc1.weight").single_key == (
        "conditioner.embedders.0.transformer.text_model.encoder.layers.1.mlp.fc1.weight")
    m = km.to_single("unet", "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.weight")
    assert m.single_key == "model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn1.to_q.weight"
    assert km.to_single("unet", "up_blocks.0.upsamplers.0.conv.weight").single_key == (
        "model.diffusion_model.output_blocks.2.2.conv.weight")
    assert km.to_single("unet", "up_blocks.1.upsamplers.0.conv.weight").single_key == (
        "model.diffusion_model.output_blocks.5.2.conv.weight")
    t = single["conditioner.embedders.1.model.text_projection"]
    assert torch.equal(single_to_diffusers_tensor(km.to_single("text_encoder_2", "text_projection.weight"), t),
                       comps["text_encoder_2"]["text_projection.weight"])


def test_sd1_upsampler_without_attention_uses_slot_1():
    comps, _ = tiny("sd1")
    km = CheckpointKeyMap.for_diffusers({c: {k: tuple(v.shape) for k, v in sd.items()} for c, sd in comps.items()}, "sd1")
    assert km.to_single("unet", "up_blocks.0.upsamplers.0.conv.weight").single_key == (
        "model.diffusion_model.output_blocks.2.1.conv.weight")
    assert km.to_single("unet", "up_blocks.1.upsamplers.0.conv.weight").single_key == (
        "model.diffusion_model.output_blocks.5.2.conv.weight")
    assert km.to_single("unet", "down_blocks.3.resnets.1.conv1.weight").single_key == (
        "model.diffusion_model.input_blocks.11.0.in_layers.2.weight")
    # VAE decoder levels are reversed
    assert km.to_single("vae", "decoder.up_blocks.0.resnets.0.conv1.weight").single_key == (
        "first_stage_model.decoder.up.2.block.0.conv1.weight")


def test_reverse_map_rejects_unknown_keys():
    comps, _ = tiny("sd1")
    shapes = {c: {k: tuple(v.shape) for k, v in sd.items()} for c, sd in comps.items()}
    shapes["unet"] = {**shapes["unet"], "foo.bar.weight": (3, 3)}
    with pytest.raises(ValueError):
        CheckpointKeyMap.for_diffusers(shapes, "sd1")
    with pytest.raises(ValueError):
        CheckpointKeyMap.for_diffusers({"text_encoder_2": shapes["text_encoder"]}, "sd1")


def test_unet_only_and_text_encoder_only_files():
    comps, _ = tiny("sdxl")
    unet_only = diffusers_to_single_state_dict({"unet": comps["unet"]}, "sdxl")
    assert all(k.startswith("model.diffusion_model.") for k in unet_only)
    back = single_to_diffusers_state_dicts(unet_only, arch="sdxl")
    _assert_same(back["unet"], comps["unet"])
    bare = {k[len("model.diffusion_model."):]: v for k, v in unet_only.items()}
    info = detect_checkpoint({k: tuple(v.shape) for k, v in bare.items()})
    assert (info.arch, info.layout, info.components) == ("sdxl", "single-file", {"unet": ""})
    back = single_to_diffusers_state_dicts(bare)
    _assert_same(back["unet"], comps["unet"])


# ----------------------------------------------------------------------------------------------
# detection
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["sd1", "sd1-inpaint", "sd2", "sdxl"])
def test_detect_both_layouts(arch):
    comps, _ = tiny(arch)
    want = ARCH_OF[arch]
    single = diffusers_to_single_state_dict(comps, want)
    info = detect_checkpoint({k: tuple(v.shape) for k, v in single.items()})
    assert (info.arch, info.layout) == (want, "single-file")
    assert info.components["unet"] == "model.diffusion_model."
    assert info.components["vae"] == "first_stage_model."
    assert set(info.components) == set(comps)
    assert info.inpainting == (arch == "sd1-inpaint")
    flat = {f"{c}.{k}": tuple(v.shape) for c, sd in comps.items() for k, v in sd.items()}
    info = detect_checkpoint(flat)
    assert (info.arch, info.layout) == (want, "diffusers")
    assert info.components == {c: c + "." for c in comps}
    assert info.inpainting == (arch == "sd1-inpaint")
    assert info.prediction is None
    # a UNet on its own, in both layouts
    uonly = {k: v for k, v in flat.items() if k.startswith("unet.")}
    assert detect_checkpoint(uonly).arch == want
    sonly = {k: tuple(v.shape) for k, v in single.items() if k.startswith("model.diffusion_model.")}
    assert detect_checkpoint(sonly).arch == want


def test_detect_prediction_markers_and_refiner():
    shapes = template_single_shapes("sdxl")
    assert detect_checkpoint(shapes).prediction == "eps"
    assert detect_checkpoint({**shapes, "v_pred": (0,), "ztsnr": (0,)}).prediction == "v"
    ref = template_single_shapes("sdxl-refiner")
    info = detect_checkpoint(ref)
    assert info.arch == "sdxl-refiner"
    assert info.components["text_encoder_2"] == "conditioner.embedders.0.model."
    assert detect_checkpoint(template_single_shapes("sd2")).prediction is None
    flat = {f"{c}.{k}": s for c, sd in template_shapes("sdxl-refiner").items() for k, s in sd.items()}
    assert detect_checkpoint(flat).arch == "sdxl-refiner"


# ----------------------------------------------------------------------------------------------
# templates of the real architectures
# ----------------------------------------------------------------------------------------------


def _params(shapes):
    return sum(math.prod(s) for s in shapes.values())


def test_template_parameter_counts():
    sd1 = template_shapes("sd1")
    assert _params(sd1["unet"]) == pytest.approx(859_520_964, rel=0.01)
    assert len(sd1["unet"]) == 686
    assert _params(sd1["vae"]) == pytest.approx(83_653_863, rel=0.01)
    assert _params(sd1["text_encoder"]) == pytest.approx(123_060_480, rel=0.01)
    assert "text_model.encoder.layers.0.self_attn.q_proj.weight" in sd1["text_encoder"]
    sd2 = template_shapes("sd2")
    assert _params(sd2["unet"]) == pytest.approx(865_910_724, rel=0.01)
    xl = template_shapes("sdxl")
    assert _params(xl["unet"]) == pytest.approx(2_567_463_684, rel=0.01)
    assert len(xl["unet"]) == 1680
    assert _params(xl["text_encoder_2"]) == pytest.approx(694_659_841, rel=0.01)
    assert xl["text_encoder_2"]["text_projection.weight"] == (1280, 1280)


def test_template_single_file_key_sets():
    sd1 = template_single_shapes("sd1")
    # SD1.5 has 1131 keys without EMA/scheduler buffers; the one not written is the position_ids buffer
    assert len(sd1) == 1130
    assert sd1["model.diffusion_model.input_blocks.1.1.proj_in.weight"] == (320, 320, 1, 1)
    assert sd1["first_stage_model.encoder.mid.attn_1.q.weight"] == (512, 512, 1, 1)
    xl = template_single_shapes("sdxl")
    # SDXL has 2515 keys; not written: CLIP-L position_ids and bigG logit_scale
    assert len(xl) == 2513
    assert xl["conditioner.embedders.1.model.transformer.resblocks.31.attn.in_proj_weight"] == (3840, 1280)
    assert xl["model.diffusion_model.label_emb.0.0.weight"] == (1280, 2816)
    assert xl["model.diffusion_model.input_blocks.7.1.transformer_blocks.9.attn2.to_k.weight"] == (1280, 2048)
    # SD2: diffusers keeps 23 of the 24 OpenCLIP blocks and drops text_projection
    sd2 = template_single_shapes("sd2")
    full = {**sd2, "cond_stage_model.model.text_projection": (1024, 1024), "cond_stage_model.model.logit_scale": (),
            **{k.replace("resblocks.22.", "resblocks.23."): s for k, s in sd2.items() if ".resblocks.22." in k}}
    km = CheckpointKeyMap.from_single_file(full)
    assert km.arch == "sd2"
    assert len(km.unmapped_single) == 14
    assert all("resblocks.23." in k or k.endswith(("text_projection", "logit_scale")) for k in km.unmapped_single)
    assert km.to_diffusers("cond_stage_model.model.transformer.resblocks.23.attn.in_proj_weight") == []


@pytest.mark.parametrize("arch,kind", [("sd1", "v1"), ("sd2", "v2"), ("sdxl", "xl_base"),
                                       ("sdxl-refiner", "xl_refiner")])
def test_diffusers_recognises_derived_single_file_keys(arch, kind):
    shapes = template_single_shapes(arch)
    meta = {k: torch.empty(s, device="meta") for k, s in shapes.items()}
    assert sfu.infer_diffusers_model_type(meta) == kind


def test_vae_only_files():
    comps, _ = tiny("sd1")
    single = diffusers_to_single_state_dict({"vae": comps["vae"]}, "sd1")
    info = detect_checkpoint({k: tuple(v.shape) for k, v in single.items()})
    assert info.components == {"vae": "first_stage_model."} and info.layout == "single-file"
    _assert_same(single_to_diffusers_state_dicts(single)["vae"], comps["vae"])
    info = detect_checkpoint({f"vae.{k}": tuple(v.shape) for k, v in comps["vae"].items()})
    assert info.components == {"vae": "vae."} and info.layout == "diffusers"


def test_old_sd1_clip_names_without_text_model_level():
    comps, _ = tiny("sd1")
    single = diffusers_to_single_state_dict(comps, "sd1")
    old = {k.replace("cond_stage_model.transformer.text_model.", "cond_stage_model.transformer."): v
           for k, v in single.items()}
    assert detect_checkpoint({k: tuple(v.shape) for k, v in old.items()}).arch == "sd1"
    back = single_to_diffusers_state_dicts(old)
    _assert_same(back["text_encoder"], comps["text_encoder"])


def test_half_precision_round_trip_is_bit_exact():
    comps, _ = tiny("sdxl")
    half = {c: {k: v.to(torch.bfloat16 if c == "unet" else torch.float16) for k, v in sd.items()}
            for c, sd in comps.items()}
    back = single_to_diffusers_state_dicts(diffusers_to_single_state_dict(half, "sdxl"))
    for c in half:
        _assert_same(back[c], half[c])


def test_keymapping_is_frozen():
    m = KeyMapping("a", "unet", "b", None)
    with pytest.raises(Exception):
        m.single_key = "c"


def test_disk_cache_gives_the_same_maps(tmp_path, monkeypatch):
    """The on-disk cache (which spares the diffusers import) returns exactly what the converters derive."""
    from lycotools.io.readers import open_source
    from lycotools.layouts import checkpoint as ck

    shapes = open_source(Path(__file__).resolve().parent.parent / "fixtures/sdxl/base.safetensors").shapes()
    monkeypatch.setenv("LYCOTOOLS_CACHE_DIR", str(tmp_path))
    ck._build_map_cached.cache_clear()
    first = ck.CheckpointKeyMap.from_single_file(shapes)
    assert list(tmp_path.glob("keymap-*.json"))
    ck._build_map_cached.cache_clear()
    second = ck.CheckpointKeyMap.from_single_file(shapes)  # from the JSON file this time
    assert first.mappings == second.mappings and first.unmapped_single == second.unmapped_single
    assert any(isinstance(m.transform, tuple) for m in second.mappings)  # chunk transforms survive JSON

"""The committed fixtures are reproducible and load in the libraries users load them with."""
from __future__ import annotations

import copy
import json
import logging
import os
import pickle
import re
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest
import torch
from conftest import load_make_fixtures
from safetensors.torch import load_file

FIX = Path(__file__).resolve().parent.parent / "fixtures"
SD1_DIFFUSERS = FIX / "sd1" / "diffusers"
ADAPTERS = FIX / "adapters"


def _mf():
    return load_make_fixtures()


@pytest.fixture(scope="module")
def mf():
    return _mf()


@pytest.fixture(scope="module")
def manifest():
    return json.loads((FIX / "MANIFEST.json").read_text())


@pytest.fixture(scope="module")
def pipe():
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline.from_pretrained(str(SD1_DIFFUSERS), local_files_only=True)


def _generated_files(root: Path):
    return sorted(
        str(p.relative_to(root))
        for p in root.rglob("*")
        if p.is_file() and p.name not in ("README.md", "make_fixtures.py") and "__pycache__" not in p.parts
    )


# ------------------------------------------------------------------ reproducibility and size
def test_regenerate_is_byte_identical(tmp_path, mf, manifest):
    import time

    if mf.library_versions() != manifest["generated_with"]:
        pytest.skip(f"fixtures were generated with {manifest['generated_with']}; this env has {mf.library_versions()} "
                    "(configs embed library versions)")

    t0 = time.time()
    mf.main(tmp_path)
    took = time.time() - t0
    assert took < 30, f"generation took {took:.1f}s"
    assert _generated_files(tmp_path) == _generated_files(FIX)
    changed = [f for f in _generated_files(FIX) if (FIX / f).read_bytes() != (tmp_path / f).read_bytes()]
    assert not changed, f"regenerated files differ: {changed}"


def test_total_size_under_10mb():
    total = sum((FIX / f).stat().st_size for f in _generated_files(FIX))
    assert total < 10 * 1024 * 1024, total


def test_manifest_lists_every_file(manifest):
    listed = set()
    for e in manifest["files"]:
        p = FIX / e["path"]
        assert p.exists(), e["path"]
        assert e["kind"] in {"checkpoint", "adapter", "embedding", "bad", "metadata"}
        if p.is_dir():
            listed.update(f"{e['path']}/{f}" for f in e["files"])
        else:
            listed.add(e["path"])
    assert listed | {"MANIFEST.json"} == set(_generated_files(FIX))


def test_manifest_adapter_modules_match_files(manifest):
    for e in manifest["files"]:
        if e["kind"] != "adapter":
            continue
        p = FIX / e["path"]
        f = p / "adapter_model.safetensors" if p.is_dir() else p
        keys = set(load_file(str(f)))
        prefix = ""
        for mod, info in e["modules"].items():
            m = mod
            for comp in ("unet.", "text_encoder."):
                if e["format"] == "diffusers" and m.startswith(comp):
                    m = comp + m[len(comp):]
            assert any(k.startswith(prefix + m + ".") for k in keys), (e["path"], mod)
            if info.get("alpha") is not None and e["format"] not in ("peft", "peft_adalora", "diffusers"):
                a = load_file(str(f))[m + ".alpha"]
                assert float(a.flatten()[0]) == info["alpha"], (e["path"], mod)


# ------------------------------------------------------------------ diffusers folder and single file
def test_pipeline_loads_offline_and_runs(pipe):
    out = pipe("a photo of a cat", num_inference_steps=2, height=64, width=64, guidance_scale=2.0,
               output_type="np", generator=torch.Generator().manual_seed(0))
    img = out.images[0]
    assert img.shape == (64, 64, 3)
    assert torch.isfinite(torch.as_tensor(img)).all()


def _unet_cfg():
    return json.loads((SD1_DIFFUSERS / "unet" / "config.json").read_text())


def test_sd1_single_file_converts_back_with_diffusers_converters():
    from diffusers.loaders.single_file_utils import (
        convert_ldm_clip_checkpoint,
        convert_ldm_unet_checkpoint,
        convert_ldm_vae_checkpoint,
    )

    sd = load_file(str(FIX / "sd1" / "base.safetensors"))
    unet = convert_ldm_unet_checkpoint(dict(sd), _unet_cfg())
    vae = convert_ldm_vae_checkpoint(dict(sd), json.loads((SD1_DIFFUSERS / "vae" / "config.json").read_text()))
    te = convert_ldm_clip_checkpoint(dict(sd))
    for comp, conv in (("unet", unet), ("vae", vae)):
        ref = load_file(str(SD1_DIFFUSERS / comp / "diffusion_pytorch_model.safetensors"))
        assert set(conv) == set(ref), (comp, sorted(set(conv) ^ set(ref))[:5])
        for k in ref:
            assert torch.equal(conv[k].reshape(ref[k].shape), ref[k]), (comp, k)
    ref = load_file(str(SD1_DIFFUSERS / "text_encoder" / "model.safetensors"))
    te = {re.sub(r"^text_model\.", "", k): v for k, v in te.items() if not k.endswith("position_ids")}
    ref = {re.sub(r"^text_model\.", "", k): v for k, v in ref.items()}
    assert set(te) == set(ref)
    for k in ref:
        assert torch.equal(te[k], ref[k]), k


def test_sd1_from_single_file_offline():
    from diffusers import UNet2DConditionModel

    m = UNet2DConditionModel.from_single_file(str(FIX / "sd1" / "base.safetensors"), config=str(SD1_DIFFUSERS),
                                              subfolder="unet", local_files_only=True)
    ref = load_file(str(SD1_DIFFUSERS / "unet" / "diffusion_pytorch_model.safetensors"))
    got = m.state_dict()
    for k in ref:
        assert torch.equal(got[k], ref[k]), k


def test_sdxl_single_file_converts_with_diffusers_converters(mf):
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_open_clip_checkpoint
    from transformers import CLIPTextModelWithProjection

    sd = load_file(str(FIX / "sdxl" / "base.safetensors"))
    cfg = UNet2DConditionModel(**mf.SDXL_UNET).config
    unet = convert_ldm_unet_checkpoint(dict(sd), dict(cfg))
    xunet, _, te1, te2 = mf.build_sdxl()
    ref = xunet.state_dict()
    assert set(unet) == set(ref)
    for k in ref:
        assert torch.equal(unet[k], ref[k]), k
    model = CLIPTextModelWithProjection(te2.config)
    conv = convert_open_clip_checkpoint(model, dict(sd), prefix="conditioner.embedders.1.model.")
    ref2 = mf.te_sd(te2)
    conv = {k if k.startswith(("text_model.", "text_projection")) else "text_model." + k: v for k, v in conv.items()
            if not k.endswith("position_ids")}
    for k in ref2:
        assert torch.equal(conv[k], ref2[k]), k
    for k, v in mf.te_sd(te1).items():
        assert torch.equal(sd["conditioner.embedders.0.transformer." + k], v), k


def test_pickle_checkpoint_matches_safetensors():
    ck = torch.load(FIX / "sd1" / "base_pickle.ckpt", weights_only=True)
    sd = load_file(str(FIX / "sd1" / "base.safetensors"))
    assert set(ck["state_dict"]) == set(sd)
    for k, v in sd.items():
        assert torch.equal(ck["state_dict"][k], v.half()), k


@pytest.mark.parametrize("arch", ["sd1", "sdxl"])
def test_tuned_differs_exactly_on_documented_low_rank_deltas(arch):
    base = load_file(str(FIX / arch / "base.safetensors"))
    tuned = load_file(str(FIX / arch / "tuned.safetensors"))
    deltas = json.loads((FIX / arch / "deltas.json").read_text())
    assert set(base) == set(tuned)
    changed = {k for k in base if not torch.equal(base[k], tuned[k])}
    assert changed == set(deltas)
    for k, info in deltas.items():
        d = (tuned[k].double() - base[k].double()).reshape(base[k].shape[0], -1)
        # fp32 storage of W + ΔW adds rounding noise ~1e-7·|W|; the documented tolerance removes it
        assert int(torch.linalg.matrix_rank(d, rtol=info["rank_rtol"])) == info["rank"], k
        assert int(torch.linalg.matrix_rank(d, rtol=info["sv_ratio"] / 2)) == info["rank"], k
        assert abs(float(d.norm()) - info["fro_norm"]) < 1e-4 * max(1.0, info["fro_norm"]), k


# ------------------------------------------------------------------ adapters in their consumers
def _lora_modules(model):
    return {n for n, m in model.named_modules() if hasattr(m, "lora_A") and len(getattr(m, "lora_A", {})) > 0}


def test_peft_folder_loads_with_peftmodel():
    from diffusers import UNet2DConditionModel
    from peft import PeftModel

    unet = UNet2DConditionModel.from_pretrained(str(SD1_DIFFUSERS), subfolder="unet", local_files_only=True)
    model = PeftModel.from_pretrained(unet, str(ADAPTERS / "sd1_peft"))
    file = load_file(str(ADAPTERS / "sd1_peft" / "adapter_model.safetensors"))
    got = model.state_dict()
    for k, v in file.items():
        k2 = k.replace(".lora_A.weight", ".lora_A.default.weight").replace(".lora_B.weight", ".lora_B.default.weight")
        assert torch.equal(got[k2], v), k
    assert model.peft_config["default"].r == 4 and model.peft_config["default"].lora_alpha == 8


def test_peft_adalora_folder_loads():
    from diffusers import UNet2DConditionModel
    from peft import PeftModel

    cfg = json.loads((ADAPTERS / "sd1_peft_adalora" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "ADALORA" and cfg["rank_pattern"]
    unet = UNet2DConditionModel.from_pretrained(str(SD1_DIFFUSERS), subfolder="unet", local_files_only=True)
    model = PeftModel.from_pretrained(unet, str(ADAPTERS / "sd1_peft_adalora"))
    file = load_file(str(ADAPTERS / "sd1_peft_adalora" / "adapter_model.safetensors"))
    got = model.state_dict()
    n = 0
    for k, v in file.items():
        base, leaf = k.rsplit(".", 1)
        g = got[f"{base}.{leaf}.default"]
        r = v.shape[0] if leaf in ("lora_A", "lora_E") else v.shape[1]
        if leaf in ("lora_A", "lora_E"):
            assert torch.equal(g[:r], v) or v.numel() == 0, k
        else:
            assert torch.equal(g[:, :r], v) or v.numel() == 0, k
        n += 1
    assert n


def _load_lora_strict(pipe, path, caplog, **kw):
    pipe = copy.deepcopy(pipe)
    caplog.clear()
    with caplog.at_level(logging.WARNING), warnings.catch_warnings(record=True) as warned:
        warnings.simplefilter("always")
        pipe.load_lora_weights(str(path), adapter_name="fx", **kw)
    msgs = [r.getMessage() for r in caplog.records] + [str(w.message) for w in warned]
    bad = [m for m in msgs if re.search(r"unexpected|not correctly|No LoRA keys|missing|inconsisten", m, re.I)
           and not any(re.search(k, m) for k in KNOWN_DIFFUSERS_MESSAGES)]
    return pipe, bad


# Messages diffusers 0.42.1 + transformers 5 give for documented behaviour, tested on their own:
# the CLIP load report of the kohya TE self-attention keys it drops (xfail test below; whether the
# report reaches the logging capture depends on the environment), and the note that a UNet-only
# file has no text-encoder keys.
KNOWN_DIFFUSERS_MESSAGES = (
    r"CLIPTextModel(WithProjection)? LOAD REPORT",
    r"No LoRA keys associated to CLIPTextModel(WithProjection)? found",
)


def _file_modules(path):
    return {k.split(".", 1)[0] for k in load_file(str(path))}


def _flat_loaded(pipe, comps=(("unet", "lora_unet_"), ("text_encoder", "lora_te_"))):
    out = set()
    for comp, prefix in comps:
        for n in _lora_modules(getattr(pipe, comp)):
            n = _te_key(n) if comp.startswith("text_encoder") else n
            out.add(prefix + n.replace(".", "_"))
    return out


def test_diffusers_lora_loads(pipe, caplog):
    p, bad = _load_lora_strict(pipe, ADAPTERS, caplog, weight_name="sd1_diffusers_lora.safetensors")
    assert not bad, bad
    file = load_file(str(ADAPTERS / "sd1_diffusers_lora.safetensors"))
    mods = {re.sub(r"\.(lora|lora_linear_layer|lora_A|lora_B)\..*$", "", k) for k in file}
    n_unet = len({m for m in mods if m.startswith("unet.")})
    n_te = len({m for m in mods if m.startswith("text_encoder.")})
    assert len(_lora_modules(p.unet)) == n_unet and len(_lora_modules(p.text_encoder)) == n_te
    cfg = p.unet.peft_config["fx"]
    assert cfg.r == 4 and cfg.lora_alpha == 8


def test_diffusers_old_lora_loads(pipe, caplog, manifest):
    p, bad = _load_lora_strict(pipe, ADAPTERS / "sd1_diffusers_old.safetensors", caplog)
    assert not bad, bad
    entry = next(e for e in manifest["files"] if e["path"] == "adapters/sd1_diffusers_old.safetensors")
    assert len(_lora_modules(p.unet)) == entry["n_modules"]


@pytest.mark.parametrize("name", ["sd1_kohya_lora", "sd1_kohya_locon", "sd1_dora"])
def test_kohya_lora_loads_in_diffusers_without_unmatched_keys(pipe, caplog, name):
    p, bad = _load_lora_strict(pipe, ADAPTERS / f"{name}.safetensors", caplog)
    if name != "sd1_dora":  # diffusers logs that it drops dora_scale (docs/formats.md#diffusers-loader)
        assert not bad, bad
    want = _file_modules(ADAPTERS / f"{name}.safetensors")
    got = _flat_loaded(p)
    assert {m for m in want if m.startswith("lora_unet_")} == {m for m in got if m.startswith("lora_unet_")}
    assert got <= want
    # text-encoder MLP keys load; attention keys: see the xfail test below
    assert {m for m in want if m.startswith("lora_te_") and "_mlp_" in m} <= got


@pytest.mark.xfail(strict=False, reason="diffusers 0.42.1 + transformers 5 leave kohya TE self_attn keys as legacy "
                   "`to_q_lora.*` names, which the CLIP model reports as UNEXPECTED and drops")
def test_kohya_te_attention_keys_load_in_diffusers(pipe, caplog):
    p, _ = _load_lora_strict(pipe, ADAPTERS / "sd1_kohya_lora.safetensors", caplog)
    want = {m for m in _file_modules(ADAPTERS / "sd1_kohya_lora.safetensors") if m.startswith("lora_te_")}
    assert want <= _flat_loaded(p)


def test_lycoris_only_formats_are_rejected_by_diffusers(pipe):
    # documented consumer behaviour (docs/formats.md#diffusers-loader): LoHa/LoKr/Tucker files raise in diffusers 0.42
    for name in ("sd1_loha", "sd1_lokr", "sd1_locon_tucker"):
        with pytest.raises(ValueError):
            copy.deepcopy(pipe).load_lora_weights(str(ADAPTERS / f"{name}.safetensors"))


def test_sdxl_kohya_lora_loads_in_sdxl_pipeline(mf, caplog):
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

    unet, vae, te1, te2 = mf.build_sdxl()
    tok = mf.make_tokenizer()
    pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=te1, text_encoder_2=te2, tokenizer=tok, tokenizer_2=tok,
                                     unet=unet, scheduler=EulerDiscreteScheduler())
    for name in ("sdxl_kohya_lora", "sdxl_kohya_locon"):
        p, bad = _load_lora_strict(pipe, ADAPTERS / f"{name}.safetensors", caplog)
        assert not bad, bad
        want = _file_modules(ADAPTERS / f"{name}.safetensors")
        # sgm-named UNet modules are remapped by diffusers; every one must land on a module
        assert len(_lora_modules(p.unet)) == len({m for m in want if m.startswith("lora_unet_")}), name
        got_te = _flat_loaded(p, (("text_encoder", "lora_te1_"), ("text_encoder_2", "lora_te2_")))
        assert got_te <= want
        # MLP keys load; TE self_attn keys are dropped by diffusers 0.42.1 + transformers 5 (xfail test above)
        assert {m for m in want if m.startswith("lora_te") and "_mlp_" in m} <= got_te


# ------------------------------------------------------------------ every LyCORIS module maps to a real weight
def _te_key(path):
    return path if path.startswith("text_model.") else "text_model." + path


def _delta(sd, key, shape):
    """ΔW of one module (docs/adapters.md#summary formulas), used only to check the shapes line up."""
    def g(s):
        return sd.get(f"{key}.{s}")

    alpha = g("alpha")
    if g("lora_up.weight") is not None:
        up, down, mid = g("lora_up.weight").float(), g("lora_down.weight").float(), g("lora_mid.weight")
        r = down.shape[0]
        if mid is not None:
            d = torch.einsum("ijhw,oi,jc->ochw", mid.float(), up.flatten(1), down.flatten(1))
        else:
            d = up.flatten(1) @ down.flatten(1)
        if g("bias_indices") is not None:
            idx = g("bias_indices").long()
            size = [int(x) for x in g("bias_size")]
            d = d + torch.sparse_coo_tensor(idx, g("bias_values").float(), size).to_dense()
        return d.reshape(shape) * (float(alpha.flatten()[0]) / r if alpha is not None else 1.0)
    if g("hada_w1_a") is not None:
        r = g("hada_w1_b").shape[0]
        if g("hada_t1") is not None:
            w = [torch.einsum("ijhw,io,jc->ochw", g(f"hada_t{i}"), g(f"hada_w{i}_a"), g(f"hada_w{i}_b")) for i in (1, 2)]
        else:
            w = [(g(f"hada_w{i}_a") @ g(f"hada_w{i}_b")).reshape(shape) for i in (1, 2)]
        return w[0] * w[1] * float(alpha) / r
    if g("lokr_w1") is not None or g("lokr_w1_a") is not None:
        w1 = g("lokr_w1") if g("lokr_w1") is not None else g("lokr_w1_a") @ g("lokr_w1_b")
        r = None
        if g("lokr_w1_b") is not None:
            r = g("lokr_w1_b").shape[0]
        if g("lokr_w2") is not None:
            w2 = g("lokr_w2")
        elif g("lokr_t2") is not None:
            w2 = torch.einsum("ijhw,ip,jq->pqhw", g("lokr_t2"), g("lokr_w2_a"), g("lokr_w2_b"))
            r = g("lokr_w2_b").shape[0]
        else:
            r = g("lokr_w2_b").shape[0]
            b = g("lokr_w2_a").shape[0]
            w2 = (g("lokr_w2_a") @ g("lokr_w2_b")).reshape(b, shape[1] // w1.shape[1], *shape[2:])
        if w2.dim() == 4:
            w1 = w1[:, :, None, None]
        scale = 1.0 if r is None else float(alpha) / r
        return torch.kron(w1.contiguous(), w2.contiguous()) * scale
    if g("diff") is not None:
        return g("diff")
    if g("w_norm") is not None:
        return g("w_norm")
    if g("on_input") is not None:
        w = g("weight")
        return w
    raise AssertionError(f"unknown module {key}")


LYCORIS_FILES = ["sd1_kohya_lora", "sd1_kohya_locon", "sd1_locon_tucker", "sd1_dora", "sd1_loha", "sd1_loha_tucker",
                 "sd1_lokr", "sd1_lokr_tucker", "sd1_full", "sd1_ia3", "sd1_sparse_bias", "sd1_lycoris_prefix"]


@pytest.mark.parametrize("name", LYCORIS_FILES)
def test_lycoris_modules_map_to_real_weights(name, manifest):
    unet = load_file(str(SD1_DIFFUSERS / "unet" / "diffusion_pytorch_model.safetensors"))
    te = {_te_key(k): v for k, v in load_file(str(SD1_DIFFUSERS / "text_encoder" / "model.safetensors")).items()}
    sd = load_file(str(ADAPTERS / f"{name}.safetensors"))
    entry = next(e for e in manifest["files"] if e["path"] == f"adapters/{name}.safetensors")
    names = {k.split(".", 1)[0] for k in sd}
    assert names == set(entry["modules"])
    # module name -> real weight (by flattening every weight path)
    flat = {}
    for comp, prefix, d in (("unet", ("lora_unet_", "lycoris_"), unet), ("te", ("lora_te_",), te)):
        for k, v in d.items():
            if k.endswith(".weight"):
                for pre in prefix:
                    flat[pre + k[: -len(".weight")].replace(".", "_")] = (k, v)
    for n in names:
        assert n in flat, f"{name}: {n} is not a module of the tiny SD1 model"
        wkey, w = flat[n]
        d = _delta(sd, n, tuple(w.shape))
        if entry["modules"][n]["algo"] == "ia3":
            on_input = int(sd[f"{n}.on_input"])
            assert d.numel() == (w.shape[1] if on_input else w.shape[0])
        elif entry["modules"][n]["algo"] == "norm":
            assert d.shape == w.shape and sd[f"{n}.b_norm"].shape == w.shape
        else:
            assert d.shape == w.shape, (n, d.shape, w.shape)
            assert d.abs().sum() > 0
        if f"{n}.dora_scale" in sd:
            assert sd[f"{n}.dora_scale"].shape == (w.shape[0],) + (1,) * (w.dim() - 1)


@pytest.mark.parametrize("name,prefix", [("sd1_ldm_named_lora", "lora_unet_"), ("sd1_comfy_lora", "diffusion_model.")])
def test_ldm_named_adapters_map_to_single_file_weights(name, prefix):
    base = load_file(str(FIX / "sd1" / "base.safetensors"))
    sd = load_file(str(ADAPTERS / f"{name}.safetensors"))
    ldm = {k[len("model.diffusion_model."):-len(".weight")]: v for k, v in base.items()
           if k.startswith("model.diffusion_model.") and k.endswith(".weight")}
    if prefix == "lora_unet_":
        ldm = {"lora_unet_" + k.replace(".", "_"): v for k, v in ldm.items()}
        mods = {k.split(".", 1)[0] for k in sd}
    else:
        ldm = {"diffusion_model." + k: v for k, v in ldm.items()}
        mods = {k.rsplit(".", 2)[0] if k.endswith(".weight") else k.rsplit(".", 1)[0] for k in sd}
    for m in mods:
        assert m in ldm, m
        assert _delta(sd, m, tuple(ldm[m].shape)).shape == ldm[m].shape


# LyCORIS 4.1.3 reload bugs (docs/adapters.md#lycoris-reload-failures): its loader cannot rebuild these modules from a file.
LYCORIS_RELOAD_BUGS = {
    "ia3": "IA3Module.make_module_from_state_dict() TypeError (docs/adapters.md#lycoris-reload-failures)",
    "lokr_tucker": "Tucker LoKr rank read from w2_a.size(1) (docs/adapters.md#lycoris-reload-failures)",
}


@pytest.fixture(scope="module")
def sd1_modules(mf):
    unet, _, te = mf.build_sd1()
    mods = {}
    for n, m in unet.named_modules():
        mods["lora_unet_" + n.replace(".", "_")] = m
        mods["lycoris_" + n.replace(".", "_")] = m
    for n, m in te.named_modules():
        mods["lora_te_" + _te_key(n).replace(".", "_")] = m
    return mods


@pytest.mark.parametrize("name", [n for n in LYCORIS_FILES if n != "sd1_ia3"])
def test_lycoris_library_forward_matches_the_documented_formulas(name, manifest, sd1_modules):
    """lycoris-lora rebuilds each module from the file; its forward pass adds exactly ΔW·x (the formulas above)."""
    import torch.nn.functional as F

    pytest.importorskip("lycoris")
    from lycoris.modules import get_module

    sd = {k: (v.float() if v.is_floating_point() else v) for k, v in load_file(str(ADAPTERS / f"{name}.safetensors")).items()}
    entry = next(e for e in manifest["files"] if e["path"] == f"adapters/{name}.safetensors")
    g = torch.Generator().manual_seed(0)
    checked = 0
    for key, info in sorted(entry["modules"].items()):
        if info["algo"] in LYCORIS_RELOAD_BUGS:
            continue
        orig = copy.deepcopy(sd1_modules[key])
        w = orig.weight.detach().clone()
        b0 = None if getattr(orig, "bias", None) is None else orig.bias.detach().clone()
        with torch.no_grad():
            cls, args = get_module(sd, key)
            assert cls is not None, key
            lm = cls.make_module_from_state_dict(key, orig, *args)
            lm.apply_to()
            if info["algo"] == "norm":
                x = torch.randn(2, w.shape[0], 4, 4, generator=g) if isinstance(orig, torch.nn.GroupNorm) \
                    else torch.randn(3, w.shape[0], generator=g)
                want_w, want_b = w + sd[f"{key}.w_norm"], b0 + sd[f"{key}.b_norm"]
                want = (F.group_norm(x, orig.num_groups, want_w, want_b, orig.eps) if isinstance(orig, torch.nn.GroupNorm)
                        else F.layer_norm(x, w.shape, want_w, want_b, orig.eps))
                y = lm(x)
            else:
                lora_only = {k: v for k, v in sd.items() if not k.startswith(f"{key}.bias_")}  # LyCORIS ignores them
                d = _delta(lora_only, key, tuple(w.shape)).float()
                new_w = w + d
                if f"{key}.dora_scale" in sd:
                    norm = new_w.reshape(w.shape[0], -1).norm(dim=1).reshape((-1,) + (1,) * (w.dim() - 1))
                    new_w = new_w * (sd[f"{key}.dora_scale"] / (norm + torch.finfo(torch.float32).eps))
                b = b0
                if f"{key}.diff_b" in sd:
                    b = b + sd[f"{key}.diff_b"]
                if isinstance(orig, torch.nn.Linear):
                    x = torch.randn(3, w.shape[1], generator=g)
                    want = F.linear(x, new_w, b)
                else:
                    x = torch.randn(1, w.shape[1], 8, 8, generator=g)
                    want = F.conv2d(x, new_w, b, orig.stride, orig.padding)
                y = lm(x)
        torch.testing.assert_close(y, want, rtol=1e-4, atol=1e-5, msg=lambda m: f"{name}:{key}: {m}")
        checked += 1
    assert checked > 0


@pytest.mark.parametrize("name,algo", [("sd1_ia3", "ia3"), ("sd1_lokr_tucker", "lokr_tucker")])
def test_lycoris_reload_bugs_still_there(name, algo, manifest, sd1_modules):
    """Documents lycoris-lora 4.1.3's reload bugs on these (valid) layouts; flip when LyCORIS fixes them."""
    pytest.importorskip("lycoris")
    from lycoris.modules import get_module

    sd = load_file(str(ADAPTERS / f"{name}.safetensors"))
    entry = next(e for e in manifest["files"] if e["path"] == f"adapters/{name}.safetensors")
    key = next(k for k, v in sorted(entry["modules"].items()) if v["algo"] == algo)
    cls, args = get_module(sd, key)
    with pytest.raises((TypeError, AttributeError, RuntimeError)):
        with torch.no_grad():
            lm = cls.make_module_from_state_dict(key, copy.deepcopy(sd1_modules[key]), *args)
            lm.apply_to()
            w = sd1_modules[key].weight
            lm(torch.randn(1, w.shape[1], 8, 8))


# ------------------------------------------------------------------ embeddings and bad files
def test_embeddings_load(pipe):
    p = copy.deepcopy(pipe)
    p.load_textual_inversion(str(FIX / "embeddings" / "a1111.pt"))
    p.load_textual_inversion(str(FIX / "embeddings" / "diffusers_learned_embeds.safetensors"))
    p.load_textual_inversion(str(FIX / "embeddings" / "kohya.safetensors"), token="<kohya>")
    assert "tinyemb" in p.tokenizer.get_vocab() and "<tiny-tok>" in p.tokenizer.get_vocab()
    a1111 = torch.load(FIX / "embeddings" / "a1111.pt", weights_only=True)
    assert a1111["string_to_token"] == {"*": 265} and a1111["string_to_param"]["*"].shape == (2, 32)
    x = load_file(str(FIX / "embeddings" / "sdxl.safetensors"))
    assert x["clip_l"].shape == (2, 32) and x["clip_g"].shape == (2, 48)


@pytest.mark.parametrize("name", ["not_a_model", "truncated", "lying_header", "empty"])
def test_bad_safetensors_are_rejected(name):
    with pytest.raises(Exception):
        load_file(str(FIX / "bad" / f"{name}.safetensors"))


def test_evil_pickle_is_refused_and_never_ran():
    marker = Path("/tmp/lycotools_pwned")
    with pytest.raises(pickle.UnpicklingError):
        torch.load(FIX / "bad" / "evil.ckpt", weights_only=True)
    assert not marker.exists()

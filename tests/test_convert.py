"""`lycotools convert`: lossless round trips between adapter conventions, each output loaded in its consumer,
refusals, --algo lora, checkpoints single file <-> diffusers, embeddings."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from lycotools.cli import main
from lycotools.ops.convert_adapter import open_adapter
from lycotools.ops.inspect import guess_adapter_arch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
FIX = ROOT / "fixtures"
AD = FIX / "adapters"
SD1_PIPE = FIX / "sd1" / "diffusers"

logging.getLogger("diffusers").setLevel(logging.ERROR)
logging.getLogger("peft").setLevel(logging.ERROR)


def run(*args, code=0):
    res = CliRunner().invoke(main, ["convert", *map(str, args)])
    assert res.exit_code == code, (res.exit_code, res.output, res.stderr if hasattr(res, "stderr") else "")
    return res


def raw(path) -> dict:
    return load_file(str(path))


def assert_same_file_tensors(a, b):
    """Same keys; factors bit-identical (dtype included); alphas equal in value (written as 0-dim float32)."""
    ta, tb = raw(a), raw(b)
    assert sorted(ta) == sorted(tb)
    for k in ta:
        if k.endswith(".alpha"):
            assert float(ta[k]) == float(tb[k]), k
        else:
            assert ta[k].dtype == tb[k].dtype and torch.equal(ta[k], tb[k]), k


_INDEX = {}


def base_index(arch):
    from lycotools.io.readers import open_source
    from lycotools.layouts.model_index import ModelIndex

    if arch not in _INDEX:
        _INDEX[arch] = ModelIndex.from_source(open_source(FIX / arch / "base.safetensors"))
    return _INDEX[arch]


def deltas(path) -> dict:
    """(component, module) -> ΔW (float32, layer shape of the tiny fixture model) as lycotools reads the file."""
    af = open_adapter(path)
    arch, _, _ = guess_adapter_arch(af)
    af.resolve(base_index(arch))
    assert not af.unmatched and not af.errors
    return {(lm.target.component, lm.target.module): lm.module.delta(lm.target.shape) for lm in af.parsed}


def assert_same_deltas(a, b, tol=0.0):
    da, db = deltas(a), deltas(b)
    assert sorted(da) == sorted(db)
    for k in da:
        if tol == 0:
            assert torch.equal(da[k], db[k]), k
        else:
            assert torch.allclose(da[k], db[k], atol=tol, rtol=tol), k


# ------------------------------------------------------------------------------------------------
# round trips (bit-exact)
# ------------------------------------------------------------------------------------------------

ROUND_TRIP = [
    ("sd1_kohya_lora.safetensors", ["peft", "diffusers", "comfy", "lycoris"]),
    ("sd1_kohya_locon.safetensors", ["peft", "diffusers", "comfy", "lycoris"]),
    ("sdxl_kohya_lora.safetensors", ["peft", "diffusers", "comfy", "lycoris"]),
    ("sdxl_kohya_locon.safetensors", ["peft", "diffusers", "comfy", "lycoris"]),
    ("sd1_loha.safetensors", ["peft", "comfy", "lycoris"]),
    ("sd1_loha_tucker.safetensors", ["peft", "comfy", "lycoris"]),
    ("sd1_dora.safetensors", ["peft", "lycoris"]),
    ("sd1_lokr.safetensors", ["comfy", "lycoris"]),  # PEFT: ΔW-exact, not key-exact (test_peft_from_pretrained)
    ("sd1_lokr_tucker.safetensors", ["comfy", "lycoris"]),
    ("sd1_locon_tucker.safetensors", ["comfy", "lycoris"]),
]


@pytest.mark.parametrize("name,targets", ROUND_TRIP, ids=[r[0].split(".")[0] for r in ROUND_TRIP])
def test_round_trips_are_bit_exact(tmp_path, name, targets):
    src = AD / name
    back_to = "kohya" if "kohya" in name else "lycoris"
    first = tmp_path / "first.safetensors"
    run(src, "--to", back_to, "-o", first, "--no-date")
    assert_same_file_tensors(src, first)
    for t in targets:
        mid = tmp_path / (f"mid_{t}" if t == "peft" else f"mid_{t}.safetensors")
        back = tmp_path / f"back_{t}.safetensors"
        run(first, "--to", t, "-o", mid, "--no-date")
        run(mid, "--to", back_to, "-o", back, "--no-date")
        assert_same_file_tensors(first, back)
        assert_same_deltas(first, mid)


def test_output_names_follow_kohya(tmp_path):
    out = tmp_path / "x.safetensors"
    run(AD / "sdxl_kohya_lora.safetensors", "--to", "kohya", "-o", out)
    keys = raw(out)
    assert all(k.startswith(("lora_unet_", "lora_te1_", "lora_te2_")) for k in keys)
    assert any("input_blocks" in k or "output_blocks" in k or "middle_block" in k for k in keys)  # ldm names on SDXL
    run(AD / "sd1_peft", "--to", "kohya", "-o", tmp_path / "y.safetensors")
    keys = raw(tmp_path / "y.safetensors")
    assert all(k.startswith(("lora_unet_down_blocks", "lora_unet_up_blocks", "lora_unet_mid_block", "lora_te_text_model_"))
               for k in keys), sorted(keys)[:5]
    for k, t in keys.items():
        if k.endswith(".alpha"):
            assert t.dim() == 0 and t.dtype == torch.float32
    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
    assert meta["lycotools.command"] == "convert" and meta["ss_network_module"] == "networks.lora"
    assert meta["ss_base_model_version"].startswith("sdxl") and "sshs_model_hash" in meta


def test_comfy_names(tmp_path):
    out = tmp_path / "c.safetensors"
    run(AD / "sd1_kohya_locon.safetensors", "--to", "comfy", "-o", out)
    keys = raw(out)
    unet = [k for k in keys if not k.startswith("lora_te_")]
    assert unet and all(k.startswith("diffusion_model.") for k in unet)
    assert any(".input_blocks." in k for k in unet)


def test_other_conventions_to_kohya_keep_delta(tmp_path):
    for name in ["sd1_comfy_lora.safetensors", "sd1_diffusers_lora.safetensors", "sd1_diffusers_old.safetensors",
                 "sd1_ldm_named_lora.safetensors", "sd1_lycoris_prefix.safetensors", "sd1_peft"]:
        out = tmp_path / f"{name.split('.')[0]}.safetensors"
        run(AD / name, "--to", "kohya", "-o", out)
        assert_same_deltas(AD / name, out)


# ------------------------------------------------------------------------------------------------
# consumers
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sd1_pipe():
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline.from_pretrained(str(SD1_PIPE), safety_checker=None, requires_safety_checker=False)


def _weights(pipe) -> dict:
    out = {}
    for comp in ("unet", "text_encoder", "text_encoder_2"):
        model = getattr(pipe, comp, None)
        if model is None:
            continue
        for k, v in model.state_dict().items():
            k = k.replace(".base_layer.", ".")
            if comp.startswith("text_encoder") and not k.startswith(("text_model.", "text_projection")):
                k = "text_model." + k
            out[(comp, k)] = v.detach().clone().float()
    return out


def _expected(before: dict, path) -> dict:
    exp = {}
    for (comp, module), d in deltas(path).items():
        if (comp, module + ".weight") not in before:
            raise AssertionError(f"{comp}.{module} not in the model")
        key = (comp, module + ".weight")
        exp[key] = before[key] + d
    return exp


def _load_fuse_check(pipe, out, before, exp, in_file):
    """Load a LoRA file into the pipeline, fuse it, compare ΔW with ``exp``, then undo it all."""
    pipe.load_lora_weights(str(out), adapter_name="t")
    pipe.fuse_lora(adapter_names=["t"])
    try:
        _check_fused(pipe, before, exp, allowed=in_file)
    finally:
        pipe.unfuse_lora()
        pipe.unload_lora_weights()


def _check_fused(pipe, before, exp, allowed=None):
    after = _weights(pipe)
    assert exp
    for key, w in exp.items():
        assert torch.allclose(after[key], w, atol=1e-5, rtol=1e-4), key
    changed = {k for k in before if k in after and not torch.equal(before[k], after[k])}
    assert changed <= set(exp) | set(allowed or ()), sorted(changed - set(exp))[:3]


@pytest.mark.parametrize("target", ["diffusers", "diffusers-fold", "kohya"])
def test_diffusers_load_lora_weights(tmp_path, sd1_pipe, target):
    pipe = sd1_pipe
    out = tmp_path / "pytorch_lora_weights.safetensors"
    run(AD / "sd1_kohya_locon.safetensors", "--to", target.split("-")[0], "-o", out,
        *(["--fold-alpha"] if "fold" in target else []))
    before = _weights(pipe)
    exp = _expected(before, out)
    in_file = set(exp)
    if target == "kohya":
        # diffusers 0.42 + transformers 5 leaves kohya-named TE self-attention LoRAs unapplied (its legacy
        # `q_proj` -> `to_q_lora` rename finds no module); the MLP and UNet keys load. --to diffusers loads all.
        exp = {k: v for k, v in exp.items() if not (k[0] == "text_encoder" and "self_attn" in k[1])}
    _load_fuse_check(pipe, out, before, exp, in_file)


@pytest.fixture(scope="module")
def sdxl_pipe(tmp_path_factory):
    from diffusers import (AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline,
                           UNet2DConditionModel)
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    folder = tmp_path_factory.mktemp("sdxl") / "pipe"
    run(FIX / "sdxl" / "base.safetensors", "--to", "diffusers", "-o", folder, "-q")
    tok = CLIPTokenizer.from_pretrained(str(SD1_PIPE / "tokenizer"))
    return StableDiffusionXLPipeline(
        vae=AutoencoderKL.from_pretrained(str(folder / "vae")),
        text_encoder=CLIPTextModel.from_pretrained(str(folder / "text_encoder")),
        text_encoder_2=CLIPTextModelWithProjection.from_pretrained(str(folder / "text_encoder_2")),
        tokenizer=tok, tokenizer_2=tok, unet=UNet2DConditionModel.from_pretrained(str(folder / "unet")),
        scheduler=EulerDiscreteScheduler.from_pretrained(str(folder / "scheduler")))


@pytest.mark.parametrize("target", ["diffusers", "kohya"])
def test_sdxl_diffusers_load_lora_weights(tmp_path, sdxl_pipe, target):
    """SDXL: kohya output (ldm-named UNet, lora_te1_/lora_te2_) and diffusers output both load in diffusers'
    SDXL pipeline and fuse to W + ΔW."""
    pipe = sdxl_pipe
    out = tmp_path / "l.safetensors"
    run(AD / "sdxl_kohya_locon.safetensors", "--to", target, "-o", out)
    before = _weights(pipe)
    exp = _expected(before, out)
    in_file = set(exp)
    if target == "kohya":
        # diffusers 0.42 quirks with kohya files (not with --to diffusers): TE self-attention LoRAs are not
        # applied (see test_diffusers_load_lora_weights), and UNet attention modules whose alpha is not the
        # file's most common one get their alpha_pattern under a legacy key name PEFT ignores
        from collections import Counter

        af = open_adapter(out)
        af.resolve(base_index("sdxl"))
        alphas = {(lm.target.component, lm.target.module + ".weight"): lm.module.alpha for lm in af.parsed}
        common = Counter(alphas.values()).most_common(1)[0][0]
        exp = {k: v for k, v in exp.items() if not (k[0].startswith("text_encoder") and "self_attn" in k[1])
               and not (".to_" in k[1] and alphas[k] != common)}
    _load_fuse_check(pipe, out, before, exp, in_file)


def test_diffusers_fold_alpha(tmp_path, sd1_pipe):
    out = tmp_path / "f.safetensors"
    run(AD / "sd1_kohya_locon.safetensors", "--to", "diffusers", "--fold-alpha", "-o", out)
    with safe_open(str(out), "pt") as f:
        assert "lora_adapter_metadata" not in f.metadata()
    assert_same_deltas(AD / "sd1_kohya_locon.safetensors", out, tol=1e-6)


@pytest.mark.parametrize("name", ["sd1_kohya_locon.safetensors", "sd1_loha.safetensors", "sd1_loha_tucker.safetensors",
                                  "sd1_dora.safetensors", "sd1_lokr.safetensors", "sd1_lokr_tucker.safetensors"])
def test_peft_from_pretrained(tmp_path, sd1_pipe, name):
    from peft import PeftModel

    out = tmp_path / "peft"
    run(AD / name, "--to", "peft", "-o", out)
    assert (out / "unet" / "adapter_config.json").exists()
    if "dora" not in name:  # the PEFT folder means the ΔW the file means (PEFT's own merge is checked below)
        assert_same_deltas(AD / name, out)
    pipe = sd1_pipe
    before = _weights(pipe)
    if "dora" in name:  # DoRA: the merged weight, not W + ΔW
        af = open_adapter(out)
        af.resolve(base_index("sd1"))
        exp = {}
        for lm in af.parsed:
            key = (lm.target.component, lm.target.module + ".weight")
            exp[key] = lm.module.apply(before[key])[0]
    else:
        exp = _expected(before, out)
    import copy

    for comp in ("unet", "text_encoder"):
        if not (out / comp).exists():
            continue
        model = copy.deepcopy(getattr(pipe, comp))
        pm = PeftModel.from_pretrained(model, str(out / comp))
        merged = pm.merge_and_unload()
        sd = merged.state_dict()
        n = 0
        for (c, key), w in exp.items():
            if c != comp:
                continue
            k = key if comp == "unet" or key in sd else key[len("text_model."):]
            assert torch.allclose(sd[k].float(), w, atol=1e-5, rtol=1e-4), key
            n += 1
        assert n


@pytest.mark.parametrize("name", ["sd1_loha.safetensors", "sd1_locon_tucker.safetensors", "sd1_kohya_locon.safetensors"])
def test_lycoris_modules_load_the_output(tmp_path, sd1_pipe, name):
    """lycoris-lora's module classes, built on the real layers and loaded with the written tensors, change
    each layer's output by exactly our ΔW."""
    import torch.nn.functional as F

    lyco = pytest.importorskip("lycoris.modules")
    out = tmp_path / "l.safetensors"
    run(AD / name, "--to", "lycoris", "-o", out)
    af = open_adapter(out)
    af.resolve(base_index("sd1"))
    g = torch.Generator().manual_seed(0)
    n = 0
    for lm in af.parsed:
        comp, module = lm.target.component, lm.target.module
        root = getattr(sd1_pipe, comp)
        path = module if comp == "unet" else module[len("text_model."):]
        layer = root.get_submodule(path)
        t = lm.module.tensors
        alpha = float(t["alpha"])
        if lm.module.algo == "loha":
            mod = lyco.LohaModule("x", layer, 1.0, lora_dim=lm.module.rank, alpha=alpha, use_tucker="hada_t1" in t)
        else:
            mod = lyco.LoConModule("x", layer, 1.0, lora_dim=lm.module.rank, alpha=alpha,
                                   use_tucker="lora_mid.weight" in t)
        missing, unexpected = mod.load_state_dict({k: v.float() for k, v in t.items()}, strict=False)
        assert not unexpected and not [m for m in missing if not m.startswith("org_")], (missing, unexpected)
        if isinstance(layer, torch.nn.Linear):
            x = torch.randn(2, layer.in_features, generator=g)
            run_d = lambda d: F.linear(x, d)
        else:
            x = torch.randn(1, layer.in_channels, 8, 8, generator=g)
            run_d = lambda d: F.conv2d(x, d, None, layer.stride, layer.padding, layer.dilation, layer.groups)
        with torch.no_grad():
            ref = mod(x) - layer(x)
            got = run_d(lm.module.delta(tuple(layer.weight.shape)))
        assert torch.allclose(got, ref, atol=1e-5, rtol=1e-4), lm.name
        n += 1
    assert n == len(af.parsed) > 0


# ------------------------------------------------------------------------------------------------
# refusals, algorithm changes, AdaLoRA
# ------------------------------------------------------------------------------------------------


def test_peft_lokr_refuses_what_one_config_cannot_hold(tmp_path):
    """PEFT lays out every LoKr module from one config (use_effective_conv2d, decompose_factor): a file mixing
    Tucker and plain k×k convs has no PEFT form."""
    plain, tucker = raw(AD / "sd1_lokr.safetensors"), raw(AD / "sd1_lokr_tucker.safetensors")
    m = "lora_unet_down_blocks_0_downsamplers_0_conv"
    mixed = dict(plain, **{k: v for k, v in tucker.items() if k.startswith(m + ".")})
    save_file(mixed, str(tmp_path / "mixed.safetensors"))
    res = run(tmp_path / "mixed.safetensors", "--to", "peft", "-o", tmp_path / "out", code=2)
    assert "use_effective_conv2d" in res.output and not (tmp_path / "out").exists()


@pytest.mark.parametrize("name,target", [("sd1_loha.safetensors", "diffusers"), ("sd1_lokr.safetensors", "diffusers"),
                                         ("sd1_locon_tucker.safetensors", "kohya"), ("sd1_dora.safetensors", "diffusers")])
def test_refused_conversion_exits_2_without_output(tmp_path, name, target):
    out = tmp_path / "out.safetensors"
    res = run(AD / name, "--to", target, "-o", out, code=2)
    assert "--algo lora" in res.output and "lycotools: error:" in res.output
    assert not out.exists() and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("name", ["sd1_loha.safetensors", "sd1_lokr.safetensors", "sd1_locon_tucker.safetensors",
                                  "sd1_loha_tucker.safetensors", "sd1_full.safetensors"])
def test_algo_lora_full_rank_is_exact_and_loads_in_diffusers(tmp_path, name, sd1_pipe):
    out = tmp_path / "lora.safetensors"
    rep = tmp_path / "rep.json"
    run(AD / name, "--to", "diffusers", "--algo", "lora", "--rank", "64", "-o", out, "--report", rep,
              "--base", FIX / "sd1" / "base.safetensors",
              *(["--drop-unsupported"] if "full" in name else []))
    doc = json.loads(rep.read_text())
    assert doc["layers"] and all(l["algo_out"] == "lora" for l in doc["layers"])
    assert doc["worst_rel_error"] < 1e-5
    src, dst = deltas(AD / name), deltas(out)
    for k, d in dst.items():
        assert torch.allclose(d, src[k], atol=1e-5 * float(src[k].abs().max()) + 1e-7), k
    pipe = sd1_pipe
    pipe.load_lora_weights(str(out), adapter_name="x")
    pipe.unload_lora_weights()


def test_algo_lora_low_rank_reports_the_loss(tmp_path):
    out = tmp_path / "lora.safetensors"
    rep = tmp_path / "rep.json"
    res = run(AD / "sd1_loha.safetensors", "--to", "kohya", "--algo", "lora", "--rank", "1", "-o", out, "--report", rep,
              "--base", FIX / "sd1" / "base.safetensors")
    doc = json.loads(rep.read_text())
    assert doc["lossy_layers"] > 0 and doc["worst_rel_error"] > 0.01
    assert "lossy" in res.output
    ranks = {t.shape[0] for k, t in raw(out).items() if k.endswith("lora_down.weight")}
    assert ranks == {1}


def test_dora_to_lora_needs_and_uses_the_base(tmp_path):
    out = tmp_path / "d.safetensors"
    res = run(AD / "sd1_dora.safetensors", "--to", "kohya", "--algo", "lora", "--rank", "64", "-o", out, code=2)
    assert "--base" in res.output and not out.exists()
    run(AD / "sd1_dora.safetensors", "--to", "kohya", "--algo", "lora", "--rank", "64", "-o", out,
        "--base", FIX / "sd1" / "base.safetensors")
    from lycotools.adapter_file import AdapterFile
    from lycotools.layouts.model_index import ModelIndex
    from lycotools.layouts.model_view import CheckpointView

    view = CheckpointView.open(FIX / "sd1" / "base.safetensors")
    af = AdapterFile.open(AD / "sd1_dora.safetensors")
    af.resolve(ModelIndex.template("sd1"))
    got = deltas(out)
    for lm in af.parsed:
        w = view.get(lm.target.component, lm.target.module + ".weight").float()
        merged, _ = lm.module.apply(w)
        d = got[(lm.target.component, lm.target.module)]
        assert torch.allclose(d, merged - w, atol=1e-5), lm.name


def test_peft_adalora_to_kohya_same_delta(tmp_path):
    out = tmp_path / "a.safetensors"
    run(AD / "sd1_peft_adalora", "--to", "kohya", "-o", out)
    src, dst = deltas(AD / "sd1_peft_adalora"), deltas(out)
    nonzero = {k for k, d in src.items() if d.abs().max() > 0}
    assert nonzero and set(dst) == nonzero
    for k in dst:
        assert torch.allclose(dst[k], src[k], atol=1e-7, rtol=1e-5), k


def test_trained_peft_adalora_to_kohya_matches_peft(tmp_path, sd1_pipe):
    """An AdaLoRA adapter trained a few steps with PEFT on the tiny UNet converts to kohya with PEFT's ΔW."""
    import copy

    from peft import AdaLoraConfig, get_peft_model

    unet = copy.deepcopy(sd1_pipe.unet)
    cfg = AdaLoraConfig(init_r=4, target_r=2, lora_alpha=8, target_modules=["to_q", "to_v"], tinit=1, tfinal=1,
                        deltaT=1, total_step=4, init_lora_weights=True)
    pm = get_peft_model(unet, cfg)
    opt = torch.optim.Adam([p for p in pm.parameters() if p.requires_grad], lr=1e-2)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, 8, 8, generator=g)
    enc = torch.randn(1, 3, 32, generator=g)
    for step in range(4):
        opt.zero_grad()
        out = pm(x, torch.tensor([10]), encoder_hidden_states=enc).sample
        loss = out.square().mean()
        loss.backward()
        opt.step()
        pm.base_model.update_and_allocate(step)
    folder = tmp_path / "ada"
    pm.save_pretrained(str(folder))
    ref = {}
    for name, mod in pm.base_model.model.named_modules():
        if hasattr(mod, "get_delta_weight") and "default" in getattr(mod, "lora_A", {}):
            ref[name] = mod.get_delta_weight("default").detach().float()
    assert ref
    out = tmp_path / "k.safetensors"
    run(folder, "--to", "kohya", "-o", out)
    got = deltas(out)
    n = 0
    for name, d in ref.items():
        key = ("unet", name)
        if key not in got:
            assert d.abs().max() == 0, name  # pruned to rank 0: nothing to write
            continue
        assert torch.allclose(got[key], d.reshape(got[key].shape), atol=1e-6, rtol=1e-3), name
        n += 1
    assert n


# ------------------------------------------------------------------------------------------------
# checkpoints
# ------------------------------------------------------------------------------------------------


def _unet_out(unet):
    g = torch.Generator().manual_seed(0)
    cfg = unet.config
    x = torch.randn(1, cfg.in_channels, 8, 8, generator=g)
    ctx = torch.randn(1, 3, cfg.cross_attention_dim, generator=g)
    kw = {}
    if cfg.addition_embed_type == "text_time":
        pooled = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
        kw["added_cond_kwargs"] = {"text_embeds": torch.randn(1, pooled, generator=g),
                                   "time_ids": torch.tensor([[8.0, 8.0, 0.0, 0.0, 8.0, 8.0]])}
    with torch.no_grad():
        return unet(x, torch.tensor([10]), encoder_hidden_states=ctx, **kw).sample


def test_sd1_single_file_diffusers_round_trip_and_pipeline(tmp_path):
    from diffusers import StableDiffusionPipeline

    # a fresh reference: the shared sd1_pipe has had LoRAs fused and unfused (float residue)
    sd1_pipe = StableDiffusionPipeline.from_pretrained(str(SD1_PIPE), safety_checker=None, requires_safety_checker=False)

    src = FIX / "sd1" / "base.safetensors"
    folder = tmp_path / "sd1_diffusers"
    run(src, "--to", "diffusers", "-o", folder, "--config", SD1_PIPE)
    back = tmp_path / "back.safetensors"
    run(folder, "--to", "single-file", "-o", back, "--no-date")
    a, b = raw(src), raw(back)
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    pipe = StableDiffusionPipeline.from_pretrained(str(folder), safety_checker=None, requires_safety_checker=False)
    assert torch.equal(_unet_out(pipe.unet), _unet_out(sd1_pipe.unet))
    for comp in ("vae", "text_encoder"):
        ref = getattr(sd1_pipe, comp).state_dict()
        got = getattr(pipe, comp).state_dict()
        assert sorted(ref) == sorted(got) and all(torch.equal(ref[k], got[k]) for k in ref), comp
    ids = pipe.tokenizer(["a photo"], return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(pipe.text_encoder(ids)[0], sd1_pipe.text_encoder(ids)[0])


def test_sdxl_single_file_diffusers_round_trip_and_unet_output(tmp_path):
    import importlib.util

    from diffusers import UNet2DConditionModel

    src = FIX / "sdxl" / "base.safetensors"
    inferred = tmp_path / "inferred"
    res = run(src, "--to", "diffusers", "-o", inferred)
    assert "inferred from shapes" in res.output
    back = tmp_path / "back.safetensors"
    run(inferred, "--to", "single-file", "-o", back)
    a, b = raw(src), raw(back)
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    # the fixture's true UNet config (head counts cannot be read from shapes) as --config
    spec = importlib.util.spec_from_file_location("make_fixtures", FIX / "make_fixtures.py")
    mf = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mf)
    UNet2DConditionModel(**mf.SDXL_UNET).save_config(str(inferred / "unet"))
    exact = tmp_path / "exact"
    run(src, "--to", "diffusers", "-o", exact, "--config", inferred)
    unet = UNet2DConditionModel.from_pretrained(str(exact / "unet"))
    ref = UNet2DConditionModel(**mf.SDXL_UNET)
    from lycotools.layouts.checkpoint import single_to_diffusers_state_dicts

    ref.load_state_dict(single_to_diffusers_state_dicts(a, "sdxl")["unet"])
    assert all(torch.equal(v, ref.state_dict()[k]) for k, v in unet.state_dict().items())
    out = _unet_out(unet)
    # same weights; CPU kernels depend on memory alignment (mmap vs fresh tensors), so outputs may differ ~1e-7
    assert torch.allclose(out, _unet_out(ref), atol=1e-5, rtol=1e-5)
    # diffusers' own single-file loader on our single file, with the local config: the same weights
    ref2 = UNet2DConditionModel.from_single_file(str(back), config=str(exact), subfolder="unet")
    assert all(torch.equal(v, ref2.state_dict()[k]) for k, v in unet.state_dict().items())
    assert torch.allclose(_unet_out(ref2), out, atol=1e-5, rtol=1e-5)


def test_checkpoint_dtype_prune_and_pickle(tmp_path):
    from safetensors.torch import save_file

    base = raw(FIX / "sd1" / "base.safetensors")
    out = tmp_path / "p.safetensors"
    run(FIX / "sd1" / "base_pickle.ckpt", "--to", "single-file", "-o", out)
    got = raw(out)
    assert sorted(got) == sorted(base)  # the pickle holds base.safetensors cast to fp16
    assert all(torch.equal(got[k], base[k].half() if base[k].is_floating_point() else base[k]) for k in base)
    dirty = dict(base, **{"model_ema.decay": torch.tensor(0.999), "alphas_cumprod": torch.rand(1000),
                          "model_ema.diffusion_modelinput_blocks00weight": torch.rand(3)})
    save_file(dirty, str(tmp_path / "dirty.safetensors"))
    half = tmp_path / "half.safetensors"
    run(tmp_path / "dirty.safetensors", "--to", "single-file", "--prune", "--dtype", "fp16", "-o", half)
    got = raw(half)
    assert sorted(got) == sorted(base)
    for k, t in base.items():
        assert torch.equal(got[k], t.half() if t.is_floating_point() else t), k
    f8 = tmp_path / "f8"
    run(FIX / "sd1" / "base.safetensors", "--to", "diffusers", "--dtype", "fp8_e4m3fn", "-o", f8, "--config", SD1_PIPE)
    u = raw(f8 / "unet" / "diffusion_pytorch_model.safetensors")
    assert {t.dtype for t in u.values()} == {torch.float8_e4m3fn}
    # fp8 saturates like merge's cast: torch 2.13 already clamps e4m3fn, but a plain cast to e5m2
    # turns anything past ±57344 into ±inf
    big = dict(base)
    k0 = next(k for k, t in base.items() if t.is_floating_point() and t.numel() > 1)
    big[k0] = base[k0].clone().float()
    big[k0].view(-1)[:2] = torch.tensor([1e6, -1e6])
    save_file(big, str(tmp_path / "big.safetensors"))
    for name, top in (("fp8_e4m3fn", 448.0), ("fp8_e5m2", 57344.0)):
        run(tmp_path / "big.safetensors", "--to", "single-file", "--dtype", name, "-o", tmp_path / f"{name}.safetensors")
        got = raw(tmp_path / f"{name}.safetensors")[k0].float().view(-1)
        assert got[:2].tolist() == [top, -top] and got.isfinite().all(), name


def test_checkpoint_refusals(tmp_path):
    res = run(FIX / "sd1" / "base.safetensors", "--to", "kohya", "-o", tmp_path / "x.safetensors", code=2)
    assert "checkpoint" in res.output
    res = run(FIX / "sdxl" / "base.safetensors", "--to", "diffusers", "-o", tmp_path / "y", "--config", SD1_PIPE, code=2)
    assert not (tmp_path / "y").exists() and [p for p in tmp_path.iterdir()] == []


# ------------------------------------------------------------------------------------------------
# embeddings
# ------------------------------------------------------------------------------------------------


def _embedding(path):
    from lycotools.io.readers import open_source
    from lycotools.layouts.embeddings import detect_embedding

    src = open_source(path)
    info = detect_embedding(src)
    token = info.token or src.metadata.get("lycotools.token")
    return info.format, token, {k: src.get(v) for k, v in info.keys.items()}


@pytest.mark.parametrize("name,token", [("a1111.pt", "tinyemb"), ("diffusers_learned_embeds.safetensors", "<tiny-tok>"),
                                        ("kohya.safetensors", "kohya")])
def test_embedding_round_trips_keep_token(tmp_path, name, token):
    src = FIX / "embeddings" / name
    _, _, ref = _embedding(src)
    cur = src
    for i, to in enumerate(["a1111", "kohya", "diffusers", "a1111", "diffusers", "kohya", "a1111"]):
        out = tmp_path / f"{i}_{to}{'.pt' if to == 'a1111' else '.safetensors'}"
        run(cur, "--to", to, "-o", out)
        fmt, tok, vec = _embedding(out)
        assert fmt == to and tok == token, (to, tok)
        assert torch.equal(vec["vectors"], ref["vectors"])
        cur = out
    doc = torch.load(str(cur), weights_only=True)  # plain dicts and tensors only
    assert doc["name"] == token and set(doc["string_to_param"]) == {"*"}


def test_embedding_token_option_and_sdxl(tmp_path):
    out = tmp_path / "e.safetensors"
    run(FIX / "embeddings" / "a1111.pt", "--to", "diffusers", "--token", "<new>", "-o", out)
    assert list(raw(out)) == ["<new>"]
    sd = tmp_path / "x.safetensors"
    run(FIX / "embeddings" / "sdxl.safetensors", "--to", "sdxl", "--token", "xl-tok", "-o", sd)
    fmt, tok, vec = _embedding(sd)
    ref = raw(FIX / "embeddings" / "sdxl.safetensors")
    assert fmt == "sdxl" and tok == "xl-tok" and torch.equal(vec["clip_l"], ref["clip_l"]) and torch.equal(vec["clip_g"], ref["clip_g"])
    bad = tmp_path / "bad.pt"
    run(FIX / "embeddings" / "sdxl.safetensors", "--to", "a1111", "-o", bad, code=2)
    run(FIX / "embeddings" / "kohya.safetensors", "--to", "sdxl", "-o", bad, code=2)
    assert not bad.exists()


@pytest.mark.parametrize("to", ["a1111", "diffusers", "kohya"])
def test_embedding_loads_with_load_textual_inversion(tmp_path, sd1_pipe, to):
    out = tmp_path / ("e.pt" if to == "a1111" else "e.safetensors")
    run(FIX / "embeddings" / "a1111.pt", "--to", to, "-o", out)
    _, _, ref = _embedding(FIX / "embeddings" / "a1111.pt")
    pipe = sd1_pipe
    kw = {"token": "tinyemb"} if to == "kohya" else {}
    pipe.load_textual_inversion(str(out), **kw)
    try:
        ids = pipe.tokenizer.convert_tokens_to_ids(["tinyemb", "tinyemb_1"])
        emb = pipe.text_encoder.get_input_embeddings().weight
        assert torch.equal(emb[ids].detach(), ref["vectors"].to(emb.dtype))
    finally:
        pipe.unload_textual_inversion()


# ------------------------------------------------------------------------------------------------
# batch, determinism, help
# ------------------------------------------------------------------------------------------------


def test_batch_folder_skips_done_and_survives_a_bad_file(tmp_path):
    import shutil

    src = tmp_path / "in"
    src.mkdir()
    for n in ("sd1_kohya_lora.safetensors", "sd1_loha.safetensors", "sdxl_kohya_lora.safetensors"):
        shutil.copy(AD / n, src / n)
    out = tmp_path / "out"
    res = run(src, "--to", "diffusers", "-o", out, code=2)  # LoHa cannot go to diffusers: that file fails
    assert (out / "sd1_kohya_lora.safetensors").exists() and (out / "sdxl_kohya_lora.safetensors").exists()
    assert not (out / "sd1_loha.safetensors").exists()
    assert "--algo lora" in res.output
    res = run(src, "--to", "diffusers", "-o", out, "--drop-unsupported", code=2)
    assert "skipped" in res.output


def test_same_inputs_same_bytes(tmp_path):
    (tmp_path / "1").mkdir()
    (tmp_path / "2").mkdir()
    a, b = tmp_path / "1" / "x.safetensors", tmp_path / "2" / "x.safetensors"  # the name goes in the metadata
    for p in (a, b):
        run(AD / "sd1_loha.safetensors", "--to", "kohya", "--algo", "lora", "--rank", "2", "--no-date", "-o", p,
            "--base", FIX / "sd1" / "base.safetensors")
    assert a.read_bytes() == b.read_bytes()


def test_help_has_examples():
    res = CliRunner().invoke(main, ["convert", "--help"])
    assert res.exit_code == 0 and "Examples:" in res.output and "--to" in res.output


# ------------------------------------------------------------------------------------------------
# ControlNet layouts
# ------------------------------------------------------------------------------------------------


def test_controlnet_diffusers_original_round_trip(tmp_path):
    """diffusers ControlNetModel -> original layout (checked with diffusers' own single-file loader) -> back."""
    from diffusers import ControlNetModel, UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(str(SD1_PIPE / "unet"))
    cn = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(4, 4, 8, 8))  # SD's 4-stage hint net
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in cn.parameters():  # zero convs start at zero: make every tensor distinct
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    d = tmp_path / "cn_diffusers"
    cn.save_pretrained(str(d))
    orig = tmp_path / "cn.safetensors"
    run(d, "--to", "single-file", "-o", orig)
    keys = raw(orig)
    assert all(k.startswith("control_model.") for k in keys)
    assert "control_model.zero_convs.0.0.weight" in keys and "control_model.middle_block_out.0.bias" in keys
    assert "control_model.input_hint_block.0.weight" in keys and "control_model.input_hint_block.14.weight" in keys
    ref = cn.state_dict()
    theirs = ControlNetModel.from_single_file(str(orig), config=str(d)).state_dict()
    assert sorted(theirs) == sorted(ref) and all(torch.equal(theirs[k], ref[k]) for k in ref)
    back = tmp_path / "back"
    run(orig, "--to", "diffusers", "-o", back)  # config inferred from the shapes
    got = ControlNetModel.from_pretrained(str(back)).state_dict()
    assert sorted(got) == sorted(ref) and all(torch.equal(got[k], ref[k]) for k in ref)
    again = tmp_path / "again.safetensors"
    run(back, "--to", "single-file", "-o", again)
    a, b = raw(orig), raw(again)
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)

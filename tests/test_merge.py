"""lycotools merge: bake (every algorithm, against lycoris forward and diffusers fuse_lora), adapter+adapter
(concat exact, SVD optimal), checkpoint+checkpoint, layouts (SDXL in_proj thirds, diffusers folders), bad input."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open
from safetensors.torch import load_file

from lycotools.adapter_file import AdapterFile
from lycotools.commands.merge import command as merge_cmd
from lycotools.io.readers import open_source
from lycotools.layouts import checkpoint as ckpt
from lycotools.layouts.model_index import ModelIndex
from lycotools.ops import merge as M

os.environ.setdefault("HF_HUB_OFFLINE", "1")
FIX = Path(__file__).resolve().parent.parent / "fixtures"
SD1 = FIX / "sd1" / "base.safetensors"
SDXL = FIX / "sdxl" / "base.safetensors"
AD = FIX / "adapters"
RATIO = 0.7


def dd(sd, arch):
    """Single-file state dict -> {(component, diffusers key): tensor}."""
    out = {}
    for comp, d in ckpt.single_to_diffusers_state_dicts(sd, arch).items():
        for k, v in d.items():
            out[(comp, k)] = v
    return out


@pytest.fixture(scope="module")
def sd1_base():
    return load_file(SD1)


@pytest.fixture(scope="module")
def sd1_index():
    return ModelIndex.from_source(open_source(SD1))


def bake(tmp_path, specs, ckpt_path=SD1, name="out.safetensors", **kw):
    out = tmp_path / name
    M.bake(str(ckpt_path), [(str(p), r) for p, r in specs], out, M.BakeOptions(no_date=True, **kw), quiet=True)
    return out


# ------------------------------------------------------------------------------------------------
# reference ΔW, written here from the formulas (docs/adapters.md#summary), independent of lycotools.adapters
# ------------------------------------------------------------------------------------------------


def ref_merged(t: dict, W: torch.Tensor, m: float) -> torch.Tensor | None:
    W = W.float()
    shape = W.shape
    out = shape[0]
    if "lora_up.weight" in t and "lora_mid.weight" not in t and "bias_values" not in t:
        up, down = t["lora_up.weight"].float(), t["lora_down.weight"].float()
        r = down.shape[0]
        s = float(t["alpha"]) / r if "alpha" in t else 1.0
        d = (up.reshape(out, r) @ down.reshape(r, -1)).reshape(shape) * s
        if "dora_scale" in t:
            V = W + d
            n = V.reshape(out, -1).norm(dim=1).reshape(out, *([1] * (W.dim() - 1))) + torch.finfo(torch.float32).eps
            sc = t["dora_scale"].float().reshape(n.shape) / n
            sc = m * (sc - 1) + 1
            return V * sc
        return W + m * d
    if "lora_mid.weight" in t:
        up, mid, down = t["lora_up.weight"].float(), t["lora_mid.weight"].float(), t["lora_down.weight"].float()
        r = down.shape[0]
        s = float(t["alpha"]) / r
        d = torch.einsum("oa,abhw,bc->ochw", up.reshape(out, r), mid, down.reshape(r, -1))
        return W + m * s * d.reshape(shape)
    if "hada_w1_a" in t and "hada_t1" not in t:
        r = t["hada_w1_b"].shape[0]
        s = float(t["alpha"]) / r
        d = (t["hada_w1_a"].float() @ t["hada_w1_b"].float()) * (t["hada_w2_a"].float() @ t["hada_w2_b"].float())
        return W + m * s * d.reshape(shape)
    if any(k.startswith("lokr_") for k in t) and "lokr_t2" not in t:
        w1 = t["lokr_w1"].float() if "lokr_w1" in t else t["lokr_w1_a"].float() @ t["lokr_w1_b"].float()
        if "lokr_w2" in t:
            w2 = t["lokr_w2"].float()
        else:
            w2 = t["lokr_w2_a"].float() @ t["lokr_w2_b"].float()
        decomposed = any(k in t for k in ("lokr_w1_a", "lokr_w2_a"))
        r = (t["lokr_w1_b"] if "lokr_w1_b" in t else t["lokr_w2_b"]).shape[0] if decomposed else None
        s = float(t["alpha"]) / r if decomposed else 1.0
        if W.dim() == 4:
            w2 = w2.reshape(w2.shape[0], -1, *shape[2:]) if w2.dim() == 2 else w2
            d = torch.kron(w1[:, :, None, None], w2)
        else:
            d = torch.kron(w1, w2)
        return W + m * s * d.reshape(shape)
    if "diff" in t:
        return W + m * t["diff"].float().reshape(shape)
    if "on_input" in t:
        w = t["weight"].float().reshape(-1)
        if int(t["on_input"]):
            return W * (1 + m * w).reshape(1, -1, *([1] * (W.dim() - 2)))
        return W * (1 + m * w).reshape(-1, *([1] * (W.dim() - 1)))
    if "w_norm" in t:
        return W + m * t["w_norm"].float().reshape(shape)
    return None


ALGO_FIXTURES = ["sd1_kohya_lora", "sd1_kohya_locon", "sd1_locon_tucker", "sd1_loha", "sd1_lokr", "sd1_dora",
                 "sd1_full", "sd1_ia3", "sd1_comfy_lora", "sd1_loha_tucker", "sd1_lokr_tucker"]


@pytest.mark.parametrize("name", ALGO_FIXTURES)
def test_bake_equals_base_plus_ratio_delta(tmp_path, sd1_base, sd1_index, name):
    path = AD / f"{name}.safetensors"
    out = bake(tmp_path, [(path, RATIO)])
    merged = load_file(out)
    base_d, out_d = dd(sd1_base, "sd1"), dd(merged, "sd1")
    af = AdapterFile.open(path).resolve(sd1_index)
    assert af.parsed and not af.unmatched
    touched = set()
    checked_ref = 0
    for lm in af.parsed:
        key = (lm.target.component, lm.target.module + ".weight")
        touched.add(key)
        W = base_d[key]
        exp = ref_merged(lm.module.tensors, W, RATIO)
        if exp is None:  # Tucker LoHa/LoKr: the shared module math (plumbing check)
            exp, _ = lm.module.apply(W, RATIO)
        else:
            checked_ref += 1
        torch.testing.assert_close(out_d[key], exp.to(out_d[key].dtype), rtol=1e-5, atol=1e-6)
        # full diffs also carry a bias delta
        if "diff_b" in lm.module.tensors and lm.target.has_bias:
            bkey = (lm.target.component, lm.target.module + ".bias")
            torch.testing.assert_close(out_d[bkey], base_d[bkey] + RATIO * lm.module.tensors["diff_b"].float())
            touched.add(bkey)
        if "b_norm" in lm.module.tensors:
            bkey = (lm.target.component, lm.target.module + ".bias")
            torch.testing.assert_close(out_d[bkey], base_d[bkey] + RATIO * lm.module.tensors["b_norm"].float())
            touched.add(bkey)
    if "tucker" not in name:
        assert checked_ref == len(af.parsed)
    # every other tensor is bit-identical; the file keeps every key
    assert set(merged) == set(sd1_base)
    for k, v in base_d.items():
        if k not in touched:
            assert torch.equal(out_d[k], v), k
    raw_touched = 0
    for k in sd1_base:
        if not torch.equal(merged[k], sd1_base[k]):
            raw_touched += 1
    assert 0 < raw_touched <= len(touched)


def _lycoris_linear(cls, name, W, b, args, m):
    lin = torch.nn.Linear(W.shape[1], W.shape[0])
    with torch.no_grad():
        lin.weight.copy_(W)
        lin.bias.copy_(b)
        mod = cls.make_module_from_state_dict(name, lin, *args)
    mod.multiplier = m
    mod.apply_to()
    with torch.no_grad():
        return (lin(torch.eye(W.shape[1])) - b).T


def test_bake_matches_lycoris_forward(tmp_path, sd1_base, sd1_index):
    """LoRA, LoHa, LoKr: the baked weight is what lycoris' forward pass computes (not its merge_to)."""
    from lycoris.modules import LoConModule, LohaModule, LokrModule

    base_d = dd(sd1_base, "sd1")
    n = 0
    for fname, cls in (("sd1_kohya_lora", LoConModule), ("sd1_loha", LohaModule), ("sd1_lokr", LokrModule)):
        path = AD / f"{fname}.safetensors"
        out_d = dd(load_file(bake(tmp_path, [(path, RATIO)], name=f"{fname}.safetensors")), "sd1")
        af = AdapterFile.open(path).resolve(sd1_index)
        for lm in af.parsed:
            if len(lm.target.shape) != 2 or not lm.target.has_bias:
                continue
            t = lm.module.tensors
            g = t.get
            if cls is LoConModule:
                args = (g("lora_up.weight"), g("lora_down.weight"), None, g("alpha"), None)
            elif cls is LohaModule:
                args = (g("hada_w1_a"), g("hada_w1_b"), g("hada_w2_a"), g("hada_w2_b"), None, None, g("alpha"), None)
            else:
                args = (g("lokr_w1"), g("lokr_w1_a"), g("lokr_w1_b"), g("lokr_w2"), g("lokr_w2_a"), g("lokr_w2_b"),
                        None, None, g("alpha"), None)
            key = (lm.target.component, lm.target.module + ".weight")
            bkey = (lm.target.component, lm.target.module + ".bias")
            exp = _lycoris_linear(cls, lm.name, base_d[key], base_d[bkey], args, RATIO)
            torch.testing.assert_close(out_d[key], exp, rtol=1e-5, atol=1e-5)
            n += 1
    assert n >= 3


def test_several_adapters_in_order_and_metadata(tmp_path, sd1_base, sd1_index):
    a, b = AD / "sd1_kohya_lora.safetensors", AD / "sd1_loha.safetensors"
    out = bake(tmp_path, [(a, 0.5), (b, -0.3)])
    out_d, base_d = dd(load_file(out), "sd1"), dd(sd1_base, "sd1")
    exp = dict(base_d)
    for p, r in ((a, 0.5), (b, -0.3)):
        for lm in AdapterFile.open(p).resolve(sd1_index).parsed:
            key = (lm.target.component, lm.target.module + ".weight")
            exp[key] = ref_merged(lm.module.tensors, exp[key], r)
    for k in exp:
        torch.testing.assert_close(out_d[k], exp[k], rtol=1e-5, atol=1e-6)
    meta = safe_open(str(out), "pt").metadata()
    assert meta["modelspec.merged_from"] == "base.safetensors, sd1_kohya_lora.safetensors, sd1_loha.safetensors"
    recipe = json.loads(meta["lycotools.merge.recipe"])
    assert recipe["adapters"] == [{"name": a.name, "ratio": 0.5}, {"name": b.name, "ratio": -0.3}]
    assert re.fullmatch("[0-9a-f]{64}", meta["sshs_model_hash"]) and meta["lycotools.command"] == "merge"


def test_sdxl_te2_lora_lands_in_in_proj_thirds(tmp_path):
    base = load_file(SDXL)
    path = AD / "sdxl_kohya_lora.safetensors"
    out = load_file(bake(tmp_path, [(path, 1.0)], ckpt_path=SDXL))
    key = "conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight"
    W0, W1 = base[key], out[key]
    rows = W0.shape[0] // 3
    sd = load_file(path)
    p = "lora_te2_text_model_encoder_layers_0_self_attn_"
    for i, proj in enumerate(("q", "k", "v")):
        got = W1[i * rows:(i + 1) * rows]
        orig = W0[i * rows:(i + 1) * rows]
        if proj == "k":
            assert torch.equal(got, orig)
            continue
        t = {k[len(p + proj + "_proj."):]: v for k, v in sd.items() if k.startswith(p + proj + "_proj.")}
        torch.testing.assert_close(got, ref_merged(t, orig, 1.0))
    # one raw tensor per targeted weight changed (q and v share in_proj_weight); the rest bit-identical
    idx = ModelIndex.from_source(open_source(SDXL))
    af = AdapterFile.open(path).resolve(idx)
    targeted = {idx.single_key(lm.target).single_key for lm in af.parsed}
    assert len(targeted) == len(af.parsed) - 1
    for k in base:
        if k in targeted:
            assert not torch.equal(out[k], base[k]), k
        else:
            assert torch.equal(out[k], base[k]), k


def test_bad_adapter_for_other_arch_exit_2_nothing_written(tmp_path):
    out = tmp_path / "x.safetensors"
    r = CliRunner().invoke(merge_cmd, [str(SD1), str(AD / "sdxl_kohya_lora.safetensors"), "-o", str(out), "-q"])
    assert r.exit_code == 2, r.output
    assert "sdxl" in r.output and "lycotools: error:" in r.output
    assert not out.exists() and not list(tmp_path.iterdir())


def test_allow_partial_warns_and_merges_the_rest(tmp_path):
    out = tmp_path / "x.safetensors"
    r = CliRunner().invoke(merge_cmd, [str(SD1), str(AD / "sdxl_kohya_lora.safetensors"), "-o", str(out),
                                       "--allow-partial", "-q"])
    assert r.exit_code == 0, r.output
    assert "warning: skipped" in r.output and out.exists()


def test_block_weights(tmp_path, sd1_base):
    lora = AD / "sd1_kohya_lora.safetensors"
    only_te = ",".join(["1"] + ["0"] * 16)
    out = load_file(bake(tmp_path, [(lora, 1.0)], block_weights=(only_te,)))
    full = load_file(bake(tmp_path, [(lora, 1.0)], name="full.safetensors"))
    for k in sd1_base:
        if k.startswith("model.diffusion_model."):
            assert torch.equal(out[k], sd1_base[k]), k
        else:
            assert torch.equal(out[k], full[k]), k
    # preset names and wrong lengths
    def on(preset):  # slots the preset sets to 1 (slots a 17-value list does not name stay 1, as in LBW)
        return {M.SLOTS[i] for i, v in enumerate(M.parse_block_weights(preset, "sd1")) if v == 1} - unnamed

    unnamed = {"IN00", "IN03", "IN06", "IN09", "IN10", "IN11", "OUT00", "OUT01", "OUT02"}
    assert on("INS") == {"BASE", "IN01", "IN02", "IN04"}
    assert on("INALL") == {"BASE", "IN01", "IN02", "IN04", "IN05", "IN07", "IN08"}
    assert on("MIDD") == {"BASE", "IN05", "IN07", "IN08", "MID", "OUT03", "OUT04", "OUT05", "OUT06"}
    assert on("OUTD") == {"BASE", "OUT03", "OUT04", "OUT05", "OUT06"}
    assert on("OUTS") == {"BASE", "OUT07", "OUT08", "OUT09", "OUT10", "OUT11"}
    assert on("OUTALL") == {"BASE"} | {f"OUT{i:02d}" for i in range(3, 12)}
    assert set(M.parse_block_weights("all0.5", "sd1")) == {0.5, 1.0}
    assert M.parse_block_weights("ALL", "sdxl") == [1.0] * 26
    r = CliRunner().invoke(merge_cmd, [str(SD1), str(lora), "-o", str(tmp_path / "y.safetensors"),
                                       "--block-weights", "1,1,1", "-q"])
    assert r.exit_code == 2 and not (tmp_path / "y.safetensors").exists()
    r = CliRunner().invoke(merge_cmd, [str(SD1), str(lora), "-o", str(tmp_path / "y.safetensors"),
                                       "--block-weights", ",".join(["1"] * 12), "-q"])
    assert r.exit_code == 2


def test_dtype_fp8_and_determinism(tmp_path):
    lora = AD / "sd1_kohya_lora.safetensors"
    (tmp_path / "1").mkdir()
    (tmp_path / "2").mkdir()
    a = bake(tmp_path / "1", [(lora, 1.0)], dtype="fp16")
    b = bake(tmp_path / "2", [(lora, 1.0)], dtype="fp16")
    assert a.read_bytes() == b.read_bytes()
    c = bake(tmp_path, [(lora, 1.0)], name="c.safetensors", dtype="fp8_e4m3fn")
    with safe_open(str(c), "pt") as f:
        t = f.get_tensor("model.diffusion_model.input_blocks.1.1.proj_in.weight")
        assert t.dtype == torch.float8_e4m3fn
        assert f.get_tensor("cond_stage_model.transformer.text_model.embeddings.position_ids").dtype == torch.int64 \
            if "cond_stage_model.transformer.text_model.embeddings.position_ids" in f.keys() else True


def test_diffusers_folder_bake_matches_single_file(tmp_path):
    lora = AD / "sd1_kohya_locon.safetensors"
    folder = tmp_path / "folder"
    M.bake(str(FIX / "sd1" / "diffusers"), [(str(lora), RATIO)], folder, M.BakeOptions(no_date=True), quiet=True)
    single = dd(load_file(bake(tmp_path, [(lora, RATIO)])), "sd1")
    src = open_source(folder)
    assert (folder / "model_index.json").exists() and (folder / "tokenizer").is_dir()
    n = 0
    for k in src.keys():
        comp, _, dk = k.partition(".")
        if (comp, dk) in single:
            torch.testing.assert_close(src.get(k), single[(comp, dk)].to(src.dtype(k)))
            n += 1
    assert n > 100


def _strip_peft(sd):
    out = {}
    for k, v in sd.items():
        if "lora_" in k:
            continue
        out[k.replace(".base_layer.", ".")] = v
    return out


def test_diffusers_fuse_lora_and_from_single_file(tmp_path):
    diffusers = pytest.importorskip("diffusers")
    lora = AD / "sd1_kohya_lora.safetensors"
    out = bake(tmp_path, [(lora, RATIO)])
    ours = ckpt.single_to_diffusers_state_dicts(load_file(out), "sd1")

    pipe = diffusers.StableDiffusionPipeline.from_pretrained(str(FIX / "sd1" / "diffusers"), safety_checker=None,
                                                             requires_safety_checker=False)
    unet_ref = diffusers.UNet2DConditionModel.from_pretrained(str(FIX / "sd1" / "diffusers"), subfolder="unet")
    pipe.load_lora_weights(str(lora))
    torch.manual_seed(0)
    x = torch.randn(1, pipe.unet.config.in_channels, 16, 16)
    enc = torch.randn(1, 7, pipe.unet.config.cross_attention_dim)
    pipe.set_adapters(pipe.get_active_adapters(), adapter_weights=[RATIO])
    with torch.no_grad():
        live = pipe.unet(x, 10, encoder_hidden_states=enc).sample
    pipe.set_adapters(pipe.get_active_adapters(), adapter_weights=[1.0])
    pipe.fuse_lora(lora_scale=RATIO)
    fused_unet = _strip_peft(pipe.unet.state_dict())
    fused_te = ckpt.canonical_te_state(_strip_peft(pipe.text_encoder.state_dict()))
    for k, v in fused_unet.items():
        torch.testing.assert_close(ours["unet"][k], v, rtol=1e-5, atol=1e-6, msg=k)
    # diffusers 0.42 + transformers 5 drop the CLIP attention (q/k/v/out) LoRA modules of a kohya file
    # (renamed to `to_q_lora`, reported UNEXPECTED): compare the TE weights diffusers did change (MLP).
    base_te = ckpt.single_to_diffusers_state_dicts(load_file(SD1), "sd1")["text_encoder"]
    changed = 0
    for k, v in fused_te.items():
        if k in base_te and not torch.equal(v, base_te[k]):
            torch.testing.assert_close(ours["text_encoder"][k], v, rtol=1e-5, atol=1e-6, msg=k)
            changed += 1
    assert changed >= 1
    # and the merged single file loads in diffusers and gives the live-adapter output
    unet = diffusers.UNet2DConditionModel.from_single_file(str(out), config=str(FIX / "sd1" / "diffusers"),
                                                           subfolder="unet")
    with torch.no_grad():
        got = unet(x, 10, encoder_hidden_states=enc).sample
        plain = unet_ref(x, 10, encoder_hidden_states=enc).sample
    torch.testing.assert_close(got, live, rtol=1e-4, atol=1e-5)
    assert (got - plain).abs().max() > 1e-4  # the adapter did something


# ------------------------------------------------------------------------------------------------
# adapter + adapter
# ------------------------------------------------------------------------------------------------


def _deltas(path, index, ratio=1.0):
    af = AdapterFile.open(path).resolve(index)
    return {(lm.target.component, lm.target.module):
            ratio * lm.module.delta(M._group_shape([(lm.module, ratio, path)], lm.target.shape)) for lm in af.parsed}


def test_concat_is_exact_sum(tmp_path):
    idx = ModelIndex.template("sd1")
    a, b = AD / "sd1_kohya_lora.safetensors", AD / "sd1_kohya_locon.safetensors"
    out = tmp_path / "ab.safetensors"
    M.merge_adapters([(str(a), 1.0), (str(b), 0.5)], out, M.AdapterMergeOptions(method="concat", dtype="fp32",
                                                                                  no_date=True), quiet=True)
    da, db, do = _deltas(a, idx), _deltas(b, idx, 0.5), _deltas(out, idx)
    assert set(do) == set(da) | set(db)
    for k, v in do.items():
        exp = da.get(k, 0) + db.get(k, 0)
        torch.testing.assert_close(v, exp, rtol=1e-5, atol=1e-6)
    sd = load_file(out)
    for k in sd:
        if k.endswith(".alpha"):
            assert float(sd[k]) == sd[k.replace(".alpha", ".lora_down.weight")].shape[0]
    # LoHa needs --densify for concat
    r = CliRunner().invoke(merge_cmd, ["--into-adapter", str(a), str(AD / "sd1_loha.safetensors"), "--method",
                                       "concat", "-o", str(tmp_path / "x.safetensors"), "-q"])
    assert r.exit_code == 2 and "--densify" in r.output
    out2 = tmp_path / "dens.safetensors"
    r = CliRunner().invoke(merge_cmd, ["--into-adapter", f"{a}:1", f"{AD / 'sd1_loha.safetensors'}:0.8", "--method",
                                       "concat", "--densify", "--dtype", "fp32", "-o", str(out2), "-q"])
    assert r.exit_code == 0, r.output
    dl = _deltas(AD / "sd1_loha.safetensors", idx, 0.8)
    for k, v in _deltas(out2, idx).items():
        torch.testing.assert_close(v, da.get(k, 0) + dl.get(k, 0), rtol=1e-4, atol=1e-5)


def test_svd_merge_is_best_rank_n(tmp_path):
    idx = ModelIndex.template("sd1")
    a, b = AD / "sd1_kohya_lora.safetensors", AD / "sd1_comfy_lora.safetensors"
    out = tmp_path / "svd.safetensors"
    N = 3
    res = M.merge_adapters([(str(a), 1.0), (str(b), 0.6)], out,
                           M.AdapterMergeOptions(method="svd", rank=N, dtype="fp32", no_date=True), quiet=True)
    da, db, do = _deltas(a, idx), _deltas(b, idx, 0.6), _deltas(out, idx)
    for k, v in do.items():
        S = torch.linalg.svdvals((da.get(k, 0) + db.get(k, 0)).reshape(v.shape[0], -1).double())
        got = torch.linalg.svdvals(v.reshape(v.shape[0], -1).double())
        n = min(N, S.numel())
        torch.testing.assert_close(got[:n], S[:n], rtol=1e-4, atol=1e-6)
        if got.numel() > n:
            assert float(got[n:].abs().max()) < 1e-5
    assert max(res.ranks.values()) <= N


def test_concat_mixed_conventions(tmp_path):
    """A PEFT folder and a kohya file go through name resolution and land on the same modules."""
    idx = ModelIndex.template("sd1")
    a, b = AD / "sd1_peft", AD / "sd1_kohya_lora.safetensors"
    out = tmp_path / "mix.safetensors"
    M.merge_adapters([(str(a), 0.5), (str(b), 1.0)], out, M.AdapterMergeOptions(method="concat", dtype="fp32",
                                                                                 no_date=True), quiet=True)
    da, db, do = _deltas(a, idx, 0.5), _deltas(b, idx), _deltas(out, idx)
    assert set(do) == set(da) | set(db)
    for k, v in do.items():
        torch.testing.assert_close(v, da.get(k, 0) + db.get(k, 0), rtol=1e-5, atol=1e-6)
    assert all(k.startswith(("lora_unet_", "lora_te_")) for k in load_file(out))


def test_budget_and_dora_refused(tmp_path):
    a, b = AD / "sd1_kohya_lora.safetensors", AD / "sd1_kohya_locon.safetensors"
    out = tmp_path / "b.safetensors"
    res = M.merge_adapters([(str(a), 1.0), (str(b), 1.0)], out,
                           M.AdapterMergeOptions(method="svd", budget="2000", no_date=True), quiet=True)
    n = sum(v.numel() for k, v in load_file(out).items() if not k.endswith("alpha"))
    assert 0 < n <= 2000 and res.modules > 0
    r = CliRunner().invoke(merge_cmd, ["--into-adapter", str(a), str(AD / "sd1_dora.safetensors"),
                                       "-o", str(tmp_path / "d.safetensors"), "-q"])
    assert r.exit_code == 2


# ------------------------------------------------------------------------------------------------
# checkpoint + checkpoint
# ------------------------------------------------------------------------------------------------


def test_model_merges(tmp_path, sd1_base):
    tuned = FIX / "sd1" / "tuned.safetensors"
    t = load_file(tuned)
    ws = tmp_path / "ws.safetensors"
    M.merge_models([str(SD1), str(tuned)], ws, M.ModelMergeOptions("weighted-sum", alpha=0.3, no_date=True), quiet=True)
    o = load_file(ws)
    for k, v in sd1_base.items():
        if v.is_floating_point():
            torch.testing.assert_close(o[k], (0.7 * v.float() + 0.3 * t[k].float()).to(v.dtype))
        else:
            assert torch.equal(o[k], v)
    ad = tmp_path / "ad.safetensors"
    M.merge_models([str(tuned), str(tuned), str(SD1)], ad, M.ModelMergeOptions("add-difference", alpha=0.5, no_date=True),
                   quiet=True)
    o = load_file(ad)
    for k, v in sd1_base.items():
        if v.is_floating_point():
            torch.testing.assert_close(o[k], t[k].float() + 0.5 * (t[k].float() - v.float()))
    # DARE: seeded and deterministic; drop_rate 0 is the plain sum of deltas
    d1, d2 = tmp_path / "1" / "d.safetensors", tmp_path / "2" / "d.safetensors"
    for p in (d1, d2):
        p.parent.mkdir()
        M.merge_models([str(SD1), str(tuned)], p, M.ModelMergeOptions("dare", alpha=1.0, drop_rate=0.5, seed=3,
                                                                      no_date=True), quiet=True)
    assert d1.read_bytes() == d2.read_bytes()
    d0 = tmp_path / "d0.safetensors"
    M.merge_models([str(SD1), str(tuned)], d0, M.ModelMergeOptions("dare", alpha=1.0, drop_rate=0.0, no_date=True),
                   quiet=True)
    o = load_file(d0)
    for k, v in t.items():
        if v.is_floating_point():
            torch.testing.assert_close(o[k], v)
    # mismatched architectures
    r = CliRunner().invoke(merge_cmd, ["--models", str(SD1), str(SDXL), "-o", str(tmp_path / "m.safetensors"), "-q"])
    assert r.exit_code == 2 and not (tmp_path / "m.safetensors").exists()


def test_ties_matches_sd_mecha_definition():
    torch.manual_seed(0)
    ds = [torch.randn(6, 5) for _ in range(3)]
    try:
        from sd_mecha.extensions.builtin.merge_methods.ties import ties_sum_deltas
    except Exception:  # pragma: no cover
        pytest.skip("sd-mecha not importable")
    for k in (1.0, 0.5, 0.2):
        fd, counts = ties_sum_deltas(*ds, k=k)
        ref = torch.nan_to_num(fd.sum(0) / counts, nan=0, posinf=0, neginf=0)
        torch.testing.assert_close(M._ties(ds, k), ref)


def test_each_batch(tmp_path):
    folder = tmp_path / "ads"
    folder.mkdir()
    for n in ("sd1_kohya_lora", "sd1_loha"):
        (folder / f"{n}.safetensors").write_bytes((AD / f"{n}.safetensors").read_bytes())
    (folder / "bad.safetensors").write_bytes((AD / "sdxl_kohya_lora.safetensors").read_bytes())
    outd = tmp_path / "out"
    r = CliRunner().invoke(merge_cmd, [str(SD1), str(folder), "-o", str(outd), "--each", "-q", "--no-date"])
    assert r.exit_code == 2, r.output
    assert sorted(p.name for p in outd.iterdir()) == ["sd1_kohya_lora.safetensors", "sd1_loha.safetensors"]


def test_device_cuda_without_cuda(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("CUDA present")
    r = CliRunner().invoke(merge_cmd, [str(SD1), str(AD / "sd1_kohya_lora.safetensors"), "-o",
                                       str(tmp_path / "c.safetensors"), "--device", "cuda", "-q"])
    assert r.exit_code == 2 and "CUDA" in r.output


def test_weighted_sum_matches_sd_mecha(tmp_path):
    sd_mecha = pytest.importorskip("sd_mecha")
    tuned = FIX / "sd1" / "tuned.safetensors"
    ref = tmp_path / "mecha.safetensors"
    recipe = sd_mecha.weighted_sum(sd_mecha.model(str(SD1)), sd_mecha.model(str(tuned)), alpha=0.3)
    sd_mecha.merge(recipe, output=str(ref), output_dtype=torch.float32, threads=1)
    ours = tmp_path / "ours.safetensors"
    M.merge_models([str(SD1), str(tuned)], ours, M.ModelMergeOptions("weighted-sum", alpha=0.3, no_date=True), quiet=True)
    o, r = load_file(ours), load_file(ref)
    for k, v in o.items():
        if v.is_floating_point():
            torch.testing.assert_close(v, r[k], rtol=1e-6, atol=1e-7)


def test_sdxl_text_projection_is_transposed(tmp_path):
    from safetensors.torch import save_file

    torch.manual_seed(1)
    up, down = torch.randn(48, 2), torch.randn(2, 48)
    lora = tmp_path / "tp.safetensors"
    save_file({"lora_te2_text_projection.lora_up.weight": up, "lora_te2_text_projection.lora_down.weight": down,
               "lora_te2_text_projection.alpha": torch.tensor(2.0)}, str(lora))
    out = load_file(bake(tmp_path, [(lora, 0.5)], ckpt_path=SDXL))
    key = "conditioner.embedders.1.model.text_projection"
    base = load_file(SDXL)[key]
    torch.testing.assert_close(out[key], base + 0.5 * (up @ down).T)


def test_model_merge_per_block_alphas(tmp_path, sd1_base):
    tuned = FIX / "sd1" / "tuned.safetensors"
    t = load_file(tuned)
    out = tmp_path / "bw.safetensors"
    r = CliRunner().invoke(merge_cmd, ["--models", str(SD1), str(tuned), "--method", "weighted-sum", "--block-weights",
                                       ",".join(["1"] + ["0"] * 25), "-o", str(out), "-q", "--no-date"])
    assert r.exit_code == 0, r.output
    o = load_file(out)
    for k, v in sd1_base.items():
        if k.startswith("model.diffusion_model.input_blocks.") or k.startswith("model.diffusion_model.output_blocks."):
            assert torch.equal(o[k], v), k  # alpha 0 there: A
        elif k.startswith("cond_stage_model.") and v.is_floating_point():
            assert torch.equal(o[k], t[k]), k  # BASE alpha 1: B


def test_model_merge_reads_diffusers_folders(tmp_path):
    """A diffusers folder is merged as the single file it converts to: same result as its single file."""
    tuned = FIX / "sd1" / "tuned.safetensors"
    outs = {}
    for name, first in (("single", SD1), ("folder", FIX / "sd1" / "diffusers")):
        outs[name] = tmp_path / f"{name}.safetensors"
        M.merge_models([str(first), str(tuned)], outs[name], M.ModelMergeOptions("weighted-sum", alpha=0.3, no_date=True),
                       quiet=True)
    a, b = load_file(outs["single"]), load_file(outs["folder"])
    assert sorted(a) == sorted(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # the folder as the second model: only the operand order of the lerp differs
    M.merge_models([str(tuned), str(FIX / "sd1" / "diffusers")], tmp_path / "c.safetensors",
                   M.ModelMergeOptions("weighted-sum", alpha=0.7, no_date=True), quiet=True)
    for k, v in load_file(tmp_path / "c.safetensors").items():
        torch.testing.assert_close(v, a[k], rtol=1e-6, atol=1e-7)
    # keys a folder has no place for (EMA state here) are kept from the first model, with a note
    from safetensors.torch import save_file

    extra = dict(load_file(SD1), **{"model_ema.decay": torch.tensor(0.9999)})
    save_file(extra, str(tmp_path / "ema.safetensors"))
    M.merge_models([str(tmp_path / "ema.safetensors"), str(FIX / "sd1" / "diffusers")], tmp_path / "d.safetensors",
                   M.ModelMergeOptions("weighted-sum", alpha=0.5, no_date=True), quiet=True)
    d = load_file(tmp_path / "d.safetensors")
    assert d["model_ema.decay"].item() == pytest.approx(0.9999) and len(d) == len(a) + 1
    # but a single file missing a model weight is still a mismatch (exit 2)
    del extra["model_ema.decay"], extra[next(k for k in extra if k.startswith("model.diffusion_model."))]
    save_file(extra, str(tmp_path / "short.safetensors"))
    r = CliRunner().invoke(merge_cmd, ["--models", str(SD1), str(tmp_path / "short.safetensors"), "-o",
                                       str(tmp_path / "e.safetensors"), "-q"])
    assert r.exit_code == 2 and "missing" in r.output and not (tmp_path / "e.safetensors").exists()

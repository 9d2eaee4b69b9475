"""What the tool says is true: inspect's notes and labels, rank-prune's sizes, reported errors, summaries.

Issues #16 (points 2, 4, 5, 6) and #11 (part 6). Every test here failed before its fix.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

FIX = Path(__file__).resolve().parent.parent / "fixtures"
AD = FIX / "adapters"


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "lycotools.cli", *map(str, args)], capture_output=True, text=True)


def _error_lines(stderr: str) -> list[str]:
    return [l for l in stderr.splitlines() if l.startswith("lycotools: error:")]


# ------------------------------------------------------------------------------------------------
# #16.5: reported errors and energies are float64 sums
# ------------------------------------------------------------------------------------------------


def test_relative_error_of_a_30m_element_layer_is_the_float64_value():
    from lycotools.linalg import frobenius2, relative_error

    g = torch.Generator().manual_seed(0)
    M = torch.randn(5120, 5900, generator=g)  # 30.2M elements, an SDXL-sized ff layer
    A = M + 0.3 * torch.randn(M.shape, generator=g)
    num = den = 0.0
    for i in range(0, M.shape[0], 512):  # the float64 reference, a slice at a time
        m = M[i:i + 512].double()
        num += float((m - A[i:i + 512].double()).square().sum())
        den += float(m.square().sum())
    ref = math.sqrt(num / den)
    assert abs(relative_error(M, A) - ref) / ref < 1e-6
    assert abs(frobenius2(M) - den) / den < 1e-9


# ------------------------------------------------------------------------------------------------
# #16.2: LoKr with flattened 3x3 convs (the 2023 LyCORIS layout) is an SD1 file, "kohya" keys are not the algorithm
# ------------------------------------------------------------------------------------------------


def _real_size_lokr(tmp_path) -> Path:
    """The fixture LoKr's modules and layouts (full or decomposed w1/w2; a 3x3 conv with w2 decomposed and
    stored flattened, lokr_w2_b (r, in/c·3·3); one with a full 4-D w2) at the standard SD1 model's sizes."""
    from lycotools.adapter_file import AdapterFile
    from lycotools.layouts.model_index import ModelIndex

    src = AD / "sd1_lokr.safetensors"
    sd = load_file(str(src))
    af = AdapterFile.open(src).resolve(ModelIndex.template("sd1"))
    g = torch.Generator().manual_seed(1)
    out, flattened = {}, 0
    for lm in af.parsed:
        t, shape = lm.module.tensors, lm.target.shape
        w1 = (t["lokr_w1"].shape if "lokr_w1" in t else (t["lokr_w1_a"].shape[0], t["lokr_w1_b"].shape[1]))
        a, c = int(w1[0]), int(w1[1])
        b, d, k = shape[0] // a, shape[1] // c, tuple(shape[2:])
        new = {"alpha": sd[f"{lm.name}.alpha"]}
        if "lokr_w1" in t:
            new["lokr_w1"] = torch.randn(a, c, generator=g)
        else:
            r1 = t["lokr_w1_b"].shape[0]
            new["lokr_w1_a"], new["lokr_w1_b"] = torch.randn(a, r1, generator=g), torch.randn(r1, c, generator=g)
        if "lokr_w2" in t:
            new["lokr_w2"] = torch.randn(b, d, *k, generator=g)
        else:
            r = t["lokr_w2_b"].shape[0]
            new["lokr_w2_a"] = torch.randn(b, r, generator=g)
            new["lokr_w2_b"] = torch.randn(r, d * math.prod(k), generator=g)  # flattened for a conv
            flattened += bool(k)
        out.update({f"{lm.name}.{s}": v for s, v in new.items()})
    assert flattened == 1  # the fixture's lora_unet_down_blocks_0_resnets_0_conv1
    p = tmp_path / "lokr_2023.safetensors"
    save_file(out, str(p), metadata={"ss_network_module": "lycoris.kohya"})
    return p


def test_flattened_conv_lokr_is_the_standard_sd1_model(tmp_path):
    from lycotools.ops.inspect import inspect_path

    p = _real_size_lokr(tmp_path)
    r = inspect_path(p)
    assert r["arch"] == "sd1" and r["unmatched"] == [] and r["errors"] == []
    assert not any("not those of the standard" in n for n in r["notes"]), r["notes"]
    res = _cli("inspect", p)
    assert res.returncode == 0 and "not those of the standard" not in res.stdout, res.stdout


def test_key_convention_and_algorithm_are_said_apart(tmp_path):
    """A kohya-named LoKr is not 'kohya format' (convert --to kohya refuses LoKr): keys and algorithm apart."""
    res = _cli("inspect", AD / "sd1_lokr.safetensors")
    assert res.returncode == 0
    head = res.stdout.splitlines()[0]
    assert "keys: kohya/LyCORIS (lora_unet_*, lora_te_*)" in head and "algorithm: LoKr" in head, head
    assert "kohya format" not in head
    doc = json.loads(_cli("inspect", "--json", AD / "sd1_lokr.safetensors").stdout)
    assert doc["keys"].startswith("kohya/LyCORIS") and doc["algorithm"] == "LoKr"
    assert doc["format"] == "kohya" and doc["algorithms"] == {"lokr": 6}  # the old fields keep their meaning
    lora = json.loads(_cli("inspect", "--json", AD / "sd1_kohya_lora.safetensors").stdout)
    assert lora["algorithm"] == "LoRA"
    peft = json.loads(_cli("inspect", "--json", AD / "sd1_peft").stdout)
    assert peft["keys"].startswith("PEFT") and peft["algorithm"] == "LoRA"


# ------------------------------------------------------------------------------------------------
# #16.6: adapters for other families say what they are; commands refuse them in one line
# ------------------------------------------------------------------------------------------------


def _lora(names, prefix="", dotted=True, width=8, rank=2, alpha=False):
    sd = {}
    for n in names:
        if dotted:
            sd[f"{prefix}{n}.lora_A.weight"] = torch.ones(rank, width)
            sd[f"{prefix}{n}.lora_B.weight"] = torch.ones(width, rank)
        else:
            sd[f"{prefix}{n}.lora_down.weight"] = torch.ones(rank, width)
            sd[f"{prefix}{n}.lora_up.weight"] = torch.ones(width, rank)
            if alpha:
                sd[f"{prefix}{n}.alpha"] = torch.tensor(1.0)
    return sd


FAMILY_FILES = {
    "Flux.1": _lora(["transformer.single_transformer_blocks.0.attn.to_q", "transformer.single_transformer_blocks.0.proj_mlp",
                     "transformer.transformer_blocks.0.attn.to_q", "transformer.transformer_blocks.0.attn.add_q_proj"]),
    "Flux.1 (kohya)": _lora(["lora_unet_double_blocks_0_img_attn_qkv", "lora_unet_double_blocks_0_txt_mlp_0",
                             "lora_unet_single_blocks_0_linear1"], dotted=False, alpha=True),
    "SD3": _lora(["transformer.transformer_blocks.0.attn.add_q_proj", "transformer.transformer_blocks.0.attn.to_q",
                  "transformer.transformer_blocks.0.ff_context.net.2"]),
    "Qwen-Image": _lora(["transformer.transformer_blocks.0.img_mlp.net.0.proj", "transformer.transformer_blocks.0.attn.to_q",
                         "transformer.transformer_blocks.59.txt_mlp.net.2"]),
    "Wan": _lora(["diffusion_model.blocks.0.self_attn.q", "diffusion_model.blocks.0.cross_attn.k",
                  "diffusion_model.blocks.0.ffn.0"]),
    "HunyuanVideo": _lora(["transformer.context_embedder.token_refiner.refiner_blocks.0.attn.to_q",
                           "transformer.transformer_blocks.0.attn.to_q", "transformer.single_transformer_blocks.39.attn.to_k"]),
    "LTX-Video": _lora(["transformer.transformer_blocks.0.attn1.to_q", "transformer.transformer_blocks.0.attn2.to_k",
                        "transformer.transformer_blocks.0.ff.net.2"]),
    "Z-Image": _lora(["diffusion_model.layers.0.attention.to_q", "diffusion_model.layers.0.feed_forward.w1",
                      "diffusion_model.noise_refiner.0.attention.to_k"]),
}


@pytest.mark.parametrize("label", FAMILY_FILES)
def test_other_families_are_named_by_inspect(tmp_path, label):
    from lycotools.ops.inspect import inspect_path

    family = label.split(" ")[0]
    p = tmp_path / "x.safetensors"
    save_file(FAMILY_FILES[label], str(p))
    r = inspect_path(p)
    assert r["kind"] == "adapter" and r["family"] == family and r["arch"] is None
    assert any(f"lycotools does not support {family} yet" in n for n in r["notes"])
    res = _cli("inspect", p)
    assert res.returncode == 0 and f"for {family} (not supported yet)" in res.stdout, res.stdout
    assert "unknown model" not in res.stdout


def test_other_families_are_refused_by_commands_in_one_line(tmp_path):
    p = tmp_path / "flux.safetensors"
    save_file(FAMILY_FILES["Flux.1"], str(p))
    want = f"{p}: a Flux.1 LoRA; lycotools does not support Flux.1 yet"
    runs = {
        "convert": ("convert", p, "--to", "diffusers", "-o", tmp_path / "c.safetensors"),
        "rank-prune": ("rank-prune", p, "--rank", "1", "-o", tmp_path / "r.safetensors"),
        "merge --into-adapter": ("merge", "--into-adapter", p, p, "-o", tmp_path / "m.safetensors"),
        "merge (bake)": ("merge", FIX / "sd1/base.safetensors", p, "-o", tmp_path / "b.safetensors"),
    }
    for what, args in runs.items():
        res = _cli(*args)
        errs = _error_lines(res.stderr)
        assert res.returncode == 2 and errs == [f"lycotools: error: {want}"], (what, res.stderr)
    sd = tmp_path / "sd3.safetensors"
    save_file(FAMILY_FILES["SD3"], str(sd))
    res = _cli("convert", sd, "--to", "kohya", "-o", tmp_path / "s.safetensors")
    assert res.returncode == 2 and _error_lines(res.stderr) == [
        f"lycotools: error: {sd}: an SD3 LoRA; lycotools does not support SD3 yet"]


def test_sd_adapters_are_not_taken_for_other_families():
    from lycotools.adapter_file import AdapterFile
    from lycotools.ops.inspect import guess_family

    for p in sorted(AD.glob("*.safetensors")) + [AD / "sd1_peft"]:
        assert guess_family(AdapterFile.open(p)) is None, p.name


# ------------------------------------------------------------------------------------------------
# #11.6: a folder of PEFT component folders (what convert --to peft writes) is one adapter to inspect
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["sd1_kohya_lora.safetensors", "sdxl_kohya_lora.safetensors"])
def test_inspect_reads_the_peft_folders_convert_writes(tmp_path, name):
    from lycotools.ops.inspect import inspect_path

    out = tmp_path / "peft"
    res = _cli("convert", AD / name, "--to", "peft", "-o", out)
    assert res.returncode == 0, res.stderr
    ref = inspect_path(AD / name)
    r = inspect_path(out)
    assert r["kind"] == "adapter" and r["arch"] == ref["arch"]
    assert r["unmatched"] == [] and r["errors"] == []
    assert r["modules"] == ref["modules"] and r["targets"] == ref["targets"]
    assert r["components"] == sorted(ref["targets"], key=["unet", "text_encoder", "text_encoder_2"].index)
    assert r["alpha"] == ref["alpha"] and r["rank"] == ref["rank"]
    text = _cli("inspect", out).stdout
    assert "match no weight" not in text and "components: unet, text_encoder" in text, text


# ------------------------------------------------------------------------------------------------
# #11.6: convert of an embedding to kohya keeps the token where inspect reads it back
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["a1111.pt", "diffusers_learned_embeds.safetensors", "kohya.safetensors"])
def test_embedding_to_kohya_keeps_the_token(tmp_path, name):
    from lycotools.ops.inspect import inspect_path

    src = FIX / "embeddings" / name
    before = inspect_path(src)
    out = tmp_path / "emb.safetensors"
    res = _cli("convert", src, "--to", "kohya", "-o", out)
    assert res.returncode == 0, res.stderr
    after = inspect_path(out)
    assert after["format"] == "kohya" and after["vectors"] == before["vectors"]
    # a kohya input stores no token: consumers (and convert) name it after its file
    assert after["token"] == (before["token"] or src.stem)
    assert after["token"] in _cli("inspect", out).stdout
    if before["token"] is None:
        assert f"none stored; A1111 and ComfyUI name it after the file: {src.stem}" in _cli("inspect", src).stdout


def test_sdxl_embedding_token_is_read_back(tmp_path):
    from lycotools.ops.inspect import inspect_path

    out = tmp_path / "xl.safetensors"
    assert _cli("convert", FIX / "embeddings/sdxl.safetensors", "--to", "sdxl", "--token", "xl-tok", "-o", out).returncode == 0
    assert inspect_path(out)["token"] == "xl-tok"


# ------------------------------------------------------------------------------------------------
# #11.6: convert on an empty folder is bad input; merge --models ends with a summary like bake's
# ------------------------------------------------------------------------------------------------


def test_convert_of_an_empty_folder_exits_2_like_the_other_commands(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    for args in (("convert", empty, "--to", "kohya", "-o", tmp_path / "out"),
                 ("rank-prune", empty, "--rank", "2", "-o", tmp_path / "out2"),
                 ("inspect", empty)):
        res = _cli(*args)
        assert res.returncode == 2 and _error_lines(res.stderr) == [f"lycotools: error: {empty}: no model files found"], \
            (args[0], res.returncode, res.stderr)
    assert not (tmp_path / "out").exists()


def test_merge_models_prints_a_summary(tmp_path):
    out = tmp_path / "m.safetensors"
    res = _cli("merge", "--models", FIX / "sd1/base.safetensors", FIX / "sd1/tuned.safetensors", "--alpha", "0.3", "-o", out)
    assert res.returncode == 0, res.stderr
    n = len(load_file(str(FIX / "sd1/base.safetensors")))
    assert f"{out}: weighted-sum merge of 2 sd1 checkpoints (alpha 0.3), {n} tensors, fp32" in res.stderr, res.stderr
    bake = _cli("merge", FIX / "sd1/base.safetensors", AD / "sd1_kohya_lora.safetensors", "-o", tmp_path / "b.safetensors")
    assert f"{tmp_path / 'b.safetensors'}: " in bake.stderr  # the line bake ends with, same form
    quiet = _cli("merge", "--models", "-q", FIX / "sd1/base.safetensors", FIX / "sd1/tuned.safetensors", "-o",
                 tmp_path / "q.safetensors")
    assert quiet.returncode == 0 and quiet.stderr == ""


# ------------------------------------------------------------------------------------------------
# #16.4: rank-prune refuses to grow a file unless asked, and says when little energy is kept
# ------------------------------------------------------------------------------------------------


def test_prune_refuses_a_larger_output_unless_allowed(tmp_path):
    src = AD / "sd1_lokr.safetensors"
    out = tmp_path / "r2.safetensors"
    res = _cli("rank-prune", src, "--rank", "2", "-o", out)
    assert res.returncode == 2 and not out.exists()
    (line,) = _error_lines(res.stderr)
    assert line.startswith(f"lycotools: error: {src}: the pruned adapter would be larger than the input: 388 → 1024 parameters")
    assert "LoKr" in line and "--allow-larger" in line and "51.7% of ΔW's energy" in line
    res = _cli("rank-prune", src, "--rank", "2", "-o", out, "--allow-larger", "--json")
    assert res.returncode == 0 and out.exists(), res.stderr
    warn = [l for l in res.stderr.splitlines() if l.startswith("lycotools: warning:")]
    assert warn == [f"lycotools: warning: {out}: larger than the input {src.name}: 388 → 1024 parameters, 2.6× the input "
                    "(its LoKr modules become LoRA factors of r·(out + in) parameters), keeping 51.7% of ΔW's energy"]
    doc = json.loads(res.stdout)
    assert doc["params_before"] == 388 and doc["params_after"] == 1024 and len(doc["warnings"]) == 1
    # a batch refuses that file (exit 2) and writes the others
    batch = tmp_path / "in"
    batch.mkdir()
    for name in ("sd1_lokr.safetensors", "sd1_kohya_lora.safetensors"):
        (batch / name).write_bytes((AD / name).read_bytes())
    res = _cli("rank-prune", batch, "--rank", "2", "-o", tmp_path / "out", "-q")
    assert res.returncode == 2
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["sd1_kohya_lora.safetensors"]


def test_prune_warns_when_little_energy_is_kept(tmp_path):
    out = tmp_path / "r1.safetensors"
    res = _cli("rank-prune", AD / "sd1_kohya_lora.safetensors", "--rank", "1", "-o", out, "-q")
    assert res.returncode == 0 and out.exists()
    assert res.stderr.strip() == (f"lycotools: warning: {out}: keeps only 47.0% of ΔW's energy (under 50%; relative "
                                  "error 0.73), 2272 → 568 parameters")
    res = _cli("rank-prune", AD / "sd1_kohya_lora.safetensors", "--rank", "2", "-o", tmp_path / "r2.safetensors", "-q")
    assert res.returncode == 0 and res.stderr == ""


# ------------------------------------------------------------------------------------------------
# #11.6: extract summaries: no empty "()", badly fitted layers named; --budget pays for real ranks only
# ------------------------------------------------------------------------------------------------


def test_extract_summary_has_no_empty_parentheses_and_names_poor_layers(tmp_path):
    """SD2 --algo lokr: every layer is a LoKr with both blocks whole (no rank); the optimal single Kronecker
    product of these random low-rank ΔW leaves errors up to 0.89 (their Kronecker rank is 4-32)."""
    out = tmp_path / "l.safetensors"
    res = _cli("extract", FIX / "sd2/base.safetensors", FIX / "sd2/tuned.safetensors", "--algo", "lokr", "-o", out)
    assert res.returncode == 0, res.stderr
    assert "()" not in res.stderr, res.stderr
    assert "lycotools: unet: 9 layers extracted (9 LoKr, both blocks whole), 273 unchanged" in res.stderr
    (warn,) = [l for l in res.stderr.splitlines() if l.startswith("lycotools: warning:")]
    assert warn.startswith(f"lycotools: warning: 13 layer(s) of {out} keep less than 75% of their ΔW's energy "
                           "(relative error above 0.5): lora_te_text_model_encoder_layers_2_mlp_fc1 (error 0.89, LoKr)")
    assert "--algo locon" in warn
    ok = _cli("extract", FIX / "sd1/base.safetensors", FIX / "sd1/tuned.safetensors", "--rank", "8", "-o",
              tmp_path / "ok.safetensors")
    assert ok.returncode == 0 and "warning" not in ok.stderr and "()" not in ok.stderr
    assert "lycotools: unet: 8 layers extracted (rank 8; 5 stored whole), 273 unchanged" in ok.stderr, ok.stderr


def test_extract_summary_of_a_norm_only_part(tmp_path):
    from lycotools.ops.extract import ExtractResult, LayerReport

    from lycotools.commands.extract import _extract_summary

    res = ExtractResult(output=tmp_path / "x.safetensors", changed={"unet": 2}, unchanged={"unet": 5},
                        layers=[LayerReport("a", "unet", "a", (4,), "norm", None, 1.0, 0.0, 8),
                                LayerReport("b", "unet", "b", (4, 4), "skipped", 0, 0.0, 1.0, 0)])
    import click.testing

    runner = click.testing.CliRunner()
    out = runner.invoke(click.command()(lambda: _extract_summary(res)), [])
    assert "lycotools: unet: 2 layers extracted (1 norm layers; 1 left out: no budget), 5 unchanged" in out.output
    assert "()" not in out.output


def test_extract_budget_gives_each_layer_its_true_rank(tmp_path):
    """--budget 40MB is more than the whole SD1 fixture: every ΔW comes back exactly, at its true rank (or
    stored whole where that rank costs as much: the 8x8 proj_in of rank 4), not capped one rank below the
    whole layer (proj_in got rank 3 at error 0.26) nor padded with rounding-noise triplets (ranks 7-15)."""
    from lycotools.ops.extract import ExtractOptions, extract

    deltas = json.loads((FIX / "sd1/deltas.json").read_text())
    res = extract(FIX / "sd1/base.safetensors", FIX / "sd1/tuned.safetensors", tmp_path / "b.safetensors",
                  ExtractOptions(budget="40MB", dtype="fp32", no_date=True), quiet=True)
    assert max(l.rel_error for l in res.layers) < 1e-4
    true = sorted(v["rank"] for v in deltas.values())
    got = sorted(l.rank if l.rank else min(l.shape[:2]) // 2 for l in res.layers)  # stored whole: 8x8 of rank 4
    assert got == true, (got, true)
    assert [l.name for l in res.layers if l.kind == "full"] == ["lora_unet_down_blocks_0_attentions_0_proj_in"]

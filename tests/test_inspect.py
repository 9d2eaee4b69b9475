"""inspect on every fixture reports what fixtures/MANIFEST.json says the file is; bad files get one line and exit 2."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lycotools.adapter_file import AdapterFile
from lycotools.io.readers import open_source
from lycotools.layouts.adapter_keys import ModuleId, group_keys
from lycotools.layouts.model_index import ModelIndex
from lycotools.ops.inspect import inspect_path

FIX = Path(__file__).resolve().parent.parent / "fixtures"
MANIFEST = json.loads((FIX / "MANIFEST.json").read_text())["files"]
ENTRIES = {e["path"]: e for e in MANIFEST}

# the manifest's algorithm vocabulary -> inspect's
ALGO = {"lora": "lora", "locon": "lora", "locon_tucker": "lora", "lora+sparse_bias": "lora", "dora": "lora+dora",
        "loha": "loha", "loha_tucker": "loha", "lokr": "lokr", "lokr_tucker": "lokr", "full": "full", "norm": "norm",
        "ia3": "ia3", "adalora": "adalora"}


def _entries(kind):
    return [e for e in MANIFEST if e["kind"] == kind]


@pytest.mark.parametrize("e", _entries("checkpoint"), ids=lambda e: e["path"])
def test_checkpoints(e):
    r = inspect_path(FIX / e["path"])
    assert r["kind"] == "checkpoint" and r["arch"] == e["arch"]
    assert r["layout"] == ("diffusers" if e["format"] == "diffusers" else "single-file")
    comps = set(r["components"])
    assert {"unet", "text_encoder", "vae"} <= comps
    assert ("text_encoder_2" in comps) == (e["arch"] == "sdxl")
    assert r["params"] > 0


@pytest.mark.parametrize("e", _entries("adapter"), ids=lambda e: e["path"])
def test_adapters(e):
    r = inspect_path(FIX / e["path"])
    assert r["kind"] == "adapter"
    assert r["arch"] == e["arch"]
    assert set(r["algorithms"]) == {ALGO[a] for a in e["algorithms"]}
    assert r["modules"] == e["n_modules"]
    assert r["rank"] == ([min(e["ranks"]), max(e["ranks"])] if e["ranks"] else None)
    if e["alphas"] and e["algorithms"] != ["adalora"]:
        assert r["alpha"] == [min(e["alphas"]), max(e["alphas"])]
    assert r["unmatched"] == [] and r["errors"] == []


@pytest.mark.parametrize("e", _entries("embedding"), ids=lambda e: e["path"])
def test_embeddings(e):
    r = inspect_path(FIX / e["path"])
    assert r["kind"] == "embedding" and r["format"] == e["format"]
    if e.get("token"):
        assert r["token"] == e["token"]
    if e.get("n_vectors"):
        assert r["vectors"] == e["n_vectors"]


def _checkpoint_for(arch):
    return FIX / ("sd1/base.safetensors" if arch == "sd1" else "sdxl/base.safetensors")


@pytest.mark.parametrize("e", _entries("adapter"), ids=lambda e: e["path"])
@pytest.mark.parametrize("layout", ["single-file", "diffusers"])
def test_every_module_resolves_to_a_weight_of_the_fixture_model(e, layout):
    """Against the real (tiny) model: every module targets a weight whose shape fits its ΔW."""
    if layout == "diffusers" and e["arch"] != "sd1":
        pytest.skip("only the SD1 fixture has a diffusers folder")
    ckpt = _checkpoint_for(e["arch"]) if layout == "single-file" else FIX / "sd1/diffusers"
    index = ModelIndex.from_source(open_source(ckpt))
    af = AdapterFile.open(FIX / e["path"]).resolve(index)
    assert not af.errors and not af.unmatched and not af.groups.leftovers
    for lm in af.parsed:
        t = lm.target
        d = lm.module.delta(t.shape, base_weight=torch.ones(t.shape))
        assert tuple(d.shape) == tuple(t.shape), lm.name
        expected = (e.get("modules") or {}).get(lm.name, {}).get("diffusers_module")
        if expected:
            assert t.module == expected, lm.name


def test_unmatched_modules_are_reported(tmp_path):
    from safetensors.torch import load_file, save_file

    sd = load_file(str(FIX / "adapters/sd1_kohya_lora.safetensors"))
    sd["lora_unet_no_such_block_proj.lora_down.weight"] = torch.ones(2, 4)
    sd["lora_unet_no_such_block_proj.lora_up.weight"] = torch.ones(4, 2)
    p = tmp_path / "x.safetensors"
    save_file(sd, str(p))
    index = ModelIndex.from_source(open_source(FIX / "sd1/base.safetensors"))
    af = AdapterFile.open(p).resolve(index)
    assert [lm.name for lm in af.unmatched] == ["lora_unet_no_such_block_proj"]
    r = inspect_path(p)
    assert r["unmatched"] == ["lora_unet_no_such_block_proj"]


def test_transformers5_text_encoder_names_resolve():
    """Tools that name modules from a transformers 5 CLIPTextModel drop the text_model level."""
    index = ModelIndex.template("sd1")
    g = group_keys(["lora_te_encoder_layers_3_self_attn_q_proj.lora_down.weight",
                    "lora_te_encoder_layers_3_self_attn_q_proj.lora_up.weight"])
    t = index.resolve(g.ids["lora_te_encoder_layers_3_self_attn_q_proj"])
    assert t.component == "text_encoder" and t.module == "text_model.encoder.layers.3.self_attn.q_proj"
    assert t.shape == (768, 768)
    sdxl = ModelIndex.template("sdxl")
    t = sdxl.resolve(ModuleId("unet", "input_blocks_4_1_transformer_blocks_0_attn1_to_q", True, "unknown"))
    assert t.module == "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q" and t.shape == (640, 640)
    t = sdxl.resolve(ModuleId("unet", "down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q", True, "unknown"))
    assert t.module == "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "lycotools.cli", *map(str, args)], capture_output=True, text=True)


BAD = {
    "bad/empty.safetensors": "file is empty",
    "bad/truncated.safetensors": "truncated",
    "bad/lying_header.safetensors": "more data than the file holds",
    "bad/not_a_model.safetensors": "not a safetensors file",
    "bad/evil.ckpt": "refused",
}


@pytest.mark.parametrize("path, message", BAD.items())
def test_bad_input_one_line_exit_2(path, message):
    r = _cli("inspect", FIX / path)
    assert r.returncode == 2
    lines = [l for l in r.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("lycotools: error: ") and str(FIX / path) in lines[0]
    assert message in lines[0] and "Traceback" not in r.stderr
    r = _cli("inspect", "--debug", FIX / path)
    assert r.returncode == 2 and "Traceback" in r.stderr


def test_missing_path_and_batch_goes_on(tmp_path):
    r = _cli("inspect", tmp_path / "nope.safetensors")
    assert r.returncode == 2 and "no such file" in r.stderr
    r = _cli("inspect", "-q", FIX / "bad", FIX / "sd1/base.safetensors", "--json")
    assert r.returncode == 2
    doc = json.loads(r.stdout)
    kinds = sorted(d["kind"] for d in doc)
    assert kinds.count("error") == len(BAD) and "checkpoint" in kinds


def test_evil_pickle_never_runs(tmp_path):
    marker = Path("/tmp/lycotools_pwned")
    marker.unlink(missing_ok=True)
    _cli("inspect", FIX / "bad/evil.ckpt")
    assert not marker.exists()

"""#12: ``lycotools train`` starts from a single-file checkpoint and a folder of images, nothing else.

The single files have the standard SD1.5 / SD2.x / SDXL key sets and shapes (those of the configs lycotools
ships, so they are recognised as standard models) with random fp16 weights, written once per session by
streaming tensors of the template's shapes straight into a .safetensors file (no model is instantiated).
No tokenizer, config or scheduler file lies beside them: the CLIP tokenizers shipped with lycotools
(``layouts.tokenizers``) are what training reads.

Cost on a 2-core CPU: SD1.5 is 1.07 B parameters (2.1 GB fp16, ~4.3 GB float32 in memory), SD2 1.29 B. One
step at 64 px (8x8 latents), batch 1, runs in seconds. LoHa and LoKr materialise every adapted weight's ΔW
at each forward (up to ~19 GB with the UNet's 3x3 convs), so on the full-size model they train the text
encoder (the tokenizer's consumer); their UNet layers are covered on the tiny fixtures (tests/test_train.py).
SDXL (3.5 B parameters, 7 GB fp16; measured ~110 s and 20 GB peak RSS) only runs with LYCOTOOLS_SLOW_TESTS=1;
its two shipped tokenizers are checked cheaply on the tiny SDXL fixture with CLIP-sized vocabularies below.
"""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
import struct
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from lycotools.cli import main

FIX = Path(__file__).resolve().parent.parent / "fixtures"
SLOW = pytest.mark.skipif(not os.environ.get("LYCOTOOLS_SLOW_TESTS"),
                          reason="SDXL at full size: 7 GB file, ~20 GB RAM, ~2 min on a 2-core CPU; set LYCOTOOLS_SLOW_TESTS=1")


# ---- inputs -------------------------------------------------------------------------------------------

def write_random_single_file(path: Path, arch: str, seed: int = 0, std: float = 0.02) -> Path:
    """A single file with exactly the key set and shapes of the standard ``arch`` checkpoint, random fp16
    values (slices of one random pool), written tensor by tensor."""
    from lycotools.layouts.checkpoint import template_single_shapes

    shapes = template_single_shapes(arch)
    keys = sorted(shapes)
    header, off = {}, 0
    for k in keys:
        n = math.prod(shapes[k]) * 2
        header[k] = {"dtype": "F16", "shape": list(shapes[k]), "data_offsets": [off, off + n]}
        off += n
    header["__metadata__"] = {"format": "pt"}
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)
    g = torch.Generator().manual_seed(seed)
    pool = (torch.randn(max(math.prod(s) for s in shapes.values()) + (1 << 20), generator=g) * std).half()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(head)))
        f.write(head)
        for k in keys:
            n = math.prod(shapes[k])
            o = int(torch.randint(0, pool.numel() - n + 1, (1,), generator=g))
            f.write(pool[o:o + n].numpy().tobytes())
    return path


@pytest.fixture(scope="session")
def single_files(tmp_path_factory):
    """arch -> a lone standard-shape single file (each in a folder of its own: nothing beside it)."""
    root = tmp_path_factory.mktemp("single_files")
    made = {}

    def get(arch):
        if arch not in made:
            (root / arch).mkdir()
            made[arch] = write_random_single_file(root / arch / f"{arch}.safetensors", arch)
        return made[arch]

    yield get
    shutil.rmtree(root, ignore_errors=True)  # 2-7 GB each: not left for pytest's kept temp folders


@pytest.fixture(scope="session")
def photos(tmp_path_factory):
    from PIL import Image

    folder = tmp_path_factory.mktemp("photos")
    g = torch.Generator().manual_seed(0)
    for i in range(2):
        px = (torch.rand(64, 64, 3, generator=g) * 255).to(torch.uint8).numpy()
        Image.fromarray(px).save(folder / f"img{i}.png")
        (folder / f"img{i}.txt").write_text(f"a photo of a cat {i}!, (masterpiece:1.2), [bad], <lora:x:0.5>")
    return folder


def run(*args, code=0):
    r = CliRunner().invoke(main, [str(a) for a in args])
    assert r.exit_code == code, (r.output, r.exception)
    return r


def train(base, photos, out, algo, *extra, code=0):
    return run("train", base, photos, "-o", out, "--algo", algo, "--steps", "1", "--resolution", "64",
               "--batch-size", "1", "--rank", "2", "--no-date", "-q", *extra, code=code)


def _losses(out: Path) -> list[float]:
    with open(out.with_name(out.stem + "_loss.csv")) as f:
        return [float(r["loss"]) for r in csv.DictReader(f)]


def _adapter_ok(out: Path, base: Path, prefixes: tuple[str, ...]):
    from lycotools.adapter_file import AdapterFile
    from lycotools.io.readers import open_source
    from lycotools.layouts.model_index import ModelIndex

    af = AdapterFile.open(out).resolve(ModelIndex.from_source(open_source(base)))
    assert af.parsed and not af.unmatched and not af.errors
    names = {lm.name for lm in af.parsed}
    for p in prefixes:
        assert any(n.startswith(p) for n in names), (p, sorted(names)[:5])
    assert all(math.isfinite(x) for x in _losses(out))


# ---- SD1.5: every algorithm ------------------------------------------------------------------------------

SD15_ALGOS = {
    "lora": ((), ("lora_unet_",)),
    "locon": (("--conv-rank", "1"), ("lora_unet_down_blocks_0_resnets_0_conv1",)),
    "loha": (("--no-train-unet", "--train-text-encoder"), ("lora_te_text_model_encoder_layers_",)),
    "lokr": (("--no-train-unet", "--train-text-encoder"), ("lora_te_text_model_encoder_layers_",)),
    "adalora": (("--init-rank", "2", "--target-rank", "1"), ("lora_unet_",)),
    "full": (("--conv-rank", "0", "--optimizer", "sgd"), ("lora_unet_",)),
}


@pytest.mark.slow
@pytest.mark.parametrize("algo", [*SD15_ALGOS, "ti"])
def test_sd15_single_file_trains(tmp_path, single_files, photos, algo):
    base = single_files("sd1")
    assert sorted(p.name for p in base.parent.iterdir()) == [base.name]  # nothing beside it
    out = tmp_path / f"{algo}.safetensors"
    if algo == "ti":
        train(base, photos, out, "ti", "--token", "<my-cat>", "--init-word", "cat", "--vectors", "2")
        emb = load_file(out)
        assert list(emb) == ["emb_params"] and emb["emb_params"].shape == (2, 768)
        assert torch.isfinite(emb["emb_params"]).all()
        return
    extra, prefixes = SD15_ALGOS[algo]
    train(base, photos, out, algo, *extra)
    _adapter_ok(out, base, prefixes)
    out.unlink()  # a full diff of the transformer blocks is ~1 GB: not left in pytest's kept temp folders


def test_sd15_tokenizer_is_openai_clip(single_files):
    """What training tokenizes with, from the lone single file: CLIP ViT-L/14's tokenizer, padded with
    <|endoftext|>, 77 tokens."""
    from lycotools.train.model import load_base

    base = load_base(single_files("sd1"), need_vae=False)
    tok = base.tokenizers["text_encoder"]
    ids = tok(["a photo of a cat"], padding="max_length", max_length=tok.model_max_length, truncation=True).input_ids
    assert ids == [[49406, 320, 1125, 539, 320, 2368] + [49407] * 71]
    assert base.text_encoders["text_encoder"].config.vocab_size == 49408


# ---- SD2 ---------------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_sd2_single_file_trains(tmp_path, single_files, photos):
    """SD2 (OpenCLIP ViT-H text encoder, padded with id 0): UNet and text encoder train from the lone file.
    (Textual inversion's added tokens on that tokenizer: tests/test_tokenizers.py.)"""
    base = single_files("sd2")
    out = tmp_path / "lora.safetensors"
    train(base, photos, out, "lora", "--train-text-encoder")
    _adapter_ok(out, base, ("lora_unet_", "lora_te_text_model_encoder_layers_"))


def test_sd2_tokenizer_pads_with_zero(single_files):
    from lycotools.train.model import load_base

    base = load_base(single_files("sd2"), need_vae=False)
    tok = base.tokenizers["text_encoder"]
    assert tok(["wow!"], padding="max_length", max_length=77).input_ids == [[49406, 2781, 256, 49407] + [0] * 73]


# ---- SDXL --------------------------------------------------------------------------------------------------

@SLOW
def test_sdxl_single_file_trains(tmp_path, single_files, photos):
    base = single_files("sdxl")
    out = tmp_path / "xl.safetensors"
    train(base, photos, out, "lora", "--train-text-encoder")
    _adapter_ok(out, base, ("lora_unet_input_blocks_", "lora_te1_text_model_", "lora_te2_text_model_"))


CLIP_TOKENS = {  # the token embeddings of SD1, SD2 and SDXL single files
    "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight",
    "cond_stage_model.model.token_embedding.weight",
    "conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight",
    "conditioner.embedders.1.model.token_embedding.weight",
}


def clip_vocab_fixture(arch: str, path: Path) -> Path:
    """The tiny ``arch`` fixture with its text encoders' embeddings grown to the 49408 CLIP tokens."""
    sd = load_file(FIX / arch / "base.safetensors")
    g = torch.Generator().manual_seed(1)
    for k in CLIP_TOKENS & set(sd):
        sd[k] = (torch.randn(49408, sd[k].shape[1], generator=g) * 0.02).to(sd[k].dtype)
    save_file(sd, str(path))
    return path


def test_sdxl_shipped_tokenizers_train(tmp_path, photos):
    """SDXL's two tokenizers (CLIP-L padded with <|endoftext|>, OpenCLIP bigG padded with 0) come from the
    install when --config holds configs only; both text encoders train through them."""
    from lycotools.train.model import load_base

    (tmp_path / "xl").mkdir()
    src = clip_vocab_fixture("sdxl", tmp_path / "xl" / "xl.safetensors")
    cfg = tmp_path / "cfg"
    run("convert", src, "--to", "diffusers", "-o", cfg, "-q")
    for t in ("tokenizer", "tokenizer_2", "scheduler", "model_index.json"):
        (shutil.rmtree if (cfg / t).is_dir() else os.remove)(cfg / t)
    base = load_base(src, cfg, need_vae=False)
    t1, t2 = base.tokenizers["text_encoder"], base.tokenizers["text_encoder_2"]
    assert t1("a cat", padding="max_length", max_length=6).input_ids == [49406, 320, 2368, 49407, 49407, 49407]
    assert t2("a cat!", padding="max_length", max_length=7).input_ids == [49406, 320, 2368, 256, 49407, 0, 0]
    out = tmp_path / "xl_lora.safetensors"
    train(src, photos, out, "lora", "--config", cfg, "--train-text-encoder")
    _adapter_ok(out, src, ("lora_te1_text_model_", "lora_te2_text_model_"))


# ---- what still needs more than the single file -------------------------------------------------------------

def test_nonstandard_single_file_names_what_to_pass(tmp_path, photos):
    r = train(FIX / "sd1" / "base.safetensors", photos, tmp_path / "x.safetensors", "lora", code=2)
    err = (r.stderr if hasattr(r, "stderr") else r.output).strip().splitlines()
    assert len([l for l in err if l.startswith("lycotools: error:")]) == 1
    assert "--config" in "\n".join(err) and "does not match the standard sd1 model" in "\n".join(err)


def test_tiny_vocabulary_needs_its_own_tokenizer(tmp_path, photos):
    """A text encoder smaller than the CLIP vocabulary cannot read the shipped tokenizer's ids: the error
    says so (and a tokenizer given with --config still works: tests/test_train.py)."""
    cfg = tmp_path / "cfg"
    shutil.copytree(FIX / "sd1" / "diffusers", cfg, ignore=shutil.ignore_patterns("tokenizer*"))
    r = train(FIX / "sd1" / "base.safetensors", photos, tmp_path / "x.safetensors", "lora", "--config", cfg, code=2)
    msg = r.stderr if hasattr(r, "stderr") else r.output
    assert "no tokenizer for text_encoder" in msg and "525-token embedding" in msg


# ---- convert --to diffusers writes the tokenizers -----------------------------------------------------------

@pytest.mark.parametrize("arch", ["sd1", "sd2", "sdxl"])
def test_convert_writes_tokenizers_and_loads_in_diffusers(tmp_path, arch):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    src = clip_vocab_fixture(arch, tmp_path / f"{arch}.safetensors")
    out = tmp_path / "pipe"
    run("convert", src, "--to", "diffusers", "-o", out, "-q")
    sdxl = arch == "sdxl"
    toks = {"tokenizer": "<|endoftext|>" if arch != "sd2" else "!"}
    if sdxl:
        toks["tokenizer_2"] = "!"
    mi = json.loads((out / "model_index.json").read_text())
    for t, pad in toks.items():
        assert mi[t] == ["transformers", "CLIPTokenizer"]
        assert json.loads((out / t / "tokenizer_config.json").read_text())["pad_token"] == pad
    assert (out / "scheduler" / "scheduler_config.json").exists() and mi["scheduler"][0] == "diffusers"
    cls = StableDiffusionXLPipeline if sdxl else StableDiffusionPipeline
    pipe = cls.from_pretrained(str(out), local_files_only=True)
    assert pipe.tokenizer.pad_token_id == (0 if arch == "sd2" else 49407)
    if sdxl:
        assert pipe.tokenizer_2.pad_token_id == 0
    assert pipe.tokenizer("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    with torch.no_grad():
        emb = pipe.encode_prompt("a photo of a cat", device="cpu", num_images_per_prompt=1,
                                 do_classifier_free_guidance=False)[0]
    assert emb.shape[:2] == (1, 77) and torch.isfinite(emb).all()


def test_convert_tiny_vocabulary_writes_no_tokenizer(tmp_path):
    out = tmp_path / "pipe"
    r = run("convert", FIX / "sd1" / "base.safetensors", "--to", "diffusers", "-o", out)
    assert not (out / "tokenizer").exists()
    assert json.loads((out / "model_index.json").read_text())["tokenizer"] == [None, None]
    msg = r.stderr if hasattr(r, "stderr") else r.output
    assert "no tokenizer/ written" in msg and "525 tokens" in msg


def test_rank_prune_sensitivity_uses_shipped_tokenizer(tmp_path):
    """--score sensitivity with a --config folder that holds configs only: the shipped tokenizer encodes
    the prompts."""
    src = clip_vocab_fixture("sd1", tmp_path / "sd1.safetensors")
    cfg = tmp_path / "cfg"
    run("convert", src, "--to", "diffusers", "-o", cfg, "-q")
    shutil.rmtree(cfg / "tokenizer")
    out = tmp_path / "pruned.safetensors"
    run("rank-prune", FIX / "adapters" / "sd1_kohya_lora.safetensors", "-o", out, "--budget", "0.5",
        "--score", "sensitivity", "--base", src, "--config", cfg, "--prompts", "a cat!", "--steps", "1", "-q")
    assert out.exists()


@pytest.mark.parametrize("marker", ["key", "modelspec"])
def test_single_file_v_prediction_marker(tmp_path, marker):
    """A single file that says it is v-prediction (a ``v_pred`` key, or ``modelspec.prediction_type``) trains
    as v-prediction without a scheduler config; --eps-pred still overrides."""
    from lycotools.train.model import load_base

    sd = load_file(FIX / "sd1" / "base.safetensors")
    meta = {"format": "pt"}
    if marker == "key":
        sd["v_pred"] = torch.tensor([])
    else:
        meta["modelspec.prediction_type"] = "v"
    (tmp_path / "m").mkdir()
    src = tmp_path / "m" / "v.safetensors"
    save_file(sd, str(src), metadata=meta)
    cfg = tmp_path / "cfg"
    shutil.copytree(FIX / "sd1" / "diffusers", cfg, ignore=shutil.ignore_patterns("scheduler"))
    assert load_base(src, cfg, need_vae=False).prediction_type == "v_prediction"
    assert load_base(src, cfg, need_vae=False, v_pred=False).prediction_type == "epsilon"
    assert load_base(FIX / "sd1" / "base.safetensors", cfg, need_vae=False).prediction_type == "epsilon"


def test_own_tokenizer_beside_the_file_wins(tmp_path):
    """A tokenizer/ folder beside the single file (here as transformers 5 saves one: tokenizer.json, no
    vocab.json) is used before the shipped one."""
    from transformers import CLIPTokenizer

    from lycotools.train.model import load_base

    (tmp_path / "m").mkdir()
    src = tmp_path / "m" / "tiny.safetensors"
    shutil.copy(FIX / "sd1" / "base.safetensors", src)
    own = CLIPTokenizer.from_pretrained(str(FIX / "sd1" / "diffusers" / "tokenizer"))
    own.save_pretrained(str(tmp_path / "m" / "tokenizer"))
    assert not (tmp_path / "m" / "tokenizer" / "vocab.json").exists()
    cfg = tmp_path / "cfg"
    shutil.copytree(FIX / "sd1" / "diffusers", cfg, ignore=shutil.ignore_patterns("tokenizer*"))
    tok = load_base(src, cfg, need_vae=False).tokenizers["text_encoder"]
    assert len(tok) == len(own) == 525

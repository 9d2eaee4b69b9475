"""train: each algorithm trains on the tiny SD1 fixture, and the saved file means exactly what was trained."""

import csv
import json
import math
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner

from lycotools.adapter_file import AdapterFile
from lycotools.io.readers import open_source
from lycotools.layouts.model_index import ModelIndex

FIX = Path(__file__).resolve().parent.parent / "fixtures"
SD1 = FIX / "sd1/diffusers"
RES = 32  # 64 px images, trained at 32 px (16x16 latents with the tiny 2-level VAE): keeps the file fast


def _images(folder: Path, n=4, seed=0, caption="a photo of a thing, red"):
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    for i in range(n):
        a = (torch.rand(64, 64, 3, generator=g) * 255).to(torch.uint8).numpy()
        Image.fromarray(a).save(folder / f"img{i}.png")
        if caption is not None:
            (folder / f"img{i}.txt").write_text(f"{caption} {i}")
    return folder


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models on a shared 2-core machine: intra-op threads only add overhead (10x slower here)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return _images(tmp_path_factory.mktemp("data") / "2_thing")  # kohya N_name folder: 2 repeats


def _train(data, out, **kw):
    from lycotools.train.trainer import TrainOptions, train

    kw.setdefault("steps", 10)
    kw.setdefault("lr", 1e-2)
    kw.setdefault("batch_size", 2)
    kw.setdefault("resolution", RES)
    opts = TrainOptions(no_date=True, device="cpu", **kw)
    src = data if str(data).endswith(".toml") else data.parent
    return train(SD1, src, out, opts, overwrite=True, quiet=True, keep_models=True)


def _resolved(path):
    af = AdapterFile.open(path).resolve(ModelIndex.from_source(open_source(SD1)))
    assert not af.errors and not af.unmatched
    return af


def _merge_into(sd, lm, module):
    """W + ΔW (or the DoRA merge) into state dict ``sd``, and b + diff_b where the file has one (full)."""
    key, bkey = module + ".weight", module + ".bias"
    w, b = lm.module.apply(sd[key], bias=sd.get(bkey))
    sd[key] = w
    if b is not None:
        sd[bkey] = b


def _merged_unet_matches(res, path):
    """The UNet with the file's ΔW added to its weights equals the trained model (hooks on) to 1e-4."""
    from lycotools.train.model import load_base

    fresh = load_base(SD1, need_vae=False)
    sd = fresh.unet.state_dict()
    n = 0
    for lm in _resolved(path).parsed:
        if lm.target.component != "unet":
            continue
        _merge_into(sd, lm, lm.target.module)
        n += 1
    fresh.unet.load_state_dict(sd)
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 4, RES // 2, RES // 2, generator=g)
    ehs = torch.randn(2, 77, 32, generator=g)
    t = torch.tensor([10, 500])
    trained = res.base.unet.eval()
    with torch.no_grad():
        y_trained = trained(x, t, ehs).sample
        y_merged = fresh.unet.eval()(x, t, ehs).sample
        y_base = load_base(SD1, need_vae=False).unet.eval()(x, t, ehs).sample
    assert (y_trained - y_base).abs().max() > 1e-4, "training changed nothing"
    assert torch.allclose(y_trained, y_merged, atol=1e-4, rtol=1e-4), (y_trained - y_merged).abs().max()
    return n


def _merged_te_matches(res, path):
    """Same for the text encoder: file ΔW added to the weights == the trained encoder (hooks on)."""
    from lycotools.train.model import load_base

    fresh = load_base(SD1, need_vae=False).text_encoders["text_encoder"]
    sd = fresh.state_dict()
    n = 0
    for lm in _resolved(path).parsed:
        if lm.target.component != "text_encoder":
            continue
        mod = lm.target.module
        _merge_into(sd, lm, mod if mod + ".weight" in sd else mod[len("text_model."):])
        n += 1
    fresh.load_state_dict(sd)
    ids = torch.tensor([[523, 5, 17, 99, 524] + [524] * 72])
    with torch.no_grad():
        a = res.base.text_encoders["text_encoder"].eval()(ids).last_hidden_state
        b = fresh.eval()(ids).last_hidden_state
    assert torch.allclose(a, b, atol=1e-4, rtol=1e-4), (a - b).abs().max()
    return n


def _lycoris_forward_matches(path, factor=-1):
    """lycoris-lora's own module, built from the file's tensors on the base layer, gives the output of our
    merged weights (its forward path is the reference, docs/adapters.md#reference-implementation): up to 6 k×k convs, 6 1×1 convs and
    6 linears. Returns the tensor suffixes checked."""
    pytest.importorskip("lycoris")
    import lycoris.modules as lm_

    base = open_source(SD1)
    seen = {"linear": 0, "1x1": 0, "kxk": 0}
    kinds = set()
    tucker_first = sorted(_resolved(path).parsed, key=lambda lm: not set(lm.module.tensors) & set(TUCKER_KEY.values()))
    for lm in tucker_first:
        shape = tuple(lm.target.shape)
        kind = "linear" if len(shape) == 2 else "1x1" if all(k == 1 for k in shape[2:]) else "kxk"
        if seen[kind] >= 6:
            continue
        seen[kind] += 1
        W = base.get(lm.target.weight_key).float()
        t = {k: v.float() for k, v in lm.module.tensors.items()}
        g = t.get
        has_b = "diff_b" in t
        b = base.get(lm.target.weight_key[: -len("weight")] + "bias").float() if has_b else None
        if W.dim() == 2:
            orig = torch.nn.Linear(W.shape[1], W.shape[0], bias=has_b)
        else:
            orig = torch.nn.Conv2d(W.shape[1], W.shape[0], W.shape[2:], padding=W.shape[2] // 2, bias=has_b)
        with torch.no_grad():
            orig.weight.copy_(W)
            if has_b:
                orig.bias.copy_(b)
            if "lora_up.weight" in t:
                mod = lm_.LoConModule.make_module_from_state_dict("m", orig, g("lora_up.weight"), g("lora_down.weight"),
                                                                  g("lora_mid.weight"), g("alpha"), g("dora_scale"))
            elif "hada_w1_a" in t:
                mod = lm_.LohaModule.make_module_from_state_dict("m", orig, g("hada_w1_a"), g("hada_w1_b"), g("hada_w2_a"),
                                                                 g("hada_w2_b"), g("hada_t1"), g("hada_t2"), g("alpha"),
                                                                 g("dora_scale"))
            elif "diff" in t:
                mod = lm_.FullModule.make_module_from_state_dict("m", orig, g("diff"), g("diff_b"))
            elif "lokr_t2" in t:  # its loader misreads the Tucker rank (docs/adapters.md#lycoris-reload-failures): build the module directly
                mod = lm_.LokrModule("m", orig, 1.0, lora_dim=t["lokr_w2_b"].shape[0], alpha=float(t["alpha"]),
                                     use_tucker=True, factor=factor, weight_decompose="dora_scale" in t)
                for k in ("lokr_w1", "lokr_w2_a", "lokr_w2_b", "lokr_t2", "dora_scale"):
                    if k in t:
                        getattr(mod, k).copy_(t[k])
            else:
                mod = lm_.LokrModule.make_module_from_state_dict("m", orig, g("lokr_w1"), None, None, g("lokr_w2"),
                                                                 g("lokr_w2_a"), g("lokr_w2_b"), None, None, g("alpha"), g("dora_scale"))
        mod.apply_to()
        x = torch.randn(3, W.shape[1]) if W.dim() == 2 else torch.randn(2, W.shape[1], 6, 6)
        with torch.no_grad():
            y = orig(x)
            W2, b2 = lm.module.apply(W, bias=b)
            ref = F.linear(x, W2, b2) if W.dim() == 2 else F.conv2d(x, W2, b2, padding=W.shape[2] // 2)
        assert torch.allclose(y, ref, rtol=1e-4, atol=1e-5), lm.name
        kinds |= set(t) - {"alpha", "dora_scale"}
    assert sum(seen.values()), seen
    return kinds


TUCKER_KEY = {"locon": "lora_mid.weight", "loha": "hada_t1", "lokr": "lokr_t2"}


@pytest.mark.parametrize("algo", ["lora", "locon", "loha", "lokr", "locon-dora", "locon-tucker", "loha-tucker",
                                  "lokr-tucker", "full"])
def test_algo_trains_and_file_is_what_was_trained(tmp_path, data, algo):
    from lycotools.ops.inspect import inspect_path

    out = tmp_path / f"{algo}.safetensors"
    kw = dict(rank=2, alpha=1.0)
    if algo == "locon-dora":
        algo, kw["dora"] = "locon", True
    if algo.endswith("-tucker"):
        algo, kw["tucker"] = algo[: -len("-tucker")], True
    if algo in ("lora", "full"):
        kw["train_text_encoder"] = True
    if algo in ("lora", "loha"):
        kw["gradient_checkpointing"] = True  # the hooks run inside checkpointed blocks
    res = _train(data, out, algo=algo, **kw)
    assert len(res.losses) == 10 and all(math.isfinite(l) for l in res.losses)
    af = _resolved(out)
    assert af.parsed and all(lm.module.delta(lm.target.shape).abs().max() > 0 for lm in af.parsed), "some factors never moved"
    want = {"lora": "lora", "locon": "lora", "loha": "loha", "lokr": "lokr", "full": "full"}[algo]
    assert {lm.module.algo for lm in af.parsed} == {want}
    names = [lm.name for lm in af.parsed]
    if algo == "lora":
        assert any(n.startswith("lora_te_text_model_encoder_layers_0_self_attn_q_proj") for n in names)
        assert not any("resnets" in n for n in names)
    else:
        assert any("resnets_0_conv1" in n for n in names)  # 3x3 convs adapted
    rep = inspect_path(out)
    assert rep["kind"] == "adapter" and rep.get("arch") == "sd1", rep
    meta = open_source(out).metadata
    lyco = algo in ("loha", "lokr", "full") or kw.get("dora")
    assert meta["ss_network_module"] == ("lycoris.kohya" if lyco else "networks.lora")
    if lyco:
        assert json.loads(meta["ss_network_args"])["algo"] == algo
    if kw.get("dora"):
        assert all("dora_scale" in lm.module.tensors for lm in af.parsed)
    tk = TUCKER_KEY.get(algo)
    n_tucker = sum(tk in lm.module.tensors for lm in af.parsed) if tk else 0
    assert (n_tucker >= 8) == bool(kw.get("tucker")), n_tucker
    if kw.get("tucker"):
        assert json.loads(meta["ss_network_args"])["use_tucker"] == "True"
        for lm in af.parsed:  # Tucker on exactly the k×k convs, in LyCORIS's layouts
            t, shape = lm.module.tensors, tuple(lm.target.shape)
            assert (tk in t) == (len(shape) == 4 and shape[2:] != (1, 1) and "lokr_w2" not in t), lm.name
            if tk in t and algo == "loha":
                assert t["hada_w1_a"].shape == t["hada_w2_a"].shape == (2, shape[0])
                assert t["hada_w1_b"].shape == (2, shape[1]) and t["hada_t1"].shape == t["hada_t2"].shape == (2, 2, *shape[2:])
            if tk in t and algo == "lokr":
                b, d = (shape[0] // t["lokr_w1"].shape[0], shape[1] // t["lokr_w1"].shape[1])
                assert t["lokr_w2_a"].shape == (2, b) and t["lokr_w2_b"].shape == (2, d) and t["lokr_t2"].shape == (2, 2, *shape[2:])
    assert meta["ss_max_train_steps"] == "10" and meta["ss_num_train_images"] == "8"  # 4 images x 2 repeats
    assert meta["modelspec.architecture"].startswith("stable-diffusion-v1/")
    assert _merged_unet_matches(res, out) > 10
    if algo in ("lora", "full"):
        assert _merged_te_matches(res, out) == 12  # 2 layers x (q, k, v, out, fc1, fc2)
    kinds = _lycoris_forward_matches(out)
    if tk and kw.get("tucker"):
        assert tk in kinds  # a Tucker module was among those lycoris-lora rebuilt
    if algo == "full":
        assert {"diff", "diff_b"} <= kinds
        _full_only_targets_changed(res, af)
        _full_bake_reproduces(res, out, tmp_path)
    rows = list(csv.DictReader(open(res.loss_log)))
    assert len(rows) == 10 and all(math.isfinite(float(r["loss"])) for r in rows)


def _full_only_targets_changed(res, af):
    """algo=full trains the targeted weights and biases in float32 and nothing else: every other tensor of
    the UNet and text encoder is bit-identical to the base, and each stored diff is trained − base exactly."""
    from lycotools.train.model import load_base

    fresh = load_base(SD1, need_vae=False)
    targets = {(t.component, t.module) for t in res.network.targets}
    assert len(targets) == len(af.parsed)
    n_same = 0
    for comp, trained, base in [("unet", res.base.unet, fresh.unet),
                                ("text_encoder", res.base.text_encoders["text_encoder"], fresh.text_encoders["text_encoder"])]:
        base_p = dict(base.named_parameters())
        for name, p in trained.named_parameters():
            module = name.rsplit(".", 1)[0]
            if (comp, module) in targets:
                assert p.requires_grad and p.dtype == torch.float32, name
            else:
                assert not p.requires_grad and torch.equal(p.detach(), base_p[name]), name
                n_same += 1
    assert n_same > 20
    by_name = {t.name: t for t in res.network.targets}
    for lm in af.parsed[:20]:
        layer = by_name[lm.name].layer
        assert torch.equal(lm.module.tensors["diff"], layer.weight.detach() - _base_tensor(lm.target.weight_key))


def _base_tensor(key):
    return open_source(SD1).get(key).float()


def _full_bake_reproduces(res, out, tmp_path):
    """`lycotools merge BASE FILE` (bake into the diffusers folder) gives back the trained UNet and text encoder."""
    from lycotools.ops import merge as M
    from lycotools.train.model import load_base

    folder = tmp_path / "merged"
    M.bake(str(SD1), [(str(out), 1.0)], folder, M.BakeOptions(no_date=True), quiet=True)
    merged = load_base(folder, need_vae=False)
    g = torch.Generator().manual_seed(7)
    x, ehs, t = torch.randn(2, 4, RES // 2, RES // 2, generator=g), torch.randn(2, 77, 32, generator=g), torch.tensor([3, 700])
    ids = torch.tensor([[523, 5, 17, 99, 524] + [524] * 72])
    with torch.no_grad():
        a = res.base.unet.eval()(x, t, ehs).sample
        b = merged.unet.eval()(x, t, ehs).sample
        ta = res.base.text_encoders["text_encoder"].eval()(ids).last_hidden_state
        tb = merged.text_encoders["text_encoder"].eval()(ids).last_hidden_state
    assert torch.allclose(a, b, atol=1e-4, rtol=1e-4), (a - b).abs().max()
    assert torch.allclose(ta, tb, atol=1e-4, rtol=1e-4), (ta - tb).abs().max()


def test_lora_loads_in_diffusers(tmp_path, data):
    diffusers = pytest.importorskip("diffusers")
    out = tmp_path / "l.safetensors"
    res = _train(data, out, algo="locon", rank=2, alpha=1.0, steps=2, train_text_encoder=True)
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(SD1, safety_checker=None, local_files_only=True)
    models = {"unet": pipe.unet, "text_encoder": pipe.text_encoder}
    before = {c: {k: v.clone() for k, v in m.state_dict().items()} for c, m in models.items()}
    pipe.load_lora_weights(str(out))
    pipe.fuse_lora()
    after = {c: m.state_dict() for c, m in models.items()}
    checked = 0
    for lm in _resolved(out).parsed:
        c = lm.target.component
        mod = lm.target.module
        if c == "text_encoder" and not any(k.startswith("text_model.") for k in before[c]):
            mod = mod[len("text_model."):]
        k = mod + ".weight"
        got = after[c].get(k, after[c].get(mod + ".base_layer.weight"))
        assert torch.allclose(got - before[c][k], lm.module.delta(before[c][k].shape), atol=1e-6), k
        checked += 1
    assert checked == len(res.ranks) and any(lm.target.component == "text_encoder" for lm in _resolved(out).parsed)


def test_adalora_budget_gives_uneven_ranks(tmp_path, data):
    out = tmp_path / "ada.safetensors"
    res = _train(data, out, algo="adalora", init_rank=4, target_rank=2, alpha=4.0, tinit=2, tfinal=3, delta_t=1,
                 orth_reg=0.1, steps=10)
    n_layers = len(res.network.targets)
    ranks = list(res.ranks.values())
    assert len(set(ranks)) > 1, ranks
    assert sum(ranks) <= 2 * n_layers
    assert max(ranks) <= 4
    meta = open_source(out).metadata
    assert meta["ss_network_module"] == "networks.lora"
    assert res.allocator.budget == 2 * n_layers
    assert _merged_unet_matches(res, out) == len(ranks)
    rows = list(csv.DictReader(open(res.loss_log)))
    assert int(rows[0]["budget"]) == 4 * n_layers and int(rows[-1]["budget"]) == 2 * n_layers


def test_textual_inversion_loads_in_diffusers(tmp_path, data):
    diffusers = pytest.importorskip("diffusers")
    from safetensors.torch import load_file

    out = tmp_path / "emb.safetensors"
    res = _train(data, out, algo="ti", token="<thing>", init_word="red", vectors=2, steps=4, lr=5e-2)
    assert all(math.isfinite(l) for l in res.losses)
    emb = load_file(out)["emb_params"]
    assert emb.shape == (2, 32)
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(SD1, safety_checker=None, local_files_only=True)
    init = pipe.text_encoder.get_input_embeddings().weight[pipe.tokenizer.encode("red", add_special_tokens=False)[0]]
    assert (emb[0] - init).abs().max() > 0, "the embedding did not train"
    pipe.load_textual_inversion(str(out), token="<thing>")
    ids = pipe.tokenizer.convert_tokens_to_ids(["<thing>", "<thing>_1"])
    assert torch.equal(pipe.text_encoder.get_input_embeddings().weight[ids].detach(), emb)
    # the rest of the vocabulary is untouched
    old = res.base.text_encoders["text_encoder"].get_input_embeddings().weight[:100].detach()
    assert torch.equal(old, pipe.text_encoder.get_input_embeddings().weight[:100].detach())


def test_dreambooth_prior_loss_logged(tmp_path, data):
    cls = _images(tmp_path / "class", n=3, seed=1, caption=None)
    out = tmp_path / "db.safetensors"
    res = _train(data, out, algo="lora", rank=2, steps=3, class_data=str(cls), class_prompt="a photo of a thing",
                 prior_loss_weight=0.5)
    assert len(res.prior_losses) == 3 and all(math.isfinite(p) and p > 0 for p in res.prior_losses)
    rows = list(csv.DictReader(open(res.loss_log)))
    assert all(float(r["prior_loss"]) > 0 for r in rows)
    assert open_source(out).metadata["ss_num_reg_images"] == "3"


def test_resume_continues_the_same_run(tmp_path, data):
    from safetensors.torch import load_file

    a = tmp_path / "a.safetensors"
    _train(data, a, algo="lora", rank=2, steps=4, save_every=2, save_state=True, lr_scheduler="linear",
           lr_warmup_steps=1, min_snr_gamma=5.0, noise_offset=0.05, grad_accum=2, batch_size=1,
           shuffle_caption=True, caption_tag_dropout_rate=0.5)
    state = tmp_path / "a-step000002.state.pt"
    assert state.exists() and (tmp_path / "a-step000002.safetensors").exists()
    b = tmp_path / "b.safetensors"
    _train(data, b, algo="lora", rank=2, steps=4, save_state=False, lr_scheduler="linear", lr_warmup_steps=1,
           min_snr_gamma=5.0, noise_offset=0.05, grad_accum=2, batch_size=1, resume=str(state),
           shuffle_caption=True, caption_tag_dropout_rate=0.5)
    ta, tb = load_file(a), load_file(b)
    assert ta.keys() == tb.keys()
    for k in ta:
        assert torch.allclose(ta[k], tb[k], atol=1e-6), k


def test_single_file_with_config_same_bytes_as_folder(tmp_path, data):
    """A single-file base (+ --config for its tiny configs and tokenizer) trains exactly like the same
    model as a diffusers folder, and reruns with the same seed give the same bytes."""
    from lycotools.train.trainer import TrainOptions, train

    outs = []
    for i, (base, cfg) in enumerate([(SD1, None), (FIX / "sd1/base.safetensors", str(SD1)), (SD1, None)]):
        (tmp_path / str(i)).mkdir()
        out = tmp_path / str(i) / "x.safetensors"
        opts = TrainOptions(algo="locon", rank=2, steps=2, lr=1e-2, resolution=RES, batch_size=2, no_date=True,
                            device="cpu", config_dir=cfg, seed=3)
        train(base, data.parent, out, opts, quiet=True)
        outs.append(out)
    assert outs[0].read_bytes() == outs[2].read_bytes()
    from safetensors.torch import load_file

    a, b = load_file(outs[0]), load_file(outs[1])
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6), k


def _sdxl_config_folder(folder: Path) -> Path:
    """Configs + tokenizers for the tiny SDXL fixture (a single file: it needs --config)."""
    import importlib.util
    import json
    import shutil

    spec = importlib.util.spec_from_file_location("make_fixtures", FIX / "make_fixtures.py")
    mf = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mf)
    cfgs = {"unet": dict(mf.SDXL_UNET), "vae": dict(mf.SDXL_VAE),
            "text_encoder": mf.clip_cfg(32, 2, 4, 64, "quick_gelu").to_dict(),
            "text_encoder_2": mf.clip_cfg(48, 2, 4, 96, "gelu", projection_dim=48).to_dict()}
    for c, cfg in cfgs.items():
        (folder / c).mkdir(parents=True)
        (folder / c / "config.json").write_text(json.dumps(cfg, default=list))
    for t in ("tokenizer", "tokenizer_2"):
        shutil.copytree(SD1 / "tokenizer", folder / t)
    return folder


def test_sdxl_lora_with_both_text_encoders(tmp_path, data):
    from lycotools.train.trainer import TrainOptions, train

    cfg = _sdxl_config_folder(tmp_path / "cfg")
    out = tmp_path / "xl.safetensors"
    opts = TrainOptions(algo="lora", rank=2, steps=2, lr=1e-2, resolution=RES, batch_size=2, no_date=True,
                        device="cpu", config_dir=str(cfg), train_text_encoder=True)
    res = train(FIX / "sdxl/base.safetensors", data.parent, out, opts, quiet=True)
    assert all(math.isfinite(l) for l in res.losses)
    af = AdapterFile.open(out).resolve(ModelIndex.from_source(open_source(FIX / "sdxl/base.safetensors")))
    assert af.parsed and not af.unmatched and not af.errors
    names = [lm.name for lm in af.parsed]
    assert any(n.startswith("lora_unet_input_blocks_") for n in names)  # SDXL files use sgm UNet names
    assert any(n.startswith("lora_te1_text_model_") for n in names) and any(n.startswith("lora_te2_text_model_") for n in names)
    assert open_source(out).metadata["ss_base_model_version"] == "sdxl_base_v1-0"


def test_aspect_buckets(tmp_path):
    from PIL import Image

    from lycotools.train.data import bucket_for

    assert bucket_for(1024, 1024, 512) == (512, 512)
    w, h = bucket_for(1920, 1080, 512)
    assert w % 64 == 0 and h % 64 == 0 and w * h <= 512 * 512 and w > h
    d = tmp_path / "data" / "1_x"
    d.mkdir(parents=True)
    for i, size in enumerate([(64, 32), (64, 32), (32, 64), (48, 48)]):
        Image.new("RGB", size, (i * 40, 100, 200)).save(d / f"i{i}.png")
        (d / f"i{i}.txt").write_text("a thing")
    res = _train(d, tmp_path / "b.safetensors", algo="lora", rank=2, steps=3, enable_bucket=True, bucket_step=16,
                 cache_latents_to_disk=True)
    assert all(math.isfinite(l) for l in res.losses)
    info = json.loads(open_source(tmp_path / "b.safetensors").metadata["ss_bucket_info"])
    sizes = sorted(tuple(b["resolution"]) for b in info["buckets"].values())
    assert len(sizes) == 3 and (48, 16) in sizes and (16, 48) in sizes, sizes
    assert len(list(d.glob("*.lycotools-latents-*.safetensors"))) == 4  # cached beside the images


def test_dataset_config_toml(tmp_path, data):
    reg = _images(tmp_path / "reg", n=2, seed=4, caption=None)
    toml = tmp_path / "ds.toml"
    toml.write_text(f"""
[general]
caption_extension = ".txt"
shuffle_caption = true

[[datasets]]
resolution = {RES}
batch_size = 1

  [[datasets.subsets]]
  image_dir = "{data}"
  num_repeats = 3
  keep_tokens = 1
  caption_tag_dropout_rate = 0.25

  [[datasets.subsets]]
  image_dir = "reg"
  class_tokens = "a photo of a thing"
  is_reg = true
""")
    out = tmp_path / "t.safetensors"
    res = _train(toml, out, algo="lora", rank=2, steps=2, resolution=512, batch_size=4)
    meta = open_source(out).metadata
    assert meta["ss_num_train_images"] == "12" and meta["ss_num_reg_images"] == "2"
    assert meta["ss_batch_size_per_device"] == "1" and meta["ss_resolution"] == f"({RES}, {RES})"
    assert meta["ss_shuffle_caption"] == "True" and meta["ss_keep_tokens"] == "0"  # [general]; the subset's own below
    assert len(res.prior_losses) == 2
    from lycotools.errors import BadInput
    from lycotools.train.data import load_dataset_config

    items, reg, settings, ignored = load_dataset_config(toml)
    assert {it.caption_args == {"keep_tokens": 1, "tag_dropout_rate": 0.25} for it in items} == {True}
    assert {it.caption_args for it in reg} == {None} and settings["shuffle_caption"] is True and not ignored
    toml.write_text(toml.read_text().replace("keep_tokens = 1", "keep_tokens = -2"))
    with pytest.raises(BadInput, match="keep_tokens -2 must be"):
        load_dataset_config(toml)


def test_sdxl_textual_inversion_and_v_prediction(tmp_path, data, monkeypatch):
    """SDXL TI with v-prediction; its sample images use the trained token where a prompt names it (and only
    there) and sample with a v-prediction scheduler."""
    from safetensors.torch import load_file

    from lycotools.train import sample
    from lycotools.train.trainer import TrainOptions, train

    schedulers = []
    make = sample.Sampler._pipeline

    def spy(self, view):
        pipe = make(self, view)
        schedulers.append(pipe.scheduler.config)
        return pipe

    monkeypatch.setattr(sample.Sampler, "_pipeline", spy)
    prompts = tmp_path / "p.txt"
    prompts.write_text("a <thing> photo --d 3 --w 48\na photo --d 3 --l 4\na photo --n <thing> --d 3 --l 4\n")
    cfg = _sdxl_config_folder(tmp_path / "cfg")
    out = tmp_path / "xl_emb.safetensors"
    opts = TrainOptions(algo="ti", token="<thing>", init_word="red", vectors=2, steps=2, lr=1e-2, resolution=RES,
                        no_date=True, device="cpu", config_dir=str(cfg), v_pred=True, sample_every=2,
                        sample_at_first=True, sample_prompts=str(prompts), sample_steps=2)
    res = train(FIX / "sdxl/base.safetensors", data.parent, out, opts, quiet=True)
    d = tmp_path / "xl_emb_samples"
    first, last = ([_png(d / f"xl_emb_{s:06d}_{i:02d}.png") for i in range(3)] for s in (0, 2))
    assert first[0].shape == (RES, 48, 3) and all(a.std() > 1 for a in first + last)
    assert (first[0] != last[0]).any() and (first[2] != last[2]).any(), "the trained token is not in the samples"
    assert (first[1] == last[1]).all(), "a prompt without the token changed (was the token added to it?)"
    assert [c.prediction_type for c in schedulers] == ["v_prediction"] * 2
    assert all(math.isfinite(l) for l in res.losses)
    t = load_file(out)
    assert t["clip_l"].shape == (2, 32) and t["clip_g"].shape == (2, 48)  # the SDXL embedding layout
    meta = open_source(out).metadata
    assert meta["ss_v_parameterization"] == "True" and meta["modelspec.prediction_type"] == "v"


def _cli(*args):
    from lycotools.commands.train import command

    return CliRunner().invoke(command, [str(a) for a in args])


def test_cli_bad_data_is_exit_2(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    r = _cli(SD1, empty, "-o", tmp_path / "x.safetensors", "--steps", "1")
    assert r.exit_code == 2 and "no images found" in r.output
    nocap = _images(tmp_path / "nocap", n=1, caption=None)
    r = _cli(SD1, nocap, "-o", tmp_path / "x.safetensors", "--steps", "1")
    assert r.exit_code == 2 and "no caption file" in r.output and "--default-caption" in r.output
    bad = _images(tmp_path / "bad", n=1)
    (bad / "broken.png").write_bytes(b"not a png")
    (bad / "broken.txt").write_text("x")
    r = _cli(SD1, bad, "-o", tmp_path / "x.safetensors", "--steps", "1")
    assert r.exit_code == 2 and "broken.png" in r.output and "cannot read the image" in r.output
    r = _cli(SD1, bad, "-o", tmp_path / "x.safetensors")
    assert r.exit_code == 2 and "--steps" in r.output
    r = _cli(SD1, bad, "-o", tmp_path / "x.safetensors", "--steps", "1", "--algo", "ti")
    assert r.exit_code == 2 and "--token" in r.output
    r = _cli(tmp_path / "nope.safetensors", nocap, "-o", tmp_path / "x.safetensors", "--steps", "1",
             "--default-caption", "x")
    assert r.exit_code == 2 and "nope.safetensors" in r.output
    assert not (tmp_path / "x.safetensors").exists()


def test_cli_trains_lora(tmp_path, data):
    out = tmp_path / "cli.safetensors"
    r = _cli(SD1, data.parent, "-o", out, "--epochs", "1", "--batch-size", "4", "--resolution", RES, "--rank", "2",
             "--device", "cpu", "--save-precision", "fp16", "--no-date", "-q")
    assert r.exit_code == 0, r.output
    assert out.exists() and len(list(csv.DictReader(open(tmp_path / "cli_loss.csv")))) == 2  # 8 samples / 4
    src = open_source(out)
    assert {src.dtype(k) for k in src.keys() if not k.endswith(".alpha")} == {torch.float16}
    assert {src.dtype(k) for k in src.keys() if k.endswith(".alpha")} == {torch.float32}
    r = _cli(SD1, data.parent, "-o", out, "--steps", "1", "--resolution", RES, "-q")
    assert r.exit_code == 2 and "already exists" in r.output


# ------------------------------------------------------------------------------------------------ captions, clip skip

CAP = "thing, red, blue, green, small, round"


def test_caption_processing_is_kohyas_and_seeded():
    from lycotools.train.data import CaptionOptions, process_caption

    tags = CAP.split(", ")

    def draws(co, seed, n):
        g = torch.Generator().manual_seed(seed)
        return [process_caption(CAP, co, g) for _ in range(n)]

    # keep-tokens alone changes nothing (kohya only splits when shuffling or dropping tags), and draws nothing
    g = torch.Generator().manual_seed(0)
    before = g.get_state()
    assert process_caption(CAP, CaptionOptions(keep_tokens=2), g) == CAP and torch.equal(g.get_state(), before)
    # shuffle after the first tag: fixed strings for seed 0, the first tag in front, every tag once
    co = CaptionOptions(shuffle=True, keep_tokens=1)
    outs = draws(co, 0, 240)
    assert outs[:3] == ["thing, round, red, blue, small, green", "thing, small, round, red, blue, green",
                        "thing, green, round, blue, small, red"]
    assert all(o.split(", ")[0] == "thing" and sorted(o.split(", ")) == sorted(tags) for o in outs)
    assert len(set(outs)) > 80  # of the 120 orders of the 5 free tags
    assert draws(co, 0, 240) == outs and draws(co, 1, 240) != outs
    # caption dropout: the whole caption or nothing, about 25 % empty
    outs = draws(CaptionOptions(dropout_rate=0.25), 3, 2000)
    assert set(outs) == {"", CAP} and 420 < outs.count("") < 580
    # tag dropout after 2 kept tags: the prefix always stays, the rest keeps its order, about half survive
    outs = draws(CaptionOptions(keep_tokens=2, tag_dropout_rate=0.5), 4, 1000)
    survived = 0
    for o in outs:
        parts = o.split(", ")
        assert parts[:2] == ["thing", "red"]
        assert parts[2:] == [t for t in tags[2:] if t in parts[2:]]
        survived += len(parts) - 2
    assert 0.45 < survived / 4000 < 0.55
    assert draws(CaptionOptions(keep_tokens=1, tag_dropout_rate=1.0), 0, 1) == ["thing"]
    assert draws(CaptionOptions(dropout_rate=1.0, shuffle=True), 0, 1) == [""]
    # all together, seeded: fixed strings
    assert draws(CaptionOptions(shuffle=True, keep_tokens=2, tag_dropout_rate=0.5, dropout_rate=0.2), 5, 4) == [
        "thing, red, small, green", "", "thing, red, round, green, blue, small", "thing, red, blue, green"]
    # tags are stripped and re-joined with ", " as kohya does
    g = torch.Generator().manual_seed(0)
    assert process_caption(" a ,b,  c d ", CaptionOptions(keep_tokens=3, shuffle=True), g) == "a, b, c d"


def test_caption_options_reach_training_and_metadata(tmp_path, monkeypatch):
    from lycotools.train import trainer

    d = _images(tmp_path / "data" / "1_x", n=2, caption=CAP)  # captions "thing, ..., round 0"
    seen = []
    call = trainer.TextConditioner.__call__

    def spy(self, captions, device, size=None):
        seen.append(list(captions))
        return call(self, captions, device, size)

    monkeypatch.setattr(trainer.TextConditioner, "__call__", spy)
    kw = dict(algo="lora", rank=2, steps=6, shuffle_caption=True, keep_tokens=1, caption_dropout_rate=0.3,
              caption_tag_dropout_rate=0.2, clip_skip=2, seed=1, train_text_encoder=True)
    (tmp_path / "1").mkdir(), (tmp_path / "2").mkdir()
    a, b = tmp_path / "1" / "x.safetensors", tmp_path / "2" / "x.safetensors"  # same name: same metadata
    res = _train(d, a, **kw)
    # clip skip 2 on the 2-layer encoder conditions on layer 0's output: only layer 0 gets adapters
    te_modules = [t.module for t in res.network.targets if t.component == "text_encoder"]
    assert len(te_modules) == 6 and all(".layers.0." in m for m in te_modules), te_modules
    first = [c for batch in seen for c in batch]
    assert len(first) == 12
    assert 1 <= first.count("") <= 8
    originals = [f"{CAP} {i}" for i in range(2)]
    shuffled = 0
    for c in first:
        if not c:
            continue
        parts = c.split(", ")
        src = next(o.split(", ") for o in originals if set(parts) <= set(o.split(", ")))
        assert parts[0] == "thing"
        shuffled += parts != [t for t in src if t in parts]
    assert shuffled >= 3
    meta = open_source(a).metadata
    assert (meta["ss_shuffle_caption"], meta["ss_keep_tokens"], meta["ss_caption_dropout_rate"],
            meta["ss_caption_tag_dropout_rate"], meta["ss_clip_skip"]) == ("True", "1", "0.3", "0.2", "2")
    seen.clear()
    _train(d, b, **kw)  # same seed: the same captions and the same bytes
    assert [c for batch in seen for c in batch] == first and a.read_bytes() == b.read_bytes()
    seen.clear()
    _train(d, b, algo="lora", rank=2, steps=2, seed=1)  # off: captions as written, defaults recorded
    assert {c for batch in seen for c in batch} <= set(originals)
    meta = open_source(b).metadata
    assert (meta["ss_shuffle_caption"], meta["ss_keep_tokens"], meta["ss_caption_dropout_rate"],
            meta["ss_caption_tag_dropout_rate"], meta["ss_clip_skip"]) == ("False", "0", "0.0", "0.0", "None")


def test_clip_skip_conditioning(tmp_path):
    from lycotools.errors import BadInput
    from lycotools.train.model import load_base
    from lycotools.train.trainer import TextConditioner

    base = load_base(SD1, need_vae=False)
    te = base.text_encoders["text_encoder"]
    caps = ["a photo of a thing, red", ""]
    ids = base.tokenizers["text_encoder"](caps, padding="max_length", max_length=77, truncation=True,
                                          return_tensors="pt").input_ids
    with torch.no_grad():
        hs = te(ids, output_hidden_states=True).hidden_states  # embeddings, layer 1, layer 2
        ln = te.final_layer_norm
        want = {k: F.layer_norm(hs[-k], ln.normalized_shape, ln.weight, ln.bias, ln.eps) for k in (1, 2)}
        got = {k: TextConditioner(base, RES, clip_skip=k)(caps, "cpu")[0] for k in (1, 2)}
        default = TextConditioner(base, RES)(caps, "cpu")[0]
    assert torch.allclose(got[2], want[2], atol=1e-6) and torch.allclose(got[1], want[1], atol=1e-6)
    assert torch.equal(got[1], default)
    assert (got[2] - default).abs().max() > 0.1
    with pytest.raises(BadInput, match="only 2 layers"):
        TextConditioner(base, RES, clip_skip=3)
    # SDXL: kohya ignores clip skip (penultimate layers of both encoders, always)
    cfg = _sdxl_config_folder(tmp_path / "cfg")
    xl = load_base(FIX / "sdxl/base.safetensors", str(cfg), need_vae=False)
    cond = TextConditioner(xl, RES, clip_skip=2)
    assert cond.clip_skip is None
    with torch.no_grad():
        assert torch.equal(cond(caps, "cpu")[0], TextConditioner(xl, RES)(caps, "cpu")[0])


def test_place_keeps_trained_weights_float32():
    from lycotools.train.trainer import place

    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)).requires_grad_(False)
    m[0].weight.requires_grad_(True)
    w = m[0].weight.detach().clone()
    place(m, "cpu", torch.bfloat16)
    assert m[0].weight.dtype == torch.float32 and torch.equal(m[0].weight.detach(), w)  # no bf16 round trip
    assert m[0].bias.dtype == m[1].weight.dtype == torch.bfloat16


def test_cli_bad_new_options_exit_2(tmp_path, data):
    out = tmp_path / "x.safetensors"
    cases = [
        (["--algo", "lora", "--tucker"], "--tucker"),
        (["--algo", "full", "--tucker"], "--tucker"),
        (["--algo", "locon", "--tucker", "--conv-rank", "0"], "--conv-rank"),
        (["--algo", "full", "--dora"], "--dora"),
        (["--keep-tokens", "-1"], "--keep-tokens -1"),
        (["--caption-dropout-rate", "1.5"], "--caption-dropout-rate"),
        (["--caption-tag-dropout-rate", "-0.1"], "--caption-tag-dropout-rate"),
        (["--clip-skip", "0"], "--clip-skip"),
        (["--clip-skip", "3", "--device", "cpu"], "only 2 layers"),
    ]
    for extra, msg in cases:
        r = _cli(SD1, data.parent, "-o", out, "--steps", "1", "--resolution", RES, *extra)
        assert r.exit_code == 2 and msg in r.output, (extra, r.output)
        errors = [ln for ln in r.output.splitlines() if ln.startswith("lycotools: error:")]
        assert len(errors) == 1, r.output
    assert not out.exists()


def test_full_targets_and_conv_rank_0():
    """--algo full: the linears and convs of the blocks the adapters target; --conv-rank 0 leaves the k×k convs out.
    Only the targets' own weights and biases require gradients."""
    from lycotools.train.model import load_base
    from lycotools.train.modules import inject

    for conv_rank in (1, 0):
        base = load_base(SD1, need_vae=False)
        net = inject(base, "full", rank=8, alpha=8, conv_rank=conv_rank, train_text_encoder=True)
        shapes = [tuple(t.layer.weight.shape) for t in net.targets]
        kxk = sum(len(s) == 4 and s[2:] != (1, 1) for s in shapes)
        assert (kxk > 10) if conv_rank else (kxk == 0), kxk
        assert sum(t.component == "text_encoder" for t in net.targets) == 12
        trainable = {id(p) for m in (base.unet, base.text_encoders["text_encoder"]) for p in m.parameters() if p.requires_grad}
        assert trainable == {id(p) for t in net.targets for p in t.layer.parameters()}


def test_sd2_v_prediction_locon_bakes_back_to_the_trained_model(tmp_path, data):
    """SD2 (OpenCLIP text encoder, linear proj_in/out) with the v-prediction read from the folder's scheduler:
    the file says so in its metadata, and baking it into the base gives the trained UNet and text encoder."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    from lycotools.ops.merge import BakeOptions, bake
    from lycotools.train.trainer import TrainOptions, train

    sd2 = FIX / "sd2" / "diffusers"
    out = tmp_path / "sd2_locon.safetensors"
    opts = TrainOptions(algo="locon", rank=4, conv_rank=2, steps=4, lr=1e-2, batch_size=2, resolution=RES,
                        train_text_encoder=True, no_date=True, device="cpu")
    res = train(sd2, data.parent, out, opts, overwrite=True, quiet=True, keep_models=True)
    assert all(math.isfinite(l) for l in res.losses)
    meta = open_source(out).metadata
    assert meta["ss_v_parameterization"] == "True" and meta["ss_base_model_version"] == "sd_v2_v"
    assert meta["modelspec.architecture"].startswith("stable-diffusion-v2-768-v")
    baked = tmp_path / "baked"
    bake(str(sd2), [(str(out), 1.0)], baked, BakeOptions(no_date=True), quiet=True)
    unet = UNet2DConditionModel.from_pretrained(str(baked / "unet")).eval()
    te = CLIPTextModel.from_pretrained(str(baked / "text_encoder")).eval()
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 4, RES // 2, RES // 2, generator=g)
    ehs = torch.randn(2, 77, unet.config.cross_attention_dim, generator=g)
    ids = torch.randint(0, te.config.vocab_size, (2, 77), generator=g)
    base_unet = UNet2DConditionModel.from_pretrained(str(sd2 / "unet")).eval()
    with torch.no_grad():
        y = res.base.unet.eval()(x, torch.tensor([10, 500]), ehs).sample
        assert (y - base_unet(x, torch.tensor([10, 500]), ehs).sample).abs().max() > 1e-4, "training changed nothing"
        torch.testing.assert_close(unet(x, torch.tensor([10, 500]), ehs).sample, y, atol=1e-4, rtol=1e-4)
        trained_te = res.base.text_encoders["text_encoder"].eval()
        torch.testing.assert_close(te(ids).last_hidden_state, trained_te(ids)[0], atol=1e-4, rtol=1e-4)


# ------------------------------------------------------------------------------------------------ sample images

PROMPTS = """# kohya prompt file
a photo of a thing, red

red thing --n blue, green --W 48 --h 32 --s 3 --l 5 --d 7 --ss euler_a
"""


def _png(path):
    import numpy as np
    from PIL import Image

    return np.asarray(Image.open(path).convert("RGB")).astype(float)


def test_sample_images_do_not_change_the_run(tmp_path, data):
    """--sample-every 2 --sample-at-first: the PNGs exist at the prompts' sizes and are not blank, the adapter
    hooks are in them (step 0 ≠ step 4), and the adapter file, the global RNG and the modules' train/eval
    modes are exactly those of the same run without sampling; the same seed again (through the CLI) gives
    the same PNG bytes and adapter bytes."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(PROMPTS)
    kw = dict(algo="lora", rank=2, steps=4, seed=1, train_text_encoder=True)
    runs = {}
    for name, extra in [("plain", {}), ("sampled", dict(sample_every=2, sample_at_first=True, sample_steps=2,
                                                         sample_prompts=str(prompts)))]:
        (tmp_path / name).mkdir()
        res = _train(data, tmp_path / name / "x.safetensors", **kw, **extra)
        modes = [m.training for root in (res.base.unet, *res.base.text_encoders.values()) for m in root.modules()]
        runs[name] = (res, torch.get_rng_state(), modes)
    assert not (tmp_path / "plain" / "x_samples").exists()
    out_dir = tmp_path / "sampled" / "x_samples"
    names = sorted(p.name for p in out_dir.iterdir())
    assert names == [f"x_{s:06d}_{i:02d}.png" for s in (0, 2, 4) for i in (0, 1)], names
    for s in (0, 2, 4):
        a, b = _png(out_dir / f"x_{s:06d}_00.png"), _png(out_dir / f"x_{s:06d}_01.png")
        assert a.shape == (RES, RES, 3) and b.shape == (32, 48, 3)  # default: --resolution; --W 48 --h 32
        assert a.std() > 1 and b.std() > 1
    assert (_png(out_dir / "x_000000_00.png") != _png(out_dir / "x_000004_00.png")).any(), "the adapter is not in the samples"
    assert (tmp_path / "plain" / "x.safetensors").read_bytes() == (tmp_path / "sampled" / "x.safetensors").read_bytes()
    assert torch.equal(runs["plain"][1], runs["sampled"][1]), "sampling drew from torch's global RNG"
    assert runs["plain"][2] == runs["sampled"][2] and any(runs["sampled"][2]), "train/eval modes not restored"
    # the same seed again, through the CLI: the same images and the same adapter
    (tmp_path / "cli").mkdir()
    r = _cli(SD1, data.parent, "-o", tmp_path / "cli" / "x.safetensors", "--algo", "lora", "--rank", 2, "--steps", 4,
             "--seed", 1, "--train-text-encoder", "--lr", "1e-2", "--batch-size", 2, "--resolution", RES, "--device",
             "cpu", "--no-date", "--sample-every", 2, "--sample-at-first", "--sample-steps", 2,
             "--sample-prompts", prompts)
    assert r.exit_code == 0, r.output
    lines = [ln for ln in r.output.splitlines() if "sample images in" in ln]
    assert [ln.split("lycotools: ")[-1].split(":")[0] for ln in lines] == ["step 0", "step 2", "step 4"], r.output
    assert "ignored: --ss" in r.output  # kohya's sampler option: not supported, said once
    cli_dir = tmp_path / "cli" / "x_samples"
    assert sorted(p.name for p in cli_dir.iterdir()) == names
    for n in names:
        assert (cli_dir / n).read_bytes() == (out_dir / n).read_bytes(), n
    assert (tmp_path / "cli" / "x.safetensors").read_bytes() == (tmp_path / "plain" / "x.safetensors").read_bytes()


def test_sample_prompt_file(tmp_path):
    from lycotools.errors import BadInput
    from lycotools.train.sample import Sampler, SamplePrompt, load_prompts, parse_line, sample_path
    from lycotools.train.trainer import TrainOptions, _check

    p = tmp_path / "p.txt"
    p.write_text(PROMPTS + "  \n# --w 8\n--n only a negative --l 1\nx --w 70 --H 71 --s 1000 --l 0 --d 0 --cn a.png\n")
    prompts, ignored = load_prompts(p)
    assert prompts == [
        SamplePrompt("a photo of a thing, red"),
        SamplePrompt("red thing", negative="blue, green", width=48, height=32, steps=3, scale=5.0, seed=7),
        SamplePrompt("", negative="only a negative", scale=1.0),
        SamplePrompt("x", width=64, height=64, steps=1000, scale=0.0, seed=0),  # sizes rounded down to 8 px
    ]
    assert ignored == ["--ss", "--cn"]
    # defaults: the training resolution, --sample-steps, kohya's CFG 7.5, --seed + the prompt's index
    r = [sp.resolved(i, resolution=256, steps=20, seed=10) for i, sp in enumerate(prompts)]
    assert (r[0].width, r[0].height, r[0].steps, r[0].scale, r[0].seed, r[0].negative) == (256, 256, 20, 7.5, 10, "")
    assert (r[1].width, r[1].height, r[1].steps, r[1].scale, r[1].seed) == (48, 32, 3, 5.0, 7)
    assert (r[2].seed, r[2].scale, r[3].seed, r[3].scale) == (12, 1.0, 0, 0.0)
    assert parse_line("  # a comment --w 64") == (None, []) and parse_line("") == (None, [])
    assert parse_line("a--b c --n x")[0] == SamplePrompt("a--b c", negative="x")  # options start at " --"
    for line, msg in [("a --w abc", "--w 'abc'"), ("a --s 0", "1 to 1000"), ("a --h 4", "at least 8"),
                      ("a --l -1", "--l '-1'"), ("a --d 1.5", "--d '1.5'"), ("a -- ", "expected an option")]:
        with pytest.raises(BadInput, match=re.escape(msg)):
            parse_line(line)
    p.write_text("ok\nbad --w x\n")
    with pytest.raises(BadInput, match="line 2: --w 'x'"):
        load_prompts(p)
    p.write_text("# nothing\n\n   \n")
    with pytest.raises(BadInput, match="no prompts"):
        load_prompts(p)
    with pytest.raises(BadInput, match="no such prompt file"):
        load_prompts(tmp_path / "missing.txt")
    assert sample_path(tmp_path / "my.lora.safetensors", 12, 3) == tmp_path / "my.lora_samples" / "my.lora_000012_03.png"
    # a TI token in a prompt becomes all its vectors' tokens, as in training; prompts without it stay as written
    ti = Sampler(None, None, [], tmp_path / "x.safetensors", device="cpu", resolution=8, steps=1, seed=0,
                 ti_tokens=["<t>", "<t>_1"])
    assert ti._expand("a <t>, <t>x (<t>)") == "a <t> <t>_1, <t>x (<t> <t>_1)" and ti._expand("a b") == "a b"
    # option checks: sampling needs prompts, prompts need a cadence
    ok = dict(steps=1, sample_prompts=str(p))
    for kw, msg in [(dict(sample_every=2), "--sample-every needs --sample-prompts"),
                    (dict(sample_at_first=True), "--sample-at-first needs --sample-prompts"),
                    (dict(sample_prompts=str(p)), "--sample-prompts needs --sample-every"),
                    (dict(ok, sample_every=0), "--sample-every 0"),
                    (dict(ok, sample_every=1, sample_steps=0), "--sample-steps 0")]:
        with pytest.raises(BadInput, match=re.escape(msg)):
            _check(TrainOptions(**{"steps": 1, **kw}))
    _check(TrainOptions(**ok, sample_every=5))


def test_cli_sample_options_exit_2(tmp_path, data):
    out = tmp_path / "x.safetensors"
    empty = tmp_path / "empty.txt"
    empty.write_text("# only a comment\n")
    cases = [
        (["--sample-every", "2"], "--sample-every needs --sample-prompts"),
        (["--sample-every", "2", "--sample-prompts", tmp_path / "missing.txt"], "no such prompt file"),
        (["--sample-every", "2", "--sample-prompts", empty], "no prompts"),
        (["--sample-prompts", empty], "--sample-prompts needs --sample-every"),
    ]
    for extra, msg in cases:
        r = _cli(SD1, data.parent, "-o", out, "--steps", "1", "--resolution", RES, *extra)
        errors = [ln for ln in r.output.splitlines() if ln.startswith("lycotools: error:")]
        assert r.exit_code == 2 and msg in r.output and len(errors) == 1, (extra, r.output)
        assert len(r.output.strip().splitlines()) == 1, r.output
    assert not out.exists()

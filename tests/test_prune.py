"""rank-prune: exact SVD forms, rank rules, the global budget, outputs that load, and the sensitivity score."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from lycotools.adapter_file import AdapterFile
from lycotools.io.readers import open_source
from lycotools.linalg import exact_svd, relative_error
from lycotools.ops.inspect import guess_adapter_arch
from lycotools.ops.prune import (Layer, PruneOptions, choose_ranks, kohya_rank_for_mode, measure_normalisations,
                                 prune, rank_for_mode, read_layers)

FIX = Path(__file__).resolve().parent.parent / "fixtures"
AD = FIX / "adapters"
SD1_BASE = FIX / "sd1" / "base.safetensors"


def _deltas(path, base=None):
    """{(component, module): ΔW in the target's shape} of any adapter, through AdapterFile."""
    af = AdapterFile.open(path)
    if base is not None:
        from lycotools.layouts.model_index import ModelIndex

        idx = ModelIndex.from_source(open_source(base))
    else:
        _, idx, _ = guess_adapter_arch(af)
    af.resolve(idx)
    out = {}
    for lm in af.parsed:
        if lm.module.rank == 0:
            continue
        layer_shape = _shape(lm)
        out[(lm.target.component, lm.target.module)] = lm.module.delta(layer_shape)
    return out


def _shape(lm):
    from lycotools.ops.prune import _weight_shape

    return _weight_shape(lm)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # torch.linalg.qr on tiny matrices takes ~15 ms with 2 OpenMP threads on a busy 2-core machine
    # (4 µs with one); the fixtures' layers are tiny, so run this module single-threaded
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _opts(**kw):
    kw.setdefault("dtype", "fp32")
    kw.setdefault("no_date", True)
    return PruneOptions(**kw)


# ------------------------------------------------------------------------------------------------ exactness

LORA_LIKE = ["sd1_kohya_lora.safetensors", "sd1_kohya_locon.safetensors", "sd1_comfy_lora.safetensors",
             "sd1_diffusers_lora.safetensors", "sd1_diffusers_old.safetensors", "sd1_lycoris_prefix.safetensors",
             "sd1_ldm_named_lora.safetensors", "sd1_peft", "sdxl_kohya_locon.safetensors"]
OTHER = ["sd1_loha.safetensors", "sd1_loha_tucker.safetensors", "sd1_lokr.safetensors", "sd1_lokr_tucker.safetensors",
         "sd1_locon_tucker.safetensors", "sd1_sparse_bias.safetensors", "sd1_full.safetensors", "sd1_peft_adalora"]


@pytest.mark.parametrize("name", LORA_LIKE + OTHER)
def test_rank_at_least_input_reproduces_delta(tmp_path, name):
    out = tmp_path / "o.safetensors"
    prune(AD / name, out, _opts(rank=4096, allow_larger=True), quiet=True)  # LoHa/LoKr/full grow as LoRA
    want, got = _deltas(AD / name), _deltas(out)
    src = AdapterFile.open(AD / name)
    prunable = {k for k in want if not (name == "sd1_full.safetensors" and want[k].dim() == 1)}
    assert prunable <= set(got), sorted(prunable - set(got))[:3]
    for k in prunable:
        assert got[k].shape == want[k].shape, k
        assert relative_error(want[k], got[k]) < 2e-6, (k, relative_error(want[k], got[k]))
    keys = load_file(str(out)).keys()
    assert all(k.startswith(("lora_unet_", "lora_te", "lycoris_")) for k in keys)
    if src.convention in ("kohya", "lycoris"):  # kohya names are kept as they are
        assert {k.split(".")[0] for k in keys} <= set(src.groups.modules)


@pytest.mark.parametrize("name", ["sd1_kohya_locon.safetensors", "sd1_loha.safetensors", "sd1_peft_adalora"])
def test_lower_rank_is_the_best_rank_k_approximation(tmp_path, name):
    out = tmp_path / "o.safetensors"
    prune(AD / name, out, _opts(rank=2), quiet=True)
    want, got = _deltas(AD / name), _deltas(out)
    for k, d in want.items():
        M = d.reshape(d.shape[0], -1)
        s = exact_svd(M)
        r = min(2, int((s.S > s.S[0] * 1e-6).sum()))
        best = (s.U[:, :r] * s.S[:r]) @ s.Vh[:r]
        g = got[k].reshape(M.shape)
        assert float((g - best).norm()) <= 1e-5 * float(M.norm()) + 1e-7, k
        # the error is exactly the dropped tail (Eckart–Young)
        assert abs(float((M - g).norm() ** 2) - float(s.S[r:].double().square().sum())) < 1e-4 * float(M.norm() ** 2) + 1e-9


def test_written_alpha_keeps_the_effective_scale(tmp_path):
    out = tmp_path / "o.safetensors"
    prune(AD / "sd1_kohya_lora.safetensors", out, _opts(rank=3), quiet=True)
    sd = load_file(str(out))
    for k, v in sd.items():
        if k.endswith(".alpha"):
            r = sd[k.replace(".alpha", ".lora_down.weight")].shape[0]
            assert float(v) == r == 3  # scale 1; the old alpha/rank lives in lora_up
    out2 = tmp_path / "o2.safetensors"
    prune(AD / "sd1_kohya_locon.safetensors", out2, _opts(budget="0.5"), quiet=True)
    sd = load_file(str(out2))
    ranks = {sd[k].shape[0] for k in sd if k.endswith("lora_down.weight")}
    assert len(ranks) > 1  # dynamic ranks, one alpha (diffusers' alpha_pattern bug, see ops/prune.py)
    assert {float(v) for k, v in sd.items() if k.endswith(".alpha")} == {float(max(ranks))}
    conv = [k for k in sd if k.endswith("lora_down.weight") and sd[k].dim() == 4]
    for k in conv:
        assert sd[k.replace("lora_down", "lora_up")].dim() == 4


# ------------------------------------------------------------------------------------------------ rank rules


def test_modes_smallest_rank_and_kohya_off_by_one():
    S = torch.tensor([8.0, 4.0, 2.0, 1.0, 0.5, 0.25])
    tot = float(S.square().sum())
    # energy: the smallest k with Σ S² ≥ t·total
    for t in (0.5, 0.8, 0.95, 0.99, 1.0):
        k = rank_for_mode(S, "energy", t)
        assert float(S[:k].square().sum()) >= t * tot - 1e-9
        assert k == 1 or float(S[: k - 1].square().sum()) < t * tot
    assert rank_for_mode(S, "fro", 0.9) == rank_for_mode(S, "energy", 0.81)
    assert rank_for_mode(S, "ratio", 4.5) == 3  # 8, 4, 2 > 8/4.5
    assert rank_for_mode(S, "cumulative", 12 / 15.75) == 2
    # kohya gives one more than the minimal count (and never fewer than 2)
    assert kohya_rank_for_mode(S, "fro", 0.9) == rank_for_mode(S, "fro", 0.9) + 1
    assert kohya_rank_for_mode(S, "cumulative", 0.9) == rank_for_mode(S, "cumulative", 0.9) + 1
    assert kohya_rank_for_mode(S, "ratio", 4.5) == rank_for_mode(S, "ratio", 4.5) + 1
    assert kohya_rank_for_mode(S, "fro", 0.5) == 2 and rank_for_mode(S, "fro", 0.5) == 1


def test_mode_min_max_rank(tmp_path):
    out = tmp_path / "o.safetensors"
    res = prune(AD / "sd1_kohya_locon.safetensors", out, _opts(mode="energy", mode_param=0.9, min_rank=2, max_rank=3),
                quiet=True)
    for l in res.layers:
        want = rank_for_mode(l.spectrum, "energy", 0.9, l.svd.total_energy)
        assert l.new_rank == max(2, min(3, want, l.svd.S.numel()))


# ------------------------------------------------------------------------------------------------ budget


@pytest.mark.parametrize("budget", ["1000", "2k", "0.25", "0.6", "4KB"])
def test_budget_never_exceeded(tmp_path, budget):
    out = tmp_path / "o.safetensors"
    res = prune(AD / "sd1_kohya_locon.safetensors", out, _opts(budget=budget), quiet=True)
    stored = sum(v.numel() for k, v in load_file(str(out)).items() if not k.endswith(".alpha"))
    assert res.params_after == stored
    assert stored <= res.budget
    assert res.budget - stored < max(l.cost_per_rank for l in res.layers)  # and it is spent


def test_budget_counts_modules_copied_unchanged(tmp_path):
    # sd1_dora: DoRA modules cannot be pruned and are copied; the budget covers them too
    out = tmp_path / "o.safetensors"
    with pytest.raises(Exception):
        prune(AD / "sd1_ia3.safetensors", out, _opts(budget="0.5"), quiet=True)
    res = prune(AD / "sd1_full.safetensors", out, _opts(budget="0.3"), quiet=True)
    stored = sum(v.numel() for k, v in load_file(str(out)).items() if not k.endswith(".alpha"))
    assert stored <= res.budget and res.fixed_params > 0


# at equal parameter count the global spectral allocation keeps at least as much energy as the best
# uniform rank; (fixture, uniform rank, energy kept by uniform, energy kept by spectral) measured once
SPECTRAL_VS_UNIFORM = [
    ("sd1_kohya_locon.safetensors", 1, 0.4740, 0.6837),
    ("sd1_kohya_locon.safetensors", 2, 0.7858, 0.9094),
    ("sd1_peft", 1, 0.5163, 0.7864),
    ("sd1_diffusers_lora.safetensors", 2, 0.7958, 0.8146),
    ("sd1_loha.safetensors", 2, 0.6066, 0.7011),
]


@pytest.mark.parametrize("name,r,uni,spec", SPECTRAL_VS_UNIFORM)
def test_global_spectral_beats_best_uniform(tmp_path, name, r, uni, spec):
    _, _, layers, _, _, _ = read_layers(AD / name, _opts(rank=1))
    choose_ranks(layers, _opts(rank=r))
    params = sum(l.new_rank * l.cost_per_rank for l in layers)
    total = sum(l.svd.total_energy for l in layers)
    kept_uniform = sum(l.svd.total_energy * l.kept_energy() for l in layers) / total
    choose_ranks(layers, _opts(budget=str(params)), params)
    assert sum(l.new_rank * l.cost_per_rank for l in layers) <= params
    kept_spectral = sum(l.svd.total_energy * l.kept_energy() for l in layers) / total
    assert kept_spectral >= kept_uniform - 1e-9
    assert kept_uniform == pytest.approx(uni, abs=2e-3)
    assert kept_spectral == pytest.approx(spec, abs=2e-3)


def _known_delta_layers(arch):
    base = load_file(str(FIX / arch / "base.safetensors"))
    tuned = load_file(str(FIX / arch / "tuned.safetensors"))
    known = json.loads((FIX / arch / "deltas.json").read_text())
    layers = []
    for k in known:
        D = tuned[k].float() - base[k].float()
        layers.append(Layer(k, k, None, k, tuple(D.shape), "full", None, D.numel(), exact_svd(D.reshape(D.shape[0], -1))))
    return layers


@pytest.mark.parametrize("arch", ["sd1", "sdxl"])
def test_energy_per_parameter_normalisation_wins_on_known_deltas(arch):
    table = measure_normalisations(_known_delta_layers(arch))
    for ratio, row in table.items():
        for norm in ("relative", "unpriced", "nuclear"):
            assert row["energy"]["lost"] <= row[norm]["lost"] + 1e-9, (ratio, norm, row)
            assert row[norm]["params"] <= row["budget"]
        if row["uniform"]:
            assert row["energy"]["lost"] <= row["uniform"]["lost"] + 1e-9
    if arch == "sd1":
        assert table[0.3]["energy"]["lost"] == pytest.approx(0.4172, abs=2e-3)
        assert table[0.3]["relative"]["lost"] == pytest.approx(0.4564, abs=2e-3)


# ------------------------------------------------------------------------------------------------ consumers


def test_output_loads_in_lycoris_and_matches_our_delta(tmp_path):
    lm_mod = pytest.importorskip("lycoris.modules")
    out = tmp_path / "o.safetensors"
    prune(AD / "sd1_loha.safetensors", out, _opts(budget="0.5"), quiet=True)
    sd = load_file(str(out))
    ours = {lm.name: lm.module for lm in AdapterFile.open(out).parsed}
    names = {k.split(".")[0] for k in sd}
    checked = 0
    torch.manual_seed(0)
    for n in sorted(names):
        up, down, alpha = sd[f"{n}.lora_up.weight"], sd[f"{n}.lora_down.weight"], sd[f"{n}.alpha"]
        if down.dim() == 2:
            orig = torch.nn.Linear(down.shape[1], up.shape[0], bias=False)
        else:
            orig = torch.nn.Conv2d(down.shape[1], up.shape[0], down.shape[2:], padding=down.shape[2] // 2, bias=False)
        W = orig.weight.detach().clone()
        mod = lm_mod.LoConModule.make_module_from_state_dict("m", orig, up, down, None, alpha, None)
        mod.apply_to()
        x = torch.randn(3, W.shape[1]) if W.dim() == 2 else torch.randn(2, W.shape[1], 5, 5)
        with torch.no_grad():
            y = orig(x)
            W2 = W + ours[n].delta(tuple(W.shape))
            y2 = F.linear(x, W2) if W.dim() == 2 else F.conv2d(x, W2, padding=W.shape[2] // 2)
        assert torch.allclose(y, y2, rtol=1e-4, atol=1e-5), n
        checked += 1
    assert checked >= 5


@pytest.mark.parametrize("name", ["sd1_peft", "sd1_diffusers_lora.safetensors"])  # UNet; UNet + text encoder
def test_output_loads_in_diffusers_and_fuses_to_our_delta(tmp_path, name):
    diffusers = pytest.importorskip("diffusers")
    out = tmp_path / "o.safetensors"
    prune(AD / name, out, _opts(budget="0.5"), quiet=True)
    want = _deltas(out, SD1_BASE)
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(FIX / "sd1/diffusers", safety_checker=None,
                                                             local_files_only=True)
    before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    before_te = {k: v.clone() for k, v in pipe.text_encoder.state_dict().items()}
    pipe.load_lora_weights(str(out))
    pipe.fuse_lora()
    after = {k.replace(".base_layer", ""): v for k, v in pipe.unet.state_dict().items() if "lora" not in k}
    after_te = {k.replace(".base_layer", ""): v for k, v in pipe.text_encoder.state_dict().items() if "lora" not in k}
    checked = 0
    for (comp, module), d in want.items():
        key = module + ".weight"
        if comp == "unet":
            got = after[key] - before[key]
        else:
            k2 = key if key in before_te else key.replace("text_model.", "", 1)
            got = after_te[k2] - before_te[k2]
        assert relative_error(d, got.float().reshape(d.shape)) < 1e-4, (comp, module)
        checked += 1
    assert checked == len(want) and checked > 50
    if name == "sd1_diffusers_lora.safetensors":
        assert any(c == "text_encoder" for c, _ in want)


# ------------------------------------------------------------------------------------------------ CLI, metadata, report


class _Run:
    def __init__(self, r):
        self.returncode, self.stdout, self.stderr = r.exit_code, r.stdout, r.stderr


def _cli(*args):
    """The command in-process (click's runner): same exit status and streams, without a new interpreter."""
    from click.testing import CliRunner

    from lycotools.cli import main

    return _Run(CliRunner().invoke(main, ["rank-prune", *map(str, args)]))


def test_cli_report_metadata_and_determinism(tmp_path):
    (tmp_path / "1").mkdir()
    (tmp_path / "2").mkdir()
    a, b, rep = tmp_path / "1" / "a.safetensors", tmp_path / "2" / "a.safetensors", tmp_path / "r.json"
    r = _cli(AD / "sd1_kohya_locon.safetensors", "-o", a, "--budget", "0.5", "--no-date", "--report", rep, "-q")
    assert r.returncode == 0, r.stderr
    r = _cli(AD / "sd1_kohya_locon.safetensors", "-o", b, "--budget", "0.5", "--no-date", "-q")
    assert r.returncode == 0, r.stderr
    assert a.read_bytes() == b.read_bytes()
    meta = open_source(a).metadata
    ranks = json.loads(meta["lycotools.rank_prune.ranks"])
    assert meta["lycotools.rank_prune.score"] == "spectral"
    assert json.loads(meta["lycotools.rank_prune.budget"])["asked"] == "0.5"
    assert meta["ss_network_module"] == "networks.lora" and meta["ss_network_dim"] == "Dynamic"
    assert "sshs_model_hash" in meta
    doc = json.loads(rep.read_text())
    assert {l["name"]: l["rank_after"] for l in doc["layers"]} == ranks
    assert all({"rank_before", "rank_after", "energy_kept", "block"} <= set(l) for l in doc["layers"])
    assert doc["params_after"] <= doc["how"]["budget_params"]


def test_cli_errors_and_help(tmp_path):
    r = _cli("--help")
    assert r.returncode == 0 and "Example" in r.stdout and "off-by-one" in r.stdout
    r = _cli(AD / "sd1_kohya_lora.safetensors", "-o", tmp_path / "x.safetensors")
    assert r.returncode == 2 and "exactly one of --rank, --mode or --budget" in r.stderr
    r = _cli(AD / "sd1_kohya_lora.safetensors", "-o", tmp_path / "x.safetensors", "--mode", "fro")
    assert r.returncode == 2 and "--mode-param" in r.stderr
    r = _cli(tmp_path / "missing.safetensors", "-o", tmp_path / "x.safetensors", "--rank", "2")
    assert r.returncode == 2 and r.stderr.startswith("lycotools: error:")
    r = _cli(FIX / "bad" / "not_a_model.safetensors", "-o", tmp_path / "x.safetensors", "--rank", "2")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        r = _cli(AD / "sd1_kohya_lora.safetensors", "-o", tmp_path / "x.safetensors", "--rank", "2", "--plot",
                 tmp_path / "p.png")
        assert r.returncode == 2 and "matplotlib" in r.stderr and not (tmp_path / "x.safetensors").exists()


def test_plot(tmp_path):
    pytest.importorskip("matplotlib")
    png = tmp_path / "p.png"
    prune(AD / "sd1_kohya_locon.safetensors", tmp_path / "o.safetensors", _opts(budget="0.5"), plot_path=png, quiet=True)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_json_and_passthrough(tmp_path):
    r = _cli(AD / "sd1_full.safetensors", "-o", tmp_path / "o.safetensors", "--rank", "2", "--json", "-q")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["passthrough"] and doc["layers"]  # norm modules copied, full diffs pruned
    keys = load_file(str(tmp_path / "o.safetensors")).keys()
    assert any(k.endswith(".w_norm") for k in keys)


def test_nan_input_is_bad_input(tmp_path):
    from safetensors.torch import save_file

    sd = load_file(str(AD / "sd1_kohya_lora.safetensors"))
    k = next(k for k in sd if k.endswith("lora_up.weight"))
    sd[k][0, 0] = float("nan")
    save_file(sd, str(tmp_path / "nan.safetensors"))
    r = _cli(tmp_path / "nan.safetensors", "-o", tmp_path / "o.safetensors", "--rank", "2", "-q")
    assert r.returncode == 2 and "NaN" in r.stderr and not (tmp_path / "o.safetensors").exists()


def test_cli_batch(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    for n in ("sd1_kohya_lora.safetensors", "sd1_loha.safetensors"):
        (src / n).write_bytes((AD / n).read_bytes())
    r = _cli(src, "-o", tmp_path / "out", "--rank", "2", "-q")
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["sd1_kohya_lora.safetensors", "sd1_loha.safetensors"]


# ------------------------------------------------------------------------------------------------ sensitivity

SD1_DIFFUSERS = FIX / "sd1" / "diffusers"
# two layers of the tiny SD1 text encoder with the same shape (32×32) and the same spectrum; the
# diffusion loss depends on the first far more than on the second (measured: Eq. 9 scores ~1e-6 vs
# ~1e-8 on these calibration images)
FAVOURED = "lora_te_text_model_encoder_layers_0_self_attn_v_proj"
IGNORED = "lora_te_text_model_encoder_layers_1_self_attn_q_proj"


def _equal_spectra_lora(path):
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)
    sd = {}
    for name in (FAVOURED, IGNORED):
        U, _ = torch.linalg.qr(torch.randn(32, 2, generator=g))
        V, _ = torch.linalg.qr(torch.randn(32, 2, generator=g))
        sd[f"{name}.lora_up.weight"] = (U * torch.tensor([1.0, 0.5])).contiguous()
        sd[f"{name}.lora_down.weight"] = V.T.contiguous()
        sd[f"{name}.alpha"] = torch.tensor(2.0)
    save_file(sd, str(path))


def _calib_folder(folder, n=3):
    from PIL import Image

    folder.mkdir()
    g = torch.Generator().manual_seed(1)
    for i in range(n):
        px = (torch.rand(24, 24, 3, generator=g) * 255).to(torch.uint8).numpy()
        Image.fromarray(px).save(folder / f"img{i}.png")
        (folder / f"img{i}.txt").write_text(f"a photo of a thing number {i}")
    return folder


def test_sensitivity_prunes_differently_from_spectral(tmp_path):
    pytest.importorskip("diffusers")
    src = tmp_path / "eq.safetensors"
    _equal_spectra_lora(src)
    calib = _calib_folder(tmp_path / "calib")
    budget = str(2 * 64)  # two triplets of a 32×32 layer
    spec = prune(src, tmp_path / "spec.safetensors", _opts(budget=budget), quiet=True)
    assert {l.name: l.new_rank for l in spec.layers} == {FAVOURED: 1, IGNORED: 1}  # equal spectra: one each
    rep = tmp_path / "r.json"
    sens = prune(src, tmp_path / "sens.safetensors",
                 _opts(budget=budget, score="sensitivity", base=str(SD1_BASE), config=str(SD1_DIFFUSERS),
                       calib=str(calib), steps=3), report_path=rep, quiet=True)
    ranks = {l.name: l.new_rank for l in sens.layers}
    assert ranks == {FAVOURED: 2, IGNORED: 0}, sens.scores
    assert sens.scores[FAVOURED][1] > 10 * sens.scores[IGNORED][0]
    assert sens.params_after <= sens.budget
    meta = open_source(tmp_path / "sens.safetensors").metadata
    assert meta["lycotools.rank_prune.score"] == "sensitivity"
    assert json.loads(meta["lycotools.rank_prune.ranks"]) == ranks
    # the kept triplets are the layer's own: the favoured layer comes back whole
    want = _deltas(src)
    got = _deltas(tmp_path / "sens.safetensors")
    k = next(k for k in want if "layers.0.self_attn.v_proj" in k[1])
    assert relative_error(want[k], got[k]) < 1e-5


def test_sensitivity_cli_with_prompts_and_bad_input(tmp_path):
    pytest.importorskip("diffusers")
    out = tmp_path / "o.safetensors"
    r = _cli(AD / "sd1_kohya_lora.safetensors", "-o", out, "--budget", "0.5", "--score", "sensitivity",
             "--base", SD1_DIFFUSERS, "--prompts", "a cat", "--prompts", "a dog", "--steps", "2", "-q")
    assert r.returncode == 0, r.stderr
    assert open_source(out).metadata["lycotools.rank_prune.score"] == "sensitivity"
    from lycotools.errors import BadInput

    p = tmp_path / "p.safetensors"
    with pytest.raises(BadInput, match="--config"):
        prune(AD / "sd1_kohya_lora.safetensors", p, _opts(budget="0.5", score="sensitivity", base=str(SD1_BASE),
                                                          prompts=("a cat",)), quiet=True)
    with pytest.raises(BadInput, match="--base"):
        prune(AD / "sd1_kohya_lora.safetensors", p, _opts(budget="0.5", score="sensitivity"), quiet=True)
    with pytest.raises(BadInput, match="--calib"):
        prune(AD / "sd1_kohya_lora.safetensors", p, _opts(budget="0.5", score="sensitivity", base=str(SD1_BASE)),
              quiet=True)
    assert not p.exists()


def test_triplet_score_matches_peft_rank_allocator():
    """Our EMA sensitivity × uncertainty and Eq. 9 combination against PEFT's AdaLoRA RankAllocator,
    fed the same parameter values and gradients for a few steps."""
    from types import SimpleNamespace

    peft_layer = pytest.importorskip("peft.tuners.adalora.layer")
    from lycotools.linalg import svd_of_product
    from lycotools.ops.prune import _Triplets

    g = torch.Generator().manual_seed(5)
    out_f, in_f, k = 12, 10, 4
    up, down = torch.randn(out_f, k, generator=g), torch.randn(k, in_f, generator=g)
    lin = torch.nn.Linear(in_f, out_f)
    layer = Layer("m", "m", "unet", "m", (out_f, in_f), "lora", k, 0, svd_of_product(up, down))
    tr = _Triplets(layer, lin, torch.device("cpu"))
    tr.remove()

    class Holder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lora_A = torch.nn.ParameterDict({"default": torch.nn.Parameter(tr.Q.detach().clone())})
            self.lora_B = torch.nn.ParameterDict({"default": torch.nn.Parameter(tr.P.detach().clone())})
            self.lora_E = torch.nn.ParameterDict({"default": torch.nn.Parameter(tr.lam.detach().clone()[:, None])})

    h = Holder()
    alloc = peft_layer.RankAllocator(h, SimpleNamespace(beta1=0.85, beta2=0.85, target_r=2), "default")
    for _ in range(4):
        gA, gB, gE = torch.randn(k, in_f, generator=g), torch.randn(out_f, k, generator=g), torch.randn(k, generator=g)
        tr.Q.grad, tr.P.grad, tr.lam.grad = gA.clone(), gB.clone(), gE.clone()
        h.lora_A["default"].grad, h.lora_B["default"].grad, h.lora_E["default"].grad = gA, gB, gE[:, None]
        tr.update()
        alloc.update_ipt(h)
    sA = alloc._element_score("lora_A.default").mean(dim=1, keepdim=True)
    sB = alloc._element_score("lora_B.default").mean(dim=0).view(-1, 1)
    peft_scores = alloc._combine_ipt(alloc._element_score("lora_E.default"), torch.cat([sA, sB], dim=1))
    assert torch.allclose(tr.triplet_scores().float(), peft_scores.float(), rtol=1e-5, atol=1e-12)


def test_nonfinite_check_is_exact_on_every_dtype():
    """rank-prune checks factors with ``finite.is_finite`` (one aminmax pass): exact, no sum pre-filter."""
    from lycotools.finite import is_finite

    ok = torch.randn(64, 8)
    assert all(is_finite(t) for t in (ok, ok.half(), ok.bfloat16(), ok.double(), torch.arange(3)))
    for bad in (float("nan"), float("inf"), -float("inf")):
        for dt in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
            t = ok.to(dt).clone()
            t[3, 5] = bad
            assert not is_finite(t)
    # large finite values whose sum would overflow, and fp8: finite
    assert is_finite(torch.full((4,), 3e38)) and is_finite(ok.to(torch.float8_e4m3fn))


def test_parallel_spectra_match_sequential_and_restore_threads(tmp_path, monkeypatch):
    """The per-module SVDs run on a thread pool: same layers in the same order, the same bits as one
    worker, torch's thread count restored after, and the first error in file order is the one raised."""
    import lycotools.ops.prune as P
    from safetensors.torch import save_file

    src = AD / "sd1_kohya_locon.safetensors"
    threads = torch.get_num_threads()
    _, _, par, _, _, _ = read_layers(src, _opts(rank=1))
    assert torch.get_num_threads() == threads
    monkeypatch.setattr(P, "MAX_WORKERS", 1)
    _, _, seq, _, _, _ = read_layers(src, _opts(rank=1))
    assert [l.name for l in par] == [l.name for l in seq]
    for a, b in zip(par, seq):
        assert torch.equal(a.svd.U, b.svd.U) and torch.equal(a.svd.S, b.svd.S) and torch.equal(a.svd.Vh, b.svd.Vh)
    monkeypatch.setattr(P, "MAX_WORKERS", 8)
    monkeypatch.setattr(P, "_cores", lambda: 4)
    # two bad modules: the error names the first in file order, whichever worker finishes first
    sd = load_file(str(src))
    names = [k[: -len(".lora_up.weight")] for k in sd if k.endswith(".lora_up.weight")]
    order = [lm.name for lm in AdapterFile.open(src).modules]
    first, last = sorted(names, key=order.index)[1], sorted(names, key=order.index)[-1]
    for n in (first, last):
        sd[f"{n}.lora_up.weight"][0, 0] = float("nan")
    save_file(sd, str(tmp_path / "nan.safetensors"))
    with pytest.raises(Exception, match=first):
        read_layers(tmp_path / "nan.safetensors", _opts(rank=1))
    assert torch.get_num_threads() == threads
    # errors raised in the workers: the first module's, even when a later one fails sooner
    import time

    real = P._layer_svd

    def failing(mod, shape, name, seed, dense):
        if name in (first, last):
            time.sleep(0.3 if name == first else 0)
            raise ValueError(f"boom {name}")
        return real(mod, shape, name, seed, dense)

    monkeypatch.setattr(P, "_layer_svd", failing)
    with pytest.raises(Exception, match=f"boom {first}"):
        read_layers(src, _opts(rank=1))
    assert torch.get_num_threads() == threads

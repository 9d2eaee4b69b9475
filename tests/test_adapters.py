"""lycotools.adapters against lycoris-lora 4.1.3's forward path (the reference for what a file means).

Each case builds a LyCORIS module on a real layer, fills its parameters with random non-zero values,
takes its state_dict (the file's tensors), parses it with ``parse_module``, and compares the LyCORIS
forward output with ``F.linear``/``F.conv2d`` on the weight from ``apply`` (multipliers 1 and 0.7),
and the LyCORIS output difference with the layer run on ``delta()``.
"""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from lycotools.adapters import ALGORITHMS, AdapterModule, parse_module
from lycotools.adapters import adalora, full, glora, ia3, loha, lokr, lora, norm, oft

lyco = pytest.importorskip("lycoris.modules")
logging.getLogger("LyCORIS").setLevel(logging.ERROR)

RTOL = 2e-5


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-20))


def make_layer(kind: str, in_f: int = 64, out_f: int = 48, bias: bool = True) -> nn.Module:
    torch.manual_seed(1)
    if kind == "linear":
        layer = nn.Linear(in_f, out_f, bias=bias)
    elif kind == "conv1x1":
        layer = nn.Conv2d(in_f // 2, out_f, 1, bias=bias)
    elif kind == "conv3x3":
        layer = nn.Conv2d(in_f // 2, out_f, 3, stride=2, padding=1, bias=bias)
    else:
        raise AssertionError(kind)
    return layer


def sample_input(layer: nn.Module) -> torch.Tensor:
    g = torch.Generator().manual_seed(2)
    if isinstance(layer, nn.Linear):
        return torch.randn(5, layer.in_features, generator=g)
    return torch.randn(2, layer.in_channels, 9, 9, generator=g)


def run_layer(layer: nn.Module, x, weight, bias):
    if isinstance(layer, nn.Linear):
        return F.linear(x, weight, bias)
    return F.conv2d(x, weight, bias, layer.stride, layer.padding, layer.dilation, layer.groups)


def randomize(mod: nn.Module, seed: int = 3, std: float = 0.1) -> None:
    """Random non-zero values in every trained tensor (dora_scale/rescale kept around their scale)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in mod.named_parameters():
            if name.startswith("org_"):
                continue
            noise = torch.randn(p.shape, generator=g) * std
            if name in ("dora_scale",):
                p.copy_(p.abs() + 0.5 + noise)
            elif name == "rescale":
                p.copy_(1.0 + noise)
            else:
                p.copy_(noise)


def state(mod: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in mod.state_dict().items()}


def check_against_lycoris(mod: nn.Module, layer: nn.Module, additive_delta: bool = True) -> AdapterModule:
    """Forward of the LyCORIS module vs our merged weight (m = 1, 0.7) and vs our delta."""
    am = parse_module("lora_unet_test", state(mod))
    x = sample_input(layer)
    w, b = layer.weight.detach(), None if layer.bias is None else layer.bias.detach()
    with torch.no_grad():
        base = layer(x)
        for m in (1.0, 0.7):
            mod.multiplier = m
            ref = mod(x)
            w2, b2 = am.apply(w, multiplier=m, bias=b)
            assert w2.dtype == torch.float32 and w2.shape == w.shape
            got = run_layer(layer, x, w2, b2)
            assert rel_err(got, ref) < RTOL, (am.algo, m, rel_err(got, ref))
            # the adapter really changes the output (the test can fail)
            assert rel_err(ref, base) > 1e-3
        if additive_delta:
            mod.multiplier = 1.0
            ref_diff = mod(x) - base
            d = am.delta(tuple(w.shape), base_weight=w)
            got_diff = run_layer(layer, x, d, None)
            assert rel_err(got_diff, ref_diff) < RTOL, (am.algo, rel_err(got_diff, ref_diff))
    if am.algo in ("lora", "loha", "lokr"):  # ΔW from the factors alone: hint == delta().shape
        hint = am.weight_shape_hint()
        assert am.delta().shape == hint and torch.Size(hint).numel() == w.numel()
    return am


KINDS = ["linear", "conv1x1", "conv3x3"]


# ----------------------------------------------------------------------------- LoRA / LoCon / DoRA
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("tucker", [False, True])
def test_locon(kind, tucker):
    layer = make_layer(kind)
    mod = lyco.LoConModule("x", layer, 1.0, lora_dim=4, alpha=3.0, use_tucker=tucker)
    randomize(mod)
    am = check_against_lycoris(mod, layer)
    assert am.algo == "lora" and am.rank == 4 and am.scale == pytest.approx(0.75)
    assert ("lora_mid.weight" in am.tensors) == (tucker and kind == "conv3x3")
    assert am.weight_shape_hint() == tuple(layer.weight.shape)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("wd_on_out", [True, False])
def test_lora_dora(kind, wd_on_out):
    layer = make_layer(kind)
    mod = lyco.LoConModule("x", layer, 1.0, lora_dim=4, alpha=2.0, weight_decompose=True, wd_on_out=wd_on_out)
    randomize(mod)
    am = check_against_lycoris(mod, layer, additive_delta=False)
    assert am.has_dora


def test_dylora_conv_2d_up():
    """DyLoRA writes a 2-D lora_up for convs: same meaning as the 4-D LoCon up."""
    layer = make_layer("conv3x3")
    mod = lyco.LoConModule("x", layer, 1.0, lora_dim=4, alpha=3.0)
    randomize(mod)
    sd = state(mod)
    sd["lora_up.weight"] = sd["lora_up.weight"].reshape(48, 4)
    a4 = parse_module("m", state(mod))
    a2 = parse_module("m", sd)
    assert a2.weight_shape_hint() == tuple(layer.weight.shape)
    assert torch.allclose(a2.delta(), a4.delta(), rtol=0, atol=0)


# ----------------------------------------------------------------------------- LoHa
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("tucker", [False, True])
def test_loha(kind, tucker):
    layer = make_layer(kind)
    mod = lyco.LohaModule("x", layer, 1.0, lora_dim=4, alpha=3.0, use_tucker=tucker)
    randomize(mod, std=0.3)
    am = check_against_lycoris(mod, layer)
    assert am.algo == "loha" and am.rank == 4 and am.scale == pytest.approx(0.75)
    assert ("hada_t1" in am.tensors) == (tucker and kind == "conv3x3")


@pytest.mark.parametrize("kind", ["linear", "conv3x3"])
def test_loha_dora(kind):
    layer = make_layer(kind)
    mod = lyco.LohaModule("x", layer, 1.0, lora_dim=4, alpha=3.0, weight_decompose=True)
    randomize(mod, std=0.3)
    assert check_against_lycoris(mod, layer, additive_delta=False).has_dora


def test_peer_bug_loha_merge_applies_scale_twice():
    """docs/adapters.md#lycoris-merge-scale: LyCORIS's get_diff_weight (merge_to) for LoHa is alpha/r times the forward delta."""
    layer = make_layer("linear")
    mod = lyco.LohaModule("x", layer, 1.0, lora_dim=4, alpha=2.0)
    randomize(mod, std=0.3)
    am = parse_module("m", state(mod))
    with torch.no_grad():
        merge_diff = mod.get_diff_weight(multiplier=1.0, shape=layer.weight.shape)[0]
    ours = am.delta(tuple(layer.weight.shape))
    assert am.scale == 0.5
    assert torch.allclose(merge_diff, ours * am.scale, rtol=1e-5, atol=1e-7)
    assert not torch.allclose(merge_diff, ours, rtol=1e-2, atol=0)


# ----------------------------------------------------------------------------- LoKr
LOKR_CASES = [
    # (id, layer kind, in, out, kwargs, expected suffixes)
    ("full_full_linear", "linear", 64, 48, dict(factor=4, full_matrix=True), {"lokr_w1", "lokr_w2"}),
    ("w2_dec_linear", "linear", 64, 48, dict(factor=4), {"lokr_w1", "lokr_w2_a", "lokr_w2_b"}),
    ("both_dec_linear", "linear", 64, 48, dict(factor=8, decompose_both=True),
     {"lokr_w1_a", "lokr_w1_b", "lokr_w2_a", "lokr_w2_b"}),
    ("w2_dec_conv3x3", "conv3x3", 128, 48, dict(factor=4), {"lokr_w1", "lokr_w2_a", "lokr_w2_b"}),
    ("tucker_conv3x3", "conv3x3", 128, 48, dict(factor=4, use_tucker=True),
     {"lokr_w1", "lokr_w2_a", "lokr_w2_b", "lokr_t2"}),
    ("both_dec_tucker_conv3x3", "conv3x3", 128, 48, dict(factor=8, use_tucker=True, decompose_both=True),
     {"lokr_w1_a", "lokr_w1_b", "lokr_w2_a", "lokr_w2_b", "lokr_t2"}),
    ("full_conv3x3", "conv3x3", 128, 48, dict(factor=4, full_matrix=True), {"lokr_w1", "lokr_w2"}),
    ("w2_dec_conv1x1", "conv1x1", 128, 48, dict(factor=4), {"lokr_w1", "lokr_w2_a", "lokr_w2_b"}),
    ("asym_factor_conv3x3", "conv3x3", 128, 64, dict(factor=16), {"lokr_w1", "lokr_w2_a", "lokr_w2_b"}),
]


@pytest.mark.parametrize("case", LOKR_CASES, ids=[c[0] for c in LOKR_CASES])
def test_lokr(case):
    _, kind, in_f, out_f, kw, suffixes = case
    layer = make_layer(kind, in_f, out_f)
    mod = lyco.LokrModule("x", layer, 1.0, lora_dim=2, alpha=3.0, **kw)
    randomize(mod, std=0.3)
    am = check_against_lycoris(mod, layer)
    assert set(am.tensors) - {"alpha"} == suffixes
    if {"lokr_w1", "lokr_w2"} <= suffixes:
        assert am.rank is None and am.scale == 1.0
    else:
        assert am.rank == 2 and am.scale == pytest.approx(1.5)


def test_lokr_full_full_forced_scale_one():
    w1, w2 = torch.randn(4, 4), torch.randn(12, 16)
    am = parse_module("m", lokr.to_tensors(w1, w2, alpha=8.0))
    assert am.alpha == 8.0 and am.rank is None and am.scale == 1.0
    assert torch.allclose(am.delta(), torch.kron(w1, w2))
    assert am.num_params == 16 + 192


def test_lokr_dora():
    layer = make_layer("linear")
    mod = lyco.LokrModule("x", layer, 1.0, lora_dim=2, alpha=3.0, factor=4, weight_decompose=True)
    randomize(mod, std=0.3)
    assert check_against_lycoris(mod, layer, additive_delta=False).has_dora


@pytest.mark.parametrize("n,f,expected", [(1280, -1, (32, 40)), (1280, 8, (8, 160)), (360, 16, (15, 24)),
                                          (360, -1, (18, 20)), (7, -1, (1, 7)), (64, 3, (2, 32))])
def test_factorization(n, f, expected):
    assert lokr.factorization(n, f) == expected


def test_factorization_matches_lycoris():
    from lycoris.functional import factorization as ref

    for n in range(1, 400):
        for f in (-1, 1, 2, 3, 4, 8, 16, 17):
            assert lokr.factorization(n, f) == tuple(sorted(ref(n, f))), (n, f)


# ----------------------------------------------------------------------------- Full / Norm / IA3
@pytest.mark.parametrize("kind", KINDS)
def test_full(kind):
    """FullModule trains the whole weight: apply_to() folds W into it and diff = weight − W is saved."""
    layer = make_layer(kind)
    w0, b0 = layer.weight.detach().clone(), layer.bias.detach().clone()
    x = sample_input(layer)
    with torch.no_grad():
        base = layer(x)
    mod = lyco.FullModule("x", layer, 1.0)
    mod.apply_to()
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        mod.weight.add_(torch.randn(mod.weight.shape, generator=g) * 0.1)
        mod.bias.add_(torch.randn(mod.bias.shape, generator=g) * 0.1)
    am = parse_module("m", state(mod))
    assert am.algo == "full" and set(am.tensors) == {"diff", "diff_b"} and am.scale == 1.0 and am.rank is None
    with torch.no_grad():
        ref = mod(x)
        w2, b2 = am.apply(w0, 1.0, b0)
        assert rel_err(run_layer(layer, x, w2, b2), ref) < RTOL
        assert rel_err(ref, base) > 1e-3
        d = am.delta(tuple(w0.shape))
        assert rel_err(run_layer(layer, x, d, am.tensors["diff_b"]), ref - base) < RTOL
    w2, b2 = am.apply(w0, 0.5, b0)
    assert torch.allclose(w2, w0 + 0.5 * am.tensors["diff"])
    assert torch.allclose(b2, b0 + 0.5 * am.tensors["diff_b"])
    # no base bias: diff_b is ignored, as LyCORIS does
    assert am.apply(w0, 1.0, None)[1] is None


@pytest.mark.parametrize("norm_layer", [nn.LayerNorm(48), nn.GroupNorm(4, 32)], ids=["layernorm", "groupnorm"])
def test_norm(norm_layer):
    mod = lyco.NormModule("x", norm_layer, 1.0)
    randomize(mod)
    am = parse_module("m", state(mod))
    assert am.algo == "norm" and set(am.tensors) == {"w_norm", "b_norm"}
    c = norm_layer.weight.shape[0]
    x = torch.randn(3, c, 5) if isinstance(norm_layer, nn.GroupNorm) else torch.randn(3, 7, c)
    with torch.no_grad():
        for m in (1.0, 0.7):
            mod.multiplier = m
            ref = mod(x)
            w, b = am.apply(norm_layer.weight, m, norm_layer.bias)
            if isinstance(norm_layer, nn.GroupNorm):
                got = F.group_norm(x, norm_layer.num_groups, w, b, norm_layer.eps)
            else:
                got = F.layer_norm(x, norm_layer.normalized_shape, w, b, norm_layer.eps)
            assert rel_err(got, ref) < RTOL


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("on_input", [False, True])
def test_ia3(kind, on_input):
    """LyCORIS cannot reload IA3 files; compare its module forward and the formula W⊙(1+m·w)."""
    layer = make_layer(kind)
    mod = lyco.IA3Module("x", layer, 1.0, train_on_input=on_input)
    randomize(mod)
    am = check_against_lycoris(mod, layer)
    assert am.algo == "ia3" and am.scale == 1.0 and am.num_params == am.tensors["weight"].numel()
    w = layer.weight.detach()
    g = am.tensors["weight"].reshape(-1)
    shape = [1] * w.dim()
    shape[1 if on_input else 0] = -1
    expected = w * (1 + 0.7 * g.reshape(shape))
    w2, b2 = am.apply(w, 0.7, layer.bias)
    assert torch.allclose(w2, expected, rtol=1e-6, atol=1e-7)
    assert torch.equal(b2, layer.bias.detach())
    with pytest.raises(ValueError):
        am.delta()


# ----------------------------------------------------------------------------- OFT / BOFT / GLoRA
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("constraint,rescaled", [(0.0, False), (1e-3, True)])
def test_diag_oft(kind, constraint, rescaled):
    layer = make_layer(kind)
    mod = lyco.DiagOFTModule("x", layer, 1.0, lora_dim=4, constraint=constraint, rescaled=rescaled)
    randomize(mod, std=0.2)
    am = check_against_lycoris(mod, layer)
    assert am.algo == "oft" and am.scale == 1.0 and am.tensors["oft_blocks"].dim() == 3
    if constraint:  # the constraint must really bind for this test to mean something
        b = am.tensors["oft_blocks"]
        assert (b - b.transpose(-1, -2)).norm() > constraint * 48


@pytest.mark.parametrize("kind", KINDS)
def test_boft(kind):
    layer = make_layer(kind, out_f=32)
    mod = lyco.ButterflyOFTModule("x", layer, 1.0, lora_dim=4, constraint=1e-3, rescaled=True)
    randomize(mod, std=0.2)
    am = check_against_lycoris(mod, layer)
    assert am.algo == "boft" and am.tensors["oft_blocks"].dim() == 4


@pytest.mark.parametrize("kind", KINDS)
def test_glora(kind):
    layer = make_layer(kind)
    mod = lyco.GLoRAModule("x", layer, 1.0, lora_dim=4, alpha=2)
    randomize(mod)
    am = check_against_lycoris(mod, layer)
    assert am.tensors["alpha"].dtype == torch.int64
    assert am.rank == 4 and am.scale == 0.5
    with pytest.raises(ValueError):
        am.delta()


# ----------------------------------------------------------------------------- AdaLoRA (PEFT)
def test_adalora_against_peft():
    peft = pytest.importorskip("peft")

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(24, 16)

        def forward(self, x):
            return self.lin(x)

    torch.manual_seed(4)
    net = Net()
    x = torch.randn(3, 24)
    with torch.no_grad():
        base = net(x)
    cfg = peft.AdaLoraConfig(init_r=6, target_r=2, lora_alpha=8, target_modules=["lin"], total_step=10)
    model = peft.get_peft_model(net, cfg)
    layer = model.base_model.model.lin
    keep = torch.tensor([True, False, True, False, False, True])
    with torch.no_grad():
        layer.lora_A["default"].normal_()
        layer.lora_B["default"].normal_()
        layer.lora_E["default"].normal_()
        layer.lora_E["default"][~keep] = 0  # what pruning does in training; the saved file keeps rows
        ref = model(x) - base
    t = {
        "lora_A": layer.lora_A["default"].detach()[keep].clone(),
        "lora_B": layer.lora_B["default"].detach()[:, keep].clone(),
        "lora_E": layer.lora_E["default"].detach()[keep].clone(),
    }
    am = parse_module("m", t, {"lora_alpha": 8, "init_r": 6})
    assert am.algo == "adalora" and am.rank == 3 and am.scale == pytest.approx(8 / 6)
    assert rel_err(F.linear(x, am.delta()), ref) < 1e-4  # PEFT divides by ranknum + 1e-5
    with pytest.raises(ValueError, match="lora_alpha"):
        parse_module("m", t)


# ----------------------------------------------------------------------------- alpha, rank, params
def _lora(alpha_t):
    up, down = torch.randn(10, 4), torch.randn(4, 12)
    t = {"lora_up.weight": up, "lora_down.weight": down}
    if alpha_t is not None:
        t["alpha"] = alpha_t
    return parse_module("m", t), up @ down


@pytest.mark.parametrize(
    "alpha_t,scale",
    [
        (None, 1.0),
        (torch.tensor(0.0), 1.0),
        (torch.tensor(2.0), 0.5),
        (torch.tensor([2.0], dtype=torch.float16), 0.5),
        (torch.tensor(6, dtype=torch.int64), 1.5),
        (torch.tensor([1], dtype=torch.int64), 0.25),
    ],
)
def test_alpha_forms(alpha_t, scale):
    am, raw = _lora(alpha_t)
    assert am.scale == pytest.approx(scale)
    assert torch.allclose(am.delta(), raw * scale, rtol=1e-6, atol=1e-6)
    assert am.delta().dtype == torch.float32
    # multiplier applies once on top
    w = torch.randn(10, 12)
    assert torch.allclose(am.apply(w, 0.3)[0], w + 0.3 * scale * raw, rtol=1e-6, atol=1e-6)


def test_rank_and_num_params():
    am = parse_module("m", loha.to_tensors(torch.randn(8, 3), torch.randn(3, 20), torch.randn(8, 3),
                                           torch.randn(3, 20), alpha=1))
    assert am.rank == 3 and am.num_params == 2 * (8 * 3 + 3 * 20) and am.weight_shape_hint() == (8, 20)
    am = parse_module("m", lora.to_tensors(torch.randn(8, 5, 1, 1), torch.randn(5, 2, 1, 1), 5,
                                           mid=torch.randn(5, 5, 3, 3)))
    assert am.rank == 5 and am.num_params == 40 + 10 + 225 and am.weight_shape_hint() == (8, 2, 3, 3)
    assert am.tensors["alpha"].shape == () and am.tensors["alpha"].dtype == torch.float32
    ia = parse_module("m", ia3.to_tensors(torch.randn(8)))
    assert ia.rank is None and ia.num_params == 8 and ia.weight_shape_hint() is None
    fu = parse_module("m", full.to_tensors(torch.randn(8, 2), torch.randn(8)))
    assert fu.rank is None and fu.num_params == 24 and fu.scale == 1.0
    assert parse_module("m", norm.to_tensors(torch.randn(8))).algo == "norm"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_factors_math_in_float32(dtype):
    up, down, mid = torch.randn(6, 3, 1, 1), torch.randn(3, 4, 1, 1), torch.randn(3, 3, 3, 3)
    t = {k: v.to(dtype) for k, v in lora.to_tensors(up, down, 1.5, mid=mid).items()}
    am = parse_module("m", t)
    d = am.delta()
    assert d.dtype == torch.float32 and d.shape == (6, 4, 3, 3)
    f = lambda v: v.to(dtype).float()  # noqa: E731
    ref = torch.einsum("oa,abhw,bc->ochw", f(up).flatten(1), f(mid), f(down).flatten(1)) * 0.5
    assert torch.allclose(d, ref, rtol=1e-5, atol=1e-5)
    w2, _ = am.apply(torch.zeros(6, 4, 3, 3, dtype=dtype), 2.0)
    assert w2.dtype == torch.float32 and torch.allclose(w2, 2 * ref, rtol=1e-5, atol=1e-5)


def test_weight_shape_reshape():
    """A LoHa conv stores flattened factors: delta() is (out, K) until given the weight shape."""
    am = parse_module("m", loha.to_tensors(torch.randn(8, 3), torch.randn(3, 18), torch.randn(8, 3),
                                           torch.randn(3, 18), alpha=3))
    assert am.delta().shape == (8, 18)
    assert am.delta((8, 2, 3, 3)).shape == (8, 2, 3, 3)
    with pytest.raises(ValueError):
        am.delta((8, 2, 3, 4))


def test_sparse_residual_int16_wrap():
    """Extractor sparse residual: COO in (out, K) with int16 indices (wrapping past 32767), added before scaling."""
    out_f, k, r = 3, 40000, 2
    up, down = torch.randn(out_f, r), torch.randn(r, k)
    rows = torch.tensor([0, 2, 1, 2])
    cols = torch.tensor([5, 33000, 39999, 33000])  # a duplicate: COO entries sum
    vals = torch.tensor([1.0, -2.0, 3.0, 0.5], dtype=torch.float16)
    t = lora.to_tensors(up, down, alpha=1.0)
    t["bias_indices"] = torch.stack([rows, cols]).to(torch.int16)
    t["bias_values"] = vals
    t["bias_size"] = torch.tensor([out_f, k]).to(torch.int16)
    assert int(t["bias_indices"][1, 1]) < 0  # really wrapped on disk
    am = parse_module("m", t)
    dense = torch.zeros(out_f, k)
    dense[0, 5], dense[2, 33000], dense[1, 39999] = 1.0, -1.5, 3.0
    expected = 0.5 * (up @ down + dense)
    assert torch.allclose(am.delta(), expected, rtol=1e-5, atol=1e-5)


def test_to_tensors_round_trip():
    w1a, w1b, w2a, w2b = torch.randn(4, 2), torch.randn(2, 3), torch.randn(5, 2), torch.randn(2, 6)
    am = parse_module("m", lokr.to_tensors((w1a, w1b), (w2a, w2b), alpha=1.0))
    assert am.rank == 2 and am.scale == 0.5
    assert torch.allclose(am.delta(), 0.5 * torch.kron(w1a @ w1b, w2a @ w2b), rtol=1e-5, atol=1e-6)
    assert am.weight_shape_hint() == (20, 18)


# ----------------------------------------------------------------------------- errors and registry
@pytest.mark.parametrize(
    "tensors,match",
    [
        ({"foo": torch.zeros(1), "bar": torch.zeros(1)}, "no adapter algorithm"),
        ({"lora_up.weight": torch.zeros(4, 3), "lora_down.weight": torch.zeros(2, 5)}, "rank"),
        ({"lora_up.weight": torch.zeros(4, 3)}, "lora_down"),
        ({"lora_up.weight": torch.zeros(4, 2), "lora_down.weight": torch.zeros(2, 5), "hada_w1_b": torch.zeros(1)},
         "hada_w1_b"),
        ({"hada_w1_a": torch.zeros(4, 2), "hada_w1_b": torch.zeros(2, 5)}, "hada_w2_a"),
        ({"lokr_w1": torch.zeros(2, 2), "lokr_w2_a": torch.zeros(3, 2), "lokr_w2_b": torch.zeros(3, 5)}, "lokr_w2"),
        ({"lora_up.weight": torch.zeros(4, 2), "lora_down.weight": torch.zeros(2, 5),
          "bias_values": torch.zeros(3)}, "sparse"),
    ],
)
def test_parse_errors(tensors, match):
    with pytest.raises(ValueError, match=match):
        parse_module("lora_unet_bad", tensors)


def test_registry_and_detection_order():
    assert list(ALGORITHMS)[:4] == ["lora", "loha", "ia3", "lokr"]
    for name in ("lora", "loha", "lokr", "full", "norm", "ia3", "oft", "boft", "glora", "adalora"):
        mod = ALGORITHMS[name]
        for attr in ("SUFFIXES", "detect", "rank", "delta"):
            assert hasattr(mod, attr), (name, attr)
    for mod in (lora, loha, lokr, full):
        assert hasattr(mod, "to_tensors")
    assert glora.detect({"a1.weight"}) and oft.detect({"oft_blocks"}) and adalora.detect({"lora_E"})

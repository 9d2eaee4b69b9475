"""The project's own adapter layers for training, attached to a model's Linear/Conv2d layers by hooks.

Each target layer keeps its weights and module path; a child module ``lycotools_adapter`` holds the
trainable factors, and a forward hook adds its output: ``y = W x + m·(adapter path)(x)``.

* LoRA / LoCon: ``scale · up(down(x))`` (down has the layer's kernel, stride and padding; up is 1×1),
  which equals ``conv(x, scale · up @ down)`` exactly, i.e. the ΔW the file stores.
* LoHa / LoKr: ΔW is built from the factors with ``lycotools.adapters.loha.delta`` / ``lokr.delta``
  (the same functions every reader of the saved file uses), in autograd, and applied as an extra weight.
  With ``tucker`` a k×k conv (some kernel side ≠ 1, as LyCORIS decides) uses LyCORIS's Tucker layout:
  LoHa ``hada_t1/t2`` (r, r, kh, kw) with ``hada_w?_a`` (r, out) and ``hada_w?_b`` (r, in); LoKr
  ``lokr_t2`` with ``lokr_w2_a`` (r, b) and ``lokr_w2_b`` (r, d) (only when W2 is factored at all).
* Full (``algo=full``): no adapter layer: the target layer's own weight and bias train (float32 masters
  under mixed precision) and the file stores ``diff = W − W_base``, ``diff_b = b − b_base``, with
  W_base read back from the checkpoint when saving (docs/adapters.md#full).
* AdaLoRA: the SVD form ``P · diag(E) · Q · alpha / R`` (R = initial rank); saved as plain LoRA with
  the kept triplets: ``up = P·diag(E)``, ``down = Q``, ``alpha = r_k · alpha / R`` (ΔW unchanged).

So the saved file's ΔW is exactly what was trained (up to float32 rounding). Why not PEFT: PEFT's
AdaLoRA divides by ``ranknum + 1e-5`` and skips the orthogonality term on a UNet, and its LoHa/LoKr
layouts and scales differ from LyCORIS's files; converting after training would need the same math
as here anyway.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..adapters import loha as loha_math
from ..adapters import lokr as lokr_math
from ..adapters import lora as lora_math
from ..adapters.base import EPS
from ..errors import BadInput
from ..layouts.adapter_keys import kohya_module_name

ATTR = "lycotools_adapter"


class AdapterLayer(nn.Module):
    """Common part: the wrapped layer's geometry and the multiplier."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        w = layer.weight
        self.weight_shape = tuple(w.shape)
        self.is_conv = isinstance(layer, nn.Conv2d)
        if self.is_conv:
            self.conv_kw = dict(stride=layer.stride, padding=layer.padding, dilation=layer.dilation, groups=layer.groups)
        self.out_features = w.shape[0]
        self.in_features = w.shape[1]  # per group for convs
        self.kernel = tuple(w.shape[2:])
        self.K = int(math.prod(w.shape[1:]))
        self.multiplier = 1.0
        self.dora = False

    def enable_dora(self, weight: torch.Tensor):
        """DoRA (docs/adapters.md#dora): a trainable per-output-row magnitude, initialised to ‖W‖ of each row."""
        w = weight.detach().float()
        norm = w.reshape(w.shape[0], -1).norm(dim=1)
        self.dora_scale = nn.Parameter(norm.reshape(w.shape[0], *([1] * (w.dim() - 1))).clone())
        self.dora = True

    def dora_output(self, layer, out, extra):
        """y = s ⊙ ((W + ΔW) x) + b with s = dora_scale / (‖W + ΔW‖_row + eps), as every reader merges it."""
        w = layer.weight.detach()
        v = w.float() + self.delta_autograd().to(w.device)
        norm = v.reshape(v.shape[0], -1).norm(dim=1) + EPS
        s = self.dora_scale.reshape(-1) / norm
        bias = layer.bias
        shape = (1, -1, 1, 1) if self.is_conv else (-1,)
        y = out if bias is None else out - bias.reshape(shape)
        y = (y + extra) * s.reshape(shape).to(out.dtype)
        return y if bias is None else y + bias.reshape(shape)

    def delta_autograd(self):
        return self.delta()

    def dora_tensors(self):
        return {"dora_scale": self.dora_scale.detach().float().cpu().contiguous()} if self.dora else {}

    def apply_weight(self, x, dw):
        dw = dw.to(x.dtype) if not torch.is_autocast_enabled(x.device.type) else dw
        if self.is_conv:
            return F.conv2d(x, dw, None, **self.conv_kw)
        return F.linear(x, dw)

    # subclasses: forward(x) -> extra output; delta() -> ΔW float32; tensors() -> file tensors or None


class LoRALayer(AdapterLayer):
    algo = "lora"

    def __init__(self, layer, rank: int, alpha: float, tucker: bool = False):
        super().__init__(layer)
        self.rank, self.alpha = rank, float(alpha)
        self.scale = self.alpha / rank
        self.tucker = tucker and self.is_conv and any(k != 1 for k in self.kernel) and self.conv_kw["groups"] == 1
        if self.tucker:  # 1x1 (in -> r), kxk core (r -> r, the layer's stride/padding), 1x1 (r -> out)
            self.down = nn.Conv2d(self.in_features, rank, 1, bias=False)
            self.mid = nn.Conv2d(rank, rank, self.kernel, bias=False,
                                 **{k: v for k, v in self.conv_kw.items() if k != "groups"})
            self.up = nn.Conv2d(rank, self.out_features, 1, bias=False)
            nn.init.kaiming_uniform_(self.mid.weight, a=math.sqrt(5))
        elif self.is_conv:
            self.down = nn.Conv2d(self.in_features * self.conv_kw["groups"], rank, self.kernel, bias=False,
                                  **{k: v for k, v in self.conv_kw.items() if k != "groups"})
            self.up = nn.Conv2d(rank, self.out_features, 1, bias=False)
        else:
            self.down = nn.Linear(self.in_features, rank, bias=False)
            self.up = nn.Linear(rank, self.out_features, bias=False)
        nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.up.weight)

    def forward(self, x):
        h = self.down(x)
        if self.tucker:
            h = self.mid(h)
        return self.up(h) * (self.scale * self.multiplier)

    def file_tensors(self):
        t = {"lora_up.weight": self.up.weight, "lora_down.weight": self.down.weight}
        if self.tucker:
            t["lora_mid.weight"] = self.mid.weight
        return t

    def delta(self):
        t = {k: v.detach() for k, v in self.file_tensors().items()}
        return lora_math.delta(t, self.scale, self.weight_shape)

    def delta_autograd(self):
        return lora_math.delta(self.file_tensors(), self.scale, self.weight_shape)

    def tensors(self):
        t = {k: v.detach().float().cpu().contiguous() for k, v in self.file_tensors().items()}
        return {**lora_math.to_tensors(t["lora_up.weight"], t["lora_down.weight"], self.alpha, mid=t.get("lora_mid.weight")),
                **self.dora_tensors()}


class _FactoredLayer(AdapterLayer):
    """Layers whose ΔW is rebuilt from factors by the algorithm's own math (``lycotools.adapters.<algo>``)
    in autograd, then applied as an extra weight: the file's ΔW is exactly what trained."""

    algo_math = None  # the lycotools.adapters module of the algorithm

    def delta(self):
        return self.algo_math.delta(self.factors(), self.scale, self.weight_shape)

    def forward(self, x):
        return self.apply_weight(x, self.delta() * self.multiplier)


class LoHaLayer(_FactoredLayer):
    algo = "loha"
    algo_math = loha_math

    def __init__(self, layer, rank: int, alpha: float, tucker: bool = False):
        super().__init__(layer)
        self.rank, self.alpha = rank, float(alpha)
        self.scale = self.alpha / rank
        o, K = self.out_features, self.K
        self.tucker = tucker and self.is_conv and any(k != 1 for k in self.kernel)
        if self.tucker:  # LyCORIS's init: cores and w1_a N(0, 0.1), w?_b N(0, 1), w2_a 0 (ΔW starts at 0)
            i = self.in_features
            self.hada_t1 = nn.Parameter(torch.randn(rank, rank, *self.kernel) * 0.1)
            self.hada_w1_a = nn.Parameter(torch.randn(rank, o) * 0.1)
            self.hada_w1_b = nn.Parameter(torch.randn(rank, i))
            self.hada_t2 = nn.Parameter(torch.randn(rank, rank, *self.kernel) * 0.1)
            self.hada_w2_a = nn.Parameter(torch.zeros(rank, o))
            self.hada_w2_b = nn.Parameter(torch.randn(rank, i))
            return
        self.hada_w1_a = nn.Parameter(torch.randn(o, rank) * 0.1)
        self.hada_w1_b = nn.Parameter(torch.randn(rank, K))
        self.hada_w2_a = nn.Parameter(torch.zeros(o, rank))
        self.hada_w2_b = nn.Parameter(torch.randn(rank, K))

    def factors(self):
        f = {"hada_w1_a": self.hada_w1_a, "hada_w1_b": self.hada_w1_b,
             "hada_w2_a": self.hada_w2_a, "hada_w2_b": self.hada_w2_b}
        if self.tucker:
            f["hada_t1"], f["hada_t2"] = self.hada_t1, self.hada_t2
        return f

    def tensors(self):
        t = {k: v.detach().float().cpu().contiguous() for k, v in self.factors().items()}
        return {**loha_math.to_tensors(t["hada_w1_a"], t["hada_w1_b"], t["hada_w2_a"], t["hada_w2_b"], self.alpha,
                                       t.get("hada_t1"), t.get("hada_t2")),
                **self.dora_tensors()}


class LoKrLayer(_FactoredLayer):
    """W1 (a, c) full; W2 (b, d·k) full when rank >= max(b, d)/2 (then scale 1, as LyCORIS), else w2_a @ w2_b,
    or with ``tucker`` on a k×k conv the core lokr_t2 (r, r, kh, kw) between w2_a (r, b) and w2_b (r, d)."""

    algo = "lokr"
    algo_math = lokr_math

    def __init__(self, layer, rank: int, alpha: float, factor: int = -1, tucker: bool = False):
        super().__init__(layer)
        a, b = lokr_math.factorization(self.out_features, factor)
        c, d = lokr_math.factorization(self.in_features, factor)
        ksz = int(math.prod(self.kernel)) if self.kernel else 1
        self.alpha = float(alpha)
        self.lokr_w1 = nn.Parameter(torch.empty(a, c))
        nn.init.kaiming_uniform_(self.lokr_w1, a=math.sqrt(5))
        self.full_w2 = rank >= max(b, d) / 2
        self.tucker = tucker and not self.full_w2 and self.is_conv and any(k != 1 for k in self.kernel)
        if self.full_w2:
            self.rank = None
            self.scale = 1.0
            self.lokr_w2 = nn.Parameter(torch.zeros(b, d, *self.kernel))
        elif self.tucker:  # LyCORIS's init: core and w2_a Kaiming, w2_b 0 (ΔW starts at 0)
            self.rank = rank
            self.scale = self.alpha / rank
            self.lokr_t2 = nn.Parameter(torch.empty(rank, rank, *self.kernel))
            nn.init.kaiming_uniform_(self.lokr_t2, a=math.sqrt(5))
            self.lokr_w2_a = nn.Parameter(torch.empty(rank, b))
            nn.init.kaiming_uniform_(self.lokr_w2_a, a=math.sqrt(5))
            self.lokr_w2_b = nn.Parameter(torch.zeros(rank, d))
        else:
            self.rank = rank
            self.scale = self.alpha / rank
            self.lokr_w2_a = nn.Parameter(torch.empty(b, rank))
            nn.init.kaiming_uniform_(self.lokr_w2_a, a=math.sqrt(5))
            self.lokr_w2_b = nn.Parameter(torch.zeros(rank, d * ksz))

    def factors(self):
        if self.full_w2:
            return {"lokr_w1": self.lokr_w1, "lokr_w2": self.lokr_w2}
        f = {"lokr_w1": self.lokr_w1, "lokr_w2_a": self.lokr_w2_a, "lokr_w2_b": self.lokr_w2_b}
        if self.tucker:
            f["lokr_t2"] = self.lokr_t2
        return f

    def tensors(self):
        t = {k: v.detach().float().cpu().contiguous() for k, v in self.factors().items()}
        w2 = t["lokr_w2"] if self.full_w2 else (t["lokr_w2_a"], t["lokr_w2_b"])
        # both blocks full: LyCORIS forces alpha = dim, so store the network dim (scale is 1 either way)
        return {**lokr_math.to_tensors(t["lokr_w1"], w2, self.alpha, t2=t.get("lokr_t2")), **self.dora_tensors()}


class FullLayer(nn.Module):
    """algo=full: the target layer's own weight (and bias) train in place, so the forward costs nothing
    extra and nothing but those parameters gets gradients. ``tensors()`` reads the base weights back from
    the checkpoint (``source``: view, component, weight key, bias key or None) and stores the float32
    difference: merging the file gives back the trained weights."""

    algo = "full"
    dora = False

    def __init__(self, layer: nn.Module, source: tuple):
        super().__init__()
        for p in layer.parameters(recurse=False):
            p.data = p.data.clone()  # never share storage with a tensor the checkpoint reader may hand out again
            p.requires_grad_(True)
        self.layer = layer  # a child: parameters() and state_dict() (resume) are the trained weights
        self.source = source
        self.multiplier = 1.0

    def _base(self, key, like):
        view, comp = self.source[:2]
        return view.get(comp, key).float().reshape(like.shape)

    def delta(self):
        w = self.layer.weight.detach().float().cpu()
        return w - self._base(self.source[2], w)

    def tensors(self):
        out = {"diff": self.delta().contiguous()}
        if self.source[3] is not None and self.layer.bias is not None:
            b = self.layer.bias.detach().float().cpu()
            out["diff_b"] = (b - self._base(self.source[3], b)).contiguous()
        return out


class AdaLoRALayer(AdapterLayer):
    """ΔW = P · diag(E) · Q · alpha / R; pruning zeroes entries of E (the triplet stays trainable)."""

    algo = "adalora"

    def __init__(self, layer, rank: int, alpha: float):
        super().__init__(layer)
        self.rank, self.alpha = rank, float(alpha)
        self.scale = self.alpha / rank
        self.lora_A = nn.Parameter(torch.randn(rank, self.K) * 0.02)  # Q
        self.lora_E = nn.Parameter(torch.zeros(rank))  # Λ
        self.lora_B = nn.Parameter(torch.randn(self.out_features, rank) * 0.02)  # P

    def forward(self, x):
        s = self.scale * self.multiplier
        if self.is_conv:
            q = self.lora_A.reshape(self.rank, self.in_features, *self.kernel)
            h = F.conv2d(x, q.to(x.dtype) if not torch.is_autocast_enabled(x.device.type) else q, None, **self.conv_kw)
            h = h * self.lora_E.reshape(1, -1, 1, 1)
            p = self.lora_B.reshape(self.out_features, self.rank, 1, 1)
            return F.conv2d(h, p.to(h.dtype) if not torch.is_autocast_enabled(x.device.type) else p) * s
        h = F.linear(x, self.lora_A) * self.lora_E
        return F.linear(h, self.lora_B) * s

    def delta(self):
        d = (self.lora_B.detach() * self.lora_E.detach()) @ self.lora_A.detach()
        return (d * self.scale).reshape(self.weight_shape).float()

    def orth_penalty(self):
        """‖AAᵀ − I‖_F + ‖BᵀB − I‖_F (PEFT/loralib form: plain Frobenius norms)."""
        A, B = self.lora_A, self.lora_B
        eye = torch.eye(self.rank, device=A.device, dtype=A.dtype)
        return torch.linalg.norm(A @ A.T - eye) + torch.linalg.norm(B.T @ B - eye)

    def kept(self):
        return (self.lora_E.detach() != 0).nonzero().flatten().cpu()

    def tensors(self):
        k = self.kept()
        if k.numel() == 0:
            return None
        E = self.lora_E.detach().float().cpu()[k]
        up = (self.lora_B.detach().float().cpu()[:, k] * E).contiguous()
        down = self.lora_A.detach().float().cpu()[k].contiguous()
        r_k = int(k.numel())
        if self.is_conv:
            up = up.reshape(self.out_features, r_k, 1, 1)
            down = down.reshape(r_k, self.in_features, *self.kernel)
        return lora_math.to_tensors(up, down, r_k * self.alpha / self.rank)


LAYERS = {"lora": LoRALayer, "locon": LoRALayer, "loha": LoHaLayer, "lokr": LoKrLayer, "adalora": AdaLoRALayer,
          "full": FullLayer}


def _hook(module, args, output):
    ad = getattr(module, ATTR)
    extra = ad(args[0])
    if ad.dora:
        return ad.dora_output(module, output, extra)
    return output + extra


@dataclass
class Target:
    component: str
    module: str  # module path in the model object
    name: str  # kohya module name in the file
    layer: nn.Module
    adapter: AdapterLayer


UNET_ATTN_CLASSES = ("Transformer2DModel",)
UNET_CONV_CLASSES = ("ResnetBlock2D", "Downsample2D", "Upsample2D")
TE_CLASSES = ("CLIPAttention", "CLIPSdpaAttention", "CLIPMLP")
_TE_LAYER = re.compile(r"(?:^|\.)encoder\.layers\.(\d+)\.")  # a text-encoder module's layer index


def _walk(model: nn.Module, classes: tuple[str, ...]):
    seen = set()
    found = []
    for name, mod in model.named_modules():
        if type(mod).__name__ in classes:
            for sub, child in mod.named_modules():
                full = f"{name}.{sub}" if sub else name
                if full not in seen and isinstance(child, (nn.Linear, nn.Conv2d)):
                    seen.add(full)
                    found.append((full, child))
    return found


class Network(nn.Module):
    """All adapter layers of one training run; ``targets`` keeps their place and file names."""

    def __init__(self):
        super().__init__()
        self.targets: list[Target] = []
        self.layers = nn.ModuleList()

    def add(self, t: Target):
        self.targets.append(t)
        self.layers.append(t.adapter)

    def set_multiplier(self, m: float):
        for t in self.targets:
            t.adapter.multiplier = m

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """The adapter file's tensors: ``<kohya name>.<canonical suffix>``."""
        out = {}
        for t in self.targets:
            tens = t.adapter.tensors()
            if tens is None:
                continue
            for s, v in tens.items():
                out[f"{t.name}.{s}"] = v
        return dict(sorted(out.items()))

    def remove(self):
        for t in self.targets:
            if getattr(t, "handle", None) is None:  # algo=full: nothing attached
                continue
            t.handle.remove()  # type: ignore[attr-defined]
            delattr(t.layer, ATTR)


def inject(base, algo: str, *, rank: int, alpha: float, conv_rank: int = 0, conv_alpha: float | None = None,
           factor: int = -1, train_unet: bool = True, train_text_encoder: bool = False, dora: bool = False,
           tucker: bool = False, te_unused_layers: int = 0) -> Network:
    """Attach adapter layers to the UNet (transformer blocks; ResNet/resampler convs when conv_rank > 0)
    and, with ``train_text_encoder``, to the text encoders' attention and MLP linears. ``algo="full"``
    makes the same layers' own weights and biases trainable instead (rank and alpha unused; k×k convs
    when conv_rank > 0). ``te_unused_layers`` N: the text encoders' last N layers, which clip skip leaves
    out of the conditioning, get nothing (they could not train)."""
    cls = LAYERS[algo]
    conv_alpha = alpha if conv_alpha is None else conv_alpha
    net = Network()

    def make(layer, comp, path):
        k = tuple(layer.weight.shape[2:])
        is_kxk = isinstance(layer, nn.Conv2d) and any(s != 1 for s in k)
        r, a = (conv_rank, conv_alpha) if is_kxk else (rank, alpha)
        if cls is FullLayer:  # no rank: every linear, k×k convs unless conv_rank is 0
            return None if is_kxk and conv_rank <= 0 else cls(layer, _base_source(base, comp, path, layer))
        if r <= 0:
            return None
        if cls is LoKrLayer:
            return cls(layer, r, a, factor, tucker)
        if cls in (LoRALayer, LoHaLayer):
            return cls(layer, r, a, tucker)
        return cls(layer, r, a)

    comps = []
    if train_unet:
        classes = UNET_ATTN_CLASSES + (UNET_CONV_CLASSES if conv_rank > 0 else ())
        comps.append(("unet", base.unet, classes))
    if train_text_encoder:
        comps += [(c, base.text_encoders[c], TE_CLASSES) for c in base.te_names]
    for comp, model, classes in comps:
        n_layers = getattr(getattr(model, "config", None), "num_hidden_layers", None)
        for path, layer in _walk(model, classes):
            m = _TE_LAYER.search(path) if comp != "unet" and te_unused_layers and n_layers else None
            if m and int(m.group(1)) >= n_layers - te_unused_layers:
                continue
            ad = make(layer, comp, path)
            if ad is None:
                continue
            if dora:
                ad.enable_dora(layer.weight)
            ad.to(device=layer.weight.device)
            if comp == "unet":
                name = kohya_module_name(base.arch, "unet", path,
                                         base.view.ldm_module("unet", path) if base.arch.startswith("sdxl") else None)
            else:
                name = kohya_module_name(base.arch, comp, path)
            t = Target(comp, path, name, layer, ad)
            if cls is not FullLayer:
                layer.add_module(ATTR, ad)
                t.handle = layer.register_forward_hook(_hook)  # type: ignore[attr-defined]
            net.add(t)
    return net


def _base_source(base, comp: str, path: str, layer: nn.Module) -> tuple:
    """(view, component, weight key, bias key or None) of a layer's base weights in the checkpoint view
    (text-encoder keys with or without transformers' ``text_model.`` level)."""
    view = base.view

    def find(suffix):
        for key in (f"{path}.{suffix}", f"text_model.{path}.{suffix}",
                    f"{path[len('text_model.'):]}.{suffix}" if path.startswith("text_model.") else None):
            if key is not None and (comp, key) in view:
                return key
        return None

    wkey = find("weight")
    bkey = find("bias") if layer.bias is not None else None
    if wkey is None or (layer.bias is not None and bkey is None):
        raise BadInput(base.path, f"{comp}: no base weights for {path} in the checkpoint (needed for --algo full)")
    return view, comp, wkey, bkey

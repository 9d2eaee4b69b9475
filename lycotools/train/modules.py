"""The project's own adapter layers for training, attached to a model's Linear/Conv2d layers by hooks.

Each target layer keeps its weights and module path; a child module ``lycotools_adapter`` holds the
trainable factors, and a forward hook adds its output: ``y = W x + m·(adapter path)(x)``.

* LoRA / LoCon: ``scale · up(down(x))`` (down has the layer's kernel, stride and padding; up is 1×1),
  which equals ``conv(x, scale · up @ down)`` exactly, i.e. the ΔW the file stores.
* LoHa / LoKr: ΔW is built from the factors with ``lycotools.adapters.loha.delta`` / ``lokr.delta``
  (the same functions every reader of the saved file uses), in autograd, and applied as an extra weight.
* AdaLoRA: the SVD form ``P · diag(E) · Q · alpha / R`` (R = initial rank); saved as plain LoRA with
  the kept triplets: ``up = P·diag(E)``, ``down = Q``, ``alpha = r_k · alpha / R`` (ΔW unchanged).

So the saved file's ΔW is exactly what was trained (up to float32 rounding). Why not PEFT: PEFT's
AdaLoRA divides by ``ranknum + 1e-5`` and skips the orthogonality term on a UNet, and its LoHa/LoKr
layouts and scales differ from LyCORIS's files; converting after training would need the same math
as here anyway.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..adapters import loha as loha_math
from ..adapters import lokr as lokr_math
from ..adapters import lora as lora_math
from ..adapters.base import EPS
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
        """DoRA (lycoris.md §2.2): a trainable per-output-row magnitude, initialised to ‖W‖ of each row."""
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

    def __init__(self, layer, rank: int, alpha: float):
        super().__init__(layer)
        self.rank, self.alpha = rank, float(alpha)
        self.scale = self.alpha / rank
        o, K = self.out_features, self.K
        self.hada_w1_a = nn.Parameter(torch.randn(o, rank) * 0.1)
        self.hada_w1_b = nn.Parameter(torch.randn(rank, K))
        self.hada_w2_a = nn.Parameter(torch.zeros(o, rank))
        self.hada_w2_b = nn.Parameter(torch.randn(rank, K))

    def factors(self):
        return {"hada_w1_a": self.hada_w1_a, "hada_w1_b": self.hada_w1_b,
                "hada_w2_a": self.hada_w2_a, "hada_w2_b": self.hada_w2_b}

    def tensors(self):
        t = {k: v.detach().float().cpu().contiguous() for k, v in self.factors().items()}
        return {**loha_math.to_tensors(t["hada_w1_a"], t["hada_w1_b"], t["hada_w2_a"], t["hada_w2_b"], self.alpha),
                **self.dora_tensors()}


class LoKrLayer(_FactoredLayer):
    """W1 (a, c) full; W2 (b, d·k) full when rank >= max(b, d)/2 (then scale 1, as LyCORIS), else w2_a @ w2_b."""

    algo = "lokr"
    algo_math = lokr_math

    def __init__(self, layer, rank: int, alpha: float, factor: int = -1):
        super().__init__(layer)
        a, b = lokr_math.factorization(self.out_features, factor)
        c, d = lokr_math.factorization(self.in_features, factor)
        ksz = int(math.prod(self.kernel)) if self.kernel else 1
        self.alpha = float(alpha)
        self.lokr_w1 = nn.Parameter(torch.empty(a, c))
        nn.init.kaiming_uniform_(self.lokr_w1, a=math.sqrt(5))
        self.full_w2 = rank >= max(b, d) / 2
        if self.full_w2:
            self.rank = None
            self.scale = 1.0
            self.lokr_w2 = nn.Parameter(torch.zeros(b, d, *self.kernel))
        else:
            self.rank = rank
            self.scale = self.alpha / rank
            self.lokr_w2_a = nn.Parameter(torch.empty(b, rank))
            nn.init.kaiming_uniform_(self.lokr_w2_a, a=math.sqrt(5))
            self.lokr_w2_b = nn.Parameter(torch.zeros(rank, d * ksz))

    def factors(self):
        if self.full_w2:
            return {"lokr_w1": self.lokr_w1, "lokr_w2": self.lokr_w2}
        return {"lokr_w1": self.lokr_w1, "lokr_w2_a": self.lokr_w2_a, "lokr_w2_b": self.lokr_w2_b}

    def tensors(self):
        t = {k: v.detach().float().cpu().contiguous() for k, v in self.factors().items()}
        w2 = t["lokr_w2"] if self.full_w2 else (t["lokr_w2_a"], t["lokr_w2_b"])
        # both blocks full: LyCORIS forces alpha = dim, so store the network dim (scale is 1 either way)
        return {**lokr_math.to_tensors(t["lokr_w1"], w2, self.alpha), **self.dora_tensors()}


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


LAYERS = {"lora": LoRALayer, "locon": LoRALayer, "loha": LoHaLayer, "lokr": LoKrLayer, "adalora": AdaLoRALayer}


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
            t.handle.remove()  # type: ignore[attr-defined]
            delattr(t.layer, ATTR)


def inject(base, algo: str, *, rank: int, alpha: float, conv_rank: int = 0, conv_alpha: float | None = None,
           factor: int = -1, train_unet: bool = True, train_text_encoder: bool = False, dora: bool = False,
           tucker: bool = False) -> Network:
    """Attach adapter layers to the UNet (transformer blocks; ResNet/resampler convs when conv_rank > 0)
    and, with ``train_text_encoder``, to the text encoders' attention and MLP linears."""
    cls = LAYERS[algo]
    conv_alpha = alpha if conv_alpha is None else conv_alpha
    net = Network()

    def make(layer):
        k = tuple(layer.weight.shape[2:])
        is_kxk = isinstance(layer, nn.Conv2d) and any(s != 1 for s in k)
        r, a = (conv_rank, conv_alpha) if is_kxk else (rank, alpha)
        if r <= 0:
            return None
        if cls is LoKrLayer:
            return cls(layer, r, a, factor)
        if cls is LoRALayer:
            return cls(layer, r, a, tucker)
        return cls(layer, r, a)

    comps = []
    if train_unet:
        classes = UNET_ATTN_CLASSES + (UNET_CONV_CLASSES if conv_rank > 0 else ())
        comps.append(("unet", base.unet, classes))
    if train_text_encoder:
        comps += [(c, base.text_encoders[c], TE_CLASSES) for c in base.te_names]
    for comp, model, classes in comps:
        for path, layer in _walk(model, classes):
            ad = make(layer)
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
            layer.add_module(ATTR, ad)
            t = Target(comp, path, name, layer, ad)
            t.handle = layer.register_forward_hook(_hook)  # type: ignore[attr-defined]
            net.add(t)
    return net

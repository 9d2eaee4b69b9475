"""AdaLoRA's budget allocation (docs/formats.md#adalora-training), reimplemented from the paper's formulas.

* Budget b = number of nonzero singular values (entries of E) over all adapted layers; b0 = R·n,
  bT = r·n for n layers, initial rank R, target rank r.
* Cubic schedule: b0 while t ≤ t_init; bT + (b0 − bT)·(1 − (t − t_init)/(T − t_final − t_init))³ until
  T − t_final (masking every ΔT steps); bT afterwards, with the pattern frozen.
* Importance (PLATON): I = |w·∂L/∂w|; Ī ← β1·Ī + (1−β1)·I; Ū ← β2·Ū + (1−β2)·|I − Ī|; s = Ī·Ū.
  Triplet score S_i = s(E_i) + mean_j s(A_ij) + mean_j s(B_ji); the (b0 − b) lowest scores, ranked over
  all layers, have their E_i set to 0 (the vectors keep training).
* Orthogonality regulariser: mean over all A and B of ‖AAᵀ − I‖_F and ‖BᵀB − I‖_F, times ``orth_reg``,
  added to the loss in the training loop (PEFT skips it on a UNet).
"""

from __future__ import annotations

import torch


class RankAllocator:
    def __init__(self, layers, *, init_rank: int, target_rank: int, total_steps: int, tinit: int, tfinal: int,
                 delta_t: int, beta1: float = 0.85, beta2: float = 0.85):
        if not tinit < total_steps - tfinal:
            raise ValueError(f"--tinit ({tinit}) must be below the number of steps minus --tfinal "
                             f"({total_steps} - {tfinal})")
        self.layers = list(layers)
        self.R, self.r = init_rank, target_rank
        self.T, self.tinit, self.tfinal, self.dt = total_steps, tinit, tfinal, max(1, delta_t)
        self.b1, self.b2 = beta1, beta2
        self.b0 = init_rank * len(self.layers)
        self.bT = target_rank * len(self.layers)
        self.ipt: dict[str, torch.Tensor] = {}
        self.unc: dict[str, torch.Tensor] = {}
        self.pattern: list[torch.Tensor] | None = None
        self.budget = self.b0

    def schedule(self, step: int) -> tuple[int, bool]:
        if step <= self.tinit:
            return self.b0, False
        if step > self.T - self.tfinal:
            return self.bT, True
        mul = 1 - (step - self.tinit) / (self.T - self.tfinal - self.tinit)
        return int((self.b0 - self.bT) * mul ** 3 + self.bT), step % self.dt == 0

    def orth_loss(self) -> torch.Tensor:
        return torch.stack([l.orth_penalty() for l in self.layers]).sum() / (2 * len(self.layers))

    @torch.no_grad()
    def update_ipt(self):
        for i, l in enumerate(self.layers):
            for n in ("lora_A", "lora_E", "lora_B"):
                p = getattr(l, n)
                if p.grad is None:
                    continue
                key = f"{i}.{n}"
                cur = (p * p.grad).abs().float()
                if key not in self.ipt:
                    self.ipt[key] = torch.zeros_like(cur)
                    self.unc[key] = torch.zeros_like(cur)
                self.ipt[key].mul_(self.b1).add_(cur, alpha=1 - self.b1)
                self.unc[key].mul_(self.b2).add_((cur - self.ipt[key]).abs(), alpha=1 - self.b2)

    def _scores(self) -> list[torch.Tensor]:
        out = []
        for i, l in enumerate(self.layers):
            s = {n: self.ipt.get(f"{i}.{n}") for n in ("lora_A", "lora_E", "lora_B")}
            if any(v is None for v in s.values()):
                out.append(torch.zeros(l.rank, device=l.lora_E.device))
                continue
            sc = {n: self.ipt[f"{i}.{n}"] * self.unc[f"{i}.{n}"] for n in s}
            out.append(sc["lora_E"] + sc["lora_A"].mean(dim=1) + sc["lora_B"].mean(dim=0))
        return out

    @torch.no_grad()
    def mask_to(self, budget: int) -> list[torch.Tensor]:
        """Zero the E entries of the lowest-scored triplets so that at most ``budget`` stay; the keep masks."""
        scores = self._scores()
        flat = torch.cat([s.cpu() for s in scores])
        k = self.b0 - budget
        keeps = []
        if k <= 0:
            return [torch.ones(l.rank, dtype=torch.bool) for l in self.layers]
        thr = torch.kthvalue(flat, k).values
        for l, s in zip(self.layers, scores):
            keep = (s.cpu() > thr)
            l.lora_E.masked_fill_(~keep.to(l.lora_E.device), 0.0)
            keeps.append(keep)
        return keeps

    @torch.no_grad()
    def apply_pattern(self):
        for l, keep in zip(self.layers, self.pattern or []):
            l.lora_E.masked_fill_(~keep.to(l.lora_E.device), 0.0)

    def step(self, step: int):
        """Call after ``optimizer.step()`` (gradients still present) with the 1-based step number."""
        final = self.T - self.tfinal
        if step < final:
            self.update_ipt()
            self.budget, mask = self.schedule(step)
            if mask:
                self.mask_to(self.budget)
        elif step == final or self.pattern is None:
            self.update_ipt()
            self.budget = self.bT
            self.pattern = self.mask_to(self.bT)
            self.ipt.clear()
            self.unc.clear()
        else:
            self.apply_pattern()

    def state_dict(self) -> dict:
        return {"ipt": dict(self.ipt), "unc": dict(self.unc), "budget": self.budget,
                "pattern": list(self.pattern) if self.pattern is not None else []}

    def load_state_dict(self, sd: dict):
        self.ipt, self.unc = dict(sd["ipt"]), dict(sd["unc"])
        self.budget = int(sd["budget"])
        self.pattern = list(sd["pattern"]) or None

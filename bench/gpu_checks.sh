#!/usr/bin/env bash
# The GPU checks, as one short script for a session that is lent a GPU (device tool):
#   1. extract on CUDA gives the same adapter as on CPU (to fp16 rounding) on the tiny SD1 pair, and
#      times a whole SD1.5-sized extract on the GPU;
#   2. merge (bake) on CUDA equals the CPU result on the tiny fixtures;
#   3. train --algo full on CUDA with bf16 autocast (tiny fixture): the trained weights stay float32 on the GPU,
#      frozen ones are bf16, and the saved diff is exactly trained − base;
#   4. bench/train_gpu.sh (SD1.5-sized LoRA training, 200 steps, bf16): it/s and peak GPU memory, then the same
#      model with ALGO=full for 50 steps (full fine-tune of the attention/ResNet weights).
# Usage: bash bench/gpu_checks.sh   (needs a CUDA build of torch and diffusers; on the device machines, whose
#        image has no diffusers: run bench/fetch_gpu_wheels.sh here first, carry .whl, and run
#        `source bench/device_env.sh && bash bench/gpu_checks.sh 2>&1 | tee $OUT/gpu_checks.log` there)
set -euo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-/tmp/lyco_gpu}; mkdir -p "$out"
python - <<'PY'
import torch; assert torch.cuda.is_available(), "no CUDA device"; print("GPU:", torch.cuda.get_device_name(0))
PY
lycotools extract fixtures/sd1/base.safetensors fixtures/sd1/tuned.safetensors -o "$out/cpu.safetensors" --rank 4 --dtype fp32 --no-date --overwrite -q
lycotools extract fixtures/sd1/base.safetensors fixtures/sd1/tuned.safetensors -o "$out/cuda.safetensors" --rank 4 --dtype fp32 --no-date --overwrite -q --device cuda
python - "$out" <<'PY'
import sys
from lycotools.adapter_file import AdapterFile
out = sys.argv[1]
a, b = AdapterFile.open(f"{out}/cpu.safetensors"), AdapterFile.open(f"{out}/cuda.safetensors")
worst = 0.0
for ma, mb in zip(a.parsed, b.parsed):
    da, db = ma.module.delta(), mb.module.delta()
    worst = max(worst, float((da - db).norm() / da.norm()))
print(f"extract cuda vs cpu: worst relative ΔW difference {worst:.2e}"); assert worst < 1e-4
PY
time python bench/extract_e2e.py --arch sd1 --dir "$out" 2>&1 | tail -2
if lycotools merge --help >/dev/null 2>&1; then
  lycotools merge fixtures/sd1/base.safetensors fixtures/adapters/sd1_kohya_locon.safetensors -o "$out/m_cpu.safetensors" --overwrite -q
  lycotools merge fixtures/sd1/base.safetensors fixtures/adapters/sd1_kohya_locon.safetensors -o "$out/m_cuda.safetensors" --overwrite -q --device cuda
  python - "$out" <<'PY'
import sys
from lycotools.io.readers import open_source
a, b = open_source(f"{sys.argv[1]}/m_cpu.safetensors"), open_source(f"{sys.argv[1]}/m_cuda.safetensors")
worst = max(float((a.get(k).float() - b.get(k).float()).abs().max()) for k in a.keys())
print(f"merge cuda vs cpu: max abs difference {worst:.2e}"); assert worst < 1e-5
PY
fi
python - "$out" <<'PY'
import sys
from pathlib import Path

import torch
from PIL import Image
from safetensors.torch import load_file

from lycotools.train.trainer import TrainOptions, train

out = Path(sys.argv[1])
data = out / "full_data" / "1_thing"
data.mkdir(parents=True, exist_ok=True)
g = torch.Generator().manual_seed(0)
for i in range(4):
    Image.fromarray((torch.rand(64, 64, 3, generator=g) * 255).to(torch.uint8).numpy()).save(data / f"i{i}.png")
    (data / f"i{i}.txt").write_text(f"a photo of a thing, red, {i}")
opts = TrainOptions(algo="full", steps=5, lr=1e-3, resolution=32, batch_size=2, mixed_precision="bf16", device="cuda",
                    train_text_encoder=True, no_date=True)
res = train("fixtures/sd1/diffusers", data.parent, out / "full.safetensors", opts, overwrite=True, quiet=True,
            keep_models=True)
assert all(torch.isfinite(torch.tensor(res.losses))), res.losses
f = load_file(out / "full.safetensors")
worst, moved = 0.0, 0.0
for t in res.network.targets:
    w = t.layer.weight
    assert w.is_cuda and w.dtype == torch.float32, (t.name, w.device, w.dtype)
    view, comp, wkey, _ = t.adapter.source
    base = view.get(comp, wkey).float()
    worst = max(worst, float((base + f[t.name + ".diff"] - w.detach().cpu()).abs().max()))
    moved = max(moved, float(f[t.name + ".diff"].abs().max()))
assert res.base.unet.conv_in.weight.dtype == torch.bfloat16  # not a target: frozen in the compute dtype
print(f"full bf16 on cuda: {len(res.network.targets)} layers, max |diff| {moved:.2e}, "
      f"base + diff vs trained {worst:.2e}")
assert moved > 0 and worst < 1e-6
PY
[ -f bench/train_gpu.sh ] && bash bench/train_gpu.sh && ALGO=full STEPS=50 bash bench/train_gpu.sh

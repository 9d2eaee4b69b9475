#!/usr/bin/env bash
# The GPU checks, as one short script for a session that is lent a GPU (device tool):
#   1. extract on CUDA gives the same adapter as on CPU (to fp16 rounding) on the tiny SD1 pair, and
#      times a whole SD1.5-sized extract on the GPU;
#   2. merge (bake) on CUDA equals the CPU result on the tiny fixtures;
#   3. bench/train_gpu.sh (SD1.5-sized LoRA training, 200 steps, bf16): it/s and peak GPU memory.
# Usage: bash bench/gpu_checks.sh   (needs a CUDA build of torch: pip install torch --index-url ...)
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
[ -f bench/train_gpu.sh ] && bash bench/train_gpu.sh

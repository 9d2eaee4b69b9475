#!/usr/bin/env bash
# Run HERE (where pip reaches the package index), before a session's device run: the device machines'
# image has torch, transformers, accelerate, peft, safetensors, click, tqdm and Pillow but no diffusers
# (KINDS.md), and it cannot fetch anything. This puts the missing wheels in .whl/ (git-ignored through
# .git/info/exclude); name .whl in the run's `carry` and start its command with
#   source bench/device_env.sh && bash bench/gpu_checks.sh
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
mkdir -p .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .whl diffusers==0.42.1 importlib_metadata lycoris-lora==4.1.3 toml einops
ls -la .whl

#!/usr/bin/env bash
# lycotools train on one GPU: an SD1.5-sized model with random weights (shipped configs, no downloads),
# rank-16 LoRA at 512 px, bf16, batch 4, 200 steps on synthetic images; prints it/s and peak GPU memory.
# ALGO=full trains the UNet's attention/ResNet weights themselves instead (float32 masters, bf16 autocast).
# It goes through the real `lycotools train` path (diffusers folder -> latent cache -> loop -> save).
#
# Usage: bash bench/train_gpu.sh            (GPU; about 2-5 minutes on an H100, most of it building the model)
#        bash bench/train_gpu.sh --quick    (CPU smoke test of this script on the tiny SD1 fixture, seconds)
# Env:   OUT=folder for the work files (default /tmp/lyco_train_bench), STEPS=200,
#        ALGO=lora (or locon, loha, lokr, full)
set -euo pipefail
cd "$(dirname "$0")/.."
quick=0; [ "${1:-}" = "--quick" ] && quick=1
work=${OUT:-/tmp/lyco_train_bench}; mkdir -p "$work"
export HF_HUB_OFFLINE=1 QUICK=$quick WORK=$work STEPS=${STEPS:-200} ALGO=${ALGO:-lora}
python - <<'PY'
import json, os, shutil, sys, time
from pathlib import Path

import torch

quick = os.environ["QUICK"] == "1"
algo = os.environ["ALGO"]
work = Path(os.environ["WORK"])
steps = 3 if quick else int(os.environ["STEPS"])
res, bs = (32, 2) if quick else (512, 4)
fixture = Path("fixtures/sd1/diffusers")

if quick:
    model = fixture
    device = "cpu"
    torch.set_num_threads(1)  # tiny layers: intra-op threads only contend (many times slower on a busy 2-core box)
else:
    assert torch.cuda.is_available(), "no CUDA device (use --quick for the CPU smoke test)"
    device = "cuda"
    print("GPU:", torch.cuda.get_device_name(0), flush=True)
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel
    from lycotools.layouts.checkpoint import load_config

    model = work / "sd15_random"
    if not (model / "unet" / "diffusion_pytorch_model.safetensors").exists():
        t0 = time.time()
        shutil.rmtree(model, ignore_errors=True)
        torch.manual_seed(0)
        with torch.device("cuda"):  # random init on the GPU is seconds, on the CPU a minute
            unet = UNet2DConditionModel(**load_config("sd15_unet.json"))
            vae = AutoencoderKL(**load_config("sd_vae.json"))
            te = CLIPTextModel(CLIPTextConfig(**load_config("clip_vit_l14_text.json")))
        unet.to(torch.float16).save_pretrained(model / "unet")
        vae.save_pretrained(model / "vae")
        te.to(torch.float16).save_pretrained(model / "text_encoder")
        del unet, vae, te
        # a tokenizer needs only to map captions to ids below the vocabulary size: the fixture's tiny one does
        shutil.copytree(fixture / "tokenizer", model / "tokenizer")
        shutil.copytree(fixture / "scheduler", model / "scheduler")
        shutil.copy(fixture / "model_index.json", model / "model_index.json")
        torch.cuda.empty_cache()
        print(f"built a random SD1.5-sized model in {time.time() - t0:.0f} s", flush=True)

data = work / "data" / "1_thing"
if not data.exists() or len(list(data.glob("*.png"))) < 16:
    from PIL import Image
    data.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    for i in range(16):
        a = (torch.rand(res, res, 3, generator=g) * 255).to(torch.uint8).numpy()
        Image.fromarray(a).save(data / f"img{i}.png")
        (data / f"img{i}.txt").write_text(f"a photo of a thing, red, {i}")

from lycotools.train.trainer import TrainOptions, train

opts = TrainOptions(algo=algo, rank=16, alpha=16, resolution=res, batch_size=bs, steps=steps, lr=1e-4,
                    mixed_precision="no" if quick else "bf16", gradient_checkpointing=False, device=device,
                    no_date=True, seed=0)
if device == "cuda":
    torch.cuda.reset_peak_memory_stats()
t0 = time.time()
r = train(model, data.parent, work / f"bench_{algo}.safetensors", opts, overwrite=True, quiet=True)
total = time.time() - t0
skip = min(10, len(r.step_times) - 2)  # leave out the first steps (allocator warm-up, cuDNN autotune)
its = (len(r.step_times) - 1 - skip) / (r.step_times[-1] - r.step_times[skip])
peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else float("nan")
name = torch.cuda.get_device_name(0) if device == "cuda" else "CPU (quick smoke test, tiny fixture)"
print(json.dumps({"device": name, "algo": algo, "steps": len(r.step_times), "resolution": res, "batch": bs,
                  "it_per_s": round(its, 3), "images_per_s": round(its * bs, 2),
                  "peak_gpu_mem_gib": round(peak, 2), "wall_s_total": round(total, 1),
                  "final_loss": round(r.losses[-1], 4), "ranks": sorted(set(r.ranks.values()))}))
PY

# Source on a device machine (see bench/fetch_gpu_wheels.sh): installs the carried wheels where python3
# finds them, puts this checkout on the path, and makes `lycotools` a command without a pip install.
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH="/tmp/site:${PYTHONPATH:-}"
fi
export PYTHONPATH="$PWD:${PYTHONPATH:-}" HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
command -v python >/dev/null 2>&1 || { python() { python3 "$@"; }; export -f python; }
command -v lycotools >/dev/null 2>&1 || { lycotools() { python3 -m lycotools "$@"; }; export -f lycotools; }
python3 -c "import torch, diffusers, lycotools; print('device env: torch', torch.__version__, 'cuda', torch.cuda.is_available(), 'diffusers', diffusers.__version__)"

#!/usr/bin/env bash
# Prepared CUDA checks of sharded-shampoo on one GPU (about 3-5 minutes on an H100; 7.5 at most).
#
#   scripts/benchmarks/gpu_check.sh [OUT_DIR]        # OUT_DIR defaults to $OUT, else ./gpu_check_out
#
# Runs from the repository root with the machine's own python3/PyTorch (no install, nothing fetched):
# `python -m` imports the package from the checkout. Writes gpu_check.md (the report of scripts/benchmarks/gpu_check.py:
# step vs CPU, batched roots vs a per-block loop vs the warm GEMM series for 256..2048 blocks, the plain
# step vs the GEMM floor, memory vs the planner), env.txt and nvidia-smi.txt into OUT_DIR.
# The same Python runs on CPU in CI (tests/test_gpu_check.py: --device cpu --quick).
set -uo pipefail
cd "$(dirname "$0")/../.."
out="${1:-${OUT:-gpu_check_out}}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1
PY="${PYTHON:-python3}"
nvidia-smi > "$out/nvidia-smi.txt" 2>&1 || echo "nvidia-smi not available" > "$out/nvidia-smi.txt"
"$PY" - > "$out/env.txt" 2>&1 <<'PYEOF'
import platform, torch
print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda)
print("cuda available", torch.cuda.is_available())
if torch.cuda.is_available():
    print("device", torch.cuda.get_device_name(0), torch.cuda.get_device_properties(0).total_memory // 2**20, "MiB")
PYEOF
cat "$out/env.txt"
"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 3)" || { echo "no CUDA device"; exit 3; }
timeout 450 "$PY" -m scripts.benchmarks.gpu_check --device cuda 2>&1 | tee "$out/gpu_check.md"
status=${PIPESTATUS[0]}
echo "gpu_check.py exit status $status (0: correctness checks passed; 124: over the 450 s budget)"
exit "$status"

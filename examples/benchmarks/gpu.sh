#!/usr/bin/env bash
# Speed benchmark on a CUDA GPU, bf16, in under 10 minutes.
#
#   pip install -e '.[bench]'          # once: diffusers is a bench-only extra
#   bash examples/benchmarks/gpu.sh    # from the repository root
#
# Runs, in one process: the sampler comparison (ours vs the diffusers VQ-Diffusion
# loop) at the tiny, small and paper sizes with full 100-step loops, guidance 1 and 3,
# bf16 and fp32, the matmul peak, and a paper-size denoiser training step in bf16
# (conv MLP as in the paper, and linear). Writes
#   examples/benchmarks/SPEED_GPU.md    tables, headed by the GPU's name
#   examples/benchmarks/speed_gpu.json  every number
#   examples/benchmarks/speed_gpu.log   the same numbers line by line, as they are measured
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-python}

command -v nvidia-smi >/dev/null || { echo "gpu.sh: nvidia-smi not found: this script needs a CUDA GPU" >&2; exit 2; }
"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" \
  || { echo "gpu.sh: torch sees no CUDA device" >&2; exit 2; }
"$PY" -c "import diffusers" 2>/dev/null \
  || { echo "gpu.sh: diffusers is missing: pip install -e '.[bench]'" >&2; exit 2; }

GPU=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)
OUT=examples/benchmarks/SPEED_GPU.md
JSON=examples/benchmarks/speed_gpu.json
LOG=examples/benchmarks/speed_gpu.log
TMP=$(mktemp)
trap 'rm -f "$TMP"' EXIT
started=$(date +%s)

# 540 s hard limit for the benchmark itself, so the whole script stays under 10 minutes.
# Every measurement is also printed as one JSON line as it finishes; the log keeps
# them, so a run stopped by the limit still leaves what it measured.
timeout 540 "$PY" -W ignore examples/benchmarks/speed.py --device cuda \
  --sizes tiny,small,paper --dtypes bf16,fp32 --guidance 1,3 --ours-steps 100,25 --repeats 3 \
  --tiny-steps 100 --small-steps 100 --paper-batch 4 --paper-steps 100 \
  --paper-train bf16:conv:32:20,bf16:linear:32:20 \
  --out "$JSON" --markdown "$TMP" | tee "$LOG"

{
  echo "# Speed benchmark on a GPU: $GPU"
  echo
  echo "Produced by \`bash examples/benchmarks/gpu.sh\` ($(( $(date +%s) - started )) s)."
  echo "GPU (nvidia-smi): $GPU; driver $(nvidia-smi --query-gpu=driver_version --format=csv,noheader | head -1)."
  echo "Token sampling only on both sides (no VQ decode). Every loop ran all its steps (no scaling)."
  echo
  cat "$TMP"
} > "$OUT"
echo "wrote $OUT and $JSON"

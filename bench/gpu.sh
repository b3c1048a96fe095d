#!/usr/bin/env bash
# ZeRO-3 bf16 DPO of a ~1B Llama on one GPU, dpo_scale then TRL 1.16: tokens/s, peak GPU memory, MFU.
#
#   bash bench/gpu_wheels.sh        # once, on a machine with the package registry: wheels into .whl/
#   bash bench/gpu.sh               # on the GPU machine (with .whl/ carried there): about 4 minutes, at most 8
#
# The attention forms of logps.attention (issue 16): first their gradients against the dense mask's on one batch,
#   python bench/bench_gpu.py --check-gradients --batch 4
# then speed and memory at long context: dense mask vs FlexAttention vs varlen, TRL beside:
#   SIDES="dpo_scale_dense dpo_scale_flex dpo_scale_varlen trl" BATCH=2 PROMPT_TOKENS=1024 COMPLETION_TOKENS=1024 bash bench/gpu.sh
#   SIDES="dpo_scale_dense dpo_scale_flex dpo_scale_varlen trl" BATCH=1 PROMPT_TOKENS=4096 COMPLETION_TOKENS=4096 bash bench/gpu.sh
#
# Sequence parallelism (issue 21) on one node with 8 GPUs: per-rank peak GPU memory and step time for one pair of
# 32k and 64k tokens (512 as the base the context memory is measured from), SP=2, 4 and 8 ranks (world = SP),
# the prefix-shared default layout through FlexAttention, bf16, ZeRO-3 (about 10-20 minutes: 9 launches):
#   BENCH=sequence_parallel bash bench/gpu.sh
# which runs
#   python bench/bench_sequence_parallel.py --layouts prefix_shared --lengths 512 32768 65536 --sizes 2 4 8 \
#     --overrides logps.attention=flex deepspeed.precision=bf16
#
# Token-budgeted micro-batches against micro_batch_size=4 (issue 29) on the GPUs of this machine, 117M Llama, bf16,
# HH-RLHF helpful-base at max_length 2048, the same global batch of 64 pairs: pairs/s, positions/s per GPU, the
# plan's balance and peak GPU memory (torch.cuda.max_memory_allocated per rank) for budgets of 8k and 16k positions
# (about 5-10 minutes):
#   BENCH=token_budget bash bench/gpu.sh
# which runs
#   python bench/bench_token_budget.py --ranks $(nvidia-smi -L | wc -l) --model llama117m --global-batch 64 \
#     --max-length 2048 --budgets 8192 16384 --steps 12 --warmup 3 --overrides deepspeed.precision=bf16
#
# Environment: BENCH (bench_gpu: the 1B dpo_scale vs TRL run, the default; sequence_parallel, token_budget: the
# commands above),
# STEPS (20 timed steps), WARMUP (3), BATCH (8 pairs per step), SIDES ("dpo_scale trl"),
# PROMPT_TOKENS (256), COMPLETION_TOKENS (256),
# GPU_PEAK_TFLOPS (the dense bf16 peak, when the GPU's name is not in bench/bench_gpu.py's table), LIMIT_S (450; 1800
# for BENCH=sequence_parallel, 900 for token_budget),
# OUT (where the table and JSON are written; default runs/gpu-bench). Everything else is in bench/bench_gpu.py.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
OUT=${OUT:-runs/gpu-bench}
mkdir -p "$OUT"

# Install from .whl/ only the modules that do not import already: the image's torch and transformers stay.
for pair in deepspeed:deepspeed hjson:hjson ninja:ninja cpuinfo:py_cpuinfo msgpack:msgpack einops:einops \
            psutil:psutil pyarrow:pyarrow dill:dill multiprocess:multiprocess xxhash:xxhash datasets:datasets trl:trl; do
  module=${pair%%:*} wheel=${pair##*:}
  "$PYTHON" -c "import $module" 2>/dev/null && continue
  files=(.whl/"$wheel"-*.whl)
  if [[ -e "${files[0]}" ]] && "$PYTHON" -m pip install -q --no-deps --no-index "${files[@]}"; then
    echo "installed $wheel from .whl/"
  else
    echo "WARNING: $module does not import and no usable wheel of $wheel is in .whl/ (run bench/gpu_wheels.sh)"
  fi
done
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true

if [[ ${BENCH:-bench_gpu} == sequence_parallel ]]; then
  timeout "${LIMIT_S:-1800}" "$PYTHON" bench/bench_sequence_parallel.py --layouts prefix_shared \
    --lengths 512 32768 65536 --sizes 2 4 8 --overrides logps.attention=flex deepspeed.precision=bf16 \
    --json "$OUT/sequence-parallel.json" | tee "$OUT/sequence-parallel.md"
  exit
fi

if [[ ${BENCH:-bench_gpu} == token_budget ]]; then
  timeout "${LIMIT_S:-900}" "$PYTHON" bench/bench_token_budget.py --ranks "$(nvidia-smi -L | wc -l)" \
    --model llama117m --global-batch 64 --max-length 2048 --budgets 8192 16384 --steps 12 --warmup 3 \
    --overrides deepspeed.precision=bf16 --json "$OUT/token-budget.json" | tee "$OUT/token-budget.md"
  exit
fi

read -ra sides <<< "${SIDES:-dpo_scale trl}"
timeout "${LIMIT_S:-450}" "$PYTHON" bench/bench_gpu.py --work "$(mktemp -d)" --steps "${STEPS:-20}" \
  --warmup "${WARMUP:-3}" --batch "${BATCH:-8}" --prompt-tokens "${PROMPT_TOKENS:-256}" \
  --completion-tokens "${COMPLETION_TOKENS:-256}" --sides "${sides[@]}" | tee "$OUT/gpu-bench.md"

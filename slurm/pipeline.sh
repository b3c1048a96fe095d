#!/usr/bin/env bash
# Precompute the reference cache, then train from it: two SLURM jobs, the second held until the first succeeds
# (--dependency=afterok). Run from the dpo_scale checkout, with the environment that has dpo-scale activated:
#
#   slurm/pipeline.sh --config run.yaml [key=value ...]
#   PRECOMPUTE_SBATCH="--nodes=1 --time=2:00:00" TRAIN_SBATCH="--nodes=4 --gpus-per-node=8" slurm/pipeline.sh --config run.yaml
#
# The config must set reference.cache_dir; training runs with reference.source=cache. Prints both job ids.
set -euo pipefail
cd "$(dirname "$0")/.."

cache_dir=$(dpo-scale config "$@" --get reference.cache_dir)
if [ -z "$cache_dir" ]; then
    echo "pipeline.sh: set reference.cache_dir (in the config or as reference.cache_dir=DIR): where the cache goes" >&2
    exit 2
fi
# shellcheck disable=SC2086  # the *_SBATCH variables are lists of options
precompute=$(sbatch --parsable ${PRECOMPUTE_SBATCH:-} slurm/precompute_ref.sbatch "$@" | cut -d';' -f1)
# shellcheck disable=SC2086
train=$(sbatch --parsable --dependency="afterok:$precompute" --kill-on-invalid-dep=yes ${TRAIN_SBATCH:-} \
    slurm/train.sbatch "$@" reference.source=cache | cut -d';' -f1)
echo "precompute job: $precompute"
echo "training job:   $train (starts when $precompute has succeeded)"

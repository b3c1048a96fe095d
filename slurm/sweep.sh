#!/usr/bin/env bash
# Submit a hyperparameter sweep as a SLURM job array (slurm/sweep.sbatch), one task per grid point. When the config
# reads a reference cache (reference.source=cache) that is not complete yet, the precompute job is submitted first
# and the array waits for it, so every point reads the one cache; a last small job writes the summary (summary.csv,
# summary.md, sweep.png in the sweep's run_dir) once every point has ended. Run from the dpo_scale checkout:
#
#   slurm/sweep.sh --config run.yaml [key=value ...] --grid beta=0.05,0.1,0.5 optim.lr=5e-7,1e-6
#   SWEEP_SBATCH="--gpus-per-node=8" slurm/sweep.sh ...     # extra sbatch options for the array (and
#                                                             # PRECOMPUTE_SBATCH, SUMMARY_SBATCH for the others)
#
# Prints the job ids.
set -euo pipefail
cd "$(dirname "$0")/.."

count=$(dpo-scale sweep "$@" --count)
config_args=()
for arg in "$@"; do
    [ "$arg" = --grid ] && break
    config_args+=("$arg")
done
dependency=()
cache_dir=$(dpo-scale config "${config_args[@]}" --get reference.cache_dir)
source=$(dpo-scale config "${config_args[@]}" --get reference.source)
if [ "$source" = cache ] && [ ! -e "$cache_dir/manifest.json" ]; then
    # shellcheck disable=SC2086
    precompute=$(sbatch --parsable ${PRECOMPUTE_SBATCH:-} slurm/precompute_ref.sbatch "${config_args[@]}" | cut -d';' -f1)
    echo "precompute job: $precompute"
    dependency=(--dependency="afterok:$precompute" --kill-on-invalid-dep=yes)
fi
# shellcheck disable=SC2086
array=$(sbatch --parsable --array="0-$((count - 1))" "${dependency[@]}" ${SWEEP_SBATCH:-} slurm/sweep.sbatch "$@" |
    cut -d';' -f1)
echo "sweep array job: $array ($count points)"
# shellcheck disable=SC2086
summary=$(sbatch --parsable --dependency="afterany:$array" --nodes=1 --ntasks=1 --job-name=dpo-sweep-summary \
    ${SUMMARY_SBATCH:-} --wrap "$(printf '%q ' dpo-scale sweep "$@" --summarize)" | cut -d';' -f1)
echo "summary job: $summary (after every point has ended)"

# Sourced by the batch scripts in slurm/: start one deepspeed launcher per node, and the walltime handling.
# Not a batch script itself. Expects to run inside a SLURM allocation, with dpo-scale and deepspeed on PATH (sbatch
# passes the submitting shell's environment: submit from the activated environment).

# slurm copies a batch script to its spool directory, so the repository is found from the submission directory
DPO_SCALE_REPO=${DPO_SCALE_REPO:-$SLURM_SUBMIT_DIR}
if [ ! -x "$DPO_SCALE_REPO/launch/deepspeed.sh" ]; then
    echo "slurm: no launch/deepspeed.sh under $DPO_SCALE_REPO; submit from the dpo_scale checkout or set DPO_SCALE_REPO" >&2
    exit 2
fi

# Every node runs launch/SCRIPT with NODE_RANK=its node index (the launcher's --no_ssh mode), a hostfile made on
# the node from the job's node list, and the first node of the list as the master. The port is derived from the
# job id, so jobs that share a node (sweep arrays) do not collide.
on_every_node() {
    local script=$1
    shift
    export NUM_NODES=$SLURM_JOB_NUM_NODES
    MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -1)
    export MASTER_ADDR
    export MASTER_PORT=${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}
    if [ -n "${SLURM_GPUS_ON_NODE:-}" ] && [ -z "${NUM_GPUS:-}" ]; then
        export NUM_GPUS=$SLURM_GPUS_ON_NODE
    fi
    echo "slurm: job $SLURM_JOB_ID on $SLURM_JOB_NODELIST ($NUM_NODES nodes), master $MASTER_ADDR:$MASTER_PORT," \
        "restart ${SLURM_RESTART_COUNT:-0}"
    # --ntasks explicitly: the job's environment keeps the task count it was submitted with (SLURM_NTASKS), which
    # is wrong once a requeued job is resized onto fewer nodes
    # shellcheck disable=SC2016  # expanded on each node, not here
    srun --nodes="$NUM_NODES" --ntasks="$NUM_NODES" --ntasks-per-node=1 --kill-on-bad-exit=1 bash -c '
        set -euo pipefail
        export HOSTFILE=${TMPDIR:-/tmp}/dpo-scale-hosts-$SLURM_JOB_ID-$SLURM_NODEID
        trap "rm -f \"\$HOSTFILE\"" EXIT
        scontrol show hostnames "$SLURM_JOB_NODELIST" | sed "s/\$/ slots=${NUM_GPUS:-1}/" >"$HOSTFILE"
        export NODE_RANK=$SLURM_NODEID
        "$0" "$@"
    ' "$DPO_SCALE_REPO/launch/$script" "$@"
}

# Runs `on_every_node SCRIPT ARGS...` in the background and waits for it. On USR1 (sbatch --signal=B:USR1@SECONDS:
# the time limit is near) it calls the function `on_warning`, which the batch script defines, and sets `warned`.
# Bash runs a trap only between commands, so the step runs in the background and the signal interrupts `wait`.
warned=0
run_step() {
    trap 'warned=1; echo "slurm: USR1: the time limit is near"; on_warning' USR1
    on_every_node "$@" &
    local step=$! status=0
    while true; do
        wait "$step" && status=0 || status=$?
        kill -0 "$step" 2>/dev/null || break  # still running: the wait was interrupted by the signal
    done
    trap - USR1
    return "$status"
}

requeue() {
    echo "slurm: requeueing job $SLURM_JOB_ID; it resumes where it stopped"
    scontrol requeue "$SLURM_JOB_ID"
}

# `dpo-scale train ARGS...` on every node until it finishes, or, on the time-limit warning, until it has saved a
# checkpoint and stopped (it removes run_dir/stop-requested once it has), then requeue the job to resume.
STOP_FILE=
on_warning() { touch "$STOP_FILE"; }
train_or_requeue() {
    local run_dir status=0
    run_dir=$(dpo-scale config "$@" --get run_dir)
    STOP_FILE=$run_dir/stop-requested
    rm -f "$STOP_FILE"  # left by a job killed before it could obey: it must not stop this one at step 1
    mkdir -p "$run_dir"
    run_step train.sh "$@" || status=$?
    if [ "$warned" = 1 ] && [ "$status" = 0 ] && [ ! -e "$STOP_FILE" ]; then
        requeue
        return 0
    fi
    rm -f "$STOP_FILE"
    return "$status"
}

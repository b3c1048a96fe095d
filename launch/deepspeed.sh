#!/usr/bin/env bash
# Runs `dpo-scale SUBCOMMAND [ARGS...]` under the deepspeed launcher: one node, several nodes over ssh/pdsh, or
# several nodes with one launcher per node (--no_ssh, for schedulers). launch/train.sh and launch/precompute_ref.sh
# call it; see their headers for examples. Settings come from the environment:
#
#   NUM_GPUS     processes on each node (default: the GPUs nvidia-smi lists; 1 on a machine without GPUs, which
#                then runs CPU ranks with the gloo backend)
#   NUM_NODES    nodes (default 1); more than 1 needs HOSTFILE
#   HOSTFILE     lines of "hostname slots=N", one per node (DeepSpeed's format)
#   MASTER_ADDR  address of the first node (default: 127.0.0.1 on one node, the first host of HOSTFILE otherwise)
#   MASTER_PORT  rendezvous port (default 29500)
#   NODE_RANK    set: this node's index, and the launcher starts ranks on this node only (--no_ssh); run the script
#                on every node. Unset with NUM_NODES > 1: run it once, on the first node, which reaches the others
#                over passwordless ssh (pdsh); variables the ranks need go in ~/.deepspeed_env, one NAME=value a line
#   DPO_SCALE    the dpo-scale executable (default: the one on PATH)
#   DRY_RUN=1    print the command instead of running it
set -euo pipefail

# NCCL settings people usually need on GPU clusters; uncomment what your network requires.
# export NCCL_DEBUG=WARN                  # INFO when a job hangs at start: shows which interface and transport
# export NCCL_SOCKET_IFNAME=ib0           # the interface between nodes (not docker0 / lo); eth0 without InfiniBand
# export NCCL_IB_DISABLE=1                # no InfiniBand (or a broken one): fall back to TCP sockets
# export NCCL_IB_HCA=mlx5                 # which InfiniBand adapters to use
# export NCCL_P2P_DISABLE=1               # GPUs without working peer-to-peer (some PCIe / VM setups)
# export NCCL_ASYNC_ERROR_HANDLING=1      # a rank that fails ends the job instead of hanging the others
# export TORCH_NCCL_BLOCKING_WAIT=0
# export NCCL_TIMEOUT=1800                # seconds; dpo-scale's own collective timeout is deepspeed.timeout_s

if [ $# -lt 1 ]; then
    echo "usage: $0 SUBCOMMAND [--config run.yaml] [key=value ...]" >&2
    exit 2
fi
subcommand=$1
shift

fail() {
    echo "$(basename "$0"): $*" >&2
    exit 2
}

NUM_NODES=${NUM_NODES:-1}
MASTER_PORT=${MASTER_PORT:-29500}
DPO_SCALE=${DPO_SCALE:-$(command -v dpo-scale || true)}
[ -n "$DPO_SCALE" ] || fail "dpo-scale is not on PATH: activate the environment it is installed in, or set DPO_SCALE"
command -v deepspeed >/dev/null || fail "the deepspeed launcher is not on PATH: pip install deepspeed"
if [ -z "${NUM_GPUS:-}" ]; then
    NUM_GPUS=$( (nvidia-smi --list-gpus 2>/dev/null || true) | grep -c '^GPU' || true)
    [ "$NUM_GPUS" -gt 0 ] || NUM_GPUS=1
fi

command=(deepspeed)
if [ "$NUM_NODES" -gt 1 ] || [ -n "${HOSTFILE:-}" ]; then
    [ -n "${HOSTFILE:-}" ] || fail "NUM_NODES=$NUM_NODES needs HOSTFILE (lines 'hostname slots=N', one per node)"
    [ -s "$HOSTFILE" ] || fail "HOSTFILE=$HOSTFILE does not exist or is empty"
    listed=$(grep -cv '^[[:space:]]*\(#\|$\)' "$HOSTFILE")
    [ "$listed" -ge "$NUM_NODES" ] || fail "HOSTFILE=$HOSTFILE lists $listed nodes, NUM_NODES=$NUM_NODES"
    MASTER_ADDR=${MASTER_ADDR:-$(grep -v '^[[:space:]]*\(#\|$\)' "$HOSTFILE" | head -1 | awk '{print $1}')}
    command+=(--hostfile "$HOSTFILE" --num_nodes "$NUM_NODES" --num_gpus "$NUM_GPUS")
    if [ -n "${NODE_RANK:-}" ]; then
        command+=(--no_ssh --node_rank "$NODE_RANK")
    fi
else
    MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
    command+=(--num_gpus "$NUM_GPUS")
fi
command+=(--master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" "$DPO_SCALE" "$subcommand" "$@")

if [ "${DRY_RUN:-0}" = 1 ]; then
    printf '%q ' "${command[@]}"
    echo
    exit 0
fi
exec "${command[@]}"

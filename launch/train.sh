#!/usr/bin/env bash
# DPO training under the deepspeed launcher (settings from the environment: see launch/deepspeed.sh).
#
#   launch/train.sh --config run.yaml                                  # one node, every GPU
#   NUM_GPUS=4 launch/train.sh --config run.yaml loss.beta=0.05        # one node, 4 GPUs, an override
#   NUM_NODES=2 HOSTFILE=hosts launch/train.sh --config run.yaml       # 2 nodes over ssh/pdsh; run on the first
#   NUM_NODES=2 HOSTFILE=hosts NODE_RANK=0 MASTER_ADDR=node1 launch/train.sh --config run.yaml   # on node1, and
#   NUM_NODES=2 HOSTFILE=hosts NODE_RANK=1 MASTER_ADDR=node1 launch/train.sh --config run.yaml   # on node2 (no ssh)
#
# A run resumes from its latest checkpoint when started again (checkpoint.resume=auto). To stop it cleanly before
# the end: touch RUN_DIR/stop-requested (a checkpoint is saved, the run exits 0).
exec "$(dirname "$0")/deepspeed.sh" train "$@"

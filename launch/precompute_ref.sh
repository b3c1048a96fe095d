#!/usr/bin/env bash
# Reference log-probs of every pair, once, into reference.cache_dir (settings from the environment: see
# launch/deepspeed.sh). Resumable: started again, it computes only the shards that are missing.
#
#   launch/precompute_ref.sh --config run.yaml reference.cache_dir=cache/hh            # one node, every GPU
#   NUM_NODES=2 HOSTFILE=hosts launch/precompute_ref.sh --config run.yaml               # 2 nodes over ssh/pdsh
#   launch/precompute_ref.sh --config run.yaml reference.precompute_sharded=true        # reference too big for a GPU
#
# Then train with reference.source=cache and the same reference.cache_dir (launch/train.sh).
exec "$(dirname "$0")/deepspeed.sh" precompute-ref "$@"

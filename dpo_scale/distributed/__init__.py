"""Everything that touches DeepSpeed or torch.distributed lives in this package; the loop calls these functions.

- world.py: joining and leaving the process group, and the loop's few collectives;
- engines.py: the policy's training engine, the reference's inference engine, loading into ZeRO-3 shards;
- state.py: per-parameter training state for the portable checkpoint, the engine's counters;
- sequence_parallel.py: sequence-parallel groups and Ulysses attention.
"""

from dpo_scale.distributed.engines import (
    backward,
    held_parameters,
    inference_engine,
    load_model,
    register_lm_head,
    training_engine,
)
from dpo_scale.distributed.sequence_parallel import SequenceGroup, engine_groups, init_groups
from dpo_scale.distributed.state import (
    OPTIMIZER_STATES,
    STATE_KEYS,
    check_portable_state,
    engine_counters,
    full_shape,
    load_engine,
    materialize_optimizer_state,
    optimizer_steps,
    partition_range,
    scatter_parameter_state,
    set_engine_counters,
    set_optimizer_steps,
    stream_parameter_state,
    stream_weight,
    trainable_parameters,
    weights_layout,
)
from dpo_scale.distributed.world import (
    BUILD_TAKES_AT_MOST_S,
    COMPILED_OPS,
    World,
    abort,
    all_reduce_sum,
    close,
    free_port,
    gather_to_all,
    init,
    wait_for_op_builds,
)

__all__ = [
    "BUILD_TAKES_AT_MOST_S", "COMPILED_OPS", "OPTIMIZER_STATES", "STATE_KEYS", "SequenceGroup", "World", "abort",
    "all_reduce_sum", "backward", "check_portable_state", "close", "engine_counters", "engine_groups", "free_port",
    "full_shape", "gather_to_all", "held_parameters", "inference_engine", "init", "init_groups",
    "load_engine", "load_model", "materialize_optimizer_state", "optimizer_steps", "partition_range",
    "register_lm_head", "scatter_parameter_state", "set_engine_counters", "set_optimizer_steps",
    "stream_parameter_state", "stream_weight", "trainable_parameters", "training_engine", "wait_for_op_builds",
    "weights_layout",
]  # fmt: skip

"""DeepSpeed engines: the policy's training engine, the frozen reference's inference engine, and loading a model
into ZeRO-3 shards."""

from __future__ import annotations

import deepspeed
import torch
import torch.distributed as dist
from torch import nn

from dpo_scale.config import ModelConfig
from dpo_scale.distributed.sequence_parallel import SequenceGroup, engine_groups

# Kept alive for the life of the process: while it exists, transformers' `from_pretrained` builds models straight
# into ZeRO-3 shards (deepspeed.zero.Init), so no rank ever holds a full model. Wrapping from_pretrained in
# zero.Init by hand fails (lazy model classes, size mismatches when loading into empty shards).
_hf_deepspeed_config = None


def load_model(config: ModelConfig, ds_config: dict) -> nn.Module:
    """`from_pretrained` into ZeRO-3 shards when the DeepSpeed config is stage 3."""
    global _hf_deepspeed_config
    from transformers.integrations import HfDeepSpeedConfig

    from dpo_scale.model.wrapper import load_causal_lm

    if ds_config.get("zero_optimization", {}).get("stage") == 3 and _hf_deepspeed_config is None:
        _hf_deepspeed_config = HfDeepSpeedConfig(ds_config)
    return load_causal_lm(config)


def held_parameters(module: nn.Module) -> tuple[int, int]:
    """(parameters this rank holds, parameters of the whole model): under ZeRO-3 each rank holds its shard only."""
    held = total = 0
    for parameter in module.parameters():
        held += parameter.ds_tensor.numel() if hasattr(parameter, "ds_tensor") else parameter.numel()
        total += getattr(parameter, "ds_numel", parameter.numel())
    return held, total


def register_lm_head(module: nn.Module, model: nn.Module) -> None:
    """Let ZeRO-3 gather the LM head weight for `module`'s forward and backward.

    The streaming log-probs read `lm_head.weight` inside the wrapper's forward instead of calling the head module,
    so without this the weight would be an empty shard there (and freed again before backward)."""
    deepspeed.zero.register_external_parameter(module, model.get_output_embeddings().weight)


def training_engine(module: nn.Module, ds_config: dict, sequence: SequenceGroup = SequenceGroup()):
    """The DeepSpeed engine (gradients averaged over the data-parallel degree under sequence parallelism), its optimizer at the schedule's first rate (the scheduler is built at iteration 0:
    ds_config.py, schedule timing; a resume then sets the saved iteration) and, without ZeRO, skipping updates
    whose gradients are not finite as ZeRO does."""
    parameters = [p for p in module.parameters() if p.requires_grad]
    engine, *_ = deepspeed.initialize(
        model=module, model_parameters=parameters, config=ds_config, mpu=engine_groups(sequence)
    )
    if engine.lr_scheduler is not None:
        engine.lr_scheduler.step(0)
    if dist.get_world_size() == 1 and engine.zero_optimization_stage() == 0:
        # Nothing to reduce on one process without ZeRO, yet DeepSpeed would copy every gradient into flat buckets
        # of up to 500M elements, all-reduce them over the one rank and copy them back at every step: a transient as
        # large as the model's gradients (117M fp32: +320 MiB peak RSS, BENCHMARKS.md). ZeRO stages 1-3 gather
        # gradients into their partitions in that reduction, so they keep it.
        engine.enable_backward_allreduce = False
    if isinstance(engine.optimizer, torch.optim.Optimizer):  # stage 0, fp32: DeepSpeed steps torch's AdamW as is
        _skip_nonfinite_updates(engine.optimizer)
    return engine


def _skip_nonfinite_updates(optimizer: torch.optim.Optimizer) -> None:
    """ZeRO's optimizers skip an update whose gradients hold inf or NaN and say so in `overflow`, which the engine
    reads (skipped_steps, no scheduler step). Without ZeRO, DeepSpeed hands the step to torch's optimizer, which
    would write NaN into every weight and Adam moment: give it the same check (one pass over the gradients, after
    the all-reduce, so every rank decides alike; one device sync for all of them, not one per parameter). The
    largest |gradient| is finite exactly when every gradient is, and reducing to it allocates nothing per element:
    `isfinite` made a gradient-sized mask per parameter, and those transients raised the 16M bench's peak RSS by
    ~50 MiB (BENCHMARKS.md, issue 23)."""
    step = optimizer.step

    def step_if_finite(*args, **kwargs):
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        largest = torch.nn.utils.get_total_norm(grads, norm_type=float("inf")) if grads else None
        optimizer.overflow = largest is not None and not torch.isfinite(largest).item()
        return None if optimizer.overflow else step(*args, **kwargs)

    optimizer.overflow = False
    optimizer.step = step_if_finite


def backward(engine, loss: torch.Tensor) -> None:
    """`engine.backward` of a loss already divided as the update needs (train.py): not again by DeepSpeed's
    accumulation steps. The gradients accumulate locally until `engine.step()` (ds_config.py: the loop owns the
    accumulation boundary)."""
    engine.backward(loss, scale_wrt_gas=False)


def inference_engine(module: nn.Module, ds_config: dict, sequence: SequenceGroup = SequenceGroup()):
    """A frozen model with no optimizer state: the reference copy. Sharded like the policy under ZeRO-3; under
    stages 1 and 2, which partition only optimizer state and gradients (and refuse an engine without an optimizer),
    it is held whole (stage 0), as those stages hold the policy's weights."""
    config = {k: v for k, v in ds_config.items() if k not in ("optimizer", "scheduler")}
    if (config.get("zero_optimization") or {}).get("stage", 0) != 3:
        config["zero_optimization"] = {"stage": 0}
    for parameter in module.parameters():
        parameter.requires_grad_(False)
    engine, *_ = deepspeed.initialize(model=module, config=config, mpu=engine_groups(sequence))
    engine.eval()
    return engine

"""Training state by parameter, independent of how ZeRO partitions it: what the portable checkpoint streams out and
scatters back (training/checkpoint.py), plus the engine's counters and DeepSpeed's own checkpoint format for old
runs."""

from __future__ import annotations

from collections.abc import Iterator

import deepspeed
import torch
import torch.distributed as dist
from deepspeed.utils import (
    safe_get_full_fp32_param,
    safe_get_full_optimizer_state,
    safe_get_local_fp32_param,
    safe_get_local_optimizer_state,
    safe_set_full_fp32_param,
    safe_set_full_optimizer_state,
    safe_set_local_fp32_param,
    safe_set_local_optimizer_state,
)  # fmt: skip
from torch import nn

from dpo_scale.config import ConfigError


def weights_layout(engine) -> list[tuple[str, torch.Tensor]]:
    """(state-dict name, tensor) of every weight and persistent buffer, tied weights once, in the same order on every
    rank; under ZeRO-3 the parameters are this rank's placeholders (read their shape with `full_shape`)."""
    seen: set[int] = set()
    layout = []
    for name, tensor in engine.module.state_dict(keep_vars=True).items():
        if id(tensor) not in seen:
            seen.add(id(tensor))
            layout.append((name, tensor))
    return layout


@torch.no_grad()
def stream_weight(tensor: torch.Tensor, owner: int) -> Iterator[torch.Tensor]:
    """One whole weight in its training dtype, yielded once on rank `owner` (nothing elsewhere); the caller is done
    with it before asking for more (ZeRO-3 frees the gathered copy then). Collective under ZeRO-3: every rank runs
    it to the end for the same tensors in the same order."""
    if not hasattr(tensor, "ds_id"):
        if dist.get_rank() == owner:
            yield tensor.detach()
        return
    with deepspeed.zero.GatheredParameters([tensor]):
        if dist.get_rank() == owner:
            yield tensor.detach()


def load_engine(engine, directory: str, tag: str) -> None:
    """Resume from DeepSpeed's own (pickled) checkpoint format: what runs wrote before the portable checkpoint."""
    path, _ = engine.load_checkpoint(directory, tag=tag, load_module_strict=True)
    if path is None:
        raise RuntimeError(f"DeepSpeed found no checkpoint {tag} under {directory}")


# The training state of one parameter, independent of how ZeRO partitions it: the fp32 master weight and AdamW's two
# moments, read and written through DeepSpeed's tensor-fragment API (deepspeed.utils.safe_*), which knows the
# layout of every stage. Without ZeRO in fp32 there are no fragments: the parameter is its own master and the torch
# optimizer keys its state by the parameter.
OPTIMIZER_STATES = ("exp_avg", "exp_avg_sq")
STATE_KEYS = ("master", *OPTIMIZER_STATES)


def trainable_parameters(engine) -> list[tuple[str, nn.Parameter]]:
    """(name, parameter) of everything the optimizer updates, in the same order on every rank (tied weights once)."""
    return [(name, p) for name, p in engine.module.named_parameters() if p.requires_grad]


def full_shape(parameter: nn.Parameter) -> tuple[int, ...]:
    return tuple(getattr(parameter, "ds_shape", parameter.shape))  # ZeRO-3 leaves an empty tensor in .shape


def _torch_optimizer(engine) -> torch.optim.Optimizer:
    """The torch optimizer holding the fp32 state: ZeRO and the mixed-precision optimizers wrap it as .optimizer."""
    return getattr(engine.optimizer, "optimizer", engine.optimizer)


def _has_fragments(parameter: nn.Parameter) -> bool:
    return hasattr(parameter, "ds_id") or hasattr(parameter, "_hp_mapping")


def check_portable_state(engine) -> None:
    """Refuse, before the first step, a set-up whose per-parameter optimizer state this checkpoint cannot read out."""
    if any(hasattr(p, "ds_id") and dist.get_world_size(p.ds_process_group) != dist.get_world_size()
           for _, p in trainable_parameters(engine)):  # fmt: skip
        raise ConfigError(
            "ZeRO-3 partitions over a subgroup of the ranks here (hierarchical or MiCS partitioning), which the "
            "portable checkpoint does not gather from: use plain ZeRO-3 (zero_hpz_partition_size 1, no mics_shard_size)"
        )
    optimized = {id(p) for group in _torch_optimizer(engine).param_groups for p in group["params"]}
    if any(not _has_fragments(p) and id(p) not in optimized for _, p in trainable_parameters(engine)):
        raise ConfigError(
            "deepspeed.precision=fp16 without ZeRO keeps its fp32 master weights where DeepSpeed's tensor-fragment "
            "API cannot read them, so its checkpoints could not resume: use deepspeed.config=zero2 or zero3, or bf16"
        )


def materialize_optimizer_state(engine) -> None:
    """Create AdamW's moments if no update has created them yet (torch makes them at the first step, and a resume
    writes into them before any step): one step of the torch optimizer with zero gradients at lr 0 builds them in
    the optimizer's own layout and moves no weight (the decay and the update are both multiplied by lr = 0); the
    moments it leaves are zero, as a fresh optimizer's would be."""
    optimizer = _torch_optimizer(engine)
    # ZeRO-3 hands the torch optimizer each sub-group's flat fp32 partition only for the length of its step
    held = getattr(engine.optimizer, "fp32_partitioned_groups_flat", None)
    held = held or [p for group in optimizer.param_groups for p in group["params"]]
    missing = [p for p in held if not optimizer.state.get(p)]  # a defaultdict: `in` is true for a mere lookup
    if not missing:
        return
    groups = [(group["params"], group["lr"]) for group in optimizer.param_groups]
    gradients = [p.grad for p in missing]  # ZeRO-3 with offload keeps a persistent gradient buffer here
    for index, group in enumerate(optimizer.param_groups):
        group["params"], group["lr"] = (missing if index == 0 else []), 0.0
    for p in missing:
        p.grad = torch.zeros_like(p)
    optimizer.step()
    for p, gradient in zip(missing, gradients):
        p.grad = gradient
    for group, (params, rate) in zip(optimizer.param_groups, groups):
        group["params"], group["lr"] = params, rate
    set_optimizer_steps(engine, 0)  # as if no update had run: the caller sets the real count
    link = getattr(engine.optimizer, "_lazy_init_hp_params_optimizer_state", None)  # ZeRO-1/2 and bf16 link their
    if link is not None:  # fragments to the moments at their first step; this step bypassed the wrapper
        link()


@torch.no_grad()
def stream_parameter_state(engine, parameter: nn.Parameter, key: str, owner: int) -> Iterator[torch.Tensor]:
    """One piece of a parameter's training state (`key` in STATE_KEYS: the fp32 master or a moment) on rank `owner`,
    as its flattened values in consecutive chunks; nothing elsewhere. Collective: every rank runs it to the end for
    the same parameters and keys in the same order, and the caller is done with a chunk before asking for the one
    after next (two receive buffers take turns).

    Under ZeRO-3 each rank sends its partition to the owner only, which hands each on as it arrives: the owner holds
    two partitions (2/W of the parameter), not the parameter (DeepSpeed's full getters all-gather the whole tensor to
    every rank, W - 1 times the bytes on the wire). ZeRO-3 partitions over all ranks here (the world group)."""
    rank = dist.get_rank()
    if hasattr(parameter, "ds_id"):
        local = safe_get_local_fp32_param(parameter) if key == "master" else safe_get_local_optimizer_state(
            parameter, key)  # fmt: skip
        if rank != owner:
            dist.send(local.contiguous(), dst=owner)
            return
        buffers: list[torch.Tensor] = []
        remaining = parameter.ds_numel  # the last partition is padded
        for source in range(dist.get_world_size()):
            part = local
            if source != rank:
                if len(buffers) < 2:  # in front: the buffer made for the previous chunk may still be being written
                    buffers.insert(0, torch.empty_like(local))
                part = buffers[0]
                buffers.reverse()  # the other buffer next time: the caller may still be writing this one
                dist.recv(part, src=source)
            yield part[: min(part.numel(), remaining)]
            remaining -= part.numel()
        return
    if _has_fragments(parameter):  # ZeRO-1/2, bf16 without ZeRO: DeepSpeed assembles it with an all-reduce
        value = safe_get_full_fp32_param(parameter) if key == "master" else safe_get_full_optimizer_state(
            parameter, key)  # fmt: skip
        if rank == owner:
            yield value.reshape(-1)
        return
    if rank == owner:
        value = parameter.detach() if key == "master" else _torch_optimizer(engine).state[parameter][key]
        yield value.reshape(-1)


def partition_range(parameter: nn.Parameter) -> tuple[int, int] | None:
    """Under ZeRO-3, the flat element range [start, end) of `parameter` this rank holds (end may pass the
    parameter's size: ZeRO pads the last partition); None where the rank holds it whole."""
    if not hasattr(parameter, "ds_id"):
        return None
    size = parameter.ds_tensor.numel()
    start = size * dist.get_rank(group=parameter.ds_process_group)
    return start, start + size


@torch.no_grad()
def scatter_parameter_state(engine, parameter: nn.Parameter, values: dict[str, torch.Tensor]) -> None:
    """Set one parameter's master, moments and training-dtype weight from `values`: the whole tensors, or under
    ZeRO-3 this rank's `partition_range` of them flattened (padded with zeros to the partition's size)."""
    master = values["master"].to(parameter.device)
    if hasattr(parameter, "ds_id"):
        safe_set_local_fp32_param(parameter, master)
        for key in OPTIMIZER_STATES:
            safe_set_local_optimizer_state(parameter, values[key], key)
        parameter.ds_tensor.data.copy_(master)  # this rank's shard of the training-dtype weight
        return
    with torch.no_grad():
        parameter.copy_(master.view(parameter.shape))  # the cast to bf16/fp16 is the one DeepSpeed's update does
    if _has_fragments(parameter):
        safe_set_full_fp32_param(parameter, master)
        for key in OPTIMIZER_STATES:
            safe_set_full_optimizer_state(parameter, values[key].to(parameter.device), key)
        return
    state = _torch_optimizer(engine).state[parameter]
    for key in OPTIMIZER_STATES:
        state[key].copy_(values[key].view(parameter.shape))


def optimizer_steps(engine) -> int:
    """The number of updates AdamW has applied (its bias correction's t); the same for every parameter."""
    state = next(iter(_torch_optimizer(engine).state.values()), None)
    if state is None:
        return 0
    step = state["step"]
    return int(step.item() if torch.is_tensor(step) else step)


def set_optimizer_steps(engine, steps: int) -> None:
    for state in _torch_optimizer(engine).state.values():
        if torch.is_tensor(state["step"]):
            state["step"].fill_(steps)
        else:  # DeepSpeedCPUAdam (offload) counts in a Python int
            state["step"] = steps


def engine_counters(engine) -> dict[str, float]:
    """The engine's step counters and, under fp16, its dynamic loss scale: scalars, JSON-safe."""
    scaler = getattr(engine.optimizer, "loss_scaler", None)
    scale = {k: v for k, v in vars(scaler).items() if isinstance(v, (bool, int, float))} if scaler else {}
    return {
        "global_steps": engine.global_steps, "global_samples": engine.global_samples,
        "skipped_steps": engine.skipped_steps, "scheduler": engine.lr_scheduler.state_dict(), "loss_scaler": scale,
    }  # fmt: skip


def set_engine_counters(engine, counters: dict) -> None:
    engine.global_steps = counters["global_steps"]
    engine.global_samples = counters["global_samples"]
    engine.skipped_steps = counters["skipped_steps"]
    # the saved iteration is the one the next update runs at: step() to it sets the optimizer's learning rates too
    engine.lr_scheduler.step(counters["scheduler"]["last_batch_iteration"])
    scaler = getattr(engine.optimizer, "loss_scaler", None)
    for key, value in counters["loss_scaler"].items():
        if scaler is not None and hasattr(scaler, key):
            setattr(scaler, key, value)

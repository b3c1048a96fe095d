"""Everything that touches DeepSpeed or torch.distributed lives here; the loop calls these functions.

One process or many: under the `deepspeed` launcher, torchrun or srun the rank variables are read from the
environment; a plain `python` process becomes a world of one on a local port.
"""

from __future__ import annotations

import os
import socket
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

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

from dpo_scale.config import ConfigError, ModelConfig

# Kept alive for the life of the process: while it exists, transformers' `from_pretrained` builds models straight
# into ZeRO-3 shards (deepspeed.zero.Init), so no rank ever holds a full model. Wrapping from_pretrained in
# zero.Init by hand fails (lazy model classes, size mismatches when loading into empty shards).
_hf_deepspeed_config = None


@dataclass(frozen=True)
class World:
    rank: int
    local_rank: int
    size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init(timeout_s: int) -> World:
    """Join (or create) the process group. Collectives time out after `timeout_s`, so a dead rank ends the job."""
    # DeepSpeed calls torch.distributed's deprecated *_tensor collectives on every step; the warning is not ours
    warnings.filterwarnings("ignore", category=FutureWarning, module="torch.distributed")
    _adopt_slurm_variables()
    if "RANK" not in os.environ:  # a plain process: a world of one
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
    wait_for_op_builds(int(os.environ["RANK"]))
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    deepspeed.init_distributed(dist_backend=backend, timeout=timedelta(seconds=timeout_s))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    return World(dist.get_rank(), local_rank, dist.get_world_size(), device)


# Ops DeepSpeed compiles on first use with torch.utils.cpp_extension: the shared-memory collectives of its CPU
# backend (built inside init_distributed on CPU) and the CPU Adam of optimizer offload.
COMPILED_OPS = ("deepspeed_shm_comm", "cpu_adam")
BUILD_TAKES_AT_MOST_S = 600  # the shm op builds in ~1 minute on 2 cores, cpu_adam in ~2


def wait_for_op_builds(rank: int) -> None:
    """torch guards each build with a bare `lock` file in the op's build directory, held open by the building
    process and deleted when it ends. A build killed half way leaves the file, and every later launch waits for it
    forever without a word. Here: wait (saying so) while a build may be running; stop with a message when the lock is
    older than a build could take and no process on this machine holds it open. (Age matters because the directory
    may be shared by nodes, whose builds this machine cannot see.)"""
    from torch.utils.cpp_extension import _get_build_directory  # the directory torch's build itself uses

    for op in COMPILED_OPS:
        lock = Path(_get_build_directory(op, verbose=False)) / "lock"
        announced = False
        while (age := _age_s(lock)) is not None:
            if age > BUILD_TAKES_AT_MOST_S and not _held_open(lock):
                raise ConfigError(
                    f"{lock} is left from a build of DeepSpeed's {op} op that was interrupted ({age / 60:.0f} minutes "
                    "old, no process holds it): every launch would wait for it forever. Fix: delete it "
                    f"(rm {lock}) and launch again; the op is rebuilt on the next launch"
                )
            if not announced:
                print(
                    f"rank {rank}: waiting for a build of DeepSpeed's {op} op to finish ({lock} is {age:.0f} s old). "
                    f"If no build is running, an earlier launch was interrupted while building: rm {lock}", flush=True
                )  # fmt: skip
                announced = True
            time.sleep(1)


def _age_s(path: Path) -> float | None:
    try:
        return time.time() - path.stat().st_mtime
    except FileNotFoundError:
        return None


def _held_open(path: Path) -> bool:
    """Whether any process on this machine that we may inspect has `path` open (Linux /proc)."""
    target = str(path.resolve())
    for fd_dir in Path("/proc").glob("[0-9]*/fd"):
        try:
            if any(os.readlink(fd) == target for fd in fd_dir.iterdir()):
                return True
        except OSError:  # another user's process, or one that ended while we looked
            continue
    return False


def _adopt_slurm_variables() -> None:
    """`srun` sets SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID; torch.distributed reads RANK / WORLD_SIZE."""
    if "RANK" in os.environ or "SLURM_PROCID" not in os.environ:
        return
    os.environ["RANK"] = os.environ["SLURM_PROCID"]
    os.environ["WORLD_SIZE"] = os.environ["SLURM_NTASKS"]
    os.environ["LOCAL_RANK"] = os.environ.get("SLURM_LOCALID", "0")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def close() -> None:
    if dist.is_initialized():
        dist.barrier()  # every rank has mapped every other rank's shared-memory buffer long before this
        deepspeed.comm.destroy_process_group()  # torch's, and DeepSpeed's references to its groups
    _unlink_shared_memory()


def abort() -> None:
    """Leave the process group after an error on this rank, without waiting for the others."""
    if dist.is_initialized():
        deepspeed.comm.destroy_process_group()
    _unlink_shared_memory()


def _unlink_shared_memory() -> None:
    """DeepSpeed's CPU all-reduce creates /dev/shm/deepspeed_allreduce_buffer_<uid>_<addr>_<port>_<rank> (~68 MB)
    per rank and never removes it: a day of runs filled 21 GB of a 24 GB machine. Each rank unlinks its own; the
    memory is freed when the last process that maps it exits."""
    if "MASTER_ADDR" not in os.environ or "MASTER_PORT" not in os.environ:
        return
    address, port = os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"]
    prefix = f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_{address}_{port}"
    for rank in {os.environ.get("RANK", "0"), os.environ.get("LOCAL_RANK", "0")}:
        try:
            os.unlink(f"{prefix}_{rank}")
        except FileNotFoundError:
            pass


def load_model(config: ModelConfig, ds_config: dict) -> nn.Module:
    """`from_pretrained` into ZeRO-3 shards when the DeepSpeed config is stage 3."""
    global _hf_deepspeed_config
    from transformers.integrations import HfDeepSpeedConfig

    from dpo_scale.model import load_causal_lm

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


def training_engine(module: nn.Module, ds_config: dict):
    """The DeepSpeed engine, its optimizer at the schedule's first rate (the scheduler is built at iteration 0:
    ds_config.py, schedule timing; a resume then sets the saved iteration) and, without ZeRO, skipping updates
    whose gradients are not finite as ZeRO does."""
    parameters = [p for p in module.parameters() if p.requires_grad]
    engine, *_ = deepspeed.initialize(model=module, model_parameters=parameters, config=ds_config)
    if engine.lr_scheduler is not None:
        engine.lr_scheduler.step(0)
    if isinstance(engine.optimizer, torch.optim.Optimizer):  # stage 0, fp32: DeepSpeed steps torch's AdamW as is
        _skip_nonfinite_updates(engine.optimizer)
    return engine


def _skip_nonfinite_updates(optimizer: torch.optim.Optimizer) -> None:
    """ZeRO's optimizers skip an update whose gradients hold inf or NaN and say so in `overflow`, which the engine
    reads (skipped_steps, no scheduler step). Without ZeRO, DeepSpeed hands the step to torch's optimizer, which
    would write NaN into every weight and Adam moment: give it the same check (one pass over the gradients, after
    the all-reduce, so every rank decides alike; one device sync for all of them, not one per parameter)."""
    step = optimizer.step

    def step_if_finite(*args, **kwargs):
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        optimizer.overflow = bool(grads) and not torch.stack([torch.isfinite(g).all() for g in grads]).all().item()
        return None if optimizer.overflow else step(*args, **kwargs)

    optimizer.overflow = False
    optimizer.step = step_if_finite


def backward(engine, loss: torch.Tensor) -> None:
    """`engine.backward`, minus the gradient all-reduce where there is nothing to reduce. On one process without
    ZeRO, DeepSpeed still copies every gradient into flat buckets of up to 500M elements, all-reduces them over the
    one rank and copies them back: a transient as large as the model's gradients at the end of every backward (117M
    fp32: +320 MiB peak RSS, BENCHMARKS.md). ZeRO stages 1-3 gather gradients into their partitions in that
    reduction, so they keep it."""
    if dist.get_world_size() == 1 and engine.zero_optimization_stage() == 0:
        with engine.no_sync():
            engine.backward(loss)
    else:
        engine.backward(loss)


def inference_engine(module: nn.Module, ds_config: dict):
    """A frozen model with no optimizer state: the reference copy. Sharded like the policy under ZeRO-3; under
    stages 1 and 2, which partition only optimizer state and gradients (and refuse an engine without an optimizer),
    it is held whole (stage 0), as those stages hold the policy's weights."""
    config = {k: v for k, v in ds_config.items() if k not in ("optimizer", "scheduler")}
    if (config.get("zero_optimization") or {}).get("stage", 0) != 3:
        config["zero_optimization"] = {"stage": 0}
    for parameter in module.parameters():
        parameter.requires_grad_(False)
    engine, *_ = deepspeed.initialize(model=module, config=config)
    engine.eval()
    return engine


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum over ranks, in place. A sync point: called only at the log interval and on rare events."""
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def gather_to_all(value: object) -> list[object]:
    """Every rank's `value`, in rank order, on every rank (pickled between our own ranks only). For small objects:
    a few hundred generated token lists at an evaluation."""
    gathered: list[object] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, value)
    return gathered


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
                if len(buffers) < 2:
                    buffers.append(torch.empty_like(local))
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

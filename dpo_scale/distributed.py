"""Everything that touches DeepSpeed or torch.distributed lives here; the loop calls these functions.

One process or many: under the `deepspeed` launcher, torchrun or srun the rank variables are read from the
environment; a plain `python` process becomes a world of one on a local port.
"""

from __future__ import annotations

import os
import socket
import warnings
from dataclasses import dataclass
from datetime import timedelta

import deepspeed
import torch
import torch.distributed as dist
from torch import nn

from dpo_scale.config import ModelConfig

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
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    deepspeed.init_distributed(dist_backend=backend, timeout=timedelta(seconds=timeout_s))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    return World(dist.get_rank(), local_rank, dist.get_world_size(), device)


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
    parameters = [p for p in module.parameters() if p.requires_grad]
    engine, *_ = deepspeed.initialize(model=module, model_parameters=parameters, config=ds_config)
    return engine


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


def consolidated_state_dict(engine) -> dict[str, torch.Tensor] | None:
    """The full model's weights on rank 0 (None elsewhere), gathered shard by shard; every rank must call it."""
    if engine.zero_optimization_stage() == 3:
        return engine._zero3_consolidated_16bit_state_dict()
    state = engine.module.state_dict()
    return state if dist.get_rank() == 0 else None


def save_engine(engine, directory: str, tag: str) -> None:
    engine.save_checkpoint(directory, tag=tag, save_latest=False)


def load_engine(engine, directory: str, tag: str) -> None:
    path, _ = engine.load_checkpoint(directory, tag=tag, load_module_strict=True)
    if path is None:
        raise RuntimeError(f"DeepSpeed found no checkpoint {tag} under {directory}")

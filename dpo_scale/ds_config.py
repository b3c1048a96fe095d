"""A DeepSpeed JSON resolved against our config: every "auto" filled, every explicit value checked.

The JSON (a name in ds_configs/ or the user's own file) holds the DeepSpeed choices we do not model: ZeRO stage,
offload, bucket sizes. Everything our config already decides is written "auto" there and filled here:

    train_micro_batch_size_per_gpu   micro_batch_size (1 under a token budget, whose micro-batches vary)
    gradient_accumulation_steps      gradient_accumulation_steps (1 under a token budget)
    train_batch_size                 micro_batch_size x gradient_accumulation_steps x world_size
    managed_gradient_accumulation    false: the loop steps once per optimizer step (see below)
    gradient_clipping                optim.max_grad_norm (0: off, as in DeepSpeed)
    bf16.enabled, fp16.enabled       deepspeed.precision (fp32: both false)
    optimizer                        AdamW with optim.lr, betas, eps, weight_decay
    scheduler                        optim.schedule: cosine -> WarmupCosineLR, linear -> WarmupDecayLR,
                                     constant -> WarmupLR; linear warm-up from 0 over optim.warmup_steps,
                                     decay to 0 at total_num_steps

An explicit value that disagrees with our config raises `ConfigError` (never silently overridden); one that agrees
is fine. Keys we do not manage pass through untouched. An "auto" we cannot fill also raises: DeepSpeed's own parser
drops "auto" silently and would run on its default instead.

Adam implementation. DeepSpeed picks it in `DeepSpeedEngine.get_optimizer_configuration`: `torch_adam: true` gives
`torch.optim.AdamW`; otherwise offloaded optimizer states give `DeepSpeedCPUAdam`, and anything else `FusedAdam`.
Both DeepSpeed ops are C++/CUDA extensions compiled just in time on first use (about a minute, and a compiler,
ninja and, for FusedAdam on GPUs, a CUDA toolkit on every node). So without offload we set `torch_adam: true`:
torch's AdamW needs no build, runs on CPU and GPU alike and is on ZeRO's list of tested optimizers. We also set
its `fused: true` (unless the JSON names `fused` or `foreach`): one kernel per parameter on CPU and GPU, where the
default on CPU is a per-tensor loop that allocates parameter-sized temporaries (16M-parameter bench, one pair of
runs back to back: 4.41 -> 4.67 pairs/s, 1,137 -> 1,121 MiB peak RSS, within that machine's run-to-run noise). With offload we leave it unset: `DeepSpeedCPUAdam` is the fast path for optimizer
states on the CPU, and its C++ build needs no CUDA. An explicit `torch_adam` in the JSON is respected. Both are on
ZeRO's list of supported optimizers, so `zero_allow_untested_optimizer` is not needed.

Schedule timing. The engine steps the scheduler after each optimizer step, so step k must find it at iteration
k - 1: step 1 at the warm-up's start (0), the peak at step warmup_steps + 1, and the decay down to 0 at the last step.
The scheduler is built at iteration 0 (`last_batch_iteration`; DeepSpeed's default -1 makes its constructor ask
for a learning rate before the schedule has started, which logs a warning on every rank of every run), and
`distributed.training_engine` sets the optimizer's rate for iteration 0 (`step(0)`); a resume sets the saved one. DeepSpeed's warm-up schedulers also reject 0 warm-up steps and run 1 as 2;
`OptimConfig` refuses those (except 0 with the constant schedule).

Activation checkpointing needs no section here: `model.gradient_checkpointing_enable()` recomputes with torch's
checkpoint, and DeepSpeed's "activation_checkpointing" block only configures `deepspeed.checkpointing`.

Must not import deepspeed or torch: this runs (and is tested) before any of that is loaded.
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from typing import Any

from dpo_scale.config import ConfigError, DeepSpeedConfig, OptimConfig

DS_CONFIGS = Path(__file__).resolve().parents[1] / "ds_configs"
"""The shipped choices (zero3, zero3_offload, zero2, zero0), next to the package in a source checkout."""

SCHEDULERS = {"cosine": "WarmupCosineLR", "linear": "WarmupDecayLR", "constant": "WarmupLR"}
"""optim.schedule -> the DeepSpeed scheduler (deepspeed/runtime/lr_schedules.py) that implements it."""

AUTO = "auto"


def resolve_deepspeed_config(
    section: DeepSpeedConfig,
    optim: OptimConfig,
    micro_batch_size: int,
    gradient_accumulation_steps: int,
    world_size: int,
    total_steps: int,
    sequence_parallel_size: int = 1,
) -> dict[str, Any]:
    """The DeepSpeed config for this run, ready for `deepspeed.initialize(config=...)`.

    `world_size` is the number of ranks, of which groups of `sequence_parallel_size` share each micro-batch (the
    batch is counted over world_size / sequence_parallel_size data-parallel replicas, as DeepSpeed counts it once
    given the sequence-parallel groups); `total_steps` the number of optimizer steps of the run (the scheduler
    decays to 0 there). The loaded file is never modified; the caller saves the result.
    """
    if min(micro_batch_size, gradient_accumulation_steps, world_size) < 1:
        raise ValueError(f"batch sizes and world size must be positive, got {micro_batch_size=}, "
                         f"{gradient_accumulation_steps=}, {world_size=}")
    if total_steps < 1:
        raise ConfigError(f"the run has {total_steps} optimizer steps: there is nothing to schedule")
    source, loaded = load_deepspeed_json(shipped_config_for(section.config, world_size, section.precision))
    resolved = copy.deepcopy(loaded)
    settle = _Settler(source)

    settle(resolved, "train_micro_batch_size_per_gpu", micro_batch_size, "micro_batch_size")
    settle(resolved, "gradient_accumulation_steps", gradient_accumulation_steps, "gradient_accumulation_steps")
    replicas = world_size // sequence_parallel_size
    if sequence_parallel_size > 1:  # how DeepSpeed counts replicas where it has no groups object (zero.Init)
        resolved["sequence_parallel_size"] = sequence_parallel_size
    settle(resolved, "train_batch_size", micro_batch_size * gradient_accumulation_steps * replicas,
           f"micro_batch_size x gradient_accumulation_steps x data-parallel replicas "
           f"({micro_batch_size} x {gradient_accumulation_steps} x {replicas})",
           fix="micro_batch_size or gradient_accumulation_steps")
    settle(resolved, "gradient_clipping", optim.max_grad_norm, "optim.max_grad_norm")

    bf16_key = "bfloat16" if "bfloat16" in resolved and "bf16" not in resolved else "bf16"  # DeepSpeed's old name
    precision = f"deepspeed.precision={section.precision}"
    fix = "deepspeed.precision"
    settle(_subsection(resolved, bf16_key, source), "enabled", section.precision == "bf16", precision, bf16_key, fix)
    settle(_subsection(resolved, "fp16", source), "enabled", section.precision == "fp16", precision, "fp16", fix)

    # The loop owns the accumulation boundary: every micro-batch's backward accumulates locally and engine.step()
    # reduces and updates once per optimizer step, however many micro-batches the step had (a token budget's count
    # varies by step). DeepSpeed 0.19.8's caller-owned mode; its managed mode counts a fixed
    # gradient_accumulation_steps. Losses arrive already divided by the step's pair count (train.py), never by
    # DeepSpeed's accumulation steps (backward(scale_wrt_gas=False)).
    resolved["managed_gradient_accumulation"] = False
    zero = resolved.get("zero_optimization") or {}
    if zero.get("stage", 0) in (0, 1) and zero.get("overlap_comm"):
        raise ConfigError(
            f"{source}: zero_optimization.overlap_comm=true with ZeRO stage {zero.get('stage', 0)}: DeepSpeed "
            "overlaps communication where the loop owns the accumulation boundary only under stage 2 or 3 (which "
            "partition gradients); set overlap_comm to false there or use stage 2"
        )

    _resolve_optimizer(resolved, optim, settle, source)
    _resolve_scheduler(resolved, optim, total_steps, settle, source)

    leftover = _autos(resolved)
    if leftover:
        raise ConfigError(
            f"{source}: {', '.join(leftover)} = \"auto\", which dpo_scale does not fill (it fills batch sizes, "
            "gradient_clipping, bf16/fp16.enabled, optimizer and scheduler); set a value there"
        )
    return resolved


def shipped_config_for(config: str, world_size: int, precision: str = "fp32") -> str:
    """`deepspeed.config=auto`: zero0 for one fp32 process, where ZeRO-3 has no one to share shards with and only
    adds a flat fp32 master copy, gradient buffers and hooks (BENCHMARKS.md: memory at 16M and 117M); zero3 for
    more, and for bf16 / fp16, whose fp32 master weights DeepSpeed's mixed-precision wrapper without ZeRO keeps where
    a portable checkpoint cannot read them. A checkpoint resumes across the two (training/checkpoint.py). Any other
    value is returned as it is."""
    if config != AUTO:
        return config
    return "zero0" if world_size == 1 and precision == "fp32" else "zero3"


def load_deepspeed_json(config: str) -> tuple[str, dict[str, Any]]:
    """`deepspeed.config` -> (the path it names, the parsed JSON). A bare name is a file in ds_configs/."""
    if "/" in config or config.endswith(".json"):
        path = Path(config).expanduser()
    else:
        path = DS_CONFIGS / f"{config}.json"
        if not path.is_file():
            shipped = sorted(p.stem for p in DS_CONFIGS.glob("*.json"))
            raise ConfigError(
                f"deepspeed.config={config!r}: there is no {path} (shipped configs: {', '.join(shipped) or 'none'}, "
                f"looked in {DS_CONFIGS}); give one of those names or the path of your own DeepSpeed JSON"
            )
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise ConfigError(f"deepspeed.config: {path} cannot be read ({error.strerror})") from None
    try:
        tree = json.loads(text, object_pairs_hook=_no_duplicate_keys)
    except json.JSONDecodeError as error:
        raise ConfigError(f"deepspeed.config: {path} is not valid JSON: {error}") from None
    except _DuplicateKey as error:
        raise ConfigError(f"deepspeed.config: {path} sets {error.args[0]!r} twice") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"deepspeed.config: {path} must hold a JSON object of DeepSpeed settings")
    return str(path), tree


def zero_stage(resolved: dict[str, Any]) -> int:
    return int((resolved.get("zero_optimization") or {}).get("stage", 0))


def offloads_optimizer(resolved: dict[str, Any]) -> bool:
    """Optimizer states live on the CPU (or NVMe): DeepSpeed then steps them with DeepSpeedCPUAdam."""
    zero = resolved.get("zero_optimization") or {}
    device = (zero.get("offload_optimizer") or {}).get("device", "none")
    return device in ("cpu", "nvme") or zero.get("cpu_offload") is True  # cpu_offload: DeepSpeed's old spelling


def offloads_params(resolved: dict[str, Any]) -> bool:
    device = ((resolved.get("zero_optimization") or {}).get("offload_param") or {}).get("device", "none")
    return device in ("cpu", "nvme")


def single_process_advice(resolved: dict[str, Any], world_size: int) -> str | None:
    """What to say when ZeRO-3 runs on one process without offload: it has no one to share shards with, yet keeps a
    flat fp32 master copy, gradient buffers and per-module hooks (measured on the 16M CPU benchmark: +300 MiB peak,
    1.16x-1.37x slower than zero0 over runs)."""
    if world_size > 1 or zero_stage(resolved) != 3 or offloads_params(resolved) or offloads_optimizer(resolved):
        return None
    return (
        "one process: ZeRO-3 without offload partitions nothing here but still keeps a flat master copy and gradient "
        "buffers; deepspeed.config=zero0 trains the same steps with less memory and time (BENCHMARKS.md)"
    )


def _resolve_optimizer(resolved: dict[str, Any], optim: OptimConfig, settle: _Settler, source: str) -> None:
    optimizer = _subsection(resolved, "optimizer", source)
    kind = optimizer.get("type", AUTO)
    if kind == AUTO:
        optimizer["type"] = "AdamW"
    elif str(kind).lower() != "adamw":
        raise ConfigError(
            f"{source}: optimizer.type={kind!r}, but dpo_scale's optim section describes AdamW; "
            'set optimizer.type to "AdamW" or "auto"'
        )
    params = _subsection(optimizer, "params", source, "optimizer.params")
    settle(params, "lr", optim.lr, "optim.lr", "optimizer.params")
    settle(params, "betas", list(optim.betas), "optim.betas", "optimizer.params")
    settle(params, "eps", optim.eps, "optim.eps", "optimizer.params")
    settle(params, "weight_decay", optim.weight_decay, "optim.weight_decay", "optimizer.params")
    if "torch_adam" not in params and not offloads_optimizer(resolved):
        params["torch_adam"] = True  # why: see the module docstring
        if "foreach" not in params:
            params.setdefault("fused", True)


def _resolve_scheduler(
    resolved: dict[str, Any], optim: OptimConfig, total_steps: int, settle: _Settler, source: str
) -> None:
    warmup = optim.warmup_steps  # OptimConfig already refused what DeepSpeed's warm-up cannot express
    scheduler = _subsection(resolved, "scheduler", source)
    settle(scheduler, "type", SCHEDULERS[optim.schedule], f"optim.schedule={optim.schedule}", "scheduler",
           "optim.schedule")
    params = _subsection(scheduler, "params", source, "scheduler.params")
    # Parameter names and meanings: deepspeed/runtime/lr_schedules.py. Warm-up is linear from 0 to optim.lr.
    if optim.schedule == "cosine":  # WarmupCosineLR scales optim.lr by ratios, it takes no absolute lr
        wanted = {"total_num_steps": total_steps, "warmup_min_ratio": 0.0, "warmup_num_steps": warmup,
                  "cos_min_ratio": 0.0, "warmup_type": "linear"}
    elif optim.schedule == "linear":
        wanted = {"total_num_steps": total_steps, "warmup_min_lr": 0.0, "warmup_max_lr": optim.lr,
                  "warmup_num_steps": warmup, "warmup_type": "linear"}
    else:
        wanted = {"warmup_min_lr": 0.0 if warmup else optim.lr, "warmup_max_lr": optim.lr,
                  "warmup_num_steps": max(warmup, 1), "warmup_type": "linear"}
    wanted["last_batch_iteration"] = 0
    owners = {"total_num_steps": ("the run's length in optimizer steps", "max_steps or epochs"),
              "warmup_num_steps": ("optim.warmup_steps", ""), "warmup_max_lr": ("optim.lr", "")}
    for key, value in wanted.items():
        owner, fix = owners.get(key, (f"optim.schedule={optim.schedule}", "optim.schedule"))
        settle(params, key, value, owner, "scheduler.params", fix)


class _Settler:
    """Fill `node[key]` with our value when it is missing or "auto"; raise when an explicit value disagrees."""

    def __init__(self, source: str):
        self.source = source

    def __call__(self, node: dict[str, Any], key: str, ours: Any, owner: str, parent: str = "", fix: str = "") -> None:
        """`owner` says where our value comes from; `fix` names the setting to change (default: `owner`)."""
        theirs = node.get(key, AUTO)
        if theirs != AUTO and not _agrees(theirs, ours):
            name = f"{parent}.{key}" if parent else key
            raise ConfigError(
                f"{self.source}: {name}={json.dumps(theirs)}, but {owner} gives {json.dumps(ours)}; "
                f'set {name} to "auto" or change {fix or owner}'
            )
        node[key] = ours  # also on agreement: 4.0 -> 4 where DeepSpeed wants an int


def _agrees(theirs: Any, ours: Any) -> bool:
    if isinstance(ours, bool) or isinstance(theirs, bool):
        return theirs is ours
    if isinstance(ours, (int, float)):
        return isinstance(theirs, (int, float)) and math.isclose(theirs, ours, rel_tol=1e-9, abs_tol=0.0)
    if isinstance(ours, list):
        return (isinstance(theirs, list) and len(theirs) == len(ours)
                and all(_agrees(t, o) for t, o in zip(theirs, ours)))
    return theirs == ours


def _subsection(node: dict[str, Any], key: str, source: str, name: str | None = None) -> dict[str, Any]:
    """`node[key]` as a dict we may fill: created when missing, a fresh {} for "auto"."""
    value = node.get(key, AUTO)
    if value == AUTO:
        value = node[key] = {}
    if not isinstance(value, dict):
        raise ConfigError(f"{source}: {name or key} must be a JSON object (or \"auto\"), got {json.dumps(value)}")
    return value


def _autos(tree: Any, prefix: str = "") -> list[str]:
    if isinstance(tree, dict):
        return [path for key, value in tree.items() for path in _autos(value, f"{prefix}{key}.")]
    if isinstance(tree, list):
        return [path for i, value in enumerate(tree) for path in _autos(value, f"{prefix}{i}.")]
    return [prefix.rstrip(".")] if tree == AUTO else []


class _DuplicateKey(Exception):
    pass


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for key, value in pairs:
        if key in tree:
            raise _DuplicateKey(key)
        tree[key] = value
    return tree

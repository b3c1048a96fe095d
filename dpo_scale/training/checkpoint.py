"""Checkpoints that resume on any number of ranks and any ZeRO stage, and become visible only when complete.

    run_dir/checkpoints/step-00000040/
        model.safetensors          the weights in the training dtype under transformers' names (what `dpo-scale
                                   export` ships); from several ranks, one shard per rank (model-00001-of-00002...)
                                   and model.safetensors.index.json, transformers' sharded layout
        state/rank-00000.safetensors
                                   the training state of that rank's share of the trainable parameters, by name:
                                   the fp32 master `<name>` and AdamW's `<name>.exp_avg`, `<name>.exp_avg_sq`
        rng/rank-00000.safetensors that rank's torch RNG state
        trainer_state.json         step, AdamW's step count, scheduler and engine counters, the global batch and how
                                   it was split, which file holds each parameter, the resolved config
    run_dir/checkpoints/latest     name of the newest complete checkpoint

Nothing in it is pickled, and nothing in it depends on how ZeRO partitioned the state: DeepSpeed's tensor-fragment
API (see distributed.py) hands each parameter's state, piece by piece, to the rank that owns it at save, and sets
it into whatever layout the resuming run has. Each rank writes the parameters it owns (balanced by size) as their
pieces arrive: a save adds two ZeRO-3 partitions of a parameter on its owner, never the model. The data order is a pure function of the seed and
the step (sampler.py), so the same global batch split another way continues exactly where the run stopped.

Every rank writes into `.step-00000040.partial/`; after a barrier rank 0 renames it, then moves `latest`, then
deletes all but the newest `keep_last`. A run killed at any moment leaves either the previous checkpoint or the new
one, never half of one. The directory must be on a file system all ranks share.

Checkpoints written before this format (DeepSpeed's own `ds/` directory of pickled files) still resume, on the
same number of ranks and ZeRO stage only.
"""

from __future__ import annotations

import functools
import json
import math
import shutil
import struct
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from dpo_scale import __version__, distributed
from dpo_scale.config import CheckpointConfig, ConfigError, TrainConfig, to_dict
from dpo_scale.distributed import World
from dpo_scale.io import atomic_open
from dpo_scale.training.tracking import print0

TRAINER_STATE = "trainer_state.json"
WEIGHTS = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"
NATIVE_STATE = "train_state.pt"  # written by the DeepSpeed-native format: a dict of step and config, no objects
NATIVE_ENGINE_TAG = "state"
SAFETENSORS_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}


def _name(step: int) -> str:
    return f"step-{step:08d}"


def latest(run_dir: str | Path) -> Path | None:
    pointer = Path(run_dir) / "checkpoints" / "latest"
    if not pointer.exists():
        return None
    path = pointer.parent / pointer.read_text().strip()
    return path if path.is_dir() else None


def is_checkpoint(path: str | Path) -> bool:
    """A complete checkpoint directory (step-N, not a .partial one), of either format."""
    path = Path(path)
    state = (path / TRAINER_STATE).is_file() or (path / NATIVE_STATE).is_file()
    weights = (path / WEIGHTS).is_file() or (path / WEIGHTS_INDEX).is_file()
    return path.name.startswith("step-") and weights and state


def saved_config(path: str | Path) -> dict:
    """The resolved training config a checkpoint was written with (JSON, or the native format's tensor-only dict)."""
    path = Path(path)
    if (path / TRAINER_STATE).is_file():
        return json.loads((path / TRAINER_STATE).read_text())["config"]
    return torch.load(path / NATIVE_STATE, weights_only=True)["config"]


def save(engine, step: int, config: TrainConfig, world: World) -> Path:
    """Write checkpoint `step` on every rank; returns its final path. Refuses weights that are not finite."""
    _check_finite(engine, step)
    root = Path(config.run_dir) / "checkpoints"
    final = root / _name(step)
    partial = root / f".{_name(step)}.partial"
    if world.is_main:
        shutil.rmtree(partial, ignore_errors=True)  # debris of a run killed while writing
        (partial / "state").mkdir(parents=True)
        (partial / "rng").mkdir()
    torch.distributed.barrier()

    parameters = distributed.trainable_parameters(engine)
    weights = distributed.weights_layout(engine)
    owners = _owners([(name, math.prod(distributed.full_shape(t))) for name, t in weights], world.size)
    optimizer_steps = distributed.optimizer_steps(engine)
    distributed.materialize_optimizer_state(engine)  # only if every update so far was skipped
    _write_state_and_weights(engine, partial, weights, {id(p) for _, p in parameters}, owners, world)
    _save_rng(partial / "rng" / _rank_file(world.rank), world.device)
    if world.is_main:
        if world.size > 1:
            weight_map = {_hf_name(n): _weights_file(owners[n], world.size) for n, _ in weights}
            with atomic_open(partial / WEIGHTS_INDEX) as handle:
                json.dump({"metadata": {}, "weight_map": weight_map}, handle, indent=1)
        trainer_state = {
            "step": step,
            "optimizer_steps": optimizer_steps,
            "engine": distributed.engine_counters(engine),
            "batch": {"global_batch": config.global_batch(world.size), "micro_batch_size": config.micro_batch_size,
                      "micro_batch_tokens": config.micro_batch_tokens,
                      "gradient_accumulation_steps": config.gradient_accumulation_steps, "ranks": world.size,
                      "sequence_parallel_size": config.sequence_parallel_size},
            "zero_stage": engine.zero_optimization_stage(),
            "parameters": {name: {"shape": list(distributed.full_shape(p)), "file": _rank_file(owners[name])}
                           for name, p in parameters},
            "dpo_scale_version": __version__,
            "config": to_dict(config),
        }  # fmt: skip
        with atomic_open(partial / TRAINER_STATE) as handle:
            json.dump(trainer_state, handle, indent=1)
    torch.distributed.barrier()
    if world.is_main:
        shutil.rmtree(final, ignore_errors=True)
        partial.rename(final)
        with atomic_open(root / "latest") as handle:
            handle.write(final.name)
        _prune(root, config.checkpoint)
    torch.distributed.barrier()
    return final


def check_resumable(path: Path, config: TrainConfig, world: World, zero_stage: int) -> None:
    """Refuse, before any model is loaded, a resume that cannot work: another global batch than the checkpoint's
    (unless the config allows it), or a DeepSpeed-native checkpoint on other ranks or another ZeRO stage."""
    if (path / TRAINER_STATE).is_file():
        _check_global_batch(json.loads((path / TRAINER_STATE).read_text()), path, config, world)
        return
    from dpo_scale.ds_config import load_deepspeed_json, shipped_config_for

    saved = torch.load(path / NATIVE_STATE, weights_only=True)["config"]["deepspeed"]
    saved_ds = saved["config"]
    # one optimizer-state file per rank under ZeRO-1/2/3; without ZeRO the state is whole and any world size loads it
    ranks = len(list((path / "ds" / NATIVE_ENGINE_TAG).glob("zero_pp_rank_*_mp_rank_00_optim_states.pt")))
    written_with = shipped_config_for(saved_ds, ranks or 1, saved.get("precision", "fp32"))
    stage = (load_deepspeed_json(written_with)[1].get("zero_optimization") or {}).get("stage", 0)
    if stage != zero_stage or (ranks and ranks != world.size):
        written = f"ZeRO stage {stage}" + (f" on {ranks} ranks" if ranks else "")
        raise ConfigError(
            f"{path} is a DeepSpeed-native checkpoint (the format before portable checkpoints), written with "
            f"{written}; this run has ZeRO stage {zero_stage} on {world.size} rank(s). DeepSpeed loads that format "
            f"only as it was written: resume once with deepspeed.config={saved_ds} on {ranks or 'any number of'} "
            "ranks (its next checkpoint is portable), or start a new run_dir"
        )


def check_same_run(path: Path, config: TrainConfig, data_differences: Callable[[], list[str]]) -> None:
    """Refuse, before anything is built or loaded, to resume checkpoint `path` with another model, data or data
    settings than it was trained with: its run_dir holds another run (or the data changed under it), and resuming
    would train that run on this config's data. `data_differences` compares the token store the checkpoint's run
    read with this run's data (asked only when the configs agree: it finds an edited data file or tokenizer)."""
    saved, ours = saved_config(path), to_dict(config)
    keys = ["model.path", "data.path", *(f"data.{name}" for name in config.data.shaping_settings())]
    differences = [
        f"{key}: checkpoint {_shown(before)}, this run {_shown(now)}"
        for key in keys
        if not _same_setting(key, before := _lookup(saved, key), now := _lookup(ours, key))
    ] or data_differences()
    if differences:
        run_dir = Path(config.run_dir)
        raise ConfigError(
            f"run_dir={run_dir} holds a run trained on another model, data or settings than this run's: its "
            f"checkpoint {path.name} differs in {'; '.join(differences)}. Resuming it (checkpoint.resume=auto) "
            "would continue that run with this run's model and data. Fix: train into another run_dir, or set "
            f"checkpoint.resume=never to start afresh here (the earlier run's files move aside into "
            f"{run_dir / 'previous-runs'}/N; its token store stays as it is), or resume it with the model, data and "
            "settings it was trained with"
        )


def _lookup(tree: dict[str, Any], dotted: str) -> Any:
    for part in dotted.split("."):
        tree = tree.get(part) if isinstance(tree, dict) else None
    return tree


def _same_setting(key: str, before: Any, now: Any) -> bool:
    """Paths are the same when they name the same place, however written."""
    if before == now:
        return True
    paths = key in ("model.path", "data.path", "data.filters.eval_path") and isinstance(before, str)
    return paths and isinstance(now, str) and Path(before).expanduser().resolve() == Path(now).expanduser().resolve()


def _shown(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def restore(engine, path: Path, world: World) -> int:
    """Load checkpoint `path` (checked by `check_resumable`) into `engine` and this rank's RNG, on any world size and
    ZeRO stage; returns the step it was taken at."""
    if not (path / TRAINER_STATE).is_file():
        return _restore_native(engine, path, world)
    saved = json.loads((path / TRAINER_STATE).read_text())
    parameters = distributed.trainable_parameters(engine)
    _check_same_parameters(saved["parameters"], parameters, path)
    distributed.materialize_optimizer_state(engine)
    handles = {}
    for name, parameter in parameters:  # every rank sets every parameter: collective under ZeRO-1/2
        file = saved["parameters"][name]["file"]
        if file not in handles:
            handles[file] = safe_open(path / "state" / file, framework="pt")
        span = distributed.partition_range(parameter)
        values = {key: _read(handles[file], _state_key(name, key), span) for key in distributed.STATE_KEYS}
        distributed.scatter_parameter_state(engine, parameter, values)
    distributed.set_optimizer_steps(engine, saved["optimizer_steps"])
    distributed.set_engine_counters(engine, saved["engine"])
    rng = path / "rng" / _rank_file(world.rank)
    if rng.is_file():  # ranks added since the save keep their seeded generator: training draws no random numbers
        _load_rng(rng, world.device)
    return int(saved["step"])


def _state_key(name: str, key: str) -> str:
    return name if key == "master" else f"{name}.{key}"


def _rank_file(rank: int) -> str:
    return f"rank-{rank:05d}.safetensors"


def _owners(sizes: list[tuple[str, int]], ranks: int) -> dict[str, int]:
    """Which rank writes each parameter: largest first to the rank with the fewest elements so far (the same on
    every rank), so the ranks write about equal shares and the slowest write bounds the save."""
    load = [0] * ranks
    owners = {}
    for name, size in sorted(sizes, key=lambda item: -item[1]):
        rank = min(range(ranks), key=lambda r: (load[r], r))
        owners[name] = rank
        load[rank] += size
    return owners


def _write_state_and_weights(
    engine, partial: Path, weights: list[tuple[str, torch.Tensor]], trainable: set[int], owners: dict[str, int],
    world: World,
) -> None:
    """One pass over the model; every rank takes part in every gather (collective), and the rank that owns a tensor
    writes it as it arrives. A trainable parameter's master and moments go to the owner's state file, and its
    training-dtype weight (the master cast, as DeepSpeed's update leaves it) to the owner's weights file; frozen
    weights and buffers are gathered whole for their weights file. So each rank writes its share, and a save adds
    two ZeRO-3 partitions of the largest parameter on its owner (the one being written, the one arriving), or the
    largest frozen weight in its training dtype."""
    mine = [(name, tensor) for name, tensor in weights if owners[name] == world.rank]
    state_file = SafetensorsWriter(partial / "state" / _rank_file(world.rank), [
        (_state_key(name, key), torch.float32, distributed.full_shape(tensor))
        for name, tensor in mine if id(tensor) in trainable for key in distributed.STATE_KEYS
    ])  # fmt: skip
    weights_file = SafetensorsWriter(partial / _weights_file(world.rank, world.size), [
        (_hf_name(name), tensor.dtype, distributed.full_shape(tensor)) for name, tensor in mine
    ])  # fmt: skip
    ahead = OneWriteAhead()
    for name, tensor in weights:
        owner = owners[name]
        if id(tensor) not in trainable:
            for whole in distributed.stream_weight(tensor, owner):
                ahead.wait()  # written while gathered: ZeRO-3 frees the gathered copy when the loop moves on
                weights_file.write(_hf_name(name), whole)
            continue
        for key in distributed.STATE_KEYS:
            for chunk in distributed.stream_parameter_state(engine, tensor, key, owner):
                writes = [functools.partial(state_file.write, _state_key(name, key), chunk.float())]
                if key == "master":
                    writes.append(functools.partial(weights_file.write, _hf_name(name), chunk.to(tensor.dtype)))
                ahead.submit(functools.partial(_run_all, writes))
    ahead.wait()
    state_file.close()
    weights_file.close()


def _run_all(calls: list[Callable[[], None]]) -> None:
    for call in calls:
        call()


def _weights_file(rank: int, ranks: int) -> str:
    """transformers' names for a model's weights in one file or in shards (with an index saying which holds what)."""
    return WEIGHTS if ranks == 1 else f"model-{rank + 1:05d}-of-{ranks:05d}.safetensors"


def load_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """The weights of checkpoint `path` under transformers' names, from its one file or its shards."""
    path = Path(path)
    if not (path / WEIGHTS_INDEX).is_file():
        return load_file(path / WEIGHTS)
    weights = {}
    for file in sorted(set(json.loads((path / WEIGHTS_INDEX).read_text())["weight_map"].values())):
        weights.update(load_file(path / file))
    return weights


def _read(handle, key: str, span: tuple[int, int] | None) -> torch.Tensor:
    """The whole tensor, or the flat element range `span` of it padded with zeros to the span's length, read from
    the memory-mapped file without loading the rest: whole rows along dim 0, then trimmed."""
    if span is None:
        return handle.get_tensor(key)
    start, end = span
    sliced = handle.get_slice(key)
    shape = sliced.get_shape()
    numel = math.prod(shape)
    row = numel // shape[0] if shape and shape[0] else 1
    first, last = start // row, min(-(-min(end, numel) // row), shape[0] if shape else 1)
    part = sliced[first:last].reshape(-1)[start - first * row : min(end, numel) - first * row] if first < last else None
    out = torch.zeros(end - start, dtype=torch.float32)
    if part is not None:
        out[: part.numel()] = part
    return out


def _check_global_batch(saved: dict, path: Path, config: TrainConfig, world: World) -> None:
    """The pairs per optimizer step must be the checkpoint's; how a step is split (ranks, sequence parallelism,
    micro_batch_size or micro_batch_tokens) may change. Checkpoints from before the global batch was recorded
    derive it (and from before sequence parallelism, count every rank as a replica)."""
    before = saved["batch"]
    old_replicas = before["ranks"] // before.get("sequence_parallel_size", 1)
    old = before.get("global_batch") or before["micro_batch_size"] * before["gradient_accumulation_steps"] * old_replicas
    replicas = config.data_parallel_size(world.size)
    new = config.global_batch(world.size)
    if old == new:
        return
    step = saved["step"]
    if config.checkpoint.allow_new_global_batch:
        print0(
            f"warning: {path.name} was trained with a global batch of {old} pairs; continuing with {new} "
            f"(checkpoint.allow_new_global_batch=true): from step {step + 1} on each update averages {new} pairs and "
            "the data order is not the one the original run would have seen"
        )
        return
    if config.uses_token_budget:
        hint = f"global_batch_size={old} keeps it"
    elif old % (config.micro_batch_size * replicas) == 0:
        hint = (f"gradient_accumulation_steps={old // (config.micro_batch_size * replicas)} keeps it "
                f"(global_batch_size={old} derives it on any number of ranks)")
    else:
        hint = (f"no gradient_accumulation_steps gives {old} with micro_batch_size={config.micro_batch_size} on "
                f"{replicas} data-parallel replica(s): micro_batch_size x gradient_accumulation_steps x replicas must "
                f"be {old}")
    this_run = (f"global_batch_size {new}" if config.uses_token_budget else
                f"{config.micro_batch_size} x {config.gradient_accumulation_steps} x {replicas} replicas")  # fmt: skip
    if before.get("micro_batch_tokens"):
        trained = f"split under micro_batch_tokens={before['micro_batch_tokens']}"
    else:
        trained = (f"micro_batch_size {before['micro_batch_size']} x gradient_accumulation_steps "
                   f"{before['gradient_accumulation_steps']} x {old_replicas} data-parallel replicas")  # fmt: skip
    raise ConfigError(
        f"{path} was trained with a global batch of {old} pairs ({trained}); this run's is {new} ({this_run}). {hint}; "
        f"or set checkpoint.allow_new_global_batch=true to continue with {new} (the data order changes from step "
        f"{step + 1} on)"
    )


def _check_same_parameters(saved: dict[str, dict], parameters, path: Path) -> None:
    ours = {name: list(distributed.full_shape(p)) for name, p in parameters}
    missing = sorted(set(ours) - set(saved))
    extra = sorted(set(saved) - set(ours))
    reshaped = sorted(n for n in set(ours) & set(saved) if ours[n] != saved[n]["shape"])
    if not (missing or extra or reshaped):
        return
    found = []
    if missing:
        found.append(f"no state for {len(missing)} parameter(s) this run trains ({', '.join(missing[:3])})")
    if extra:
        found.append(f"state for {len(extra)} parameter(s) this run does not train ({', '.join(extra[:3])})")
    if reshaped:
        name = reshaped[0]
        found.append(f"{len(reshaped)} of another shape ({name}: checkpoint {saved[name]['shape']}, model {ours[name]})")
    raise ConfigError(
        f"{path} was written for another model or LoRA setting: {'; '.join(found)}. Resume it with the config it was "
        f"written with (its `config` in {TRAINER_STATE}), or train into a new run_dir"
    )


def _restore_native(engine, path: Path, world: World) -> int:
    """A checkpoint in DeepSpeed's own format, as runs wrote before the portable one, on the ranks and ZeRO stage
    that wrote it."""
    print0(f"{path.name} is a DeepSpeed-native checkpoint (pickled files: resume only checkpoints you wrote); "
           "the next checkpoint is written in the portable format")
    distributed.load_engine(engine, str(path / "ds"), NATIVE_ENGINE_TAG)
    torch.set_rng_state(torch.load(path / f"rng-rank{world.rank}.pt", weights_only=True)["rng"])
    return int(torch.load(path / NATIVE_STATE, weights_only=True)["step"])


def _save_rng(path: Path, device: torch.device) -> None:
    states = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        states["cuda"] = torch.cuda.get_rng_state(device)
    save_file(states, path)


def _load_rng(path: Path, device: torch.device) -> None:
    states = load_file(path)
    torch.set_rng_state(states["cpu"])
    if "cuda" in states and device.type == "cuda":
        torch.cuda.set_rng_state(states["cuda"], device)


def _hf_name(key: str) -> str:
    return key.removeprefix("model.")


def _check_finite(engine, step: int) -> None:
    """All ranks agree whether every weight shard is finite; a checkpoint of NaN weights is never written."""
    bad = torch.zeros(1)
    for parameter in engine.module.parameters():
        shard = getattr(parameter, "ds_tensor", parameter)  # ZeRO-3 keeps this rank's shard in ds_tensor
        if not torch.isfinite(shard.detach()).all():
            bad += 1
    if distributed.all_reduce_sum(bad).item():
        raise RuntimeError(
            f"step {step}: {int(bad.item())} weight tensor(s) hold NaN or inf; not writing a checkpoint. "
            "Lower optim.lr or check the data; resume from the previous checkpoint"
        )


def _prune(root: Path, config: CheckpointConfig) -> None:
    complete = sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-"))
    for old in complete[: -config.keep_last]:
        shutil.rmtree(old)



class SafetensorsWriter:
    """A safetensors file written one tensor, or one chunk of a tensor, at a time: nothing is held for it.

    safetensors' own `save_file` takes the whole dict; the format streams easily: an 8-byte little-endian header
    size, a JSON header of names, dtypes, shapes and byte offsets (known up front from the shapes), then each
    tensor's bytes in that order. Written inside the checkpoint's .partial directory, which is renamed when complete.
    """

    def __init__(self, path: Path, layout: list[tuple[str, torch.dtype, tuple[int, ...]]]):
        header: dict[str, dict] = {}
        offset = 0
        for name, dtype, shape in layout:
            size = math.prod(shape) * dtype.itemsize
            header[name] = {"dtype": SAFETENSORS_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
            offset += size
        encoded = json.dumps(header, separators=(",", ":")).encode()
        encoded += b" " * (-len(encoded) % 8)  # the data starts 8-byte aligned, as safetensors writes it
        self._expected = list(header.items())
        self._written = 0  # tensors complete
        self._filled = 0  # bytes of the next one written so far
        self._handle = open(path, "wb")  # noqa: SIM115 - closed by close(), after the last tensor
        self._handle.write(struct.pack("<Q", len(encoded)) + encoded)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Append `tensor`, the whole of `name` or its next flat chunk (chunks arrive in order, in the header's
        dtype, and add up to the header's shape)."""
        expected, spec = self._expected[self._written]
        begin, end = spec["data_offsets"]
        size = tensor.numel() * tensor.dtype.itemsize
        if name != expected or SAFETENSORS_DTYPES.get(tensor.dtype) != spec["dtype"] or self._filled + size > end - begin:
            raise ValueError(f"{name} {tuple(tensor.shape)} {tensor.dtype}: the file's header expects {expected} {spec} "
                             f"with {self._filled} of its bytes written")
        self._handle.write(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().data)  # no copy on CPU
        self._filled += size
        if self._filled == end - begin:
            self._written, self._filled = self._written + 1, 0

    def close(self) -> None:
        self._handle.close()
        if self._written != len(self._expected):
            raise ValueError(f"{self._handle.name}: {len(self._expected) - self._written} tensors were never written")


class OneWriteAhead:
    """Runs each write in a background thread while the caller gathers the next tensor, so the disk and the
    network work at once; one write at a time, so at most two tensors are held: the one being written and the one
    being gathered."""

    def __init__(self) -> None:
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def submit(self, write: Callable[[], None]) -> None:
        self.wait()
        self._thread = threading.Thread(target=self._run, args=(write,), daemon=True)
        self._thread.start()

    def _run(self, write: Callable[[], None]) -> None:
        try:
            write()
        except BaseException as error:  # noqa: BLE001 - re-raised in the caller's thread by the next submit or wait
            self._error = error

    def wait(self) -> None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            raise self._error

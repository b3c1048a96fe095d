"""Checkpoints that become visible only when complete.

    run_dir/checkpoints/step-00000040/
        ds/                 DeepSpeed engine state (sharded model, optimizer, scheduler), tag "state"
        model.safetensors   the consolidated weights (what `dpo-scale export` ships; no pickle involved)
        train_state.pt      step, resolved config, each rank's RNG state (tensors only: weights_only loading)
    run_dir/checkpoints/latest      name of the newest complete checkpoint

Every rank writes into `.step-00000040.partial/`; after a barrier rank 0 renames it, then moves `latest`, then
deletes all but the newest `keep_last`. A run killed at any moment leaves either the previous checkpoint or the new
one, never half of one. The directory must be on a file system all ranks share.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from dpo_scale import distributed
from dpo_scale.config import CheckpointConfig, TrainConfig, to_dict
from dpo_scale.distributed import World
from dpo_scale.io import atomic_open

ENGINE_TAG = "state"


def _name(step: int) -> str:
    return f"step-{step:08d}"


def latest(run_dir: str | Path) -> Path | None:
    pointer = Path(run_dir) / "checkpoints" / "latest"
    if not pointer.exists():
        return None
    path = pointer.parent / pointer.read_text().strip()
    return path if path.is_dir() else None


def is_checkpoint(path: str | Path) -> bool:
    """A complete checkpoint directory (step-N, not a .partial one)."""
    path = Path(path)
    return path.name.startswith("step-") and (path / "model.safetensors").is_file() and (path / "train_state.pt").is_file()


def save(engine, step: int, config: TrainConfig, world: World) -> Path:
    """Write checkpoint `step` on every rank; returns its final path. Refuses weights that are not finite."""
    _check_finite(engine, step)
    root = Path(config.run_dir) / "checkpoints"
    final = root / _name(step)
    partial = root / f".{_name(step)}.partial"
    if world.is_main:
        shutil.rmtree(partial, ignore_errors=True)  # debris of a run killed while writing
        partial.mkdir(parents=True)
    torch.distributed.barrier()
    distributed.save_engine(engine, str(partial / "ds"), ENGINE_TAG)
    torch.save({"rng": torch.get_rng_state()}, partial / f"rng-rank{world.rank}.pt")
    weights = distributed.consolidated_state_dict(engine)
    if world.is_main:
        save_file(_hf_names(weights), partial / "model.safetensors")
        torch.save({"step": step, "config": to_dict(config)}, partial / "train_state.pt")
    torch.distributed.barrier()
    if world.is_main:
        shutil.rmtree(final, ignore_errors=True)
        partial.rename(final)
        with atomic_open(root / "latest") as handle:
            handle.write(final.name)
        _prune(root, config.checkpoint)
    torch.distributed.barrier()
    return final


def restore(engine, path: Path, world: World) -> int:
    """Load engine state and this rank's RNG from checkpoint `path`; returns the step it was taken at."""
    distributed.load_engine(engine, str(path / "ds"), ENGINE_TAG)
    rng = torch.load(path / f"rng-rank{world.rank}.pt", weights_only=True)
    torch.set_rng_state(rng["rng"])
    return int(torch.load(path / "train_state.pt", weights_only=True)["step"])


def _hf_names(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Wrapper keys (`model.` + the transformers name) -> transformers names; tied weights stored once."""
    named: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for key, tensor in weights.items():
        if tensor.data_ptr() in seen:
            continue
        seen.add(tensor.data_ptr())
        named[key.removeprefix("model.")] = tensor.contiguous()
    return named


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

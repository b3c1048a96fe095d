"""Run `dpo-scale train` the way users do, in subprocesses: one plain process, or the real `deepspeed` launcher.

DeepSpeed is never initialised inside the pytest process: its global ZeRO-3 marker would make every later
`from_pretrained` in the session build sharded models.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from dpo_scale.distributed import free_port

DPO_SCALE = shutil.which("dpo-scale") or str(Path(sys.executable).with_name("dpo-scale"))


def base_config(material: tuple[Path, Path], run_dir: Path, **sections) -> dict:
    """A short run on the demo material; keyword arguments replace whole top-level entries."""
    model_dir, data_path = material
    tree = {
        "model": {"path": str(model_dir)},
        "data": {"path": str(data_path)},
        "run_dir": str(run_dir),
        "optim": {"lr": 0.001, "warmup_steps": 2},
        "max_steps": 6,
        "logging": {"every": 1, "progress_bar": False},
        "checkpoint": {"every": 0},
    }
    tree.update(sections)
    return tree


def train(
    tree: dict, ranks: int = 1, overrides: tuple[str, ...] = (), timeout: int = 300, launcher: str = "deepspeed",
    script: Path | None = None, env_extra: dict[str, str] | None = None, **popen,
):
    """Write the config beside the run and train with `ranks` processes under `launcher` (deepspeed or torchrun);
    returns the CompletedProcess (stdout and stderr captured). `script`: a Python file run in place of the
    `dpo-scale` entry point (with the same arguments); `env_extra`: variables added to its environment."""
    run_dir = Path(tree["run_dir"])
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    config = run_dir.parent / f"{run_dir.name}.yaml"
    config.write_text(yaml.safe_dump(tree))
    program = [str(script)] if script else [DPO_SCALE]
    command = [*program, "train", "--config", str(config), *overrides]
    if ranks == 1 and script:
        command = [sys.executable, *command]
    if ranks > 1:
        program = shutil.which(launcher) or str(Path(sys.executable).with_name(launcher))
        processes = "--num_gpus" if launcher == "deepspeed" else "--nproc_per_node"
        command = [program, processes, str(ranks), "--master_port", str(free_port()), *command]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env_extra or {})}
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env, **popen)


def train_metrics(run_dir: Path, split: str = "train") -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    return [row for row in map(json.loads, path.read_text().splitlines()) if row["split"] == split]


def precompute(tree: dict, ranks: int = 1, timeout: int = 300):
    """`dpo-scale precompute-ref` of the training config `tree` (written beside its run_dir) with `ranks` processes."""
    config = Path(tree["run_dir"]).with_suffix(".yaml")
    config.parent.mkdir(parents=True, exist_ok=True)
    config.write_text(yaml.safe_dump(tree))
    command = [DPO_SCALE, "precompute-ref", "--config", str(config)]
    if ranks > 1:
        launcher = shutil.which("deepspeed") or str(Path(sys.executable).with_name("deepspeed"))
        command = [launcher, "--num_gpus", str(ranks), "--master_port", str(free_port()), *command]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})  # fmt: skip


def final_weights(run_dir: Path, step: int) -> dict:
    """The weights of run_dir's checkpoint at `step`, by name."""
    from dpo_scale.training.checkpoint import load_weights

    return load_weights(Path(run_dir) / "checkpoints" / f"step-{step:08d}")


def adam_moments(run_dir: Path, step: int) -> dict:
    """AdamW's moments of every trainable parameter in run_dir's checkpoint at `step`, by name (all ranks' files)."""
    from safetensors.torch import load_file

    state = {}
    for file in sorted((Path(run_dir) / "checkpoints" / f"step-{step:08d}" / "state").glob("*.safetensors")):
        state.update({k: v for k, v in load_file(file).items() if k.endswith(("exp_avg", "exp_avg_sq"))})
    return state

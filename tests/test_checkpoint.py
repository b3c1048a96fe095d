"""Portable checkpoints: a run resumed on another number of ranks, another ZeRO stage, with offload or LoRA, ends
where the uninterrupted run ends (per-step losses, final weights and optimizer state within 1e-6, relative), and
resuming reads no pickle. Real `deepspeed` launcher on 2 CPU ranks, fp32."""

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dpo_scale.checkpoint import SafetensorsWriter, _owners, _read
from dpo_scale.demo import write_demo_material
from launch import base_config, train, train_metrics

HOOKS = Path(__file__).with_name("checkpoint_hooks.py")
LORA = {"enabled": True, "r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]}


@pytest.fixture(scope="module")
def material(tmp_path_factory):
    return write_demo_material(tmp_path_factory.mktemp("demo"), rows=128)


def _ok(result):
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


def _config(material, run_dir, steps=6, **sections):
    tree = base_config(material, run_dir, micro_batch_size=4, max_steps=steps, checkpoint={"every": 3, "keep_last": 3})
    tree.update(sections)
    return tree


def _resume_from(source: Path, run_dir: Path, step: int) -> None:
    """run_dir as `source` was when it had just written checkpoint `step` (later checkpoints removed; the resumed
    run drops the later metric rows itself)."""
    shutil.copytree(source / "checkpoints", run_dir / "checkpoints")
    for later in (run_dir / "checkpoints").glob("step-*"):
        if int(later.name.removeprefix("step-")) > step:
            shutil.rmtree(later)
    (run_dir / "checkpoints" / "latest").write_text(f"step-{step:08d}")
    shutil.copy(source / "metrics.jsonl", run_dir / "metrics.jsonl")


def _state(checkpoint: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for file in (checkpoint / "state").glob("*.safetensors"):
        tensors.update(load_file(file))
    return tensors


def _close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], what: str) -> None:
    assert a.keys() == b.keys(), what
    for name in a:
        scale = a[name].abs().max().clamp_min(1e-12)
        assert ((a[name] - b[name]).abs().max() / scale).item() <= 1e-6, f"{what}: {name}"


def _assert_same_run(resumed: Path, straight: Path, step: int) -> None:
    losses = [r["loss"] for r in train_metrics(resumed)]
    expected = [r["loss"] for r in train_metrics(straight)]
    assert [r["step"] for r in train_metrics(resumed)] == list(range(1, step + 1))
    assert losses == pytest.approx(expected, rel=1e-6, abs=0)
    final = f"checkpoints/step-{step:08d}"
    _close(load_file(resumed / final / "model.safetensors"), load_file(straight / final / "model.safetensors"),
           "weights")  # fmt: skip
    _close(_state(resumed / final), _state(straight / final), "optimizer state")
    saved = [json.loads((run / final / "trainer_state.json").read_text()) for run in (resumed, straight)]
    assert saved[0]["optimizer_steps"] == saved[1]["optimizer_steps"] == step
    assert saved[0]["engine"]["scheduler"] == saved[1]["engine"]["scheduler"]


def test_two_ranks_resume_on_one_with_twice_the_accumulation(material, tmp_path):
    """The issue's case: 2 ranks (ZeRO-3) to step 3, then 1 process with accumulation 2 to step 6. Also: the
    checkpoint holds no pickle, each rank wrote a share of the state, and another global batch is refused with the
    accumulation that would keep it, or allowed on request."""
    straight = tmp_path / "straight"
    _ok(train(_config(material, straight), ranks=2))
    checkpoint = straight / "checkpoints" / "step-00000003"
    assert not [p for p in checkpoint.rglob("*") if p.suffix in (".pt", ".pkl", ".pickle")]
    shares = [load_file(checkpoint / "state" / f"rank-{r:05d}.safetensors") for r in range(2)]
    assert shares[0] and shares[1] and not shares[0].keys() & shares[1].keys()

    resumed = tmp_path / "resumed"
    _resume_from(straight, resumed, 3)
    result = train(_config(material, resumed, gradient_accumulation_steps=2), script=HOOKS,
                   env_extra={"DPO_SCALE_TEST_NO_PICKLE": "1"})  # fmt: skip
    _ok(result)
    assert f"resumed from {resumed / 'checkpoints' / 'step-00000003'} at step 3" in result.stdout
    _assert_same_run(resumed, straight, 6)

    other = tmp_path / "other"
    _resume_from(straight, other, 3)
    refused = train(_config(material, other))
    assert refused.returncode != 0 and "Traceback" not in refused.stderr
    assert ("was trained with a global batch of 8 pairs (micro_batch_size 4 x gradient_accumulation_steps 1 x 2 "
            "ranks); this run's is 4 (4 x 1 x 1 ranks). gradient_accumulation_steps=2 keeps it") in refused.stderr
    allowed = train(_config(material, other), overrides=("checkpoint.allow_new_global_batch=true",))
    _ok(allowed)
    assert "continuing with 4 (checkpoint.allow_new_global_batch=true)" in allowed.stdout
    assert [r["step"] for r in train_metrics(other)] == list(range(1, 7))

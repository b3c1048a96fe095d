"""`dpo-scale export` never deletes what the user owns: it refuses the run directory, the checkpoint and anything
holding them, and any non-empty directory that is not an earlier export (unless --overwrite), before it loads a
weight; it replaces an earlier export whole.

The runs here are built by hand, not trained: a checkpoint directory holding the demo model's weights and a
trainer_state.json with the run's config is all that export reads. Trained runs are exported in test_train.py and
test_train_lora.py.
"""

import json
import subprocess
from pathlib import Path

import pytest
from transformers import AutoModelForCausalLM

from dpo_scale.commands.demo import write_demo_material
from dpo_scale.commands.export import MARKER, _move_into_place, check_out, export
from dpo_scale.config import ConfigError, TrainConfig, build, to_dict
from launch import DPO_SCALE

STEP = "step-00000003"


def _make_run(run_dir: Path, material: tuple[Path, Path], weights: bytes) -> Path:
    """A run directory with one complete checkpoint (`weights` as its model.safetensors) and the run's files."""
    model_dir, data_path = material
    config = build(TrainConfig, {"model": {"path": str(model_dir)}, "data": {"path": str(data_path)},
                                 "run_dir": str(run_dir)})  # fmt: skip
    latest = run_dir / "checkpoints" / STEP
    latest.mkdir(parents=True)
    (latest / "model.safetensors").write_bytes(weights)
    (latest / "trainer_state.json").write_text(json.dumps({"step": 3, "config": to_dict(config)}))
    (run_dir / "checkpoints" / "latest").write_text(STEP)
    (run_dir / "config.yaml").write_text("run_dir: run\n")
    (run_dir / "metrics.jsonl").write_text('{"step": 1, "loss": 0.69}\n')
    return run_dir


@pytest.fixture(scope="module")
def material(tmp_path_factory):
    return write_demo_material(tmp_path_factory.mktemp("demo"), rows=8)


@pytest.fixture
def unloadable_run(material, tmp_path):
    """A run whose weights file is not safetensors: an export that got as far as loading it would fail on that,
    so a refusal naming the output path shows the path was checked first."""
    return _make_run(tmp_path / "runs" / "run", material, b"not safetensors")


@pytest.fixture(scope="module")
def run(material, tmp_path_factory):
    """A run whose checkpoint holds the demo model's weights: it exports for real."""
    model_dir = material[0]
    return _make_run(tmp_path_factory.mktemp("runs") / "run", material, (model_dir / "model.safetensors").read_bytes())


def _files(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def _export_command(run_dir: Path, out: Path, *flags: str) -> subprocess.CompletedProcess:
    return subprocess.run([DPO_SCALE, "export", str(run_dir), "--out", str(out), *flags], capture_output=True,
                          text=True, timeout=300)  # fmt: skip


def _ok(result):
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


@pytest.mark.parametrize("overwrite", [False, True])
@pytest.mark.parametrize("where", ["run", "runs", "checkpoints", "checkpoint", "inside the checkpoint"])
def test_the_run_its_checkpoint_and_what_holds_them_are_refused_before_loading(unloadable_run, where, overwrite):
    """--overwrite does not open these: they are the run's own files."""
    latest = unloadable_run / "checkpoints" / STEP
    out = {"run": unloadable_run, "runs": unloadable_run.parent, "checkpoints": latest.parent, "checkpoint": latest,
           "inside the checkpoint": latest / "hf"}[where]  # fmt: skip
    before = _files(unloadable_run.parent)
    with pytest.raises(ConfigError, match=rf"^--out {out} (is|contains) .*choose an --out outside"):
        export(unloadable_run, out, overwrite=overwrite)
    assert _files(unloadable_run.parent) == before


def test_exporting_one_checkpoint_directory_into_its_run_is_refused(unloadable_run):
    latest = unloadable_run / "checkpoints" / STEP
    with pytest.raises(ConfigError, match=rf"^--out {unloadable_run} contains the checkpoint"):
        export(latest, unloadable_run, overwrite=True)


def test_a_file_at_out_is_refused_before_loading(unloadable_run, tmp_path):
    out = tmp_path / "model"
    out.write_text("mine")
    with pytest.raises(ConfigError, match=rf"^--out {out} is a file"):
        export(unloadable_run, out, overwrite=True)
    assert out.read_text() == "mine"


def test_a_foreign_directory_is_refused_before_loading_unless_overwrite(unloadable_run, tmp_path):
    out = tmp_path / "models"
    (out / "earlier-model").mkdir(parents=True)
    (out / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match=rf"^--out {out} is a non-empty directory that is not an earlier export "
                                          r"\(it holds earlier-model, notes.txt\); .*--overwrite"):  # fmt: skip
        export(unloadable_run, out)
    assert check_out(out, unloadable_run, unloadable_run / "checkpoints" / STEP, overwrite=True) == (
        "what was there (--overwrite)"
    )


def test_what_an_export_may_replace_without_overwrite(unloadable_run, tmp_path):
    """Nothing, an empty directory, an earlier export; not an earlier export holding a file it did not write, nor a
    directory whose marker does not parse."""
    latest = unloadable_run / "checkpoints" / STEP
    out = tmp_path / "model"
    assert check_out(out, unloadable_run, latest, overwrite=False) == ""
    out.mkdir()
    assert check_out(out, unloadable_run, latest, overwrite=False) == ""
    (out / "config.json").write_text("{}")
    (out / MARKER).write_text(json.dumps({"run_dir": "r", "checkpoint": "c", "files": ["config.json"]}))
    assert check_out(out, unloadable_run, latest, overwrite=False) == "the earlier export there"
    (out / "README.md").write_text("my notes")
    with pytest.raises(ConfigError, match=r"it holds README.md\)"):
        check_out(out, unloadable_run, latest, overwrite=False)
    (out / "README.md").unlink()
    (out / MARKER).write_text("not json")
    with pytest.raises(ConfigError, match=rf"it holds config.json, {MARKER}\)"):
        check_out(out, unloadable_run, latest, overwrite=False)


def test_a_failed_rename_puts_the_replaced_directory_back(tmp_path, monkeypatch):
    out, staging = tmp_path / "model", tmp_path / ".model.partial-1"
    (out / "sub").mkdir(parents=True)
    (out / "sub" / "weights").write_text("old")
    staging.mkdir()
    rename = Path.rename

    def failing_rename(self, target):
        if self == staging:
            raise OSError("disk gone")
        return rename(self, target)

    monkeypatch.setattr(Path, "rename", failing_rename)
    with pytest.raises(OSError, match="disk gone"):
        _move_into_place(staging, out)
    assert (out / "sub" / "weights").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == [".model.partial-1", "model"]


@pytest.mark.slow
def test_shell_export_into_the_run_is_refused_and_the_run_survives(run):
    """The reported command (which deleted the run's checkpoints, config and metrics), and with --overwrite."""
    before = _files(run)
    for flags in (["--merge-lora"], ["--merge-lora", "--overwrite"]):
        result = _export_command(run, run, *flags)
        assert result.returncode == 2, result.stdout + result.stderr
        assert f"dpo-scale export: error: --out {run} is the run directory {run.resolve()}" in result.stderr
        assert _files(run) == before


@pytest.mark.slow
def test_shell_export_over_a_foreign_directory_is_refused_then_overwrite_replaces_it(run, tmp_path):
    out = tmp_path / "models"
    (out / "earlier").mkdir(parents=True)
    (out / "earlier" / "model.safetensors").write_text("someone's model")
    (out / "notes.txt").write_text("mine")
    before = _files(out)
    refused = _export_command(run, out)
    assert refused.returncode == 2, refused.stdout + refused.stderr
    assert f"--out {out} is a non-empty directory that is not an earlier export" in refused.stderr
    assert "--overwrite" in refused.stderr
    assert _files(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["models"]  # no staging left behind

    overwritten = _export_command(run, out, "--overwrite")
    _ok(overwritten)
    assert f"wrote {out}, replacing what was there (--overwrite)" in overwritten.stdout
    assert not (out / "notes.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["models"]


@pytest.mark.slow
def test_shell_re_export_replaces_an_earlier_export_whole(run, tmp_path):
    """The second export says what it replaced, loads, and leaves no staging or replaced directory beside it; a
    staging directory that is not its own (another export's, or one killed midway) is left alone."""
    out = tmp_path / "model"
    _ok(_export_command(run, out))
    marker = json.loads((out / MARKER).read_text())
    assert marker["run_dir"] == str(run.resolve())
    assert marker["checkpoint"] == str((run / "checkpoints" / STEP).resolve())
    assert set(marker["files"]) | {MARKER} == {p.name for p in out.iterdir()}
    (out / "model.safetensors").write_bytes(b"stale")  # so the test sees it replaced
    others = tmp_path / ".model.partial-0123456789ab"
    others.mkdir()
    (others / "in-progress").write_text("another export")

    result = _export_command(run, out)
    _ok(result)
    assert f"wrote {out}, replacing the earlier export there" in result.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == [others.name, "model"]
    assert (others / "in-progress").read_text() == "another export"
    assert AutoModelForCausalLM.from_pretrained(out).config.vocab_size > 0
    assert (out / "model.safetensors").read_bytes() != b"stale"


def test_an_empty_directory_is_used(run, tmp_path):
    out = tmp_path / "model"
    out.mkdir()
    exported = export(run, out)
    assert exported.replaced == ""
    assert (out / MARKER).is_file() and (out / "model.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]

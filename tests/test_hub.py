"""A missing model path is refused at once, without waiting on the hub, unless it can name a loadable hub repository."""

import pytest
from huggingface_hub import constants

from dpo_scale.cli import main
from dpo_scale.config import ConfigError
from dpo_scale.hub import check_model_source, not_on_hub


@pytest.fixture
def online(monkeypatch, tmp_path):
    """The hub switched on (the test session sets HF_HUB_OFFLINE), in a working directory holding runs/."""
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()


def test_local_looking_paths_are_not_hub_ids(online):
    assert not_on_hub("runs/nothere") == "runs/ is a local directory, so this is a local path"
    for path in ("./model", "/abs/model", "a/b/c", "~/model"):
        assert not_on_hub(path) == "not a hub id either", path
    assert not_on_hub("meta-llama/Llama-3.2-1B") is None
    assert not_on_hub("gpt2") is None


def test_offline_only_cached_repositories_load(monkeypatch, tmp_path):
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    assert "HF_HUB_OFFLINE is set" in not_on_hub("org/model")
    (tmp_path / "models--org--model").mkdir()
    assert not_on_hub("org/model") is None


def test_existing_paths_pass_and_missing_ones_name_their_key(online, tmp_path):
    check_model_source(str(tmp_path / "runs"), "policy", "unused")
    with pytest.raises(ConfigError, match=r"^policy=runs/nothere: no such file or directory \(runs/ is a local "
                                          r"directory, so this is a local path\)\. Fix: give a run"):  # fmt: skip
        check_model_source("runs/nothere", "policy", "give a run directory")


def test_eval_of_a_missing_run_fails_at_once(online, capsys):
    """The hub is on, but `runs/nothere` is a local path: one line, before any download is tried."""
    assert main(["eval", "--policy", "runs/nothere", "--out", "e.json"]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("dpo-scale eval: error: policy=runs/nothere: no such file or directory")
    assert len(error.splitlines()) == 1

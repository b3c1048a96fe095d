"""A new run in a directory holding an earlier one moves the earlier run's files aside, whole, and nothing else."""

from dpo_scale.training.run_files import RUN_FILES, set_aside_earlier_run


def test_earlier_runs_move_aside_in_order(tmp_path):
    run_dir = tmp_path / "run"
    assert set_aside_earlier_run(run_dir) is None  # no directory yet: nothing to move
    run_dir.mkdir()
    assert set_aside_earlier_run(run_dir) is None
    (run_dir / "metrics.jsonl").write_text('{"step": 1}\n')
    (run_dir / "checkpoints" / "step-00000001").mkdir(parents=True)
    (run_dir / "stop-requested").touch()
    (run_dir / "token-store").mkdir()  # a store (data.cache_dir inside the run directory) is not the run's own
    # nor are the stores kept here without a writable cache root: named by their data, they never mix, and the
    # earlier run's config finds its own there
    (run_dir / "token-stores" / "pairs.jsonl-0123456789abcdef").mkdir(parents=True)
    (run_dir / "notes.txt").write_text("mine")

    first = set_aside_earlier_run(run_dir)
    assert first == run_dir / "previous-runs" / "1"
    assert sorted(p.name for p in first.iterdir()) == ["checkpoints", "metrics.jsonl", "stop-requested"]
    assert (first / "metrics.jsonl").read_text() == '{"step": 1}\n'
    assert (first / "checkpoints" / "step-00000001").is_dir()
    assert sorted(p.name for p in run_dir.iterdir()) == ["notes.txt", "previous-runs", "token-store", "token-stores"]

    (run_dir / "config.yaml").write_text("run: 2\n")
    assert set_aside_earlier_run(run_dir) == run_dir / "previous-runs" / "2"
    assert (run_dir / "previous-runs" / "2" / "config.yaml").read_text() == "run: 2\n"
    assert not any((run_dir / name).exists() for name in RUN_FILES)

"""`dpo-scale precompute-ref` as users run it: what it shows while it works. (The cache's values and resumption are
tested in tests/reference/test_ref_cache.py, its sequence-parallel form in tests/distributed/test_sequence_parallel.py.)"""

from __future__ import annotations

import subprocess

import pytest
import yaml

from dpo_scale.commands.demo import write_demo_material
from launch import DPO_SCALE, base_config


@pytest.mark.slow
def test_the_progress_bar_is_labelled_precompute_ref_and_counts_shards(tmp_path):
    """It was labelled "train" and counted "step"s: a user watching a precompute job read it as training."""
    tree = base_config(write_demo_material(tmp_path / "demo", rows=40), tmp_path / "run",
                       reference={"cache_dir": str(tmp_path / "cache"), "shard_size": 16},
                       logging={"progress_bar": True})  # fmt: skip
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(tree))
    result = subprocess.run([DPO_SCALE, "precompute-ref", "--config", str(config)], capture_output=True, text=True,
                            timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    bar = [line for line in result.stderr.replace("\r", "\n").splitlines() if "3/3" in line]
    assert bar and all(line.startswith("precompute-ref: 100%") and "shard/s" in line for line in bar), bar
    assert "train:" not in result.stderr

"""`dpo-scale precompute-ref` as users run it: what it shows while it works, and its forwards under a token budget.
(The cache's values and resumption are tested in tests/reference/test_ref_cache.py, its sequence-parallel form in
tests/distributed/test_sequence_parallel.py.)"""

from __future__ import annotations

import re
import subprocess

import numpy as np
import pytest
import yaml

from dpo_scale.commands.demo import write_demo_material
from dpo_scale.reference.cache import FIELDS, INDEX_KEYS, CacheReader, read_manifest
from launch import DPO_SCALE, base_config, precompute
from uneven_pairs import write_uneven_material


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


def _cache_values(directory) -> dict[str, np.ndarray]:
    """Every field of the cache in the prepared order, and its pair keys (the index, bytes)."""
    reader = CacheReader(directory, read_manifest(directory))
    values = {name: reader.in_order(name) for name in FIELDS}
    values["index"] = np.frombuffer((directory / INDEX_KEYS).read_bytes(), np.uint8)
    return values


@pytest.mark.slow
def test_a_token_budget_writes_the_same_cache_as_fixed_batches(tmp_path):
    """Under micro_batch_tokens=25 each forward holds as many consecutive pairs as fit 4 x 25 positions (up to 4 of
    these uneven pairs) instead of reference.precompute_batch_size=16: the same cache, one process or the reference
    ZeRO-3-sharded over 2 ranks (3 shards: rank 0 scores 24 pairs, rank 1 16, so their forward counts differ and the
    throw-away forwards must follow the budget's count). Each pair is scored alone in its row, so only the padding
    of its neighbours differs: fp32 rounding (1e-5)."""
    material = write_uneven_material(tmp_path / "demo", rows=40)
    fixed = base_config(material, tmp_path / "fixed", reference={"cache_dir": str(tmp_path / "fixed-cache"),
                                                                   "shard_size": 16})  # fmt: skip
    made = precompute(fixed)
    assert made.returncode == 0, made.stderr[-3000:]
    expected = _cache_values(tmp_path / "fixed-cache")
    for name, ranks, sharded in (("budget", 1, False), ("budget-sharded", 2, True)):
        tree = base_config(material, tmp_path / name, micro_batch_tokens=25, global_batch_size=8,
                           reference={"cache_dir": str(tmp_path / f"{name}-cache"), "shard_size": 16,
                                      "precompute_sharded": sharded})  # fmt: skip
        result = precompute(tree, ranks=ranks)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        counts = re.findall(r"rank (\d): (\d+) forwards of at most 100 positions per rank \(4 x micro_batch_tokens\)",
                            result.stdout)  # fmt: skip
        assert len({rank for rank, _ in counts}) == ranks and len({count for _, count in counts}) == ranks, counts
        got = _cache_values(tmp_path / f"{name}-cache")
        assert np.array_equal(got.pop("index"), expected["index"])
        for field, values in got.items():
            np.testing.assert_allclose(values, expected[field], rtol=0, atol=1e-5, err_msg=f"{name} {field}")


@pytest.mark.slow
def test_pairs_over_the_forward_budget_are_refused_before_anything_is_written(tmp_path):
    """A pair that alone exceeds 4 x micro_batch_tokens cannot be scored in any forward: refused in one line naming
    the key and the size to raise it to, before the model loads or the cache directory is made."""
    material = write_uneven_material(tmp_path / "demo", rows=40)
    cache = tmp_path / "cache"
    tree = base_config(material, tmp_path / "run", micro_batch_tokens=6, global_batch_size=8,
                       reference={"cache_dir": str(cache)})  # fmt: skip
    result = precompute(tree)
    assert result.returncode == 2, result.stderr[-3000:]
    assert ("of 40 pairs to score need more than 24 positions per rank on their own (4 x micro_batch_tokens; the "
            "longest 34): raise micro_batch_tokens to 9 or more") in result.stderr  # fmt: skip
    assert "Traceback" not in result.stderr and not cache.exists()

"""bench/bench_gpu.py, the program bench/gpu.sh runs on a GPU, dry-run on this CPU with a tiny model: both sides
train under the deepspeed launcher and the report counts the tokens the pairs really hold. The GPU figures themselves
come only from a GPU machine (BENCHMARKS.md)."""

import pytest
import json
import os
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "bench" / "bench_gpu.py"


@pytest.mark.slow
def test_gpu_bench_runs_both_sides_on_cpu(tmp_path):
    steps, warmup, batch = 2, 1, 4
    result = subprocess.run(
        [sys.executable, str(BENCH), "--size", "tiny", "--steps", str(steps), "--warmup", str(warmup), "--batch",
         str(batch), "--prompt-tokens", "24", "--completion-tokens", "16", "--work", str(tmp_path)],
        capture_output=True, text=True, timeout=600, env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["device"] == "CPU" and report["parameters"] > 0
    for side in ("dpo_scale", "trl"):
        outcome = report["results"][side]
        assert "error" not in outcome, (side, outcome, (tmp_path / f"{side}.log").read_text()[-3000:])
        assert outcome["steps"] == steps and outcome["seconds"] > 0 and len(outcome["losses"]) == 3
    # 24 prompt words, 15 completion words + EOS each: the unique-token rate is computed from exactly these counts
    unique_per_second = int(next(line for line in result.stdout.splitlines() if line.startswith("| dpo_scale"))
                            .split("|")[3].replace(",", ""))  # fmt: skip
    expected = batch * steps * (24 + 16 + 16) / report["results"]["dpo_scale"]["seconds"]
    assert abs(unique_per_second - expected) <= 1

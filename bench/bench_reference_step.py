"""Training step time by reference source: the online full-precision copy, the precomputed cache, the NF4 copy.

    python bench/bench_reference_step.py        # stories260K, HH-RLHF helpful-base, max_length 256, micro 8, 12 steps

Each source trains the same run in its own process (ZeRO-3, one CPU rank, fp32); the figure is the median of the
logged seconds_per_step after the first logging window (warm-up). The cache is precomputed first (its time is the
one-off cost, reported too).
"""

from __future__ import annotations

import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
DPO_SCALE = shutil.which("dpo-scale") or str(Path(sys.executable).with_name("dpo-scale"))


def main() -> None:
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        base = {
            "model": {"path": str(SHARED / "models/stories260K")},
            "data": {"path": str(SHARED / "preferences/hh-rlhf/helpful-base/test.jsonl.gz"), "max_length": 256},
            "optim": {"lr": 1e-4, "warmup_steps": 2},
            "micro_batch_size": 8,
            "max_steps": 12,
            "logging": {"every": 2, "progress_bar": False},
            "checkpoint": {"every": 0},
        }
        cache = scratch / "cache"
        results = {}
        start = time.perf_counter()
        run("precompute-ref", {**base, "run_dir": str(scratch / "pre"), "reference": {"cache_dir": str(cache)}}, scratch)
        precompute_s = time.perf_counter() - start
        for source in ("copy", "cache", "nf4"):
            reference = {"source": source, "cache_dir": str(cache)} if source == "cache" else {"source": source}
            run_dir = scratch / source
            run("train", {**base, "run_dir": str(run_dir), "reference": reference}, scratch)
            rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
            results[source] = statistics.median(r["seconds_per_step"] for r in rows[1:])
    print("stories260K, HH-RLHF helpful-base, max_length 256, 8 pairs per step, 1 CPU rank, fp32\n")
    print("| reference | seconds per step (median) | vs online copy |\n|---|---|---|")
    for source, seconds in results.items():
        print(f"| {source} | {seconds:.3f} | {seconds / results['copy']:.2f}x |")
    print(f"\nprecompute-ref for the whole file (one-off): {precompute_s:.1f} s including start-up")


def run(command: str, tree: dict, scratch: Path) -> None:
    config = scratch / f"{command}-{time.time_ns()}.yaml"
    config.write_text(yaml.safe_dump(tree))
    subprocess.run([DPO_SCALE, command, "--config", str(config)], check=True, capture_output=True)


if __name__ == "__main__":
    main()

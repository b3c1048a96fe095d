"""The files a training run keeps in its run directory, and a new run started where an earlier one left its own.

A run with `checkpoint.resume=never` in a directory holding an earlier run's files would append its steps to the
earlier `metrics.jsonl` (the same step numbers twice, which plots and sweep summaries then mix) and leave the old
checkpoints to be resumed from later. So the earlier run's files are moved aside, whole, into
`run_dir/previous-runs/N` (N = 1, 2, ... in order) before the new run writes anything. Other files in the directory
(the user's own, a token store) stay where they are. That includes `run_dir/token-stores`, where stores go when no
cache root is writable: each store there is named for its data and settings (data/cache.py), so the new run
reuses one only for the same data and settings and builds its own beside it otherwise, and the earlier run's
config, which names its store by that path, still finds it.
"""

from __future__ import annotations

import itertools
from pathlib import Path

STOP_REQUEST = "stop-requested"
"""Created in run_dir (by a job script on its walltime warning, or by hand): every rank finishes its step, a
checkpoint is saved, the file is removed and the run exits 0; the same command resumes from that checkpoint."""
RUN_FILES = (
    "config.yaml", "deepspeed.json", "token-store.json", "metrics.jsonl", "checkpoints", "wandb", "training.png",
    STOP_REQUEST,
)  # fmt: skip
"""What training (and the demo's plot) writes in run_dir; a stale stop request would stop the new run at step 1."""
PREVIOUS_RUNS = "previous-runs"


def set_aside_earlier_run(run_dir: Path) -> Path | None:
    """Move the earlier run's files in `run_dir` into a new `run_dir/previous-runs/N`; returns it, or None when
    there were none. Renames only (one file system): nothing is copied."""
    found = [run_dir / name for name in RUN_FILES if (run_dir / name).exists()]
    if not found:
        return None
    earlier = run_dir / PREVIOUS_RUNS
    destination = next(earlier / str(n) for n in itertools.count(1) if not (earlier / str(n)).exists())
    destination.mkdir(parents=True)
    for path in found:
        path.rename(destination / path.name)
    return destination

"""Where training metrics go: run_dir/metrics.jsonl always, wandb when asked, a progress bar on rank 0.

Imports neither deepspeed nor wandb nor tqdm at module level: wandb and tqdm are loaded only when they are used.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

from dpo_scale.config import LoggingConfig
from dpo_scale.io import atomic_open

_SECRET_WORDS = ("token", "key", "secret", "password")


def is_main_process() -> bool:
    """Rank 0, read from the RANK variable every launcher sets (a plain process has none: it is rank 0)."""
    return int(os.environ.get("RANK", "0")) == 0


def print_line(text: str) -> None:
    """`text` and its newline in one write, flushed, so that lines ranks print at the same moment arrive whole.
    `print` writes the text and the newline separately, and the deepspeed launcher runs its ranks unbuffered
    (`python -u`), where each write reaches the shared output at once: two ranks' lines ran together, their newlines
    after them. One write of a line under the pipe's atomic size (4 KiB) is never split."""
    sys.stdout.write(f"{text}\n")
    sys.stdout.flush()


def print0(*args: Any) -> None:
    """`print` on rank 0 only, as one write (`print_line`), flushed at once so the lines of a multi-node log arrive
    in order."""
    if is_main_process():
        print_line(" ".join(map(str, args)))


class MetricsLog:
    """run_dir/metrics.jsonl: one `{"step": int, "split": "train"|"eval", **metrics}` object per line.

    Each line is written whole in one write and flushed, so a reader following the file never sees half a line.
    Only rank 0 writes to it; the caller checks the rank.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, step: int, split: str, metrics: Mapping[str, Any]) -> None:
        """`metrics` values may be Python numbers or 0-dim tensors; each is stored as a float."""
        row = {"step": int(step), "split": split, **{name: float(value) for name, value in metrics.items()}}
        # Opened per line rather than held: `truncate_after` replaces the file, and a held handle would go on
        # writing into the replaced (unlinked) one. Logging happens every few steps, so the open costs nothing.
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(row) + "\n")
            handle.flush()

    def truncate_after(self, step: int) -> None:
        """On resume from the checkpoint of `step`: drop the rows logged after it, which the run will log again."""
        if not self.path.exists():
            return
        kept = [row for row in read_metrics(self.path) if row["step"] <= step]
        with atomic_open(self.path, "w") as handle:
            handle.writelines(json.dumps(row) + "\n" for row in kept)


def read_metrics(path: str | Path) -> list[dict]:
    """Every row of a metrics.jsonl, in file order.

    A run killed in the middle of a write can leave a last line without its newline: it is dropped, not parsed.
    """
    lines = Path(path).read_text(encoding="utf-8").split("\n")
    # After the last "\n" comes either "" (a complete file) or the torn line of a killed run.
    return [json.loads(line) for line in lines[:-1] if line]


class Tracker(Protocol):
    def log(self, metrics: dict[str, float], step: int, split: str) -> None: ...

    def close(self) -> None: ...


class NullTracker:
    """Off: on ranks other than 0, and when wandb is not asked for."""

    def log(self, metrics: dict[str, float], step: int, split: str) -> None:
        pass

    def close(self) -> None:
        pass


class WandbTracker:
    """One wandb run whose files live under run_dir/wandb; keys are prefixed `train/` or `eval/`.

    offline mode needs no network (`wandb sync run_dir/wandb/offline-run-*` uploads later).
    """

    def __init__(self, config: LoggingConfig, run_dir: str | Path, run_config: dict):
        import wandb

        self._run = wandb.init(
            project=config.wandb_project,
            dir=str(run_dir),
            mode=config.wandb_mode,
            name=Path(run_dir).name,
            config=redact_secrets(run_config),
        )

    def log(self, metrics: dict[str, float], step: int, split: str) -> None:
        self._run.log({f"{split}/{name}": value for name, value in metrics.items()}, step=step)

    def close(self) -> None:
        import wandb

        self._run.finish()
        # finish() can return before wandb-core has flushed the run's .wandb file (seen on a loaded CI machine: the
        # file held only its header); teardown waits for the service, which the atexit hook does not reliably do
        # in launcher-spawned ranks.
        wandb.teardown()


def redact_secrets(tree: dict) -> dict:
    """A copy of `tree` without any key, at any depth of nested dicts, whose name contains token, key, secret or
    password (case-insensitive). Deliberately broad: it also drops e.g. `data.tokenizer`, a path that the run's
    config.yaml keeps anyway; sending a credential to a tracking server is the mistake that cannot be undone."""
    return {
        name: redact_secrets(value) if isinstance(value, dict) else value
        for name, value in tree.items()
        if not any(word in str(name).lower() for word in _SECRET_WORDS)
    }


def build_tracker(config: LoggingConfig, run_dir: str | Path, run_config: dict) -> Tracker:
    if not (config.wandb and is_main_process()):
        return NullTracker()
    return WandbTracker(config, run_dir, run_config)


def stop_tqdm_monitor() -> None:
    """No tqdm monitor thread in this process (tqdm starts one with its first bar, transformers' bars included).

    It is a daemon thread. If a garbage collection it triggers is freeing tensors when the interpreter starts to
    exit, CPython ends the thread inside torch's C++ and the process aborts ("terminate called without an active
    exception") after the run has finished and written everything, and its job is reported failed. The monitor only
    corrects the refresh rate of a bar that stalls; bars work the same without it."""
    import tqdm

    tqdm.tqdm.monitor_interval = 0


class ProgressBar:
    """tqdm on rank 0 (off on other ranks or when `enabled` is False), labelled for the work it counts: training's
    optimizer steps by default, precompute-ref's shards.

    Starts at `initial` so a resumed run shows its true position.
    """

    def __init__(
        self, total_steps: int, initial: int = 0, enabled: bool = True, label: str = "train", unit: str = "step"
    ):
        self._bar = None
        if enabled and is_main_process():
            from tqdm import tqdm

            self._bar = tqdm(total=total_steps, initial=initial, desc=label, unit=unit, dynamic_ncols=True)

    def update(self, step: int, metrics: Mapping[str, float]) -> None:
        """Move to `step`; show the loss, reward accuracy, margin and positions computed per second (every rank's) of
        `metrics` if it has them (the loop passes the last logged values, so an empty mapping between logs keeps the
        previous ones on screen)."""
        if self._bar is None:
            return
        shown = {
            label: f"{float(metrics[name]):.4f}"
            for label, name in (("loss", "loss"), ("acc", "rewards/accuracies"), ("margin", "rewards/margins"))
            if name in metrics
        }
        if "tokens_per_second" in metrics:
            shown["tok/s"] = f"{float(metrics['tokens_per_second']):,.0f}"
        if shown:
            self._bar.set_postfix(shown, refresh=False)
        self._bar.update(step - self._bar.n)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()

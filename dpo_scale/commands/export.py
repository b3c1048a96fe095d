"""`dpo-scale export RUN_DIR --out DIR`: the run's latest weights as a directory `from_pretrained` loads.

Reads only the weights (safetensors) and the saved config (JSON) of the latest complete checkpoint (no pickled
objects). LoRA runs export the adapter (peft format), or with `merge_lora` the base model
with the adapters merged in.

The output path is checked before any weight is loaded, so a refusal costs nothing. An export never replaces the
run directory or the checkpoint it reads, nor a directory that contains either, nor writes into the checkpoint.
It replaces only an empty directory or an earlier export: a directory whose marker file `dpo_scale_export.json`
(the run directory, the checkpoint and the names of the files the export wrote) lists everything the directory
holds. Any other non-empty directory needs `overwrite`; a file is always refused. The directory appears whole: it
is written into a staging directory of a unique name beside it, then renamed; a directory it replaces is moved
aside first and removed only once the new one is in place.
"""

from __future__ import annotations

import json
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path

from dpo_scale.config import ConfigError
from dpo_scale.io import atomic_open
from dpo_scale.training.trained_policy import latest_checkpoint, load_trained_policy

MARKER = "dpo_scale_export.json"


@dataclass(frozen=True)
class Exported:
    path: Path
    replaced: str
    """What the export replaced at `path`, for the user to read: "" when nothing (no directory, or an empty one)."""


def export(run_dir: str | Path, out: str | Path, merge_lora: bool = False, overwrite: bool = False) -> Exported:
    from dpo_scale.data import run_tokenizer

    source = latest_checkpoint(run_dir)
    out = Path(out)
    check_out(out, Path(run_dir), source, overwrite)  # before any weight is loaded: a refusal costs nothing
    model, config = load_trained_policy(source, merge_lora=merge_lora)
    if merge_lora and not config.lora.enabled:
        print(f"export: {run_dir} is not a LoRA run (lora.enabled=false): there was nothing to merge, so --merge-lora "
              "changed nothing; writing its full weights", flush=True)  # fmt: skip
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = _new_sibling(out, "partial")
    try:
        model.save_pretrained(staging, safe_serialization=True)
        run_tokenizer(config.data, config.model.path).save_pretrained(staging)
        _write_marker(staging, Path(run_dir), source)
        replaced = check_out(out, Path(run_dir), source, overwrite)  # again: the path may have changed meanwhile
        _move_into_place(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # gone already unless the export failed
    return Exported(out, replaced)


def check_out(out: Path, run_dir: Path, source: Path, overwrite: bool) -> str:
    """What exporting `source` (a checkpoint of `run_dir`) to `out` would replace, as `Exported.replaced`; raises
    ConfigError when the export may not go there."""
    target = out.resolve()
    # the checkpoint's entry comes last: when run_dir is the checkpoint directory itself, it is named as one
    protected_paths = {run_dir.resolve(): "the run directory", source.resolve(): "the checkpoint"}
    for protected, what in protected_paths.items():
        if target == protected or target in protected.parents:
            relation = "is" if target == protected else "contains"
            raise ConfigError(f"--out {out} {relation} {what} {protected}: exporting there would replace the run's "
                              "files; choose an --out outside the run directory")  # fmt: skip
    if source.resolve() in target.parents:
        raise ConfigError(f"--out {out} is inside the checkpoint {source}; choose an --out outside the checkpoint")
    if not (out.exists() or out.is_symlink()):
        return ""
    if not out.is_dir():
        raise ConfigError(f"--out {out} is a file; the export is a directory: choose another --out")
    entries = sorted(entry.name for entry in out.iterdir())
    if not entries:
        return ""
    written = _written_by_export(out)
    foreign = [name for name in entries if name not in written]
    if not foreign:
        return "the earlier export there"
    if overwrite:
        return "what was there (--overwrite)"
    raise ConfigError(
        f"--out {out} is a non-empty directory that is not an earlier export (it holds {', '.join(foreign[:3])}"
        f"{', ...' if len(foreign) > 3 else ''}); choose another --out, or pass --overwrite to replace that directory"
    )


def _written_by_export(directory: Path) -> set[str]:
    """The names an earlier export wrote into `directory`, its marker included; empty when it has no valid marker."""
    try:
        record = json.loads((directory / MARKER).read_text())
        return {MARKER, *record["files"]}
    except (OSError, ValueError, KeyError, TypeError):
        return set()


def _write_marker(staging: Path, run_dir: Path, source: Path) -> None:
    files = sorted(entry.name for entry in staging.iterdir())
    record = {"run_dir": str(run_dir.resolve()), "checkpoint": str(source.resolve()), "files": files}
    with atomic_open(staging / MARKER) as handle:
        json.dump(record, handle, indent=1)


def _new_sibling(path: Path, purpose: str) -> Path:
    """A new, empty directory beside `path` under a unique hidden name: mkdir refuses a name that already exists,
    so no other export's directory (a concurrent one, or one killed midway) is ever reused or removed."""
    sibling = path.with_name(f".{path.name}.{purpose}-{uuid.uuid4().hex[:12]}")
    sibling.mkdir()
    return sibling


def _move_into_place(staging: Path, out: Path) -> None:
    """Rename `staging` to `out`. A directory already at `out` is moved aside first and removed only after the new
    one is in place; if the rename fails it is put back, so `out` is never left with neither."""
    if not (out.exists() or out.is_symlink()):
        staging.rename(out)
        return
    aside = _new_sibling(out, "replaced")
    held = aside / out.name  # inside a directory made for it: the move cannot land on anything else
    out.rename(held)
    try:
        staging.rename(out)
    except BaseException:
        held.rename(out)
        aside.rmdir()
        raise
    shutil.rmtree(aside)

"""Output files appear whole or not at all: written aside, flushed, then renamed over the target."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

from dpo_scale.config import ConfigError


@contextmanager
def atomic_open(path: str | Path, mode: str = "w") -> Iterator[IO]:
    """Open a temporary file beside `path`; on success it replaces `path`, on error it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.partial-{os.getpid()}")
    try:
        with open(temporary, mode, encoding=None if "b" in mode else "utf-8") as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def check_output_path(path: str | Path, flag: str, directory: bool = False) -> None:
    """Refuse, before any work, an output that could not be written at the end: a file path that is a directory,
    a directory path that is a file, a parent that is a file, or a nearest existing folder that is not writable.
    `flag` names where the path came from (`--out`)."""
    path = Path(path)
    if directory and path.exists() and not path.is_dir():
        raise ConfigError(f"{flag} {path}: is a file, not a directory; give a directory for the outputs")
    if not directory and path.is_dir():
        raise ConfigError(f"{flag} {path}: is a directory; give a file path, e.g. {path / 'out.json'}")
    existing = next(folder for folder in ([path] if directory else []) + list(path.parents) if folder.exists())
    if not existing.is_dir():
        raise ConfigError(f"{flag} {path}: {existing} is a file, so nothing can be written under it")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"{flag} {path}: {existing} is not writable; choose another path")

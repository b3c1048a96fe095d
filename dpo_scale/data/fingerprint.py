"""What shaped a set of tokens, recorded so that a store of them is never read by a run it was not made for.

Shared by the token store and the reference cache. Local files are identified by content (sha256); a hub id by its
name. Hashing reads every byte once (about 1 GB/s), so a file whose name, size and modification time match what
a store recorded is taken to be the recorded one without reading it again: that keeps reopening a store of a
million pairs (a 2 GB JSONL file) flat in the data's size.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any


def sha256_file(path: Path) -> str:
    """Read through one reused 256 KiB buffer: a reader of a big store verifies it without allocating per block."""
    digest = hashlib.sha256()
    buffer = bytearray(1 << 18)
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as handle:
        while size := handle.readinto(buffer):
            digest.update(view[:size])
    return digest.hexdigest()


def files_digest(paths: list[Path]) -> str:
    """One digest of names, sizes and contents."""
    digest = hashlib.sha256()
    for path in sorted(paths):
        digest.update(f"{path.name}:{path.stat().st_size}:{sha256_file(path)}\n".encode())
    return digest.hexdigest()


def tokenizer_digest(tokenizer: Any) -> str:
    """The tokenizer's vocabulary, merges, normalisation and special tokens, and its chat template."""
    backend = tokenizer.backend_tokenizer.to_str() if hasattr(tokenizer, "backend_tokenizer") else repr(tokenizer)
    return hashlib.sha256(
        json.dumps([backend, tokenizer.chat_template, tokenizer.eos_token, tokenizer.bos_token]).encode()
    ).hexdigest()


def data_files(path: str) -> list[Path]:
    """The files a data path reads: itself, or every file under a directory."""
    local = Path(path)
    if local.is_dir():
        return sorted(p for p in local.rglob("*") if p.is_file())
    return [local] if local.exists() else []


def describe_files(paths: list[Path], root: Path, known: list[dict] | None = None) -> list[dict]:
    """`{name, bytes, mtime_ns, sha256}` per file, `name` relative to `root`. An entry of `known` with the same
    name, size and modification time lends its sha256 instead of a new read of the file."""
    recorded = {entry["name"]: entry for entry in known or []}
    entries = []
    for path in paths:
        stat = path.stat()
        name = str(path.relative_to(root)) if path != root else path.name
        entry = recorded.get(name)
        if not (entry and entry["bytes"] == stat.st_size and entry["mtime_ns"] == stat.st_mtime_ns):
            entry = {"name": name, "bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": sha256_file(path)}
        entries.append(entry)
    return entries

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


def tokenizer_digest(tokenizer: Any) -> str:
    """The tokenizer's vocabulary, merges, normalisation and special tokens (its chat template apart)."""
    backend = tokenizer.backend_tokenizer.to_str() if hasattr(tokenizer, "backend_tokenizer") else repr(tokenizer)
    return hashlib.sha256(json.dumps([backend, tokenizer.eos_token, tokenizer.bos_token]).encode()).hexdigest()


def chat_template_digest(tokenizer: Any) -> str | None:
    template = tokenizer.chat_template
    return hashlib.sha256(json.dumps(template).encode()).hexdigest() if template else None


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


def fingerprint_differences(stored: dict[str, Any], expected: dict[str, Any], holder: str) -> list[str]:
    """One line per fingerprint field that differs, naming both values: `data.max_length: cache 256, this run 200`;
    for fields that list files (`describe_files`), which file and how. `holder` names the stored side."""
    lines = []
    for key in sorted(set(stored) | set(expected)):
        old, new = stored.get(key), expected.get(key)
        if isinstance(old, list) and isinstance(new, list):
            lines += _file_differences(key, old, new, holder)
        elif old != new:
            lines.append(f"{key}: {holder} {_short(old)}, this run {_short(new)}")
    return lines


def _file_differences(key: str, stored: list[dict], expected: list[dict], holder: str) -> list[str]:
    before = {entry["name"]: entry for entry in stored}
    after = {entry["name"]: entry for entry in expected}
    what = f"{key.removesuffix('_files')} file"  # data file pairs.jsonl, reference_weights file config.json
    lines = []
    for name in sorted(set(before) | set(after)):
        old, new = before.get(name), after.get(name)
        if old is None or new is None:
            lines.append(f"{what} {name}: {f'not in the {holder}' if old is None else 'not in this run'}")
        elif old["sha256"] != new["sha256"]:
            lines.append(
                f"{what} {name}: its content differs ({holder} {old['bytes']:,} bytes, sha256 {old['sha256'][:12]}; "
                f"this run {new['bytes']:,} bytes, sha256 {new['sha256'][:12]})"
            )
    return lines


def _short(value: Any) -> str:
    """Lists of files summarised, sha256 digests cut to 12 characters, everything else as JSON."""
    if isinstance(value, list):
        return f"{len(value)} files"
    text = json.dumps(value) if not isinstance(value, str) else value
    return text[:12] if len(text) == 64 and all(c in "0123456789abcdef" for c in text) else text

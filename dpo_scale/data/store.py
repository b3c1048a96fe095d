"""The token store: prepared pairs on disk, tokenized once per dataset and settings, memory-mapped by every reader.

    cache_dir/
        build.json                what the shards in this directory are being built for (refuses mixing)
        shard-00000.tokens.npy    (T,) uint16 or int32: prompt | chosen | rejected ids of each kept pair, concatenated
        shard-00000.rows.npy      (rows, 10) int64, one line per input row (ROW_FIELDS): the kept pairs first, in
                                  input order, then the dropped rows with their reason
        shard-00000.filtered.npy  only with data.filters: the rows file with the filters' drops (filters.py)
        shard-00000.prompt-heads.npy  the prompt tokens truncation cut from each kept pair (prompt_heads.py)
        ...
        manifest.json             fingerprint, counts, and every file's size and sha256: written last
        last-used                 empty; touched whenever a process opens the store (for the listing)

Shard k holds input rows [k * shard_rows, (k + 1) * shard_rows), so the files depend only on the data and the
settings, never on how many processes built them or whether the build was interrupted. Each file appears only
whole (written aside, then renamed), `rows` after `tokens`: a shard whose rows file exists is complete. The manifest
makes the store visible; a directory without one is a build in progress (see build.py) and is never read.

Flat numpy arrays rather than Arrow: a reader needs two memory-mapped arrays per shard and an offset, nothing to
import beyond numpy, and no per-row Python objects (the decision's measurements are in BENCHMARKS.md). Opening a
store checks the fingerprint and every file's size: it reads no pair, so it costs the same at any size. Each shard's
checksum is verified when a process first reads from it (a few milliseconds a shard).
"""

from __future__ import annotations

import itertools
import json
import re
from pathlib import Path
from typing import Any

import numpy as np

from dpo_scale.config import ConfigError
from dpo_scale.data.fingerprint import sha256_file
from dpo_scale.data.pairs import DROP_REASONS, Dropped, DropReason, LazyPairs, Pair, summary_line
from dpo_scale.io import atomic_open

MANIFEST = "manifest.json"
BUILD_CLAIM = "build.json"
LAST_USED = "last-used"
ROW_FIELDS = ("index", "location", "reason", "start", "prompt", "chosen", "rejected", "prompt_cut", "chosen_cut",
              "rejected_cut")  # fmt: skip
"""index: position of the row in the input; location: the number in its source (`line 12`); reason: 0 for a kept
pair, else 1 + its position in DROP_REASONS; start: offset of its tokens in the shard; then the three lengths, and
the tokens truncation cut from each (for `data-report`)."""
KEPT = 0
STORE_FORMAT = 2
"""In every store's fingerprint, so a store written by code that laid its files out otherwise is never opened, and a
new one is built under its own name beside it. 2: the prompt heads file."""


SHARED_NAME = re.compile(r"[A-Za-z0-9._-]*-[0-9a-f]{16}")
"""How cache.store_name names a store: `<data name>-<16 hex digits of its data and settings>`."""


def is_shared(directory: str | Path) -> bool:
    """A store named for its data and settings (cache.py), which every run of them opens, whatever directory named
    it: it is never rebuilt for one run's sake, unlike a directory a user named with data.cache_dir."""
    return SHARED_NAME.fullmatch(Path(directory).name) is not None


def tokens_name(shard: int) -> str:
    return f"shard-{shard:05d}.tokens.npy"


def rows_name(shard: int) -> str:
    return f"shard-{shard:05d}.rows.npy"


def filtered_name(shard: int) -> str:
    return f"shard-{shard:05d}.filtered.npy"


def heads_name(shard: int) -> str:
    return f"shard-{shard:05d}.prompt-heads.npy"


def shard_done(directory: Path, shard: int) -> bool:
    return (directory / rows_name(shard)).exists()


def token_dtype(vocab_size: int) -> np.dtype:
    """Two bytes a token when every id fits (GPT-2's 50,257, Llama-2's 32,000), else four."""
    return np.dtype(np.uint16 if vocab_size <= 2**16 else np.int32)


def write_shard(
    directory: Path, shard: int, pairs: list[Pair], dropped: list[Dropped], cut: list[tuple[int, int, int]],
    dtype: np.dtype,
) -> None:
    """The shard's two files, each written aside and renamed; the rows file last, so it marks the shard complete.
    `cut`: the tokens truncation removed from each pair's prompt, chosen and rejected. Equal inputs give
    byte-identical files, whichever process writes them."""
    lengths = [[len(p.prompt_ids), len(p.chosen_ids), len(p.rejected_ids)] for p in pairs]
    lengths = np.array(lengths, np.int64).reshape(-1, 3)  # (pairs, 3), also when every row of the shard was dropped
    starts = np.concatenate([[0], np.cumsum(lengths.sum(axis=1))[:-1]]).astype(np.int64)
    sequences = (ids for p in pairs for ids in (p.prompt_ids, p.chosen_ids, p.rejected_ids))
    flat = list(itertools.chain.from_iterable(sequences))
    tokens = np.array(flat, dtype=dtype)  # an id beyond dtype raises OverflowError rather than wrapping
    rows = np.zeros((len(pairs) + len(dropped), len(ROW_FIELDS)), dtype=np.int64)
    rows[: len(pairs), 0] = [p.index for p in pairs]
    rows[: len(pairs), 1] = [_location(p.source) for p in pairs]
    rows[: len(pairs), 3] = starts
    rows[: len(pairs), 4:7] = lengths
    rows[: len(pairs), 7:] = np.array(cut, np.int64).reshape(-1, 3)
    rows[len(pairs) :, 0] = [d.index for d in dropped]
    rows[len(pairs) :, 1] = [_location(d.source) for d in dropped]
    rows[len(pairs) :, 2] = [1 + DROP_REASONS.index(d.reason) for d in dropped]
    for name, array in ((tokens_name(shard), tokens), (rows_name(shard), rows)):
        with atomic_open(directory / name, "wb") as handle:
            np.save(handle, array, allow_pickle=False)


def source_prefix(source: str) -> str:
    """`data.jsonl line 12` -> `data.jsonl line`: what every row of an input shares (sources.py), so the store
    keeps only the number of each."""
    return source.rpartition(" ")[0]


def _location(source: str) -> int:
    return int(source.rpartition(" ")[2])


def write_manifest(
    directory: Path, fingerprint: dict[str, Any], build: dict[str, Any], num_shards: int, rows_file=rows_name
) -> dict:
    """Counts and checksums of every shard, then the manifest that makes the store visible. Reads every shard once
    (the checksums); written by one process per job, and identical whoever writes it. `build` holds the settings
    of the build itself (shard_rows, token dtype, the sources' common prefix); `rows_file` names the rows file
    readers use (`filtered_name` when filters dropped pairs)."""
    shards = []
    for shard in range(num_shards):
        rows = np.load(directory / rows_file(shard), mmap_mode="r", allow_pickle=False)
        reasons = np.bincount(np.asarray(rows[:, 2]), minlength=1 + len(DROP_REASONS))
        shards.append({
            "rows": len(rows), "pairs": int(reasons[KEPT]),
            "dropped": {reason: int(n) for reason, n in zip(DROP_REASONS, reasons[1:])},
            "files": [_describe(directory / name) for name in (tokens_name(shard), rows_file(shard), heads_name(shard))],
        })  # fmt: skip
    manifest = {**build, "fingerprint": fingerprint, "shards": shards}
    with atomic_open(directory / MANIFEST) as handle:
        json.dump(manifest, handle, indent=1)
    return manifest


def _describe(path: Path) -> dict:
    return {"name": path.name, "bytes": path.stat().st_size, "sha256": sha256_file(path)}


def mark_used(directory: Path) -> None:
    """Touch the store's LAST_USED file, which the listing (`prepare-data --list`) reads. Best effort: a store on a
    read-only file system is still read."""
    try:
        (directory / LAST_USED).touch()
    except OSError:
        pass


def read_manifest(directory: Path) -> dict | None:
    path = directory / MANIFEST
    return json.loads(path.read_text()) if path.exists() else None


def current_manifest(directory: Path) -> dict | None:
    """The manifest of a complete store in this code's STORE_FORMAT, else None. A run resumed, or evaluated, after
    an upgrade that changed the layout finds its recorded store of an earlier format as if it were gone: the same
    data and settings then make a store of this format under its own name, with the same pairs in the same order."""
    manifest = read_manifest(directory)
    return manifest if manifest is not None and manifest["fingerprint"].get("store_format") == STORE_FORMAT else None


class TokenStore:
    """A complete store, opened for reading: `pairs` is a lazy sequence of every kept pair in input order."""

    def __init__(self, directory: str | Path, manifest: dict):
        self.directory = Path(directory)
        self.manifest = manifest
        shards = manifest["shards"]
        for entry in (file for shard in shards for file in shard["files"]):
            path = self.directory / entry["name"]
            if not path.exists() or path.stat().st_size != entry["bytes"]:
                problem = "is missing" if not path.exists() else "has changed size"
                raise ConfigError(self._damaged(entry["name"], problem))
        self._first_pair = np.cumsum([0] + [shard["pairs"] for shard in shards])  # (shards + 1,)
        self._open: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self.pairs = StoredPairs(self)

    def _damaged(self, name: str, problem: str) -> str:
        return (
            f"token store {self.directory}: {name} {problem} since the store was built (damaged, or changed by "
            f"hand). Fix: delete {self.directory} (the next command that needs it builds it again from the data), or "
            "add data.rebuild=true to the train, prepare-data or precompute-ref command that reads it"
        )

    def drop_counts(self) -> dict[DropReason, int]:
        counts = {r: sum(shard["dropped"][r] for shard in self.manifest["shards"]) for r in DROP_REASONS}
        return {reason: count for reason, count in counts.items() if count}

    def summary(self) -> str:
        return summary_line(len(self.pairs), self.drop_counts())

    def verify(self) -> None:
        """Every shard's checksum now, rather than at its first read."""
        for shard in range(len(self.manifest["shards"])):
            self._shard(shard)

    def _shard(self, shard: int) -> tuple[np.ndarray, np.ndarray]:
        """(tokens, rows) of a shard, memory-mapped; its checksums are verified the first time."""
        if shard not in self._open:
            self.verify_shard(shard)
            self._open[shard] = self.shard_arrays(shard)
        return self._open[shard]

    def verify_shard(self, shard: int) -> None:
        for entry in self.manifest["shards"][shard]["files"]:
            if sha256_file(self.directory / entry["name"]) != entry["sha256"]:
                raise ConfigError(self._damaged(entry["name"], "fails its checksum (damaged or changed)"))

    def shard_arrays(self, shard: int) -> tuple[np.ndarray, np.ndarray]:
        """(tokens, rows) of a shard, memory-mapped, unchecked and not kept open: for one pass over every shard,
        whose mapped pages are released with the arrays."""
        # allow_pickle=False: a store from elsewhere can hold only plain arrays, never code
        tokens, rows = self.manifest["shards"][shard]["files"][:2]  # then the prompt heads (prompt_heads.py)
        return tuple(  # type: ignore[return-value]
            np.load(self.directory / entry["name"], mmap_mode="r", allow_pickle=False) for entry in (tokens, rows)
        )

    def pair_lengths(self) -> np.ndarray:
        """(pairs, 3) prompt, chosen and rejected lengths of every kept pair, in order, from the rows files alone (a
        million pairs: 80 MB of rows read, no tokens)."""
        columns = [ROW_FIELDS.index(name) for name in ("prompt", "chosen", "rejected")]
        per_shard = [np.zeros((0, 3), np.int64)]
        for shard, entry in enumerate(self.manifest["shards"]):
            per_shard.append(np.asarray(self.shard_arrays(shard)[1][: entry["pairs"]])[:, columns])  # kept come first
        return np.concatenate(per_shard).astype(np.int64)

    def pair(self, position: int) -> Pair:
        """The kept pair at `position` (0 <= position < len(pairs)) in input order."""
        shard = int(np.searchsorted(self._first_pair, position, side="right")) - 1
        tokens, rows = self._shard(shard)
        index, location, _, start, prompt, chosen, rejected = (
            int(v) for v in rows[position - self._first_pair[shard], :7]
        )
        ids = tokens[start : start + prompt + chosen + rejected].tolist()
        return Pair(
            index=index,
            source=f"{self.manifest['source_prefix']} {location}",
            prompt_ids=ids[:prompt],
            chosen_ids=ids[prompt : prompt + chosen],
            rejected_ids=ids[prompt + chosen :],
        )

    @property
    def dropped(self) -> list[Dropped]:
        """Every dropped row, in input order: reads the rows of every shard that dropped any (for reports; training
        needs only `drop_counts`)."""
        found = []
        for shard, entry in enumerate(self.manifest["shards"]):
            if entry["rows"] > entry["pairs"]:
                for index, location, reason, *_ in self._shard(shard)[1][entry["pairs"] :].tolist():
                    source = f"{self.manifest['source_prefix']} {location}"
                    found.append(Dropped(index, source, DROP_REASONS[reason - 1]))
        return found


class StoredPairs(LazyPairs):
    """Every kept pair of a store, in input order, each read from disk when asked for."""

    def __init__(self, store: TokenStore):
        self._store = store

    def __len__(self) -> int:
        return int(self._store._first_pair[-1])

    def _read(self, position: int) -> Pair:
        return self._store.pair(position)

"""The reference log-prob cache: computed once, offline, read by any number of training runs of any world size.

    cache_dir/
        manifest.json             fingerprint of what made the values, one entry per file (count, sha256)
        shard-00000.safetensors   keys (n, 16) uint8; chosen, rejected, chosen_shared, rejected_shared (n,) fp32
        ...
        index-keys.npy            every key, sorted: (N,) 16-byte strings, binary-searched in place
        index-rows.npy            (N, 2) int32: the shard and row of each sorted key

Pairs go to shards in prepared (input) order, `shard_size` at a time, so the files depend only on the data and the
settings, never on how many ranks computed them or whether the job was interrupted. A shard appears only complete
(written aside, then renamed); the index and then the manifest are written last, after every shard exists.
Training memory-maps the index and the shards, so a reader holds neither keys nor values in memory: a lookup is a
binary search (log2 N page reads) and a row read per pair.

A pair's key is a hash of its token ids (after truncation); everything else that shaped the values (reference
weights, tokenizer and chat template, data files, format and truncation settings, dtype) is in the fingerprint, which
training compares field by field before it reads a value.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from dpo_scale import __version__
from dpo_scale.config import ConfigError, DataConfig, ModelConfig
from dpo_scale.data.build import store_fingerprint
from dpo_scale.data.fingerprint import describe_files, fingerprint_differences, sha256_file
from dpo_scale.data.pairs import Pair
from dpo_scale.io import atomic_open

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

KEY_BYTES = 16
KEY_DTYPE = np.dtype(f"S{KEY_BYTES}")  # compared as unsigned bytes, so np.searchsorted orders them
MANIFEST = "manifest.json"
INDEX_KEYS = "index-keys.npy"
INDEX_ROWS = "index-rows.npy"


def pair_key(pair: Pair) -> bytes:
    """128-bit hash of the pair's token ids; -1 separates the three lists, which cannot contain it."""
    ids = pair.prompt_ids + [-1] + pair.chosen_ids + [-1] + pair.rejected_ids
    return hashlib.sha256(torch.tensor(ids, dtype=torch.int64).numpy().tobytes()).digest()[:KEY_BYTES]


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.safetensors"


def fingerprint(
    model: ModelConfig, data: DataConfig, tokenizer: PreTrainedTokenizerBase, known: dict[str, Any] | None = None
) -> dict[str, Any]:
    """What the cached values depend on, one field per setting so that a refusal names the one that differs: the
    token store's fields (data files, tokenizer, chat template, shaping settings, version) plus the reference's
    weights (each file by name, size and content) and dtype. Files whose size and modification time match their
    record in `known` (a stored fingerprint) are not read again; a hub id stands for itself."""
    known = known or {}
    model_dir = Path(model.path)
    weights = sorted(model_dir.glob("*.safetensors")) + [model_dir / "config.json"] if model_dir.is_dir() else []
    return {
        **store_fingerprint(data, tokenizer, _file_records(known.get("data_files"))),
        "reference_weights": (
            describe_files(weights, model_dir, _file_records(known.get("reference_weights")))
            if weights else f"hub:{model.path}"
        ),
        "reference_dtype": model.dtype,
    }  # fmt: skip


def _file_records(value: Any) -> list[dict] | None:
    return value if isinstance(value, list) else None


def differences(stored: dict[str, Any], expected: dict[str, Any]) -> list[str]:
    """What differs between a cache's fingerprint and this run's, one line per field, naming both values."""
    if "dpo_scale_version" not in stored:
        return ["made by an older dpo_scale, which recorded one digest for all the data settings"]
    return fingerprint_differences(stored, expected, "cache")


# Per pair: the log-prob sums, and the sums over the tokens both completions have (LD-DPO's shared part, loss.py:
# length_desensitised). Caches written before the shared sums existed hold only the first two (manifest "fields").
FIELDS = ("chosen", "rejected", "chosen_shared", "rejected_shared")


def write_shard(directory: Path, index: int, pairs: list[Pair], values: dict[str, torch.Tensor]) -> None:
    """`values`: FIELDS -> (n,) tensors. Written aside, then renamed: a shard file exists only complete."""
    keys = torch.tensor([list(pair_key(p)) for p in pairs], dtype=torch.uint8).reshape(len(pairs), KEY_BYTES)
    final = directory / shard_name(index)
    partial = directory / f".{final.name}.partial"
    save_file({"keys": keys, **{name: values[name].float().contiguous() for name in FIELDS}}, partial)
    partial.rename(final)


def write_manifest(directory: Path, fingerprint_: dict[str, Any], num_shards: int, shard_size: int) -> None:
    """The sorted key index, then the manifest that makes the cache usable. Building the index holds every key in
    memory once (16 bytes + 8 per pair: 240 MB for 10M pairs), on one rank, at the end of the precompute."""
    shards, keys, rows = [], [], []
    for index in range(num_shards):
        path = directory / shard_name(index)
        with safe_open(path, framework="pt") as handle:
            shard_keys = handle.get_tensor("keys").numpy()
        keys.append(np.ascontiguousarray(shard_keys).view(KEY_DTYPE).reshape(-1))
        rows.append(np.stack([np.full(len(shard_keys), index), np.arange(len(shard_keys))], axis=1).astype(np.int32))
        shards.append({"name": path.name, "pairs": len(shard_keys), "sha256": sha256_file(path)})
    all_keys = np.concatenate(keys)
    order = np.argsort(all_keys, kind="stable")  # equal pairs share a key: the first in input order is found
    index_files = []
    for name, array in ((INDEX_KEYS, all_keys[order]), (INDEX_ROWS, np.concatenate(rows)[order])):
        with atomic_open(directory / name, "wb") as handle:
            np.save(handle, array, allow_pickle=False)
        index_files.append({"name": name, "sha256": sha256_file(directory / name)})
    manifest = {
        "version": __version__, "shard_size": shard_size, "fields": list(FIELDS), "fingerprint": fingerprint_,
        "shards": shards, "index": index_files,
    }  # fmt: skip
    with atomic_open(directory / MANIFEST) as handle:
        json.dump(manifest, handle, indent=2)


def read_manifest(directory: Path) -> dict[str, Any]:
    path = directory / MANIFEST
    if not path.exists():
        raise ConfigError(
            f"reference.cache_dir={directory}: no {MANIFEST} (the precompute did not finish, or this is not a cache); "
            "run `dpo-scale precompute-ref` with this config to complete it"
        )
    return json.loads(path.read_text())


def open_cache(
    directory: str | Path, model: ModelConfig, data: DataConfig, tokenizer: PreTrainedTokenizerBase
) -> CacheReader:
    """The cache in `directory`, refused unless it was made for this reference, data and settings (compared before
    any shard is read)."""
    directory = Path(directory)
    manifest = read_manifest(directory)
    stored = manifest["fingerprint"]
    different = differences(stored, fingerprint(model, data, tokenizer, known=stored))
    if different:
        raise ConfigError(
            f"reference.cache_dir={directory}: the cache was made for other weights, data or settings than this "
            f"run's ({'; '.join(different)}). Fix: recompute it with `dpo-scale precompute-ref` for this config, or "
            "point reference.cache_dir at the cache made for it"
        )
    return CacheReader(directory, manifest)


class CacheReader:
    """Reference log-probs by pair key, out of core: the sorted key index and the shards are memory-mapped, so
    opening a cache of any size costs its checksums (one read of every file) and a few file handles."""

    def __init__(self, directory: Path, manifest: dict[str, Any]):
        self.directory = directory
        self.fields = tuple(manifest.get("fields", FIELDS[:2]))
        for entry in manifest["shards"] + manifest["index"]:
            self._verify(entry)
        self._handles = [safe_open(self.directory / shard["name"], framework="pt") for shard in manifest["shards"]]
        # allow_pickle=False: a cache from elsewhere can hold only plain arrays, never code
        self._keys = np.load(self.directory / INDEX_KEYS, mmap_mode="r", allow_pickle=False)
        self._rows = np.load(self.directory / INDEX_ROWS, mmap_mode="r", allow_pickle=False)

    def _verify(self, entry: dict) -> None:
        path = self.directory / entry["name"]
        if not path.exists():
            raise ConfigError(f"reference.cache_dir={self.directory}: {entry['name']} is missing; recompute")
        if sha256_file(path) != entry["sha256"]:
            raise ConfigError(
                f"reference.cache_dir={self.directory}: {entry['name']} fails its checksum (changed or damaged "
                "since the precompute); delete it and run `dpo-scale precompute-ref` to rebuild it"
            )

    def __len__(self) -> int:
        return len(self._keys)

    def require(self, fields: tuple[str, ...], needed_by: str = "this run") -> None:
        missing = [name for name in fields if name not in self.fields]
        if missing:
            raise ConfigError(
                f"reference.cache_dir={self.directory} holds {', '.join(self.fields)} but not {', '.join(missing)}, "
                f"which {needed_by} needs (the cache was made by an older dpo_scale); recompute it with "
                "`dpo-scale precompute-ref`"
            )

    def in_order(self, name: str) -> np.ndarray:
        """(N,) float32: field `name` of every cached pair, in the prepared order the cache was written in."""
        self.require((name,))
        return np.concatenate([handle.get_tensor(name).numpy() for handle in self._handles])

    def keys_in_order(self, positions: np.ndarray) -> np.ndarray:
        """The keys of the cached pairs at `positions` of that order (KEY_DTYPE)."""
        sizes = np.cumsum([0] + [handle.get_slice("keys").get_shape()[0] for handle in self._handles])
        found = []
        for position in positions.tolist():
            shard = int(np.searchsorted(sizes, position, side="right")) - 1
            row = self._handles[shard].get_slice("keys")[position - sizes[shard] : position - sizes[shard] + 1]
            found.append(row.numpy().tobytes())
        return np.array(found, dtype=KEY_DTYPE)

    def lookup(self, pairs: list[Pair], fields: tuple[str, ...] = ("chosen", "rejected")) -> tuple[torch.Tensor, ...]:
        """One (B,) fp32 tensor per name in `fields` for `pairs`: by default the reference log-prob sums of chosen
        and rejected."""
        self.require(fields)
        wanted = np.array([pair_key(pair) for pair in pairs], dtype=KEY_DTYPE)
        positions = np.searchsorted(self._keys, wanted).clip(max=len(self._keys) - 1)
        columns: list[list[torch.Tensor]] = [[] for _ in fields]
        for pair, key, position in zip(pairs, wanted, positions):
            if self._keys[position] != key:
                raise ConfigError(
                    f"{pair.source}: this pair is not in the reference cache {self.directory} (its tokens differ "
                    "from every cached pair); recompute the cache for this data and settings"
                )
            shard, row = (int(v) for v in self._rows[position])
            for column, name in zip(columns, fields):
                column.append(self._handles[shard].get_slice(name)[row : row + 1])
        return tuple(torch.cat(column) for column in columns)

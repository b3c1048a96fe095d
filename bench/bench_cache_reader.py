"""The reference cache's reader at scale: open time, memory held, and lookups per second on a synthetic cache.

    python bench/bench_cache_reader.py --pairs 2000000      # 2M pairs in shards of 65536

The cache is written with the library's own writer (random token ids, random values), then opened in a fresh
process state: the resident memory the reader adds, anonymous (what it holds) and file-backed (mapped cache pages
it touched, which the kernel can drop at any time), and the time of lookups in random batches of 64 against the memory-mapped sorted key index.
"""

from __future__ import annotations

import argparse
import random
import tempfile
import time
from pathlib import Path

import torch

from dpo_scale.data.pairs import Pair
from dpo_scale.reference.cache import (
    FIELDS, INDEX_KEYS, INDEX_ROWS, CacheReader, read_manifest, write_manifest, write_shard,
)  # fmt: skip


def _pairs(start: int, count: int) -> list[Pair]:
    return [Pair(i, f"row {i}", [i % 50_000, i // 50_000], [7, i % 13], [9]) for i in range(start, start + count)]


def _rss_mib() -> dict[str, float]:
    status = Path("/proc/self/status").read_text()
    return {kind: int(status.split(f"{kind}:")[1].split()[0]) / 1024 for kind in ("RssAnon", "RssFile")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=2_000_000)
    parser.add_argument("--shard-size", type=int, default=65_536)
    parser.add_argument("--lookups", type=int, default=200)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as scratch:
        directory = Path(scratch)
        num_shards = -(-args.pairs // args.shard_size)
        start = time.perf_counter()
        for index in range(num_shards):
            first = index * args.shard_size
            count = min(args.shard_size, args.pairs - first)
            write_shard(directory, index, _pairs(first, count), {name: torch.randn(count) for name in FIELDS})
        write_manifest(directory, {}, num_shards, args.shard_size)
        written_s = time.perf_counter() - start
        total_bytes = sum(p.stat().st_size for p in directory.iterdir())
        index_bytes = sum((directory / name).stat().st_size for name in (INDEX_KEYS, INDEX_ROWS))

        before = _rss_mib()
        start = time.perf_counter()
        reader = CacheReader(directory, read_manifest(directory))
        open_s = time.perf_counter() - start
        rng = random.Random(0)
        batches = [_pairs(rng.randrange(args.pairs - 64), 64) for _ in range(args.lookups)]
        start = time.perf_counter()
        for batch in batches:
            reader.lookup(batch)
        lookup_s = time.perf_counter() - start
        after = _rss_mib()

    print(f"{args.pairs:,} pairs in {num_shards} shards; written (shards + index) in {written_s:.1f} s\n")
    print("| quantity | value |\n|---|---|")
    print(f"| cache on disk | {total_bytes / 2**20:.1f} MiB ({total_bytes / args.pairs:.1f} B/pair) |")
    print(f"| of which the sorted key index | {index_bytes / 2**20:.1f} MiB |")
    print(f"| open (checksum every file, map the index) | {open_s:.2f} s |")
    for kind, what in (("RssAnon", "anonymous"), ("RssFile", "file-backed (mapped pages touched)")):
        print(f"| resident memory added by open + lookups, {what} | {after[kind] - before[kind]:.1f} MiB |")
    print(f"| lookups, batches of 64 | {args.lookups * 64 / lookup_s:,.0f} pairs/s |")


if __name__ == "__main__":
    main()

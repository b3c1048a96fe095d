"""`dpo-scale data-report`'s pass over a built token store against the same statistics from `datasets`, at 100k and
1M pairs: wall time and peak RSS of each whole process under `/usr/bin/time -v`.

    python bench/bench_data_report.py --sizes 100000 1000000 --dir /tmp/bench_report

Data: synthetic, already tokenized (the store is built before the measured step, as the issue states): per pair
random GPT-2-range ids (uint16), prompt 20-400 tokens, completions 5-200, 1% of the pairs exact copies of an
earlier pair. The same ids are written once as store shards (8,192 pairs each, the store's own file layout and
manifest) and once as a Parquet file of three int32 list columns (prompt_ids, chosen_ids, rejected_ids).

- report: a fresh process opens the store and runs `report_store` (every shard's checksum, the streaming pass, the
  statistics, report.json / report.md / the two PNGs); no eval file, no reference cache.
- datasets: a fresh process with an empty HF_DATASETS_CACHE: `load_dataset("parquet")`, then one batched `map`
  (default batch size, one process) returning each pair's three lengths and a 64-bit hash of its ids
  (Python's hash of the three tuples), then the same length percentiles and the duplicate count with numpy over the
  mapped columns. It computes less than the report (no n-grams, no shared prompts or contradictions, no figures).
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

SHARD = 8192


def generate(directory: Path, pairs: int, seed: int = 0) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from dpo_scale.data.store import tokens_name, rows_name, write_manifest
    from dpo_scale.io import atomic_open

    rng = np.random.default_rng(seed)
    store = directory / "store"
    store.mkdir(parents=True, exist_ok=True)
    writer = None
    for shard, first in enumerate(range(0, pairs, SHARD)):
        count = min(SHARD, pairs - first)
        lengths = np.stack([rng.integers(20, 401, count), rng.integers(5, 201, count), rng.integers(5, 201, count)], 1)
        tokens = rng.integers(3, 50_257, int(lengths.sum())).astype(np.uint16)
        starts = np.r_[0, np.cumsum(lengths.sum(1))[:-1]]
        copies = np.flatnonzero(rng.random(count) < 0.01)
        copies = copies[copies > 0]
        sources = rng.integers(0, copies, len(copies)) if len(copies) else copies
        lengths[copies], starts[copies] = lengths[sources], starts[sources]  # a copy points at the same tokens
        rows = np.zeros((count, 10), np.int64)
        rows[:, 0] = np.arange(first, first + count)
        rows[:, 1] = rows[:, 0] + 1
        rows[:, 3], rows[:, 4:7] = starts, lengths
        for name, array in ((tokens_name(shard), tokens), (rows_name(shard), rows)):
            with atomic_open(store / name, "wb") as handle:
                np.save(handle, array, allow_pickle=False)
        columns = {}
        for side in range(3):
            begin = starts + lengths[:, :side].sum(1)
            index = np.concatenate([np.arange(b, b + n) for b, n in zip(begin, lengths[:, side])])
            offsets = np.r_[0, np.cumsum(lengths[:, side])].astype(np.int32)
            columns[("prompt_ids", "chosen_ids", "rejected_ids")[side]] = pa.ListArray.from_arrays(
                offsets, pa.array(tokens[index].astype(np.int32))
            )
        table = pa.table(columns)
        writer = writer or pq.ParquetWriter(directory / "pairs.parquet", table.schema)
        writer.write_table(table)
    writer.close()
    build = {"shard_rows": SHARD, "token_dtype": "uint16", "source_prefix": "synthetic line"}
    write_manifest(store, {"synthetic": pairs}, build, -(-pairs // SHARD))


def child_report(directory: Path) -> None:
    from dpo_scale.commands.data_report import report_store
    from dpo_scale.data.store import TokenStore, read_manifest

    store = TokenStore(directory / "store", read_manifest(directory / "store"))
    report = report_store(store, directory / "report", "synthetic")
    print(json.dumps({"pairs": report["data"]["pairs"], "duplicates": report["duplicates"]["duplicates"]["pairs"],
                      "prompt_p50": report["lengths"]["prompt"]["p50"]}))  # fmt: skip


def child_datasets(directory: Path) -> None:
    from datasets import load_dataset

    data = load_dataset("parquet", data_files=str(directory / "pairs.parquet"), split="train")

    def stats(batch):
        triples = zip(batch["prompt_ids"], batch["chosen_ids"], batch["rejected_ids"])
        out = {"prompt": [], "chosen": [], "rejected": [], "hash": []}
        for prompt, chosen, rejected in triples:
            out["prompt"].append(len(prompt))
            out["chosen"].append(len(chosen))
            out["rejected"].append(len(rejected))
            out["hash"].append(hash((tuple(prompt), tuple(chosen), tuple(rejected))))
        return out

    mapped = data.map(stats, batched=True, remove_columns=data.column_names)
    lengths = {side: np.asarray(mapped[side]) for side in ("prompt", "chosen", "rejected")}
    percentiles = {side: np.percentile(v, [50, 90, 99]).tolist() + [int(v.max())] for side, v in lengths.items()}
    hashes = np.asarray(mapped["hash"])
    duplicates = len(hashes) - len(np.unique(hashes))
    print(json.dumps({"pairs": len(hashes), "duplicates": duplicates, "prompt_p50": percentiles["prompt"][0]}))


def measure(name: str, directory: Path, env: dict) -> dict:
    command = ["/usr/bin/time", "-v", sys.executable, __file__, "--child", name, str(directory)]
    done = subprocess.run(command, capture_output=True, text=True, env=env, check=True)
    wall = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): (\S+)", done.stderr).group(1)
    seconds = sum(float(part) * 60**i for i, part in enumerate(reversed(wall.split(":"))))
    rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", done.stderr).group(1)) / 1024
    return {"step": name, "wall_s": round(seconds, 1), "peak_rss_mib": round(rss), **json.loads(done.stdout.splitlines()[-1])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--dir", default="/tmp/bench_report")
    args = parser.parse_args()
    if args.child:
        {"report": child_report, "datasets": child_datasets}[args.child[0]](Path(args.child[1]))
        return
    import os
    import shutil

    for size in args.sizes:
        directory = Path(args.dir) / str(size)
        if not (directory / "store" / "manifest.json").exists():
            started = time.perf_counter()
            generate(directory, size)
            print(f"{size:,} pairs generated in {time.perf_counter() - started:.0f} s", flush=True)
        for name in ("report", "datasets"):
            cache = directory / "hf-cache"
            shutil.rmtree(cache, ignore_errors=True)
            env = {**os.environ, "HF_DATASETS_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
            print(json.dumps({"pairs": size, **measure(name, directory, env)}), flush=True)


if __name__ == "__main__":
    main()

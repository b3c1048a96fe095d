"""Reference precompute throughput against a bare no-grad forward over the same batches, and cache bytes per pair.

    python bench/bench_precompute.py            # stories260K on 512 HH-RLHF helpful-base pairs, max_length 256

"Precompute" is what precompute-ref does per batch: collate, the log-prob stage (prefix-shared, streaming head),
and writing the values to a shard. "Bare forward" is the model's own forward (full logits) on the very same input
tensors, with nothing else: the floor any reference pass pays.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from dpo_scale.config import DataConfig, LogpsConfig
from dpo_scale.data import load_tokenizer, prepare
from dpo_scale.model.layout import collate
from dpo_scale.model.wrapper import PairLogpsModel
from dpo_scale.reference.cache import FIELDS, INDEX_KEYS, INDEX_ROWS, write_manifest, write_shard

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(SHARED / "models/stories260K"))
    parser.add_argument("--data", default=str(SHARED / "preferences/hh-rlhf/helpful-base/test.jsonl.gz"))
    parser.add_argument("--pairs", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-length", type=int, default=256)
    args = parser.parse_args()

    tokenizer = load_tokenizer(args.model)
    pairs = prepare(DataConfig(args.data, max_length=args.max_length), tokenizer).pairs[: args.pairs]
    model = AutoModelForCausalLM.from_pretrained(args.model).eval()
    config = LogpsConfig()
    scorer = PairLogpsModel(model, config)
    batches = [pairs[i : i + args.batch_size] for i in range(0, len(pairs), args.batch_size)]
    inputs = [collate(b, config, tokenizer.eos_token_id) for b in batches]

    def bare() -> None:
        for batch in inputs:
            mask = scorer._attention_mask(batch)
            model(input_ids=batch.input_ids, attention_mask=mask, position_ids=batch.position_ids, use_cache=False)

    def precompute(directory: Path) -> None:
        outs = [scorer(collate(batch_pairs, config, tokenizer.eos_token_id)) for batch_pairs in batches]
        values = {name: torch.cat([getattr(out, f"{name}_logps") for out in outs]) for name in FIELDS}
        write_shard(directory, 0, pairs, values)

    with torch.no_grad(), tempfile.TemporaryDirectory() as scratch:
        bare()
        times = {"bare": [], "precompute": []}
        for _ in range(3):
            start = time.perf_counter()
            bare()
            times["bare"].append(time.perf_counter() - start)
            start = time.perf_counter()
            precompute(Path(scratch))
            times["precompute"].append(time.perf_counter() - start)
        shard_bytes = (Path(scratch) / "shard-00000.safetensors").stat().st_size
        write_manifest(Path(scratch), {}, num_shards=1, shard_size=len(pairs))  # once per cache, not timed
        index_bytes = sum((Path(scratch) / name).stat().st_size for name in (INDEX_KEYS, INDEX_ROWS))
    bare_s, pre_s = min(times["bare"]), min(times["precompute"])
    print(f"{len(pairs)} pairs, batches of {args.batch_size}, max_length {args.max_length}, best of 3\n")
    print("| pass | seconds | pairs/s |\n|---|---|---|")
    print(f"| bare no-grad forward | {bare_s:.3f} | {len(pairs) / bare_s:.0f} |")
    print(f"| precompute (collate + log-probs + shard write) | {pre_s:.3f} | {len(pairs) / pre_s:.0f} |")
    print(f"\nprecompute throughput / bare forward: {bare_s / pre_s:.2f}x")
    print(f"cache bytes per pair: shard {shard_bytes / len(pairs):.1f} + sorted key index {index_bytes / len(pairs):.1f}")


if __name__ == "__main__":
    main()

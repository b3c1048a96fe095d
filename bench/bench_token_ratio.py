"""Tokens the model computes per unique token, by layout, on HH-RLHF helpful-base with GPT-2's tokenizer.

    python bench/bench_token_ratio.py                      # batch of 8 pairs, no truncation
    python bench/bench_token_ratio.py --batch-size 32 --max-length 1024

Unique tokens are prompt + chosen + rejected per pair: the least any layout must compute. "computed" counts every
position of every row, padding included; "non-padding" counts the positions holding a token. Counted, not timed:
the same on any machine.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from dpo_scale.config import DataConfig, LogpsConfig
from dpo_scale.data import load_tokenizer, prepare
from dpo_scale.model.layout import collate

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
LAYOUTS = {
    "plain padded [chosen; rejected]": LogpsConfig(prefix_sharing=False, packing=False),
    "packed (padding-free)": LogpsConfig(prefix_sharing=False, packing=True),
    "prefix-shared": LogpsConfig(prefix_sharing=True, packing=False),
    "prefix-shared + packed": LogpsConfig(prefix_sharing=True, packing=True),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(SHARED / "preferences/hh-rlhf/helpful-base/test.jsonl.gz"))
    parser.add_argument("--tokenizer", default=str(SHARED / "tokenizers/gpt2/tokenizer.json"))
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=None)
    args = parser.parse_args()

    tokenizer = load_tokenizer(args.tokenizer)
    if tokenizer.eos_token is None:  # GPT-2's bare tokenizer.json names no EOS; its end-of-text token is it
        tokenizer.eos_token = "<|endoftext|>"
    data = prepare(DataConfig(args.data, max_length=args.max_length), tokenizer)
    print(f"{args.data}: {data.summary()}; batches of {args.batch_size} pairs, max_length {args.max_length}\n")
    print("| layout | computed / unique | non-padding / unique |")
    print("|---|---|---|")
    for name, config in LAYOUTS.items():
        computed = real = unique = 0
        for start in range(0, len(data.pairs), args.batch_size):
            batch = collate(data.pairs[start : start + args.batch_size], config, pad_token_id=0)
            computed += batch.tokens
            real += batch.real_tokens
            unique += batch.unique_tokens
        print(f"| {name} | {computed / unique:.2f} | {real / unique:.2f} |")


if __name__ == "__main__":
    main()

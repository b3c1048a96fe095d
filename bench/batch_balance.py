"""The straggler ratio of fixed-count and token-budget micro-batches on real length distributions (issue 29).

    python bench/batch_balance.py --out /tmp/batch_balance.md   # ~3 minutes on this project's 2-core CPU machine
    python bench/batch_balance.py --pairs 4096 --replicas 64     # a quick look

Simulated, not timed: the planners of dpo_scale/training/batch_plan.py split each optimizer step's pairs (drawn by
the training sampler) and `StepPlan.balance` gives the straggler ratio: the sum over accumulation rounds of the most
loaded replica's cost over the mean replica's (1.00: no replica waits). No model runs, so any machine gives the same
numbers.

Distributions, (prompt, chosen, rejected) token lengths as `dpo_scale.data.prepare` tokenizes them (no truncation,
one EOS after each completion, pairs without signal dropped), prefix-shared packed layout (LogpsConfig()):
- HH-RLHF: the four test splits together, GPT-2's tokenizer.
- LLaMA-Factory: dpo_en_demo.json and dpo_zh_demo.json together (ShareGPT, read by the sharegpt format), Phi-3-mini's
  tokenizer: the demo files name no model, and Phi-3's is the tokenizer with a chat template we have, so the
  conversations are laid out as a chat model sees them. Their 600 pairs are tiled until a step's draw fits (a step
  of 4,096 pairs draws the 600 pairs' lengths about 7 times each): the length distribution, not the pairs, is studied.

Cost: `CostModel.for_model` of Llama-3-8B's shape (hidden 4,096, intermediate 14,336, 32 layers, vocabulary 128,256:
positions plus the attention term, ATTENTION_EFFICIENCY included); the token-only columns
plan and measure with CostModel(0.0) (cost = positions). Token budgets are N mean pairs' positions rounded up to a
multiple of 256, never below the longest pair's. Steps beyond an epoch draw the next epochs (the sampler reseeds per
epoch), so short data gives as many steps as asked. Each setting plans `--pairs` pairs' worth of steps (default
25,600: 50 steps of 512 pairs, 6 of 4,096; a step of 4,096 varies little from the next, and planning it at 8 replicas
takes up to half a second); the token-only columns plan the same steps again.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from transformers import LlamaConfig

from dpo_scale.config import DataConfig, LogpsConfig
from dpo_scale.data import load_tokenizer, prepare
from dpo_scale.model.layout import layout_positions
from dpo_scale.training.batch_plan import CostModel, FixedCount, TokenBudget
from dpo_scale.training.sampler import StepSampler

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
HH_SPLITS = ("harmless-base", "helpful-base", "helpful-online", "helpful-rejection-sampled")
LLAMA_FACTORY_FILES = ("dpo_en_demo.json", "dpo_zh_demo.json")
LLAMA_3_8B = {"hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32, "vocab_size": 128256}
LAYOUT = LogpsConfig()
TARGET, TARGET_REPLICAS = 1.10, (64, 512)
# The issue's HH-RLHF figures (p50, p90, p99, max of prompt + chosen + rejected tokens over 8,552 rows).
ISSUE_HH_FIGURES = (250, 562, 1088, 2221)


@dataclass(frozen=True)
class Distribution:
    name: str
    lengths: np.ndarray  # (n, 3) prompt, chosen, rejected tokens
    positions: np.ndarray  # (n,) positions each pair computes on its own in LAYOUT


def distribution(name: str, lengths: np.ndarray) -> Distribution:
    alone = [layout_positions([tuple(row)], LAYOUT) for row in lengths.tolist()]
    return Distribution(name, lengths, np.array(alone))


def hh_rlhf(tokenizer_dir: Path, data_dir: Path) -> Distribution:
    tokenizer = load_tokenizer(str(tokenizer_dir))
    if tokenizer.eos_token is None:  # GPT-2's bare tokenizer names no EOS; its end-of-text token is it
        tokenizer.eos_token = "<|endoftext|>"
    parts = [prepare(DataConfig(str(data_dir / split / "test.jsonl.gz")), tokenizer) for split in HH_SPLITS]
    dropped = sum(len(part.dropped) for part in parts)
    name = f"HH-RLHF, 4 test splits, GPT-2 tokenizer ({sum(len(p.pairs) for p in parts):,} pairs; {dropped} dropped)"
    return distribution(name, np.concatenate([part.pair_lengths() for part in parts]))


def llama_factory(tokenizer_dir: Path, data_dir: Path) -> Distribution:
    tokenizer = load_tokenizer(str(tokenizer_dir))
    tokenizer.model_max_length = 1 << 30  # no truncation here: silence the "longer than 4096 tokens" warning
    parts = [prepare(DataConfig(str(data_dir / name)), tokenizer) for name in LLAMA_FACTORY_FILES]
    name = f"LLaMA-Factory dpo_en_demo + dpo_zh_demo, Phi-3-mini tokenizer ({sum(len(p.pairs) for p in parts)} pairs)"
    return distribution(name, np.concatenate([part.pair_lengths() for part in parts]))


def length_summary(data: Distribution) -> str:
    total = data.lengths.sum(axis=1)
    p50, p90, p99 = np.percentile(total, [50, 90, 99])
    return (f"prompt+chosen+rejected tokens: p50 {p50:,.0f}, p90 {p90:,.0f}, p99 {p99:,.0f}, max {total.max():,}, "
            f"mean {total.mean():,.1f}")  # fmt: skip


@dataclass(frozen=True)
class Split:
    """How a step's pairs become micro-batches: `size` pairs each (fixed), or a budget of `size` positions."""

    label: str
    size: int
    budget: bool

    def planner(self, lengths: np.ndarray, replicas: int, cost_model: CostModel) -> FixedCount | TokenBudget:
        if self.budget:
            return TokenBudget(lengths, self.size, replicas, LAYOUT, 1, 1, cost_model)
        return FixedCount(lengths, self.size, replicas, LAYOUT, cost_model)


def splits(data: Distribution, mean_pairs: list[int]) -> list[Split]:
    """Fixed 1 and 4 pairs, then a budget of each `mean_pairs` count of mean pairs' positions, rounded up to a
    multiple of 256 and never below the longest pair's (counts the floor merges share one budget)."""
    mean = data.positions.mean()
    floor = -(-int(data.positions.max()) // 256) * 256
    asked: dict[int, list[int]] = {}
    for count in mean_pairs:
        asked.setdefault(max(floor, -(-int(np.ceil(count * mean)) // 256) * 256), []).append(count)
    fixed = [Split(f"fixed {size} pair{'s' if size > 1 else ''}", size, False) for size in (1, 4)]
    return fixed + [
        Split(f"budget {budget:,} ({budget / mean:.1f} mean pairs; asked {'/'.join(map(str, counts))})", budget, True)
        for budget, counts in asked.items()
    ]


def step_batches(num_pairs: int, global_batch: int, steps: int, seed: int) -> list[list[int]]:
    sampler = StepSampler(num_pairs, global_batch, seed)
    return [sampler.step_pairs(step) for step in range(steps)]


def measure(planner: FixedCount | TokenBudget, batches: list[list[int]]) -> tuple[np.ndarray, float]:
    """The straggler ratio of each step, and the mean micro-batches per replica per step."""
    plans = [planner.split(batch) for batch in batches]
    return np.array([plan.balance for plan in plans]), float(np.mean([plan.rounds for plan in plans]))


def table(data: Distribution, args: argparse.Namespace) -> tuple[str, list[str]]:
    """A markdown table of every (global batch, replicas, split), and the target rows that miss the target."""
    lines = [
        "| global batch | replicas | split | micro-batches / replica (mean) | pairs / micro-batch (mean) "
        "| ratio p50 | ratio p90 | token-only p50 | token-only p90 | target |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    misses = []
    cost_model = CostModel.for_model(LlamaConfig(**LLAMA_3_8B))
    for global_batch in args.global_batch:
        copies = -(-global_batch // len(data.lengths))  # tile short data so one step's draw fits
        lengths = np.tile(data.lengths, (copies, 1))
        batches = step_batches(len(lengths), global_batch, max(1, args.pairs // global_batch), args.seed)
        for replicas in args.replicas:
            for split in splits(data, args.mean_pairs):
                setting = f"| {global_batch:,} | {replicas} | {split.label} |"
                if not split.budget and global_batch % (split.size * replicas):
                    lines.append(f"{setting} n/a (not divisible) | | | | | | |")
                    continue
                ratios, rounds = measure(split.planner(lengths, replicas, cost_model), batches)
                tokens, _ = measure(split.planner(lengths, replicas, CostModel(0.0)), batches)
                p50, p90 = np.percentile(ratios, [50, 90])
                verdict = ""
                if split.budget and replicas in TARGET_REPLICAS and split.size >= 4 * data.positions.mean():
                    verdict = "met" if p90 <= TARGET else "missed"
                if verdict == "missed":
                    misses.append(f"{global_batch:,} pairs, {replicas} replicas, {split.label}: p90 {p90:.3f}")
                lines.append(
                    f"{setting} {rounds:.2f} | {global_batch / replicas / rounds:.2f} | {p50:.3f} | {p90:.3f} "
                    f"| {np.percentile(tokens, 50):.3f} | {np.percentile(tokens, 90):.3f} | {verdict} |"
                )
    return "\n".join(lines), misses


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hh-dir", type=Path, default=SHARED / "preferences/hh-rlhf", help="HH-RLHF split folders")
    parser.add_argument("--llama-factory-dir", type=Path, default=SHARED / "preferences/llama-factory")
    parser.add_argument("--gpt2", type=Path, default=SHARED / "tokenizers/gpt2", help="tokenizer for HH-RLHF")
    parser.add_argument("--phi3", type=Path, default=SHARED / "tokenizers/phi-3-mini", help="LLaMA-Factory's tokenizer")
    parser.add_argument("--replicas", type=int, nargs="+", default=[8, 64, 512])
    parser.add_argument("--global-batch", type=int, nargs="+", default=[512, 4096], help="pairs per optimizer step")
    parser.add_argument("--mean-pairs", type=int, nargs="+", default=[4, 8, 16],
                        help="token budgets, each as many mean pairs' positions")  # fmt: skip
    parser.add_argument("--pairs", type=int, default=25_600, help="pairs planned per setting, in whole steps")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, help="also write the tables here (markdown)")
    args = parser.parse_args()

    steps = ", ".join(f"{max(1, args.pairs // batch)} of {batch:,} pairs" for batch in args.global_batch)
    header = (
        f"Cost model: CostModel.for_model of Llama-3-8B's shape; token-only: CostModel(0.0). Steps per "
        f"setting: {steps}; seed {args.seed}. Target: straggler ratio p90 <= {TARGET:.2f} at "
        f"{' and '.join(map(str, TARGET_REPLICAS))} replicas, token budgets of at least 4 mean pairs."
    )
    print(header + "\n", flush=True)
    sections = [header]
    hh = hh_rlhf(args.gpt2, args.hh_dir)
    without_eos = hh.lengths.sum(axis=1) - 2
    issue = ", ".join(f"{x:,}" for x in ISSUE_HH_FIGURES)
    hh_note = (f"{length_summary(hh)}. Without the 2 EOS tokens our tokenization adds: p50/p90/p99/max "
               f"{', '.join(f'{x:,.0f}' for x in np.percentile(without_eos, [50, 90, 99]))}, {without_eos.max():,} "
               f"(the issue's: {issue}, over all 8,552 rows).")  # fmt: skip
    for data, note in ((hh, hh_note), (llama_factory(args.phi3, args.llama_factory_dir), None)):
        rows, misses = table(data, args)
        verdict = "\n".join(["Target missed by:", *(f"- {miss}" for miss in misses)]) if misses else (
            "Target met in every target row.")  # fmt: skip
        section = f"### {data.name}\n\n{note or length_summary(data) + '.'}\n\n{rows}\n\n{verdict}"
        print(section + "\n", flush=True)
        sections.append(section)
    if args.out:
        temporary = args.out.with_name(args.out.name + ".tmp")
        temporary.write_text("\n\n".join(sections) + "\n")
        os.replace(temporary, args.out)


if __name__ == "__main__":
    main()

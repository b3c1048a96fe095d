"""Where activation checkpointing's time goes: forward and backward of one DPO micro-batch, timed by phase, with and
without per-layer checkpointing, through dpo_scale's path and through a plain full-logits path (the way TRL scores).

    python bench/bench_checkpointing_cost.py                     # llama117m, 4 pairs, HH-RLHF-like lengths
    python bench/bench_checkpointing_cost.py --model llama16m --repeats 5

One process, no DeepSpeed, fp32, a model from bench_vs_trl's shapes (GPT-2's 50,257-token vocabulary, tied) with
random weights; random pairs with prompt 160, chosen 110 and rejected 90 tokens (about the median HH-RLHF helpful
pair under GPT-2's tokenizer). Each side runs `--repeats` forward+backward passes after one warm-up; the table gives
the median seconds of each phase. The question it answers (issue 23): how much of a step the recompute is, on each
path, and so why the same checkpointing costs a different share of each side's step.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

from bench_vs_trl import LLAMA_SIZES  # noqa: E402

from dpo_scale.config import LogpsConfig  # noqa: E402
from dpo_scale.data.pairs import Pair  # noqa: E402
from dpo_scale.model.layout import collate  # noqa: E402
from dpo_scale.model.wrapper import PairLogpsModel, enable_activation_checkpointing  # noqa: E402

VOCAB = 50_257


def build(model_name: str):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, tie_word_embeddings=True, max_position_embeddings=1024,
                         **LLAMA_SIZES[model_name])  # fmt: skip
    return LlamaForCausalLM(config).train()


def pairs(count: int) -> list[Pair]:
    rng = random.Random(0)

    def ids(n: int) -> list[int]:
        return [rng.randrange(3, VOCAB) for _ in range(n)]

    return [Pair(i, f"pair {i}", ids(160), ids(110), ids(90)) for i in range(count)]


def ours(model, batch_pairs):
    module = PairLogpsModel(model, LogpsConfig())
    batch = collate(batch_pairs, module.config, 0)

    def forward():
        out = module(batch)
        return (out.chosen_logps - out.rejected_logps).sum()

    return forward


def full_logits(model, batch_pairs):
    """TRL's way: [prompt + chosen; prompt + rejected] rows right-padded, logits over every position, log_softmax."""
    layout = LogpsConfig(prefix_sharing=False, packing=False)
    batch = collate(batch_pairs, layout, 0)
    mask = (batch.unit_ids >= 0).long()

    def forward():
        logits = model(input_ids=batch.input_ids, attention_mask=mask, use_cache=False).logits  # (R, T, V)
        logps = torch.log_softmax(logits.float(), dim=-1)[batch.score_rows, batch.score_cols]
        picked = logps.gather(1, batch.score_labels[:, None]).squeeze(1)
        slots = torch.zeros(2 * batch.num_pairs).index_add(0, batch.score_slots, picked)
        return (slots[: batch.num_pairs] - slots[batch.num_pairs :]).sum()

    return forward


def timed(forward, repeats: int) -> tuple[float, float]:
    """Median (forward s, backward s) over `repeats` passes after one warm-up."""
    times = []
    for attempt in range(repeats + 1):
        started = time.perf_counter()
        loss = forward()
        middle = time.perf_counter()
        loss.backward()
        ended = time.perf_counter()
        if attempt:
            times.append((middle - started, ended - middle))
    return statistics.median(t[0] for t in times), statistics.median(t[1] for t in times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=list(LLAMA_SIZES), default="llama117m")
    parser.add_argument("--pairs", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    batch_pairs = pairs(args.pairs)
    rows = []
    for path_name, make in (("dpo_scale", ours), ("full_logits", full_logits)):
        for checkpointing in (False, True):
            model = build(args.model)
            if checkpointing:
                enable_activation_checkpointing(model)
            forward_s, backward_s = timed(make(model, batch_pairs), args.repeats)
            rows.append((path_name, checkpointing, forward_s, backward_s))
            print(f"{path_name} checkpointing={checkpointing}: forward {forward_s:.2f} s, backward {backward_s:.2f} s",
                  file=sys.stderr, flush=True)  # fmt: skip
    print(f"{args.model}, {args.pairs} pairs (prompt 160, chosen 110, rejected 90 tokens), fp32, one process, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads; median of {args.repeats}\n")
    print("| path | checkpointing | forward s | backward s | step s | step vs no checkpointing |")
    print("|---|---|---|---|---|---|")
    base = {}
    for path_name, checkpointing, forward_s, backward_s in rows:
        step = forward_s + backward_s
        base.setdefault(path_name, step)
        print(f"| {path_name} | {'on' if checkpointing else 'off'} | {forward_s:.2f} | {backward_s:.2f} | {step:.2f} | "
              f"{step / base[path_name]:.2f}x |")


if __name__ == "__main__":
    main()

"""Loss-stage peak memory and time: streaming LM-head log-probs vs full logits, on CPU.

    python bench/bench_logps_memory.py                       # vocab 32,000, batch 8 x 1,024 tokens, hidden 2,048
    python bench/bench_logps_memory.py --hidden 4096 --chunk-size 256
    python bench/bench_logps_memory.py --growth                # seq 512 -> 4,096 and vocab 32k -> 128k, hidden 1,024

The loss stage is: final hidden states (B*T, H) and the LM head weight (V, H) -> per-token log p(label) -> sum ->
backward to the hidden states and the weight. The full-logits path projects every position, as a model's forward
does; streaming projects only the scored (completion) positions. Two cases: every position scored (the worst case
for streaming: 4 vocab-sized matmuls against 3, since backward recomputes the logits), and 28% scored, the share of
completion tokens among the non-padding positions of the plain layout on HH-RLHF helpful-base with GPT-2's
tokenizer (251,675 of 896,235).

Each variant runs in a fresh subprocess. Peak memory is the resident-set high-water mark (VmHWM, reset through
/proc/self/clear_refs after the inputs exist) minus the resident set at that moment: what the stage adds. Large
tensors are mmap-ed by the allocator and returned on free, so RSS follows the tensors closely. Reported twice: all
of it, and without the two gradients every path must return (d hidden: B*T*H*4, d weight: V*H*4 bytes).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def run_variant(
    variant: str, vocab: int, tokens: int, hidden_size: int, chunk_size: int, repeats: int, scored_fraction: float
) -> dict:
    import torch

    from dpo_scale.model.streaming_logps import LMHead, full_logits_token_logps, streaming_token_logps

    torch.manual_seed(0)
    torch.set_num_threads(torch.get_num_threads())
    hidden = (torch.randn(tokens, hidden_size) * 0.5).requires_grad_()
    weight = (torch.randn(vocab, hidden_size) * 0.02).requires_grad_()
    scored = torch.randperm(tokens)[: int(tokens * scored_fraction)].sort().values  # completion positions
    labels = torch.randint(0, vocab, (len(scored),))

    def stage() -> float:
        hidden.grad = weight.grad = None
        if variant == "streaming":
            logps = streaming_token_logps(hidden[scored], LMHead(weight, None), labels, chunk_size)
        else:
            logps = full_logits_token_logps((hidden @ weight.t())[scored], labels)
        total = logps.sum()
        total.backward()
        return total.item()

    stage()  # warm-up: allocator pools, BLAS threads
    hidden.grad = weight.grad = None
    Path("/proc/self/clear_refs").write_text("5")  # reset the high-water mark to the current resident set
    baseline = _rss_kib("VmRSS")
    start = time.perf_counter()
    value = stage()
    first = time.perf_counter() - start
    peak = _rss_kib("VmHWM") - baseline
    times = [first]
    for _ in range(repeats - 1):
        start = time.perf_counter()
        stage()
        times.append(time.perf_counter() - start)
    outputs_mib = (tokens * hidden_size + vocab * hidden_size) * 4 / 2**20
    return {
        "variant": variant,
        "peak_mib": peak / 1024,
        "peak_without_grads_mib": peak / 1024 - outputs_mib,
        "median_s": statistics.median(times),
        "sum_logps": value,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--chunk-size", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--scored-fraction", type=float, action="append", help="default: 1.0 and 0.28")
    parser.add_argument("--growth", action="store_true", help="how time and memory grow with tokens and vocab")
    parser.add_argument("--variant", choices=["streaming", "full_logits"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    tokens = args.batch * args.seq
    if args.growth:
        growth()
        return

    fractions = args.scored_fraction or [1.0, 0.28]
    if args.variant:  # child process: one variant, one JSON line
        result = run_variant(
            args.variant, args.vocab, tokens, args.hidden, args.chunk_size, args.repeats, fractions[0]
        )
        print(json.dumps(result))
        return

    print(
        f"vocab {args.vocab}, {args.batch} x {args.seq} tokens, hidden {args.hidden}, chunk {args.chunk_size}, "
        f"fp32, forward + backward, {args.repeats} runs\n"
    )
    print("| scored | path | peak MiB | peak MiB without the returned gradients | time s (median) | sum of log-probs |")
    print("|---|---|---|---|---|---|")
    ratios = []
    for fraction in fractions:
        results = {}
        for variant in ("full_logits", "streaming"):
            command = [
                sys.executable, __file__, "--variant", variant, "--scored-fraction", str(fraction),
                "--vocab", str(args.vocab), "--batch", str(args.batch), "--seq", str(args.seq),
                "--hidden", str(args.hidden), "--chunk-size", str(args.chunk_size), "--repeats", str(args.repeats),
            ]  # fmt: skip
            child = subprocess.run(command, capture_output=True, text=True, check=True)
            results[variant] = r = json.loads(child.stdout.strip().splitlines()[-1])
            print(
                f"| {fraction:.0%} | {variant} | {r['peak_mib']:.0f} | {r['peak_without_grads_mib']:.0f} "
                f"| {r['median_s']:.3f} | {r['sum_logps']:.3f} |"
            )
        full, streaming = results["full_logits"], results["streaming"]
        ratios.append(
            f"{fraction:.0%} scored, streaming / full: peak {streaming['peak_mib'] / full['peak_mib']:.3f}x "
            f"(without the returned gradients "
            f"{streaming['peak_without_grads_mib'] / full['peak_without_grads_mib']:.3f}x), "
            f"time {streaming['median_s'] / full['median_s']:.2f}x"
        )
    print("\n" + "\n".join(ratios))


def _child(variant: str, vocab: int, tokens: int, hidden: int, chunk: int, repeats: int, fraction: float) -> dict:
    command = [
        sys.executable, __file__, "--variant", variant, "--scored-fraction", str(fraction), "--vocab", str(vocab),
        "--batch", "1", "--seq", str(tokens), "--hidden", str(hidden), "--chunk-size", str(chunk),
        "--repeats", str(repeats),
    ]  # fmt: skip
    child = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(child.stdout.strip().splitlines()[-1])


GROWTH_HIDDEN = 1024
GROWTH_CHUNK = 512


def growth() -> None:
    """One sequence of 512 -> 4,096 tokens at vocab 32,000, then vocab 32,000 -> 128,000 at 1,024 tokens, every
    position scored, hidden 1,024: the full path, streaming with chunk_size 512, and streaming with the default
    chunk_size (logps.default_chunk_size: 64 MiB of fp32 logits at every vocab)."""
    from dpo_scale.model.streaming_logps import default_chunk_size

    points = [(seq, 32000) for seq in (512, 1024, 2048, 4096)] + [(1024, vocab) for vocab in (64000, 128000)]
    print(f"one sequence, every position scored, hidden {GROWTH_HIDDEN}, fp32, forward + backward, median of 2; "
          "peak without the returned gradients (d hidden, d weight)\n")  # fmt: skip
    print("| tokens | vocab | full: s | full: peak MiB | streaming 512: s | streaming 512: peak MiB "
          "| streaming, default chunk (64 MiB): chunk | s | peak MiB |\n|---|---|---|---|---|---|---|---|---|")
    rows = []
    for tokens, vocab in points:
        default = default_chunk_size(vocab)
        full = _child("full_logits", vocab, tokens, GROWTH_HIDDEN, GROWTH_CHUNK, 2, 1.0)
        streaming = _child("streaming", vocab, tokens, GROWTH_HIDDEN, GROWTH_CHUNK, 2, 1.0)
        budget = streaming
        if default != GROWTH_CHUNK:
            budget = _child("streaming", vocab, tokens, GROWTH_HIDDEN, default, 2, 1.0)
        rows.append((tokens, vocab, full, streaming, budget))
        print(f"| {tokens:,} | {vocab:,} | {full['median_s']:.2f} | {full['peak_without_grads_mib']:,.0f} "
              f"| {streaming['median_s']:.2f} | {streaming['peak_without_grads_mib']:,.0f} | {default} "
              f"| {budget['median_s']:.2f} | {budget['peak_without_grads_mib']:,.0f} |", flush=True)  # fmt: skip

    def per_doubling(selected, path, key):
        """Geometric mean of the ratio between neighbouring points (each a doubling)."""
        values = [row[path][key] for row in selected]
        ratios = [b / a for a, b in zip(values, values[1:]) if a > 0]
        product = 1.0
        for ratio in ratios:
            product *= ratio
        return product ** (1 / len(ratios))

    by_tokens, by_vocab = rows[:4], [rows[1], *rows[4:]]
    print()
    for title, selected in (("tokens", by_tokens), ("vocab", by_vocab)):
        for name, path in (("full", 2), ("streaming 512", 3), ("streaming, default chunk", 4)):
            print(f"per doubling of {title}, {name}: time x{per_doubling(selected, path, 'median_s'):.2f}, "
                  f"peak x{per_doubling(selected, path, 'peak_without_grads_mib'):.2f}")


if __name__ == "__main__":
    main()

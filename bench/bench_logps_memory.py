"""Loss-stage peak memory and time: streaming LM-head log-probs vs full logits, on CPU.

    python bench/bench_logps_memory.py                       # vocab 32,000, batch 8 x 1,024 tokens, hidden 2,048
    python bench/bench_logps_memory.py --hidden 4096 --chunk-size 256

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

    from dpo_scale.logps import LMHead, full_logits_token_logps, streaming_token_logps

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
    parser.add_argument("--variant", choices=["streaming", "full_logits"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    tokens = args.batch * args.seq

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


if __name__ == "__main__":
    main()

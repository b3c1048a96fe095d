"""Where the token budget's cost model and forward-only budget come from (training/batch_plan.py), measured here.

    python bench/attention_cost.py                  # both models: the attention weight, then forward vs training memory

1. The attention term. A micro-batch of T positions in units of L tokens costs a x T (projections, MLP, the LM head's
   share) plus b x T x L (each unit's attention, L^2 per unit, T / L units). Timing the forward and backward of the
   policy wrapper (PairLogpsModel, prefix sharing, packing, the CPU's per-unit attention) at a fixed T = 4,096 over
   L = 512 ... 2,048 gives a line in L whose slope over intercept is b / a, the cost of one (query, key) pair in
   positions. Against the model's FLOPs (CostModel.for_model) the ratio measured / FLOPs is ATTENTION_EFFICIENCY.
   Each unit is a pair of prompt L/2, chosen L/4, rejected L/4 tokens. Median of 3 after one warm-up, fp32, the
   machine's threads.
2. The forward-only budget. Peak resident memory above the loaded model (each in a fresh process) of one training
   micro-batch (forward and backward) at B positions and of one forward without gradients at F x B, for the same
   units (VmHWM reset after the model is built); FORWARD_BUDGET_FACTOR is chosen so that the forward's peak stays
   below the training one's.

The models are bench_vs_trl.py's Llamas over GPT-2's vocabulary (random weights: cost does not depend on them).
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_vs_trl import LLAMA_SIZES  # noqa: E402

from dpo_scale.training.batch_plan import CostModel  # noqa: E402

VOCAB = 50257
TOTAL = 4096
LENGTHS = (128, 256, 512, 1024, 2048)
FIT_FROM = 512
"""Below it the per-unit attention's fixed cost per call (tens of calls per layer) shows, which the model leaves out."""


def _model(name: str):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, max_position_embeddings=4096, tie_word_embeddings=True,
                         **LLAMA_SIZES[name])  # fmt: skip
    return LlamaForCausalLM(config)


def _batch(unit: int, total: int):
    from dpo_scale.config import LogpsConfig
    from dpo_scale.data.pairs import Pair
    from dpo_scale.model.layout import collate

    pairs = [Pair(i, "bench", [7] * (unit // 2), [8] * (unit // 4), [9] * (unit - unit // 2 - unit // 4))
             for i in range(total // unit)]  # fmt: skip
    return collate(pairs, LogpsConfig(), pad_token_id=0)


def _timings(name: str) -> dict[int, float]:
    from dpo_scale.config import LogpsConfig
    from dpo_scale.model.wrapper import PairLogpsModel

    module = PairLogpsModel(_model(name), LogpsConfig())
    seconds = {}
    for unit in LENGTHS:
        batch = _batch(unit, TOTAL)
        runs = []
        for _ in range(4):
            started = time.perf_counter()
            out = module(batch)
            (out.chosen_logps.sum() - out.rejected_logps.sum()).backward()
            runs.append(time.perf_counter() - started)
            module.zero_grad(set_to_none=True)
        seconds[unit] = statistics.median(runs[1:])
        print(f"{name} units of {unit}: {seconds[unit]:.3f} s", file=sys.stderr, flush=True)
    return seconds


def _peak(name: str, mode: str, positions: int) -> float:
    """In this process: MiB of peak RSS above the loaded model for one `mode` pass over `positions` positions."""
    import torch

    from dpo_scale.config import LogpsConfig
    from dpo_scale.model.wrapper import PairLogpsModel

    module = PairLogpsModel(_model(name), LogpsConfig())
    batch = _batch(512, positions)
    Path("/proc/self/clear_refs").write_text("5")  # the peak (VmHWM) restarts from here: the model's build left out
    baseline = _status("VmRSS")
    if mode == "train":
        out = module(batch)
        (out.chosen_logps.sum() - out.rejected_logps.sum()).backward()
    else:
        with torch.no_grad():
            module(batch)
    return (_status("VmHWM") - baseline) / 1024


def _status(field: str) -> int:
    """KiB of /proc/self/status's `field`."""
    return int(re.search(rf"{field}:\s+(\d+)", Path("/proc/self/status").read_text())[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", nargs="+", choices=list(LLAMA_SIZES), default=list(LLAMA_SIZES))
    parser.add_argument("--peak", nargs=3, metavar=("MODEL", "MODE", "POSITIONS"), help=argparse.SUPPRESS)
    parser.add_argument("--budget", type=int, default=2048, help="training positions of the memory comparison")
    parser.add_argument("--factors", nargs="+", type=int, default=[2, 4])
    args = parser.parse_args()
    if args.peak:
        print(json.dumps(_peak(args.peak[0], args.peak[1], int(args.peak[2]))))
        return
    print("| model | s at L=" + " / ".join(map(str, LENGTHS)) + f" (T={TOTAL}) | b / a measured (L >= {FIT_FROM}) "
          "| b / a from FLOPs | measured / FLOPs |")
    print("|---|---|---|---|---|")
    for name in args.model:
        seconds = _timings(name)
        fitted = [unit for unit in LENGTHS if unit >= FIT_FROM]
        slope, intercept = _line(fitted, [seconds[unit] for unit in fitted])
        weight = slope / intercept  # per unit length L: b x T / (a x T)
        flops = CostModel.for_model(_model(name).config, efficiency=1.0).attention_weight
        print(f"| {name} | {' / '.join(f'{seconds[u]:.2f}' for u in LENGTHS)} | {weight:.3g} | {flops:.3g} | "
              f"{weight / flops:.2f} |", flush=True)
    print(f"\n| model (B = {args.budget} positions, units of 512) | training peak above the model at B | forward-only at "
          + " / ".join(f"{f} x B" for f in args.factors) + " |")
    print("|---|---|---|")
    for name in args.model:
        train = _child(name, "train", args.budget)
        forwards = [_child(name, "forward", factor * args.budget) for factor in args.factors]
        print(f"| {name} | {train:,.0f} MiB | {' / '.join(f'{f:,.0f} MiB' for f in forwards)} |", flush=True)


def _child(name: str, mode: str, positions: int) -> float:
    out = subprocess.run([sys.executable, __file__, "--peak", name, mode, str(positions)], capture_output=True,
                         text=True, check=True)  # fmt: skip
    return json.loads(out.stdout.strip().splitlines()[-1])


def _line(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """Least-squares slope and intercept."""
    mean_x, mean_y = statistics.mean(xs), statistics.mean(ys)
    slope = sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys)) / sum((x - mean_x) ** 2 for x in xs)
    return slope, mean_y - slope * mean_x


if __name__ == "__main__":
    main()

"""Token-budgeted micro-batches against a fixed count of pairs, as a user runs them: `dpo-scale train` on 2 CPU ranks.

    python bench/bench_token_budget.py                                        # 16M and 117M, the budgets below
    python bench/bench_token_budget.py --model llama16m --budgets 2048 4096 --steps 6
    BENCH=token_budget bash bench/gpu.sh                                      # one GPU, bf16 (see gpu.sh)

Both sides train the same saved model (bench_vs_trl.py's Llama shapes over GPT-2's vocabulary) on HH-RLHF
helpful-base (test split, GPT-2 tokens, data.max_length 1024) with the same seed, so every optimizer step takes the
same global batch of pairs; ZeRO-3 (deepspeed.config=auto for 2 ranks), a frozen reference copy, fp32, the default
layout (prefix sharing, packing). Fixed: micro_batch_size=4, gradient_accumulation_steps derived from
global_batch_size. Budget: micro_batch_tokens=B with the same global_batch_size. Each side is one `deepspeed
--num_gpus 2 dpo-scale train` (through this file's --rank-hook, which records each rank's VmHWM and, on a GPU,
torch.cuda.max_memory_allocated at exit) under `/usr/bin/time -v`, whose "Maximum resident set size" is the peak
RSS reported (the largest process's: a rank's, imports included). The sides run one after another on an otherwise idle machine.

Reported per model and side: pairs/s and positions/s over the timed steps (the median step's seconds from
metrics.jsonl, the warm-up steps left out), the micro-batches per replica per step and the balance (the plan's most
loaded replica over the mean, batch_plan.StepPlan.balance), peak RSS, and pairs/s and peak RSS against the fixed side.
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_vs_trl import HH, LLAMA_SIZES, save_llama  # noqa: E402  (the same models as the TRL comparison)

BIN = Path(sys.executable).parent


def rank_main(argv: list[str]) -> None:
    """On every rank the launcher starts: run `dpo-scale` as is and record its peaks at exit."""
    import torch

    def report() -> None:
        peak_kib = int(re.search(r"VmHWM:\s+(\d+)", Path("/proc/self/status").read_text())[1])
        gpu = {"peak_gpu_mib": torch.cuda.max_memory_allocated() / 2**20} if torch.cuda.is_available() else {}
        rank = os.environ.get("RANK", "0")
        Path(os.environ["BUDGET_BENCH_OUT"], f"rank{rank}.json").write_text(json.dumps({"peak_rss_mib": peak_kib / 1024,
                                                                                       **gpu}))  # fmt: skip

    atexit.register(report)
    from dpo_scale.cli import main as dpo_scale_main

    sys.exit(dpo_scale_main(argv))


def main() -> None:
    if "--rank-hook" in sys.argv:  # the launcher puts its --local_rank first
        return rank_main([arg for arg in sys.argv[1:] if arg != "--rank-hook"])
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", nargs="+", choices=list(LLAMA_SIZES), default=list(LLAMA_SIZES))
    parser.add_argument("--budgets", nargs="+", type=int, default=[2048, 4096],
                        help="micro_batch_tokens of the budgeted sides (positions per rank per micro-batch)")
    parser.add_argument("--global-batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=8, help="optimizer steps per side, the warm-up included")
    parser.add_argument("--warmup", type=int, default=2, help="first steps left out of the timing")
    parser.add_argument("--max-length", type=int, default=1024)
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--overrides", nargs="*", default=[], help="config overrides for every side")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    results = {}
    for model in args.model:
        with tempfile.TemporaryDirectory() as scratch:
            work = Path(scratch)
            save_llama(work / "model", model, max_positions=2048)
            sides = {"micro_batch_size=4": {"micro_batch_size": 4}}
            sides.update({f"micro_batch_tokens={b}": {"micro_batch_tokens": b} for b in args.budgets})
            results[model] = {name: _run(work, name, split, args) for name, split in sides.items()}
        _report(model, results[model], args)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


def _run(work: Path, name: str, split: dict, args) -> dict:
    run_dir = work / re.sub(r"\W", "_", name)
    tree = {
        "model": {"path": str(work / "model")},
        "data": {"path": str(HH), "max_length": args.max_length, "cache_dir": str(work / "store")},
        "run_dir": str(run_dir), "global_batch_size": args.global_batch, "max_steps": args.steps,
        "optim": {"lr": 1e-5, "warmup_steps": 2}, "logging": {"every": 1, "progress_bar": False},
        "checkpoint": {"every": 0}, **split,
    }  # fmt: skip
    config = work / f"{run_dir.name}.yaml"
    config.write_text(yaml.safe_dump(tree))
    peaks = work / f"{run_dir.name}-peaks"
    peaks.mkdir()
    command = ["/usr/bin/time", "-v", str(BIN / "deepspeed"), "--num_gpus", str(args.ranks), "--master_port",
               str(_free_port()), __file__, "--rank-hook", "train", "--config", str(config), *args.overrides]  # fmt: skip
    repo = str(Path(__file__).resolve().parents[1])  # the ranks import this checkout's dpo_scale
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "BUDGET_BENCH_OUT": str(peaks),
           "PYTHONPATH": os.pathsep.join([repo, os.environ.get("PYTHONPATH", "")])}  # fmt: skip
    child = subprocess.run(command, capture_output=True, text=True, env=env)
    if child.returncode != 0:
        return {"error": f"exit {child.returncode}", "stderr": child.stderr[-2000:]}
    ranks = [json.loads(path.read_text()) for path in sorted(peaks.glob("rank*.json"))]
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    timed = [r for r in rows if r["split"] == "train" and r["step"] > args.warmup]
    seconds = statistics.median(r["seconds_per_step"] for r in timed)
    shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
    print(f"{name}: done", file=sys.stderr, flush=True)
    return {
        "pairs_per_second": args.global_batch / seconds,
        "positions_per_second": statistics.median(r["tokens_per_second"] for r in timed),
        "micro_batches": statistics.mean(r["micro_batches"] for r in timed),
        "balance": statistics.mean(r["balance"] for r in timed),
        "peak_rss_mib": int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", child.stderr)[1]) / 1024,
        "peak_rss_mib_by_rank": [rank["peak_rss_mib"] for rank in ranks],
        **({"peak_gpu_mib": max(rank["peak_gpu_mib"] for rank in ranks)} if "peak_gpu_mib" in ranks[0] else {}),
    }


def _free_port() -> int:
    from dpo_scale.distributed import free_port

    return free_port()


def _report(model: str, sides: dict, args) -> None:
    print(f"\n{model}, {args.ranks} ranks, global batch {args.global_batch}, steps {args.warmup + 1}-{args.steps} timed\n")
    print("| side | pairs/s | positions/s | micro-batches / replica / step | balance | peak RSS MiB | pairs/s vs fixed "
          "| peak RSS vs fixed |")
    print("|---|---|---|---|---|---|---|---|")
    fixed = sides["micro_batch_size=4"]
    for name, result in sides.items():
        if "error" in result:
            print(f"| {name} | {result['error']} | | | | | | |")
            continue
        speed = result["pairs_per_second"] / fixed["pairs_per_second"] if "error" not in fixed else float("nan")
        memory = result["peak_rss_mib"] / fixed["peak_rss_mib"] if "error" not in fixed else float("nan")
        gpu = f" (GPU {result['peak_gpu_mib']:,.0f})" if "peak_gpu_mib" in result else ""
        print(f"| {name} | {result['pairs_per_second']:.2f} | {result['positions_per_second']:,.0f} | "
              f"{result['micro_batches']:.2f} | {result['balance']:.3f} | {result['peak_rss_mib']:,.0f}{gpu} | "
              f"{speed:.2f}x | {memory:.2f}x |")


if __name__ == "__main__":
    main()

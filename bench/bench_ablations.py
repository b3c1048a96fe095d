"""Each speed and memory choice of dpo_scale switched on and off, through the real `dpo-scale train` on this CPU.

    python bench/bench_ablations.py                     # 16M Llama, GPT-2 vocab, HH-RLHF, max_length 512, 4 pairs/step
    python bench/bench_ablations.py --only ranks        # one group: layout, reference, memory or ranks

The model, pairs and order are bench_vs_trl's (same 16M-parameter Llama with GPT-2's 50,257-token vocabulary, built
from a config). Every variant trains the same pairs for `--steps` steps after `--warmup` in its own process tree;
reported: median seconds per step after the warm-up, pairs/s, tokens computed per unique token (padding and the
repeated prompt count; read from the run's metrics), the first losses (every variant is the same math), and the
peak resident memory of the largest process (RUSAGE_CHILDREN of a wrapper process: its descendants' maximum).

Groups:
- layout: plain padded [chosen; rejected] vs packed vs prefix-shared vs both, each with full logits and with the
  streaming head (precomputed reference);
- reference: precomputed cache vs an online full-precision copy vs an online NF4 copy (default layout);
- memory: ZeRO-3 (default) vs zero0.json vs zero0.json + activation checkpointing (default layout, cache);
- ranks: 1 rank x 4 pairs (2 threads) vs 2 ZeRO-3 ranks x 2 pairs (1 thread each, `deepspeed --num_gpus 2`, gloo),
  the same global batch on the same 2 cores.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from bench_vs_trl import _prepare

DPO_SCALE = shutil.which("dpo-scale") or str(Path(sys.executable).with_name("dpo-scale"))
DEEPSPEED = shutil.which("deepspeed") or str(Path(sys.executable).with_name("deepspeed"))

LAYOUTS = {  # (prefix_sharing, packing)
    "plain padded": (False, False),
    "packed": (False, True),
    "prefix-shared": (True, False),
    "prefix-shared + packed": (True, True),
}


def variants(cache: str) -> dict[str, list[tuple[str, dict, int]]]:
    """group -> [(label, config sections to replace, ranks)]."""
    cached = {"source": "cache", "cache_dir": cache}
    layout = [
        (f"{name}, {'streaming head' if streaming else 'full logits'}",
         {"logps": {"prefix_sharing": prefix, "packing": packing, "streaming": streaming}, "reference": cached}, 1)
        for streaming in (False, True) for name, (prefix, packing) in LAYOUTS.items()
    ]  # fmt: skip
    return {
        "layout": layout,
        "reference": [
            ("cache", {"reference": cached}, 1),
            ("online copy", {"reference": {"source": "copy"}}, 1),
            ("online NF4 copy", {"reference": {"source": "nf4"}}, 1),
        ],
        "memory": [
            ("ZeRO-3 (zero3.json)", {"reference": cached}, 1),
            ("no partitioning (zero0.json)", {"reference": cached, "deepspeed": {"config": "zero0"}}, 1),
            ("zero0.json + activation checkpointing",
             {"reference": cached, "deepspeed": {"config": "zero0", "activation_checkpointing": True}}, 1),
        ],  # fmt: skip
        "ranks": [
            ("1 rank x 4 pairs, 2 threads", {"reference": cached}, 1),
            ("2 ZeRO-3 ranks x 2 pairs, 1 thread each", {"reference": cached, "micro_batch_size": 2}, 2),
        ],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10, help="timed steps, after the warm-up steps")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--only", choices=("layout", "reference", "memory", "ranks"), action="append")
    parser.add_argument("--child", nargs=2, metavar=("CONFIG", "RANKS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _child(Path(args.child[0]), int(args.child[1]))
        return
    args.model, args.reference = "llama16m", "cache"

    with tempfile.TemporaryDirectory() as scratch:
        work = Path(scratch)
        parameters, _, _ = _prepare(work, args)
        base = yaml.safe_load((work / "run.yaml").read_text())
        subprocess.run([DPO_SCALE, "precompute-ref", "--config", str(work / "run.yaml")], check=True,
                       capture_output=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})  # fmt: skip
        print(f"{parameters / 1e6:.1f}M-parameter Llama (GPT-2 vocabulary), HH-RLHF helpful-base, max_length "
              f"{args.max_length}, {args.batch} pairs per step, fp32, {args.steps} timed steps after {args.warmup}\n")
        for group, runs in variants(str(work / "cache")).items():
            if args.only and group not in args.only:
                continue
            print(f"### {group}\n\n| variant | s/step (median) | pairs/s | speed vs first row | tokens computed / unique "
                  "| peak RSS of the largest process (MiB) | first losses |\n|---|---|---|---|---|---|---|")
            first = None
            for number, (label, sections, ranks) in enumerate(runs):
                tree = {**base, **sections, "run_dir": str(work / f"{group}-{number}")}
                result = _train(work, tree, ranks, args.warmup)
                first = first or result["seconds"]
                losses = ", ".join(f"{x:.6f}" for x in result["losses"])
                print(f"| {label} | {result['seconds']:.3f} | {args.batch / result['seconds']:.2f} "
                      f"| {first / result['seconds']:.2f}x | {result['tokens_per_unique_token']:.2f} "
                      f"| {result['peak_rss_mib']:,.0f} | {losses} |", flush=True)  # fmt: skip
            print()


def _train(work: Path, tree: dict, ranks: int, warmup: int) -> dict:
    config = work / f"{Path(tree['run_dir']).name}.yaml"
    config.write_text(yaml.safe_dump(tree))
    started = time.perf_counter()
    child = subprocess.run([sys.executable, __file__, "--child", str(config), str(ranks)], capture_output=True,
                           text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})  # fmt: skip
    if child.returncode != 0:
        raise SystemExit(f"{config.name} failed:\n{child.stdout[-3000:]}\n{child.stderr[-3000:]}")
    rows = [json.loads(line) for line in (Path(tree["run_dir"]) / "metrics.jsonl").read_text().splitlines()]
    rows = [row for row in rows if row["split"] == "train"]  # one per step
    return {
        "seconds": statistics.median(row["seconds_per_step"] for row in rows[warmup:]),
        "tokens_per_unique_token": statistics.mean(row["tokens_per_unique_token"] for row in rows),
        "losses": [row["loss"] for row in rows[:3]],
        "peak_rss_mib": json.loads(child.stdout.strip().splitlines()[-1])["peak_rss_mib"],
        "process_seconds": time.perf_counter() - started,
    }


def _child(config: Path, ranks: int) -> None:
    """Train, then print the largest descendant's peak RSS (the ranks are this process's (grand)children)."""
    command = [DPO_SCALE, "train", "--config", str(config)]
    env = dict(os.environ)
    if ranks > 1:
        from dpo_scale.distributed import free_port

        command = [DEEPSPEED, "--num_gpus", str(ranks), "--master_port", str(free_port()), *command]
        env["OMP_NUM_THREADS"] = "1"  # 2 ranks x 1 thread on the 2 cores, against 1 rank x 2 threads
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, env=env)
    print(json.dumps({"peak_rss_mib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}))


if __name__ == "__main__":
    main()

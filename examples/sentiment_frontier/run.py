"""The DPO paper's controlled-sentiment experiment (Rafailov et al. 2023, Figure 2 left) in miniature, on a CPU.

    python examples/sentiment_frontier/run.py                 # stories260K from ../shared/data
    python examples/sentiment_frontier/run.py --model DIR --betas 0.05 0.1 0.5 --out runs/frontier

1. Prompts: story openings (names x openings), split into training and evaluation prompts.
2. Pairs: samples from the model itself, several per training prompt, scored by sentiment.py; the most and the least
   positive sample of a prompt become chosen and rejected (prompts whose samples all score the same are dropped and
   counted).
3. DPO at each beta (`dpo-scale sweep`): the reference log-probs computed once into a cache that every point reads,
   checkpoints along the way.
4. Each checkpoint evaluated (`dpo-scale eval`): the mean sentiment of its samples for the evaluation prompts (the
   reward) and the sequence-level KL(policy || reference) estimated from those samples.
5. frontier.png and frontier.json: reward against KL, one curve per beta from the reference (KL 0) outwards.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from dpo_scale.commands.eval import run_eval
from dpo_scale.config import EvalRunConfig, GenerationConfig, ModelConfig, build
from dpo_scale.data import load_tokenizer
from dpo_scale.io import atomic_open
from dpo_scale.model.generation import generate
from dpo_scale.model.wrapper import load_causal_lm

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from sentiment import sentiment  # noqa: E402  (the example's own scorer, beside this file)

SHARED_MODEL = HERE.parents[1].parent / "shared" / "data" / "models" / "stories260K"
NAMES = ["Lily", "Tim", "Ben", "Sue", "Max", "Mia", "Tom", "Anna", "Sam", "Lucy", "Jack", "Zoe", "Bob", "Amy",
         "Leo", "Kim"]  # fmt: skip
OPENINGS = [
    "Once upon a time, there was a little kid named {name}.",
    "One day, {name} went to the park.",
    "{name} had a red ball.",
    "{name} saw a big dog in the yard.",
    "{name} and mom went to the store.",
    "It was a rainy day and {name} was at home.",
    "{name} found a box under the bed.",
    "{name} wanted to climb the tall tree.",
    "At school, {name} met a new friend.",
    "{name} had a little cat.",
    "{name} went to the beach with dad.",
    "{name} made a cake in the kitchen.",
    "{name} heard a noise outside.",
    "{name} lost a toy in the garden.",
    "{name} and a bird looked at the sky.",
    "The sun was hot and {name} was thirsty.",
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(SHARED_MODEL), help="any Hugging Face causal LM directory")
    parser.add_argument("--out", default="runs/sentiment_frontier")
    parser.add_argument("--betas", type=float, nargs="+", default=[0.05, 0.1, 0.5])
    parser.add_argument("--eval-prompts", type=int, default=32)
    parser.add_argument("--samples", type=int, default=4, help="samples per training prompt")
    parser.add_argument("--max-new-tokens", type=int, default=40)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--checkpoints", type=int, default=4, help="checkpoints per run, evenly spaced")
    args = parser.parse_args()
    if not Path(args.model).is_dir():
        raise SystemExit(f"--model {args.model}: no such directory (stories260K lives in ../shared/data/models)")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()

    prompts = [opening.format(name=name) for opening in OPENINGS for name in NAMES]
    random.Random(0).shuffle(prompts)
    eval_prompts, train_prompts = prompts[: args.eval_prompts], prompts[args.eval_prompts :]
    with atomic_open(out / "eval_prompts.txt") as handle:
        handle.write("\n".join(eval_prompts) + "\n")

    pairs_path = out / "pairs.jsonl"
    kept, ties = sample_pairs(args.model, train_prompts, args.samples, args.max_new_tokens, pairs_path)
    print(f"{kept} pairs from {len(train_prompts)} prompts ({ties} dropped: all {args.samples} samples scored the "
          f"same) [{time.perf_counter() - started:.0f} s]", flush=True)  # fmt: skip

    steps = args.epochs * (kept // 8)  # micro_batch_size 8 on one rank: whole batches per epoch
    every = math.ceil(steps / args.checkpoints)
    config = {
        "model": {"path": args.model},
        "data": {"path": str(pairs_path)},
        "run_dir": str(out / "runs"),
        "micro_batch_size": 8,
        "epochs": args.epochs,
        "optim": {"lr": args.lr, "warmup_steps": max(steps // 20, 1)},
        "reference": {"source": "cache", "cache_dir": str(out / "reference_cache")},
        "checkpoint": {"every": every, "keep_last": args.checkpoints + 1},
        "logging": {"every": max(every // 4, 1), "progress_bar": False},
    }
    config_path = out / "run.yaml"
    with atomic_open(config_path) as handle:
        yaml.safe_dump(config, handle)
    grid = "beta=" + ",".join(f"{beta:g}" for beta in args.betas)  # the sweep computes the cache first, once
    subprocess.run([sys.executable, "-m", "dpo_scale.cli", "sweep", "--config", str(config_path), "--grid", grid],
                   check=True)  # fmt: skip
    print(f"trained {len(args.betas)} betas [{time.perf_counter() - started:.0f} s]", flush=True)

    settings = {"prompts": str(out / "eval_prompts.txt"), "num_prompts": args.eval_prompts, "samples_per_prompt": 4,
                "max_new_tokens": args.max_new_tokens, "reward_fn": f"{HERE / 'sentiment.py'}:score"}  # fmt: skip
    reference = evaluate(args.model, args.model, pairs_path, settings, out / "eval" / "reference.json")
    curves: dict[str, list[dict]] = {}
    for beta in args.betas:
        origin = {"step": 0, "kl": 0.0, "reward": reference["reward"]}
        curves[f"{beta:g}"] = [origin]
        for checkpoint in sorted((out / "runs" / f"beta={beta:g}" / "checkpoints").glob("step-*")):
            step = int(checkpoint.name.removeprefix("step-"))
            result = evaluate(str(checkpoint), args.model, pairs_path, settings, out / "eval" / f"beta={beta:g}-{step}.json")
            curves[f"{beta:g}"].append({"step": step, "kl": result["kl"], "reward": result["reward"],
                                        "win_rate": result["win_rate"]})  # fmt: skip
            print(f"beta {beta:g} step {step}: reward {result['reward']:.3f} (reference {reference['reward']:.3f}), "
                  f"KL {result['kl']:.2f} nats, win rate {result['win_rate']:.2f}", flush=True)  # fmt: skip
    with atomic_open(out / "frontier.json") as handle:
        json.dump({"reference_reward": reference["reward"], "curves": curves}, handle, indent=2)
    plot_frontier(curves, reference["reward"], out / "frontier.png")
    print(f"wrote {out / 'frontier.png'} and frontier.json [{time.perf_counter() - started:.0f} s in all]")


@torch.no_grad()
def sample_pairs(model_path: str, prompts: list[str], samples: int, max_new_tokens: int, out: Path) -> tuple[int, int]:
    """Sample `samples` completions per prompt from the model; the most and least positive form a pair."""
    model = load_causal_lm(ModelConfig(model_path)).eval()
    tokenizer = load_tokenizer(model_path)
    settings = GenerationConfig(samples_per_prompt=samples, max_new_tokens=max_new_tokens, batch_size=16, seed=1)
    completions = generate(model, [tokenizer(p)["input_ids"] for p in prompts], settings, tokenizer, torch.device("cpu"))
    rows, ties = [], 0
    for number, prompt in enumerate(prompts):
        texts = [tokenizer.decode(c, skip_special_tokens=True) for c in completions[number * samples : (number + 1) * samples]]
        ranked = sorted(texts, key=sentiment)
        if sentiment(ranked[0]) == sentiment(ranked[-1]):
            ties += 1
            continue
        rows.append({"prompt": prompt, "chosen": " " + ranked[-1], "rejected": " " + ranked[0]})
    with atomic_open(out) as handle:
        handle.write("".join(json.dumps(row) + "\n" for row in rows))
    return len(rows), ties


def evaluate(policy: str, reference: str, pairs: Path, generation: dict, out: Path) -> dict:
    config = build(EvalRunConfig, {"policy": policy, "reference": reference, "data": {"path": str(pairs)},
                                   "num_pairs": 8, "out": str(out), "generation": generation})  # fmt: skip
    return run_eval(config)["generation"]


def plot_frontier(curves: dict[str, list[dict]], reference_reward: float, out: Path) -> None:
    figure = Figure(figsize=(6.5, 4.5), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots()
    for beta, points in curves.items():
        axes.plot([p["kl"] for p in points], [p["reward"] for p in points], marker="o", label=f"DPO beta={beta}")
    axes.axhline(reference_reward, color="gray", linestyle="--", linewidth=0.8, label="reference")
    axes.set_xlabel("KL(policy || reference), nats per sample")
    axes.set_ylabel("mean sentiment reward")
    axes.set_title("Reward vs KL: each curve one beta, points are checkpoints")
    axes.legend()
    with atomic_open(out, "wb") as handle:
        figure.savefig(handle, format="png")


if __name__ == "__main__":
    main()

"""ZeRO-3 bf16 DPO of a ~1B Llama on one GPU: dpo_scale, then TRL 1.16's DPOTrainer, same pairs, same settings.

    bash bench/gpu.sh                                  # on the GPU machine: installs what is missing, runs this
    python bench/bench_gpu.py --size tiny              # the same program on a CPU with a tiny model (a dry run)

The model is a TinyLlama-shaped Llama (hidden 2,048, 22 layers, 32 heads, 4 KV heads, vocab 32,000: 1.10B
parameters) built from a config with random weights; the data are synthetic pairs of exact lengths (prompt 256
tokens, chosen and rejected 256 each, one token per word of a generated word-level tokenizer), so nothing is read
from elsewhere. Both sides: ZeRO-3, bf16, AdamW at the same constant learning rate, 8 pairs per step, max length
1,024, reference log-probs precomputed before training (dpo_scale: precompute-ref into a cache; TRL:
precompute_ref_log_probs), each under `deepspeed --num_gpus 1` in its own process.

Reported per side: pairs/s and tokens/s over the timed steps (unique tokens: prompt once; TRL computes the prompt
twice, which is its cost, not extra work done), peak GPU memory (torch.cuda.max_memory_allocated and _reserved),
and MFU = 6 x parameters x unique tokens / time / the GPU's dense bf16 peak (from its name, or GPU_PEAK_TFLOPS).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

DEEPSPEED = [sys.executable, "-m", "deepspeed.launcher.runner"]  # the `deepspeed` command, wherever pip put it
REPO = Path(__file__).resolve().parents[1]
SIZES = {  # LlamaConfig arguments
    "1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
               num_key_value_heads=4, vocab_size=32000),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=512),
}  # fmt: skip
DENSE_BF16_TFLOPS = {"H100 PCIe": 756, "H100": 989, "H200": 989, "H800": 989, "A100": 312, "L40S": 362, "A10G": 70}
"""Dense (not sparse) bf16 tensor-core peaks from the vendors' data sheets; the first name found in the GPU's wins."""
LR = 1e-6
SIDES = ("dpo_scale", "dpo_scale_dense", "dpo_scale_flex", "dpo_scale_varlen", "trl")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=SIZES, default="1b")
    parser.add_argument("--steps", type=int, default=20, help="timed steps, after the warm-up steps")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--batch", type=int, default=8, help="pairs per step")
    parser.add_argument("--prompt-tokens", type=int, default=256)
    parser.add_argument("--completion-tokens", type=int, default=256)
    parser.add_argument("--sides", nargs="+", choices=SIDES, default=["dpo_scale", "trl"],
                        help="dpo_scale runs logps.attention=auto; dpo_scale_dense / _flex / _varlen force one form "
                             "(varlen without prefix sharing)")  # fmt: skip
    parser.add_argument("--work", help="scratch directory (default: a fresh one under /tmp)")
    parser.add_argument("--side", choices=SIDES, help=argparse.SUPPRESS)  # a launched child
    parser.add_argument("--local_rank", type=int, help=argparse.SUPPRESS)  # passed by the deepspeed launcher
    parser.add_argument("--check-gradients", action="store_true",
                        help="only compare the attention forms' gradients on one batch (flex needs CUDA)")
    args = parser.parse_args()
    if args.check_gradients:
        work = Path(args.work or f"/tmp/dpo-scale-gpu-bench-{os.getpid()}")
        work.mkdir(parents=True, exist_ok=True)
        _prepare(work, args)
        print(json.dumps(_gradient_check(work, args)))
        return
    if args.side:
        from dpo_scale.training.tracking import stop_tqdm_monitor

        stop_tqdm_monitor()  # every side's process exits as `dpo-scale` does (a finished side must not abort)
        result = (_run_trl if args.side == "trl" else _run_dpo_scale)(Path(args.work), args)
        if torch.cuda.is_available():
            result["peak_allocated_gib"] = torch.cuda.max_memory_allocated() / 2**30
            result["peak_reserved_gib"] = torch.cuda.max_memory_reserved() / 2**30
        (Path(args.work) / f"{args.side}.json").write_text(json.dumps(result))
        return

    work = Path(args.work or f"/tmp/dpo-scale-gpu-bench-{os.getpid()}")
    work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    parameters, unique_tokens, sequence_tokens = _prepare(work, args)
    print(f"prepared in {time.perf_counter() - started:.0f} s: {parameters / 1e9:.2f}B parameters", flush=True)
    results = {}
    for side in args.sides:
        started = time.perf_counter()
        command = [*DEEPSPEED, "--num_gpus", "1", "--master_port", str(29500 + len(results)), __file__, "--side", side,
                   "--work", str(work), "--size", args.size, "--steps", str(args.steps), "--warmup",
                   str(args.warmup), "--batch", str(args.batch)]  # fmt: skip
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
        child = subprocess.run(command, env=env, capture_output=True, text=True)
        if child.returncode == 0:
            results[side] = json.loads((work / f"{side}.json").read_text())
        else:
            results[side] = {"error": f"exit {child.returncode}: {child.stderr.strip().splitlines()[-1:]}"}
            (work / f"{side}.log").write_text(child.stdout + child.stderr)
        print(f"{side}: {time.perf_counter() - started:.0f} s", flush=True)
    _report(results, parameters, unique_tokens, sequence_tokens, args)


def _prepare(work: Path, args) -> tuple[int, int, int]:
    """Tokenizer, model (saved in bf16), synthetic pairs and the dpo_scale run config."""
    import yaml
    from transformers import LlamaConfig, LlamaForCausalLM

    from dpo_scale.commands.demo import SPECIAL, write_tokenizer

    size = SIZES[args.size]
    words = [f"w{i}" for i in range(size["vocab_size"] - len(SPECIAL))]
    write_tokenizer(work / "model", words)
    positions = max(2048, args.prompt_tokens + 2 * args.completion_tokens + 8)
    config = LlamaConfig(**size, max_position_embeddings=positions, bos_token_id=1, eos_token_id=2, pad_token_id=0,
                         tie_word_embeddings=False, dtype="bfloat16")  # fmt: skip
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):  # initialising 1B weights on a CPU is slow
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(work / "model")
    parameters = sum(p.numel() for p in model.parameters())
    del model

    rng = random.Random(0)
    pairs = args.batch * (args.steps + args.warmup)

    def text(length: int) -> str:
        return " ".join(rng.choice(words) for _ in range(length))

    # a word is a token; completions get EOS appended, prompts nothing
    rows = [{"prompt": text(args.prompt_tokens), "chosen": text(args.completion_tokens - 1),
             "rejected": text(args.completion_tokens - 1)} for _ in range(pairs)]  # fmt: skip
    (work / "rows.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    max_length = args.prompt_tokens + args.completion_tokens + 8
    run = {
        "model": {"path": str(work / "model")}, "data": {"path": str(work / "rows.jsonl"), "max_length": max_length},
        "run_dir": str(work / "run"), "micro_batch_size": args.batch, "max_steps": args.steps + args.warmup,
        "optim": {"lr": LR, "warmup_steps": 0, "schedule": "constant", "weight_decay": 0.0},
        "reference": {"source": "cache", "cache_dir": str(work / "cache")},
        "deepspeed": {"config": "zero3", "precision": "bf16"},
        "logging": {"every": 1, "progress_bar": False}, "checkpoint": {"every": 0},
    }  # fmt: skip
    (work / "run.yaml").write_text(yaml.safe_dump(run))
    (work / "max_length").write_text(str(max_length))
    # counted as dpo_scale tokenizes them (every pair has the same lengths, so the timed steps' share is exact)
    from dpo_scale.config import DataConfig
    from dpo_scale.data import load_tokenizer, prepare

    tokenized = prepare(DataConfig(str(work / "rows.jsonl"), max_length=max_length), load_tokenizer(str(work / "model")))
    prompt, chosen, rejected = (sum(len(getattr(p, f"{part}_ids")) for p in tokenized.pairs) * args.steps
                                // (args.steps + args.warmup) for part in ("prompt", "chosen", "rejected"))  # fmt: skip
    return parameters, prompt + chosen + rejected, 2 * prompt + chosen + rejected


def _gradient_check(work: Path, args) -> dict:
    """One batch of the run's pairs through each attention form (flex on CUDA only: torch has no CPU backward for
    it), the model in bf16 as trained: per-pair log-prob sums and every parameter's gradient of their sum, against the
    dense mask's. Reported: the largest difference of a sum, and the largest gradient difference relative to that
    parameter's largest dense gradient (bf16 rounding alone gives ~1e-2)."""
    from transformers import AutoModelForCausalLM

    from dpo_scale.config import DataConfig, LogpsConfig
    from dpo_scale.data import load_tokenizer, prepare
    from dpo_scale.model.layout import collate
    from dpo_scale.model.wrapper import PairLogpsModel

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    max_length = int((work / "max_length").read_text())
    pairs = prepare(DataConfig(str(work / "rows.jsonl"), max_length=max_length), load_tokenizer(str(work / "model")))
    batch_pairs = list(pairs.pairs[: args.batch])
    forms = {"dense": LogpsConfig(attention="dense"), "varlen": LogpsConfig(prefix_sharing=False, attention="varlen"),
             "dense_unshared": LogpsConfig(prefix_sharing=False, attention="dense")}  # fmt: skip
    if device.type == "cuda":
        forms["flex"] = LogpsConfig(attention="flex")
    measured = {}
    for name, config in forms.items():
        model = AutoModelForCausalLM.from_pretrained(work / "model", dtype=torch.bfloat16).to(device)
        scorer = PairLogpsModel(model, config)
        out = scorer(collate(batch_pairs, config, pad_token_id=0).to(device))
        sums = torch.cat([out.chosen_logps, out.rejected_logps])
        sums.sum().backward()
        measured[name] = (sums.detach().float().cpu(), {n: p.grad.float().cpu() for n, p in model.named_parameters()})
        del model, scorer
    report = {}
    for name, baseline in (("flex", "dense"), ("varlen", "dense_unshared")):
        if name not in measured:
            report[name] = "not run: needs CUDA"
            continue
        (sums, grads), (base_sums, base_grads) = measured[name], measured[baseline]
        worst = max(((grads[n] - g).abs().max() / g.abs().max().clamp_min(1e-12)).item() for n, g in base_grads.items())
        report[name] = {"against": baseline, "max_sum_difference": (sums - base_sums).abs().max().item(),
                        "max_relative_gradient_difference": worst}  # fmt: skip
    return {"device": str(device), "pairs": len(batch_pairs), "forms": report}


def _run_dpo_scale(work: Path, args) -> dict:
    from dpo_scale.commands.train import run
    from dpo_scale.config import TrainConfig, build, load_yaml

    shutil.rmtree(work / "run", ignore_errors=True)
    shutil.rmtree(work / "cache", ignore_errors=True)
    launcher_variables = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_PORT")
    env = {key: value for key, value in os.environ.items() if key not in launcher_variables}
    subprocess.run([sys.executable, "-m", "dpo_scale.cli", "precompute-ref", "--config", str(work / "run.yaml")],
                   check=True, env=env)  # a process of its own, outside the launcher's world  # fmt: skip
    tree = load_yaml(work / "run.yaml")
    attention = args.side.removeprefix("dpo_scale").removeprefix("_") or "auto"
    tree["logps"] = {"attention": attention, "prefix_sharing": attention != "varlen"}
    history = run(build(TrainConfig, tree))
    timed = history[args.warmup :]
    return {"seconds": sum(row["seconds_per_step"] for row in timed), "steps": len(timed),
            "losses": [row["loss"] for row in history[:3]]}  # fmt: skip


def _run_trl(work: Path, args) -> dict:
    from bench_vs_trl import step_clock
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    zero3 = {
        "train_batch_size": "auto", "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto", "bf16": {"enabled": "auto"},
        "zero_optimization": {"stage": 3, "overlap_comm": True, "contiguous_gradients": True,
                              "reduce_bucket_size": "auto", "stage3_prefetch_bucket_size": "auto",
                              "stage3_param_persistence_threshold": "auto"},
    }  # fmt: skip
    rows = [json.loads(line) for line in (work / "rows.jsonl").read_text().splitlines()]
    config = DPOConfig(output_dir=str(work / "trl"), bf16=True, deepspeed=zero3, report_to=[], logging_steps=1,
                       per_device_train_batch_size=args.batch, max_length=int((work / "max_length").read_text()),
                       learning_rate=LR, lr_scheduler_type="constant", weight_decay=0.0,
                       max_steps=args.steps + args.warmup, precompute_ref_log_probs=True, save_strategy="no",
                       gradient_checkpointing=False,  # DPOConfig's default is True; dpo_scale's run recomputes nothing
                       seed=0, train_sampling_strategy="sequential", use_cpu=not torch.cuda.is_available())  # fmt: skip
    clock = step_clock()
    trainer = DPOTrainer(model=AutoModelForCausalLM.from_pretrained(work / "model"), args=config,
                         train_dataset=Dataset.from_list(rows),
                         processing_class=AutoTokenizer.from_pretrained(work / "model"), callbacks=[clock])  # fmt: skip
    trainer.train()
    timed = clock.durations[args.warmup :]
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry][:3]
    return {"seconds": sum(timed), "steps": len(timed), "losses": losses}


def _peak_tflops() -> tuple[str, float | None]:
    if not torch.cuda.is_available():
        return "CPU", None
    name = torch.cuda.get_device_name()
    if os.environ.get("GPU_PEAK_TFLOPS"):
        return name, float(os.environ["GPU_PEAK_TFLOPS"])
    found = next((peak for key, peak in DENSE_BF16_TFLOPS.items() if key in name), None)
    return name, found


def _report(results: dict, parameters: int, unique_tokens: int, sequence_tokens: int, args) -> None:
    device, peak = _peak_tflops()
    print(f"\n{device}; {parameters / 1e9:.2f}B-parameter Llama, ZeRO-3, bf16, {args.batch} pairs per step (prompt "
          f"{args.prompt_tokens}, completions {args.completion_tokens} tokens), {args.steps} timed steps after "
          f"{args.warmup}, precomputed reference; torch {torch.__version__}\n")  # fmt: skip
    print("| side | pairs/s | unique tokens/s | sequence tokens/s | MFU | peak allocated GiB | peak reserved GiB "
          "| first losses |\n|---|---|---|---|---|---|---|---|")  # fmt: skip
    rates = {}
    for side, result in results.items():
        if "error" in result:
            print(f"| {side} | {result['error']} | | | | | | |")
            continue
        seconds = result["seconds"]
        rates[side] = unique_tokens / seconds
        mfu = f"{6 * parameters * rates[side] / (peak * 1e12):.1%}" if peak else "n/a (set GPU_PEAK_TFLOPS)"
        losses = ", ".join(f"{x:.4f}" for x in result["losses"])
        print(f"| {side} | {args.batch * result['steps'] / seconds:.2f} | {rates[side]:,.0f} "
              f"| {sequence_tokens / seconds:,.0f} | {mfu} | {result.get('peak_allocated_gib', 0):.1f} "
              f"| {result.get('peak_reserved_gib', 0):.1f} | {losses} |")  # fmt: skip
    for side in rates:
        if side != "trl" and "trl" in rates:
            print(f"\n{side} / TRL: {rates[side] / rates['trl']:.2f}x tokens/s")
    print(json.dumps({"device": device, "peak_tflops": peak, "parameters": parameters, "results": results}))


if __name__ == "__main__":
    main()

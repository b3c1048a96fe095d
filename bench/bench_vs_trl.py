"""dpo_scale against TRL 1.16's DPOTrainer and a plain PyTorch step, side by side on this CPU, same everything.

    python bench/bench_vs_trl.py                                  # 16M Llama, GPT-2 vocab, precomputed reference
    python bench/bench_vs_trl.py --reference online               # a frozen reference copy run every step
    python bench/bench_vs_trl.py --model stories260k              # the real pretrained stories260K, 512-token vocab
    python bench/bench_vs_trl.py --model llama117m                # 117M Llama: the decoder outweighs the LM head
    python bench/bench_vs_trl.py --model llama16m llama117m --checkpointing off on \
        --sides dpo_scale trl_cpu_chunk_no_save                   # the matched-settings table, one invocation

Every side trains the same saved model on the same pairs in the same order (TRL's sampler sequential over rows
written in dpo_scale's step order), batch 4 pairs, fp32, AdamW at the same learning rate and saves a final
checkpoint (weights and optimizer state), and recomputes activations in backward as `--checkpointing` says: off or
on for every side (TRL's DPOConfig turns gradient checkpointing on by default; it is set explicitly here so that
every side does the same work). Given both, for each model, the matched-settings table: defaults (TRL's on, ours
as `dpo-scale train` leaves it), both on, both off. `--reference cache`: reference log-probs precomputed before the timed
steps (TRL: precompute_ref_log_probs; dpo_scale: precompute-ref into a cache; plain: computed once up front);
`--reference online`: a frozen copy of the starting model scores every batch (TRL's ref_model, dpo_scale's
reference.source=copy, plain: a second model under no_grad). Each side runs in its own process, so its peak
resident memory is its own, imports and set-up included (dpo_scale's: `dpo-scale train` under /usr/bin/time -v, as
a user runs it; the others: ru_maxrss of the process running them).
- dpo_scale: `dpo-scale train` with the defaults: deepspeed.config=auto (no partitioning for one process), prefix
  sharing, packing and the streaming head.
- dpo_scale_zero3: the same with ds_configs/zero3.json, the default before deepspeed.config=auto.
- TRL as shipped: on CPU its chunked log-prob head works on 32,768 positions x the whole vocabulary at a time.
- TRL, CPU chunk: the same with trl.trainer.utils._CHUNKED_LOGPROB_CHUNK_SIZE = 1024; _no_save: without its final
  checkpoint (dpo_scale always writes one).
- plain PyTorch: chosen and rejected as separate right-padded sequences, full logits, log_softmax + gather, the DPO
  loss, AdamW: the floor any user could write.

Reported: pairs/s and tokens/s (non-padding tokens of prompt + chosen + rejected, prompt counted once per
completion, as the plain layout computes them) over the timed steps, peak RSS, the first steps' losses, and achieved
FLOP/s (6 x parameters x unique tokens per second) against this CPU's measured fp32 matmul rate.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
HH = SHARED / "preferences/hh-rlhf/helpful-base/test.jsonl.gz"
GPT2 = SHARED / "tokenizers/gpt2"
STORIES = SHARED / "models/stories260K"
SIDES = ("dpo_scale", "dpo_scale_zero3", "trl", "trl_cpu_chunk", "trl_cpu_chunk_no_save", "plain")
LR = 5e-6
# Llama shapes over GPT-2's 50,257-token vocabulary (tied embeddings): the LM head is most of the 16M model and a
# third of the 117M one, so the two sizes show whether a memory lead comes from the head or holds as the decoder grows
LLAMA_SIZES = {
    "llama16m": {"hidden_size": 256, "intermediate_size": 688, "num_hidden_layers": 4, "num_attention_heads": 4},
    "llama117m": {"hidden_size": 768, "intermediate_size": 1792, "num_hidden_layers": 12, "num_attention_heads": 24},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--side", choices=SIDES, help=argparse.SUPPRESS)  # a child process runs one side
    parser.add_argument("--work", help=argparse.SUPPRESS)
    parser.add_argument("--steps", type=int, default=20, help="timed steps, after the warm-up steps")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--sides", nargs="+", choices=SIDES, default=list(SIDES))
    parser.add_argument("--model", nargs="+", choices=(*LLAMA_SIZES, "stories260k"), default=["llama16m"])
    parser.add_argument("--reference", choices=("cache", "online"), default="cache")
    parser.add_argument("--checkpointing", nargs="+", choices=("off", "on", "default"), default=["off"],
                        help="every side recomputes activations in backward, or none does, or each side as shipped "
                             "(default: TRL on, dpo_scale as `dpo-scale train` decides, plain off)")
    args = parser.parse_args()
    if args.side:
        args.model, args.checkpointing = args.model[0], args.checkpointing[0]
        from dpo_scale.training.tracking import stop_tqdm_monitor

        stop_tqdm_monitor()  # every side's process exits as `dpo-scale` does (a finished side must not abort)
        result = RUNNERS[args.side](Path(args.work), args)
        # dpo_scale sides: the `dpo-scale train` process's own peak; the others ran here
        result["peak_rss_mib"] = result.pop("process_peak_rss_mib", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
        (Path(args.work) / f"{args.side}.json").write_text(json.dumps(result))
        return

    tables = {}
    for model in args.model:
        with tempfile.TemporaryDirectory() as scratch:
            work = Path(scratch)
            parameters, unique_tokens, sequence_tokens = _prepare(work, model, args)
            for checkpointing in args.checkpointing:
                results = {side: _run_side(work, side, model, checkpointing, args) for side in args.sides}
                tables[model, checkpointing] = results
                _report(results, parameters, unique_tokens, sequence_tokens, model, checkpointing, args)
            if "dpo_scale" in args.sides and {"on", "off"} <= set(args.checkpointing):  # for the "defaults" row
                tables[model, "default"] = {"dpo_scale": _run_side(work, "dpo_scale", model, "default", args)}
    if {"on", "off"} <= set(args.checkpointing):
        _report_matched(tables, args)


def save_llama(directory: Path, name: str, max_positions: int):
    """The Llama of LLAMA_SIZES[name] over GPT-2's tokenizer, random weights (seed 0), saved with that tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from dpo_scale.data import load_tokenizer

    tokenizer = load_tokenizer(str(GPT2 / "tokenizer.json"))
    tokenizer.eos_token = "<|endoftext|>"  # GPT-2's bare tokenizer.json names no EOS; saved with the model below
    torch.manual_seed(0)
    shape = LLAMA_SIZES[name]
    config = LlamaConfig(vocab_size=len(tokenizer), **shape, num_key_value_heads=shape["num_attention_heads"],
                         max_position_embeddings=max_positions, tie_word_embeddings=True,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)  # fmt: skip
    model = LlamaForCausalLM(config)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return model


def _run_side(work: Path, side: str, model: str, checkpointing: str, args) -> dict:
    """One side in its own process (its peak RSS is its own); a failure is a result to report."""
    started = time.perf_counter()
    command = [sys.executable, __file__, "--side", side, "--work", str(work), "--steps", str(args.steps),
               "--warmup", str(args.warmup), "--batch", str(args.batch), "--max-length", str(args.max_length),
               "--model", model, "--reference", args.reference, "--checkpointing", checkpointing]  # fmt: skip
    child = subprocess.run(command, env={**os.environ, "HF_HUB_OFFLINE": "1"}, stdout=subprocess.DEVNULL,
                           stderr=subprocess.PIPE, text=True)  # fmt: skip
    if child.returncode == 0:
        result = json.loads((work / f"{side}.json").read_text())
        result["process_seconds"] = time.perf_counter() - started
    else:  # e.g. SIGKILL from the kernel's OOM killer: a result to report, not a crash of the benchmark
        how = "killed by SIGKILL (out of memory?)" if child.returncode == -9 else f"exit {child.returncode}"
        result = {"error": how, "stderr": child.stderr[-2000:]}
    print(f"{model} checkpointing {checkpointing}, {side}: done in {time.perf_counter() - started:.0f} s",
          file=sys.stderr, flush=True)  # fmt: skip
    return result


def _prepare(work: Path, model_name: str, args) -> tuple[int, int, int]:
    """The model (saved), the pairs as rows in dpo_scale's step order, and the run config."""
    import yaml
    from transformers import AutoModelForCausalLM

    from dpo_scale.config import DataConfig
    from dpo_scale.data import load_tokenizer, prepare, read_examples
    from dpo_scale.training.sampler import StepSampler

    if model_name == "stories260k":
        shutil.copytree(STORIES, work / "model")
        model = AutoModelForCausalLM.from_pretrained(work / "model")
    else:
        model = save_llama(work / "model", model_name, max_positions=1024)
    tokenizer = load_tokenizer(str(work / "model"))
    parameters = sum(p.numel() for p in model.parameters())

    needed = args.batch * (args.steps + args.warmup)
    data_config = DataConfig(str(HH), max_length=args.max_length)
    rows = []
    for example in read_examples(data_config):
        rows.append(example.as_dict())
        if len(rows) == 2 * needed:
            break
    rows_file = work / "rows.jsonl"
    rows_file.write_text("".join(json.dumps(r) + "\n" for r in rows))
    pairs = prepare(DataConfig(str(rows_file), max_length=args.max_length), tokenizer).pairs
    # dpo_scale trains on rows.jsonl with its own sampler; TRL and the plain step read ordered.jsonl in order,
    # which holds the same rows in the order that sampler takes them
    sampler = StepSampler(len(pairs), args.batch, seed=0)
    order = [i for step in range(args.steps + args.warmup) for i in sampler.step_pairs(step)]
    (work / "ordered.jsonl").write_text("".join(json.dumps(rows[pairs[i].index]) + "\n" for i in order))
    timed = [pairs[i] for i in order[args.warmup * args.batch :]]
    unique_tokens = sum(len(p.prompt_ids) + len(p.chosen_ids) + len(p.rejected_ids) for p in timed)
    padded_free_tokens = sum(2 * len(p.prompt_ids) + len(p.chosen_ids) + len(p.rejected_ids) for p in timed)
    run = {
        "model": {"path": str(work / "model")}, "data": {"path": str(rows_file), "max_length": args.max_length},
        "run_dir": str(work / "run"), "micro_batch_size": args.batch, "max_steps": args.steps + args.warmup,
        "optim": {"lr": LR, "warmup_steps": 0, "schedule": "constant", "weight_decay": 0.0, "betas": [0.9, 0.999]},
        "reference": {"source": "cache", "cache_dir": str(work / "cache")} if args.reference == "cache" else {},
        "logging": {"every": 1, "progress_bar": False}, "checkpoint": {"every": 0},
    }  # fmt: skip
    (work / "run.yaml").write_text(yaml.safe_dump(run))
    return parameters, unique_tokens, padded_free_tokens


def _run_dpo_scale(work: Path, args, deepspeed_config: str | None = None) -> dict:
    """`dpo-scale train` as a user runs it, under /usr/bin/time -v: its peak RSS is the whole process's."""
    if args.reference == "cache" and not (work / "cache" / "manifest.json").exists():
        subprocess.run([sys.executable, "-m", "dpo_scale.cli", "precompute-ref", "--config", str(work / "run.yaml")],
                       check=True, capture_output=True)  # fmt: skip
    run_dir = work / f"run-{deepspeed_config or 'default'}-checkpointing-{args.checkpointing}"
    overrides = [f"run_dir={run_dir}"]
    if args.checkpointing != "default":  # "default": as `dpo-scale train` leaves it
        overrides.append(f"deepspeed.activation_checkpointing={args.checkpointing == 'on'}")
    if deepspeed_config:
        overrides.append(f"deepspeed.config={deepspeed_config}")
    command = ["/usr/bin/time", "-v", sys.executable, "-m", "dpo_scale.cli", "train", "--config", str(work / "run.yaml")]
    finished = subprocess.run([*command, *overrides], capture_output=True, text=True)
    if finished.returncode != 0:
        raise RuntimeError(f"dpo-scale train failed: {finished.stderr[-3000:]}")
    peak_kib = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", finished.stderr).group(1))
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    history = [row for row in rows if row["split"] == "train"]
    timed = history[args.warmup :]
    return {"losses": [row["loss"] for row in history[:3]], "seconds": sum(r["seconds_per_step"] for r in timed),
            "steps": len(timed), "process_peak_rss_mib": peak_kib / 1024}  # fmt: skip


def _run_trl(work: Path, args, chunk: int | None = None, save: bool = True) -> dict:
    import logging

    from datasets import Dataset
    from transformers import AutoModelForCausalLM
    from trl import DPOConfig, DPOTrainer

    import trl.trainer.utils

    if chunk is not None:
        trl.trainer.utils._CHUNKED_LOGPROB_CHUNK_SIZE = chunk
    logging.getLogger("trl").setLevel(logging.ERROR)

    rows = [json.loads(line) for line in (work / "ordered.jsonl").read_text().splitlines()]
    config = DPOConfig(output_dir=str(work / "trl"), bf16=False, use_cpu=True, report_to=[], logging_steps=1,
                       per_device_train_batch_size=args.batch, max_length=args.max_length, learning_rate=LR,
                       lr_scheduler_type="constant", weight_decay=0.0, max_steps=args.steps + args.warmup,
                       precompute_ref_log_probs=args.reference == "cache", seed=0,
                       gradient_checkpointing=args.checkpointing != "off",  # DPOConfig's default is on
                       save_strategy="steps" if save else "no", save_steps=args.steps + args.warmup,  # as ours
                       train_sampling_strategy="sequential")  # fmt: skip
    clock = step_clock()
    trainer = DPOTrainer(model=AutoModelForCausalLM.from_pretrained(work / "model"), args=config,
                      train_dataset=Dataset.from_list(rows), processing_class=_tokenizer(work), callbacks=[clock])  # fmt: skip
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry][:3]
    timed = clock.durations[args.warmup :]
    return {"losses": losses, "seconds": sum(timed), "steps": len(timed)}


def step_clock():
    """A TRL (transformers Trainer) callback that times each optimizer step into `.durations`, waiting for the GPU,
    if there is one, at both ends."""
    from transformers import TrainerCallback

    def synchronize():
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    class StepClock(TrainerCallback):
        def __init__(self):
            self.durations, self.started = [], None

        def on_step_begin(self, *unused, **unused_too):
            synchronize()
            self.started = time.perf_counter()

        def on_step_end(self, *unused, **unused_too):
            synchronize()
            self.durations.append(time.perf_counter() - self.started)

    return StepClock()


def _run_plain(work: Path, args) -> dict:
    """Separate chosen / rejected sequences, full logits, the DPO loss, AdamW."""
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM

    from dpo_scale.config import DataConfig
    from dpo_scale.data import prepare
    from dpo_scale.model.wrapper import enable_activation_checkpointing

    tokenizer = _tokenizer(work)
    pairs = prepare(DataConfig(str(work / "ordered.jsonl"), max_length=args.max_length), tokenizer).pairs
    model = AutoModelForCausalLM.from_pretrained(work / "model")
    model.train()
    if args.checkpointing == "on":
        enable_activation_checkpointing(model)
    reference_model = AutoModelForCausalLM.from_pretrained(work / "model").eval() if args.reference == "online" else None
    pad = tokenizer.eos_token_id

    def batch_logps(model, batch):
        sequences = [p.prompt_ids + p.chosen_ids for p in batch] + [p.prompt_ids + p.rejected_ids for p in batch]
        starts = [len(p.prompt_ids) for p in batch] * 2
        width = max(map(len, sequences))
        ids = torch.tensor([s + [pad] * (width - len(s)) for s in sequences])
        mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in sequences])
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1]
        token_logps = F.log_softmax(logits.float(), dim=-1).gather(-1, ids[:, 1:, None])[..., 0]
        keep = torch.zeros_like(token_logps, dtype=torch.bool)
        for row, (start, sequence) in enumerate(zip(starts, sequences)):
            keep[row, start - 1 : len(sequence) - 1] = True
        sums = (token_logps * keep).sum(-1)
        return sums[: len(batch)], sums[len(batch) :]

    batches = [pairs[i : i + args.batch] for i in range(0, len(pairs), args.batch)][: args.steps + args.warmup]
    if reference_model is None:
        with torch.no_grad():
            precomputed = [batch_logps(model, b) for b in batches]
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.0)
    losses, durations = [], []
    for step, batch in enumerate(batches):
        started = time.perf_counter()
        if reference_model is None:
            ref_chosen, ref_rejected = precomputed[step]
        else:
            with torch.no_grad():
                ref_chosen, ref_rejected = batch_logps(reference_model, batch)
        chosen, rejected = batch_logps(model, batch)
        logits = 0.1 * ((chosen - ref_chosen) - (rejected - ref_rejected))
        loss = -F.logsigmoid(logits).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        durations.append(time.perf_counter() - started)
        losses.append(loss.item())
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, work / "plain-final.pt")
    timed = durations[args.warmup :]
    return {"losses": losses[:3], "seconds": sum(timed), "steps": len(timed)}


def _tokenizer(work: Path):
    from dpo_scale.data import load_tokenizer

    return load_tokenizer(str(work / "model"))


def _matmul_gflops() -> float:
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    for _ in range(3):
        a @ b
    started, reps = time.perf_counter(), 10
    for _ in range(reps):
        a @ b
    return 2 * 2048**3 * reps / (time.perf_counter() - started) / 1e9


def _report(results: dict, parameters: int, unique_tokens: int, sequence_tokens: int, model_name: str,
            checkpointing: str, args) -> None:
    """`unique_tokens`: prompt + chosen + rejected of the timed pairs; `sequence_tokens`: the same with the prompt
    counted twice (what chosen and rejected as separate sequences hold, padding aside)."""
    model = "stories260K" if model_name == "stories260k" else "Llama, GPT-2 vocabulary"
    reference = "precomputed reference" if args.reference == "cache" else "online reference copy"
    recompute = "with" if checkpointing == "on" else "without"
    print(f"\n{parameters / 1e6:.2f}M-parameter {model}, HH-RLHF helpful-base, max_length {args.max_length}, batch "
          f"{args.batch} pairs, fp32, {reference}, {recompute} activation checkpointing, {args.steps} timed steps "
          f"after {args.warmup}; torch {torch.__version__}, {torch.get_num_threads()} threads\n")  # fmt: skip
    matmul = _matmul_gflops()
    print("| side | pairs/s | tokens/s (sequence) | GFLOP/s (6 N x unique tokens) | of matmul rate | peak RSS (MiB) "
          "| process s | first losses |\n|---|---|---|---|---|---|---|---|")  # fmt: skip
    rates = {}
    for side, result in results.items():
        if "error" in result:
            print(f"| {side} | {result['error']} | | | | | | |")
            continue
        seconds = result["seconds"]
        rates[side] = args.batch * args.steps / seconds
        flops = 6 * parameters * unique_tokens / seconds / 1e9
        losses = ", ".join(f"{x:.6f}" for x in result["losses"])
        print(f"| {side} | {rates[side]:.2f} | {sequence_tokens / seconds:,.0f} | {flops:.2f} | {flops / matmul:.1%} "
              f"| {result['peak_rss_mib']:,.0f} | {result['process_seconds']:.0f} | {losses} |")  # fmt: skip
    trl_sides = [s for s in ("trl", "trl_cpu_chunk", "trl_cpu_chunk_no_save") if s in rates]  # those that finished
    print()
    for ours in ("dpo_scale", "dpo_scale_zero3"):
        if ours not in rates:
            continue
        for trl_side in trl_sides:
            print(f"{ours} / {trl_side}: {rates[ours] / rates[trl_side]:.2f}x pairs/s, "
                  f"{results[ours]['peak_rss_mib'] / results[trl_side]['peak_rss_mib']:.2f}x peak RSS")
        if "plain" in rates:
            print(f"{ours} / plain full-logits step: {rates[ours] / rates['plain']:.2f}x pairs/s")
    print(f"fp32 matmul (2048 x 2048, this machine now): {matmul:.0f} GFLOP/s")


def _report_matched(tables: dict, args) -> None:
    """Ours against TRL's chunked side without its save at the same checkpointing, and each as users leave it."""
    trl_side = "trl_cpu_chunk_no_save" if "trl_cpu_chunk_no_save" in args.sides else "trl_cpu_chunk"
    print("\nMatched settings: dpo_scale against", trl_side, "\n")
    print("| model | setting | TRL pairs/s, peak RSS (MiB) | ours pairs/s, peak RSS (MiB) | ours / TRL |")
    print("|---|---|---|---|---|")
    for model in args.model:
        for setting, ours_key, trl_key in (("defaults (TRL on, ours as default)", "default", "on"),
                                           ("checkpointing on, both", "on", "on"),
                                           ("checkpointing off, both", "off", "off")):  # fmt: skip
            ours, trl = tables[model, ours_key].get("dpo_scale", {}), tables[model, trl_key].get(trl_side, {})
            if "seconds" not in ours or "seconds" not in trl:
                print(f"| {model} | {setting} | {trl.get('error', '')} | {ours.get('error', '')} | |")
                continue
            ours_rate, trl_rate = (args.batch * r["steps"] / r["seconds"] for r in (ours, trl))
            print(f"| {model} | {setting} | {trl_rate:.3f}, {trl['peak_rss_mib']:,.0f} | {ours_rate:.3f}, "
                  f"{ours['peak_rss_mib']:,.0f} | {ours_rate / trl_rate:.1f}x speed, "
                  f"{ours['peak_rss_mib'] / trl['peak_rss_mib']:.2f}x memory |")


RUNNERS = {
    "dpo_scale": _run_dpo_scale,
    "dpo_scale_zero3": lambda work, args: _run_dpo_scale(work, args, deepspeed_config="zero3"),
    "trl": _run_trl,
    "trl_cpu_chunk": lambda work, args: _run_trl(work, args, chunk=1024),
    "trl_cpu_chunk_no_save": lambda work, args: _run_trl(work, args, chunk=1024, save=False),
    "plain": _run_plain,
}

if __name__ == "__main__":
    main()

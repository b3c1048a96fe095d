"""Sequence parallelism (Ulysses) on CPU: per-rank peak memory and step time for one long pair per micro-batch.

    python bench/bench_sequence_parallel.py                          # 512, 8k, 16k tokens; SP 1, 2, 4; both layouts
    python bench/bench_sequence_parallel.py --lengths 512 4096 --sizes 1 2
    python bench/bench_sequence_parallel.py --layouts padded --lengths 512 24576 --sizes 2   # a predicted length
    BENCH=sequence_parallel bash bench/gpu.sh   # GPUs: 32k and 64k tokens, SP 2/4/8, flex, bf16 (see gpu.sh)

A wide, shallow Llama (hidden 1,024, 16 heads of 64, 2 layers, intermediate 2,048, a 68-word vocabulary: 18.9M
parameters, almost all of them in the decoder) is generated here with a word-level tokenizer, one token a word, so
a pair's length is exact: prompt L/2 tokens (BOS included), chosen and rejected L/4 each (EOS included), L tokens in
all. Every run is `dpo-scale train` through the real launcher (`deepspeed --num_gpus SP`, gloo, one thread a
rank) with world = SP (data-parallel degree 1, so every run trains the same global batch of one pair), ZeRO-3 for
every SP (`deepspeed.config=zero3`, SP=1 included, so the sizes compare like for like), fp32, the default reference
(a frozen copy), 2 optimizer steps, no checkpoints, under `/usr/bin/time -v`.

Each rank reports its own peak resident set (VmHWM at exit; on a GPU also torch.cuda.max_memory_allocated) and the
bytes it sent through
`torch.distributed.all_to_all_single`: this file is the script the launcher starts on every rank (`--rank`), which
installs both hooks and then runs `dpo_scale.cli.main` unchanged; the library has no benchmark hooks.
Context memory = peak RSS at L tokens minus the same configuration's peak RSS at 512 tokens.

Layouts: `padded` (logps.prefix_sharing=false logps.packing=false: chosen and rejected as two rows of 3L/4, causal
SDPA with no mask under sequence parallelism, so attention memory is linear in T on this CPU) and `prefix_shared`
(the default: one row of L tokens, whose dense L x L mask every rank of the group builds whole: an fp32 additive mask
of 4 L^2 bytes plus the boolean one it comes from, L^2 bytes).
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import random
import re
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

LAYOUTS = {
    "padded": ["logps.prefix_sharing=false", "logps.packing=false"],
    "prefix_shared": [],  # the defaults: prefix sharing and packing, the dense mask on CPU
}
SHAPE = {"hidden_size": 1024, "intermediate_size": 2048, "num_hidden_layers": 2, "num_attention_heads": 16}
WORDS = [f"w{i}" for i in range(64)]
STEPS = 2
PAIRS = 4  # more pairs than steps: one pair a step, DP=1


def rank_main(argv: list[str]) -> None:
    """On every rank the launcher starts: count all-to-all bytes, record VmHWM at exit, run `dpo-scale` as is."""
    import torch
    import torch.distributed as dist

    sent = {"calls": 0, "bytes": 0}
    all_to_all_single = dist.all_to_all_single

    def counting(output, input, *args, **kwargs):
        # bytes this rank sends to the other ranks of the group: all of `input` except its own equal share
        group = kwargs.get("group") or (args[2] if len(args) > 2 else None)
        size = dist.get_world_size(group)
        sent["calls"] += 1
        sent["bytes"] += input.numel() * input.element_size() * (size - 1) // size
        return all_to_all_single(output, input, *args, **kwargs)

    dist.all_to_all_single = counting

    def report() -> None:
        status = Path("/proc/self/status").read_text()
        peak_kib = int(re.search(r"VmHWM:\s+(\d+)", status).group(1))
        rank = os.environ.get("RANK", "0")
        gpu = {"peak_gpu_mib": torch.cuda.max_memory_allocated() / 2**20} if torch.cuda.is_available() else {}
        Path(os.environ["SP_BENCH_OUT"], f"rank{rank}.json").write_text(
            json.dumps({"rank": int(rank), "peak_rss_mib": peak_kib / 1024, **gpu, **sent})
        )

    atexit.register(report)
    from dpo_scale.cli import main

    sys.exit(main(argv))


def prepare(work: Path, lengths: list[int]) -> None:
    """The model and tokenizer (saved), and one JSONL of PAIRS pairs of exactly L tokens per length."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from dpo_scale.commands.demo import write_tokenizer

    model_dir = work / "model"
    tokenizer = write_tokenizer(model_dir, WORDS)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), **SHAPE, num_key_value_heads=SHAPE["num_attention_heads"],
                         max_position_embeddings=max(lengths), bos_token_id=1, eos_token_id=2,
                         pad_token_id=0)  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(model_dir)
    rng = random.Random(0)
    for length in lengths:
        words = lambda n: " ".join(rng.choice(WORDS) for _ in range(n))  # noqa: E731
        # BOS + L/2 - 1 prompt words; L/4 - 1 words + EOS per completion: L tokens in all
        rows = [{"prompt": words(length // 2 - 1), "chosen": " " + words(length // 4 - 1),
                 "rejected": " " + words(length // 4 - 1)} for _ in range(PAIRS)]  # fmt: skip
        (work / f"pairs-{length}.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    check = tokenizer(rows[0]["prompt"] + rows[0]["chosen"] + tokenizer.eos_token)["input_ids"]
    assert len(check) == length // 2 + length // 4, (len(check), length)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def run(work: Path, layout: str, length: int, size: int, overrides: list[str]) -> dict:
    """`dpo-scale train` on `size` ranks (through this file's --rank hook) under /usr/bin/time -v."""
    name = f"{layout}-{length}-sp{size}"
    out = work / name
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir()
    bin_dir = Path(sys.executable).parent
    command = [
        "/usr/bin/time", "-v", str(bin_dir / "deepspeed"), "--num_gpus", str(size), "--master_port", str(free_port()),
        __file__, "--rank", "train", "--config", str(work / "run.yaml"), f"data.path={work}/pairs-{length}.jsonl",
        f"data.max_length={length}", f"run_dir={out}/run", f"sequence_parallel_size={size}", *LAYOUTS[layout],
        *overrides,
    ]  # fmt: skip
    repo = str(Path(__file__).resolve().parents[1])  # the ranks import this checkout's dpo_scale
    env = {**os.environ, "SP_BENCH_OUT": str(out), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join([repo, os.environ.get("PYTHONPATH", "")])}  # fmt: skip
    finished = subprocess.run(command, env=env, capture_output=True, text=True)
    (out / "stderr.log").write_text(finished.stderr)
    (out / "stdout.log").write_text(finished.stdout)
    result = {"layout": layout, "length": length, "sp": size, "command": " ".join(command[2:])}
    ranks = [json.loads(p.read_text()) for p in sorted(out.glob("rank*.json"))]
    if finished.returncode != 0 or len(ranks) != size:
        result["error"] = f"exit {finished.returncode}: " + (finished.stderr + finished.stdout)[-3000:]
        return result
    metrics = [json.loads(line) for line in (out / "run" / "metrics.jsonl").read_text().splitlines()]
    train = [row for row in metrics if row["split"] == "train"]
    wall = re.search(r"Elapsed \(wall clock\) time.*: (\S+)", finished.stderr).group(1)
    result.update(
        peak_rss_mib=max(r["peak_rss_mib"] for r in ranks), peak_rss_by_rank=[r["peak_rss_mib"] for r in ranks],
        peak_gpu_mib=max((r.get("peak_gpu_mib", 0.0) for r in ranks), default=0.0),
        all_to_all_calls=ranks[0]["calls"], all_to_all_bytes=ranks[0]["bytes"],
        losses=[row["loss"] for row in train], seconds_per_step=[row["seconds_per_step"] for row in train], wall=wall,
    )  # fmt: skip
    return result


def expected_all_to_all_bytes(layout: str, length: int, size: int) -> int:
    """Per rank and optimizer step: per layer, q, k, v and the output forward and the same four backward, each
    sending (SP-1)/SP of rows x T/SP x heads x head_dim x 4 bytes; the policy's forward and backward plus the frozen
    reference's forward (4 more per layer). T is the row length padded to a multiple of SP."""
    if size == 1:
        return 0
    rows, tokens = (2, 3 * length // 4) if layout == "padded" else (1, length)
    tokens = -(-tokens // size) * size
    one = (size - 1) * rows * (tokens // size) * SHAPE["hidden_size"] * 4 // size  # heads x head_dim = hidden
    return one * 4 * SHAPE["num_hidden_layers"] * (2 + 1)  # policy forward + backward, reference forward


def main() -> None:
    if "--rank" in sys.argv:  # started by the launcher, which puts --local_rank=N first
        rank_main([a for a in sys.argv[1:] if a != "--rank" and not a.startswith("--local_rank")])
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[512, 8192, 16384])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--layouts", nargs="+", choices=list(LAYOUTS), default=list(LAYOUTS))
    parser.add_argument("--overrides", nargs="*", default=[],
                        help="more `dpo-scale train` overrides for every run, e.g. logps.attention=flex "
                             "deepspeed.precision=bf16 (the GPU command in bench/gpu.sh)")  # fmt: skip
    parser.add_argument("--work", help="keep the material and run outputs here (default: a temporary directory)")
    parser.add_argument("--json", help="also write every result here")
    args = parser.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="sp-bench-")).resolve()
    work.mkdir(parents=True, exist_ok=True)
    prepare(work, args.lengths)
    import yaml

    run_config = {
        "model": {"path": str(work / "model")}, "data": {"path": "set per run"}, "run_dir": "set per run",
        "micro_batch_size": 1, "max_steps": STEPS, "deepspeed": {"config": "zero3"},
        "eval": {"fraction": 0.0}, "logging": {"every": 1, "progress_bar": False}, "checkpoint": {"every": 0},
    }  # fmt: skip
    (work / "run.yaml").write_text(yaml.safe_dump(run_config))
    results = []
    for layout in args.layouts:
        for length in args.lengths:
            for size in args.sizes:
                result = run(work, layout, length, size, args.overrides)
                results.append(result)
                print(json.dumps({k: v for k, v in result.items() if k != "command"}), file=sys.stderr, flush=True)
                if args.json:
                    Path(args.json).write_text(json.dumps(results, indent=1))
    report(results, min(args.lengths))


def report(results: list[dict], base_length: int) -> None:
    """Context memory from the peak RSS on a CPU, from the peak GPU memory allocated where the runs had GPUs."""
    peak = "peak_gpu_mib" if any(r.get("peak_gpu_mib") for r in results) else "peak_rss_mib"
    base = {(r["layout"], r["sp"]): r.get(peak) for r in results if r["length"] == base_length}
    what = "peak GPU allocated" if peak == "peak_gpu_mib" else "peak RSS"
    print(f"| layout | tokens | SP | {what} per rank (MiB) | context memory (MiB) | vs SP=1 | s/step | "
          "all-to-all MiB per rank and step: counted / formula | losses |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|")
    context = {}
    for r in results:
        key = (r["layout"], r["length"], r["sp"])
        if "error" in r:
            print(f"| {r['layout']} | {r['length']:,} | {r['sp']} | failed: {r['error'][:200]!r} | | | | | |")
            continue
        extra = r[peak] - base[(r["layout"], r["sp"])] if base.get((r["layout"], r["sp"])) else None
        context[key] = extra
        one = context.get((r["layout"], r["length"], 1))
        ratio = f"{extra / one:.2f}x" if extra is not None and one and r["length"] != base_length else ""
        formula = expected_all_to_all_bytes(r["layout"], r["length"], r["sp"])
        counted = r["all_to_all_bytes"] / STEPS
        print(f"| {r['layout']} | {r['length']:,} | {r['sp']} | {r[peak]:,.0f} | "
              f"{'' if extra is None or r['length'] == base_length else f'{extra:,.0f}'} | {ratio} | "
              f"{', '.join(f'{s:.1f}' for s in r['seconds_per_step'])} | "
              f"{counted / 2**20:,.1f} / {formula / 2**20:,.1f} | "
              f"{', '.join(f'{x:.6f}' for x in r['losses'])} |")  # fmt: skip


if __name__ == "__main__":
    main()

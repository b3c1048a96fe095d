"""Portable checkpoints against DeepSpeed's native format: save and load time, bytes on disk, and the memory a save
adds, on the same engine and world size.

    python bench/bench_checkpoint.py                       # 16M and ~300M Llama configs, ZeRO-3, 2 CPU ranks, fp32
    python bench/bench_checkpoint.py --sizes 16m --ranks 2

Each size runs under the real `deepspeed` launcher: the run is built as `dpo-scale train` builds it (train.build on
the demo pairs, reference-free loss so no reference copy shares the memory), trains one step so AdamW's moments
exist, then on the same engine, in alternating order over --repeats rounds:
- portable: `checkpoint.save` (each rank gathers and writes its share of the per-parameter fp32 state; rank 0
  streams model.safetensors) and `checkpoint.restore`;
- native: what dpo_scale wrote before (DeepSpeed's `engine.save_checkpoint` + the same model.safetensors) and
  `engine.load_checkpoint`.
Times are wall-clock between barriers on rank 0 (the median of the rounds); the extra memory is the peak resident
set size during the save minus the size just before it, sampled every 2 ms on every rank (the largest rank is
reported), against the largest parameter's fp32 bytes.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

SIZES = {
    "16m": dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=8, vocab_size=50257),
    "300m": dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=24, num_attention_heads=16,
                 vocab_size=32000),
}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--worker", help=argparse.SUPPRESS)  # the launched ranks: the work directory
    parser.add_argument("--local_rank", help=argparse.SUPPRESS)  # added by the deepspeed launcher
    args = parser.parse_args()
    if args.worker:
        _worker(Path(args.worker), args.repeats)
        return
    for size in args.sizes:
        print(json.dumps({"size": size, "ranks": args.ranks, **_launch(size, args.ranks, args.repeats)}), flush=True)


def _launch(size: str, ranks: int, repeats: int) -> dict:
    from transformers import LlamaConfig, LlamaForCausalLM

    from dpo_scale.commands.demo import write_demo_material
    from dpo_scale.distributed import free_port

    work = Path(tempfile.mkdtemp(prefix=f"bench-checkpoint-{size}-"))
    try:
        model_dir, _ = write_demo_material(work / "demo", rows=64)
        config = LlamaConfig(**SIZES[size], max_position_embeddings=512, tie_word_embeddings=False)
        model = LlamaForCausalLM(config)
        model.save_pretrained(model_dir, safe_serialization=True)  # the demo tokenizer's ids fit any vocabulary
        parameters = sum(p.numel() for p in model.parameters())
        largest = max(p.numel() for p in model.parameters()) * 4
        del model
        command = ["deepspeed", "--num_gpus", str(ranks), "--master_port", str(free_port()), __file__,
                   "--worker", str(work), "--repeats", str(repeats)]  # fmt: skip
        result = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        lines = [line for line in result.stdout.splitlines() if line.startswith("RESULT ")]
        if result.returncode or not lines:
            raise SystemExit(result.stdout[-3000:] + result.stderr[-3000:])
        measured = json.loads(lines[0].removeprefix("RESULT "))
        return {"parameters": parameters, "largest_parameter_fp32_bytes": largest, **measured,
                "extra_memory_vs_largest_parameter": round(measured["save_extra_rss_bytes"] / largest, 2)}
    finally:
        shutil.rmtree(work, ignore_errors=True)


class PeakRss:
    """The peak resident set size of this process while the block runs, above its size at the start."""

    def __enter__(self) -> PeakRss:
        self.start = self.peak = _rss()
        self._running = True
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while self._running:
            self.peak = max(self.peak, _rss())
            time.sleep(0.002)

    def __exit__(self, *exc) -> None:
        self._running = False
        self._thread.join()
        self.peak = max(self.peak, _rss())

    @property
    def extra(self) -> int:
        return self.peak - self.start


def _rss() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _worker(work: Path, repeats: int) -> None:
    import torch
    from safetensors.torch import save_file

    from dpo_scale import distributed
    from dpo_scale.commands import train
    from dpo_scale.config import TrainConfig, build
    from dpo_scale.training import checkpoint

    tree = {
        "model": {"path": str(work / "demo" / "model")}, "data": {"path": str(work / "demo" / "preferences.jsonl")},
        "run_dir": str(work / "run"), "loss": {"loss_type": "simpo"}, "max_steps": 1, "micro_batch_size": 2,
        "checkpoint": {"every": 0}, "logging": {"progress_bar": False},
    }  # fmt: skip
    config = build(TrainConfig, tree)
    world = distributed.init(config.deepspeed.timeout_s)
    state = train.build(config, world)
    train.train(state)  # one step (AdamW's moments exist), then the run's own final checkpoint
    engine = state.engine

    def timed(action) -> tuple[float, int]:
        torch.distributed.barrier()
        start = time.perf_counter()
        with PeakRss() as rss:
            action()
            torch.distributed.barrier()
        seconds = time.perf_counter() - start
        peak = torch.tensor([float(rss.extra)])
        torch.distributed.all_reduce(peak, op=torch.distributed.ReduceOp.MAX)
        return seconds, int(peak.item())

    native = work / "native"

    def native_save() -> None:
        engine.save_checkpoint(str(native / "ds"), tag=checkpoint.NATIVE_ENGINE_TAG, save_latest=False)
        weights = engine._zero3_consolidated_16bit_state_dict()  # rank 0 gathers the whole model, as before
        if world.is_main:
            save_file({k.removeprefix("model."): v.contiguous() for k, v in weights.items()}, native / "model.safetensors")

    portable_path = Path(config.run_dir) / "checkpoints" / "step-00000001"
    rows = {"save": [], "load": [], "native_save": [], "native_load": [], "save_rss": [], "native_save_rss": []}
    for round_ in range(repeats):
        order = [("native", native_save), ("portable", None)] if round_ % 2 else [("portable", None), ("native", native_save)]
        for kind, action in order:
            if kind == "portable":
                seconds, extra = timed(lambda: checkpoint.save(engine, 1, config, world))
                rows["save"].append(seconds), rows["save_rss"].append(extra)
                rows["load"].append(timed(lambda: checkpoint.restore(engine, portable_path, world))[0])
            else:
                if world.is_main:
                    shutil.rmtree(native, ignore_errors=True)
                    native.mkdir()
                torch.distributed.barrier()
                seconds, extra = timed(action)
                rows["native_save"].append(seconds), rows["native_save_rss"].append(extra)
                rows["native_load"].append(timed(
                    lambda: engine.load_checkpoint(str(native / "ds"), tag=checkpoint.NATIVE_ENGINE_TAG))[0])
    if world.is_main:
        median = {key: statistics.median(values) for key, values in rows.items()}
        result = {
            "save_s": round(median["save"], 3), "native_save_s": round(median["native_save"], 3),
            "load_s": round(median["load"], 3), "native_load_s": round(median["native_load"], 3),
            "save_ratio": round(median["save"] / median["native_save"], 2),
            "load_ratio": round(median["load"] / median["native_load"], 2),
            "bytes": _bytes(portable_path), "native_bytes": _bytes(native),
            "save_extra_rss_bytes": max(rows["save_rss"]), "native_save_extra_rss_bytes": max(rows["native_save_rss"]),
            "rounds": repeats,
        }  # fmt: skip
        print("RESULT " + json.dumps(result), flush=True)
    distributed.close()


def _bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


if __name__ == "__main__":
    sys.exit(main())

"""The token store against the `datasets` map path from 10k to 1M pairs: first build, reopen to the first batch,
memory per rank, disk per pair and random access; with --train, `dpo-scale train` before and after the store.

    python bench/bench_data_scale.py --sizes 10000 100000 1000000
    git worktree add /tmp/bench_ds/before 7d04e0a       # the commit before the store, for --before
    python bench/bench_data_scale.py --train --train-pairs 10000 100000 --before /tmp/bench_ds/before

Pairs: HH-RLHF's four test splits cycled, each transcript prefixed with "\\n\\nHuman: [i]" so that every row is
unique; the GPT-2 tokenizer, max_length 512. Every measured step is its own child process under `/usr/bin/time -v`
(peak RSS of the largest process, user + sys CPU seconds of the whole tree, wall), and the summed PSS of the child's
process tree (the store's worker pool included) is sampled every 0.2 s beside it.

- store: `load_prepared` into a fresh directory: the store `dpo-scale prepare-data` and `train` build, with
  data.num_workers spawned workers (default: the cores; the pool starts only when there are two shards or more).
- datasets: TRL's DPOTrainer path as one batched `map` (default num_proc) over `load_dataset("json")`, in a fresh
  HF_DATASETS_CACHE: split off the implicit prompt, tokenize prompt, prompt+chosen+eos and prompt+rejected+eos with
  the tokenizer called on lists, cut at the common prefix. The prompt is cut where dpo_scale cuts it (after the
  last "\\n\\nAssistant:" of the shared text), so both sides tokenize the same texts. Like TRL's, the mapped
  dataset keeps the texts beside the ids and is not truncated (TRL cuts to max_length in its collator): hence the
  tokens per pair reported for each side.

Reported per size (pairs: input rows): (1) first build: wall, pairs/s, pairs per CPU-second; (2) reopen: a fresh
process imports, opens what was built, holds out 5% (split_held_out), builds the StepSampler (micro-batch 4, no
accumulation, one rank) and reads its first 4 micro-batches (steps 0-3); the datasets side calls load_dataset and
map again (both cache hits, checked) and reads as many random rows; (3) data RSS per rank: that child's peak RSS
minus the peak of a child that imports the same modules and nothing else (the loaded tokenizer, about 46 MiB
whatever the data, is in it and shown apart); (4) disk bytes per pair; (5) the format: open time and µs per pair of
1,000 random reads from the store and from the Arrow file the map wrote (id columns only), in a separate child:
first reads (the store checks a shard's checksum at its first read) and 1,000 more. Files are in the page cache
throughout (just written): this compares formats, not disks.

--train: `dpo-scale train max_steps=1` at each size of --train-pairs with a 2-layer, 64-wide Llama at GPT-2's
vocabulary (so that the model is not what is measured), zero0, copy reference, launched twice per size, the second
launch in a NEW run_dir (another experiment on the same data), with a fresh DPO_SCALE_CACHE per side. After: the
second launch finds the store the first built under the cache root. Before (--before, a checkout of an earlier
commit run as `python -m dpo_scale.cli` with PYTHONPATH): what that commit did (7d04e0a tokenizes in memory at
every launch; 972b71f builds a store in each run_dir/token-store).
"""

from __future__ import annotations

import argparse
import gzip
import itertools
import json
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from importlib.metadata import version
from pathlib import Path

STARTED = time.perf_counter()  # a child's "process start" for time-to-first-batch (stdlib imports above: ~20 ms)

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
HH_SPLITS = ("helpful-base", "harmless-base", "helpful-online", "helpful-rejection-sampled")
GPT2 = SHARED / "tokenizers/gpt2/tokenizer.json"
EOS = "<|endoftext|>"
ASSISTANT = "\n\nAssistant:"
MAX_LENGTH = 512
HELD_OUT = 0.05
MICRO_BATCH = 4
FIRST_MICRO_BATCHES = 4
SEED = 0
ID_COLUMNS = ["prompt_ids", "chosen_ids", "rejected_ids"]
TRAIN_OVERRIDES = ["max_steps=1", "deepspeed.config=zero0", "checkpoint.every=0", "checkpoint.resume=never",
                   "logging.progress_bar=false", "reference.source=copy"]  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", nargs=2, metavar=("NAME", "SPEC_JSON"), help=argparse.SUPPRESS)  # one measured step
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--workers", type=int, help="data.num_workers of the store build (default: the cores)")
    parser.add_argument("--shard-rows", type=int, default=8192, help="data.shard_rows of the store")
    parser.add_argument("--num-proc", type=int, help="num_proc of the datasets map (default: map's, one process)")
    parser.add_argument("--reads", type=int, default=1000, help="random pairs read per round in the format check")
    parser.add_argument("--train", action="store_true", help="time `dpo-scale train max_steps=1` instead")
    parser.add_argument("--train-pairs", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--before", type=Path, help="a worktree of the code before the store (git worktree add)")
    parser.add_argument("--work", type=Path, help="scratch directory (default: a temporary one, removed after)")
    parser.add_argument("--keep", action="store_true", help="keep each size's stores and caches")
    args = parser.parse_args()
    if args.child:
        name, spec = args.child[0], json.loads(Path(args.child[1]).read_text())
        result = CHILDREN[name](spec)
        Path(spec["out"]).write_text(json.dumps(result))
        return

    work = args.work or Path(tempfile.mkdtemp(prefix="bench_data_scale-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        print(f"    python bench/bench_data_scale.py {shlex.join(sys.argv[1:])}\n")
        print(_machine() + "\n")
        tokenizer_dir = _write_tokenizer(work / "gpt2")
        if args.train:
            _report_train(_bench_train(args, work, tokenizer_dir), args)
        else:
            _report_sizes(_bench_sizes(args, work, tokenizer_dir), args)
    finally:
        if args.work is None and not args.keep:
            shutil.rmtree(work, ignore_errors=True)


# ---------------------------------------------------------------- the parent: material, children, measurements


def _machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())  # fmt: skip
    ram_kib = int(re.search(r"MemTotal:\s+(\d+)", Path("/proc/meminfo").read_text()).group(1))
    packages = ", ".join(f"{name} {version(name)}" for name in ("torch", "transformers", "datasets", "tokenizers"))
    return (f"{len(os.sched_getaffinity(0))} cores (nproc), {cpu}, {ram_kib / 2**20:.0f} GiB RAM; "
            f"Python {platform.python_version()}, {packages}")  # fmt: skip


def _write_tokenizer(directory: Path) -> Path:
    """GPT-2's tokenizer.json with its EOS named, saved as a directory (what train and AutoTokenizer load)."""
    from dpo_scale.data import load_tokenizer

    if not (directory / "tokenizer_config.json").exists():
        tokenizer = load_tokenizer(str(GPT2))
        tokenizer.eos_token = EOS  # a bare tokenizer.json names no EOS
        tokenizer.save_pretrained(directory)
    if load_tokenizer(str(directory)).eos_token != EOS:
        raise SystemExit(f"{directory}: the saved tokenizer reloads without eos_token {EOS}")
    return directory


def _synthetic_pairs(work: Path, count: int) -> Path:
    """`count` unique HH-style rows: the test splits cycled, each transcript tagged with its row number."""
    path = work / f"hh-{count}.jsonl"
    if path.exists():
        return path
    rows = []
    for split in HH_SPLITS:
        with gzip.open(SHARED / "preferences/hh-rlhf" / split / "test.jsonl.gz", "rt") as handle:
            rows += [json.loads(line) for line in handle]
    aside = path.with_suffix(".partial")
    with open(aside, "w") as handle:
        for i, row in zip(range(count), itertools.cycle(rows)):
            tag = f"\n\nHuman: [{i}]"
            handle.write(json.dumps({"chosen": tag + row["chosen"], "rejected": tag + row["rejected"]}) + "\n")
    aside.rename(path)
    return path


def _measure(command: list[str], log: Path, env: dict | None = None, cwd: Path | None = None) -> dict:
    """Run `command` under /usr/bin/time -v (its output to `log`), sampling its process tree's summed PSS."""
    timing = log.with_suffix(".time")
    with open(log, "w") as out:
        process = subprocess.Popen(["/usr/bin/time", "-v", "-o", str(timing), *command], stdout=out,
                                   stderr=subprocess.STDOUT, env=env, cwd=cwd)  # fmt: skip
        tree_pss_kib = 0
        while process.poll() is None:
            tree_pss_kib = max(tree_pss_kib, sum(map(_pss_kib, _descendants(process.pid))))
            time.sleep(0.2)
    fields = dict(re.findall(r"^\s*(.+?): (.*)$", timing.read_text(), re.MULTILINE))
    if process.returncode != 0:
        tail = "\n".join(log.read_text().splitlines()[-40:])
        raise RuntimeError(f"exit {process.returncode}: {shlex.join(command)}\n--- {log}, last lines:\n{tail}")
    *hours_minutes, seconds = fields["Elapsed (wall clock) time (h:mm:ss or m:ss)"].split(":")
    user, system = float(fields["User time (seconds)"]), float(fields["System time (seconds)"])
    return {
        "wall_s": sum(float(x) * 60 ** (len(hours_minutes) - i) for i, x in enumerate(hours_minutes)) + float(seconds),
        "cpu_s": user + system,
        "peak_rss_mib": int(fields["Maximum resident set size (kbytes)"]) / 1024,
        "tree_pss_mib": tree_pss_kib / 1024,
    }


def _descendants(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                parent = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError):
                continue  # gone meanwhile
            children.setdefault(parent, []).append(int(entry))
    found, stack = [], [root]
    while stack:
        for child in children.get(stack.pop(), []):
            found.append(child)
            stack.append(child)
    return found


def _pss_kib(pid: int) -> int:
    try:
        return int(re.search(r"^Pss:\s+(\d+)", Path(f"/proc/{pid}/smaps_rollup").read_text(), re.MULTILINE).group(1))
    except (OSError, AttributeError):
        return 0


def _run_child(name: str, spec: dict, directory: Path, env: dict | None = None, label: str | None = None) -> dict:
    """One measured step: this script with --child, its result JSON and its /usr/bin/time figures."""
    label = label or name
    spec = {**spec, "out": str(directory / f"{label}.json")}
    spec_file = directory / f"{label}.spec.json"  # a file, not an argument: a module list outgrows argv's limit
    spec_file.write_text(json.dumps(spec))
    measured = _measure([sys.executable, __file__, "--child", name, str(spec_file)], directory / f"{label}.log",
                        env={**os.environ, **(env or {})})  # fmt: skip
    return {**measured, **json.loads(Path(spec["out"]).read_text())}


def _bytes(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.rglob("*") if p.is_file())


def _bench_sizes(args, work: Path, tokenizer_dir: Path) -> dict[int, dict]:
    results = {}
    for size in args.sizes:
        started = time.perf_counter()
        base = work / f"n{size}"
        shutil.rmtree(base, ignore_errors=True)
        base.mkdir()
        spec = {
            "data": str(_synthetic_pairs(work, size)), "tokenizer": str(tokenizer_dir), "store": str(base / "store"),
            "workers": args.workers, "shard_rows": args.shard_rows, "num_proc": args.num_proc, "reads": args.reads,
        }  # fmt: skip
        hf = {"HF_DATASETS_CACHE": str(base / "hf-cache"), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
        r = {"store_build": _run_child("store_build", spec, base)}
        r["store_reopen"] = _run_child("store_reopen", spec, base)
        modules = {"modules": r["store_reopen"].pop("modules")}
        r["store_imports"] = _run_child("imports", modules, base, label="store_imports")
        r["map_build"] = _run_child("map_build", spec, base, hf)
        spec["map_files"] = r["map_build"]["map_files"]
        r["map_reopen"] = _run_child("map_reopen", spec, base, hf)
        r["map_imports"] = _run_child("imports", {"modules": r["map_reopen"].pop("modules")}, base, hf, "map_imports")
        r["access"] = _run_child("access", spec, base, hf)
        r["disk"] = {"store": _bytes(base / "store"), "hf_cache": _bytes(base / "hf-cache"),
                     "map_output": sum(Path(f).stat().st_size for f in spec["map_files"])}  # fmt: skip
        results[size] = r
        if not args.keep:
            shutil.rmtree(base)
        print(f"{size:,} pairs: measured in {time.perf_counter() - started:.0f} s", file=sys.stderr, flush=True)
    return results


def _bench_train(args, work: Path, tokenizer_dir: Path) -> list[dict]:
    import yaml

    model_dir = _write_model(work / "model", tokenizer_dir)
    sides = [("after", [str(Path(sys.executable).parent / "dpo-scale")], {})]
    if args.before:
        before = args.before.resolve()
        env = {"PYTHONPATH": str(before)}
        # run from `work`, not the repository: `python -m` puts the working directory first on sys.path
        found = subprocess.run(
            [sys.executable, "-c", "import dpo_scale; print(dpo_scale.__file__)"], cwd=work,
            env={**os.environ, **env}, capture_output=True, text=True, check=True,
        ).stdout.strip()  # fmt: skip
        if not Path(found).is_relative_to(before):
            raise SystemExit(f"--before {before}: `import dpo_scale` found {found} instead")
        commit = subprocess.run(["git", "-C", str(before), "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True).stdout.strip()  # fmt: skip
        print(f"before: dpo_scale imported from {found} (commit {commit or 'unknown'})\n")
        sides.append((f"before ({commit})", [sys.executable, "-m", "dpo_scale.cli"], env))
    rows = []
    for side, (name, launcher, env) in enumerate(sides):
        env = {**os.environ, **env, "DPO_SCALE_CACHE": str(work / f"cache-{side}")}
        for pairs in args.train_pairs:
            run_yaml = work / f"run-{pairs}.yaml"
            data = {"path": str(_synthetic_pairs(work, pairs)), "max_length": MAX_LENGTH}
            run_yaml.write_text(yaml.safe_dump({"model": {"path": str(model_dir)}, "data": data, "run_dir": "unused"}))
            for launch in ("first", "second"):
                run_dir = work / f"run-{side}-{pairs}-{launch}"  # a new run directory for each launch
                command = [*launcher, "train", "--config", str(run_yaml), *TRAIN_OVERRIDES, f"run_dir={run_dir}"]
                log = work / f"train-{side}-{pairs}-{launch}.log"
                measured = _measure(command, log, env=env, cwd=work)
                text = log.read_text()
                data_step = ("store reused" if "reusing it" in text else "store built" if "tokenizing" in text
                             else "tokenized in memory")  # fmt: skip
                rows.append({"side": name, "pairs": pairs, "launch": launch, "data": data_step,
                             "command": shlex.join(command), **measured})  # fmt: skip
                print(f"{name}, {pairs} pairs, {launch} launch: {measured['wall_s']:.0f} s", file=sys.stderr, flush=True)
    return rows


def _write_model(directory: Path, tokenizer_dir: Path) -> Path:
    """A 2-layer, 64-wide Llama at GPT-2's vocabulary (about 6.5M parameters, nearly all embedding and head)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from dpo_scale.data import load_tokenizer

    tokenizer = load_tokenizer(str(tokenizer_dir))
    torch.manual_seed(SEED)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2 * MAX_LENGTH,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


# ---------------------------------------------------------------- the children: one measured step each


def _rss_mib() -> dict[str, float]:
    status = Path("/proc/self/status").read_text()
    return {kind: int(re.search(rf"{kind}:\s+(\d+)", status).group(1)) / 1024 for kind in ("VmRSS", "VmHWM")}


def _store_build(spec: dict) -> dict:
    from dpo_scale.config import DataConfig
    from dpo_scale.data import load_prepared, load_tokenizer

    config = DataConfig(spec["data"], max_length=MAX_LENGTH, shard_rows=spec["shard_rows"], num_workers=spec["workers"])
    store = load_prepared(config, load_tokenizer(spec["tokenizer"]), spec["store"])
    shards = len(store.manifest["shards"])
    workers = (spec["workers"] or len(os.sched_getaffinity(0))) if shards > 1 else 1  # one shard: no pool
    return {"pairs": len(store.pairs), "summary": store.summary(), "shards": shards, "workers": workers}


def _store_reopen(spec: dict) -> dict:
    import torch  # noqa: F401  (split_held_out and the sampler use it)
    from transformers import AutoTokenizer, PreTrainedTokenizerFast  # noqa: F401  (load_tokenizer's imports)

    from dpo_scale.config import DataConfig
    from dpo_scale.data import PairView, load_prepared, load_tokenizer, split_held_out
    from dpo_scale.training.sampler import StepSampler

    imported = time.perf_counter()
    rss = {"imports": _rss_mib()}
    tokenizer = load_tokenizer(spec["tokenizer"])
    rss["tokenizer"] = _rss_mib()
    opening = time.perf_counter()
    store = load_prepared(DataConfig(spec["data"], max_length=MAX_LENGTH), tokenizer, spec["store"])
    open_s = time.perf_counter() - opening
    train_positions, _ = split_held_out(len(store.pairs), HELD_OUT, SEED)
    train_pairs = PairView(store.pairs, train_positions)
    sampler = StepSampler(len(train_pairs), MICRO_BATCH, SEED)  # one process: a step is one micro-batch
    batches = [[train_pairs[i] for i in sampler.step_pairs(step)] for step in range(FIRST_MICRO_BATCHES)]
    reached = time.perf_counter()
    rss["first batch"] = _rss_mib()
    assert sum(map(len, batches)) == MICRO_BATCH * FIRST_MICRO_BATCHES
    return {"to_first_batch_s": reached - STARTED, "after_imports_s": reached - imported, "open_s": open_s,
            "rss": rss, "modules": list(sys.modules)}  # fmt: skip


def _imports(spec: dict) -> dict:
    """The same modules as a reopen child, and nothing else: the floor its data RSS is measured from."""
    import importlib

    failed = []
    for name in spec["modules"]:
        if name not in sys.modules and not name.startswith("__"):
            try:
                importlib.import_module(name)
            except Exception:  # aliases and private extension modules that are not importable by name
                failed.append(name)
    return {"imported_s": time.perf_counter() - STARTED, "rss": {"imports": _rss_mib()}, "failed": len(failed)}


def _common_prefix(a, b) -> int:
    """Length of the common prefix of two strings or lists, by slice comparisons (in C), not item by item."""
    end = min(len(a), len(b))
    if a[:end] == b[:end]:
        return end
    low, high = 0, end
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (middle, high) if a[low:middle] == b[low:middle] else (low, middle)
    return low


def _tokenize_batch(batch: dict, tokenizer) -> dict:
    """The datasets side's batched map: texts split and EOS added, three columns tokenized as lists, ids cut at the
    common prefix (TRL's extract_prompt, add_eos and tokenize_fn in one pass)."""
    prompts, chosen, rejected = [], [], []
    for whole_chosen, whole_rejected in zip(batch["chosen"], batch["rejected"]):
        cut = whole_chosen.rfind(ASSISTANT, 0, _common_prefix(whole_chosen, whole_rejected)) + len(ASSISTANT)
        prompts.append(whole_chosen[:cut])
        chosen.append(whole_chosen[cut:] + tokenizer.eos_token)
        rejected.append(whole_rejected[cut:] + tokenizer.eos_token)
    prompt_ids = tokenizer(prompts)["input_ids"]
    prompt_chosen_ids = tokenizer([p + c for p, c in zip(prompts, chosen)])["input_ids"]
    prompt_rejected_ids = tokenizer([p + r for p, r in zip(prompts, rejected)])["input_ids"]
    out = {"prompt": prompts, "chosen": chosen, "rejected": rejected, **{name: [] for name in ID_COLUMNS}}
    for p, pc, pr in zip(prompt_ids, prompt_chosen_ids, prompt_rejected_ids):
        length = min(_common_prefix(p, pc), _common_prefix(p, pr))
        out["prompt_ids"].append(p[:length])
        out["chosen_ids"].append(pc[length:])
        out["rejected_ids"].append(pr[length:])
    return out


def _mapped(spec: dict, tokenizer):
    """load_dataset + map: tokenizes into the cache the first time, finds both in the cache after."""
    from datasets import load_dataset

    rows = load_dataset("json", data_files=spec["data"], split="train")
    return rows.map(_tokenize_batch, batched=True, fn_kwargs={"tokenizer": tokenizer}, num_proc=spec["num_proc"])


def _map_build(spec: dict) -> dict:
    from transformers import AutoTokenizer

    dataset = _mapped(spec, AutoTokenizer.from_pretrained(spec["tokenizer"]))
    return {"pairs": len(dataset), "map_files": [f["filename"] for f in dataset.cache_files]}


def _map_reopen(spec: dict) -> dict:
    import datasets  # noqa: F401
    import torch
    from transformers import AutoTokenizer, PreTrainedTokenizerFast  # noqa: F401  (as the store side imports)

    imported = time.perf_counter()
    rss = {"imports": _rss_mib()}
    tokenizer = AutoTokenizer.from_pretrained(spec["tokenizer"])  # map's cache key hashes it: needed to find the cache
    rss["tokenizer"] = _rss_mib()
    opening = time.perf_counter()
    dataset = _mapped(spec, tokenizer)
    open_s = time.perf_counter() - opening
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(SEED))  # a RandomSampler's draw
    batches = [dataset[order[k * MICRO_BATCH : (k + 1) * MICRO_BATCH].tolist()] for k in range(FIRST_MICRO_BATCHES)]
    reached = time.perf_counter()
    rss["first batch"] = _rss_mib()
    assert sum(len(b["prompt_ids"]) for b in batches) == MICRO_BATCH * FIRST_MICRO_BATCHES
    cache_hit = [f["filename"] for f in dataset.cache_files] == spec["map_files"]
    return {"to_first_batch_s": reached - STARTED, "after_imports_s": reached - imported, "open_s": open_s,
            "rss": rss, "modules": list(sys.modules), "cache_hit": cache_hit}  # fmt: skip


def _access(spec: dict) -> dict:
    """Open each format bare and read `reads` random pairs twice; also the tokens each holds per pair."""
    import random

    import numpy as np
    import pyarrow.compute as pc
    from datasets import Dataset, concatenate_datasets

    from dpo_scale.data.store import TokenStore, read_manifest, rows_name

    opening = time.perf_counter()
    store = TokenStore(spec["store"], read_manifest(Path(spec["store"])))
    store_open_s = time.perf_counter() - opening
    opening = time.perf_counter()
    dataset = concatenate_datasets([Dataset.from_file(f) for f in spec["map_files"]]).select_columns(ID_COLUMNS)
    arrow_open_s = time.perf_counter() - opening

    rng = random.Random(SEED)
    result = {"store": {"open_s": store_open_s}, "datasets": {"open_s": arrow_open_s}}
    for side, pairs in (("store", store.pairs), ("datasets", dataset)):
        for round_ in ("first", "again"):
            positions = [rng.randrange(len(pairs)) for _ in range(spec["reads"])]
            started = time.perf_counter()
            for position in positions:
                pairs[position]
            result[side][f"{round_}_us"] = (time.perf_counter() - started) / spec["reads"] * 1e6
    stored_tokens = 0
    for shard, entry in enumerate(store.manifest["shards"]):
        rows = np.load(Path(spec["store"]) / rows_name(shard), mmap_mode="r")
        stored_tokens += int(rows[: entry["pairs"], 4:].sum())
    mapped_tokens = sum(pc.sum(pc.list_value_length(dataset.data.column(c))).as_py() for c in ID_COLUMNS)
    result["store"]["tokens_per_pair"] = stored_tokens / len(store.pairs)
    result["datasets"]["tokens_per_pair"] = mapped_tokens / len(dataset)
    return result


CHILDREN = {"store_build": _store_build, "store_reopen": _store_reopen, "imports": _imports, "map_build": _map_build,
            "map_reopen": _map_reopen, "access": _access}  # fmt: skip


# ---------------------------------------------------------------- the report


def _report_sizes(results: dict[int, dict], args) -> None:
    print(f"GPT-2 tokenizer, max_length {MAX_LENGTH}; store: shard_rows {args.shard_rows}, "
          f"num_workers {args.workers or 'default (the cores)'}; datasets map: num_proc {args.num_proc}\n")  # fmt: skip
    print("1. First build (tree CPU s: user + sys of every process; peak RSS: the largest process; tree PSS: all of "
          "them, sampled)\n")  # fmt: skip
    print("| pairs | side | wall s | pairs/s | CPU s | pairs / CPU-s | peak RSS MiB | tree PSS MiB | notes |")
    print("|---|---|---|---|---|---|---|---|---|")
    for size, r in results.items():
        for side, build in (("store", r["store_build"]), ("datasets map", r["map_build"])):
            notes = (f"{build['shards']} shards, {build['workers']} worker(s); {build['summary']}" if side == "store"
                     else f"{build['pairs']:,} rows")  # fmt: skip
            print(f"| {size:,} | {side} | {build['wall_s']:.1f} | {size / build['wall_s']:,.0f} | {build['cpu_s']:.1f} "
                  f"| {size / build['cpu_s']:,.0f} | {build['peak_rss_mib']:,.0f} | {build['tree_pss_mib']:,.0f} "
                  f"| {notes} |")  # fmt: skip

    print(f"\n2-3. Reopen to the first batch: a fresh process imports, opens, holds out {HELD_OUT:.0%}, builds the "
          f"sampler, reads {FIRST_MICRO_BATCHES} micro-batches of {MICRO_BATCH}; data RSS = its peak RSS - the peak "
          "of a child importing the same modules\n")  # fmt: skip
    print("| pairs | side | script start → first batch s | without imports s | open s | process wall s "
          "| peak RSS MiB | imports only s | imports only peak MiB | data RSS MiB | of which the tokenizer MiB |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for size, r in results.items():
        for side, reopen, floor in (("store", r["store_reopen"], r["store_imports"]),
                                    ("datasets map", r["map_reopen"], r["map_imports"])):  # fmt: skip
            tokenizer = reopen["rss"]["tokenizer"]["VmRSS"] - reopen["rss"]["imports"]["VmRSS"]
            hit = "" if reopen.get("cache_hit", True) else " (map cache MISSED: it tokenized again)"
            print(f"| {size:,} | {side}{hit} | {reopen['to_first_batch_s']:.2f} | {reopen['after_imports_s']:.2f} "
                  f"| {reopen['open_s']:.2f} | {reopen['wall_s']:.2f} | {reopen['peak_rss_mib']:,.0f} "
                  f"| {floor['imported_s']:.2f} | {floor['peak_rss_mib']:,.0f} "
                  f"| {reopen['peak_rss_mib'] - floor['peak_rss_mib']:,.1f} | {tokenizer:.0f} |")  # fmt: skip

    print("\n4. Disk (the datasets cache holds the JSON as Arrow and the mapped dataset, texts and int64 ids; the "
          "store holds uint16 ids, truncated to max_length)\n")  # fmt: skip
    print("| pairs | what | MiB | bytes / pair | tokens / pair |\n|---|---|---|---|---|")
    for size, r in results.items():
        kept, rows = r["store_build"]["pairs"], r["map_build"]["pairs"]
        stored, mapped = r["access"]["store"]["tokens_per_pair"], r["access"]["datasets"]["tokens_per_pair"]
        for what, total, count, tokens in (
            ("token store", r["disk"]["store"], kept, stored),
            ("datasets cache, all", r["disk"]["hf_cache"], rows, mapped),
            ("datasets cache, mapped dataset only", r["disk"]["map_output"], rows, mapped),
        ):
            print(f"| {size:,} | {what} | {total / 2**20:,.1f} | {total / count:,.0f} | {tokens:.0f} |")

    print(f"\n5. Format: open, then {args.reads:,} random pairs read one at a time, twice (the store verifies a "
          "shard's checksum at its first read); ids only, from the page cache\n")  # fmt: skip
    print("| pairs | format | open ms | µs / pair, first reads | µs / pair, again |\n|---|---|---|---|---|")
    for size, r in results.items():
        for side, label in (("store", "token store (numpy memmap)"), ("datasets", "Arrow (the map's cache file)")):
            a = r["access"][side]
            print(f"| {size:,} | {label} | {a['open_s'] * 1e3:.1f} | {a['first_us']:,.0f} | {a['again_us']:,.0f} |")


def _report_train(rows: list[dict], args) -> None:
    print(f"`dpo-scale train max_steps=1` (max_length {MAX_LENGTH}), 2-layer 64-wide Llama at GPT-2's vocabulary, "
          "launched twice per size, each launch in a new run_dir\n")  # fmt: skip
    print("| code | pairs | launch | data | wall s | CPU s | peak RSS MiB | tree PSS MiB |\n"
          "|---|---|---|---|---|---|---|---|")  # fmt: skip
    for row in rows:
        print(f"| {row['side']} | {row['pairs']:,} | {row['launch']} | {row['data']} | {row['wall_s']:.1f} "
              f"| {row['cpu_s']:.1f} | {row['peak_rss_mib']:,.0f} | {row['tree_pss_mib']:,.0f} |")
    for side in dict.fromkeys(row["side"] for row in rows):
        second = {row["pairs"]: row for row in rows if row["side"] == side and row["launch"] == "second"}
        low, high = second[min(second)], second[max(second)]
        print(f"\n{side}: second launch at {high['pairs']:,} pairs / at {low['pairs']:,}: "
              f"{high['wall_s'] / low['wall_s']:.2f}x wall, {high['peak_rss_mib'] / low['peak_rss_mib']:.2f}x peak RSS")
    print("\ncommands (under /usr/bin/time -v):")
    for command in dict.fromkeys(row["command"] for row in rows):
        print(f"    {command}")
    if not args.before:
        print("(no --before: the code before the store was not measured)")


if __name__ == "__main__":
    main()

"""The `dpo-scale` command. Subcommands only parse arguments into a typed config and call one function.

A user mistake (bad data, bad config) prints its message and exits 2, without a traceback; Ctrl-C prints one line
and exits 130. Dotted overrides (`data.max_length=512`) may stand anywhere among a subcommand's flags.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from dpo_scale.config import (
    ConfigError, LogpsRunConfig, build, load_yaml, merge, parse_overrides, sections_for, training_aliases,
)  # fmt: skip
from dpo_scale.data.errors import DataError
from dpo_scale.io import check_output_path
from dpo_scale.training.tracking import stop_tqdm_monitor


# Flags for the settings every scoring command needs, and the config keys they set.
SHORTCUTS = {"model": "model.path", "data": "data.path", "out": "out"}


def _add_shortcuts(parser: argparse.ArgumentParser, out_help: str) -> None:
    parser.add_argument("--model", help="model directory or hub id (model.path)")
    parser.add_argument("--data", help="preference file, save_to_disk directory or hub id (data.path)")
    parser.add_argument("--out", help=f"{out_help} (out)")


def _add_config_arguments(parser: argparse.ArgumentParser, sections: str, example: str) -> None:
    parser.add_argument("--config", help=f"YAML file with the sections {sections}")
    parser.add_argument("overrides", nargs="*", help=f"dotted overrides, anywhere among the flags, e.g. {example}")


# An override is `key.sub=value`; anything else argparse did not take is a mistake to report as such
OVERRIDE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*=")


def _config_tree(args: argparse.Namespace, flags: dict[str, str], command_config: type | None = None) -> dict:
    """Config file, then the named flags, then dotted overrides: later wins. The file is read as `command_config`
    reads a training config (its other sections left alone); the overrides under the names it reads them by
    (`loss.beta=0.2` is ref-drift's beta), and one it does not read is refused: asked for, it is not ignored."""
    tree = load_yaml(args.config) if args.config else {}
    overrides = parse_overrides(args.overrides)
    if command_config is not None:
        tree, overrides = sections_for(command_config, tree)[0], training_aliases(command_config, overrides)
    for flag, key in flags.items():
        value = getattr(args, flag)
        if value is not None:
            tree = merge(tree, _nested(key, value))  # a path stays a string, never YAML-parsed
    return merge(tree, overrides)


def _nested(dotted: str, value: str) -> dict:
    tree: dict = {}
    node = tree
    *parents, leaf = dotted.split(".")
    for part in parents:
        node = node.setdefault(part, {})
    node[leaf] = value
    return tree


def _require(tree: dict, key: str, message: str) -> None:
    """A required setting that has a flag, refused naming the flag (the config's own message names only the key)."""
    if tree.get(key) in (None, ""):
        raise ConfigError(message)


def _logps(args: argparse.Namespace) -> None:
    from dpo_scale.commands.logps import run_logps

    tree = _config_tree(args, SHORTCUTS, LogpsRunConfig)
    _require(tree, "out", "--out FILE.jsonl is required (or out= in the config)")
    config = build(LogpsRunConfig, tree)
    check_output_path(config.out, "--out")
    counts = run_logps(config)
    ratio = counts["tokens"] / max(counts["unique_tokens"], 1)
    print(
        f"wrote {config.out}: {counts['pairs']} pairs, {counts['dropped']} dropped; "
        f"{counts['tokens']} tokens computed for {counts['unique_tokens']} unique ({ratio:.2f}x)"
    )


def _train(args: argparse.Namespace) -> None:
    from dpo_scale.commands.train import NonFiniteError, run
    from dpo_scale.config import TrainConfig

    config = build(TrainConfig, _config_tree(args, {}))
    config.require_run_dir("train")
    try:
        run(config)
    except NonFiniteError as error:  # a diagnosis, not a crash: the message says what to do
        print(f"dpo-scale train: stopped: {error}", file=sys.stderr)
        raise SystemExit(3) from None


def _config(args: argparse.Namespace) -> None:
    """The resolved training config as YAML, or one value of it: for job scripts that need e.g. run_dir."""
    import yaml

    from dpo_scale.config import TrainConfig, to_dict

    config = build(TrainConfig, _config_tree(args, {}))
    if args.get == "run_dir":  # job scripts write there (slurm/common.sh): an empty answer would point them at /
        config.require_run_dir("train")
    value = to_dict(config)
    for part in args.get.split(".") if args.get else []:
        if not isinstance(value, dict) or part not in value:
            raise ConfigError(f"--get {args.get}: no such key in the training config")
        value = value[part]
    print(yaml.safe_dump(value, sort_keys=False).strip() if isinstance(value, dict) else "" if value is None else value)


def _sweep(args: argparse.Namespace) -> None:
    from dpo_scale.commands.sweep import expand, parse_grid, run_points, summarize, train_arguments
    from dpo_scale.config import TrainConfig

    tree = _config_tree(args, {})
    build(TrainConfig, tree).require_run_dir("sweep")
    points = expand(tree, parse_grid(args.grid))
    if args.count:
        print(len(points))
    elif args.print_point is not None:
        if not 0 <= args.print_point < len(points):
            raise ConfigError(f"--print-point {args.print_point}: the grid has points 0 to {len(points) - 1}")
        print("\n".join(train_arguments(args.config, args.overrides, points[args.print_point])))
    elif args.summarize:
        print("wrote " + ", ".join(map(str, summarize(points[0].run_dir.parent, points))))
    else:
        reference = build(TrainConfig, tree).reference
        run_points(args.config, args.overrides, points, reference.cache_dir if reference.source == "cache" else None)
        print("wrote " + ", ".join(map(str, summarize(points[0].run_dir.parent, points))))


def _prepare_data(args: argparse.Namespace) -> None:
    from dpo_scale.config import TrainConfig
    from dpo_scale.data import load_prepared, run_tokenizer, store_directory
    from dpo_scale.training.tracking import print0

    if args.list:
        from dpo_scale.data.cache import list_stores

        print(list_stores())
        return
    config = build(TrainConfig, _config_tree(args, {}))
    tokenizer = run_tokenizer(config.data, config.model.path)
    directory = store_directory(config.data, tokenizer, config.run_dir)
    data = load_prepared(config.data, tokenizer, directory)
    data.verify()
    print0(f"token store {directory}: {data.summary()}")


def _data_report(args: argparse.Namespace) -> None:
    from dpo_scale.commands.data_report import run_report
    from dpo_scale.config import TrainConfig

    config = build(TrainConfig, _config_tree(args, {}))
    check_output_path(args.out, "--out", directory=True)
    report = run_report(config, args.out, args.eval)
    print("\n".join(report["findings"]))
    print(f"wrote {Path(args.out) / 'report.md'}, report.json and {', '.join(report['figures'])}")


def _precompute_ref(args: argparse.Namespace) -> None:
    from dpo_scale.commands.precompute_ref import precompute
    from dpo_scale.config import TrainConfig

    precompute(build(TrainConfig, _config_tree(args, {})))


def _ref_drift(args: argparse.Namespace) -> None:
    from dpo_scale.commands.ref_drift import run_drift
    from dpo_scale.config import DriftRunConfig

    tree = _config_tree(args, SHORTCUTS, DriftRunConfig)
    _require(tree, "out", "--out FILE.json is required (or out= in the config)")
    config = build(DriftRunConfig, tree)
    check_output_path(config.out, "--out")
    run_drift(
        config.model.path, config.data, config.num_pairs, config.out, beta=config.beta,
        batch_size=config.batch_size, logps_config=config.logps, dtype=config.model.dtype,
        double_quant=config.nf4.double_quant, compute_dtype=config.nf4.compute_dtype,
        trust_remote_code=config.model.trust_remote_code,
    )  # fmt: skip
    print(f"wrote {config.out}")


def _eval(args: argparse.Namespace) -> None:
    from dpo_scale.commands.eval import run_eval, samples_path
    from dpo_scale.config import EvalRunConfig

    tree = _config_tree(args, {"policy": "policy", "data": "data.path", "out": "out"}, EvalRunConfig)
    file_tree = load_yaml(args.config) if args.config else {}
    _, ignored = sections_for(EvalRunConfig, file_tree)
    run_dir = file_tree.get("run_dir") if "run_dir" in ignored else None
    _require(tree, "policy", "--policy RUN_DIR is required: the run directory (or one of its checkpoints, or a model "
             "directory) to evaluate" + (f"; this config's run is --policy {run_dir}" if run_dir else ""))
    _require(tree, "out", "--out FILE.json is required (the samples go beside it)")
    if "data" in ignored and "data" not in tree:
        print("eval: --config is a training config; its data section is the training data, so the held-out pairs "
              "are the run's own (--data FILE scores other pairs)")  # fmt: skip
    config = build(EvalRunConfig, tree)
    check_output_path(config.out, "--out")
    check_output_path(samples_path(config.out), "--out (its samples file)")
    result = run_eval(config)
    rows = [("pairs", result["preference"])] + ([("generations", result["generation"])] if "generation" in result else [])
    for title, metrics in rows:
        print(f"{title}: " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items()))
    print(f"wrote {config.out} and {samples_path(config.out)}")


def _plot(args: argparse.Namespace) -> None:
    from dpo_scale.training.plot import plot_runs

    try:
        print(f"wrote {plot_runs(args.run_dirs, args.out, args.labels)}")
    except (FileNotFoundError, ValueError) as error:
        raise ConfigError(str(error)) from None


def _export(args: argparse.Namespace) -> None:
    from dpo_scale.commands.export import export

    exported = export(args.run_dir, args.out, merge_lora=args.merge_lora, overwrite=args.overwrite)
    print(f"wrote {exported.path}" + (f", replacing {exported.replaced}" if exported.replaced else ""))


def _demo(args: argparse.Namespace) -> None:
    from dpo_scale.commands.demo import run_demo

    run_demo(args.out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dpo-scale", description=__doc__.splitlines()[0])
    # the deepspeed launcher appends --local_rank=N before our arguments; ranks are read from the environment
    parser.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)
    commands = parser.add_subparsers(dest="command", required=True)

    logps = commands.add_parser(
        "logps",
        help="write every pair's chosen/rejected log-prob sums and token counts to a JSONL file",
        description="Example: dpo-scale logps --model DIR --data pairs.jsonl --out logps.jsonl data.max_length=512",
    )
    _add_shortcuts(logps, "output JSONL")
    _add_config_arguments(logps, "model, data, logps", "data.max_length=512 logps.packing=true")
    logps.set_defaults(run=_logps)

    train = commands.add_parser(
        "train",
        help="DPO training under DeepSpeed (one process, or any number under the deepspeed launcher / torchrun / srun)",
        description="Example: deepspeed --num_gpus 8 $(which dpo-scale) train --config run.yaml optim.lr=5e-7",
    )
    _add_config_arguments(train, "of dpo_scale.config.TrainConfig", "loss.beta=0.1 micro_batch_size=2")
    train.set_defaults(run=_train)

    config = commands.add_parser(
        "config",
        help="print the resolved training config (file + overrides + defaults), or one value with --get",
        description="Example: dpo-scale config --config run.yaml loss.beta=0.5 --get run_dir",
    )
    _add_config_arguments(config, "of dpo_scale.config.TrainConfig", "loss.beta=0.1")
    config.add_argument("--get", help="a dotted key, e.g. run_dir or reference.cache_dir")
    config.set_defaults(run=_config)

    sweep = commands.add_parser(
        "sweep",
        help="train every point of a hyperparameter grid, each in run_dir/<point> (or print a point, for SLURM arrays)",
        description="Example: dpo-scale sweep --config run.yaml max_steps=200 --grid beta=0.05,0.1,0.5 "
        "optim.lr=5e-7,1e-6 (overrides go before --grid)",
    )
    _add_config_arguments(sweep, "of dpo_scale.config.TrainConfig", "max_steps=200")
    sweep.add_argument("--grid", nargs="+", required=True, metavar="KEY=V1,V2", help="values to sweep, per key")
    what = sweep.add_mutually_exclusive_group()
    what.add_argument("--count", action="store_true", help="print the number of points and exit")
    what.add_argument("--print-point", type=int, metavar="K", help="print point K's train arguments, one per line")
    what.add_argument("--summarize", action="store_true", help="write run_dir/summary.csv, summary.md, sweep.png")
    sweep.set_defaults(run=_sweep)

    prepare_data = commands.add_parser(
        "prepare-data",
        help="tokenize the training data once into its token store (under $DPO_SCALE_CACHE, or data.cache_dir), which "
        "train, precompute-ref, eval and sweep then read; --list shows the stores",
        description="Example: dpo-scale prepare-data --config run.yaml data.num_workers=16 (one process using every "
        "core), or under the deepspeed launcher / srun, where the ranks split the rows. dpo-scale prepare-data --list "
        "shows the stores under the cache root; remove one with rm -r when no job is reading it",
    )
    prepare_data.add_argument("--list", action="store_true", help="list the token stores under the cache root and exit")
    _add_config_arguments(prepare_data, "of the training config (model or data.tokenizer, data)",
                          "data.cache_dir=cache/hh-tokens")  # fmt: skip
    prepare_data.set_defaults(run=_prepare_data)

    data_report = commands.add_parser(
        "data-report",
        help="what is in the training data: drops, truncation, lengths, length bias, duplicates, contradictions, "
        "eval contamination, reference margins (from the token store and reference cache)",
        description="Example: dpo-scale data-report --config run.yaml --out report/ --eval eval.jsonl",
    )
    _add_config_arguments(data_report, "of the training config (model or data.tokenizer, data, reference)",
                          "data.max_length=1024")  # fmt: skip
    data_report.add_argument("--out", required=True, help="directory for report.md, report.json and the PNGs")
    data_report.add_argument("--eval", help="eval preference file to check for contamination (default: the run's "
                             "held-out pairs when eval.every > 0)")  # fmt: skip
    data_report.set_defaults(run=_data_report)

    precompute_ref = commands.add_parser(
        "precompute-ref",
        help="compute the reference log-probs of every pair once, into reference.cache_dir (resumable)",
        description="Example: deepspeed --num_gpus 8 $(which dpo-scale) precompute-ref --config run.yaml "
        "reference.cache_dir=cache/hh",
    )
    _add_config_arguments(precompute_ref, "of the training config (model, data, logps, reference)",
                          "reference.cache_dir=cache/hh")  # fmt: skip
    precompute_ref.set_defaults(run=_precompute_ref)

    drift = commands.add_parser(
        "ref-drift",
        help="how far a 4-bit (NF4) reference drifts from the full-precision model: per-token error, margin error, "
        "sign flips",
        description="Example: dpo-scale ref-drift --model DIR --data pairs.jsonl --out drift.json num_pairs=256 "
        "beta=0.1 data.max_length=1024",
    )
    _add_shortcuts(drift, "output JSON")
    _add_config_arguments(drift, "model, data, nf4, logps", "num_pairs=512 nf4.compute_dtype=bfloat16")
    drift.set_defaults(run=_ref_drift)

    evaluate = commands.add_parser(
        "eval",
        help="a trained policy against its reference: held-out loss, reward accuracy and margins; generations with "
        "length, diversity, KL and an optional reward",
        description="Example: dpo-scale eval --policy runs/hh --out eval.json generation.num_prompts=64 "
        "generation.reward_fn=my_rewards.py:score",
    )
    evaluate.add_argument("--policy", help="run directory (latest checkpoint) or model directory (policy)")
    evaluate.add_argument("--data", help="held-out preference pairs (data.path); default: the run's held-out pairs")
    evaluate.add_argument("--out", help="output JSON; the samples go beside it, eval.json -> eval.samples.md (out)")
    _add_config_arguments(evaluate, "of dpo_scale.config.EvalRunConfig", "generation.temperature=0.7 num_pairs=256")
    evaluate.set_defaults(run=_eval)

    plot = commands.add_parser(
        "plot", help="PNG of loss, reward accuracy, margins, chosen and rejected rewards per step, runs overlaid",
        description="Example: dpo-scale plot runs/sweep/beta=0.1 runs/sweep/beta=0.5 --out betas.png",
    )
    plot.add_argument("run_dirs", nargs="+", help="run directories (each with its metrics.jsonl)")
    plot.add_argument("--out", required=True, help="PNG to write")
    plot.add_argument("--labels", nargs="+", help="one legend label per run (default: the directory names)")
    plot.set_defaults(run=_plot)

    export = commands.add_parser("export", help="write a run's latest weights as a Hugging Face model directory")
    export.add_argument("run_dir")
    export.add_argument("--out", required=True, help="directory to write (safetensors + config + tokenizer)")
    export.add_argument("--merge-lora", action="store_true", help="LoRA runs: merge adapters into the base weights")
    export.add_argument(
        "--overwrite", action="store_true",
        help="replace --out even when it is a non-empty directory that is not an earlier export (never the run's own)",
    )  # fmt: skip
    export.set_defaults(run=_export)

    demo = commands.add_parser("demo", help="generate a tiny model and preference data, then run the core on them")
    demo.add_argument("--out", default="runs/demo", help="directory for the generated model, data and outputs")
    demo.set_defaults(run=_demo)

    # argparse takes one run of positionals: overrides after a flag come back unrecognized, and are overrides still
    args, unrecognized = parser.parse_known_args(argv)
    strays = [item for item in unrecognized if not (hasattr(args, "overrides") and OVERRIDE.match(item))]
    if strays:
        parser.error(f"unrecognized arguments: {' '.join(strays)}")
    if hasattr(args, "overrides"):
        args.overrides = args.overrides + unrecognized
    stop_tqdm_monitor()  # this command owns the process, and how it exits
    try:
        args.run(args)
    except (DataError, ConfigError) as error:
        print(f"dpo-scale {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"dpo-scale {args.command}: interrupted; {WHAT_AN_INTERRUPT_KEEPS.get(args.command, NOTHING_HALF_WRITTEN)}",
              file=sys.stderr)  # fmt: skip
        return 130  # 128 + SIGINT, as a shell reports a command that Ctrl-C stopped
    return 0


NOTHING_HALF_WRITTEN = "output files are written whole at the end, so none was left half-written"
WHAT_AN_INTERRUPT_KEEPS = {
    "prepare-data": "the token store's finished shards are kept: the same command builds only the missing ones",
    "data-report": "the token store's finished shards are kept: the same command builds only the missing ones",
    "precompute-ref": "the finished cache shards are kept: the same command computes only the missing ones",
    "train": "the checkpoints already saved are kept: the same command resumes from the latest",
    "sweep": "finished points and saved checkpoints are kept: the same command resumes",
}


if __name__ == "__main__":
    sys.exit(main())

"""The `dpo-scale` command. Subcommands only parse arguments into a typed config and call one function.

A user mistake (bad data, bad config) prints its message and exits 2, without a traceback.
"""

from __future__ import annotations

import argparse
import sys

from dpo_scale.config import ConfigError, LogpsRunConfig, build, load_yaml, merge, parse_overrides
from dpo_scale.data.errors import DataError


def _config_tree(args: argparse.Namespace, flags: dict[str, str]) -> dict:
    """Config file, then the named flags, then dotted overrides: later wins."""
    tree = load_yaml(args.config) if args.config else {}
    for flag, key in flags.items():
        value = getattr(args, flag)
        if value is not None:
            tree = merge(tree, _nested(key, value))  # a path stays a string, never YAML-parsed
    return merge(tree, parse_overrides(args.overrides))


def _nested(dotted: str, value: str) -> dict:
    tree: dict = {}
    node = tree
    *parents, leaf = dotted.split(".")
    for part in parents:
        node = node.setdefault(part, {})
    node[leaf] = value
    return tree


def _logps(args: argparse.Namespace) -> None:
    from dpo_scale.logps_job import run_logps

    config = build(LogpsRunConfig, _config_tree(args, {"model": "model.path", "data": "data.path", "out": "out"}))
    counts = run_logps(config)
    ratio = counts["tokens"] / max(counts["unique_tokens"], 1)
    print(
        f"wrote {config.out}: {counts['pairs']} pairs, {counts['dropped']} dropped; "
        f"{counts['tokens']} tokens computed for {counts['unique_tokens']} unique ({ratio:.2f}x)"
    )


def _demo(args: argparse.Namespace) -> None:
    from dpo_scale.demo import run_demo

    run_demo(args.out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dpo-scale", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)

    logps = commands.add_parser(
        "logps",
        help="write every pair's chosen/rejected log-prob sums and token counts to a JSONL file",
        description="Example: dpo-scale logps --model DIR --data pairs.jsonl --out logps.jsonl data.max_length=512",
    )
    logps.add_argument("--model", help="model directory or hub id (model.path)")
    logps.add_argument("--data", help="preference file, save_to_disk directory or hub id (data.path)")
    logps.add_argument("--out", help="output JSONL (out)")
    logps.add_argument("--config", help="YAML file with sections model, data, logps")
    logps.add_argument("overrides", nargs="*", help="dotted overrides, e.g. data.max_length=512 logps.packing=true")
    logps.set_defaults(run=_logps)

    demo = commands.add_parser("demo", help="generate a tiny model and preference data, then run the core on them")
    demo.add_argument("--out", default="runs/demo", help="directory for the generated model, data and outputs")
    demo.set_defaults(run=_demo)

    args = parser.parse_args(argv)
    try:
        args.run(args)
    except (DataError, ConfigError) as error:
        print(f"dpo-scale {args.command}: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

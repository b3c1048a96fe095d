"""`dpo-scale data-report`: what is in the preference data a run will train on, read from its token store (and its
reference cache, when it has one) without tokenizing the training data again. The scan, the numbers, report.md
and the PNGs are parts in data/report/.

Contamination compares prompts whole, as the data holds them, on both sides: the store keeps the prompt tokens
truncation cut (data/prompt_heads.py), so a training copy of an eval dialogue counts however short a window
data.max_length leaves it, and held-out prompts cut to the same last token are not "the same prompt".
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from dpo_scale.data.contamination import EvalPrompts
from dpo_scale.data.report import figures, stats
from dpo_scale.data.report.render import markdown
from dpo_scale.data.report.scan import held_out_prompts, scan
from dpo_scale.data.store import TokenStore
from dpo_scale.io import atomic_open

if TYPE_CHECKING:
    from dpo_scale.config import TrainConfig


def run_report(config: TrainConfig, out: str | Path, eval_path: str | None = None) -> dict:
    """Build or reuse the run's token store exactly as `train` does, then write the report into `out`. The eval
    set: `eval_path`, else the run's held-out pairs (eval.every > 0), else none. Every input path is checked
    before anything is tokenized."""
    from dpo_scale.config import ConfigError
    from dpo_scale.data import load_prepared, run_tokenizer, split_held_out, store_directory
    from dpo_scale.data.filters import read_eval_prompts
    from dpo_scale.data.prepare import check_input_paths, input_paths

    check_input_paths({**input_paths(config.data), **({"--eval": eval_path} if eval_path else {})})
    tokenizer = run_tokenizer(config.data, config.model.path)
    store = load_prepared(config.data, tokenizer, store_directory(config.data, tokenizer, config.run_dir))
    if not isinstance(store, TokenStore):
        raise ConfigError("data-report reads a token store: set data.cache_dir or run_dir")
    filters = config.data.filters
    evals, eval_sources, held_out, eval_name = None, [], None, None
    if eval_path:
        evals, eval_sources = read_eval_prompts(config.data, tokenizer, eval_path, filters.ngram)
        eval_name = eval_path
    elif config.eval.every and config.eval.fraction:
        held_out = split_held_out(len(store.pairs), config.eval.fraction, config.seed)[1]
        evals, eval_sources = held_out_prompts(store, held_out, filters.ngram)
        eval_name = f"the run's held-out pairs (eval.fraction={config.eval.fraction})"
    margins = _reference(config, tokenizer, store) if config.reference.source == "cache" else None
    return report_store(store, out, config.data.path, config.data.max_length, evals, eval_sources, eval_name,
                        held_out, filters.ngram_threshold, margins)  # fmt: skip


def report_store(
    store: TokenStore, out: str | Path, data_path: str, max_length: int | None = None,
    evals: EvalPrompts | None = None, eval_sources: list[str] = (), eval_name: str | None = None,
    held_out: np.ndarray | None = None, threshold: float = 0.5,
    margins: tuple[np.ndarray, np.ndarray] | None = None,
) -> dict:  # fmt: skip
    """The report of an opened store, written into `out` (report.json, report.md, PNGs); returns report.json."""
    out = Path(out)
    table, overlap = scan(store, evals, held_out)
    prefix = store.manifest["source_prefix"]

    def where(position: int) -> str:
        return f"{prefix} {int(table.location[position])}"

    report = {
        "data": {"path": data_path, "store": str(store.directory), **stats.counts(table, store.drop_counts())},
        "lengths": stats.lengths(table, max_length),
        "length_bias": stats.length_bias(table),
        "duplicates": stats.duplicates(table, where),
    }
    if evals is not None:
        report["contamination"] = {"eval": eval_name, **stats.contamination(evals, overlap, list(eval_sources), threshold, where)}
    if margins is not None:
        report["reference"] = stats.reference_margins(table, *margins, where)
    report["findings"] = stats.findings(report)
    report["figures"] = figures.draw(table, margins, out)
    with atomic_open(out / "report.json") as handle:
        json.dump(report, handle, indent=1)
    with atomic_open(out / "report.md") as handle:
        handle.write(markdown(report))
    return report


def _reference(config: TrainConfig, tokenizer, store: TokenStore) -> tuple[np.ndarray, np.ndarray]:
    """The cache's chosen and rejected log-prob sums in the store's order (the order precompute-ref writes),
    checked at the first and last pair of the store against the cache's keys."""
    from dpo_scale.config import ConfigError
    from dpo_scale.reference.cache import KEY_DTYPE, open_cache, pair_key

    reader = open_cache(config.reference.cache_dir, config.model, config.data, tokenizer)
    ends = np.array([0, len(store.pairs) - 1])
    expected = np.array([pair_key(store.pairs[int(p)]) for p in ends], dtype=KEY_DTYPE)
    if len(reader) != len(store.pairs) or (reader.keys_in_order(ends) != expected).any():
        raise ConfigError(
            f"reference.cache_dir={config.reference.cache_dir}: its pairs are not this token store's, in order "
            f"({len(reader):,} cached, {len(store.pairs):,} stored). Fix: recompute it with `dpo-scale precompute-ref`"
        )
    return reader.in_order("chosen"), reader.in_order("rejected")

"""The report's numbers, each a plain function of the scanned arrays (numpy, no pair objects): JSON-ready dicts.

`where(position)` turns a pair's position into its input file and line, for the examples.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from dpo_scale.data.contamination import EvalPrompts
from dpo_scale.data.filters import KeyIndex, duplicate_mask, pair_keys
from dpo_scale.data.report.scan import Overlap, PairTable

SIDES = ("prompt", "chosen", "rejected")
EXAMPLES = 10
MAX_LENGTHS = (256, 512, 1024, 2048, 4096, 8192)
DIFFERENCE_BUCKETS = ((0, 0), (1, 4), (5, 16), (17, 64), (65, 256), (257, None))
Where = Callable[[int], str]


def _share(part: int, whole: int) -> float:
    return part / whole if whole else 0.0


def _percentiles(values: np.ndarray) -> dict[str, float]:
    if not len(values):
        return {}
    p50, p90, p99 = np.percentile(values, [50, 90, 99]).tolist()
    return {"mean": float(values.mean()), "p50": p50, "p90": p90, "p99": p99, "max": float(values.max())}


def counts(table: PairTable, drops: dict[str, int]) -> dict:
    """Rows read, pairs kept, drops by reason; pairs truncated and tokens cut, per side."""
    truncated = {
        side: {"pairs": int((table.cut[:, i] > 0).sum()), "share": _share(int((table.cut[:, i] > 0).sum()), len(table)),
               "tokens_cut": int(table.cut[:, i].sum())}
        for i, side in enumerate(SIDES)
    }  # fmt: skip
    return {"rows": len(table) + sum(drops.values()), "pairs": len(table), "dropped": drops, "truncated": truncated}


def lengths(table: PairTable, max_length: int | None) -> dict:
    """Token lengths per side as stored, and how many pairs a data.max_length would keep whole (from the lengths
    before truncation: stored + cut)."""
    whole = table.lengths + table.cut  # (n, 3) int32, as the scan keeps them: no int64 copies of the table
    longest = whole[:, 0] + whole[:, 1:].max(axis=1)
    del whole
    limits = sorted({*MAX_LENGTHS, *([max_length] if max_length else [])})
    return {
        **{side: _percentiles(table.lengths[:, i]) for i, side in enumerate(SIDES)},
        "sequence_before_truncation": _percentiles(longest),
        "max_length_keeps_whole": [
            {"max_length": limit, "pairs": int((longest <= limit).sum()), "share": _share(int((longest <= limit).sum()), len(table))}
            for limit in limits
        ],
    }  # fmt: skip


def length_bias(table: PairTable) -> dict:
    """Is the chosen completion just the longer one? Shares overall and by the size of the length difference."""
    chosen, rejected = table.lengths[:, 1], table.lengths[:, 2]
    difference = chosen - rejected  # (n,) int32
    ratio = chosen / np.maximum(rejected, 1)
    size = np.abs(difference)
    buckets = []
    for low, high in DIFFERENCE_BUCKETS:
        inside = (size >= low) & (size <= high if high is not None else True)
        label = f"{low}" if low == high else f"{low}-{high}" if high else f">{low - 1}"
        buckets.append({"difference": label, "pairs": int(inside.sum()),
                        "chosen_longer_share": _share(int((difference[inside] > 0).sum()), int(inside.sum()))})  # fmt: skip
    return {
        "chosen_longer": int((difference > 0).sum()), "rejected_longer": int((difference < 0).sum()),
        "equal": int((difference == 0).sum()), "chosen_longer_share": _share(int((difference > 0).sum()), len(table)),
        "ratio_chosen_over_rejected": _percentiles(ratio), "by_difference": buckets,
    }  # fmt: skip


def _groups(index: KeyIndex) -> tuple[np.ndarray, np.ndarray]:
    """(each group's first place in index.order, each group's size), groups in key order."""
    firsts = np.flatnonzero(index.starts())
    return firsts, np.diff(np.append(firsts, len(index.order)))


def duplicates(table: PairTable, where: Where) -> dict:
    """Exact duplicate pairs (the same prompt, chosen and rejected tokens); prompts with several pairs;
    contradictory pairs (the same prompt and completions, the preference reversed). One stable sort of the pair
    keys serves the first and the last (positions of equal keys come out in input order), one of the prompts the
    second; each is freed before the next is made (at a million pairs a sort holds about 16 MB)."""
    keys, reversed_keys = pair_keys(table.hashes)
    index = KeyIndex.of(keys)
    del keys
    repeated = int(duplicate_mask(index).sum())
    partner = index.find(reversed_keys)  # (n,) the first pair with this pair's preference reversed, or -1
    del reversed_keys
    firsts, sizes = _groups(index)
    examples = [[where(int(p)) for p in index.order[firsts[g] : firsts[g] + sizes[g]][:5]]
                for g in np.flatnonzero(sizes > 1)[:EXAMPLES]]  # fmt: skip
    groups = int((sizes > 1).sum())
    del index, firsts, sizes
    contradictory = partner >= 0
    examples_reversed = [[where(p), where(int(partner[p]))]
                         for p in np.flatnonzero(contradictory)[: EXAMPLES * 2].tolist() if p < partner[p]]  # fmt: skip
    contradicting_prompts = len(np.unique(table.hashes[contradictory, 0]))
    del partner

    prompts = KeyIndex.of(table.hashes[:, 0])
    prompt_firsts, prompt_sizes = _groups(prompts)
    histogram = np.bincount(prompt_sizes)
    most = {"pairs": 0, "example": None}
    if len(prompt_sizes):
        biggest = int(np.argmax(prompt_sizes))
        most = {"pairs": int(prompt_sizes[biggest]), "example": where(int(prompts.order[prompt_firsts[biggest]]))}
    return {
        "duplicates": {"pairs": repeated, "share": _share(repeated, len(table)), "groups": groups,
                       "examples": examples},
        "prompts": {"distinct": len(prompt_sizes), "with_several_pairs": int((prompt_sizes > 1).sum()),
                    "pairs_in_them": int(prompt_sizes[prompt_sizes > 1].sum()),
                    "pairs_per_prompt": {str(k): int(v) for k, v in enumerate(histogram) if k and v},
                    "most_pairs": most},
        "contradictions": {"pairs": int(contradictory.sum()), "share": _share(int(contradictory.sum()), len(table)),
                           "prompts": contradicting_prompts, "examples": examples_reversed[:EXAMPLES]},
    }  # fmt: skip


def contamination(evals: EvalPrompts, overlap: Overlap, eval_sources: list[str], threshold: float, where: Where) -> dict:
    """Eval prompts found in training: whole (a training prompt with the same tokens), and by n-gram overlap (the
    share of each eval prompt's distinct n-grams that some training prompt holds, and the most one prompt holds).
    Both sides are prompts before truncation (the scan's), so a cut cannot make or hide a match."""
    trained = np.concatenate(overlap.train_prompts) if overlap.train_prompts else np.empty(0, np.uint64)
    exact = np.isin(evals.prompt_hash, trained)
    found = np.bincount(evals.ngram_owner, weights=overlap.found, minlength=len(evals))
    share_anywhere = found / np.maximum(evals.ngram_count, 1)
    flagged = overlap.best_share >= threshold
    worst = np.argsort(-overlap.best_share, kind="stable")[:EXAMPLES]
    bins = [0.0, 0.01, 0.1, 0.25, 0.5, 0.75, 1.0]
    histogram, _ = np.histogram(share_anywhere[evals.ngram_count > 0], bins=bins)
    return {
        "eval_prompts": len(evals), "ngram": evals.n, "threshold": threshold,
        "short_prompts": int((evals.ngram_count == 0).sum()),
        "exact": {"prompts": int(exact.sum()), "share": _share(int(exact.sum()), len(evals))},
        "over_threshold": {"prompts": int(flagged.sum()), "share": _share(int(flagged.sum()), len(evals))},
        "ngram_share_anywhere": {f"{lo:g}-{hi:g}": int(n) for lo, hi, n in zip(bins, bins[1:], histogram)},
        "examples": [
            {"eval": eval_sources[e], "share": float(overlap.best_share[e]), "training": where(int(overlap.best_train[e]))}
            for e in worst.tolist() if overlap.best_share[e] > 0
        ],
    }  # fmt: skip


def reference_margins(table: PairTable, chosen: np.ndarray, rejected: np.ndarray, where: Where) -> dict:
    """The reference's margin log p(chosen) - log p(rejected), summed and per token: a pair negative in both is
    unlikely under the reference, not merely long."""
    margin = (chosen - rejected).astype(np.float64)
    per_token = chosen / np.maximum(table.lengths[:, 1], 1) - rejected / np.maximum(table.lengths[:, 2], 1)
    lowest = np.argsort(margin, kind="stable")[:EXAMPLES]
    return {
        "margin": _percentiles(margin), "per_token": _percentiles(per_token),
        "negative": {"pairs": int((margin < 0).sum()), "share": _share(int((margin < 0).sum()), len(table))},
        "negative_per_token": {"pairs": int((per_token < 0).sum()), "share": _share(int((per_token < 0).sum()), len(table))},
        "most_negative": [{"pair": where(int(p)), "margin": float(margin[p]), "per_token": float(per_token[p])}
                          for p in lowest.tolist()],
    }  # fmt: skip


def findings(report: dict) -> list[str]:
    """The lines worth acting on, for the top of report.md."""
    lines = []
    data = report["data"]
    dropped = sum(data["dropped"].values())
    if dropped:
        lines.append(f"{dropped:,} of {data['rows']:,} rows dropped ({', '.join(f'{r}: {n:,}' for r, n in data['dropped'].items())}).")
    for side, cut in data["truncated"].items():
        if cut["pairs"]:
            lines.append(f"{cut['pairs']:,} pairs ({cut['share']:.2%}) have their {side} truncated ({cut['tokens_cut']:,} tokens cut): "
                         "see the max_length table.")
    dup = report["duplicates"]
    if dup["duplicates"]["pairs"]:
        lines.append(f"{dup['duplicates']['pairs']:,} exact duplicate pairs ({dup['duplicates']['share']:.1%}): "
                     "data.filters.drop_duplicates=true keeps the first of each.")
    if dup["contradictions"]["pairs"]:
        lines.append(f"{dup['contradictions']['pairs']:,} contradictory pairs on {dup['contradictions']['prompts']:,} prompts "
                     "(the same completions, the preference reversed): data.filters.drop_contradictory=true drops them.")
    bias = report["length_bias"]
    unequal = bias["chosen_longer"] + bias["rejected_longer"]
    leaning = [b for b in bias["by_difference"][1:] if b["pairs"] >= 30 and abs(b["chosen_longer_share"] - 0.5) > 0.15]
    if abs(_share(bias["chosen_longer"], unequal) - 0.5) > 0.05 or leaning:
        by = "; ".join(f"{b['chosen_longer_share']:.0%} at a difference of {b['difference']} tokens" for b in leaning)
        lines.append(f"The chosen completion is the longer one in {_share(bias['chosen_longer'], unequal):.1%} of the "
                     f"pairs whose completions differ in length{f' ({by})' if by else ''}: a label that follows length (see the length-bias table; "
                     "data.filters.max_length_ratio, loss.ld_alpha).")
    if "contamination" in report:
        c = report["contamination"]
        if c["exact"]["prompts"] or c["over_threshold"]["prompts"]:
            lines.append(f"{c['exact']['prompts']:,} eval prompts appear whole in training, {c['over_threshold']['prompts']:,} "
                         f"have >= {c['threshold']:.0%} of their {c['ngram']}-grams in one training prompt: "
                         "data.filters.drop_contaminated=true drops those training pairs.")
    if "reference" in report:
        negative = report["reference"]["negative"]
        lines.append(f"The reference prefers rejected in {negative['pairs']:,} pairs ({negative['share']:.1%}); per token in "
                     f"{report['reference']['negative_per_token']['share']:.1%}.")
    return lines or ["Nothing stands out: no duplicates, contradictions, contamination or length bias found."]

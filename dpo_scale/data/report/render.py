"""report.md: the findings worth acting on first, then one table per part of report.json."""

from __future__ import annotations


def _table(header: list[str], rows: list[list]) -> list[str]:
    def cell(value) -> str:
        if isinstance(value, float):
            return f"{value:.3g}" if abs(value) < 1000 else f"{value:,.0f}"
        return f"{value:,}" if isinstance(value, int) else str(value)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows] + [""]


def _percentile_rows(stats: dict) -> list[list]:
    keys = ("mean", "p50", "p90", "p99", "max")
    return [[name, *(values.get(k, "") for k in keys)] for name, values in stats.items()]


def markdown(report: dict) -> str:
    data = report["data"]
    lines = [f"# Data report: {data['path']}", "", f"Token store `{data['store']}`.", "", "## Findings", ""]
    lines += [f"- {line}" for line in report["findings"]] + [""]

    lines += ["## Rows", ""]
    lines += _table(["rows", "pairs kept", *data["dropped"]], [[data["rows"], data["pairs"], *data["dropped"].values()]])
    lines += _table(["side", "pairs truncated", "share", "tokens cut"],
                    [[s, v["pairs"], v["share"], v["tokens_cut"]] for s, v in data["truncated"].items()])  # fmt: skip

    lengths = report["lengths"]
    lines += ["## Lengths (tokens, as stored)", "", "![lengths](lengths.png)", ""]
    sides = {k: lengths[k] for k in ("prompt", "chosen", "rejected", "sequence_before_truncation")}
    lines += _table(["", "mean", "p50", "p90", "p99", "max"], _percentile_rows(sides))
    lines += ["What a data.max_length keeps whole (prompt + the longer completion, before truncation):", ""]
    lines += _table(["data.max_length", "pairs whole", "share"],
                    [[r["max_length"], r["pairs"], r["share"]] for r in lengths["max_length_keeps_whole"]])  # fmt: skip

    bias = report["length_bias"]
    lines += ["## Length bias", "", "![length ratio](length_ratio.png)", ""]
    lines += _table(["chosen longer", "rejected longer", "equal", "chosen longer share"],
                    [[bias["chosen_longer"], bias["rejected_longer"], bias["equal"], bias["chosen_longer_share"]]])
    lines += _table(["", "mean", "p50", "p90", "p99", "max"],
                    _percentile_rows({"chosen / rejected tokens": bias["ratio_chosen_over_rejected"]}))
    lines += ["By the size of the length difference (a label that follows length rises with it):", ""]
    lines += _table(["|chosen - rejected| tokens", "pairs", "chosen longer share"],
                    [[b["difference"], b["pairs"], b["chosen_longer_share"]] for b in bias["by_difference"]])  # fmt: skip

    dup = report["duplicates"]
    lines += ["## Duplicates, shared prompts, contradictions", ""]
    lines += _table(["exact duplicate pairs", "share", "groups", "contradictory pairs", "their prompts"],
                    [[dup["duplicates"]["pairs"], dup["duplicates"]["share"], dup["duplicates"]["groups"],
                      dup["contradictions"]["pairs"], dup["contradictions"]["prompts"]]])  # fmt: skip
    prompts = dup["prompts"]
    lines += [f"{prompts['distinct']:,} distinct prompts; {prompts['with_several_pairs']:,} have several pairs "
              f"({prompts['pairs_in_them']:,} pairs); the most pairs on one prompt: {prompts['most_pairs']['pairs']} "
              f"({prompts['most_pairs']['example']}).", ""]
    lines += _table(["pairs per prompt", "prompts"], [[k, v] for k, v in prompts["pairs_per_prompt"].items()])
    lines += ["Duplicate groups (first rows):", ""] + [f"- {', '.join(g)}" for g in dup["duplicates"]["examples"]] + [""]
    lines += ["Contradictory pairs:", ""] + [f"- {a} / {b}" for a, b in dup["contradictions"]["examples"]] + [""]

    if "contamination" in report:
        c = report["contamination"]
        lines += [f"## Train / eval contamination ({c['eval']})", ""]
        lines += _table(["eval prompts", "whole in training", f">= {c['threshold']:g} of {c['ngram']}-grams in one prompt",
                         f"shorter than {c['ngram']} tokens"],
                        [[c["eval_prompts"], c["exact"]["prompts"], c["over_threshold"]["prompts"], c["short_prompts"]]])
        lines += ["Share of each eval prompt's n-grams found anywhere in training:", ""]
        lines += _table(["share", "eval prompts"], [[k, v] for k, v in c["ngram_share_anywhere"].items()])
        lines += _table(["eval prompt", "share in one training prompt", "training pair"],
                        [[e["eval"], e["share"], e["training"]] for e in c["examples"]])  # fmt: skip

    if "reference" in report:
        r = report["reference"]
        lines += ["## Reference margins (log p(chosen) - log p(rejected))", "", "![margins](margins.png)", ""]
        lines += _table(["", "mean", "p50", "p90", "p99", "max"],
                        _percentile_rows({"margin": r["margin"], "per token": r["per_token"]}))
        lines += _table(["pair", "margin", "per token"], [[m["pair"], m["margin"], m["per_token"]] for m in r["most_negative"]])
    return "\n".join(lines)

"""The demo's preference pairs made uneven: its pairs all have the same lengths, so a token budget would cut them
into equal batches of equal rows and never exercise padding. Here prompts, chosen and rejected each grow by words
the demo tokenizer knows, by different amounts per row."""

from __future__ import annotations

import json
from pathlib import Path

from dpo_scale.commands.demo import write_demo_material


def write_uneven_material(directory: Path, rows: int) -> tuple[Path, Path]:
    """The demo model and `rows` pairs of 14 to 34 tokens (prefix-shared unit: prompt + chosen + rejected)."""
    model_dir, data_path = write_demo_material(directory, rows=rows)
    lines = []
    for i, line in enumerate(data_path.read_text().splitlines()):
        row = json.loads(line)
        lines.append(json.dumps({
            "prompt": "the " * (2 * (i % 9)) + row["prompt"],
            "chosen": row["chosen"] + " and" * (i % 4),
            "rejected": row["rejected"] + " then" * (i % 5),
        }))  # fmt: skip
    uneven = directory / "uneven.jsonl"
    uneven.write_text("\n".join(lines) + "\n")
    return model_dir, uneven

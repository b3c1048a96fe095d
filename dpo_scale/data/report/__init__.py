"""The parts of `dpo-scale data-report` (commands/data_report.py): numpy over the token store's memory-mapped
shards, no second tokenization.

    scan.py     one streaming pass over the store's shards -> per-pair arrays, eval n-gram overlap
    stats.py    the numbers: counts, lengths, length bias, duplicates, contradictions, contamination, margins
    render.py   report.md;  figures.py: the PNGs
"""

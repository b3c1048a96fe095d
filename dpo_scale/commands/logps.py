"""`dpo-scale logps`: every pair's chosen and rejected log-prob sums under one model, in input order.

Users inspect their data with it and compare numbers with other tools; dropped pairs are listed with their reason.
Each forward holds `batch_size` pairs, or with `batch_tokens` as many consecutive ones as fit that many positions
(training/batch_plan.py); a pair's values are its own, whichever batch it is in.
"""

from __future__ import annotations

import json

import torch

from dpo_scale.config import LogpsRunConfig
from dpo_scale.data import load_prepared, padding_id, run_tokenizer
from dpo_scale.io import atomic_open
from dpo_scale.model.layout import collate
from dpo_scale.model.positions import position_limit
from dpo_scale.model.wrapper import PairLogpsModel, check_attention_device, load_causal_lm
from dpo_scale.training.batch_plan import check_batch_tokens, forward_batches


def run_logps(config: LogpsRunConfig) -> dict[str, float]:
    """Write `config.out` and return counts: pairs, dropped, tokens computed and unique tokens."""
    check_attention_device(config.logps, torch.device("cpu"))  # this command computes on the CPU
    positions = position_limit(config.model)
    positions.check_max_length(config.data.max_length)
    tokenizer = run_tokenizer(config.data, config.model.path)
    data = load_prepared(config.data, tokenizer, config.data.cache_dir)
    print(data.summary(), flush=True)
    positions.check_prepared(data)
    lengths = data.pair_lengths()  # (pairs, 3)
    check_batch_tokens(lengths, config.batch_tokens, config.logps, "pairs")
    model = PairLogpsModel(load_causal_lm(config.model), config.logps).eval()
    pad_token_id = padding_id(tokenizer)

    records = {d.index: {"index": d.index, "source": d.source, "dropped": d.reason} for d in data.dropped}
    tokens = unique_tokens = 0
    with torch.no_grad():
        for indices in forward_batches(lengths, config.batch_tokens, config.logps, max_pairs=config.batch_size):
            pairs = data.pairs[indices[0] : indices[-1] + 1]
            batch = collate(pairs, config.logps, pad_token_id)
            out = model(batch)
            tokens += batch.tokens
            unique_tokens += batch.unique_tokens
            columns = zip(
                out.chosen_logps.tolist(),
                out.rejected_logps.tolist(),
                out.chosen_tokens.int().tolist(),
                out.rejected_tokens.int().tolist(),
            )
            for pair, (chosen, rejected, chosen_tokens, rejected_tokens) in zip(pairs, columns):
                records[pair.index] = {
                    "index": pair.index,
                    "source": pair.source,
                    "chosen_logps": chosen,
                    "rejected_logps": rejected,
                    "chosen_tokens": chosen_tokens,
                    "rejected_tokens": rejected_tokens,
                }
    with atomic_open(config.out) as handle:
        for index in sorted(records):
            handle.write(json.dumps(records[index]) + "\n")
    return {
        "pairs": len(data.pairs),
        "dropped": len(data.dropped),
        "tokens": tokens,
        "unique_tokens": unique_tokens,
    }

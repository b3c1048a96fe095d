"""`dpo-scale ref-drift`: the NF4 copy's drift from the full-precision model on the first pairs of a data file
(reference/drift.py says what is measured), written as JSON and printed as a table."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from dpo_scale.config import ConfigError, DataConfig, LogpsConfig, ModelConfig
from dpo_scale.data import load_prepared, padding_id, run_tokenizer
from dpo_scale.io import atomic_open
from dpo_scale.model.positions import position_limit
from dpo_scale.model.wrapper import check_attention_device, load_causal_lm
from dpo_scale.reference.drift import DriftReport, measure_drift
from dpo_scale.reference.nf4 import default_device, load_nf4_reference, nf4_memory


def run_drift(
    model_path: str,
    data_config: DataConfig,
    num_pairs: int,
    out_json: str | Path,
    *,
    beta: float = 0.1,
    batch_size: int = 8,
    logps_config: LogpsConfig | None = None,
    dtype: str = "float32",
    double_quant: bool = True,
    compute_dtype: str = "float32",
    trust_remote_code: bool = False,
) -> DriftReport:
    """Drift on the first `num_pairs` prepared pairs (file order), both models on one device (this GPU, else the
    CPU); writes `out_json` atomically and prints the table."""
    if num_pairs < 1 or batch_size < 1:
        raise ConfigError(f"num_pairs={num_pairs}, batch_size={batch_size}: both must be at least 1")
    model_config = ModelConfig(model_path, dtype=dtype, trust_remote_code=trust_remote_code)
    logps_config = logps_config or LogpsConfig()
    device = default_device()
    check_attention_device(logps_config, device)
    positions = position_limit(model_config)
    positions.check_max_length(data_config.max_length)
    tokenizer = run_tokenizer(data_config, model_path)
    data = load_prepared(data_config, tokenizer, data_config.cache_dir)
    print(data.summary(), flush=True)
    pairs = data.pairs[:num_pairs]
    if not pairs:
        raise ConfigError(f"data.path={data_config.path}: no pairs left after preparation to measure drift on")
    positions.check_pairs(pairs)
    pad_token_id = padding_id(tokenizer)

    full = load_causal_lm(model_config).to(device).eval()
    nf4 = load_nf4_reference(model_config, double_quant, compute_dtype, device)
    memory = nf4_memory(nf4)  # before the first forward: bitsandbytes may repack weights there
    report = measure_drift(full, nf4, pairs, logps_config, pad_token_id, beta, batch_size)

    record = {
        "model": model_path,
        "data": data_config.path,
        "double_quant": double_quant,
        "compute_dtype": compute_dtype,
        "nf4_memory": {**asdict(memory), "bytes_per_quantized_param": memory.bytes_per_quantized_param},
        **report.to_dict(),
    }
    with atomic_open(out_json) as handle:
        json.dump(record, handle, indent=2)
    print(report.table(), flush=True)
    return report

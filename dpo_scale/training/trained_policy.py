"""A run's trained policy as a transformers model, from the latest complete checkpoint (or one checkpoint
directory): read as `dpo-scale export` writes it and as `dpo-scale eval` scores it. Only safetensors and the
checkpoint's JSON are read, never a pickled object."""

from __future__ import annotations

from pathlib import Path

import torch

from dpo_scale.config import ConfigError, TrainConfig, build
from dpo_scale.model.wrapper import add_lora
from dpo_scale.training import checkpoint


def latest_checkpoint(run_dir: str | Path) -> Path:
    """`run_dir` itself when it is one checkpoint directory (run_dir/checkpoints/step-N), else its latest complete
    checkpoint."""
    latest = Path(run_dir) if checkpoint.is_checkpoint(run_dir) else checkpoint.latest(run_dir)
    if latest is None:
        raise ConfigError(f"{run_dir}: no complete checkpoint (checkpoints/latest is missing); train first")
    return latest


def load_trained_policy(run_dir: str | Path, merge_lora: bool = True) -> tuple[torch.nn.Module, TrainConfig]:
    """The latest complete checkpoint of `run_dir` (or `run_dir` itself when it is one checkpoint directory,
    run_dir/checkpoints/step-N) as a transformers model (peft model for an unmerged LoRA run), and the run's config.
    Only safetensors and the checkpoint's JSON are read."""
    from transformers import AutoConfig, AutoModelForCausalLM

    latest = latest_checkpoint(run_dir)
    config = build(TrainConfig, checkpoint.saved_config(latest))
    weights = checkpoint.load_weights(latest)
    if config.lora.enabled:
        base = AutoModelForCausalLM.from_pretrained(
            config.model.path, use_safetensors=True, trust_remote_code=config.model.trust_remote_code
        )
        model = add_lora(base, config.lora)
        _load_exactly(model, weights)
        if merge_lora:
            model = model.merge_and_unload()
    else:
        model_config = AutoConfig.from_pretrained(config.model.path, trust_remote_code=config.model.trust_remote_code)
        model = AutoModelForCausalLM.from_config(model_config, trust_remote_code=config.model.trust_remote_code)
        _load_exactly(model, weights)
    return model, config


def _load_exactly(model: torch.nn.Module, weights: dict[str, torch.Tensor]) -> None:
    """Every weight of the checkpoint lands in the model; only a tied copy may be absent from the file."""
    missing, unexpected = model.load_state_dict(weights, strict=False)
    tied = {name for name in missing if _is_tied(model, name)}
    if unexpected or set(missing) - tied:
        raise ConfigError(
            f"checkpoint weights do not fit the model: missing {sorted(set(missing) - tied)[:5]}, "
            f"unexpected {sorted(unexpected)[:5]}"
        )
    if tied:
        model.tie_weights()


def _is_tied(model: torch.nn.Module, name: str) -> bool:
    output = model.get_output_embeddings()
    return output is not None and name.endswith("lm_head.weight") and output.weight is model.get_input_embeddings().weight

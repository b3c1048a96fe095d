"""Tiny models and pairs built locally for tests: nothing is downloaded."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from dpo_scale.data.pairs import Pair

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def shared_path(*parts: str) -> Path:
    """A file under ../shared/data, or skip the test when that folder is absent (a fresh clone has none)."""
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"needs {path} (the shared test material beside the repository)")
    return path


def tiny_llama(vocab_size: int = 97, tie: bool = False, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=tie,
    )
    return LlamaForCausalLM(config).eval()


def tiny_model(model_type: str, vocab_size: int = 97, seed: int = 0, **overrides) -> torch.nn.Module:
    """A 2-layer model of any transformers architecture, from its config class."""
    torch.manual_seed(seed)
    config = AutoConfig.for_model(
        model_type,
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=256,
        **overrides,
    )
    return AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").eval()


def stories260k() -> torch.nn.Module:
    path = shared_path("models", "stories260K")
    return AutoModelForCausalLM.from_pretrained(path, use_safetensors=True, dtype=torch.float32).eval()


def random_pairs(n: int, vocab_size: int, seed: int = 0, max_len: int = 12, start_index: int = 0) -> list[Pair]:
    """Pairs of varied lengths whose completions differ, token ids in [3, vocab)."""
    rng = random.Random(seed)

    def ids(lo: int, hi: int) -> list[int]:
        return [rng.randrange(3, vocab_size) for _ in range(rng.randint(lo, hi))]

    pairs = []
    for i in range(n):
        chosen, rejected = ids(1, max_len), ids(1, max_len)
        while rejected == chosen:
            rejected = ids(1, max_len)
        pairs.append(Pair(start_index + i, f"random row {i}", ids(1, max_len), chosen, rejected))
    return pairs

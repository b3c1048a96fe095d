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


def tiny_model(
    model_type: str, vocab_size: int = 97, seed: int = 0, attention: str = "sdpa", **overrides
) -> torch.nn.Module:
    """A 2-layer model of any transformers architecture, from its config class."""
    torch.manual_seed(seed)
    settings = dict(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, max_position_embeddings=256,
    )  # fmt: skip
    config = AutoConfig.for_model(model_type, **{**settings, **overrides})
    return AutoModelForCausalLM.from_config(config, attn_implementation=attention).eval()


def stories260k() -> torch.nn.Module:
    path = shared_path("models", "stories260K")
    return AutoModelForCausalLM.from_pretrained(path, use_safetensors=True, dtype=torch.float32).eval()


STORY_PAIRS = [
    ("Once upon a time, there was a little girl named Lily.", " She loved to play outside in the park.",
     " The car was blue and it went very fast on the road."),
    ("Tom had a big red ball.", " He liked to throw it to his dog every day.", " Ball red big a had Tom."),
    ("One day, a cat saw a bird in a tree.", " The cat wanted to be friends with the bird.",
     " The cat wanted to eat the bird."),
    ("Mom said,", ' "Time for bed, Ben."', ' "Let us go to the moon and eat cake all night long!"'),
    ("The sun was shining and the sky was blue.", " The kids ran to the beach.", " It was raining."),
    ("Sue found a shiny rock.", " She showed it to her mom, who smiled.", " She threw it at the window."),
]


def story_pairs() -> list[Pair]:
    """Real text under stories260K's own tokenizer (prompt with BOS, completions with EOS)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(shared_path("models", "stories260K"))
    pairs = []
    for i, (prompt, chosen, rejected) in enumerate(STORY_PAIRS):
        prompt_ids = tokenizer(prompt)["input_ids"]

        def completion(text: str) -> list[int]:
            return tokenizer(prompt + text)["input_ids"][len(prompt_ids):] + [tokenizer.eos_token_id]

        pairs.append(Pair(i, f"story {i}", prompt_ids, completion(chosen), completion(rejected)))
    return pairs


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

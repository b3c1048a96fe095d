"""Sampling completions from a policy (eval's generations, the training loop's diversity check), and their diversity."""

from __future__ import annotations

import torch

from dpo_scale.config import GenerationConfig
from dpo_scale.data import padding_id


@torch.no_grad()
def generate(model, prompts: list[list[int]], settings: GenerationConfig, tokenizer, device) -> list[list[int]]:
    """`samples_per_prompt` completions per prompt (prompt-major order), each cut after its first EOS. Seeded per
    batch from settings.seed inside a forked RNG, so a caller's random state (a training run's) is left as it was."""
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        return _sample(model, prompts, settings, tokenizer, device)


def _sample(model, prompts: list[list[int]], settings: GenerationConfig, tokenizer, device) -> list[list[int]]:
    pad, eos = padding_id(tokenizer), tokenizer.eos_token_id
    completions: list[list[int]] = []
    generator_seed = settings.seed
    for start in range(0, len(prompts), settings.batch_size):
        chunk = prompts[start : start + settings.batch_size]
        width = max(len(p) for p in chunk)
        input_ids = torch.tensor([[pad] * (width - len(p)) + p for p in chunk], device=device)  # left padding
        attention_mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk], device=device)
        torch.manual_seed(generator_seed + start)  # the same draws for the policy and the reference
        output = model.generate(
            input_ids=input_ids, attention_mask=attention_mask, do_sample=True, temperature=settings.temperature,
            top_p=settings.top_p, top_k=settings.top_k, max_new_tokens=settings.max_new_tokens,
            num_return_sequences=settings.samples_per_prompt, pad_token_id=pad, eos_token_id=eos,
        )  # fmt: skip
        for row in output[:, width:].tolist():
            completions.append(row[: row.index(eos) + 1] if eos in row else row)
    return completions


def distinct_n(completions: list[list[int]], n: int) -> float:
    """Unique n-grams over all n-grams of all completions (Li et al. 2016), on token ids; 0 for none."""
    grams = [tuple(c[i : i + n]) for c in completions for i in range(len(c) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0

"""Cut a pair to `max_length` tokens per prompt+completion sequence, keeping one prompt shared by both completions.

The shared prompt is what lets a prefix-shared forward compute it once for chosen and rejected.

- keep_start: each prompt+completion sequence is cut at its end, keeping its first `max_length` tokens. Identical
  to TRL's keep_start; a prompt of `max_length` tokens or more leaves the completions empty (TRL filters such
  pairs out, we drop and count them as `empty_completion`).
- keep_end: tokens are dropped from the start of the prompt until the longer of prompt+chosen and
  prompt+rejected fits, keeping at least one prompt token so the first completion token is still predicted from
  something; completions that still do not fit are then cut at their end. TRL's keep_end instead cuts each
  sequence's start independently, so the shorter sequence may keep more of the prompt than the longer one and
  the two no longer share a prompt.

A kept pair's prompt is always the end of its whole prompt: keep_end cuts the start, and keep_start cuts a prompt
only when it fills max_length, which leaves no completion (the pair is dropped). `prompt_head` is the part cut
away, which the store keeps for contamination (prompt_heads.py): that compares the data, not the window.
"""

from __future__ import annotations

import dataclasses

from dpo_scale.config import TruncationMode
from dpo_scale.data.pairs import DropReason, Pair


def truncate(pair: Pair, max_length: int | None, mode: TruncationMode) -> Pair:
    if max_length is None:
        return pair
    cut = keep_start if mode == "keep_start" else keep_end
    prompt_ids, chosen_ids, rejected_ids = cut(pair.prompt_ids, pair.chosen_ids, pair.rejected_ids, max_length)
    return dataclasses.replace(pair, prompt_ids=prompt_ids, chosen_ids=chosen_ids, rejected_ids=rejected_ids)


def keep_start(
    prompt_ids: list[int], chosen_ids: list[int], rejected_ids: list[int], max_length: int
) -> tuple[list[int], list[int], list[int]]:
    room = max(max_length - len(prompt_ids), 0)
    return prompt_ids[:max_length], chosen_ids[:room], rejected_ids[:room]


def keep_end(
    prompt_ids: list[int], chosen_ids: list[int], rejected_ids: list[int], max_length: int
) -> tuple[list[int], list[int], list[int]]:
    overflow = len(prompt_ids) + max(len(chosen_ids), len(rejected_ids)) - max_length
    if overflow > 0:
        kept = max(len(prompt_ids) - overflow, min(len(prompt_ids), 1))  # at least one token of a non-empty prompt
        prompt_ids = prompt_ids[len(prompt_ids) - kept:]
    room = max_length - len(prompt_ids)
    return prompt_ids, chosen_ids[:room], rejected_ids[:room]


def prompt_head(whole: Pair, truncated: Pair) -> list[int]:
    """The tokens truncation cut from the start of the prompt: head + truncated.prompt_ids == whole.prompt_ids for
    every pair that keeps a completion."""
    return whole.prompt_ids[: len(whole.prompt_ids) - len(truncated.prompt_ids)]


def missing_signal(pair: Pair) -> DropReason | None:
    """Why this pair cannot teach a preference, or None if it can."""
    if not pair.chosen_ids or not pair.rejected_ids:
        return "empty_completion"
    if pair.chosen_ids == pair.rejected_ids:
        return "identical_completions"
    return None

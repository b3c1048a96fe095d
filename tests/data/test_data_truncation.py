"""Pair-level truncation on hand-made token lists: one prompt shared by both completions, cut as documented."""

import random

import pytest

from dpo_scale.data.pairs import Pair
from dpo_scale.data.truncation import keep_end, keep_start, missing_signal, prompt_head, truncate

PROMPT = [1, 2, 3, 4, 5]
CHOSEN = [10, 11, 12]
REJECTED = [20, 21, 22, 23, 24, 25]


def test_no_max_length_leaves_the_pair_alone():
    pair = Pair(0, "row 0", PROMPT, CHOSEN, REJECTED)
    assert truncate(pair, None, "keep_end") is pair


def test_keep_start_cuts_each_sequence_at_its_end():
    # 5 prompt tokens leave room for 3 completion tokens in 8
    assert keep_start(PROMPT, CHOSEN, REJECTED, 8) == (PROMPT, [10, 11, 12], [20, 21, 22])
    # each sequence is its first max_length tokens, exactly as TRL's collator slices [:max_length]
    prompt, chosen, rejected = keep_start(PROMPT, CHOSEN, REJECTED, 7)
    assert prompt + chosen == (PROMPT + CHOSEN)[:7]
    assert prompt + rejected == (PROMPT + REJECTED)[:7]


def test_keep_start_with_a_prompt_that_fills_max_length_empties_the_completions():
    assert keep_start(PROMPT, CHOSEN, REJECTED, 5) == (PROMPT, [], [])
    assert keep_start(PROMPT, CHOSEN, REJECTED, 3) == ([1, 2, 3], [], [])


def test_keep_end_drops_the_prompt_start_until_the_longer_sequence_fits():
    # longer sequence: 5 + 6 = 11 tokens; max 9 drops the first 2 prompt tokens, for both completions
    assert keep_end(PROMPT, CHOSEN, REJECTED, 9) == ([3, 4, 5], CHOSEN, REJECTED)


def test_keep_end_keeps_one_prompt_token_then_cuts_the_completions_ends():
    assert keep_end(PROMPT, CHOSEN, REJECTED, 4) == ([5], [10, 11, 12], [20, 21, 22])
    assert keep_end(PROMPT, CHOSEN, REJECTED, 2) == ([5], [10], [20])


def test_keep_end_that_fits_is_unchanged():
    assert keep_end(PROMPT, CHOSEN, REJECTED, 11) == (PROMPT, CHOSEN, REJECTED)


def test_keep_end_with_an_empty_prompt():
    """A prompt can be empty when its tokens merge with the completion's; then only completions are cut."""
    assert keep_end([], CHOSEN, REJECTED, 4) == ([], CHOSEN, [20, 21, 22, 23])


@pytest.mark.parametrize("mode", ["keep_start", "keep_end"])
def test_truncated_sequences_fit_and_share_one_prompt(mode):
    for max_length in range(2, 13):
        pair = truncate(Pair(3, "row 3", PROMPT, CHOSEN, REJECTED), max_length, mode)
        assert (pair.index, pair.source) == (3, "row 3")
        assert len(pair.prompt_ids) + max(len(pair.chosen_ids), len(pair.rejected_ids)) <= max_length
        kept_prompt = PROMPT[-len(pair.prompt_ids):] if mode == "keep_end" else PROMPT[:max_length]
        assert pair.prompt_ids == kept_prompt


@pytest.mark.parametrize(
    "chosen, rejected, reason",
    [
        ([7], [8], None),
        ([], [8], "empty_completion"),
        ([7], [], "empty_completion"),
        ([], [], "empty_completion"),
        ([7, 8], [7, 8], "identical_completions"),
    ],
)
def test_missing_signal(chosen, rejected, reason):
    assert missing_signal(Pair(0, "row 0", [1], chosen, rejected)) == reason


def test_truncation_can_make_completions_identical():
    """Completions that differ only after max_length become identical: the pair is dropped, not trained on."""
    pair = truncate(Pair(0, "row 0", [1, 2], [5, 6, 7], [5, 6, 9]), 4, "keep_start")
    assert (pair.chosen_ids, pair.rejected_ids) == ([5, 6], [5, 6])
    assert missing_signal(pair) == "identical_completions"


@pytest.mark.parametrize("mode", ["keep_start", "keep_end"])
def test_the_prompt_head_and_the_kept_prompt_make_the_whole_prompt(mode):
    """What contamination reads as the whole prompt: for every pair that keeps a completion, its head (the tokens
    cut from the prompt's start) followed by the prompt as kept."""
    rng = random.Random(0)
    for _ in range(500):
        whole = Pair(0, "row 0", *([rng.randrange(50) for _ in range(rng.randint(0, 20))] for _ in range(3)))
        cut = truncate(whole, rng.randint(2, 30), mode)
        if missing_signal(cut) != "empty_completion":
            assert prompt_head(whole, cut) + cut.prompt_ids == whole.prompt_ids

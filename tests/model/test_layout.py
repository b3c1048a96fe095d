"""The layouts' structure: what attends to what, position ids, scored positions and token counts."""

import torch

from dpo_scale.config import LogpsConfig
from dpo_scale.data.pairs import Pair
from dpo_scale.model.layout import PACKED_ROW_TOKENS, collate, dense_mask, padding_mask

PAIR = Pair(0, "hand-made", prompt_ids=[10, 11, 12], chosen_ids=[20, 21], rejected_ids=[30, 31, 32])


def test_padded_layout_is_trl_layout():
    """Chosen rows first, then rejected, right-padded, with TRL's 2D mask."""
    batch = collate([PAIR], LogpsConfig(prefix_sharing=False, packing=False, streaming=False), pad_token_id=0)
    assert batch.input_ids.tolist() == [[10, 11, 12, 20, 21, 0], [10, 11, 12, 30, 31, 32]]
    assert padding_mask(batch).tolist() == [[1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1]]
    # chosen token 20 is predicted from position 2 (the prompt's last), etc.
    assert list(zip(batch.score_rows.tolist(), batch.score_cols.tolist(), batch.score_labels.tolist())) == [
        (0, 2, 20), (0, 3, 21), (1, 2, 30), (1, 3, 31), (1, 4, 32),
    ]
    assert batch.score_slots.tolist() == [0, 0, 1, 1, 1]
    assert (batch.tokens, batch.real_tokens, batch.unique_tokens) == (12, 11, 8)


def test_prefix_shared_mask_and_positions():
    batch = collate([PAIR], LogpsConfig(prefix_sharing=True), pad_token_id=0)
    assert batch.input_ids.tolist() == [[10, 11, 12, 20, 21, 30, 31, 32]]
    assert batch.position_ids.tolist() == [[0, 1, 2, 3, 4, 3, 4, 5]]
    mask = dense_mask(batch)[0, 0].int().tolist()
    assert mask == [
        [1, 0, 0, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0, 0, 0],
        [1, 1, 1, 1, 0, 0, 0, 0],
        [1, 1, 1, 1, 1, 0, 0, 0],
        [1, 1, 1, 0, 0, 1, 0, 0],  # rejected sees the prompt and itself, not chosen
        [1, 1, 1, 0, 0, 1, 1, 0],
        [1, 1, 1, 0, 0, 1, 1, 1],
    ]
    # the first rejected token (30) is scored from the prompt's last position, the next ones from rejected
    assert list(zip(batch.score_cols.tolist(), batch.score_labels.tolist(), batch.score_slots.tolist())) == [
        (2, 20, 0), (3, 21, 0), (2, 30, 1), (5, 31, 1), (6, 32, 1),
    ]
    assert (batch.tokens, batch.real_tokens, batch.unique_tokens) == (8, 8, 8)


def test_packing_isolates_units_and_restarts_positions():
    other = Pair(1, "hand-made", prompt_ids=[40], chosen_ids=[50], rejected_ids=[60])
    batch = collate([PAIR, other], LogpsConfig(prefix_sharing=True, packing=True, pack_length=11), pad_token_id=0)
    assert batch.input_ids.shape == (1, 11)
    assert batch.input_ids[0].tolist() == [10, 11, 12, 20, 21, 30, 31, 32, 40, 50, 60]
    assert batch.position_ids[0].tolist() == [0, 1, 2, 3, 4, 3, 4, 5, 0, 1, 1]
    mask = dense_mask(batch)[0, 0]
    assert not mask[8:, :8].any() and not mask[:8, 8:].any()
    assert batch.score_slots.tolist() == [0, 0, 2, 2, 2, 1, 3]
    assert batch.tokens == batch.real_tokens == batch.unique_tokens == 11


def _pair_of_length(index: int, length: int) -> Pair:
    """A pair whose prefix-shared unit is `length` tokens: prompt length - 2, one chosen and one rejected token."""
    return Pair(index, "hand-made", prompt_ids=[7] * (length - 2), chosen_ids=[8], rejected_ids=[9])


def test_default_packing_computes_the_fewest_positions_within_the_row_limit():
    """Rows as long as the longest unit (600) would hold 600 | 400 | 350 | 300: 2,400 positions for 1,650 tokens.
    The default tries the capacities that fill 1, 2, ... rows evenly and keeps the fewest positions: one row."""
    lengths = [600, 400, 350, 300]
    pairs = [_pair_of_length(i, n) for i, n in enumerate(lengths)]
    by_longest = collate(pairs, LogpsConfig(pack_length=600), pad_token_id=0)
    assert by_longest.tokens == 2_400
    batch = collate(pairs, LogpsConfig(), pad_token_id=0)
    assert batch.input_ids.shape == (1, 1_650) and batch.tokens == batch.unique_tokens == 1_650
    # over PACKED_ROW_TOKENS the rows split, evenly: 1,000 + 500 | 900 + 600 rather than four rows of 1,000
    pairs = [_pair_of_length(i, n) for i, n in enumerate([1_000, 900, 600, 500])]
    batch = collate(pairs, LogpsConfig(), pad_token_id=0)
    assert batch.input_ids.shape == (2, 1_500) and PACKED_ROW_TOKENS < 3_000
    # a unit longer than the limit sets the capacity, as pack_length does
    pairs = [_pair_of_length(i, n) for i, n in enumerate([3_000, 1_000, 900])]
    assert collate(pairs, LogpsConfig(), pad_token_id=0).input_ids.shape == (2, 3_000)


def test_padding_positions_attend_only_to_themselves():
    """An all-masked softmax row is NaN in SDPA; padding keeps its diagonal so every row has one key."""
    short = Pair(1, "hand-made", prompt_ids=[40], chosen_ids=[50], rejected_ids=[60])
    batch = collate([PAIR, short], LogpsConfig(prefix_sharing=True, packing=False), pad_token_id=0)
    mask = dense_mask(batch)[1, 0]
    assert mask[3:, :].int().tolist() == torch.eye(8, dtype=torch.int)[3:].tolist()
    assert mask.any(dim=-1).all()

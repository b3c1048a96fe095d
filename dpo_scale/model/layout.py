"""Batch layouts: how a list of pairs becomes model inputs, and which hidden state scores which token.

Three layouts, all giving the same log-probs (tests/model/test_layout.py, tests/model/test_logps.py):

- padded (the plain reference path, as TRL lays it out): rows [prompt+chosen_1 .. prompt+chosen_B,
  prompt+rejected_1 .. prompt+rejected_B], right-padded, a 2D attention mask. The prompt is computed twice.
- prefix-shared (arXiv 2410.20305): one unit [prompt | chosen | rejected] per pair. Rejected tokens attend to the
  prompt and to themselves but not to chosen; their position ids continue from the end of the prompt. The first
  rejected token is scored from the prompt's last position, exactly as in its own sequence.
- packed (padding-free): several units per row, attention isolated per unit, position ids restarting per unit.
  Packing combines with either of the above.

Every layout reduces to the same scoring description: for each scored completion token, the (row, column) of the
hidden state that predicts it, its label, and its slot (pair i's chosen is slot i, its rejected slot B + i). The
log-prob stage gathers only those hidden states, so it never depends on the layout.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields

import torch

from dpo_scale.config import LogpsConfig
from dpo_scale.data.pairs import Pair

PROMPT, CHOSEN, REJECTED = 0, 1, 2


@dataclass
class PairBatch:
    input_ids: torch.Tensor  # (R, T)
    position_ids: torch.Tensor  # (R, T)
    unit_ids: torch.Tensor  # (R, T) the unit each position belongs to, -1 for padding
    branches: torch.Tensor  # (R, T) PROMPT, CHOSEN or REJECTED
    score_rows: torch.Tensor  # (N,) row of the hidden state that predicts each scored token
    score_cols: torch.Tensor  # (N,) its column
    score_labels: torch.Tensor  # (N,) the token it predicts
    score_slots: torch.Tensor  # (N,) pair i chosen -> i, rejected -> num_pairs + i
    score_positions: torch.Tensor  # (N,) each scored token's place in its completion's scored tokens, from 0
    num_pairs: int
    tokens: int
    """Positions the model computes, padding included (R x T)."""
    real_tokens: int
    """Positions holding a token: what a padding-free kernel would compute."""
    unique_tokens: int
    """Prompt + chosen + rejected lengths: the least any layout must compute."""
    pairs: tuple[Pair, ...] = ()
    """The pairs themselves, in slot order (the reference cache looks them up by their tokens)."""

    def to(self, device: torch.device) -> PairBatch:
        moved = {f.name: getattr(self, f.name) for f in fields(self)}
        return PairBatch(**{k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in moved.items()})


@dataclass
class _Unit:
    """One contiguous run of tokens that attends only within itself."""

    ids: list[int]
    branches: list[int]
    positions: list[int]
    scores: list[tuple[int, int, int]]  # (offset of the predicting token, label, slot)


def _separate_units(pairs: list[Pair]) -> list[_Unit]:
    units = []
    num_pairs = len(pairs)
    for branch, slot_base in ((CHOSEN, 0), (REJECTED, num_pairs)):
        for i, pair in enumerate(pairs):
            completion = pair.chosen_ids if branch == CHOSEN else pair.rejected_ids
            ids = pair.prompt_ids + completion
            start = len(pair.prompt_ids)
            # A token with nothing before it (only possible with an empty prompt) is not scored, as in TRL.
            scores = [(k - 1, ids[k], slot_base + i) for k in range(max(start, 1), len(ids))]
            units.append(
                _Unit(ids, [PROMPT] * start + [branch] * len(completion), list(range(len(ids))), scores)
            )
    return units


def _shared_units(pairs: list[Pair]) -> list[_Unit]:
    units = []
    num_pairs = len(pairs)
    for i, pair in enumerate(pairs):
        p, c, r = len(pair.prompt_ids), len(pair.chosen_ids), len(pair.rejected_ids)
        ids = pair.prompt_ids + pair.chosen_ids + pair.rejected_ids
        scores = [(k - 1, ids[k], i) for k in range(max(p, 1), p + c)]
        for j in range(r):
            # rejected token j is predicted by the token before it in prompt+rejected: the prompt's last token
            # for j = 0, else rejected token j-1 (which sits after the whole chosen block)
            predictor = (p - 1) if j == 0 else (p + c + j - 1)
            if predictor >= 0:
                scores.append((predictor, pair.rejected_ids[j], num_pairs + i))
        units.append(
            _Unit(
                ids,
                [PROMPT] * p + [CHOSEN] * c + [REJECTED] * r,
                list(range(p + c)) + list(range(p, p + r)),
                scores,
            )
        )
    return units


def _pack(sizes: list[int], capacity: int) -> list[list[int]]:
    """First-fit decreasing of units of these `sizes` (tokens): each row's unit indices. Few rows, little padding; a
    unit longer than `capacity` gets a row of its own."""
    rows: list[list[int]] = []
    room: list[int] = []
    for unit in sorted(range(len(sizes)), key=sizes.__getitem__, reverse=True):
        for r, free in enumerate(room):
            if sizes[unit] <= free:
                rows[r].append(unit)
                room[r] -= sizes[unit]
                break
        else:
            rows.append([unit])
            room.append(capacity - sizes[unit])
    return rows


# Rows grow up to this many tokens when that means less padding. Every position of a row costs the same projections
# whether it holds a token or padding, while a row's attention costs its length squared (the dense mask's kernels do
# not skip masked blocks): at 2,048 the attention of a 117M Llama is under half its projections' work per token, and
# the mask 16 MiB a row. HH-RLHF, 4 pairs a micro-batch: 1.13-1.48 positions per unique token with rows as long as
# the longest pair, 1.00 here; 117M 1.04x pairs/s and -5% peak RSS (BENCHMARKS.md, issue 23).
PACKED_ROW_TOKENS = 2048


def _pack_rows(sizes: list[int], pack_length: int | None) -> list[list[int]]:
    """Rows of unit indices for units of these `sizes`. `pack_length` given: first-fit decreasing into rows of that
    capacity (or the longest unit's). None: of the capacities that fill 1, 2, ... rows evenly, up to
    PACKED_ROW_TOKENS (never below the longest unit), the packing that computes the fewest positions (rows x longest
    row), the shorter rows on a tie."""
    longest = max(sizes)
    if pack_length is not None:
        return _pack(sizes, max(pack_length, longest))
    total = sum(sizes)
    capacities = {max(longest, -(-total // rows)) for rows in range(1, len(sizes) + 1)}
    packings = [_pack(sizes, c) for c in sorted(capacities) if c <= max(longest, PACKED_ROW_TOKENS)]

    def cost(rows: list[list[int]]) -> tuple[int, int]:
        width = max(sum(sizes[u] for u in row) for row in rows)
        return len(rows) * width, width

    return min(packings, key=cost)


def unit_sizes(lengths: Sequence[tuple[int, int, int]], config: LogpsConfig) -> list[int]:
    """The units (runs of tokens attending within themselves) of pairs of these (prompt, chosen, rejected) lengths,
    in `collate`'s order: one [prompt | chosen | rejected] per pair with prefix sharing, else every prompt + chosen,
    then every prompt + rejected."""
    if config.prefix_sharing:
        return [p + c + r for p, c, r in lengths]
    return [p + c for p, c, _ in lengths] + [p + r for p, _, r in lengths]


def layout_positions(lengths: Sequence[tuple[int, int, int]], config: LogpsConfig, length_multiple: int = 1) -> int:
    """The positions `collate` lays out (its `tokens`: rows x row length, padding included) for pairs of these
    (prompt, chosen, rejected) lengths, computed from the lengths alone: what a token budget counts."""
    sizes = unit_sizes(lengths, config)
    rows = _pack_rows(sizes, config.pack_length) if config.packing else [[u] for u in range(len(sizes))]
    length = max(sum(sizes[u] for u in row) for row in rows)
    return len(rows) * (-(-length // length_multiple) * length_multiple)


def collate(pairs: list[Pair], config: LogpsConfig, pad_token_id: int, length_multiple: int = 1) -> PairBatch:
    """`length_multiple`: rows padded to a multiple of it (sequence parallelism splits every row into equal slices:
    `sequence_parallel_multiple`). The padding is counted in `tokens` and never scored."""
    if not pairs:
        raise ValueError("collate needs at least one pair")
    units = _shared_units(pairs) if config.prefix_sharing else _separate_units(pairs)
    if config.packing:
        rows = [[units[u] for u in row] for row in _pack_rows([len(u.ids) for u in units], config.pack_length)]
    else:
        rows = [[u] for u in units]

    num_rows = len(rows)
    length = max(sum(len(u.ids) for u in row) for row in rows)
    length = -(-length // length_multiple) * length_multiple
    input_ids = torch.full((num_rows, length), pad_token_id, dtype=torch.long)
    position_ids = torch.zeros((num_rows, length), dtype=torch.long)
    unit_ids = torch.full((num_rows, length), -1, dtype=torch.long)  # -1 marks padding
    branches = torch.zeros((num_rows, length), dtype=torch.long)
    score_rows, score_cols, score_labels, score_slots, score_positions = [], [], [], [], []
    scored_in_slot = [0] * (2 * len(pairs))
    unit_counter = 0
    for r, row in enumerate(rows):
        offset = 0
        for unit in row:
            end = offset + len(unit.ids)
            input_ids[r, offset:end] = torch.tensor(unit.ids)
            position_ids[r, offset:end] = torch.tensor(unit.positions)
            branches[r, offset:end] = torch.tensor(unit.branches)
            unit_ids[r, offset:end] = unit_counter
            for predictor, label, slot in unit.scores:
                score_rows.append(r)
                score_cols.append(offset + predictor)
                score_labels.append(label)
                score_slots.append(slot)
                score_positions.append(scored_in_slot[slot])
                scored_in_slot[slot] += 1
            unit_counter += 1
            offset = end

    real = unit_ids >= 0
    return PairBatch(
        input_ids=input_ids,
        position_ids=position_ids,
        unit_ids=unit_ids,
        branches=branches,
        score_rows=torch.tensor(score_rows, dtype=torch.long),
        score_cols=torch.tensor(score_cols, dtype=torch.long),
        score_labels=torch.tensor(score_labels, dtype=torch.long),
        score_slots=torch.tensor(score_slots, dtype=torch.long),
        score_positions=torch.tensor(score_positions, dtype=torch.long),
        num_pairs=len(pairs),
        tokens=num_rows * length,
        real_tokens=int(real.sum()),
        unique_tokens=sum(len(p.prompt_ids) + len(p.chosen_ids) + len(p.rejected_ids) for p in pairs),
        pairs=tuple(pairs),
    )


def may_attend(unit_ids: torch.Tensor, branches: torch.Tensor):
    """The layout's attention rule as a FlexAttention mask_mod (batch, head, query, key index tensors -> bool):
    causal, within one unit, rejected never sees chosen; a padding position sees only itself, so that no softmax
    row is empty (an all-masked row gives NaN in SDPA, and NaN times a zero gradient is still NaN). The dense mask
    and the block mask are both this function."""

    def mask_mod(b, h, q, kv):
        unit, key_unit = unit_ids[b, q], unit_ids[b, kv]
        rejected_sees_chosen = (branches[b, q] == REJECTED) & (branches[b, kv] == CHOSEN)
        inside = (kv <= q) & (unit == key_unit) & ~rejected_sees_chosen & (unit >= 0)
        return inside | ((q == kv) & (unit < 0))

    return mask_mod


def dense_mask(batch: PairBatch) -> torch.Tensor:
    """(R, 1, T, T) bool, True = may attend: `may_attend` evaluated everywhere. Costs R x T x T bytes (and the
    model's additive copy R x T x T x dtype bytes): what the kernel paths avoid."""
    rows, length = batch.unit_ids.shape
    q = torch.arange(length, device=batch.unit_ids.device)
    b = torch.arange(rows, device=batch.unit_ids.device)
    return may_attend(batch.unit_ids, batch.branches)(b[:, None, None], None, q[None, :, None], q[None, None, :])[:, None]


def additive_mask(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A boolean mask (True = may attend) as the kernels add it to the scores: 0 or the dtype's minimum (eager adds
    a mask to the scores, so a boolean one would add 1 to the allowed positions; SDPA reads an additive one alike)."""
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill_(~allowed, torch.finfo(dtype).min)


FLEX_BLOCK = 128  # FlexAttention's default block size on both axes


def sequence_parallel_multiple(sequence_parallel_size: int, attention: str) -> int:
    """What every row's length is padded to a multiple of: one equal slice per rank of a sequence-parallel group,
    and under FlexAttention whole 128-token blocks in each slice (the gathered row is then whole blocks too)."""
    if sequence_parallel_size == 1:
        return 1
    return sequence_parallel_size * (FLEX_BLOCK if attention == "flex" else 1)


def block_mask(batch: PairBatch):
    """The FlexAttention BlockMask of `may_attend`: for each 128 x 128 block whether it is empty, full or partial
    (partial blocks evaluate the mask_mod inside the kernel). torch's create_block_mask evaluates the mask_mod over
    the whole (R, T, T) grid unless compiled; here it is evaluated one 128-query block at a time, so building the
    mask holds R x 128 x T booleans, and the BlockMask itself R x (T/128)^2 block indices."""
    from torch.nn.attention.flex_attention import BlockMask

    rows, length = batch.unit_ids.shape
    device = batch.unit_ids.device
    blocks = -(-length // FLEX_BLOCK)
    mask_mod = may_attend(batch.unit_ids, batch.branches)
    b = torch.arange(rows, device=device)[:, None, None]
    kv = torch.arange(blocks * FLEX_BLOCK, device=device).clamp_max(length - 1)[None, None, :]
    valid_kv = torch.arange(blocks * FLEX_BLOCK, device=device) < length  # past T: neither allowed nor counted
    partial = torch.zeros(rows, blocks, blocks, dtype=torch.bool, device=device)
    full = torch.zeros_like(partial)
    for block in range(blocks):
        q = torch.arange(block * FLEX_BLOCK, min((block + 1) * FLEX_BLOCK, length), device=device)[None, :, None]
        allowed = mask_mod(b, None, q, kv) & valid_kv  # (R, <=128, blocks * 128)
        per_block = allowed.view(rows, q.shape[1], blocks, FLEX_BLOCK)
        some, every = per_block.any(dim=(1, 3)), per_block.all(dim=(1, 3))
        full[:, block] = every
        partial[:, block] = some & ~every
    return BlockMask.from_kv_blocks(
        *_block_indices(partial), *_block_indices(full), BLOCK_SIZE=FLEX_BLOCK, mask_mod=mask_mod,
        seq_lengths=(length, length),
    )  # fmt: skip


def _block_indices(present: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(R, Q blocks, KV blocks) bool -> BlockMask's (R, 1, Q blocks) counts and (R, 1, Q blocks, KV blocks) indices,
    each row's present blocks first."""
    counts = present.sum(-1, dtype=torch.int32)
    order = torch.argsort((~present).to(torch.int8), dim=-1, stable=True).to(torch.int32)
    return counts[:, None], order[:, None]


def padding_mask(batch: PairBatch) -> torch.Tensor:
    """(R, T) 1 where a token is, 0 at padding: the padded layout's 2D mask, which every attention kernel takes."""
    return (batch.unit_ids >= 0).long()

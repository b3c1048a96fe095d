"""How many positions a model takes, and the checks that refuse what would go past them, before any weights load.

Read from the model's config.json alone (`max_position_embeddings`; GPT-2 calls it `n_positions`): every command
that runs a model over pairs (train, precompute-ref, logps, eval, ref-drift) checks data.max_length at start and
the prepared pairs (the longest decides when data.max_length is unset) before the model is built.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from dpo_scale.config import ConfigError, ModelConfig
from dpo_scale.data.pairs import Pair, PreparedData
from dpo_scale.data.store import TokenStore
from dpo_scale.hub import check_model_source


def read_text_config(config: ModelConfig):
    """The model's transformers config (its text part for a multimodal model) from config.json alone: what the checks
    made before any weights load read."""
    from transformers import AutoConfig

    check_model_source(config.path, "model.path", "point model.path at a model directory or a hub id")
    try:
        whole = AutoConfig.from_pretrained(config.path, trust_remote_code=config.trust_remote_code)
    except (OSError, ValueError) as error:
        raise ConfigError(
            f"model.path={config.path}: cannot read the model's config.json ({error}). Point model.path at a "
            "directory holding config.json and *.safetensors, or a hub id"
        ) from None
    return whole.get_text_config()


def positions_needed(pair: Pair) -> int:
    """The positions a pair's forward computes, in every layout of layout.py: its prompt and its longer completion.
    Padded rows hold prompt + each completion; prefix sharing restarts rejected's position ids after the prompt;
    packing restarts them per pair. Sequence parallelism splits a row's tokens, never its position ids."""
    return len(pair.prompt_ids) + max(len(pair.chosen_ids), len(pair.rejected_ids))


@dataclass(frozen=True)
class PositionLimit:
    """The positions a model takes, under the name its config gives them (max_position_embeddings; n_positions for
    GPT-2). Learned position embeddings fail past it (`IndexError: index out of range in self`); rotary ones score
    positions the model never trained on, silently. So every command that runs a model over pairs refuses what
    would go past it, before any weights load."""

    model: str
    """model.path, for messages."""
    key: str
    size: int | None
    """None: the config declares no limit (ALiBi, state-space models)."""

    def check_max_length(self, max_length: int | None) -> None:
        """Refuse data.max_length past the limit, before the data is prepared."""
        if self.size is not None and max_length is not None and max_length > self.size:
            raise ConfigError(
                f"data.max_length={max_length} is more than the {self.size} positions model.path={self.model} takes "
                f"({self.key}={self.size}): {self._fix()}"
            )

    def check_prepared(self, data: TokenStore | PreparedData) -> None:
        """`check_pairs` for every prepared pair; a token store's are measured from the lengths its rows files keep,
        reading no pair (a million pairs: 80 MB of rows, not 20 s of pair reads)."""
        if isinstance(data, PreparedData):
            self.check_pairs(data.pairs)
        elif self.size is not None:
            self._refuse_over(_stored_positions(data), data.pairs)

    def check_pairs(self, pairs: Sequence[Pair]) -> None:
        """Refuse pairs that need more positions than the model takes (with data.max_length unset, the data's longest
        pair decides), naming the longest."""
        if self.size is not None:
            self._refuse_over(np.fromiter(map(positions_needed, pairs), np.int64, len(pairs)), pairs)

    def check_generation(self, prompts: list[list[int]], max_new_tokens: int, key: str) -> None:
        """Refuse sampling `key`=`max_new_tokens` tokens after the longest of `prompts` past the limit."""
        longest = max(map(len, prompts), default=0)
        if self.size is not None and longest + max_new_tokens > self.size:
            room = self.size - longest
            fix = f"lower {key} to {room} or less" if room > 0 else f"sample from prompts under {self.size} tokens"
            raise ConfigError(
                f"{key}={max_new_tokens} after the longest prompt to sample from ({longest} tokens) needs "
                f"{longest + max_new_tokens} positions, more than the {self.size} model.path={self.model} takes "
                f"({self.key}={self.size}): {fix}"
            )

    def _refuse_over(self, needed: np.ndarray, pairs: Sequence[Pair]) -> None:
        """`needed` (n,): positions_needed of each of `pairs`."""
        over = int((needed > self.size).sum())
        if over:
            longest = int(needed.argmax())
            raise ConfigError(
                f"{over} of {len(needed)} pairs need more than the {self.size} positions model.path={self.model} takes "
                f"({self.key}={self.size}); the longest, {pairs[longest].source}, needs {needed[longest]} (its prompt "
                f"and longer completion): {self._fix()}"
            )

    def _fix(self) -> str:
        return f"set data.max_length <= {self.size} (data.truncation_mode picks the end that is cut)"


def position_limit(config: ModelConfig) -> PositionLimit:
    """The model's PositionLimit, read from its config.json (no weights)."""
    text = read_text_config(config)
    key = text.attribute_map.get("max_position_embeddings", "max_position_embeddings")
    return PositionLimit(config.path, key, getattr(text, "max_position_embeddings", None))


def _stored_positions(store: TokenStore) -> np.ndarray:
    """(pairs,) positions_needed of every pair of `store`, in order, from its rows files."""
    lengths = store.pair_lengths()
    return lengths[:, 0] + lengths[:, 1:].max(axis=1)

"""Turn a row of any supported format into one `Example`: a prompt, a chosen and a rejected completion.

Formats, detected from the first row's columns (after `data.columns` renames them) unless `data.format` names one:

- strings: `prompt`, `chosen`, `rejected` strings.
- conversational: `prompt` a list of {role, content} messages, `chosen` / `rejected` lists of assistant messages.
- implicit_prompt: `chosen` / `rejected` whole transcripts sharing their start (HH-RLHF); see `split_transcripts`.
- sharegpt: `conversations` [{from, value}] plus one `chosen` / `rejected` {from, value} message (LLaMA-Factory).

Text examples are tokenized as plain text, message examples with the tokenizer's chat template.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

from dpo_scale.config import DataConfig
from dpo_scale.data.errors import DataError
from dpo_scale.data.sources import Row, read_rows

Format = Literal["strings", "conversational", "implicit_prompt", "sharegpt"]
Messages = list[dict[str, str]]

ASSISTANT_TURN = "\n\nAssistant:"
PROMPT_ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}

Sliceable = TypeVar("Sliceable", str, list)


@dataclass(frozen=True)
class Example:
    index: int
    source: str
    prompt: str | Messages
    chosen: str | Messages
    rejected: str | Messages

    @property
    def conversational(self) -> bool:
        return isinstance(self.prompt, list)

    def as_dict(self) -> dict[str, Any]:
        """The prompt / chosen / rejected columns of TRL's explicit-prompt preference format."""
        return {"prompt": self.prompt, "chosen": self.chosen, "rejected": self.rejected}


def read_examples(config: DataConfig) -> Iterator[Example]:
    """Every row of `config.path` as an Example, in input order; the format is fixed by the first row."""
    rows = read_rows(config.path, config.split)
    first = next(rows, None)
    fmt = input_format(first, config)
    yield normalise(first, fmt, config.columns)
    for row in rows:
        yield normalise(row, fmt, config.columns)


def input_format(first: Row | None, config: DataConfig) -> Format:
    """The format every row is read in: `data.format`, or detected from the input's first row (None: no rows)."""
    if first is None:
        raise DataError(f"{config.path}: the dataset has no rows. Fix: point data.path at a file with preference pairs")
    return detect_format(first, config.columns) if config.format == "auto" else config.format


def detect_format(row: Row, columns: Mapping[str, str]) -> Format:
    def present(name: str) -> bool:
        return columns.get(name, name) in row.fields

    # A column the user mapped by name must exist: its absence is a typo, not a hint at another format.
    missing = [name for name in columns if not present(name)]
    missing += [name for name in ("chosen", "rejected") if not present(name) and name not in missing]
    if missing:
        raise DataError(
            f"{row.source}: missing field {' and '.join(_label(n, columns) for n in missing)} "
            f"(the row has {', '.join(map(repr, row.fields)) or 'no fields'}). "
            "Fix: every row needs chosen and rejected (plus prompt or conversations); "
            "map differently named columns with data.columns, e.g. {chosen: good, rejected: bad}"
        )
    if present("conversations"):
        return "sharegpt"
    if not present("prompt"):
        return "implicit_prompt"
    return "conversational" if isinstance(row.fields[columns.get("prompt", "prompt")], list) else "strings"


def normalise(row: Row, fmt: Format, columns: Mapping[str, str]) -> Example:
    """The row as an explicit prompt, chosen and rejected: strings, or {role, content} message lists."""
    prompt, chosen, rejected = _NORMALISERS[fmt](_Fields(row, columns))
    return Example(row.index, row.source, prompt, chosen, rejected)


def split_transcripts(chosen: str, rejected: str) -> tuple[str, str, str] | None:
    """Split two HH-RLHF transcripts into (prompt, chosen completion, rejected completion); None if they cannot be.

    The prompt runs through the last `\\n\\nAssistant:` inside the character-level common prefix of the two, and each
    completion is the rest of its transcript (starting with the space after the colon). On ordinary rows this is
    how the original DPO code splits HH-RLHF (it cuts chosen at its own last `\\n\\nAssistant:`); where chosen
    holds extra turns that rejected lacks, cutting inside the shared part keeps the prompt common to both.
    TRL's `extract_prompt` instead cuts at the common prefix itself, which moves the answers' shared first words
    ("I", "Sure,") into the prompt, so those tokens would not count towards either completion's log-prob.
    """
    shared = chosen[: shared_prefix_length(chosen, rejected)]
    cut = shared.rfind(ASSISTANT_TURN)
    if cut < 0:
        return None
    cut += len(ASSISTANT_TURN)
    return chosen[:cut], chosen[cut:], rejected[cut:]


def shared_prefix_length(a: Sliceable, b: Sliceable) -> int:
    """`len(os.path.commonprefix([a, b]))` for two strings or two lists, comparing slices (in C) instead of items.

    commonprefix walks item by item in Python, a hot spot on long transcripts and token ids. One comparison settles
    the usual case, where the shorter is a prefix of the longer; otherwise a binary search for the first difference
    compares only the still-unsettled span, halving it each time: a few passes over the shorter input, all in C.
    """
    end = min(len(a), len(b))
    if a[:end] == b[:end]:
        return end
    low, high = 0, end  # a[:low] == b[:low] and a[:high] != b[:high]: the first difference is in [low, high)
    while high - low > 1:
        middle = (low + high) // 2
        if a[low:middle] == b[low:middle]:
            low = middle
        else:
            high = middle
    return low


class _Fields:
    """Reads one row's fields under `data.columns`, raising a DataError that names the row, field and fix."""

    def __init__(self, row: Row, columns: Mapping[str, str]) -> None:
        self.row = row
        self.columns = columns

    def error(self, name: str, problem: str, fix: str) -> DataError:
        return DataError(f"{self.row.source}, field {_label(name, self.columns)}: {problem}. Fix: {fix}")

    def get(self, name: str) -> Any:
        value = self.row.fields.get(self.columns.get(name, name))
        if value is None:
            raise self.error(
                name,
                "missing (or null)",
                "give every row this field, or map your column to it with data.columns",
            )
        return value

    def text(self, name: str) -> str:
        value = self.get(name)
        if not isinstance(value, str):
            raise self.error(name, f"expected a string, got {_describe(value)}", "store this field as text")
        if not value:
            raise self.error(name, "empty string", "fill it in or remove the row; a pair needs text in every field")
        return value

    def messages(self, name: str, roles: tuple[str, ...]) -> Messages:
        value = self.get(name)
        if not isinstance(value, list) or not value:
            raise self.error(
                name,
                f"expected a non-empty list of {{role, content}} messages, got {_describe(value)}",
                f'write it as [{{"role": "...", "content": "..."}}, ...] with role {" or ".join(roles)}',
            )
        return [self._message(name, position, message, roles) for position, message in enumerate(value)]

    def _message(self, name: str, position: int, message: Any, roles: tuple[str, ...]) -> dict[str, str]:
        if not isinstance(message, dict):
            raise self.error(name, f"message {position} is {_describe(message)}, not a {{role, content}} object",
                             'write each message as {"role": "...", "content": "..."}')
        role, content = message.get("role"), message.get("content")
        if not isinstance(role, str) or role not in roles:
            raise self.error(name, f"message {position} has role {role!r}", f"use one of {', '.join(roles)}")
        if not isinstance(content, str) or not content:
            raise self.error(name, f"message {position} has no text content (content is {_describe(content)})",
                             "give every message a non-empty string content")
        return {"role": role, "content": content}

    def sharegpt_message(
        self, name: str, position: int | None, message: Any, roles: Mapping[str, str]
    ) -> dict[str, str]:
        where = "the message " if position is None else f"message {position} "
        if not isinstance(message, dict):
            raise self.error(name, f"{where}is {_describe(message)}, not a {{from, value}} object",
                             f'write it as {{"from": "{next(iter(roles))}", "value": "..."}}')
        speaker, value = message.get("from"), message.get("value")
        if not isinstance(speaker, str) or speaker not in roles:
            raise self.error(name, f"{where}has from={speaker!r}", f"use one of {', '.join(roles)}")
        if not isinstance(value, str) or not value:
            raise self.error(name, f"{where}has no text value (value is {_describe(value)})",
                             "give every message a non-empty string value")
        return {"role": roles[speaker], "content": value}


def _strings(fields: _Fields) -> tuple[str, str, str]:
    return fields.text("prompt"), fields.text("chosen"), fields.text("rejected")


def _conversational(fields: _Fields) -> tuple[Messages, Messages, Messages]:
    return (
        fields.messages("prompt", PROMPT_ROLES),
        fields.messages("chosen", ("assistant",)),
        fields.messages("rejected", ("assistant",)),
    )


def _implicit_prompt(fields: _Fields) -> tuple[str, str, str]:
    if isinstance(fields.get("chosen"), list):
        raise fields.error(
            "chosen",
            "whole conversations without a prompt column are not supported",
            "move the turns chosen and rejected share into a prompt column (conversational format)",
        )
    chosen, rejected = fields.text("chosen"), fields.text("rejected")
    split = split_transcripts(chosen, rejected)
    if split is None:
        raise fields.error(
            "chosen",
            f"chosen and rejected share no {ASSISTANT_TURN!r} turn, so the prompt cannot be split off",
            "write both as HH-RLHF transcripts ('\\n\\nHuman: ...\\n\\nAssistant: ...') sharing the dialogue, "
            "or give an explicit prompt column",
        )
    return split


def _sharegpt(fields: _Fields) -> tuple[Messages, Messages, Messages]:
    turns = fields.get("conversations")
    if not isinstance(turns, list) or not turns:
        raise fields.error(
            "conversations",
            f"expected a non-empty list of {{from, value}} messages, got {_describe(turns)}",
            'write it as [{"from": "human", "value": "..."}]',
        )
    prompt = [fields.sharegpt_message("conversations", i, turn, SHAREGPT_ROLES) for i, turn in enumerate(turns)]
    answer_roles = {k: v for k, v in SHAREGPT_ROLES.items() if v == "assistant"}
    chosen = fields.sharegpt_message("chosen", None, fields.get("chosen"), answer_roles)
    rejected = fields.sharegpt_message("rejected", None, fields.get("rejected"), answer_roles)
    return prompt, [chosen], [rejected]


_NORMALISERS: dict[Format, Callable[[_Fields], tuple[Any, Any, Any]]] = {
    "strings": _strings,
    "conversational": _conversational,
    "implicit_prompt": _implicit_prompt,
    "sharegpt": _sharegpt,
}


def _label(name: str, columns: Mapping[str, str]) -> str:
    column = columns.get(name, name)
    return repr(column) if column == name else f"{column!r} (data.columns {name})"


def _describe(value: Any) -> str:
    if value is None:
        return "null or absent"
    shown = repr(value)
    return f"{type(value).__name__} {shown[:40] + '...' if len(shown) > 40 else shown}"

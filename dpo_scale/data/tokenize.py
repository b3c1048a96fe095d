"""Tokenize examples into prompt / chosen / rejected token ids exactly as TRL 1.16's DPOTrainer does.

TRL (`DPOTrainer._prepare_dataset`) tokenizes the prompt alone and the prompt followed by each completion, then
takes the prompt to be the tokens all three share. The completion therefore starts where the tokenized prompt and
the tokenized prompt+completion diverge, which is not always at the end of the prompt: tokens can merge across the
boundary, and some chat templates render a prompt differently alone than followed by an answer.

- plain text: `eos_token` is appended to each completion unless it already ends with it; the three texts are
  tokenized with `tokenizer(text)`, so special tokens (e.g. BOS) are added as the tokenizer adds them.
- messages: `apply_chat_template(..., tokenize=True)` renders the prompt with the generation prompt and the
  prompt followed by each completion without it.

Matching TRL token for token lets us check our trainer against TRL's on the same data.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from dpo_scale.data.errors import DataError
from dpo_scale.data.formats import Example, shared_prefix_length
from dpo_scale.data.pairs import Pair

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


def tokenize_examples(examples: Sequence[Example], tokenizer: PreTrainedTokenizerBase) -> list[Pair]:
    """Untruncated pairs for a batch of examples that are all plain text or all messages."""
    if not examples:
        return []
    if examples[0].conversational:
        sequences = [_render_messages(example, tokenizer) for example in examples]
    else:
        sequences = _encode_text(examples, tokenizer)
    return [_split(example, *ids) for example, ids in zip(examples, sequences)]


def common_prefix_length(ids: Sequence[int], other_ids: Sequence[int]) -> int:
    # As lists, so that any two sequences (a tuple and a list, say) compare element by element.
    return shared_prefix_length(list(ids), list(other_ids))


def _split(
    example: Example, prompt_ids: list[int], prompt_chosen_ids: list[int], prompt_rejected_ids: list[int]
) -> Pair:
    prompt_len = min(
        common_prefix_length(prompt_ids, prompt_chosen_ids),
        common_prefix_length(prompt_ids, prompt_rejected_ids),
    )
    return Pair(
        index=example.index,
        source=example.source,
        prompt_ids=prompt_ids[:prompt_len],
        chosen_ids=prompt_chosen_ids[prompt_len:],
        rejected_ids=prompt_rejected_ids[prompt_len:],
    )


def _encode_text(examples: Sequence[Example], tokenizer: PreTrainedTokenizerBase) -> list[tuple[list[int], ...]]:
    eos = tokenizer.eos_token
    if not eos:
        raise DataError(
            f"{examples[0].source}, field 'chosen': plain-text completions end with the tokenizer's eos_token, "
            f"but tokenizer {_name(tokenizer)} has none. "
            "Fix: point data.tokenizer at a tokenizer directory whose tokenizer_config.json names its eos_token (the "
            "model's directory usually does; a bare tokenizer.json names none), or add \"eos_token\": \"<its "
            "end-of-text token>\" to the tokenizer_config.json beside that tokenizer.json"
        )
    prompts = [example.prompt for example in examples]
    prompt_chosen = [example.prompt + _end_with(example.chosen, eos) for example in examples]
    prompt_rejected = [example.prompt + _end_with(example.rejected, eos) for example in examples]
    # One call per column: a fast tokenizer encodes a list in parallel, and gives the same ids as one text at a time.
    return list(zip(*(encode_texts(tokenizer, texts) for texts in (prompts, prompt_chosen, prompt_rejected))))


def _end_with(text: str, eos: str) -> str:
    return text if text.endswith(eos) else text + eos


def encode_texts(tokenizer: PreTrainedTokenizerBase, texts: list[str]) -> list[list[int]]:
    """`tokenizer(text=texts)["input_ids"]`, through the fast tokenizer's backend when that is the same call:
    transformers' __call__ adds only a per-text conversion into dicts on top of `encode_batch`, 19% of the CPU time
    of tokenizing HH-RLHF with GPT-2's tokenizer on one thread. A backend with truncation, padding or special-token
    splitting of its own set differently from what __call__ would apply goes through __call__."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if (
        backend is None
        or backend.truncation is not None
        or backend.padding is not None
        or backend.encode_special_tokens != getattr(tokenizer, "split_special_tokens", False)
    ):
        return tokenizer(text=texts)["input_ids"]
    return [encoding.ids for encoding in backend.encode_batch(texts, add_special_tokens=True)]


def _render_messages(example: Example, tokenizer: PreTrainedTokenizerBase) -> tuple[list[int], ...]:
    if not tokenizer.chat_template:
        raise DataError(
            f"{example.source}, field 'prompt': the row holds chat messages, but tokenizer {_name(tokenizer)} "
            "has no chat template to render them. "
            "Fix: use a tokenizer whose tokenizer_config.json has a chat_template, or give plain-text rows"
        )
    return (
        _chat_ids(tokenizer, example, example.prompt, add_generation_prompt=True),
        _chat_ids(tokenizer, example, example.prompt + example.chosen),
        _chat_ids(tokenizer, example, example.prompt + example.rejected),
    )


def _chat_ids(tokenizer: PreTrainedTokenizerBase, example: Example, messages: Any, **kwargs: Any) -> list[int]:
    try:
        return tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True, **kwargs)["input_ids"]
    except Exception as error:  # a template can raise anything (jinja errors, its own raise_exception calls)
        raise DataError(
            f"{example.source}, field 'prompt': the chat template of tokenizer {_name(tokenizer)} rejects these "
            f"messages ({type(error).__name__}: {error}). Fix: order the roles as the template expects (often "
            "system, then alternating user and assistant), or use another tokenizer"
        ) from None


def _name(tokenizer: PreTrainedTokenizerBase) -> str:
    return tokenizer.name_or_path or f"({type(tokenizer).__name__} built in memory)"

"""Tokenization rules (those of TRL 1.16, checked against TRL itself in test_data_trl_parity.py)."""

import os
import random

from dpo_scale.data.formats import Example
from dpo_scale.data.tokenize import common_prefix_length, encode_texts, tokenize_examples

EOS = 0  # the byte tokenizer's `</s>`
TAG_TEMPLATE = (
    "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)


def answer(text):
    return [{"role": "assistant", "content": text}]


def ids(tokenizer, text):
    return tokenizer(text)["input_ids"]


def test_common_prefix_length():
    assert common_prefix_length([1, 2, 3], [1, 2, 4, 5]) == 2
    assert common_prefix_length([1, 2], [1, 2, 3]) == 2
    assert common_prefix_length([], [1]) == 0
    assert common_prefix_length([9], [1]) == 0


def test_common_prefix_length_equals_commonprefix():
    """Exact equality with os.path.commonprefix on random id lists (and tuples) sharing a start of random length."""
    rng = random.Random(0)
    pairs = [([], []), ([], [1]), ([1], []), ([1, 2], [1, 2]), ([0], [1]), ((5, 6), [5, 6, 7]), ([5, 6, 7], (5, 6))]
    for _ in range(3000):
        start = rng.choices(range(4), k=rng.randint(0, 60))  # 4 ids, so the rests often agree for a while
        pairs.append(tuple(start + rng.choices(range(4), k=rng.randint(0, 15)) for _ in range(2)))
    for ids, other_ids in pairs:
        assert common_prefix_length(ids, other_ids) == len(os.path.commonprefix([list(ids), list(other_ids)]))


def test_common_prefix_length_finds_a_difference_at_every_position():
    """One changed id at each position of 513 ids (50257: GPT-2's vocabulary): every branch of the search is taken."""
    ids = random.Random(1).choices(range(50257), k=513)
    for position in range(len(ids)):
        changed = ids[:position] + [-1] + ids[position + 1 :]
        assert common_prefix_length(ids, changed) == position
        assert common_prefix_length(changed[: position + 1], ids) == position


def test_plain_text_appends_eos_once(byte_tokenizer):
    examples = [Example(0, "row 0", "Sky:", " blue", " green</s>")]
    (pair,) = tokenize_examples(examples, byte_tokenizer)
    assert pair.prompt_ids == ids(byte_tokenizer, "Sky:")
    assert pair.chosen_ids == ids(byte_tokenizer, " blue") + [EOS]
    assert pair.rejected_ids == ids(byte_tokenizer, " green") + [EOS]  # already ended with eos: not doubled
    assert (pair.index, pair.source) == (0, "row 0")


def test_plain_text_keeps_the_tokenizers_bos_in_the_prompt_only(stories_tokenizer):
    example = Example(4, "row 4", "Once upon a time", " there was a cat.", " a dog.")
    (pair,) = tokenize_examples([example], stories_tokenizer)
    assert pair.prompt_ids[0] == stories_tokenizer.bos_token_id
    assert stories_tokenizer.bos_token_id not in pair.chosen_ids + pair.rejected_ids
    assert pair.chosen_ids[-1] == pair.rejected_ids[-1] == stories_tokenizer.eos_token_id
    assert stories_tokenizer.decode(pair.prompt_ids + pair.chosen_ids) == "<s> Once upon a time there was a cat.</s>"


def test_batches_give_the_same_ids_as_one_example_at_a_time(stories_tokenizer):
    examples = [Example(i, f"row {i}", f"Tom had {i} apples", f" and ate {i}.", " and cried.") for i in range(5)]
    batched = tokenize_examples(examples, stories_tokenizer)
    single = [tokenize_examples([example], stories_tokenizer)[0] for example in examples]
    assert batched == single


def test_messages_use_the_chat_template(byte_tokenizer_with_template):
    tokenizer = byte_tokenizer_with_template(TAG_TEMPLATE)
    prompt = [{"role": "user", "content": "Hi"}]
    example = Example(0, "row 0", prompt, answer("Hello"), answer("Go"))
    (pair,) = tokenize_examples([example], tokenizer)
    assert pair.prompt_ids == ids(tokenizer, "<user>Hi<assistant>")
    assert (pair.chosen_ids, pair.rejected_ids) == (ids(tokenizer, "Hello"), ids(tokenizer, "Go"))


def test_a_prompt_rendered_differently_alone_ends_where_the_renderings_diverge(byte_tokenizer_with_template):
    """The generation prompt here ends in a newline the full conversation lacks: that newline is left out."""
    tokenizer = byte_tokenizer_with_template(TAG_TEMPLATE.replace("<assistant>{% endif %}", "<assistant>\n{% endif %}"))
    prompt = [{"role": "user", "content": "Hi"}]
    example = Example(0, "row 0", prompt, answer("Yes"), answer("No"))
    (pair,) = tokenize_examples([example], tokenizer)
    assert pair.prompt_ids == ids(tokenizer, "<user>Hi<assistant>")
    assert (pair.chosen_ids, pair.rejected_ids) == (ids(tokenizer, "Yes"), ids(tokenizer, "No"))


def test_phi3_chat_template(phi3_tokenizer):
    prompt = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Sky colour?"}]
    example = Example(0, "row 0", prompt, answer("Blue."), answer("Red."))
    (pair,) = tokenize_examples([example], phi3_tokenizer)
    token = phi3_tokenizer.convert_tokens_to_ids
    assert pair.prompt_ids[0] == token("<|system|>")
    assert pair.prompt_ids[-1] == token("<|assistant|>")
    # each completion ends with the turn's <|end|> and the eos the template adds after the last turn
    assert pair.chosen_ids[-2:] == pair.rejected_ids[-2:] == [token("<|end|>"), token("<|endoftext|>")]
    assert phi3_tokenizer.decode(pair.chosen_ids[:-2]).strip() == "Blue."


def test_encoding_through_the_backend_equals_the_tokenizers_call(shared_data, stories_tokenizer, phi3_tokenizer):
    """The backend shortcut gives `tokenizer(text=...)`'s ids: BOS-adding (stories260K), byte-level BPE (GPT-2),
    special tokens written in the text (Phi-3); and a backend with its own truncation takes the call's path."""
    from dpo_scale.data import load_tokenizer

    gpt2 = load_tokenizer(str(shared_data / "tokenizers" / "gpt2" / "tokenizer.json"))
    texts = ["Hello world", " leading space", "<|user|>\nhi<|end|>\n<|assistant|>", "é 中 😀", "<|endoftext|>x", ""]
    for tokenizer in (stories_tokenizer, phi3_tokenizer, gpt2):
        assert encode_texts(tokenizer, texts) == tokenizer(text=texts)["input_ids"]
    truncating = load_tokenizer(str(shared_data / "tokenizers" / "gpt2" / "tokenizer.json"))
    truncating.backend_tokenizer.enable_truncation(max_length=2)
    assert encode_texts(truncating, ["one two three four"]) == gpt2(text=["one two three four"])["input_ids"]

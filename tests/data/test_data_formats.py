"""Each format is detected from its columns and normalised to an explicit prompt, chosen and rejected."""

import json
import os
import random

import pytest

from dpo_scale.config import DataConfig
from dpo_scale.data import DataError, read_examples, split_transcripts
from dpo_scale.data.formats import ASSISTANT_TURN, detect_format, shared_prefix_length
from dpo_scale.data.sources import Row

USER = [{"role": "user", "content": "What color is the sky?"}]
BLUE = [{"role": "assistant", "content": "It is blue."}]
GREEN = [{"role": "assistant", "content": "It is green."}]


def examples_of(tmp_path, rows, **config):
    path = tmp_path / "rows.json"
    path.write_text(json.dumps(rows), encoding="utf-8")
    return list(read_examples(DataConfig(path=str(path), **config)))


@pytest.mark.parametrize(
    "fields, expected",
    [
        ({"prompt": "a", "chosen": "b", "rejected": "c"}, "strings"),
        ({"prompt": USER, "chosen": BLUE, "rejected": GREEN}, "conversational"),
        ({"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "\n\nHuman: a\n\nAssistant: c"}, "implicit_prompt"),
        ({"conversations": [{"from": "human", "value": "a"}], "chosen": {}, "rejected": {}}, "sharegpt"),
    ],
)
def test_detect_format(fields, expected):
    assert detect_format(Row(0, "row 0", fields), {}) == expected


def test_strings(tmp_path):
    (example,) = examples_of(tmp_path, [{"prompt": "The sky is", "chosen": " blue.", "rejected": " green.", "id": 7}])
    assert example.as_dict() == {"prompt": "The sky is", "chosen": " blue.", "rejected": " green."}
    assert not example.conversational


def test_conversational_keeps_role_and_content_only(tmp_path):
    prompt = [{"role": "system", "content": "Be brief."}, {**USER[0], "name": None}]
    (example,) = examples_of(tmp_path, [{"prompt": prompt, "chosen": BLUE, "rejected": GREEN}])
    assert example.prompt == [{"role": "system", "content": "Be brief."}, USER[0]]
    assert (example.chosen, example.rejected) == (BLUE, GREEN)
    assert example.conversational


def test_columns_mapping(tmp_path):
    rows = [{"question": "The sky is", "good": " blue.", "bad": " green."}]
    (example,) = examples_of(tmp_path, rows, columns={"prompt": "question", "chosen": "good", "rejected": "bad"})
    assert example.as_dict() == {"prompt": "The sky is", "chosen": " blue.", "rejected": " green."}


def test_columns_mapping_for_sharegpt(tmp_path):
    rows = [{"turns": [{"from": "human", "value": "Hi"}], "chosen": {"from": "gpt", "value": "Hello!"},
             "rejected": {"from": "gpt", "value": "Go away."}}]
    (example,) = examples_of(tmp_path, rows, columns={"conversations": "turns"})
    assert example.prompt == [{"role": "user", "content": "Hi"}]


def test_format_override_is_enforced_on_every_row(tmp_path):
    rows = [{"prompt": "a", "chosen": "b", "rejected": "c"}]
    with pytest.raises(DataError, match="field 'prompt': expected a non-empty list of {role, content} messages"):
        examples_of(tmp_path, rows, format="conversational")


def test_implicit_prompt_split_keeps_the_answers_shared_first_words_in_the_completions():
    """The prompt ends at the last shared `\\n\\nAssistant:`; TRL's character-level cut would end at "I think"."""
    chosen = "\n\nHuman: Is it late?\n\nAssistant: I think so.\n\nHuman: Sure?\n\nAssistant: I think yes."
    rejected = "\n\nHuman: Is it late?\n\nAssistant: I think so.\n\nHuman: Sure?\n\nAssistant: I think no."
    prompt, chosen_rest, rejected_rest = split_transcripts(chosen, rejected)
    assert prompt == "\n\nHuman: Is it late?\n\nAssistant: I think so.\n\nHuman: Sure?\n\nAssistant:"
    assert (chosen_rest, rejected_rest) == (" I think yes.", " I think no.")


def test_implicit_prompt_with_an_extra_chosen_turn_keeps_the_prompt_shared():
    """helpful-base line 1167: chosen has a second Assistant turn that rejected lacks. The original DPO code cuts
    chosen at its own last `\\n\\nAssistant:`, a prompt rejected does not start with; we cut inside the shared part."""
    chosen = "\n\nHuman: Price?\n\nAssistant: Umm. Just a second...\n\nAssistant: About $50."
    rejected = "\n\nHuman: Price?\n\nAssistant: Visit their web site."
    prompt, chosen_rest, rejected_rest = split_transcripts(chosen, rejected)
    assert prompt == "\n\nHuman: Price?\n\nAssistant:"
    assert chosen_rest == " Umm. Just a second...\n\nAssistant: About $50."
    assert rejected_rest == " Visit their web site."


def _split_transcripts_by_commonprefix(chosen, rejected):
    """split_transcripts as first written, on os.path.commonprefix's item-by-item common prefix."""
    shared = os.path.commonprefix([chosen, rejected])
    cut = shared.rfind(ASSISTANT_TURN)
    if cut < 0:
        return None
    cut += len(ASSISTANT_TURN)
    return chosen[:cut], chosen[cut:], rejected[cut:]


def _strings_sharing_a_start(rng, pieces, count):
    """Pairs of random strings that share a start of random length; few pieces, so their rests often agree a while."""
    for _ in range(count):
        start = "".join(rng.choices(pieces, k=rng.randint(0, 40)))
        yield tuple(start + "".join(rng.choices(pieces, k=rng.randint(0, 12))) for _ in range(2))


# ASCII, Latin-1, BMP and astral characters: Python stores strings of each at a different width per character.
PIECES = ["a", "b", " ", "é", "中", "😀", "\n\nHuman:", ASSISTANT_TURN, " I"]
EDGE_CASES = [("", ""), ("", "abc"), ("abc", ""), ("abc", "abc"), ("ab", "abc"), ("abc", "ab"), ("x", "y"), ("é", "e")]


def test_shared_prefix_length_equals_commonprefix():
    """Exact equality with os.path.commonprefix on random strings and lists, including empty and prefix cases."""
    rng = random.Random(0)
    pairs = EDGE_CASES + list(_strings_sharing_a_start(rng, PIECES, 3000))
    pairs += [(list(a), list(b)) for a, b in pairs]
    for a, b in pairs:
        assert shared_prefix_length(a, b) == len(os.path.commonprefix([a, b])), (a, b)


def test_shared_prefix_length_finds_a_difference_at_every_position():
    """One changed character at each position of a long string: every branch of the binary search is taken."""
    text = "".join(random.Random(1).choices(PIECES, k=300))
    for position in range(len(text)):
        changed = text[:position] + "\0" + text[position + 1 :]
        assert shared_prefix_length(text, changed) == position
        assert shared_prefix_length(changed[: position + 1], text) == position


def test_split_transcripts_equals_the_commonprefix_split():
    rng = random.Random(2)
    pairs = EDGE_CASES + list(_strings_sharing_a_start(rng, PIECES, 3000))
    assert sum(_split_transcripts_by_commonprefix(a, b) is not None for a, b in pairs) > 1000  # both outcomes tested
    for chosen, rejected in pairs:
        assert split_transcripts(chosen, rejected) == _split_transcripts_by_commonprefix(chosen, rejected)


def test_hh_rlhf_helpful_base(shared_data):
    path = shared_data / "preferences" / "hh-rlhf" / "helpful-base" / "test.jsonl.gz"
    examples = list(read_examples(DataConfig(path=str(path))))
    assert len(examples) == 2354
    first = examples[0]
    assert first.source == f"{path} line 1"
    assert first.prompt == "\n\nHuman: Do you know why turkeys became the official food of thanksgiving?\n\nAssistant:"
    assert first.chosen.startswith(" To be honest, I don’t know anything about that.")
    assert first.rejected.startswith(" I know that the American Indians were the first")
    identical = [e.index for e in examples if e.chosen == e.rejected]
    assert identical == [721, 2168]  # the file's two rows with chosen == rejected


def test_llama_factory_sharegpt(shared_data):
    path = shared_data / "preferences" / "llama-factory" / "dpo_en_demo.json"
    examples = list(read_examples(DataConfig(path=str(path))))
    assert len(examples) == 300
    raw = json.loads(path.read_text(encoding="utf-8"))
    with_system = next(i for i, row in enumerate(raw) if row["conversations"][0]["from"] == "system")
    example = examples[with_system]
    assert example.source == f"{path} row {with_system}"
    roles = {"system": "system", "human": "user", "gpt": "assistant"}
    assert example.prompt == [
        {"role": roles[turn["from"]], "content": turn["value"]} for turn in raw[with_system]["conversations"]
    ]
    assert example.chosen == [{"role": "assistant", "content": raw[with_system]["chosen"]["value"]}]
    assert example.rejected == [{"role": "assistant", "content": raw[with_system]["rejected"]["value"]}]


def test_messages_read_back_from_parquet_and_save_to_disk(tmp_path):
    """Arrow stores messages as structs, filling keys a message lacks with null; normalising drops them."""
    import datasets
    import pyarrow
    import pyarrow.parquet

    rows = [
        {"prompt": [{"role": "system", "content": "Be brief."}, *USER], "chosen": BLUE, "rejected": GREEN},
        {"prompt": [{"role": "user", "content": "Hi", "name": "ann"}], "chosen": BLUE, "rejected": GREEN},
    ]
    pyarrow.parquet.write_table(pyarrow.Table.from_pylist(rows), tmp_path / "m.parquet")
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "m_dataset"))
    expected = examples_of(tmp_path, rows)
    for path in (tmp_path / "m.parquet", tmp_path / "m_dataset"):
        got = list(read_examples(DataConfig(path=str(path))))
        assert [e.as_dict() for e in got] == [e.as_dict() for e in expected]

"""A corpus of bad inputs: each gives one DataError naming the file, the line or row, the field, and a fix.

No raw KeyError, UnicodeDecodeError or JSONDecodeError escapes, and none is chained into the traceback either.
"""

import json
import shutil
from dataclasses import dataclass, field

import pytest

from dpo_scale.config import DataConfig
from dpo_scale.data import DataError, load_tokenizer, prepare, run_tokenizer

OK = {"prompt": "Q:", "chosen": " a", "rejected": " b"}
SAME = {**OK, "rejected": OK["chosen"]}
USER = [{"role": "user", "content": "Hi"}]
ANSWER = [{"role": "assistant", "content": "Hello"}]
CHAT = {"prompt": USER, "chosen": ANSWER, "rejected": ANSWER}
GPT = {"from": "gpt", "value": "Hello"}
SHAREGPT = {"conversations": [{"from": "human", "value": "Hi"}], "chosen": GPT, "rejected": GPT}


def jsonl(*rows) -> bytes:
    return "".join(json.dumps(row) + "\n" for row in rows).encode()


def json_list(*rows) -> bytes:
    return json.dumps(list(rows)).encode()


@dataclass
class Case:
    id: str
    file: str
    content: bytes | None
    """The file's bytes; None: the file does not exist."""
    expected: tuple[str, ...]
    """Fragments of the message besides the file name and `Fix:`: the line or row, the field, the problem."""
    config: dict = field(default_factory=dict)
    tokenizer: str = "bytes"


CASES = [
    # the file itself
    Case("missing_file", "nope.jsonl", None, ("no such file",)),
    Case("unknown_extension", "rows.csv", b"prompt,chosen,rejected\n", ("unknown file type", ".jsonl")),
    Case("empty_file", "empty.jsonl", b"", ("no rows",)),
    Case("blank_lines_only", "blank.jsonl", b"\n\n  \n", ("no rows",)),
    Case("empty_json_list", "empty.json", b"[]", ("no rows",)),
    Case("not_gzip", "plain.jsonl.gz", jsonl(OK), ("not a readable gzip file",)),
    Case("not_parquet", "text.parquet", b"hello", ("not a readable Parquet file",)),
    # JSON syntax and encoding
    Case("malformed_json_line", "bad.jsonl", jsonl(OK) + b'{"prompt": "Q:", "chosen": \n',
         ("line 2", "malformed JSON")),
    Case("jsonl_line_not_object", "list.jsonl", b"[1, 2]\n", ("line 1", "expected a JSON object")),
    Case("malformed_json_file", "bad.json", b'[{"prompt": "Q:",\n "chosen": }]', ("line 2", "malformed JSON")),
    Case("json_not_a_list", "one.json", json.dumps(OK).encode(), ("expected a JSON list", ".jsonl")),
    Case("json_row_not_object", "rows.json", json_list(OK, "text"), ("row 1", "expected a JSON object")),
    Case("invalid_utf8_jsonl", "latin1.jsonl", jsonl(OK, OK) + '{"prompt": "Café"}\n'.encode("latin-1"),
         ("line 3", "invalid UTF-8", "0xe9")),
    Case("invalid_utf8_json", "latin1.json", '[\n{"prompt": "Café"}\n]'.encode("latin-1"),
         ("line 2", "invalid UTF-8")),
    # fields
    Case("missing_field_first_row", "m.jsonl", jsonl({"prompt": "Q:", "chosen": " a"}),
         ("line 1", "'rejected'", "missing")),
    Case("missing_field_later_row", "m.jsonl", jsonl(OK, {"prompt": "Q:", "chosen": " a"}),
         ("line 2", "'rejected'", "missing")),
    Case("null_field", "n.jsonl", jsonl(OK, {**OK, "chosen": None}), ("line 2", "'chosen'", "null")),
    Case("number_for_text", "t.jsonl", jsonl({**OK, "chosen": 3}),
         ("line 1", "'chosen'", "expected a string, got int 3")),
    Case("empty_string", "e.json", json_list(OK, {**OK, "prompt": ""}), ("row 1", "'prompt'", "empty string")),
    Case("mapped_column_absent", "c.jsonl", jsonl(OK), ("line 1", "'question' (data.columns prompt)", "missing"),
         config={"columns": {"prompt": "question"}}),
    Case("wrong_type_for_forced_format", "f.jsonl", jsonl(OK), ("line 1", "'chosen'", "list of {role, content}"),
         config={"format": "conversational", "columns": {"prompt": "chosen"}}),
    # messages
    Case("bad_role", "r.jsonl", jsonl({**CHAT, "prompt": [{"role": "robot", "content": "Hi"}]}),
         ("line 1", "'prompt'", "message 0 has role 'robot'", "system, user, assistant")),
    Case("missing_content", "c.jsonl", jsonl({**CHAT, "chosen": [{"role": "assistant"}]}),
         ("line 1", "'chosen'", "no text content")),
    Case("user_message_as_answer", "u.jsonl", jsonl({**CHAT, "rejected": USER}),
         ("line 1", "'rejected'", "role 'user'")),
    Case("text_answer_to_messages", "s.jsonl", jsonl({**CHAT, "chosen": "Hello"}),
         ("line 1", "'chosen'", "expected a non-empty list")),
    Case("message_not_an_object", "o.jsonl", jsonl({**CHAT, "prompt": ["Hi"]}),
         ("line 1", "'prompt'", "message 0 is str")),
    # implicit prompts and ShareGPT
    Case("implicit_without_assistant_turn", "hh.jsonl", jsonl({"chosen": "Hello there", "rejected": "Hello you"}),
         ("line 1", "'chosen'", "'\\n\\nAssistant:'")),
    Case("sharegpt_bad_from", "sg.json", json_list({**SHAREGPT, "conversations": [{"from": "bot", "value": "Hi"}]}),
         ("row 0", "'conversations'", "from='bot'")),
    Case("sharegpt_from_not_text", "sg.json", json_list({**SHAREGPT, "chosen": {"from": ["gpt"], "value": "Hi"}}),
         ("row 0", "'chosen'", "from=['gpt']")),
    Case("sharegpt_human_answer", "sg.json", json_list({**SHAREGPT, "rejected": {"from": "human", "value": "Hi"}}),
         ("row 0", "'rejected'", "from='human'")),
    Case("sharegpt_answer_list", "sg.json", json_list({**SHAREGPT, "chosen": [GPT]}), ("row 0", "'chosen'", "is list")),
    # the tokenizer against the data
    Case("no_chat_template", "m.jsonl", jsonl(CHAT), ("line 1", "'prompt'", "no chat template")),
    Case("template_rejects_messages", "m.jsonl", jsonl(CHAT), ("line 1", "'prompt'", "roles must alternate"),
         tokenizer="raising_template"),
    Case("no_eos_for_text", "t.jsonl", jsonl(OK), ("line 1", "'chosen'", "eos_token"), tokenizer="no_eos"),
    # pairs without signal
    Case("every_pair_dropped", "same.jsonl", jsonl(SAME), ("no pair is left", "identical_completions: 1")),
    Case("strict_identical", "same.jsonl", jsonl(OK, SAME),
         ("line 2", "'chosen' and 'rejected'", "identical_completions", "data.strict=false"), config={"strict": True}),
    Case("strict_empty_completion", "long.jsonl", jsonl({**OK, "prompt": "A long prompt"}),
         ("line 1", "empty_completion", "data.max_length=4"), config={"strict": True, "max_length": 4}),
]


def tokenizer_for(kind, make_tokenizer):
    if kind == "raising_template":
        return make_tokenizer("{{ raise_exception('roles must alternate') }}")
    tokenizer = make_tokenizer()
    if kind == "no_eos":
        tokenizer.eos_token = None
    return tokenizer


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_bad_input(case, tmp_path, byte_tokenizer_with_template):
    path = tmp_path / case.file
    if case.content is not None:
        path.write_bytes(case.content)
    tokenizer = tokenizer_for(case.tokenizer, byte_tokenizer_with_template)
    with pytest.raises(DataError) as raised:
        prepare(DataConfig(path=str(path), **case.config), tokenizer)
    message = str(raised.value)
    for fragment in (case.file, *case.expected, "Fix:"):
        assert fragment in message, f"{fragment!r} not in: {message}"
    assert raised.value.__cause__ is None
    assert raised.value.__suppress_context__ or raised.value.__context__ is None


def test_broken_tokenizer_names_the_bad_line(shared_data):
    broken = shared_data / "tokenizers" / "broken-llama2"
    for path in (broken, broken / "tokenizer.json"):
        with pytest.raises(DataError) as raised:
            load_tokenizer(str(path))
        message = str(raised.value)
        assert str(path) in message and "Merges text file invalid at line 18918" in message and "Fix:" in message


def test_missing_tokenizer(tmp_path):
    with pytest.raises(DataError, match=r"tokenizer .*nowhere: no such file or directory \(not a hub id either\)\. "
                                        r"Fix: give a tokenizer"):  # fmt: skip
        load_tokenizer(str(tmp_path / "nowhere"))


def test_missing_model_path_is_named_as_the_tokenizer_source(tmp_path, byte_tokenizer):
    """Without data.tokenizer the tokenizer is read from model.path: a missing model directory is named by that key;
    data.tokenizer is named only when it is what was set."""
    missing = str(tmp_path / "no-model")
    with pytest.raises(DataError, match=r"^model\.path=.*no-model: no such file or directory .*Fix: point model\.path"):
        run_tokenizer(DataConfig(path="d.jsonl"), missing)
    with pytest.raises(DataError, match=r"^data\.tokenizer=.*no-tokenizer: no such file"):
        run_tokenizer(DataConfig(path="d.jsonl", tokenizer=str(tmp_path / "no-tokenizer")), missing)
    byte_tokenizer.save_pretrained(tmp_path / "tok")
    assert run_tokenizer(DataConfig(path="d.jsonl", tokenizer=str(tmp_path / "tok")), missing).eos_token == "</s>"


def test_bare_gpt2_tokenizer_json_has_no_eos_for_plain_text(shared_data, tmp_path):
    """GPT-2's tokenizer.json alone does not say which token ends a text, so plain-text pairs cannot end in eos."""
    tokenizer = load_tokenizer(str(shared_data / "tokenizers" / "gpt2" / "tokenizer.json"))
    path = tmp_path / "pairs.jsonl"
    path.write_bytes(jsonl(OK))
    with pytest.raises(DataError, match=r"pairs.jsonl line 1, field 'chosen': .* has none\. Fix: point data\.tok"):
        prepare(DataConfig(path=str(path)), tokenizer)


def test_the_no_eos_fix_works(shared_data, tmp_path):
    """The message's second fix, followed: tokenizer_config.json naming eos_token beside the bare tokenizer.json."""
    directory = tmp_path / "gpt2"
    directory.mkdir()
    shutil.copy(shared_data / "tokenizers" / "gpt2" / "tokenizer.json", directory / "tokenizer.json")
    (directory / "tokenizer_config.json").write_text('{"eos_token": "<|endoftext|>"}')
    path = tmp_path / "pairs.jsonl"
    path.write_bytes(jsonl(OK))
    pair = prepare(DataConfig(path=str(path)), load_tokenizer(str(directory))).pairs[0]
    assert pair.chosen_ids[-1] == pair.rejected_ids[-1] == 50256  # GPT-2's <|endoftext|>

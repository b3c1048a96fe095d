"""The data path end to end on real files: pairs kept, pairs dropped and counted, strict mode, speed."""

import json
import logging
import os
import subprocess

import pytest

from dpo_scale.config import DataConfig
from dpo_scale.data import DataError, load_tokenizer, prepare
from launch import DPO_SCALE

HH_IDENTICAL_ROWS = [721, 2168]  # helpful-base rows whose chosen == rejected


@pytest.mark.slow
def test_hh_rlhf_helpful_base_with_gpt2(shared_data, caplog):
    """The whole test split; its two rows with chosen == rejected are dropped and counted (its speed is measured in
    bench/bench_data_scale.py, not asserted here)."""
    tokenizer = load_tokenizer(str(shared_data / "tokenizers" / "gpt2" / "tokenizer.json"))
    tokenizer.eos_token = "<|endoftext|>"  # a bare tokenizer.json does not say which token ends a text
    path = shared_data / "preferences" / "hh-rlhf" / "helpful-base" / "test.jsonl.gz"
    with caplog.at_level(logging.INFO, logger="dpo_scale.data"):
        data = prepare(DataConfig(path=str(path)), tokenizer)

    assert len(data.pairs) == 2352
    assert data.drop_counts() == {"identical_completions": 2}
    assert [(d.index, d.source) for d in data.dropped] == [(i, f"{path} line {i + 1}") for i in HH_IDENTICAL_ROWS]
    assert "2354 rows: 2352 pairs kept, 2 dropped (identical_completions: 2)" in caplog.text

    first = data.pairs[0]
    assert (first.index, first.source) == (0, f"{path} line 1")
    assert tokenizer.decode(first.prompt_ids).endswith("thanksgiving?\n\nAssistant:")
    assert tokenizer.decode(first.chosen_ids).startswith(" To be honest, I don’t know anything about that.")
    assert first.chosen_ids[-1] == first.rejected_ids[-1] == tokenizer.eos_token_id


@pytest.mark.slow
def test_hh_rlhf_with_stories260k_and_its_512_positions(shared_data, stories_tokenizer):
    """Long dialogues cut to 128 tokens: keep_start empties completions of long prompts, keep_end keeps them all."""
    path = shared_data / "preferences" / "hh-rlhf" / "helpful-base" / "test.jsonl.gz"
    keep_start = prepare(DataConfig(path=str(path), max_length=128), stories_tokenizer)
    keep_end = prepare(DataConfig(path=str(path), max_length=128, truncation_mode="keep_end"), stories_tokenizer)
    assert keep_start.drop_counts()["empty_completion"] > 100
    assert "empty_completion" not in keep_end.drop_counts()
    for data in (keep_start, keep_end):
        assert all(len(p.prompt_ids) + max(len(p.chosen_ids), len(p.rejected_ids)) <= 128 for p in data.pairs)
        assert len(data.pairs) + len(data.dropped) == 2354


@pytest.mark.slow
def test_llama_factory_sharegpt_with_phi3(shared_data, phi3_tokenizer):
    path = shared_data / "preferences" / "llama-factory" / "dpo_en_demo.json"
    data = prepare(DataConfig(path=str(path)), phi3_tokenizer)
    assert len(data.pairs) == 300 and not data.dropped
    assistant = phi3_tokenizer.convert_tokens_to_ids("<|assistant|>")
    assert all(pair.prompt_ids[-1] == assistant for pair in data.pairs)
    raw = json.loads(path.read_text(encoding="utf-8"))
    chosen_text = phi3_tokenizer.decode(data.pairs[5].chosen_ids, skip_special_tokens=True)
    assert chosen_text.strip() == raw[5]["chosen"]["value"].strip()


def test_conversational_with_phi3(tmp_path, phi3_tokenizer):
    rows = [
        {
            "prompt": [{"role": "user", "content": f"What is {i} + {i}?"}],
            "chosen": [{"role": "assistant", "content": f"{2 * i}."}],
            "rejected": [{"role": "assistant", "content": f"{2 * i + 1}."}],
        }
        for i in range(3)
    ]
    path = tmp_path / "messages.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    data = prepare(DataConfig(path=str(path)), phi3_tokenizer)
    assert [p.index for p in data.pairs] == [0, 1, 2]
    assert phi3_tokenizer.decode(data.pairs[2].prompt_ids) == "<|user|>What is 2 + 2?<|end|><|assistant|>"


def test_every_source_type_gives_the_same_pairs(tmp_path, byte_tokenizer):
    import datasets
    import pyarrow
    import pyarrow.parquet

    rows = [{"prompt": f"Q{i}:", "chosen": f" yes {i}", "rejected": f" no {i}"} for i in range(4)]
    (tmp_path / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    (tmp_path / "a.json").write_text(json.dumps(rows), encoding="utf-8")
    pyarrow.parquet.write_table(pyarrow.Table.from_pylist(rows), tmp_path / "a.parquet")
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "a_dataset"))
    results = [
        prepare(DataConfig(path=str(tmp_path / name)), byte_tokenizer).pairs
        for name in ("a.jsonl", "a.json", "a.parquet", "a_dataset")
    ]
    ids = [[(p.index, p.prompt_ids, p.chosen_ids, p.rejected_ids) for p in pairs] for pairs in results]
    assert ids[0] == ids[1] == ids[2] == ids[3]
    assert len(ids[0]) == 4


def test_strict_raises_on_the_first_pair_without_signal(tmp_path, byte_tokenizer):
    rows = [{"prompt": "Q:", "chosen": " a", "rejected": " b"}, {"prompt": "Q:", "chosen": " =", "rejected": " ="}]
    path = tmp_path / "pairs.json"
    path.write_text(json.dumps(rows), encoding="utf-8")
    assert prepare(DataConfig(path=str(path)), byte_tokenizer).drop_counts() == {"identical_completions": 1}
    with pytest.raises(DataError, match=r"pairs.json row 1, fields 'chosen' and 'rejected': identical_completions"):
        prepare(DataConfig(path=str(path), strict=True), byte_tokenizer)


@pytest.mark.slow  # dpo-scale processes: about 3 s each
@pytest.mark.parametrize(
    ("setting", "key"),
    [("data.filters.eval_path=nope.jsonl", "data.filters.eval_path"), ("data.path=nope.jsonl", "data.path")],
)
def test_prepare_data_refuses_a_missing_input_file_before_making_a_store(tmp_path, byte_tokenizer, setting, key):
    """At the shell: exit 2 with the setting that names the file, before any tokenizing, and nothing under the
    cache root that `prepare-data --list` would show as an unfinished store forever."""
    data = tmp_path / "pairs.jsonl"
    data.write_text('{"prompt": "Q:", "chosen": " a", "rejected": " b"}\n')
    byte_tokenizer.save_pretrained(tmp_path / "tokenizer")
    settings = [f"model.path={tmp_path / 'no-model'}", f"data.tokenizer={tmp_path / 'tokenizer'}", f"data.path={data}",
                "data.filters.drop_contaminated=true", f"data.filters.eval_path={data}", f"run_dir={tmp_path}", setting]
    environment = {**os.environ, "DPO_SCALE_CACHE": str(tmp_path / "cache")}

    def prepare_data(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([DPO_SCALE, "prepare-data", *args], cwd=tmp_path, capture_output=True, text=True,
                              env=environment, timeout=300)  # fmt: skip

    result = prepare_data(*settings)
    assert result.returncode == 2, result.stdout + result.stderr
    assert f"error: {key}=nope.jsonl: no such file or directory. Fix: check {key} " in result.stderr
    assert "tokenizing" not in result.stdout + result.stderr
    assert "0 token store(s)" in prepare_data("--list").stdout

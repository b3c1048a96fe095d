"""`dpo-scale data-report` on a store with planted problems: every number equals the same count made another way
(plain Python over the in-memory pairs); a cache with known margins comes back in the store's order; HH-RLHF."""

import json
import subprocess
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from dpo_scale.cli import main
from dpo_scale.config import DataConfig, ModelConfig
from dpo_scale.data import load_prepared, prepare
from dpo_scale.reference.cache import FIELDS, fingerprint, write_manifest, write_shard
from launch import DPO_SCALE

PARAGRAPH = "the committee met on a rainy tuesday to weigh the harbour plan"
ROWS = 120
MAX_LENGTH = 160


def _rows() -> list[dict]:
    rows = [{"prompt": f"question {i} about cats", "chosen": f"yes {i}", "rejected": f"no! {i}"} for i in range(ROWS)]
    for row in (20, 30, 31):
        rows[row] = dict(rows[10])  # three copies of row 10
    rows[40] = {**rows[5], "chosen": rows[5]["rejected"], "rejected": rows[5]["chosen"]}
    rows[41] = {**rows[6], "chosen": rows[6]["rejected"], "rejected": rows[6]["chosen"]}
    rows[42] = {**rows[7], "chosen": "another answer"}  # the same prompt, another pair: no contradiction
    for row in range(80, 100):  # length-biased: chosen much longer
        rows[row]["chosen"] = f"a long and careful answer {row}"
    rows[60]["prompt"] = f"Read this. {PARAGRAPH} What was decided there?"
    rows[61]["prompt"] = "x" * 200  # truncated: keep_end cuts its start
    return rows


EVAL = [
    {"prompt": "question 70 about cats", "chosen": "x", "rejected": "y"},
    {"prompt": PARAGRAPH, "chosen": "x", "rejected": "y"},
    {"prompt": "a question nobody asked in training at all", "chosen": "x", "rejected": "y"},
]


@pytest.fixture
def run(tmp_path, byte_tokenizer):
    data, evaluation = tmp_path / "pairs.jsonl", tmp_path / "eval.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in _rows()))
    evaluation.write_text("".join(json.dumps(row) + "\n" for row in EVAL))
    tokenizer_dir = tmp_path / "tokenizer"
    byte_tokenizer.save_pretrained(tokenizer_dir)
    settings = {"path": str(data), "tokenizer": str(tokenizer_dir), "max_length": MAX_LENGTH, "shard_rows": 32,
                "num_workers": 1, "truncation_mode": "keep_end", "cache_dir": str(tmp_path / "store")}  # fmt: skip
    config = tmp_path / "run.yaml"
    model = tmp_path / "no-model"
    config.write_text(yaml.safe_dump({"model": {"path": str(model)}, "data": settings, "run_dir": str(tmp_path / "r")}))
    return config, evaluation, DataConfig(**{k: v for k, v in settings.items()}), model


def _report(config, out, *args) -> dict:
    assert main(["data-report", "--config", str(config), "--out", str(out), *args]) == 0
    return json.loads((out / "report.json").read_text())


def test_the_report_counts_what_was_planted(run, tmp_path, byte_tokenizer):
    config, evaluation, data, _ = run
    report = _report(config, tmp_path / "report", "--eval", str(evaluation))
    pairs = prepare(data, byte_tokenizer).pairs
    whole = prepare(DataConfig(data.path), byte_tokenizer).pairs  # untruncated
    assert report["data"]["rows"] == ROWS and report["data"]["pairs"] == len(pairs) == ROWS

    lengths = {side: [len(getattr(p, f"{side}_ids")) for p in pairs] for side in ("prompt", "chosen", "rejected")}
    for side, values in lengths.items():
        assert report["lengths"][side]["max"] == max(values)
        assert report["lengths"][side]["p50"] == pytest.approx(float(np.median(values)))
    cut = {side: [len(getattr(w, f"{side}_ids")) - len(getattr(p, f"{side}_ids")) for w, p in zip(whole, pairs)]
           for side in ("prompt", "chosen", "rejected")}  # fmt: skip
    for side, values in cut.items():
        assert report["data"]["truncated"][side] == {
            "pairs": sum(v > 0 for v in values), "share": sum(v > 0 for v in values) / ROWS, "tokens_cut": sum(values)
        }
    assert report["data"]["truncated"]["prompt"]["pairs"] == 1  # row 61
    longest = [len(w.prompt_ids) + max(len(w.chosen_ids), len(w.rejected_ids)) for w in whole]
    keeps = {r["max_length"]: r["pairs"] for r in report["lengths"]["max_length_keeps_whole"]}
    assert keeps[MAX_LENGTH] == sum(n <= MAX_LENGTH for n in longest) and keeps[256] == ROWS

    longer = sum(c > r for c, r in zip(lengths["chosen"], lengths["rejected"]))
    assert report["length_bias"]["chosen_longer"] == longer
    big = [(c, r) for c, r in zip(lengths["chosen"], lengths["rejected"]) if abs(c - r) in range(17, 65)]
    bucket = next(b for b in report["length_bias"]["by_difference"] if b["difference"] == "17-64")
    assert bucket["pairs"] == len(big) == 20 and bucket["chosen_longer_share"] == 1.0  # the planted subset

    triples = [(tuple(p.prompt_ids), tuple(p.chosen_ids), tuple(p.rejected_ids)) for p in pairs]
    counts = Counter(triples)
    duplicates = report["duplicates"]
    assert duplicates["duplicates"]["pairs"] == sum(n - 1 for n in counts.values()) == 3
    assert duplicates["duplicates"]["examples"] == [[f"{data.path} line {n}" for n in (11, 21, 31, 32)]]
    reversed_pairs = sum((p, r, c) in counts for p, c, r in triples)
    assert duplicates["contradictions"]["pairs"] == reversed_pairs == 4
    assert duplicates["contradictions"]["examples"] == [[f"{data.path} line 6", f"{data.path} line 41"],
                                                        [f"{data.path} line 7", f"{data.path} line 42"]]  # fmt: skip
    prompts = Counter(t[0] for t in triples)
    assert duplicates["prompts"]["with_several_pairs"] == sum(n > 1 for n in prompts.values()) == 4
    assert duplicates["prompts"]["pairs_per_prompt"] == {str(k): v for k, v in sorted(Counter(prompts.values()).items())}

    contamination = report["contamination"]
    assert contamination["exact"]["prompts"] == 1  # eval line 1: training row 70's prompt
    assert contamination["over_threshold"]["prompts"] == 2  # and the paragraph inside row 60's prompt
    found = {e["eval"]: (e["share"], e["training"]) for e in contamination["examples"]}
    assert found[f"{evaluation} line 1"] == (1.0, f"{data.path} line 71")
    assert found[f"{evaluation} line 2"] == (1.0, f"{data.path} line 61")
    assert any("exact duplicate pairs" in line for line in report["findings"])
    assert any("contradictory pairs" in line for line in report["findings"])
    md = (tmp_path / "report" / "report.md").read_text()
    assert md.index("## Findings") < md.index("## Lengths") and "| 3 | 0.025 | 1 | 4 | 2 |" in md
    assert sorted(p.name for p in (tmp_path / "report").iterdir()) == [
        "length_ratio.png", "lengths.png", "report.json", "report.md"
    ]


def test_margins_come_from_the_cache_in_the_stores_order(run, tmp_path, byte_tokenizer):
    """A cache written with known values (chosen = -position, rejected = -2): the margins, their per-token form
    and the most negative pairs are those values, read back by position."""
    config, _, data, model = run
    pairs = load_prepared(data, byte_tokenizer, data.cache_dir).pairs
    cache = tmp_path / "cache"
    cache.mkdir()
    chosen = -torch.arange(len(pairs), dtype=torch.float32)
    for shard, first in enumerate(range(0, len(pairs), 50)):
        values = {name: torch.zeros(min(50, len(pairs) - first)) - 2 for name in FIELDS}
        values["chosen"] = chosen[first : first + 50]
        write_shard(cache, shard, pairs[first : first + 50], values)
    write_manifest(cache, fingerprint(ModelConfig(str(model)), data, byte_tokenizer), 3, 50)
    report = _report(config, tmp_path / "report", "reference.source=cache", f"reference.cache_dir={cache}")
    margins = chosen.numpy() + 2
    assert report["reference"]["negative"]["pairs"] == int((margins < 0).sum()) == len(pairs) - 3
    assert report["reference"]["margin"]["p50"] == pytest.approx(float(np.median(margins)))
    worst = report["reference"]["most_negative"][0]
    last = pairs[len(pairs) - 1]
    assert worst["pair"] == last.source and worst["margin"] == pytest.approx(margins[-1])
    assert worst["per_token"] == pytest.approx(chosen[-1].item() / len(last.chosen_ids) + 2 / len(last.rejected_ids))
    assert (tmp_path / "report" / "margins.png").exists()


def test_a_cache_of_other_pairs_is_refused_in_one_line(run, tmp_path, byte_tokenizer, capsys):
    config, _, data, model = run
    pairs = load_prepared(data, byte_tokenizer, data.cache_dir).pairs
    cache = tmp_path / "cache"
    cache.mkdir()
    write_shard(cache, 0, pairs[1:], {name: torch.zeros(len(pairs) - 1) for name in FIELDS})
    write_manifest(cache, fingerprint(ModelConfig(str(model)), data, byte_tokenizer), 1, 200)
    args = ["data-report", "--config", str(config), "--out", str(tmp_path / "r"), "reference.source=cache",
            f"reference.cache_dir={cache}"]  # fmt: skip
    assert main(args) == 2
    assert "its pairs are not this token store's, in order (119 cached, 120 stored)" in capsys.readouterr().err


@pytest.mark.slow  # tokenizes 2,354 rows: about 4 s on the 2-core machine
def test_hh_rlhf_report_finds_the_length_bias_and_the_identical_rows(shared_data, tmp_path):
    """helpful-base under stories260K's tokenizer: its identical rows are counted, the chosen answer is longer
    in most pairs, and more so as the difference grows (the README quotes this run)."""
    path = shared_data / "preferences" / "hh-rlhf" / "helpful-base" / "test.jsonl.gz"
    settings = {"path": str(path), "max_length": 1024, "num_workers": 1, "cache_dir": str(tmp_path / "store")}
    config = tmp_path / "run.yaml"
    model = str(shared_data / "models" / "stories260K")
    config.write_text(yaml.safe_dump({"model": {"path": model}, "data": settings, "run_dir": str(tmp_path)}))
    report = _report(config, tmp_path / "report")
    assert report["data"]["rows"] == 2354
    assert report["data"]["dropped"]["identical_completions"] >= 2  # the 2 byte-identical rows, at least
    bias = report["length_bias"]
    assert bias["chosen_longer_share"] > 0.55
    assert bias["by_difference"][-1]["chosen_longer_share"] > bias["by_difference"][1]["chosen_longer_share"]


def _cut_dialogues(tmp_path, byte_tokenizer, rows: int) -> tuple:
    """`rows` prompts of random words, each its own, with 63-token answers: keep_end at data.max_length=64 cuts
    every prompt to its last token, ':', the same for all. A training config over them, and the data file."""
    rng = np.random.default_rng(0)
    words = "harbour plan rainy tuesday committee weather lantern copper violin meadow orbit pickle".split()
    lines = []
    for i in range(rows):
        prompt = "Human: " + " ".join(rng.choice(words, 20).tolist())[:130] + f" {i} Assistant:"
        answer = (f"{i:>3} " + "a long answer " * 5)[:61]
        lines.append({"prompt": prompt, "chosen": answer, "rejected": answer[::-1] + "!"})
    data = tmp_path / "dialogues.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in lines))
    tokenizer_dir = tmp_path / "tokenizer"
    byte_tokenizer.save_pretrained(tokenizer_dir)
    settings = {"path": str(data), "tokenizer": str(tokenizer_dir), "max_length": 64, "truncation_mode": "keep_end",
                "num_workers": 1, "shard_rows": 8, "cache_dir": str(tmp_path / "store")}  # fmt: skip
    config = tmp_path / "cut.yaml"
    config.write_text(yaml.safe_dump({"model": {"path": str(tmp_path / "no-model")}, "data": settings,
                                      "run_dir": str(tmp_path / "r")}))  # fmt: skip
    return config, data


def test_a_training_file_is_its_own_eval_set_however_truncation_cut_its_prompts(tmp_path, byte_tokenizer):
    """Every prompt cut to one token, the training file as --eval: each eval prompt is whole in training and holds
    all its n-grams there (compared as stored: none, and 0 >= 0.5)."""
    config, data = _cut_dialogues(tmp_path, byte_tokenizer, 20)
    cut = prepare(DataConfig(str(data), max_length=64, truncation_mode="keep_end"), byte_tokenizer).pairs
    assert len({tuple(p.prompt_ids) for p in cut}) == 1 and len(cut[0].prompt_ids) == 1
    contamination = _report(config, tmp_path / "report", "--eval", str(data))["contamination"]
    assert contamination["exact"]["prompts"] == contamination["over_threshold"]["prompts"] == 20
    assert {e["eval"].replace("line", "") for e in contamination["examples"]} == {
        e["training"].replace("line", "") for e in contamination["examples"]}  # each matched by its own row


def test_held_out_prompts_cut_to_the_same_token_are_not_found_whole_in_training(tmp_path, byte_tokenizer):
    """The run's held-out pairs as the eval set: their prompts all end in ':', as every training prompt's cut
    window does, yet no two prompts are the same, so nothing appears whole in training and no finding says so."""
    config, _ = _cut_dialogues(tmp_path, byte_tokenizer, 20)
    report = _report(config, tmp_path / "report", "eval.every=1", "eval.fraction=0.5")
    contamination = report["contamination"]
    assert contamination["eval_prompts"] == 10
    assert contamination["exact"]["prompts"] == contamination["over_threshold"]["prompts"] == 0
    assert not any("eval prompts appear whole" in line for line in report["findings"])


def test_contamination_reads_whole_prompts_from_a_filtered_store(run, tmp_path):
    """With data.filters the store's rows file is the filtered one, in another order than the prompt heads: the
    report still finds the eval prompts whole (row 61's prompt, cut by keep_end, among them)."""
    config, _, data, _ = run
    evaluation = tmp_path / "cut-eval.jsonl"
    evaluation.write_text(json.dumps(_rows()[61]) + "\n" + json.dumps(_rows()[70]) + "\n")
    report = _report(config, tmp_path / "report", "--eval", str(evaluation), "data.filters.drop_duplicates=true",
                     f"data.cache_dir={tmp_path / 'filtered-store'}")  # fmt: skip
    assert report["data"]["dropped"] == {"duplicate": 3}
    assert report["contamination"]["exact"]["prompts"] == 2
    found = {e["eval"]: e["training"] for e in report["contamination"]["examples"]}
    assert found == {f"{evaluation} line 1": f"{data.path} line 62", f"{evaluation} line 2": f"{data.path} line 71"}


@pytest.mark.slow  # a dpo-scale process: about 3 s
def test_data_report_refuses_a_missing_eval_file_before_tokenizing(run, tmp_path):
    """`--eval nope.jsonl` at the shell: exit 2 naming the flag, and no token store made (nor begun)."""
    config, _, data, _ = run
    result = subprocess.run([DPO_SCALE, "data-report", "--config", str(config), "--out", str(tmp_path / "report"),
                             "--eval", "nope.jsonl"], cwd=tmp_path, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert result.returncode == 2, result.stdout + result.stderr
    assert "--eval=nope.jsonl: no such file or directory. Fix: check --eval" in result.stderr
    assert "Traceback" not in result.stderr and not Path(data.cache_dir).exists() and "tokenizing" not in result.stdout


def test_a_store_without_prompt_heads_is_refused_for_contamination_naming_the_fix(run, tmp_path, capsys):
    """A store missing a prompt heads file (damaged: every shard has one, checksummed; a store of the earlier layout
    has another store_format, so it is never opened) cannot compare prompts whole: the report says so in one line
    rather than comparing cut prompts."""
    config, evaluation, data, _ = run
    _report(config, tmp_path / "report")
    (Path(data.cache_dir) / "shard-00001.prompt-heads.npy").unlink()
    args = ["data-report", "--config", str(config), "--out", str(tmp_path / "again"), "--eval", str(evaluation)]
    assert main(args) == 2
    assert "shard-00001.prompt-heads.npy is missing" in capsys.readouterr().err

"""data.filters drop exactly the planted pairs, the same in memory and in the token store, counted by reason; a
store built with other filters is refused; the span hashes and n-gram shares equal what plain Python computes."""

import gzip
import json
import os
import subprocess

import numpy as np
import pytest

from dpo_scale.cli import main
from dpo_scale.commands.demo import write_demo_material
from dpo_scale.config import ConfigError, DataConfig, FilterConfig
from dpo_scale.data import DataError, load_prepared, load_tokenizer, prepare, spans, store_directory
from dpo_scale.data.build import store_fingerprint
from dpo_scale.data.contamination import EvalPrompts
from dpo_scale.data.spans import ngram_hashes, span_hashes
from launch import DPO_SCALE

PARAGRAPH = "the committee met on a rainy tuesday to weigh the harbour plan"  # 62 bytes: 50 byte 13-grams
ROWS = 80
DUPLICATES = {20: 10, 30: 10}  # row: the earlier row it copies
CONTRADICTS = {40: 5}  # row: the row whose preference it reverses
LONG = 50  # chosen 12x longer than rejected
WHOLE, INSIDE = 60, 70  # prompt equal to an eval prompt; an eval prompt as a paragraph inside a longer prompt


def _rows() -> list[dict]:
    rows = [{"prompt": f"question {i} about cats", "chosen": f"answer {i}", "rejected": f"wrong {i}"} for i in range(ROWS)]
    for row, earlier in DUPLICATES.items():
        rows[row] = dict(rows[earlier])
    for row, other in CONTRADICTS.items():
        rows[row] = {**rows[other], "chosen": rows[other]["rejected"], "rejected": rows[other]["chosen"]}
    rows[LONG]["chosen"] = "a long winded answer that goes on" * 3
    rows[INSIDE]["prompt"] = f"Read this. {PARAGRAPH} What was decided there?"
    return rows


EVAL = [
    {"prompt": f"question {WHOLE} about cats", "chosen": "x", "rejected": "y"},  # short: 23 bytes, matched whole
    {"prompt": PARAGRAPH, "chosen": "x", "rejected": "y"},
    {"prompt": "a question nobody asked in training at all", "chosen": "x", "rejected": "y"},
]
EXPECTED = {
    "contradictory": {5, 40},
    "duplicate": set(DUPLICATES),
    "contaminated": {WHOLE, INSIDE},
    "length_ratio": {LONG},
}
SETTINGS = {
    "contradictory": {"drop_contradictory": True},
    "duplicate": {"drop_duplicates": True},
    "contaminated": {"drop_contaminated": True},
    "length_ratio": {"max_length_ratio": 3.0},
}


@pytest.fixture
def files(tmp_path):
    data, evaluation = tmp_path / "pairs.jsonl", tmp_path / "eval.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in _rows()))
    evaluation.write_text("".join(json.dumps(row) + "\n" for row in EVAL))
    return data, evaluation


def _config(files, **filters) -> DataConfig:
    data, evaluation = files
    return DataConfig(str(data), shard_rows=16, num_workers=1, filters=FilterConfig(eval_path=str(evaluation), **filters))


def _dropped_by_reason(prepared) -> dict[str, set[int]]:
    found: dict[str, set[int]] = {}
    for drop in prepared.dropped:
        found.setdefault(drop.reason, set()).add(drop.index)
    return found


@pytest.mark.parametrize("reason", list(SETTINGS))
def test_each_filter_drops_exactly_its_planted_pairs_in_memory_and_in_the_store(files, byte_tokenizer, tmp_path, reason):
    config = _config(files, **SETTINGS[reason])
    memory = prepare(config, byte_tokenizer)
    assert _dropped_by_reason(memory) == {reason: EXPECTED[reason]}
    assert memory.drop_counts() == {reason: len(EXPECTED[reason])}
    store = load_prepared(config, byte_tokenizer, tmp_path / "store")
    assert store.dropped == memory.dropped and list(store.pairs) == memory.pairs
    assert store.summary() == memory.summary() == f"{ROWS} rows: {ROWS - len(EXPECTED[reason])} pairs kept, " \
        f"{len(EXPECTED[reason])} dropped ({reason}: {len(EXPECTED[reason])})"


def test_all_filters_at_once_count_each_pair_under_one_reason(files, byte_tokenizer, tmp_path):
    """Row 10 is kept (the first of its copies); a pair two filters drop is counted once, under the first reason."""
    config = _config(files, **{k: v for settings in SETTINGS.values() for k, v in settings.items()})
    memory = prepare(config, byte_tokenizer)
    assert _dropped_by_reason(memory) == EXPECTED
    assert 10 in {p.index for p in memory.pairs}
    store = load_prepared(config, byte_tokenizer, tmp_path / "store")
    assert store.dropped == memory.dropped and list(store.pairs) == memory.pairs
    assert [d.index for d in store.dropped] == sorted(set().union(*EXPECTED.values()))  # input order


def test_filters_off_drop_nothing(files, byte_tokenizer):
    assert prepare(_config(files), byte_tokenizer).dropped == []


def test_a_store_built_with_other_filters_is_refused_naming_the_filter_and_both_values(files, byte_tokenizer, tmp_path):
    load_prepared(_config(files, drop_duplicates=True), byte_tokenizer, tmp_path / "store")
    with pytest.raises(ConfigError, match=r"data.filters.drop_duplicates: store true, this run false"):
        load_prepared(_config(files), byte_tokenizer, tmp_path / "store")
    with pytest.raises(ConfigError, match=r"data.filters.max_length_ratio: store null, this run 3.0"):
        load_prepared(_config(files, drop_duplicates=True, max_length_ratio=3.0), byte_tokenizer, tmp_path / "store")


def test_a_changed_eval_file_is_refused_naming_it(files, byte_tokenizer, tmp_path):
    config = _config(files, drop_contaminated=True)
    load_prepared(config, byte_tokenizer, tmp_path / "store")
    files[1].write_text(files[1].read_text().replace("nobody", "anyone"))
    with pytest.raises(ConfigError, match=r"data.filters.eval file eval.jsonl: its content differs"):
        load_prepared(config, byte_tokenizer, tmp_path / "store")


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"drop_contaminated": True}, "drop_contaminated=true needs data.filters.eval_path"),
        ({"ngram": 0}, "data.filters.ngram=0: must be at least 1"),
        ({"ngram_threshold": 1.5}, r"data.filters.ngram_threshold=1.5: must be in \(0, 1\]"),
        ({"max_length_ratio": 0.5}, "data.filters.max_length_ratio=0.5: must be at least 1"),
    ],
)
def test_invalid_filters_are_refused_on_creation(settings, message):
    with pytest.raises(ConfigError, match=message):
        FilterConfig(**settings)


def test_logps_lists_the_filtered_pairs_with_their_reason(tmp_path):
    model_dir, data_path = write_demo_material(tmp_path / "demo", rows=8)
    lines = data_path.read_text().splitlines()[:6]
    data = tmp_path / "pairs.jsonl"
    data.write_text("\n".join(lines + [lines[2]]) + "\n")
    out = tmp_path / "logps.jsonl"
    args = ["logps", "--model", str(model_dir), "--data", str(data), "--out", str(out), "data.filters.drop_duplicates=true"]
    assert main(args) == 0
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert records[6] == {"index": 6, "source": f"{data} line 7", "dropped": "duplicate"}
    assert all("chosen_logps" in r for r in records[:6])


def test_span_hashes_are_equal_exactly_for_equal_token_spans():
    """Over random spans of a small alphabet (many equal spans), equal hashes match equal tuples, one to one."""
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 3, 5_000).astype(np.uint16)
    starts, lengths = rng.integers(0, 4_990, 3_000), rng.integers(0, 6, 3_000)
    hashes = span_hashes(tokens, starts, lengths)
    spans = [tuple(tokens[s : s + n].tolist()) for s, n in zip(starts, lengths)]
    assert len(set(zip(spans, hashes.tolist()))) == len(set(spans)) == len(set(hashes.tolist()))


def _formula(ids: list[int]) -> int:
    """The spans module docstring's hash, h = finish(sum_k mix(x_k) * B**k, L), in Python ints."""

    def mixed(z: int) -> int:  # splitmix64's finaliser
        z = (z + 0x9E3779B97F4A7C15) % 2**64
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) % 2**64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) % 2**64
        return z ^ (z >> 31)

    total = sum(mixed(x) * int(spans.B) ** k for k, x in enumerate(ids)) % 2**64
    return mixed(total ^ (len(ids) * int(spans.LENGTH_SALT)) % 2**64)


@pytest.mark.parametrize("layout", ["random", "store"])
@pytest.mark.parametrize("chunk", [4_096, spans.CHUNK_TOKENS])
def test_span_hashes_equal_the_formula_whatever_the_path(layout, chunk, monkeypatch):
    """Every path gives the formula's hash: uint16 ids through mix's table and int64 ids through mix itself (the
    store's tokens and eval prompts in memory must agree bit for bit, or contamination finds nothing); spans laid end
    to end as a store lays pairs, with some pointing back at earlier tokens (hashed in place, the others gathered),
    and random spans (gathered, or in place where they overlap); chunks smaller than the data and larger."""
    monkeypatch.setattr(spans, "CHUNK_TOKENS", chunk)
    rng = np.random.default_rng(2)
    tokens = rng.integers(0, 2**16, 60_000).astype(np.uint16)
    lengths = rng.integers(0, 600, 3_000)
    if layout == "store":
        lengths = lengths[np.cumsum(lengths) < 55_000]
        starts = np.r_[0, np.cumsum(lengths)[:-1]] + (np.arange(len(lengths)) > 40) * 7  # and a small gap
        back = rng.choice(np.arange(1, len(lengths)), 20, replace=False)
        starts[back], lengths[back] = starts[back - 1], lengths[back - 1]  # a copy of the span before
    else:
        starts = rng.integers(0, 59_000, 3_000)
        lengths = np.minimum(lengths, 60_000 - starts)
    got = span_hashes(tokens, starts, lengths)
    np.testing.assert_array_equal(got, span_hashes(tokens.astype(np.int64), starts, lengths))
    for i in rng.choice(len(starts), 25, replace=False).tolist() + [len(starts) - 1]:
        assert int(got[i]) == _formula(tokens[starts[i] : starts[i] + lengths[i]].tolist())
    for n in (1, 13):
        spans_ = starts[:50], lengths[:50], n
        for got_grams, want in zip(ngram_hashes(tokens, *spans_), ngram_hashes(tokens.astype(np.int64), *spans_)):
            np.testing.assert_array_equal(got_grams, want)


def test_ngram_shares_equal_set_arithmetic():
    """The share of each eval prompt's distinct n-grams a training prompt holds, against Python sets of tuples."""
    rng = np.random.default_rng(1)
    train = [rng.integers(0, 4, rng.integers(0, 40)).tolist() for _ in range(60)]
    evals = [rng.integers(0, 4, rng.integers(0, 20)).tolist() for _ in range(15)] + [train[3][5:25]]
    n = 4

    def flat(spans):
        lengths = np.array([len(s) for s in spans])
        return np.array(sum(spans, []), np.int64), np.r_[0, np.cumsum(lengths)[:-1]], lengths

    def grams(ids):
        return {tuple(ids[i : i + n]) for i in range(len(ids) - n + 1)}

    prompts = EvalPrompts.from_tokens(*flat(evals), n)
    found_train, found_eval, shares = prompts.shares(prompts.hits(*flat(train)), len(train))
    got = {(t, e): s for t, e, s in zip(found_train.tolist(), found_eval.tolist(), shares.tolist())}
    expected = {}
    for t, ids in enumerate(train):
        for e, eval_ids in enumerate(evals):
            if len(eval_ids) < n:
                if ids == eval_ids:
                    expected[(t, e)] = 1.0
            elif common := grams(eval_ids) & grams(ids):
                expected[(t, e)] = len(common) / len(grams(eval_ids))
    assert got == pytest.approx(expected)
    assert got[(3, len(evals) - 1)] == 1.0
    hashes, owners = ngram_hashes(*flat(train), n)
    assert len(hashes) == sum(max(len(t) - n + 1, 0) for t in train)


def test_span_hashes_of_uint16_ids_equal_those_of_the_same_ids_as_int64():
    """The store's uint16 tokens hash through mix's lookup table, eval prompts in memory (int64) through mix itself:
    the two must agree bit for bit, or contamination would find nothing. Chunks smaller than the data cross spans."""
    rng = np.random.default_rng(2)
    tokens = rng.integers(0, 2**16, 50_000).astype(np.uint16)
    starts, lengths = rng.integers(0, 49_000, 4_000), rng.integers(0, 1_000, 4_000)
    expected = span_hashes(tokens.astype(np.int64), starts, lengths)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(spans, "CHUNK_TOKENS", 4_096)
        np.testing.assert_array_equal(span_hashes(tokens, starts, lengths), expected)
    np.testing.assert_array_equal(span_hashes(tokens, starts, lengths), expected)
    for n in (1, 13):
        spans_ = starts[:50], lengths[:50], n
        for got, want in zip(ngram_hashes(tokens, *spans_), ngram_hashes(tokens.astype(np.int64), *spans_)):
            np.testing.assert_array_equal(got, want)

    def mixed(z: int) -> int:  # splitmix64's finaliser on Python ints
        z = (z + 0x9E3779B97F4A7C15) % 2**64
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) % 2**64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) % 2**64
        return z ^ (z >> 31)

    for i in range(20):  # the module docstring's formula, h = finish(sum_k mix(x_k) * B**k, L), in Python ints
        ids = tokens[starts[i] : starts[i] + lengths[i]].tolist()
        total = sum(mixed(x) * int(spans.B) ** k for k, x in enumerate(ids)) % 2**64
        assert mixed(total ^ (len(ids) * int(spans.LENGTH_SALT)) % 2**64) == int(expected[i])


def test_span_helpers_and_training_prompts_shorter_than_n():
    """span_starts / expand_ranges against plain Python, empty input included; and a block of training prompts
    all shorter than n (no n-gram at all: the demo's 7-token prompts at n = 13) matches nothing instead of failing
    (`dpo-scale data-report --eval` raised a numpy broadcast error there)."""
    lengths = [3, 0, 2, 5]
    assert spans.span_starts(lengths).tolist() == [0, 3, 3, 5]
    assert spans.span_starts([]).tolist() == []
    assert spans.expand_ranges([10, 7, 0], [2, 0, 3]).tolist() == [10, 11, 0, 1, 2]
    assert spans.expand_ranges([], []).tolist() == []
    evals = EvalPrompts.from_tokens(np.arange(20, dtype=np.int64), np.array([0]), np.array([20]), 13)
    short = np.arange(12, dtype=np.int64)
    hits = evals.hits(short, np.array([0, 6]), np.array([6, 6]))
    assert len(hits.entries) == 0 and not hits.equal_short.any()
    train, evaluated, shares = evals.shares(hits, 2)
    assert len(train) == len(evaluated) == len(shares) == 0


def _dialogues(path, rows: int, long_answers: tuple[int, ...] = ()) -> None:
    """Prompts of about 140 bytes of random words, each its own; rows in `long_answers` have a 63-token rejected
    answer, so that keep_end at data.max_length=64 leaves their prompt one token."""
    rng = np.random.default_rng(0)
    words = "harbour plan rainy tuesday committee weather lantern copper violin meadow orbit pickle".split()
    lines = []
    for i in range(rows):
        prompt = "Human: " + " ".join(rng.choice(words, 20).tolist())[:130] + f" {i} Assistant:"
        answer = f"sure {i}" if i not in long_answers else f"{i:>3} " + "a long answer " * 5
        lines.append({"prompt": prompt, "chosen": answer[:61], "rejected": answer[:61][::-1] + "!"})
    path.write_text("".join(json.dumps(row) + "\n" for row in lines))


@pytest.mark.parametrize(("mode", "max_length"), [("keep_end", 64), ("keep_start", 200)])
def test_a_training_file_used_as_its_own_eval_file_is_contaminated_whole_under_truncation(
    tmp_path, byte_tokenizer, mode, max_length
):
    """Contamination compares prompts whole, before truncation: keep_end cuts every prompt here to under half of
    it (and rows 3 and 7 to one token), and still every pair is flagged, in memory and in the store. (Compared as
    stored, none was.) keep_start keeps a kept pair's prompt whole by construction."""
    data = tmp_path / "pairs.jsonl"
    _dialogues(data, 12, long_answers=(3, 7))
    filters = FilterConfig(drop_contaminated=True, eval_path=str(data), drop_duplicates=True)
    config = DataConfig(str(data), max_length=max_length, truncation_mode=mode, shard_rows=5, num_workers=1,
                        filters=filters)  # fmt: skip
    unfiltered = prepare(DataConfig(str(data), max_length=max_length, truncation_mode=mode), byte_tokenizer)
    assert len(unfiltered.pairs) == 12
    if mode == "keep_end":
        assert all(len(p.prompt_ids) < 60 for p in unfiltered.pairs)
        assert [len(unfiltered.pairs[i].prompt_ids) for i in (3, 7)] == [1, 1]
    message = r"data.filters dropped all 12 pairs that preparation kept \(contaminated: 12\)"
    with pytest.raises(DataError, match=message):
        prepare(config, byte_tokenizer)
    with pytest.raises(DataError, match=message):
        load_prepared(config, byte_tokenizer, tmp_path / "store")


def test_contamination_in_the_store_equals_memory_with_cut_prompts_and_other_filters(tmp_path, byte_tokenizer):
    """An eval file holding rows 0-5 of the training file (whole, untruncated) and a stranger: exactly those six
    are contaminated, in memory and in the store, whose shards also drop duplicates (the filtered rows file
    reorders rows: the prompt heads must still be found)."""
    data, evaluation = tmp_path / "pairs.jsonl", tmp_path / "eval.jsonl"
    _dialogues(data, 14, long_answers=(2,))
    rows = data.read_text().splitlines()
    data.write_text("\n".join(rows + [rows[9], rows[1]]) + "\n")  # rows 14 and 15 copy rows 9 and 1
    evaluation.write_text("\n".join(rows[:6] + ['{"prompt": "Human: hi", "chosen": "a", "rejected": "b"}']) + "\n")
    filters = FilterConfig(drop_contaminated=True, eval_path=str(evaluation), drop_duplicates=True)
    config = DataConfig(str(data), max_length=64, truncation_mode="keep_end", shard_rows=4, num_workers=1,
                        filters=filters)  # fmt: skip
    memory = prepare(config, byte_tokenizer)
    assert _dropped_by_reason(memory) == {"contaminated": {0, 1, 2, 3, 4, 5}, "duplicate": {14, 15}}
    store = load_prepared(config, byte_tokenizer, tmp_path / "store")
    assert store.dropped == memory.dropped and list(store.pairs) == memory.pairs


def test_filters_that_drop_every_pair_are_named_as_the_cause(files, byte_tokenizer, tmp_path):
    """Not 'raise data.max_length': which filters dropped how many, in memory and from the store."""
    data, _ = files
    config = DataConfig(str(data), shard_rows=16, num_workers=1,
                        filters=FilterConfig(drop_contaminated=True, eval_path=str(data), drop_duplicates=True))  # fmt: skip
    message = (
        rf"{data}: no pair is left to train on \(80 rows: 0 pairs kept, 80 dropped \(contaminated: 78, duplicate: 2\)\)"
        r": data.filters dropped all 80 pairs that preparation kept \(duplicate: 2, contaminated: 78\). Fix: check or "
        r"turn off data.filters.drop_duplicates and data.filters.drop_contaminated$"
    )
    with pytest.raises(DataError, match=message):
        prepare(config, byte_tokenizer)
    with pytest.raises(DataError, match=message):
        load_prepared(config, byte_tokenizer, tmp_path / "store")


def test_the_eval_file_makes_no_new_store_unless_drop_contaminated_reads_it(files, byte_tokenizer, tmp_path):
    """eval_path, ngram and ngram_threshold (read by `data-report --eval` too) are in the store's fingerprint and
    name only with drop_contaminated."""
    data, evaluation = files
    plain = DataConfig(str(data))
    unused = DataConfig(str(data), filters=FilterConfig(eval_path=str(evaluation), ngram=8, ngram_threshold=0.3))
    used = DataConfig(str(data), filters=FilterConfig(eval_path=str(evaluation), drop_contaminated=True))
    names = [store_directory(config, byte_tokenizer, tmp_path) for config in (plain, unused, used)]
    assert names[0] == names[1] != names[2]
    assert store_fingerprint(plain, byte_tokenizer) == store_fingerprint(unused, byte_tokenizer)
    assert "data.filters.eval_files" in store_fingerprint(used, byte_tokenizer)


@pytest.mark.slow  # a dpo-scale process: about 4 s
def test_prepare_data_drops_training_copies_of_eval_dialogues_cut_by_keep_end(shared_data, tmp_path):
    """The user's case at the shell: 8 HH-RLHF dialogues, all inside a 40-row eval file, on stories260K's 512
    positions with keep_end (every one's prompt cut). Each is dropped as contaminated; the message says the filter
    dropped them all."""
    with gzip.open(shared_data / "preferences" / "hh-rlhf" / "helpful-base" / "test.jsonl.gz", "rt") as rows:
        first = [next(rows) for _ in range(40)]
    longest = sorted(range(40), key=lambda i: -len(first[i]))[:8]
    (tmp_path / "hh40.jsonl").write_text("".join(first))
    (tmp_path / "hh8.jsonl").write_text("".join(first[i] for i in sorted(longest)))
    settings = ["model.path=" + str(shared_data / "models" / "stories260K"), "data.path=hh8.jsonl",
                "data.max_length=512", "data.truncation_mode=keep_end", "data.num_workers=1", f"run_dir={tmp_path}",
                "data.filters.drop_contaminated=true", "data.filters.eval_path=hh40.jsonl"]  # fmt: skip
    environment = {**os.environ, "DPO_SCALE_CACHE": str(tmp_path / "cache")}
    result = subprocess.run([DPO_SCALE, "prepare-data", *settings], cwd=tmp_path, capture_output=True, text=True,
                            env=environment, timeout=300)  # fmt: skip
    assert result.returncode == 2, result.stdout + result.stderr
    assert "data.filters dropped all 8 pairs that preparation kept (contaminated: 8)" in result.stderr
    cut = prepare(DataConfig(str(tmp_path / "hh8.jsonl"), max_length=512, truncation_mode="keep_end"),
                  load_tokenizer(str(shared_data / "models" / "stories260K")))  # fmt: skip
    assert len(cut.pairs) == 8  # all kept before the filter, every prompt cut:
    assert all(len(p.prompt_ids) + max(len(p.chosen_ids), len(p.rejected_ids)) == 512 for p in cut.pairs)

"""The token store: what it reads back equals in-memory preparation on every input format, it refuses what it was
not made for (naming the setting and both values), and a reader holds a micro-batch, not the dataset."""

import dataclasses
import gzip
import json
import math
import tracemalloc

import numpy as np
import pytest
import torch

from conftest import make_byte_tokenizer
from dpo_scale.config import ConfigError, DataConfig
from dpo_scale.data import DataError, PairView, load_prepared, load_tokenizer, prepare, split_held_out
from dpo_scale.data.cache import store_name
from dpo_scale.data.formats import split_transcripts
from dpo_scale.data.store import LAST_USED, rows_name, tokens_name
from fixed_split import Split

HH = ("preferences", "hh-rlhf", "helpful-base", "test.jsonl.gz")


def _same_as_prepare(config: DataConfig, tokenizer, directory) -> None:
    memory = prepare(config, tokenizer)
    store = load_prepared(config, tokenizer, directory)
    assert len(store.pairs) == len(memory.pairs)
    assert list(store.pairs) == memory.pairs  # index, source and the three id lists of every pair
    assert store.dropped == memory.dropped
    assert store.drop_counts() == memory.drop_counts() and store.summary() == memory.summary()
    reopened = load_prepared(config, tokenizer, directory)  # the second open reads what the first one wrote
    assert reopened.pairs[-1] == memory.pairs[-1] and reopened.pairs[0] == memory.pairs[0]


@pytest.mark.slow
def test_hh_transcripts_round_trip_with_drops_over_shards_and_workers(shared_data, stories_tokenizer, tmp_path):
    """HH-RLHF's implicit prompts, cut to 128 tokens (hundreds of empty completions dropped, and identical ones),
    in 12 shards built by a pool of 2 worker processes."""
    config = DataConfig(str(shared_data.joinpath(*HH)), max_length=128, shard_rows=200, num_workers=2)
    _same_as_prepare(config, stories_tokenizer, tmp_path / "store")
    assert len(list((tmp_path / "store").glob("shard-*.rows.npy"))) == math.ceil(2354 / 200)


@pytest.mark.slow
def test_sharegpt_and_conversational_with_phi3_chat_template(shared_data, phi3_tokenizer, tmp_path):
    sharegpt = shared_data / "preferences" / "llama-factory" / "dpo_en_demo.json"
    _same_as_prepare(DataConfig(str(sharegpt), shard_rows=128), phi3_tokenizer, tmp_path / "sharegpt")
    roles = {"human": "user", "gpt": "assistant", "system": "system"}
    conversational = tmp_path / "conversational.jsonl"
    with conversational.open("w") as handle:
        for row in json.loads(sharegpt.read_text(encoding="utf-8")):
            prompt = [{"role": roles[turn["from"]], "content": turn["value"]} for turn in row["conversations"]]
            chosen = [{"role": "assistant", "content": row["chosen"]["value"]}]
            rejected = [{"role": "assistant", "content": row["rejected"]["value"]}]
            handle.write(json.dumps({"prompt": prompt, "chosen": chosen, "rejected": rejected}) + "\n")
    _same_as_prepare(DataConfig(str(conversational), shard_rows=128), phi3_tokenizer, tmp_path / "conversational")


def test_plain_strings_with_gpt2_two_byte_tokens(shared_data, tmp_path):
    """GPT-2's 50,257 ids fit two bytes a token: the store keeps them as uint16 and reads back the same ids."""
    tokenizer = load_tokenizer(str(shared_data / "tokenizers" / "gpt2" / "tokenizer.json"))
    tokenizer.eos_token = "<|endoftext|>"
    strings = tmp_path / "strings.jsonl"
    with gzip.open(shared_data.joinpath(*HH), "rt") as rows, strings.open("w") as handle:
        for line, _ in zip(rows, range(400)):
            row = json.loads(line)
            if split := split_transcripts(row["chosen"], row["rejected"]):
                handle.write(json.dumps(dict(zip(("prompt", "chosen", "rejected"), split))) + "\n")
    _same_as_prepare(DataConfig(str(strings), max_length=512, shard_rows=150), tokenizer, tmp_path / "store")
    assert np.load(tmp_path / "store" / tokens_name(0)).dtype == np.uint16


@pytest.mark.parametrize("workers", [1, 2])
def test_a_bad_row_is_reported_as_in_memory_preparation(byte_tokenizer, tmp_path, workers):
    """The row's file, line and field, also when a worker process tokenized it; nothing is made visible."""
    path = tmp_path / "pairs.jsonl"
    rows = [{"prompt": f"q{i}", "chosen": f"a{i}", "rejected": f"b{i}"} for i in range(300)]
    rows[250]["rejected"] = ["not", "text"]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    config = DataConfig(str(path), shard_rows=100, num_workers=workers)
    with pytest.raises(DataError) as in_memory:
        prepare(config, byte_tokenizer)
    with pytest.raises(DataError) as stored:
        load_prepared(config, byte_tokenizer, tmp_path / "store")
    assert str(stored.value) == str(in_memory.value)
    assert f"{path} line 251, field 'rejected'" in str(stored.value)
    assert not (tmp_path / "store" / "manifest.json").exists()


def test_strict_refuses_a_store_with_dropped_pairs_naming_the_row(byte_tokenizer, tmp_path):
    path = tmp_path / "pairs.jsonl"
    rows = [{"prompt": "q", "chosen": f"a{i}", "rejected": "a1" if i == 1 else f"b{i}"} for i in range(4)]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    assert load_prepared(DataConfig(str(path)), byte_tokenizer, tmp_path / "store").drop_counts() == {
        "identical_completions": 1
    }
    with pytest.raises(DataError, match=f"{path} line 2, fields 'chosen' and 'rejected': identical_completions"):
        load_prepared(DataConfig(str(path), strict=True), byte_tokenizer, tmp_path / "store")


@pytest.fixture
def built(byte_tokenizer, tmp_path):
    path = tmp_path / "pairs.jsonl"
    rows = ({"prompt": f"q{i}", "chosen": "yes", "rejected": "no"} for i in range(50))
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    config = DataConfig(str(path), max_length=16, shard_rows=20)
    load_prepared(config, byte_tokenizer, tmp_path / "store")
    return config, tmp_path / "store"


def test_refuses_another_max_length_naming_both_values(built, byte_tokenizer):
    config, store = built
    config.max_length = 12
    with pytest.raises(ConfigError, match=rf"^data.cache_dir={store}: .*\(data.max_length: store 16, this run 12\). "
                                          rf"Fix: point data.cache_dir .* or set data.rebuild=true to replace the "
                                          rf"store in {store}$"):  # fmt: skip
        load_prepared(config, byte_tokenizer, store)


def test_refuses_another_tokenizer_or_chat_template(built):
    config, store = built
    with pytest.raises(ConfigError, match=r"\(chat_template: store null, this run [0-9a-f]{12}\)"):
        load_prepared(config, make_byte_tokenizer(chat_template="{{ messages }}"), store)
    other = make_byte_tokenizer()
    other.add_special_tokens({"eos_token": "<|end|>"})
    with pytest.raises(ConfigError, match=r"\(tokenizer: store [0-9a-f]{12}, this run [0-9a-f]{12}\)"):
        load_prepared(config, other, store)


def test_refuses_changed_data_naming_the_file_and_rebuilds_when_asked(built, byte_tokenizer):
    config, store = built
    data = store.parent / "pairs.jsonl"
    data.write_text(data.read_text().replace("q7", "q8"))  # same size, other content
    with pytest.raises(ConfigError, match=r"data file pairs.jsonl: its content differs \(store 2,640 bytes, sha256"):
        load_prepared(config, byte_tokenizer, store)
    config.rebuild = True
    rebuilt = load_prepared(config, byte_tokenizer, store)
    assert byte_tokenizer.decode(rebuilt.pairs[7].prompt_ids) == "q8"


def test_refuses_damaged_files(built, byte_tokenizer):
    config, store = built
    tokens = store / tokens_name(1)
    data = bytearray(tokens.read_bytes())
    data[-1] ^= 0xFF  # same size, one flipped byte: found by the checksum when the shard is first read
    tokens.write_bytes(bytes(data))
    opened = load_prepared(config, byte_tokenizer, store)
    opened.pairs[0]  # shard 0 is intact
    with pytest.raises(ConfigError, match=rf"{tokens_name(1)} fails its checksum .*Fix: delete {store} .* or add "
                                          "data.rebuild=true to the train, prepare-data or precompute-ref command"):
        opened.pairs[25]
    (store / rows_name(2)).write_bytes(b"short")
    with pytest.raises(ConfigError, match=rf"{rows_name(2)} has changed size"):
        load_prepared(config, byte_tokenizer, store)
    config.rebuild = True
    assert len(load_prepared(config, byte_tokenizer, store).pairs) == 50


def test_refuses_to_mix_an_unfinished_build_with_other_settings(built, byte_tokenizer):
    config, store = built
    (store / "manifest.json").unlink()  # as if the build had been killed before its end
    config.max_length = 8
    with pytest.raises(ConfigError, match=r"holds an unfinished token store .*data.max_length: store 16, this run 8"):
        load_prepared(config, byte_tokenizer, store)


@pytest.fixture
def shared(built, byte_tokenizer):
    """The built store where cache.py would put it: under a root, named for its data and settings."""
    config, store = built
    directory = store.parent / "cache" / store_name(config, byte_tokenizer)
    directory.parent.mkdir()
    store.rename(directory)
    return config, directory


def _contents(directory) -> dict[str, bytes]:
    """The store's files (not its last-use mark, nor the hidden marks of ranks' rebuild decisions)."""
    files = (p for p in sorted(directory.iterdir()) if p.is_file() and p.name != LAST_USED)
    return {p.name: p.read_bytes() for p in files if not p.name.startswith(".")}


def test_a_shared_store_is_never_rebuilt_for_other_settings(shared, byte_tokenizer):
    """Other settings (as when a run's recorded store is opened with another run's config) are refused even with
    data.rebuild=true, which would replace the store every run of its own data and settings opens."""
    config, store = shared
    before = _contents(store)
    other = dataclasses.replace(config, max_length=12, rebuild=True, cache_dir=str(store))
    with pytest.raises(ConfigError, match=rf"^token store {store}: made for other data or settings than this run's "
                                          r"\(data.max_length: store 16, this run 12\)\. It is shared .* never rebuilt "
                                          r"for one run \(not even with data.rebuild=true\)\. Fix: leave "
                                          "data.cache_dir unset"):  # fmt: skip
        load_prepared(other, byte_tokenizer, store)
    assert _contents(store) == before
    (store / "manifest.json").unlink()  # an unfinished build (interrupted, or another process's) of other settings
    before = _contents(store)
    with pytest.raises(ConfigError, match=rf"^token store {store}: an unfinished build there .*data.shard_rows: store "
                                          "20, this run 10.* never replaced for one run"):  # fmt: skip
        load_prepared(dataclasses.replace(config, shard_rows=10, rebuild=True), byte_tokenizer, store)
    assert _contents(store) == before


def test_a_damaged_shared_store_is_rebuilt_when_asked(shared, byte_tokenizer):
    """Its data and settings are this run's: replacing it gives every run of them the same pairs again."""
    config, store = shared
    (store / rows_name(1)).write_bytes(b"short")
    with pytest.raises(ConfigError, match=rf"{rows_name(1)} has changed size"):
        load_prepared(config, byte_tokenizer, store)
    rebuilt = load_prepared(dataclasses.replace(config, rebuild=True), byte_tokenizer, store)
    assert len(rebuilt.pairs) == 50 and rebuilt.verify() is None


def test_a_shard_whose_every_row_is_dropped(byte_tokenizer, tmp_path):
    """Its files hold no pair and every drop; the store reads like in-memory preparation."""
    path = tmp_path / "pairs.jsonl"
    rows = [{"prompt": f"q{i}", "chosen": "same" if i < 4 else "yes", "rejected": "same" if i < 4 else "no"}
            for i in range(6)]  # fmt: skip
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    _same_as_prepare(DataConfig(str(path), shard_rows=2), byte_tokenizer, tmp_path / "store")


def _allocated_peak(function) -> int:
    tracemalloc.start()
    try:
        function()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.fixture(scope="module")
def two_sizes(tmp_path_factory, byte_tokenizer):
    """Stores of 2,000 and 20,000 pairs of the same shape, in shards of the same size (a reader's checksum pass
    reads a shard in blocks of up to 1 MiB: a constant, the same at any dataset size)."""
    stores = {}
    for count in (2_000, 20_000):
        directory = tmp_path_factory.mktemp(f"pairs{count}")
        path = directory / "pairs.jsonl"
        row = '{{"prompt": "question number {0} about the weather", "chosen": "sunny {0}", "rejected": "rain {0}"}}\n'
        path.write_text("".join(row.format(i) for i in range(count)))
        config = DataConfig(str(path), shard_rows=500)
        load_prepared(config, byte_tokenizer, directory / "store")
        stores[count] = (config, directory / "store")
    return stores


@pytest.mark.slow
def test_a_reader_allocates_a_micro_batch_not_the_dataset(two_sizes, byte_tokenizer):
    """Opening the store and reading 8 micro-batches of 4 pairs, counted in bytes (tracemalloc sees numpy's and
    Python's allocations): ten times the pairs add only the manifest's entries of 36 more shards (under 128 KiB,
    where ten times the pairs in memory would add megabytes), and the whole is a small fraction of what in-memory
    preparation holds for the smaller dataset."""

    def open_and_read(count):
        config, directory = two_sizes[count]
        pairs = load_prepared(config, byte_tokenizer, directory).pairs
        for step in range(8):
            [pairs[i] for i in range(step * 997 % count, count, count // 4)][:4]

    peaks = {count: _allocated_peak(lambda: open_and_read(count)) for count in two_sizes}
    in_memory = _allocated_peak(lambda: prepare(two_sizes[2_000][0], byte_tokenizer))
    assert abs(peaks[20_000] - peaks[2_000]) < 128 * 1024, peaks
    assert peaks[2_000] < in_memory / 4, (peaks, in_memory)


@pytest.mark.slow
def test_training_sees_the_same_pairs_in_the_same_order_as_before_the_store(shared_data, stories_tokenizer, tmp_path):
    """The held-out split and the step order of the store path equal the old in-memory path (prepare, a held-out
    set drawn by torch.randperm(seed + 10007), then filtered in input order), written here as the oracle."""
    config = DataConfig(str(shared_data.joinpath(*HH)), max_length=128, shard_rows=500)
    memory = prepare(config, stories_tokenizer).pairs
    order = torch.randperm(len(memory), generator=torch.Generator().manual_seed(10_007 + 3))
    held = set(order[: math.floor(len(memory) * 0.05)].tolist())
    old_train = [p for i, p in enumerate(memory) if i not in held]
    old_eval = [p for i, p in enumerate(memory) if i in held]

    stored = load_prepared(config, stories_tokenizer, tmp_path / "store").pairs
    train_positions, eval_positions = split_held_out(len(stored), 0.05, seed=3)
    train, held_out = PairView(stored, train_positions), PairView(stored, eval_positions)
    assert list(held_out) == old_eval
    sampler = Split(len(train), 4, 2, 2, seed=3)
    for step in (0, 1, sampler.steps_per_epoch + 5):
        for rank in (0, 1):
            for indices in sampler.micro_batches(step, rank):
                assert [train[i] for i in indices] == [old_train[i] for i in indices]


def test_a_store_of_an_earlier_format_counts_as_gone_for_a_resume(built):
    """A run resumed after an upgrade that changed the store's layout (STORE_FORMAT) must not be refused for it:
    its recorded store is passed over (current_manifest), and the same data make a store of this format."""
    from dpo_scale.data.store import MANIFEST, current_manifest

    directory = built[1]
    assert current_manifest(directory) is not None
    manifest = json.loads((directory / MANIFEST).read_text())
    del manifest["fingerprint"]["store_format"]  # as written before the prompt heads were kept
    (directory / MANIFEST).write_text(json.dumps(manifest))
    assert current_manifest(directory) is None

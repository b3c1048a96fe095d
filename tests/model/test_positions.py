"""model.py's position limit: every command that runs a model over pairs refuses, before any weights load, what
would go past the positions the model takes (learned positions fail with an IndexError there, rotary ones score
positions they never trained on), naming the config key and data.max_length."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch
import yaml
from transformers import BloomConfig, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlavaConfig

from dpo_scale.config import ConfigError, DataConfig, LogpsConfig, ModelConfig
from dpo_scale.data import Pair, load_prepared
from dpo_scale.commands.demo import ANIMALS, PLACES, write_tokenizer
from dpo_scale.model.layout import collate
from dpo_scale.model.positions import PositionLimit, position_limit, positions_needed
from launch import DPO_SCALE
from tiny import random_pairs

LAYOUTS = {
    "padded": LogpsConfig(prefix_sharing=False, packing=False),
    "packed": LogpsConfig(prefix_sharing=False, packing=True),
    "prefix_shared": LogpsConfig(prefix_sharing=True, packing=False),
    "prefix_shared+packed": LogpsConfig(prefix_sharing=True, packing=True, pack_length=40),
}


@pytest.mark.parametrize("length_multiple", [1, 2], ids=["whole rows", "sequence parallel 2"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_positions_needed_is_what_the_layouts_compute(layout, length_multiple):
    """The largest position id a batch holds, plus one, is its longest pair's positions_needed: per pair and for a
    batch, in every layout, with rows padded for sequence parallelism (the padding sits at position 0)."""
    pairs = random_pairs(8, 97, seed=4, max_len=12) + [Pair(8, "no prompt", [], [5, 6, 7], [8])]
    config = LAYOUTS[layout]
    for pair in pairs:
        assert collate([pair], config, 0, length_multiple).position_ids.max() + 1 == positions_needed(pair)
    assert collate(pairs, config, 0, length_multiple).position_ids.max() + 1 == max(map(positions_needed, pairs))


def test_the_limit_is_read_under_the_name_the_models_config_gives_it(tmp_path):
    """GPT-2 calls it n_positions, Llama max_position_embeddings, a multimodal model has it in its text config;
    Bloom (ALiBi) declares none. Only config.json is read: the directories hold no weights."""
    configs = {
        "gpt2": (GPT2Config(n_positions=128), ("n_positions", 128)),
        "llama": (LlamaConfig(max_position_embeddings=512), ("max_position_embeddings", 512)),
        "llava": (LlavaConfig(text_config=LlamaConfig(max_position_embeddings=300).to_dict()),
                  ("max_position_embeddings", 300)),  # fmt: skip
        "bloom": (BloomConfig(), ("max_position_embeddings", None)),
    }
    for name, (config, (key, size)) in configs.items():
        config.save_pretrained(tmp_path / name)
        limit = position_limit(ModelConfig(str(tmp_path / name)))
        assert (limit.key, limit.size) == (key, size), name


def test_refusals_name_the_key_the_setting_and_the_fix():
    limit = PositionLimit("models/gpt2", "n_positions", 128)
    limit.check_max_length(None)
    limit.check_max_length(128)
    with pytest.raises(ConfigError, match=r"^data.max_length=129 is more than the 128 positions model.path="
                                          r"models/gpt2 takes \(n_positions=128\): set data.max_length <= 128 "
                                          r"\(data.truncation_mode"):  # fmt: skip
        limit.check_max_length(129)
    fits = Pair(0, "d.jsonl line 1", [3] * 100, [4] * 28, [5])
    limit.check_pairs([fits])
    longest = Pair(2, "d.jsonl line 3", [3] * 100, [4], [5] * 40)
    with pytest.raises(ConfigError, match=r"^2 of 3 pairs need more than the 128 positions model.path=models/gpt2 "
                                          r"takes \(n_positions=128\); the longest, d.jsonl line 3, needs 140 .*: set "
                                          r"data.max_length <= 128"):  # fmt: skip
        limit.check_pairs([fits, Pair(1, "d.jsonl line 2", [3] * 100, [4] * 29, [5]), longest])
    limit.check_generation([[3] * 64], 64, "generation.max_new_tokens")
    with pytest.raises(ConfigError, match=r"^generation.max_new_tokens=64 after the longest prompt to sample "
                                          r"from \(100 tokens\) needs 164 positions, .*: lower "
                                          r"generation.max_new_tokens to 28 or"):  # fmt: skip
        limit.check_generation([[3] * 10, [3] * 100], 64, "generation.max_new_tokens")
    unlimited = PositionLimit("models/bloom", "max_position_embeddings", None)
    unlimited.check_max_length(10**6)
    unlimited.check_pairs([longest])
    unlimited.check_generation([[3] * 100], 10**6, "generation.max_new_tokens")


def _write_rows(path: Path, prompt_words: list[int]) -> Path:
    """One pair per entry, its prompt that many words long (the demo tokenizer: one token a word, BOS first)."""
    animals = list(ANIMALS.items())
    rows = []
    for i, words in enumerate(prompt_words):
        animal, sound = animals[i % len(animals)]
        prompt = " ".join(["the", PLACES[i % len(PLACES)]] * (words // 2) + [animal, "says"])
        rows.append({"prompt": prompt, "chosen": f" {sound} loudly", "rejected": f" {animals[i - 1][1]} softly"})
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def test_a_token_store_is_measured_from_its_rows_as_its_pairs_are(tmp_path):
    """check_prepared reads a store's lengths, not its pairs: the same refusal as for the pairs read one by one."""
    tokenizer = write_tokenizer(tmp_path / "tokenizer")
    data = _write_rows(tmp_path / "pairs.jsonl", [4, 150, 10, 200, 6])
    store = load_prepared(DataConfig(str(data), num_workers=1, shard_rows=2), tokenizer, tmp_path / "store")
    assert len(store.manifest["shards"]) == 3
    longest = max(map(positions_needed, store.pairs))
    with pytest.raises(ConfigError) as from_rows:
        PositionLimit("m", "n_positions", 128).check_prepared(store)
    with pytest.raises(ConfigError) as from_pairs:
        PositionLimit("m", "n_positions", 128).check_pairs(list(store.pairs))
    assert str(from_rows.value) == str(from_pairs.value)
    assert "2 of 5 pairs need more than the 128 positions" in str(from_rows.value)
    assert f"the longest, {data} line 4, needs {longest} " in str(from_rows.value)
    PositionLimit("m", "n_positions", longest).check_prepared(store)


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory) -> tuple[Path, Path, Path]:
    """A GPT-2-style model (learned positions, n_positions=128) with the demo tokenizer; pairs of which one is 146
    positions long, and pairs short enough to sample 64 tokens after."""
    root = tmp_path_factory.mktemp("gpt2")
    model_dir = root / "model"
    tokenizer = write_tokenizer(model_dir)
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=128, n_embd=32, n_layer=2, n_head=4, bos_token_id=1,
                        eos_token_id=2, pad_token_id=0)  # fmt: skip
    GPT2LMHeadModel(config).save_pretrained(model_dir)
    return model_dir, _write_rows(root / "long.jsonl", [4, 140, 6, 8]), _write_rows(root / "short.jsonl", [4, 80, 6])


def _command(name: str, model_dir: Path, data: Path, tmp_path: Path) -> list[str]:
    """`dpo-scale NAME` over `data` with `model_dir`, as a user would type it."""
    if name in ("train", "precompute-ref"):
        config = tmp_path / "run.yaml"
        config.write_text(yaml.safe_dump({
            "model": {"path": str(model_dir)}, "data": {"path": str(data)}, "run_dir": str(tmp_path / "run"),
            "micro_batch_size": 1, "max_steps": 1, "logging": {"progress_bar": False},
            "reference": {"cache_dir": str(tmp_path / "cache")},
        }))  # fmt: skip
        return [DPO_SCALE, name, "--config", str(config)]
    out = str(tmp_path / ("out.jsonl" if name == "logps" else "out.json"))
    if name == "eval":
        return [DPO_SCALE, "eval", "--policy", str(model_dir), f"reference={model_dir}", "--data", str(data),
                "--out", out]  # fmt: skip
    return [DPO_SCALE, name, "--model", str(model_dir), "--data", str(data), "--out", out]


def _refused(result: subprocess.CompletedProcess, command: str) -> str:
    """The one-line refusal of a command that exited 2 without a traceback."""
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    refusals = [line for line in result.stderr.splitlines() if line.startswith(f"dpo-scale {command}: error: ")]
    assert len(refusals) == 1, result.stderr[-3000:]
    return refusals[0]


@pytest.mark.slow
@pytest.mark.parametrize("command", ["logps", "train", "precompute-ref", "ref-drift", "eval"])
def test_pairs_longer_than_the_model_takes_are_refused_by_every_command(gpt2, tmp_path, command):
    """data.max_length unset: the data's longest pair (146 positions) decides. It ended in `IndexError: index out of
    range in self` (learned positions) once the model had loaded; now the refusal comes before any weights load."""
    model_dir, long_pairs, _ = gpt2
    result = subprocess.run(_command(command, model_dir, long_pairs, tmp_path), capture_output=True, text=True,
                            timeout=300)  # fmt: skip
    refusal = _refused(result, command)
    assert f"1 of 4 pairs need more than the 128 positions model.path={model_dir} takes (n_positions=128)" in refusal
    assert f"the longest, {long_pairs} line 2, needs 146 " in refusal and "set data.max_length <= 128" in refusal
    assert "holds" not in result.stdout  # no rank loaded the policy


@pytest.mark.slow
def test_max_length_past_the_limit_is_refused_before_the_data_is_prepared(gpt2, tmp_path):
    model_dir, long_pairs, _ = gpt2
    command = [*_command("logps", model_dir, long_pairs, tmp_path), "data.max_length=256"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert _refused(result, "logps") == (
        f"dpo-scale logps: error: data.max_length=256 is more than the 128 positions model.path={model_dir} takes "
        "(n_positions=128): set data.max_length <= 128 (data.truncation_mode picks the end that is cut)"
    )
    assert "pairs kept" not in result.stdout  # refused before preparing the data
    # the fix the message gives works
    fixed = subprocess.run([*command[:-1], "data.max_length=128"], capture_output=True, text=True, timeout=300)
    assert fixed.returncode == 0, fixed.stderr[-3000:]
    assert len((tmp_path / "out.jsonl").read_text().splitlines()) == 4


@pytest.mark.slow
def test_sampling_past_the_limit_is_refused_before_the_models_load(gpt2, tmp_path):
    """eval's generations: the longest prompt to sample from (83 tokens) + generation.max_new_tokens=64 > 128."""
    model_dir, _, short_pairs = gpt2
    command = [*_command("eval", model_dir, short_pairs, tmp_path), "generation.num_prompts=3"]
    refusal = _refused(subprocess.run(command, capture_output=True, text=True, timeout=300), "eval")
    assert ("generation.max_new_tokens=64 after the longest prompt to sample from (83 tokens) needs 147 positions, "
            f"more than the 128 model.path={model_dir} takes (n_positions=128): lower generation.max_new_tokens to "
            "45 or less") in refusal  # fmt: skip

"""`dpo-scale eval`: held-out metrics reproduce training's own eval, generations are scored exactly, user rewards."""

import json
import math
import subprocess
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM

from dpo_scale.cli import main
from dpo_scale.commands.demo import write_demo_material, write_model, write_tokenizer
from dpo_scale.commands.eval import distinct_n, generate, load_reward_fn, run_eval, samples_path, sequence_logps
from dpo_scale.config import ConfigError, EvalRunConfig, GenerationConfig, LogpsConfig, build
from dpo_scale.data import load_tokenizer
from launch import DPO_SCALE, base_config, train, train_metrics
from uneven_pairs import write_uneven_material


@pytest.fixture(scope="module")
def material(tmp_path_factory):
    return write_demo_material(tmp_path_factory.mktemp("demo"), rows=96)


@pytest.fixture(scope="module")
def trained_run(material, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("eval") / "run"
    tree = base_config(material, run_dir, max_steps=10, eval={"every": 5, "fraction": 0.25})
    tree["optim"]["lr"] = 0.003
    result = train(tree)
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir


REWARD_FILE = '''
def count_baa(prompts, completions):
    return [completion.count("baa") for completion in completions]
'''


@pytest.mark.slow
def test_eval_of_a_run_reproduces_its_last_training_eval(trained_run, tmp_path):
    """Same held-out pairs (the run's split), same weights (the consolidated checkpoint), same loss: the numbers
    training logged at its last eval come back."""
    out = tmp_path / "eval.json"
    result = run_eval(build(EvalRunConfig, {"policy": str(trained_run), "out": str(out), "generation": {"num_prompts": 0}}))
    logged = train_metrics(trained_run, split="eval")[-1]
    for key in ("loss", "rewards/accuracies", "rewards/margins", "rewards/chosen", "logps/chosen", "logps/rejected"):
        assert result["preference"][key] == pytest.approx(logged[key], abs=1e-5), key
    assert result["preference"]["pairs"] == logged["pairs"] == 24
    assert json.loads(out.read_text()) == result
    one_checkpoint = {"policy": str(trained_run / "checkpoints" / "step-00000010"), "out": str(tmp_path / "c.json"),
                      "generation": {"num_prompts": 0}}  # fmt: skip
    assert run_eval(build(EvalRunConfig, one_checkpoint))["preference"] == result["preference"]
    assert "No generations" in out.with_suffix(".samples.md").read_text()


@pytest.mark.slow
def test_training_scores_every_held_out_pair_and_eval_of_the_run_reports_the_same(material, tmp_path):
    """24 held-out pairs on 2 ranks of micro-batch 5: rounds of 10, the last one 4 pairs on replica 0 and none on
    replica 1, which still runs its forwards (ZeRO-3 gathers weights collectively) and keeps nothing. Training used
    to score whole rounds only (20 pairs, "4 held-out pairs are not scored") while `dpo-scale eval --policy RUN`
    scored all 24. Now both score all 24 and report the same loss: per-pair means of the same values, batched
    differently, so only fp32 rounding differs (1e-5)."""
    run_dir = tmp_path / "run"
    tree = base_config(material, run_dir, micro_batch_size=5, max_steps=4, eval={"every": 2, "fraction": 0.25})
    trained = train(tree, ranks=2)
    assert trained.returncode == 0, trained.stdout[-2000:] + trained.stderr[-3000:]
    assert "not scored" not in trained.stdout
    logged = train_metrics(run_dir, split="eval")
    assert [row["pairs"] for row in logged] == [24.0, 24.0]
    out = tmp_path / "eval.json"
    evaluated = subprocess.run([DPO_SCALE, "eval", "--policy", str(run_dir), "--out", str(out),
                                "generation.num_prompts=0"], capture_output=True, text=True, timeout=300)  # fmt: skip
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    scored = json.loads(out.read_text())["preference"]
    assert scored["pairs"] == 24
    for key in ("loss", "rewards/accuracies", "rewards/margins", "logps/chosen", "logps/rejected"):
        assert scored[key] == pytest.approx(logged[-1][key], abs=1e-5), key


@pytest.mark.slow
def test_eval_against_a_reference_cache_matches_the_reference_model(trained_run, tmp_path):
    """The cache made by precompute-ref for the run's config gives the held-out metrics the reference model gives
    (fp32 rounding across batch compositions only); a cache for other data is refused by its fingerprint."""
    config = yaml.safe_load((trained_run / "config.yaml").read_text())
    config["reference"]["cache_dir"] = str(tmp_path / "cache")
    (tmp_path / "pre.yaml").write_text(yaml.safe_dump(config))
    made = subprocess.run([DPO_SCALE, "precompute-ref", "--config", str(tmp_path / "pre.yaml")], capture_output=True,
                          text=True, timeout=300)  # fmt: skip
    assert made.returncode == 0, made.stderr[-2000:]
    settings = {"policy": str(trained_run), "generation": {"num_prompts": 0}}
    online = run_eval(build(EvalRunConfig, {**settings, "out": str(tmp_path / "online.json")}))
    cached = run_eval(build(EvalRunConfig, {**settings, "out": str(tmp_path / "cached.json"),
                                            "reference_cache": str(tmp_path / "cache")}))  # fmt: skip
    for key, value in online["preference"].items():
        assert cached["preference"][key] == pytest.approx(value, abs=1e-5), key
    other_data = {**settings, "out": str(tmp_path / "x.json"), "reference_cache": str(tmp_path / "cache"),
                  "data": {"path": config["data"]["path"], "max_length": 100}}  # fmt: skip
    with pytest.raises(ConfigError, match="data.max_length: cache null, this run 100"):
        run_eval(build(EvalRunConfig, other_data))


def test_policy_equal_to_reference_has_zero_kl_and_half_the_wins(material, tmp_path):
    """The untrained model against itself: identical samples (same seed), every log-ratio exactly 0, KL 0, equal
    diversity, reward win rate 0.5 (all ties)."""
    model_dir, data_path = material
    rewards = tmp_path / "rewards.py"
    rewards.write_text(REWARD_FILE)
    config = build(EvalRunConfig, {
        "policy": str(model_dir), "reference": str(model_dir), "data": {"path": str(data_path)}, "num_pairs": 8,
        "out": str(tmp_path / "self.json"),
        "generation": {"num_prompts": 4, "samples_per_prompt": 3, "max_new_tokens": 10,
                       "reward_fn": f"{rewards}:count_baa"},
    })  # fmt: skip
    result = run_eval(config)
    generation = result["generation"]
    assert generation["samples"] == 12 and generation["kl"] == 0.0 and generation["kl_unbiased"]
    assert generation["distinct_2"] == generation["reference_distinct_2"]
    assert generation["win_rate"] == 0.5 and generation["reward"] == generation["reference_reward"]
    assert result["preference"]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    table = (tmp_path / "self.samples.md").read_text().splitlines()
    assert table[0].startswith("| # | prompt | policy | reference | log-ratio | reward |") and len(table) == 2 + 12


def test_samples_scored_two_per_prompt_equal_scoring_each_alone(material):
    """The prefix-shared scoring of samples (3 per prompt: a pair and an odd one out) gives each sample's summed
    log-prob as a plain full-logits forward of prompt + sample does."""
    model_dir, _ = material
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    tokenizer = load_tokenizer(str(model_dir))
    prompts = [[5, 6, 7], [8, 9]]
    completions = [[10, 11, 2], [12, 2], [13, 14, 15, 2], [16, 2], [17, 18], [19, 20, 21]]
    scored = sequence_logps(model, prompts, completions, 3, LogpsConfig(), tokenizer, torch.device("cpu"))
    for index, completion in enumerate(completions):
        ids = torch.tensor([prompts[index // 3] + completion])
        with torch.no_grad():
            logps = model(ids).logits.log_softmax(-1)[0, :-1].gather(-1, ids[0, 1:, None])[:, 0]
        assert scored[index] == pytest.approx(logps[-len(completion) :].sum().item(), abs=1e-4), index


def test_generation_leaves_the_callers_random_state_alone(material):
    """Training samples at its evaluations: that must not move the run's own RNG (resume saves and restores it)."""
    model_dir, _ = material
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    torch.manual_seed(123)
    before = torch.get_rng_state()
    generate(model, [[5, 6, 7]], GenerationConfig(max_new_tokens=4), load_tokenizer(str(model_dir)), torch.device("cpu"))
    assert torch.equal(torch.get_rng_state(), before)


def test_distinct_n():
    assert distinct_n([[1, 2, 3], [1, 2, 4]], 1) == pytest.approx(4 / 6)
    assert distinct_n([[1, 2, 3], [1, 2, 4]], 2) == pytest.approx(3 / 4)
    assert distinct_n([[1], []], 2) == 0.0


def test_reward_function_refusals(tmp_path):
    with pytest.raises(ConfigError, match="expected module:function"):
        GenerationConfig(reward_fn="nocolon")
    with pytest.raises(ConfigError, match="no such file"):
        load_reward_fn(f"{tmp_path}/missing.py:f")
    with pytest.raises(ConfigError, match="cannot import no_such_module_xyz"):
        load_reward_fn("no_such_module_xyz:f")
    rewards = tmp_path / "r.py"
    rewards.write_text(REWARD_FILE)
    with pytest.raises(ConfigError, match="has no function missing"):
        load_reward_fn(f"{rewards}:missing")
    assert load_reward_fn(f"{rewards}:count_baa")(["p"], ["baa baa"]) == [2]


@pytest.mark.slow
def test_cli_eval_prints_and_refuses_a_model_without_reference(material, trained_run, tmp_path, capsys):
    out = tmp_path / "cli.json"
    assert main(["eval", "--policy", str(trained_run), "--out", str(out), "generation.num_prompts=2",
                 "generation.max_new_tokens=4"]) == 0  # fmt: skip
    printed = capsys.readouterr().out
    assert "pairs: loss" in printed and "generations: prompts 2" in printed and out.exists()
    assert main(["eval", "--policy", str(material[0]), "--out", str(tmp_path / "x.json")]) == 2
    assert "set reference=DIR" in capsys.readouterr().err
    config = tmp_path / "eval.yaml"
    config.write_text(yaml.safe_dump({"policy": str(material[0]), "reference": str(material[0]), "out": "o.json"}))
    assert main(["eval", "--config", str(config)]) == 2
    assert "no held-out pairs: pass --data FILE (data.path)" in capsys.readouterr().err


def test_readme_names_the_samples_file_eval_writes():
    """The README's example file name is the one run_eval writes (and the command prints)."""
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    assert samples_path("eval/hh.json") == Path("eval/hh.samples.md")
    assert "`--out eval/hh.json` writes `eval/hh.samples.md`" in readme


@pytest.mark.slow
def test_batch_tokens_scores_the_same_pairs_the_same_and_refuses_a_pair_over_it(tmp_path):
    """`batch_tokens=60`: forwards of as many consecutive held-out pairs as fit 60 positions (1 to 3 of these uneven
    pairs) give the metrics of fixed forwards of 4 (per-pair means of per-pair values: fp32 rounding, 1e-5) for a
    policy other than its reference. A pair that alone needs more than batch_tokens is refused in one line, with
    the size to raise it to, before anything is written."""
    model_dir, data_path = write_uneven_material(tmp_path / "demo", rows=40)
    policy = tmp_path / "policy"
    write_model(policy, vocab_size=len(write_tokenizer(policy)), seed=1)
    common = [DPO_SCALE, "eval", "--policy", str(policy), f"reference={model_dir}", "--data", str(data_path),
              "generation.num_prompts=0"]  # fmt: skip
    scored = {}
    for name, options in {"fixed": ["batch_size=4"], "budget": ["batch_tokens=60"]}.items():
        result = subprocess.run([*common, "--out", str(tmp_path / f"{name}.json"), *options], capture_output=True,
                                text=True, timeout=300)  # fmt: skip
        assert result.returncode == 0, result.stderr[-3000:]
        scored[name] = json.loads((tmp_path / f"{name}.json").read_text())["preference"]
    assert scored["fixed"]["pairs"] == scored["budget"]["pairs"] == 40
    assert abs(scored["fixed"]["rewards/chosen"]) > 0.01  # the policy is not its reference: the values are not trivial
    for key, value in scored["fixed"].items():
        assert scored["budget"][key] == pytest.approx(value, abs=1e-5), key

    refused = subprocess.run([*common, "--out", str(tmp_path / "refused.json"), "batch_tokens=20"],
                             capture_output=True, text=True, timeout=300)  # fmt: skip
    assert refused.returncode == 2
    assert refused.stderr.strip().endswith(
        "of 40 held-out pairs need more than batch_tokens=20 positions on their own (the longest 34, as the layout "
        "computes them): raise batch_tokens to 34 or more, or lower data.max_length"
    ), refused.stderr[-2000:]
    assert not (tmp_path / "refused.json").exists()

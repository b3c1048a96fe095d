"""`dpo-scale eval`: is the trained policy better, or only further from its reference?

Two views, one process, one device (no DeepSpeed: a checkpoint's consolidated weights are loaded whole):

- held-out preference pairs: the DPO loss and its reward metrics against the reference (its model, or a cache),
  scored by the training log-prob stage;
- sampled generations from the policy and from the reference for the same prompts: mean length, distinct-1 /
  distinct-2, a sequence-level KL(policy || reference) estimate, and an optional user reward with its win rate
  against the reference's samples.

KL estimate: for samples y ~ policy(.|x), KL = E[log policy(y|x) - log reference(y|x)], both sums over the sampled
tokens (EOS included) at temperature 1. It is unbiased only when sampling is plain (temperature 1, top_p 1,
top_k 0); otherwise the JSON says so. Samples are scored two per prompt as one prefix-shared "pair", the same path
as training.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import sys
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import torch

from dpo_scale.config import (
    ConfigError, EvalRunConfig, GenerationConfig, LossConfig, ModelConfig, TrainConfig, build,
)  # fmt: skip
from dpo_scale.data import (
    Pair, PairView, lengths_of, load_prepared, load_tokenizer, padding_id, run_tokenizer, split_held_out,
    store_directory,
)  # fmt: skip
from dpo_scale.data.build import store_differences
from dpo_scale.data.store import TokenStore, current_manifest
from dpo_scale.hub import check_model_source
from dpo_scale.io import atomic_open
from dpo_scale.loss import build_preference_loss, preference_metrics
from dpo_scale.model.generation import distinct_n, generate
from dpo_scale.model.layout import collate
from dpo_scale.model.positions import PositionLimit, position_limit
from dpo_scale.model.wrapper import PairLogpsModel, check_attention_device, load_causal_lm
from dpo_scale.reference.cache import open_cache
from dpo_scale.reference.sources import CachedReference
from dpo_scale.training.batch_plan import check_batch_tokens, forward_batches, scored_chosen_tokens
from dpo_scale.training.checkpoint import is_checkpoint, saved_config

RewardFn = Callable[[list[str], list[str]], list[float]]


def run_eval(config: EvalRunConfig) -> dict:
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if config.device == "auto" else config.device)
    dtype = getattr(torch, config.dtype)
    check_attention_device(config.logps, device)
    check_model_source(config.policy, "policy", "give a run directory, one of its checkpoints or a model directory")
    if config.reference:
        check_model_source(config.reference, "reference", "give the model directory or hub id the policy started from")
    run = _run_config(config.policy)
    reference_path = config.reference or (run.model.path if run else None)
    if reference_path is None:
        raise ConfigError(f"policy={config.policy} is a model directory: set reference=DIR (the model it started from)")
    limits = _position_limits(config, run, reference_path)
    data_config = config.data or (run.data if run else None)
    for limit in limits:
        limit.check_max_length(data_config.max_length if data_config else None)
    tokenizer = run_tokenizer(run.data, run.model.path) if run else load_tokenizer(config.policy, "policy")
    reward_fn = load_reward_fn(config.generation.reward_fn) if config.generation.reward_fn else None
    pairs = _held_out_pairs(config, run, tokenizer)
    prompts = _prompts(config.generation, pairs, tokenizer) if config.generation.num_prompts else []
    for limit in limits:
        limit.check_pairs(pairs)
        limit.check_generation(prompts, config.generation.max_new_tokens, "generation.max_new_tokens")
    check_batch_tokens(lengths_of(pairs), config.batch_tokens, config.logps, "held-out pairs",
                       "data.max_length" if config.data else None)  # fmt: skip
    loss_config = config.loss or (run.loss if run else LossConfig())

    policy = _load_policy(config.policy).to(device=device, dtype=dtype).eval()
    reference = load_causal_lm(ModelConfig(reference_path, dtype=config.dtype)).to(device).eval()
    result: dict = {
        "policy": config.policy, "reference": reference_path, "reference_cache": config.reference_cache,
        "loss_type": loss_config.loss_type, "beta": loss_config.beta,
    }  # fmt: skip
    cache = None
    if config.reference_cache:
        made_with = ModelConfig(reference_path, dtype=config.dtype)
        reader = open_cache(config.reference_cache, made_with, config.data or run.data, tokenizer)
        cache = CachedReference(reader, shared_sums=loss_config.ld_alpha is not None)
    result["preference"] = score_pairs(policy, reference, pairs, config, loss_config, tokenizer, device, cache)
    samples: list[dict] = []
    if config.generation.num_prompts:
        result["generation"], samples = evaluate_generations(
            policy, reference, prompts, config.generation, config.logps, tokenizer, device, reward_fn
        )
    out = Path(config.out)
    with atomic_open(out) as handle:
        json.dump(result, handle, indent=2)
    with atomic_open(samples_path(out)) as handle:
        handle.write(samples_table(samples))
    return result


def samples_path(out: str | Path) -> Path:
    """The samples table beside the output JSON: its suffix replaced (eval/hh.json -> eval/hh.samples.md)."""
    return Path(out).with_suffix(".samples.md")


def _is_run(path: str) -> bool:
    return (Path(path) / "checkpoints").is_dir() or is_checkpoint(path)


def _run_config(path: str) -> TrainConfig | None:
    """The TrainConfig of a run or checkpoint directory, from its checkpoint's JSON (no weights read); None for a
    model directory."""
    from dpo_scale.training.trained_policy import latest_checkpoint

    return build(TrainConfig, saved_config(latest_checkpoint(path))) if _is_run(path) else None


def _load_policy(path: str) -> torch.nn.Module:
    """The policy's weights: a run's latest checkpoint (LoRA merged), one checkpoint, or a model directory."""
    from dpo_scale.training.trained_policy import load_trained_policy

    return load_trained_policy(path, merge_lora=True)[0] if _is_run(path) else load_causal_lm(ModelConfig(path))


def _position_limits(config: EvalRunConfig, run: TrainConfig | None, reference_path: str) -> list[PositionLimit]:
    """The positions the policy and the reference take (one model's when both are the run's base), from their
    config.json: eval refuses what either cannot score or sample before loading any weights."""
    policy = run.model if run else ModelConfig(config.policy)
    reference = ModelConfig(reference_path, dtype=config.dtype)
    models = {model.path: model for model in (reference, policy)}  # one path: the run's settings win
    return [position_limit(model) for model in models.values()]


def _held_out_pairs(config: EvalRunConfig, run, tokenizer) -> list[Pair]:
    if config.data is not None:
        pairs = load_prepared(config.data, tokenizer, config.data.cache_dir).pairs
    elif run is not None and run.eval.every and run.eval.fraction:
        stored = _run_store(config.policy, run, tokenizer).pairs
        pairs = PairView(stored, split_held_out(len(stored), run.eval.fraction, run.seed)[1])
    else:
        raise ConfigError(
            "no held-out pairs: pass --data FILE (data.path), a preference file to score"
            + (" (the run held none out: eval.every was 0)" if run else " (--policy is a model directory, not a run)")
        )
    return pairs[: config.num_pairs]


def _run_store(policy: str, run, tokenizer) -> TokenStore:
    """The token store the run trained on (its config names it), whose positions the held-out split picks; built
    again in its own place under the cache root when it is gone. Never rebuilt or replaced here."""
    data = replace(run.data, rebuild=False)
    recorded = Path(data.cache_dir) if data.cache_dir else None
    if recorded is None or current_manifest(recorded) is None:
        data = replace(data, cache_dir=None)
    directory = store_directory(data, tokenizer, run.run_dir)
    differences = store_differences(directory, data, tokenizer)
    if differences:
        raise ConfigError(
            f"policy={policy}: the token store the run trained on, {directory}, no longer matches the run's data and "
            f"settings ({'; '.join(differences)}), so the pairs it held out cannot be picked out again. Fix: score "
            "held-out pairs of your own with --data FILE, or restore the data the run trained on (its config.yaml "
            "names it)"
        )
    return load_prepared(data, tokenizer, directory)


@torch.no_grad()
def score_pairs(policy, reference, pairs, config: EvalRunConfig, loss_config, tokenizer, device,
                cache: CachedReference | None = None) -> dict[str, float]:  # fmt: skip
    """Per-pair means of the training metrics (loss, rewards, margins, accuracies, log-probs) over `pairs`, in
    forwards of config.batch_size pairs or as many as fit config.batch_tokens; the reference's log-probs from
    `cache` when there is one."""
    if not pairs:
        return {"pairs": 0}
    pad = padding_id(tokenizer)
    policy_scorer = PairLogpsModel(policy, config.logps, weighting=loss_config.use_weighting)
    reference_scorer = PairLogpsModel(reference, config.logps)
    loss_fn = build_preference_loss(loss_config)
    sums: dict[str, float] = {}
    lengths = lengths_of(pairs)
    chosen_tokens_per_pair = float(scored_chosen_tokens(lengths).mean())  # the SFT term's token mean: over them all
    for indices in forward_batches(lengths, config.batch_tokens, config.logps, max_pairs=config.batch_size):
        chunk = pairs[indices[0] : indices[-1] + 1]
        batch = collate(chunk, config.logps, pad).to(device)
        policy_logps = policy_scorer(batch)
        reference_logps = cache.logps(batch) if cache is not None else reference_scorer(batch)
        output = loss_fn(policy_logps, reference_logps, chosen_tokens_per_pair)
        for key, value in preference_metrics(output, policy_logps).items():
            sums[key] = sums.get(key, 0.0) + value.item() * len(chunk)
    metrics = {key: value / len(pairs) for key, value in sums.items()}
    metrics["pairs"] = len(pairs)
    return metrics


def _prompts(settings: GenerationConfig, pairs: list[Pair], tokenizer) -> list[list[int]]:
    if settings.prompts is None:
        prompts = [pair.prompt_ids for pair in pairs]
    else:
        path = Path(settings.prompts)
        if not path.is_file():
            raise ConfigError(f"generation.prompts={path}: no such file (a .txt, one prompt per line, or .jsonl)")
        if path.suffix == ".jsonl":
            texts = []
            for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
                if line.strip():
                    row = json.loads(line)
                    if not isinstance(row, dict) or not isinstance(row.get("prompt"), str):
                        raise ConfigError(f"{path} line {number}: expected an object with a \"prompt\" string")
                    texts.append(row["prompt"])
        else:
            texts = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        prompts = [tokenizer(text)["input_ids"] for text in texts]
    return prompts[: settings.num_prompts]


@torch.no_grad()
def sequence_logps(model, prompts: list[list[int]], completions: list[list[int]], samples: int, logps_config, tokenizer,
                   device) -> list[float]:  # fmt: skip
    """log model(completion | prompt), summed over the completion's tokens, for each completion (prompt-major).

    Two samples of one prompt go in as the chosen and rejected of one pair, so their prompt is computed once; an
    odd one out is paired with itself."""
    scorer = PairLogpsModel(model, logps_config)
    units: list[tuple[Pair, int | None]] = []  # the pair, and the index of its second sample
    for number, prompt in enumerate(prompts):
        for first in range(number * samples, (number + 1) * samples, 2):
            second = first + 1 if first + 1 < (number + 1) * samples else None
            partner = completions[first if second is None else second]
            units.append((Pair(first, f"sample {first}", prompt, completions[first], partner), second))
    scores = [0.0] * len(completions)
    for start in range(0, len(units), 8):
        chunk = units[start : start + 8]
        out = scorer(collate([pair for pair, _ in chunk], logps_config, padding_id(tokenizer)).to(device))
        for (pair, second), chosen, rejected in zip(chunk, out.chosen_logps.tolist(), out.rejected_logps.tolist()):
            scores[pair.index] = chosen
            if second is not None:
                scores[second] = rejected
    return scores


def evaluate_generations(policy, reference, prompts, settings: GenerationConfig, logps_config, tokenizer, device,
                         reward_fn: RewardFn | None) -> tuple[dict, list[dict]]:  # fmt: skip
    k = settings.samples_per_prompt
    policy_samples = generate(policy, prompts, settings, tokenizer, device)
    reference_samples = generate(reference, prompts, settings, tokenizer, device)
    policy_logps = sequence_logps(policy, prompts, policy_samples, k, logps_config, tokenizer, device)
    reference_logps = sequence_logps(reference, prompts, policy_samples, k, logps_config, tokenizer, device)
    log_ratios = [p - r for p, r in zip(policy_logps, reference_logps)]
    metrics = {
        "prompts": len(prompts),
        "samples": len(policy_samples),
        "mean_length": sum(map(len, policy_samples)) / len(policy_samples),
        "reference_mean_length": sum(map(len, reference_samples)) / len(reference_samples),
        "distinct_1": distinct_n(policy_samples, 1),
        "distinct_2": distinct_n(policy_samples, 2),
        "reference_distinct_1": distinct_n(reference_samples, 1),
        "reference_distinct_2": distinct_n(reference_samples, 2),
        "kl": sum(log_ratios) / len(log_ratios),
        "kl_unbiased": settings.temperature == 1.0 and settings.top_p == 1.0 and settings.top_k == 0,
    }
    prompt_texts = [tokenizer.decode(prompts[i // k], skip_special_tokens=True) for i in range(len(policy_samples))]
    policy_texts = [tokenizer.decode(c, skip_special_tokens=True) for c in policy_samples]
    reference_texts = [tokenizer.decode(c, skip_special_tokens=True) for c in reference_samples]
    samples = [
        {"prompt": p, "policy": c, "reference": r, "log_ratio": lr}
        for p, c, r, lr in zip(prompt_texts, policy_texts, reference_texts, log_ratios)
    ]
    if reward_fn is not None:
        policy_rewards = _call_reward(reward_fn, prompt_texts, policy_texts)
        reference_rewards = _call_reward(reward_fn, prompt_texts, reference_texts)
        wins = [1.0 if p > r else 0.5 if p == r else 0.0 for p, r in zip(policy_rewards, reference_rewards)]
        metrics.update(
            reward=sum(policy_rewards) / len(policy_rewards),
            reference_reward=sum(reference_rewards) / len(reference_rewards),
            win_rate=sum(wins) / len(wins),
        )
        for sample, p, r in zip(samples, policy_rewards, reference_rewards):
            sample.update(reward=p, reference_reward=r)
    return metrics, samples


def load_reward_fn(spec: str) -> RewardFn:
    """`package.module:function` (importable) or `path/to/file.py:function`."""
    target, _, name = spec.rpartition(":")
    try:
        if target.endswith(".py"):
            path = Path(target)
            if not path.is_file():
                raise ConfigError(f"generation.reward_fn={spec}: no such file {path}")
            module_spec = importlib.util.spec_from_file_location(f"dpo_scale_reward_{path.stem}", path)
            module = importlib.util.module_from_spec(module_spec)
            sys.modules[module_spec.name] = module
            module_spec.loader.exec_module(module)
        else:
            module = importlib.import_module(target)
    except ImportError as error:
        raise ConfigError(f"generation.reward_fn={spec}: cannot import {target} ({error})") from None
    function = getattr(module, name, None)
    if not callable(function):
        raise ConfigError(f"generation.reward_fn={spec}: {target} has no function {name}")
    return function


def _call_reward(reward_fn: RewardFn, prompts: list[str], completions: list[str]) -> list[float]:
    rewards = reward_fn(prompts, completions)
    if not hasattr(rewards, "__len__") or len(rewards) != len(completions):
        raise ConfigError(f"the reward function returned {type(rewards).__name__}, not one number per completion "
                          f"({len(completions)})")  # fmt: skip
    return [float(r) for r in rewards]


def samples_table(samples: list[dict]) -> str:
    """A markdown table of the samples, one row each, for reading."""
    if not samples:
        return "No generations (generation.num_prompts=0).\n"
    has_reward = "reward" in samples[0]
    header = "| # | prompt | policy | reference | log-ratio |" + (" reward | reference reward |" if has_reward else "")
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for number, sample in enumerate(samples):
        cells = [str(number), *(_cell(sample[k]) for k in ("prompt", "policy", "reference")), f"{sample['log_ratio']:.2f}"]
        if has_reward:
            cells += [f"{sample['reward']:.3f}", f"{sample['reference_reward']:.3f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ⏎ ").strip()

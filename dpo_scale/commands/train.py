"""`dpo-scale train`: build, train, close. The loop body is a handful of named steps.

Per optimizer step, the sampler's pairs for the step are split into micro-batches (training/batch_plan.py: a fixed
number of pairs each, or as many as fit micro_batch_tokens, balanced across replicas), and each rank runs its own:
reference log-probs, policy forward, loss, backward; then one `engine.step()`. The loss of a micro-batch is the sum
of its pairs' losses times replicas / (the step's pairs): DeepSpeed averages the gradients over the data-parallel
replicas and, the loop owning the accumulation boundary, divides by nothing else (ds_config.py), so the update is
the per-pair mean over the step's pairs whatever the split. Metrics are sums, accumulated on device and
synchronised only at the log interval.

Stopping early on purpose (a scheduler's time limit): create run_dir/stop-requested; see STOP_REQUEST.
"""

from __future__ import annotations

import os
import random
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from dpo_scale import distributed
from dpo_scale.config import ConfigError, GenerationConfig, TrainConfig, to_dict
from dpo_scale.data import (
    Pair, PairView, lengths_of, load_prepared, padding_id, run_tokenizer, split_held_out, store_directory,
)  # fmt: skip
from dpo_scale.data.build import store_differences
from dpo_scale.data.store import current_manifest
from dpo_scale.distributed.sequence_parallel import check_sequence_parallel
from dpo_scale.ds_config import AUTO, resolve_deepspeed_config, shipped_config_for, single_process_advice
from dpo_scale.io import atomic_open
from dpo_scale.loss import build_preference_loss, preference_metrics
from dpo_scale.model.generation import distinct_n, generate
from dpo_scale.model.layout import collate, sequence_parallel_multiple
from dpo_scale.model.positions import position_limit
from dpo_scale.model.wrapper import PairLogpsModel, add_lora, check_attention_device, enable_activation_checkpointing
from dpo_scale.reference.cache import open_cache
from dpo_scale.reference.drift import concatenate, drift_statistics
from dpo_scale.reference.nf4 import NF4Reference, load_nf4_reference, nf4_memory
from dpo_scale.reference.sources import AdaptersDisabled, CachedReference, FrozenCopy, ReferenceSource
from dpo_scale.training import checkpoint
from dpo_scale.training.failure_signs import FailureSigns
from dpo_scale.training.run_files import STOP_REQUEST, set_aside_earlier_run
from dpo_scale.training.batch_plan import (
    FORWARD_BUDGET_FACTOR,
    CostModel,
    FixedCount,
    StepPlan,
    TokenBudget,
    check_pairs_fit,
    forward_budget,
    scored_chosen_tokens,
)
from dpo_scale.training.sampler import StepSampler
from dpo_scale.training.tracking import MetricsLog, ProgressBar, build_tracker, print0, print_line


class NonFiniteError(RuntimeError):
    """Too many steps with a non-finite loss or gradient: the run stops with a diagnostic."""


@dataclass
class Run:
    """Everything `build` makes and `train` uses."""

    config: TrainConfig
    world: distributed.World
    sequence: distributed.SequenceGroup
    """This rank's sequence-parallel group: its ranks run the same micro-batches, one slice of every row each."""
    replica: int
    """This rank's data-parallel index (its sequence-parallel group's), which picks its micro-batches."""
    engine: object
    reference: ReferenceSource | None
    train_pairs: Sequence[Pair]
    """Read from the token store only when a micro-batch needs them."""
    eval_pairs: Sequence[Pair]
    sampler: StepSampler
    batching: FixedCount | TokenBudget
    """Splits each step's pairs into this run's micro-batches."""
    eval_batching: FixedCount | TokenBudget
    """Splits the held-out pairs into the evaluation's forwards."""
    chosen_tokens: np.ndarray
    """(training pairs,) each one's scored chosen tokens: the SFT term's mean is over the step's (loss.sft_loss)."""
    total_steps: int
    pad_token_id: int
    length_multiple: int
    """Rows are padded to a multiple of this (one equal slice per rank of a sequence-parallel group)."""
    loss_fn: object
    metrics_log: MetricsLog
    tracker: object
    tokenizer: object = None
    signs: FailureSigns = field(default_factory=FailureSigns)
    start_step: int = 0
    skipped_steps: int = 0
    history: list[dict] = field(default_factory=list)


def run(config: TrainConfig) -> list[dict]:
    """Train as `config` says; returns the logged train metrics (rank 0 has them all)."""
    world = distributed.init(config.deepspeed.timeout_s)
    try:
        state = build(config, world)
        train(state)
    except BaseException:
        # No barrier on the way out: the other ranks may be inside another collective, and waiting for them would
        # hold this rank's error back for deepspeed.timeout_s, then replace it with the barrier's timeout.
        distributed.abort()
        raise
    distributed.close()
    return state.history


def build(config: TrainConfig, world: distributed.World) -> Run:
    check_sequence_parallel(config, world.size)
    config = config.for_world(world.size)
    check_attention_device(config.logps, world.device)
    positions = position_limit(config.model)
    positions.check_max_length(config.data.max_length)
    replicas = config.data_parallel_size(world.size)  # groups of sequence_parallel_size ranks share a micro-batch
    replica = world.rank // config.sequence_parallel_size
    _seed(config.seed)
    run_dir = Path(config.run_dir)
    latest = checkpoint.latest(run_dir) if config.checkpoint.resume == "auto" else None
    tokenizer = run_tokenizer(config.data, config.model.path)
    store = _token_store(config, tokenizer, latest)
    config = replace(config, data=replace(config.data, cache_dir=str(store)))  # the saved config names the store read
    data = load_prepared(config.data, tokenizer, store)
    print0(data.summary())
    positions.check_prepared(data)
    train_positions, eval_positions = split_held_out(
        len(data.pairs), config.eval.fraction if config.eval.every else 0.0, config.seed
    )
    train_pairs, eval_pairs = PairView(data.pairs, train_positions), PairView(data.pairs, eval_positions)
    if config.eval.every and not eval_pairs:
        raise ConfigError(
            f"eval.fraction={config.eval.fraction} holds out no pair of {len(data.pairs)}: raise eval.fraction or set "
            "eval.every=0"
        )
    if config.eval.every and config.eval.generate_prompts:
        positions.check_generation(
            _generated_prompts(eval_pairs, config.eval.generate_prompts, world.size),
            config.eval.generate_max_new_tokens, "eval.generate_max_new_tokens",
        )  # fmt: skip
    sampler = StepSampler(len(train_pairs), config.global_batch(world.size), config.seed)
    if sampler.steps_per_epoch == 0:
        made_of = ("global_batch_size" if config.uses_token_budget
                   else "micro_batch_size x gradient_accumulation_steps x ranks")  # fmt: skip
        raise ConfigError(
            f"{len(train_pairs)} training pairs do not fill one global batch of {sampler.global_batch} ({made_of}): "
            "lower it or add data"
        )
    lengths = data.pair_lengths()
    train_lengths, eval_lengths = lengths[train_positions], lengths[eval_positions]
    if config.uses_token_budget:  # refused before any weights load; the exact row multiple is rechecked below
        early_multiple = sequence_parallel_multiple(config.sequence_parallel_size, config.logps.attention)
        check_pairs_fit(train_lengths, config.micro_batch_tokens, config.logps, early_multiple,
                        config.sequence_parallel_size)  # fmt: skip
        check_pairs_fit(eval_lengths, forward_budget(config), config.logps, early_multiple,
                        config.sequence_parallel_size, "held-out pairs", FORWARD_BUDGET_FACTOR)  # fmt: skip
    total_steps = sampler.steps_per_epoch * config.epochs
    if config.max_steps is not None:
        total_steps = min(total_steps, config.max_steps)
    if sampler.left_out_per_epoch:
        print0(f"{sampler.left_out_per_epoch} pairs per epoch do not fill a global batch and are left out of it")

    # Under a token budget DeepSpeed's batch sizes are nominal: the loop owns the accumulation boundary (ds_config.py)
    per_micro_batch, accumulation = (1, 1) if config.uses_token_budget else (config.micro_batch_size,
                                                                              config.gradient_accumulation_steps)
    ds_config = resolve_deepspeed_config(
        config.deepspeed, config.optim, per_micro_batch, accumulation, world.size, total_steps,
        config.sequence_parallel_size,
    )  # fmt: skip
    sequence = distributed.init_groups(config.sequence_parallel_size, ds_config)
    if sequence.size > 1:
        node = os.environ.get("SLURMD_NODENAME") or socket.gethostname()  # SLURM's name tells nodes of one host apart
        print_line(f"rank {world.rank} on node {node}: sequence-parallel group {replica} "
                   f"(ranks {replica * sequence.size}-{(replica + 1) * sequence.size - 1})")  # fmt: skip
    if latest is not None:  # before any model is loaded: a refused resume costs seconds, not a model load
        checkpoint.check_resumable(latest, config, world, (ds_config.get("zero_optimization") or {}).get("stage", 0))
    if config.deepspeed.config == AUTO:
        chosen = shipped_config_for(AUTO, world.size, config.deepspeed.precision)
        print0(f"deepspeed.config=auto: {chosen} for {world.size} {'process' if world.size == 1 else 'ranks'}")
    advice = single_process_advice(ds_config, world.size)
    if advice:
        print0(advice)
    if world.is_main:
        earlier = set_aside_earlier_run(run_dir) if config.checkpoint.resume == "never" else None
        if earlier is not None:
            print0(f"checkpoint.resume=never: {run_dir} held an earlier run; its files are now in {earlier}")
        run_dir.mkdir(parents=True, exist_ok=True)
        _write_yaml(run_dir / "config.yaml", to_dict(config))
        _write_json(run_dir / "deepspeed.json", ds_config)
        _write_json(run_dir / "token-store.json", {"path": str(store), "fingerprint": data.manifest["fingerprint"]})

    policy = distributed.load_model(config.model, ds_config)
    peft_model = None
    if config.lora.enabled:
        policy = peft_model = add_lora(policy, config.lora)
    _disable_dropout(policy)
    if config.deepspeed.activation_checkpointing:
        enable_activation_checkpointing(policy)
    held, total = distributed.held_parameters(policy)
    print_line(f"rank {world.rank}: holds {held:,} of the policy's {total:,} parameters")
    policy_module = PairLogpsModel(policy, config.logps, weighting=config.loss.use_weighting, sequence=sequence)
    distributed.register_lm_head(policy_module, policy)
    engine = distributed.training_engine(policy_module, ds_config, sequence)
    distributed.check_portable_state(engine)
    engine.train()  # from_pretrained returns eval mode, where transformers skips activation checkpointing

    reference: ReferenceSource | None = None
    if not config.loss.reference_free:
        if config.reference.source == "lora":
            reference = AdaptersDisabled(engine, peft_model)
        elif config.reference.source == "cache":
            reader = open_cache(config.reference.cache_dir, config.model, config.data, tokenizer)
            reference = CachedReference(reader, shared_sums=config.loss.ld_alpha is not None)
            print0(f"reference log-probs from the cache {config.reference.cache_dir} ({len(reference.reader)} pairs)")
        elif config.reference.source == "nf4":
            nf4 = config.reference.nf4
            reference_model = load_nf4_reference(config.model, nf4.double_quant, nf4.compute_dtype, world.device)
            print0(f"NF4 reference: {nf4_memory(reference_model).total_bytes / 2**20:,.1f} MiB, whole on every rank")
            reference = NF4Reference(reference_model, config.logps, sequence)
        else:
            reference_model = distributed.load_model(config.model, ds_config)
            reference_module = PairLogpsModel(reference_model, config.logps, sequence=sequence)
            distributed.register_lm_head(reference_module, reference_model)
            reference = FrozenCopy(distributed.inference_engine(reference_module, ds_config, sequence))

    cost_model = CostModel.for_model(policy.config.get_text_config())
    multiple = policy_module.length_multiple
    checked = multiple != sequence_parallel_multiple(config.sequence_parallel_size, config.logps.attention)
    batching = _planner(config, train_lengths, replicas, multiple, cost_model, config.micro_batch_tokens, sampler,
                        check=checked)  # fmt: skip
    eval_batching = _planner(config, eval_lengths, replicas, multiple, cost_model, forward_budget(config),
                             check=checked)  # fmt: skip
    state = Run(
        config=config, world=world, sequence=sequence, replica=replica, engine=engine, reference=reference,
        train_pairs=train_pairs, eval_pairs=eval_pairs, sampler=sampler, batching=batching,
        eval_batching=eval_batching, chosen_tokens=scored_chosen_tokens(train_lengths), total_steps=total_steps,
        pad_token_id=padding_id(tokenizer), length_multiple=policy_module.length_multiple,
        tokenizer=tokenizer,
        loss_fn=build_preference_loss(config.loss), metrics_log=MetricsLog(run_dir / "metrics.jsonl"),
        tracker=build_tracker(config.logging, run_dir, to_dict(config)),
    )  # fmt: skip
    if config.reference.source == "nf4" and config.reference.nf4.drift_pairs and latest is None:
        _warn_on_nf4_drift(state)
    if latest is not None:
        state.start_step = checkpoint.restore(engine, latest, world)
        state.skipped_steps = engine.skipped_steps
        print0(f"resumed from {latest} at step {state.start_step}")
    if world.is_main:  # from step 0 too: rows of a run killed before its first checkpoint are logged again
        state.metrics_log.truncate_after(state.start_step)
    return state


def _planner(
    config: TrainConfig, lengths: np.ndarray, replicas: int, multiple: int, cost_model: CostModel,
    budget: int | None, sampler: StepSampler | None = None, check: bool = True,
) -> FixedCount | TokenBudget:
    """The micro-batch split of pairs of these lengths: a token budget of `budget` positions under
    micro_batch_tokens, else micro_batch_size pairs. `check`: refuse pairs that alone exceed the budget with this
    row multiple (build checked them before any weights loaded, with the multiple the config implies; the loaded
    model's differs only under FlexAttention, which pads rows to whole blocks)."""
    if not config.uses_token_budget:
        return FixedCount(lengths, config.micro_batch_size, replicas, config.logps, cost_model, sampler)
    if check:
        factor = budget // config.micro_batch_tokens
        what = "training pairs" if factor == 1 else "held-out pairs"
        check_pairs_fit(lengths, budget, config.logps, multiple, config.sequence_parallel_size, what, factor)
    return TokenBudget(lengths, budget, replicas, config.logps, multiple, config.sequence_parallel_size, cost_model,
                       sampler)  # fmt: skip


def _token_store(config: TrainConfig, tokenizer, latest: Path | None) -> Path:
    """data.cache_dir, else the store's place under the cache root. Resuming, first refuse (before anything is
    built) a checkpoint trained on another model, data or settings, comparing with the store its run read: a
    run_dir holding another run is never resumed, and that run's store never opened, with this run's data. Then
    read that store while it exists (a data file touched since, its content unchanged, needs no new one)."""
    if latest is None:
        return store_directory(config.data, tokenizer, config.run_dir)
    recorded = checkpoint.saved_config(latest)["data"].get("cache_dir")
    trained_on = Path(recorded) if recorded and current_manifest(Path(recorded)) is not None else None
    checkpoint.check_same_run(
        latest, config, lambda: (store_differences(trained_on, config.data, tokenizer) or []) if trained_on else []
    )
    if config.data.cache_dir or trained_on is None:
        return store_directory(config.data, tokenizer, config.run_dir)
    return trained_on


def train(state: Run) -> None:
    config, world, engine = state.config, state.world, state.engine
    progress = ProgressBar(state.total_steps, state.start_step, config.logging.progress_bar)
    sums: dict[str, torch.Tensor] = {}  # metric sums over the micro-batches since the last log, on device
    plans: list[StepPlan] = []  # the plans of the steps since the last log (the same on every rank)
    window_start, window_first_step = time.perf_counter(), state.start_step
    for step in range(state.start_step, state.total_steps):
        lr = engine.get_lr()[0]  # the rate this step's update uses: engine.step() moves the scheduler on
        plan = state.batching.plan(step)
        # the loss's share of the update: DeepSpeed averages over the replicas, so each sums its pairs' losses x
        # replicas / (the step's pairs)
        share = state.batching.replicas / plan.num_pairs
        chosen_tokens_per_pair = float(state.chosen_tokens[plan.pairs].mean())
        step_sums: dict[str, torch.Tensor] = {}
        nonfinite = torch.zeros(len(TERMS), device=world.device)  # per term, over this step's micro-batches
        for indices in plan.micro_batches[state.replica]:
            # an empty micro-batch (a step with fewer pairs than micro-batches) still runs a forward and backward,
            # which ZeRO-3's collectives need on every rank, and counts for nothing
            batch = collate([state.train_pairs[i] for i in indices or plan.first_pair], config.logps,
                            state.pad_token_id, state.length_multiple)  # fmt: skip
            batch = batch.to(world.device)
            reference = state.reference.logps(batch) if state.reference else None
            policy = engine(batch)
            output = state.loss_fn(policy, reference, chosen_tokens_per_pair)
            distributed.backward(engine, output.losses.sum() * (share if indices else 0.0))
            if indices:
                nonfinite += _nonfinite_terms(policy, reference, output)
                _accumulate(step_sums, preference_metrics(output, policy), batch)
        engine.step()  # reduces the step's gradients and updates, once per optimizer step
        if not _update_skipped(state, step, nonfinite, plan):  # a skipped update's metrics stay out of the log
            for key, value in step_sums.items():
                sums[key] = sums.get(key, 0) + value
            plans.append(plan)
        done = step + 1
        if done % config.logging.every == 0 or done == state.total_steps:
            metrics = _reduce(sums, state.sequence.size)  # sync point: all-reduce and .item()
            elapsed = time.perf_counter() - window_start
            seconds_per_step = elapsed / (done - window_first_step)
            if metrics:  # empty when every update since the last log was skipped
                metrics.update(_plan_metrics(plans, metrics, elapsed))
            sums, plans, window_start, window_first_step = {}, [], time.perf_counter(), done
            if metrics:
                _log(state, done, "train", {**metrics, "lr": lr, "seconds_per_step": seconds_per_step})
                progress.update(done, metrics)
                for warning in state.signs.train(done, metrics, done * state.sampler.global_batch):
                    print0(warning)
        if config.eval.every and done % config.eval.every == 0:
            metrics = evaluate(state)
            _log(state, done, "eval", metrics)
            for warning in state.signs.eval(done, metrics):
                print0(warning)
        saved = (config.checkpoint.every and done % config.checkpoint.every == 0) or done == state.total_steps
        if saved:
            checkpoint.save(engine, done, config, world)
        if done < state.total_steps and _stop_requested(state):
            if not saved:
                checkpoint.save(engine, done, config, world)
            if world.is_main:  # removed once obeyed: a job script knows the run stopped early, not finished
                (Path(config.run_dir) / STOP_REQUEST).unlink(missing_ok=True)
            print0(f"stopped after step {done} on request ({STOP_REQUEST}); the same command resumes from here")
            break
    progress.close()
    state.tracker.close()


def _stop_requested(state: Run) -> bool:
    """Has any rank seen run_dir/stop-requested? Every rank must agree on the step it stops after, so the flag is
    summed over ranks: one 4-byte all-reduce per step, beside the step's own collectives."""
    seen = (Path(state.config.run_dir) / STOP_REQUEST).exists()
    return distributed.all_reduce_sum(torch.tensor([float(seen)], device=state.world.device)).item() > 0


@torch.no_grad()
def evaluate(state: Run) -> dict[str, float]:
    """The same metrics on every held-out pair (what `dpo-scale eval` of the run scores), split over the
    data-parallel replicas as a step's pairs are (`eval_batching`)."""
    config, world = state.config, state.world
    sums: dict[str, torch.Tensor] = {}
    plan = state.eval_batching.split(range(len(state.eval_pairs)))
    chosen_tokens_per_pair = float(scored_chosen_tokens(state.eval_batching.lengths).mean())  # SFT: over them all
    for indices in plan.micro_batches[state.replica]:
        # every rank runs the same number of forwards (ZeRO-3 gathers weights collectively): a replica past the
        # last pair scores the first one again and keeps nothing of it
        pairs = [state.eval_pairs[i] for i in indices or plan.first_pair]
        batch = collate(pairs, config.logps, state.pad_token_id, state.length_multiple).to(world.device)
        policy = state.engine(batch)
        reference = state.reference.logps(batch) if state.reference else None
        scored = preference_metrics(state.loss_fn(policy, reference, chosen_tokens_per_pair), policy)
        if indices:
            _accumulate(sums, scored, batch)
        else:  # zeros under every key: the all-reduce sums the same tensors on every rank
            for key in [*scored, "pairs", "tokens", "unique_tokens"]:
                sums.setdefault(key, torch.zeros((), device=world.device))
    metrics = _reduce(sums, state.sequence.size)
    metrics.pop("tokens")
    if config.eval.generate_prompts:
        metrics.update(_generation_metrics(state))
    return metrics


def _generation_metrics(state: Run) -> dict[str, float]:
    """Sample from the policy for the first eval.generate_prompts held-out prompts, split over the ranks (ZeRO-3
    generation is collective: transformers keeps every rank stepping until all are done, so each rank gets the same
    number of prompts); rank 0 measures the diversity of all of them."""
    config, world = state.config, state.world
    per_rank = config.eval.generate_prompts // world.size
    prompts = _generated_prompts(state.eval_pairs, config.eval.generate_prompts, world.size)[world.rank :: world.size]
    settings = GenerationConfig(
        num_prompts=per_rank, samples_per_prompt=1, max_new_tokens=config.eval.generate_max_new_tokens,
        batch_size=config.micro_batch_size or GENERATION_BATCH, seed=config.seed,
    )  # fmt: skip
    completions = generate(state.engine.module.model, prompts, settings, state.tokenizer, world.device)
    everyone = distributed.gather_to_all(completions)
    samples = [completion for rank in everyone for completion in rank]
    return {
        "generations/distinct_1": distinct_n(samples, 1),
        "generations/distinct_2": distinct_n(samples, 2),
        "generations/mean_length": sum(map(len, samples)) / max(len(samples), 1),
    }


GENERATION_BATCH = 4
"""Prompts sampled together during training under a token budget (which sizes forwards of pairs, not prompts)."""


def _generated_prompts(eval_pairs: Sequence[Pair], generate_prompts: int, ranks: int) -> list[list[int]]:
    """The held-out prompts evaluation samples from: the first eval.generate_prompts, as many for every rank."""
    return [pair.prompt_ids for pair in eval_pairs[: generate_prompts // ranks * ranks]]


def _accumulate(sums: dict[str, torch.Tensor], metrics: dict[str, torch.Tensor], batch) -> None:
    """Pair-weighted sums, so the logged value is the per-pair mean over everything since the last log."""
    pairs = batch.num_pairs
    for key, value in metrics.items():
        sums[key] = sums.get(key, 0) + value.detach().float() * pairs
    for key, count in (("pairs", pairs), ("tokens", batch.tokens), ("unique_tokens", batch.unique_tokens)):
        sums[key] = sums.get(key, 0) + torch.tensor(float(count), device=metrics["loss"].device)


def _reduce(sums: dict[str, torch.Tensor], ranks_per_batch: int) -> dict[str, float]:
    """Per-pair means over every rank's sums since the last log, and the positions computed (`tokens`). The
    `ranks_per_batch` ranks of a sequence-parallel group hold the same sums (their per-pair values are reduced over
    the group), so they count once."""
    if not sums:
        return {}
    keys = sorted(sums)
    stacked = distributed.all_reduce_sum(torch.stack([sums[k] for k in keys]))
    totals = dict(zip(keys, stacked.tolist()))
    pairs = totals.pop("pairs")
    metrics = {k: v / pairs for k, v in totals.items() if k not in ("tokens", "unique_tokens")}
    metrics["tokens_per_unique_token"] = totals["tokens"] / max(totals["unique_tokens"], 1.0)
    metrics["pairs"] = pairs / ranks_per_batch
    metrics["tokens"] = totals["tokens"] / ranks_per_batch
    return metrics


def _plan_metrics(plans: list[StepPlan], metrics: dict[str, float], seconds: float) -> dict[str, float]:
    """From the window's plans (the same on every rank, no collective): micro-batches per replica per step and the
    balance (batch_plan.StepPlan.balance), each the mean over its steps; and the positions computed per second, over
    every replica."""
    return {
        "micro_batches": sum(plan.rounds for plan in plans) / len(plans),
        "balance": sum(plan.balance for plan in plans) / len(plans),
        "tokens_per_second": metrics.pop("tokens") / seconds,
    }


def _log(state: Run, step: int, split: str, metrics: dict[str, float]) -> None:
    if not metrics:
        return
    if state.world.is_main:
        state.metrics_log.write(step, split, metrics)
        if split == "train":
            state.history.append({"step": step, **metrics})
    state.tracker.log(metrics, step, split)


TERMS = ("policy log-probs", "reference log-probs", "loss")


def _nonfinite_terms(policy, reference, output) -> torch.Tensor:
    """(len(TERMS),) counts of non-finite values, on device: read only when an update was skipped."""
    reference_logps = reference.chosen_logps if reference is not None else policy.chosen_logps.new_zeros(1)
    return torch.stack([
        (~torch.isfinite(torch.cat([policy.chosen_logps, policy.rejected_logps]))).sum().float(),
        (~torch.isfinite(reference_logps)).sum().float(),
        (~torch.isfinite(output.losses)).sum().float(),
    ])  # fmt: skip


def _update_skipped(state: Run, step: int, nonfinite: torch.Tensor, plan: StepPlan) -> bool:
    """DeepSpeed discards an update whose gradient norm is not finite; say which term broke, stop after too many."""
    skipped = state.engine.skipped_steps
    if skipped == state.skipped_steps:
        return False
    state.skipped_steps = skipped
    # rare: only on a skipped update; a sequence-parallel group's ranks hold the same values, counted once
    counts = (distributed.all_reduce_sum(nonfinite) / state.sequence.size).tolist()
    broken = [f"{term} ({int(n)} values)" for term, n in zip(TERMS, counts) if n] or ["the gradient only"]
    print0(
        f"warning: step {step + 1}: non-finite {', '.join(broken)}; update skipped "
        f"({skipped} of at most {state.config.max_nonfinite_skips})"
    )
    if skipped > state.config.max_nonfinite_skips:
        sources = [state.train_pairs[i].source for indices in plan.micro_batches[state.replica] for i in indices][:4]
        raise NonFiniteError(
            f"step {step + 1}: {skipped} updates skipped for non-finite values (limit "
            f"max_nonfinite_skips={state.config.max_nonfinite_skips}); this one in {', '.join(broken)}. "
            f"Its batch began with {sources}. Lower optim.lr or loss.beta, check these rows, or resume from the "
            "last checkpoint"
        )
    return True


@torch.no_grad()
def _warn_on_nf4_drift(state: Run) -> None:
    """Before step 1 the policy is the full-precision reference: score a few pairs with it and with the NF4 copy, and
    warn when the 4-bit drift moves DPO's logit by more than the configured p95. Every rank scores the same pairs
    (ZeRO-3 forwards are collective)."""
    settings = state.config.reference.nf4
    pairs = state.train_pairs[: settings.drift_pairs]
    full, nf4 = [], []
    # training pairs, checked against the budget when the run was built
    planner = _planner(state.config, lengths_of(pairs), 1, state.length_multiple, state.batching.cost_model,
                       forward_budget(state.config), check=False)  # fmt: skip
    for indices in planner.split(range(len(pairs))).micro_batches[0]:
        batch = collate([pairs[i] for i in indices], state.config.logps, state.pad_token_id, state.length_multiple)
        batch = batch.to(state.world.device)
        full.append(state.engine(batch))
        nf4.append(state.reference.logps(batch))
    report = drift_statistics(concatenate(full), concatenate(nf4), state.config.loss.beta)
    p95 = report.margin_error.p95
    print0(f"NF4 reference drift on {len(pairs)} pairs: p95 of beta x |margin error| = {p95:.4f}")
    if p95 > settings.max_margin_error_p95:
        print0(
            f"warning: the NF4 reference shifts DPO's logit by {p95:.3f} at p95 (more than "
            f"reference.nf4.max_margin_error_p95={settings.max_margin_error_p95}); rewards and the loss's starting "
            "point carry that error. Consider reference.source=cache with a full-precision precompute"
        )


def _disable_dropout(model: torch.nn.Module) -> None:
    """DPO compares the policy with the reference on the same inputs: with dropout on, the two differ at step 1
    already (the loss would not start at ln 2) and the log-ratio is noise. The DPO code and TRL turn it off too."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    config = model.config.get_text_config()
    for name, value in vars(config).items():  # attention dropout is a functional call reading the config
        if (name.endswith("dropout") or name.endswith("pdrop")) and isinstance(value, float):
            setattr(config, name, 0.0)


def _seed(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def _write_yaml(path: Path, tree: dict) -> None:
    import yaml

    with atomic_open(path) as handle:
        yaml.safe_dump(tree, handle, sort_keys=False)


def _write_json(path: Path, tree: dict) -> None:
    import json

    with atomic_open(path) as handle:
        json.dump(tree, handle, indent=2)

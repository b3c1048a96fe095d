"""One typed config, nested by concern.

Every default lives in its dataclass; required settings have none, so a run fails fast when one is missing.
Each section validates itself on creation: an invalid combination raises `ConfigError`, it is never rewritten.
Components receive only their own section.

Files are YAML; the command line adds dotted overrides (`data.max_length=512`), parsed as YAML scalars.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import yaml


class ConfigError(ValueError):
    """A setting is missing, unknown or invalid. The message names the key and how to fix it."""


DataFormat = Literal["auto", "strings", "conversational", "implicit_prompt", "sharegpt"]
TruncationMode = Literal["keep_start", "keep_end"]
LossType = Literal[
    "sigmoid", "robust", "ipo", "hinge", "sigmoid_norm", "simpo", "exo_pair", "nca_pair", "bco_pair", "sppo_hard",
    "aot", "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft",
]  # fmt: skip
FDivergence = Literal["reverse_kl", "forward_kl", "js_divergence", "alpha_divergence"]
# Which losses use label_smoothing (as TRL 1.16; sigmoid: cDPO, which TRL 1.16 dropped), and which are built on the
# chosen-minus-rejected difference, where an f-divergence's β·log Z(x) cancels
SMOOTHED_LOSSES = ("sigmoid", "robust", "exo_pair", "aot", "aot_unpaired")
F_DIVERGENCE_LOSSES = ("sigmoid", "sigmoid_norm", "hinge", "ipo", "exo_pair", "robust", "discopop", "sft")


@dataclass
class ModelConfig:
    path: str
    """Local directory or hub id of a causal LM, loaded with `from_pretrained` (safetensors only)."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Parameter dtype. Log-sum-exp always accumulates in float32 whatever this is."""
    trust_remote_code: bool = False
    """Run Python shipped with the model. Off unless you trust its author."""


@dataclass
class FilterConfig:
    """Pairs dropped where pairs are prepared (the token store, and the in-memory path of `logps` / `eval`), each
    counted under its own drop reason and recorded in the store's fingerprint. All off by default. Each filter looks
    at the pairs that preparation kept; a pair several filters drop is counted under the first reason of
    pairs.DROP_REASONS."""

    drop_duplicates: bool = False
    """Drop a pair whose prompt, chosen and rejected tokens equal an earlier pair's (the first one is kept)."""
    drop_contradictory: bool = False
    """Drop every pair of a prompt that also holds the reversed preference (chosen and rejected swapped): which
    label is right is unknown, so both go."""
    drop_contaminated: bool = False
    """Drop a training pair whose prompt holds at least `ngram_threshold` of the distinct `ngram`-token n-grams of
    some prompt of `eval_path` (or equals a prompt shorter than `ngram` tokens). The prompt as the data holds it,
    before data.max_length truncation: contamination is about the data, not the window."""
    eval_path: str | None = None
    """The evaluation preference file drop_contaminated checks against, read like data.path (its format and
    columns), tokenized whole (no data.max_length)."""
    ngram: int = 13
    """n-gram length in tokens for contamination (the decontamination convention since GPT-3: 13)."""
    ngram_threshold: float = 0.5
    """Share of an eval prompt's distinct n-grams a training prompt must hold to count as contaminated, in (0, 1]."""
    max_length_ratio: float | None = None
    """Drop a pair whose longer completion has more than this many times the tokens of the shorter (either side
    longer); None: off."""

    def __post_init__(self) -> None:
        if self.drop_contaminated and not self.eval_path:
            raise ConfigError(
                "data.filters.drop_contaminated=true needs data.filters.eval_path (the evaluation file to check "
                "against); set it, or set drop_contaminated=false"
            )
        if self.ngram < 1:
            raise ConfigError(f"data.filters.ngram={self.ngram}: must be at least 1 token (13 is the convention)")
        if not 0.0 < self.ngram_threshold <= 1.0:
            raise ConfigError(f"data.filters.ngram_threshold={self.ngram_threshold}: must be in (0, 1], e.g. 0.5")
        if self.max_length_ratio is not None and self.max_length_ratio < 1.0:
            raise ConfigError(
                f"data.filters.max_length_ratio={self.max_length_ratio}: must be at least 1 (the longer completion "
                "over the shorter), e.g. 3.0; or null for no limit"
            )

    @property
    def any(self) -> bool:
        return (
            self.drop_duplicates or self.drop_contradictory or self.drop_contaminated
            or self.max_length_ratio is not None
        )  # fmt: skip

    def shaping_settings(self) -> dict[str, Any]:
        """The settings that decide which pairs are dropped: eval_path, ngram and ngram_threshold only with
        drop_contaminated, the one filter that reads them (`data-report --eval` reads them too, without making
        another store)."""
        settings = dataclasses.asdict(self)
        if not self.drop_contaminated:
            for name in ("eval_path", "ngram", "ngram_threshold"):
                del settings[name]
        return settings


@dataclass
class DataConfig:
    path: str
    """A .jsonl / .jsonl.gz / .json / .parquet file, a `save_to_disk` directory, or a hub dataset id."""
    split: str = "train"
    """Split to read from a `save_to_disk` DatasetDict or a hub dataset."""
    format: DataFormat = "auto"
    """Row format; `auto` detects it from the columns of the first row."""
    columns: dict[str, str] = field(default_factory=dict)
    """Map our column names (prompt, chosen, rejected, conversations) to the dataset's, e.g. {prompt: question}."""
    tokenizer: str | None = None
    """Tokenizer directory or tokenizer.json; defaults to the model's."""
    max_length: int | None = None
    """Cut each prompt+completion sequence to this many tokens (None: no limit)."""
    truncation_mode: TruncationMode = "keep_start"
    """keep_start cuts the ends of completions; keep_end cuts the start of the prompt (see README, Data)."""
    strict: bool = False
    """Raise on a pair without signal (empty completion after truncation, identical chosen and rejected)
    instead of dropping and counting it."""
    cache_dir: str | None = None
    """The token store: the prepared pairs, tokenized once and memory-mapped by every rank, restart, run and sweep
    point (see dpo_scale/data/store.py). None: for train, precompute-ref, sweep and eval of a run, a directory named
    by the data and settings under the cache root ($DPO_SCALE_CACHE, else HF_HOME/dpo_scale; dpo_scale/data/cache.py),
    shared by every run with the same data and settings; `eval`, `logps` and `ref-drift` on their own data prepare
    in memory. Set, a store there made for other data or settings is refused, naming what differs."""
    rebuild: bool = False
    """Replace a damaged token store, or one made for other data or settings in a directory named by cache_dir,
    instead of refusing it. A store under the cache root is never rebuilt for other settings: they get their own."""
    shard_rows: int = 8192
    """Input rows per token-store shard: the unit of parallel work and of resumption when building it."""
    num_workers: int | None = None
    """Processes tokenizing while the store is built; None: this machine's cores divided by the ranks on it."""
    filters: FilterConfig = field(default_factory=FilterConfig)
    """Pairs to drop for their content: duplicates, contradictions, eval contamination, length ratio."""

    def __post_init__(self) -> None:
        _check_choice(self, "data", "format", DataFormat)
        _check_choice(self, "data", "truncation_mode", TruncationMode)
        unknown = set(self.columns) - {"prompt", "chosen", "rejected", "conversations"}
        if unknown:
            raise ConfigError(
                f"data.columns: unknown key(s) {sorted(unknown)}; map any of prompt, chosen, rejected, conversations "
                "to your dataset's column names, e.g. data.columns={prompt: question}"
            )
        if self.max_length is not None and self.max_length < 2:
            raise ConfigError(f"data.max_length={self.max_length}: must be at least 2 (one prompt, one completion token)")
        if self.shard_rows < 1 or (self.num_workers is not None and self.num_workers < 1):
            raise ConfigError("data.shard_rows and data.num_workers must be at least 1 (num_workers may be null)")

    def shaping_settings(self) -> dict[str, Any]:
        """The settings that decide which pairs there are and which tokens they get (not where they are stored, nor
        how fast); a filter as `filters.<name>`."""
        names = ("split", "format", "columns", "max_length", "truncation_mode")
        filters = {f"filters.{name}": value for name, value in self.filters.shaping_settings().items()}
        return {**{name: getattr(self, name) for name in names}, **filters}


@dataclass
class LogpsConfig:
    """How sequence log-probs are computed. Every choice here gives the same numbers as the plain path."""

    prefix_sharing: bool = True
    """One [prompt | chosen | rejected] sequence per pair, the prompt computed once."""
    packing: bool = True
    """Several pairs per row (padding-free), attention isolated and position ids restarting per pair."""
    pack_length: int | None = None
    """Row capacity in tokens when packing. None: the rows that compute the fewest positions, each up to
    layout.PACKED_ROW_TOKENS (2,048) or the batch's longest pair when that is longer."""
    streaming: bool = True
    """Chunked LM head with recomputation in backward; False materializes the full [rows, seq, vocab] logits."""
    chunk_size: int | None = None
    """Scored tokens per LM-head chunk: peak extra memory is about chunk_size x vocab x 4 bytes. None: as many as
    fit logps.CHUNK_BYTES (64 MiB of fp32 logits: 333 tokens at GPT-2's vocabulary, 524 at 32k, 130 at 128,256), so
    the head's memory stays flat as the vocabulary grows."""

    attention: Literal["auto", "dense", "units", "flex", "varlen"] = "auto"
    """How the layout reaches the attention kernel. dense: a (rows, 1, T, T) mask for sdpa / eager (the padded
    layout: its 2D mask); units: sdpa / eager once per packed unit with that unit's own (L, L) mask, so a row's
    attention costs the sum of its units' squared lengths, not T² (dpo_scale/model/unit_attention.py); flex: a FlexAttention BlockMask built from the units (no T x T tensor; CUDA only, refused
    by every command elsewhere: model.wrapper.check_attention_device); varlen: no mask, position ids restarting per unit,
    as transformers' padding-free path and flash-attention take it (not with prefix sharing: rejected would see
    chosen). auto: units on CPU (dense under sequence parallelism); on CUDA flex where the model supports it, varlen for flash-attention models without
    prefix sharing."""

    def __post_init__(self) -> None:
        _check_choice(self, "logps", "attention", Literal["auto", "dense", "units", "flex", "varlen"])
        if self.attention == "varlen" and self.prefix_sharing:
            raise ConfigError(
                "logps.attention=varlen isolates whole units, but prefix sharing needs rejected tokens to skip the "
                "chosen ones inside a unit: use logps.attention=auto (units on CPU, flex on CUDA), "
                "logps.attention=dense, or logps.prefix_sharing=false"
            )
        if self.chunk_size is not None and self.chunk_size < 1:
            raise ConfigError(f"logps.chunk_size={self.chunk_size}: must be a positive number of tokens")
        if self.pack_length is not None and not self.packing:
            raise ConfigError("logps.pack_length is set but logps.packing is false: set logps.packing=true or drop it")
        if self.pack_length is not None and self.pack_length < 2:
            raise ConfigError(f"logps.pack_length={self.pack_length}: must be at least 2 tokens")

    @property
    def plain(self) -> bool:
        """The reference path: padded [chosen; rejected] rows with full logits."""
        return not (self.prefix_sharing or self.packing or self.streaming)


@dataclass
class LossConfig:
    loss_type: LossType | list[LossType] = "sigmoid"
    """sigmoid (DPO / cDPO), robust (rDPO), ipo, hinge (SLiC), sigmoid_norm (length-normalised DPO), simpo, exo_pair,
    nca_pair, bco_pair, sppo_hard, aot, aot_unpaired, apo_zero, apo_down, discopop, sft (loss.py has each one's
    equation and paper); or a list of them, summed with loss_weights (MPO: [sigmoid, bco_pair, sft])."""
    loss_weights: list[float] | None = None
    """One weight per loss_type in the list; None: 1 each."""
    beta: float = 0.1
    """Inverse temperature of the implicit reward (DPO eq. 7); IPO's tau; SimPO's beta (its paper uses 2.0-2.5)."""
    label_smoothing: float = 0.0
    """Assumed probability that a label is flipped (cDPO, robust, exo_pair's epsilon, aot). Must be below 0.5."""
    rpo_alpha: float | None = None
    """Weight of a length-normalised NLL term on the chosen completion (RPO); None: no such term."""
    simpo_gamma: float = 0.5
    """SimPO's target reward margin gamma."""
    discopop_tau: float = 0.05
    """DiscoPOP's temperature of the blend between its logistic and exponential parts (the paper's 0.05)."""
    f_divergence: FDivergence = "reverse_kl"
    """The divergence whose f'(pi / pi_ref) replaces the log-ratio (f-DPO): reverse_kl is DPO."""
    f_alpha_divergence_coef: float = 0.5
    """alpha of f_divergence=alpha_divergence (1: reverse KL)."""
    ld_alpha: float | None = None
    """LD-DPO: log-probs of the longer completion's tokens beyond the shorter one's length weighted by this, in
    [0, 1] (1: plain sums); None: off."""
    use_weighting: bool = False
    """WPO: each pair's loss weighted by its completions' length-normalised log-probs against the model's own
    sampling distribution (loss.py: weighted_pair_losses)."""

    def __post_init__(self) -> None:
        types = self.loss_types
        if not types:
            raise ConfigError("loss.loss_type: an empty list; name at least one loss")
        for index, loss_type in enumerate(types):
            key = "loss.loss_type" if isinstance(self.loss_type, str) else f"loss.loss_type[{index}]"
            if loss_type not in typing.get_args(LossType):
                raise ConfigError(f"{key}={loss_type!r}: must be one of {', '.join(typing.get_args(LossType))}")
        _check_choice(self, "loss", "f_divergence", FDivergence)
        if "simpo" in types and len(types) > 1:
            raise ConfigError("loss.loss_type: simpo is reference-free and cannot be combined with other losses")
        if self.loss_weights is not None and len(self.loss_weights) != len(types):
            raise ConfigError(
                f"loss.loss_weights has {len(self.loss_weights)} weights for {len(types)} loss types "
                f"({', '.join(types)}): give one weight per loss type"
            )
        if self.beta <= 0:
            raise ConfigError(f"loss.beta={self.beta}: must be positive")
        if not 0.0 <= self.label_smoothing < 0.5:
            raise ConfigError(f"loss.label_smoothing={self.label_smoothing}: must be in [0, 0.5)")
        if self.label_smoothing and not set(types) & set(SMOOTHED_LOSSES):
            raise ConfigError(
                f"loss.label_smoothing is only defined for {', '.join(SMOOTHED_LOSSES)}, not loss.loss_type="
                f"{self.loss_type}"
            )
        if "exo_pair" in types and self.label_smoothing == 0:
            raise ConfigError(
                "loss.loss_type=exo_pair needs loss.label_smoothing > 0 (its epsilon: log(epsilon) is in the loss); "
                "1e-3 is TRL's advice"
            )
        if self.f_divergence != "reverse_kl" and not set(types) <= set(F_DIVERGENCE_LOSSES):
            others = sorted(set(types) - set(F_DIVERGENCE_LOSSES))
            raise ConfigError(
                f"loss.f_divergence={self.f_divergence} applies only to {', '.join(F_DIVERGENCE_LOSSES)} (where "
                f"beta log Z(x) cancels), not to {', '.join(others)}; use f_divergence=reverse_kl with those"
            )
        if self.ld_alpha is not None and not 0.0 <= self.ld_alpha <= 1.0:
            raise ConfigError(f"loss.ld_alpha={self.ld_alpha}: must be in [0, 1] (1 weighs every token fully)")
        if self.use_weighting and set(types) & {"aot", "aot_unpaired"}:
            raise ConfigError(
                "loss.use_weighting (WPO) weighs each pair's loss, but aot and aot_unpaired sort the batch, so their "
                "losses belong to no pair; use another loss type or use_weighting=false"
            )
        if self.ld_alpha is not None and "simpo" in types:
            raise ConfigError("loss.ld_alpha is defined for losses with a reference, not loss.loss_type=simpo")
        if self.discopop_tau <= 0:
            raise ConfigError(f"loss.discopop_tau={self.discopop_tau}: must be positive")
        if self.rpo_alpha is not None and self.rpo_alpha < 0:
            raise ConfigError(f"loss.rpo_alpha={self.rpo_alpha}: must be non-negative")

    @property
    def loss_types(self) -> list[str]:
        return [self.loss_type] if isinstance(self.loss_type, str) else list(self.loss_type)

    @property
    def weights(self) -> list[float]:
        return self.loss_weights if self.loss_weights is not None else [1.0] * len(self.loss_types)

    @property
    def reference_free(self) -> bool:
        return self.loss_types == ["simpo"]


@dataclass
class LogpsRunConfig:
    """`dpo-scale logps`: every pair's log-prob sums under one model."""

    model: ModelConfig
    data: DataConfig
    out: str
    """Output JSONL, written atomically."""
    logps: LogpsConfig = field(default_factory=LogpsConfig)
    batch_size: int = 8
    """Pairs per forward."""
    batch_tokens: int | None = None
    """Positions per forward, counted as the layout lays them out; set, each forward holds as many consecutive pairs
    as fit it (batch_size still caps the pairs); none: batch_size pairs. The values are the same either way."""

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ConfigError(f"batch_size={self.batch_size}: must be at least 1")
        _check_batch_tokens(self.batch_tokens)


ComputeDtype = Literal["float32", "bfloat16", "float16"]


@dataclass
class NF4Settings:
    """The 4-bit reference (reference.source=nf4): bitsandbytes NF4, a whole copy on every rank beside the ZeRO-3
    policy shards. About 0.52 GB per billion quantized parameters; embeddings and LM head stay in model.dtype."""

    double_quant: bool = True
    """Quantize the block scales too (QLoRA): 0.516 instead of 0.563 byte per quantized parameter."""
    compute_dtype: ComputeDtype = "float32"
    """dtype the 4-bit weights are dequantized to for each matmul; bfloat16 is the usual choice on GPUs."""
    drift_pairs: int = 64
    """Training measures the NF4 drift on this many pairs before step 1 (against the policy, which is then the
    full-precision reference); 0 skips the check."""
    max_margin_error_p95: float = 0.5
    """Warn when the p95 of beta x |reference-margin error| exceeds this: DPO's logit is shifted that much."""

    def __post_init__(self) -> None:
        _check_choice(self, "nf4", "compute_dtype", ComputeDtype)
        if self.drift_pairs < 0 or self.max_margin_error_p95 <= 0:
            raise ConfigError("nf4.drift_pairs must be >= 0 and nf4.max_margin_error_p95 positive")


@dataclass
class ReferenceConfig:
    source: Literal["copy", "lora", "cache", "nf4"] = "copy"
    """copy: a frozen full copy of the starting policy (a ZeRO-3 inference engine, no optimizer state);
    lora: the policy itself with its adapters disabled (needs lora.enabled=true);
    cache: log-probs precomputed by `dpo-scale precompute-ref` into cache_dir;
    nf4: a frozen NF4 copy, whole on every rank (see reference.nf4; measure its drift with `dpo-scale ref-drift`)."""
    nf4: NF4Settings = field(default_factory=NF4Settings)
    cache_dir: str | None = None
    """Directory of the precomputed reference log-probs (written by precompute-ref, read by training)."""
    shard_size: int = 4096
    """Pairs per cache shard: the unit of work and of resumption in precompute-ref."""
    precompute_batch_size: int = 16
    """Pairs per forward in precompute-ref (no gradients, so larger than micro_batch_size). Not used under
    micro_batch_tokens: each forward then holds as many consecutive pairs as fit training's forward-only budget,
    FORWARD_BUDGET_FACTOR x micro_batch_tokens positions per rank (training/batch_plan.py)."""
    precompute_sharded: bool = False
    """precompute-ref with the reference in ZeRO-3 shards across ranks (deepspeed.config), for a reference that does
    not fit one device; otherwise every rank holds it whole and the ranks never wait for each other."""

    def __post_init__(self) -> None:
        _check_choice(self, "reference", "source", Literal["copy", "lora", "cache", "nf4"])
        if self.source == "cache" and not self.cache_dir:
            raise ConfigError("reference.source=cache needs reference.cache_dir (the precompute-ref output)")
        if self.shard_size < 1 or self.precompute_batch_size < 1:
            raise ConfigError("reference.shard_size and reference.precompute_batch_size must be at least 1")


@dataclass
class LoraConfig:
    enabled: bool = False
    """Train low-rank adapters (peft) instead of every weight."""
    r: int = 16
    alpha: int = 32
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])


@dataclass
class OptimConfig:
    lr: float = 5e-7
    """Peak learning rate. DPO papers use ~5e-7 for full fine-tuning; LoRA wants ~5e-6."""
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    warmup_steps: int = 10
    """Optimizer steps of linear warm-up from 0."""
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    """Decay after warm-up, to 0 at the last step."""
    max_grad_norm: float = 1.0
    """Clip the global gradient norm; 0 turns clipping off."""

    def __post_init__(self) -> None:
        _check_choice(self, "optim", "schedule", Literal["cosine", "linear", "constant"])
        if self.lr <= 0:
            raise ConfigError(f"optim.lr={self.lr}: must be positive")
        if self.warmup_steps < 0 or self.max_grad_norm < 0:
            raise ConfigError("optim.warmup_steps and optim.max_grad_norm must be non-negative")
        # DeepSpeed's warm-up schedulers reject 0 warm-up steps and silently run 1 as 2
        if self.warmup_steps == 1 or (self.warmup_steps == 0 and self.schedule != "constant"):
            raise ConfigError(
                f"optim.warmup_steps={self.warmup_steps} with optim.schedule={self.schedule}: use 2 or more warm-up "
                "steps, or 0 with optim.schedule=constant"
            )


@dataclass
class DeepSpeedConfig:
    config: str = "auto"
    """auto (zero0 for one process, zero3 for more), a name in ds_configs/ (zero3, zero3_offload, zero2, zero0) or
    the path of your own DeepSpeed JSON; its "auto" values are filled from this config, explicit values must agree
    with it."""
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    activation_checkpointing: bool = False
    """Recompute each decoder layer in backward instead of keeping its activations: about 0.55 MiB a position
    saved for a 117M Llama, 13-14% of the speed here (README: when to turn it on)."""
    timeout_s: int = 120
    """Collective timeout: a rank that died ends the job with an error within about this long."""

    def __post_init__(self) -> None:
        _check_choice(self, "deepspeed", "precision", Literal["fp32", "bf16", "fp16"])
        if self.timeout_s < 1:
            raise ConfigError(f"deepspeed.timeout_s={self.timeout_s}: must be at least 1 second")


@dataclass
class CheckpointConfig:
    every: int = 100
    """Optimizer steps between checkpoints (and one at the end); 0: only at the end."""
    keep_last: int = 2
    """Complete checkpoints kept; older ones are deleted once a newer one is complete."""
    resume: Literal["auto", "never"] = "auto"
    """auto: continue from the latest complete checkpoint in run_dir if there is one, on any number of ranks and any
    ZeRO stage. never: start afresh, an earlier run's files in run_dir first moved to run_dir/previous-runs/N."""
    allow_new_global_batch: bool = False
    """Resume with another global batch (micro_batch_size x gradient_accumulation_steps x ranks) than the
    checkpoint's: refused unless true, since the data order then differs from the step it resumes at."""

    def __post_init__(self) -> None:
        _check_choice(self, "checkpoint", "resume", Literal["auto", "never"])
        if self.every < 0 or self.keep_last < 1:
            raise ConfigError("checkpoint.every must be >= 0 and checkpoint.keep_last >= 1")


@dataclass
class LoggingConfig:
    every: int = 10
    """Optimizer steps between metric logs: the only place metrics are synchronised across ranks."""
    wandb: bool = False
    wandb_project: str = "dpo_scale"
    wandb_mode: Literal["online", "offline"] = "offline"
    """offline writes wandb files under run_dir and needs no network; `wandb sync` uploads them later."""
    progress_bar: bool = True

    def __post_init__(self) -> None:
        _check_choice(self, "logging", "wandb_mode", Literal["online", "offline"])
        if self.every < 1:
            raise ConfigError(f"logging.every={self.every}: must be at least 1")


@dataclass
class EvalConfig:
    every: int = 0
    """Optimizer steps between evaluations on the held-out pairs; 0: never."""
    fraction: float = 0.05
    """Share of the prepared pairs held out for evaluation (deterministic in the seed)."""
    generate_prompts: int = 0
    """At each evaluation, sample one completion for this many held-out prompts and log their distinct-1/2 and
    mean length (a warning when distinct-2 collapses); 0: no generations."""
    generate_max_new_tokens: int = 32

    def __post_init__(self) -> None:
        if not 0.0 <= self.fraction < 1.0:
            raise ConfigError(f"eval.fraction={self.fraction}: must be in [0, 1)")
        if self.generate_prompts < 0 or self.generate_max_new_tokens < 1:
            raise ConfigError("eval.generate_prompts must be >= 0 and eval.generate_max_new_tokens >= 1")


@dataclass
class TrainConfig:
    """`dpo-scale train`. Saved resolved as run_dir/config.yaml."""

    model: ModelConfig
    data: DataConfig
    run_dir: str | None = None
    """Checkpoints, metrics.jsonl, the resolved config and plots go here. Required by `train` and `sweep`
    (`require_run_dir`); the commands that read a training config for its data, model or reference (prepare-data,
    data-report, precompute-ref) write elsewhere and need none."""
    loss: LossConfig = field(default_factory=LossConfig)
    logps: LogpsConfig = field(default_factory=LogpsConfig)
    reference: ReferenceConfig = field(default_factory=ReferenceConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    micro_batch_size: int | None = None
    """Pairs per rank per forward: 4 unless micro_batch_tokens is set (then unused: set one of the two)."""
    micro_batch_tokens: int | None = None
    """The most positions one rank computes in one micro-batch, counted as the layout computes them (a shared prompt
    once, rows padded to the sequence-parallel multiple, padding included; under sequence parallelism per rank, so a
    group holds SP x this). Set, global_batch_size pairs per step are split by their token cost into as few
    micro-batches per replica as fit it, balanced across replicas (training/batch_plan.py), with the same update as
    any fixed split; micro_batch_size and gradient_accumulation_steps are then not used. README: Train."""
    gradient_accumulation_steps: int = 1
    global_batch_size: int | None = None
    """Pairs per optimizer step over all ranks. Set, it fixes the update and each launch derives
    gradient_accumulation_steps = global_batch_size / (micro_batch_size x ranks / sequence_parallel_size): a job
    requeued onto fewer or more nodes then resumes with the same updates (leave gradient_accumulation_steps at 1).
    Required with micro_batch_tokens."""
    sequence_parallel_size: int = 1
    """Ranks that share each micro-batch, each running the model on a contiguous 1/SP slice of every row (DeepSpeed
    Ulysses: attention all-to-alls to the whole row for 1/SP of the heads). Groups are consecutive ranks, so they
    stay inside a node. The data-parallel degree is ranks / SP, and the global batch is micro_batch_size x
    gradient_accumulation_steps x ranks / SP. For pairs too long for one rank's activation memory (README: Long
    context)."""
    epochs: int = 1
    max_steps: int | None = None
    """Stop after this many optimizer steps (None: run all epochs)."""
    seed: int = 0
    max_nonfinite_skips: int = 5
    """Steps with a non-finite loss or gradient skipped (with a warning) before the run stops."""

    def __post_init__(self) -> None:
        if self.micro_batch_tokens is not None:
            self._check_token_budget()
        elif self.micro_batch_size is None:
            self.micro_batch_size = 4
        if self.micro_batch_size is not None and self.micro_batch_size < 1:
            raise ConfigError(f"micro_batch_size={self.micro_batch_size}: must be at least 1")
        if self.gradient_accumulation_steps < 1 or self.epochs < 1:
            raise ConfigError("gradient_accumulation_steps and epochs must be at least 1")
        if self.sequence_parallel_size < 1:
            raise ConfigError(f"sequence_parallel_size={self.sequence_parallel_size}: must be at least 1 (1: off)")
        if self.sequence_parallel_size > 1 and self.eval.generate_prompts:
            raise ConfigError(
                f"eval.generate_prompts={self.eval.generate_prompts} with sequence_parallel_size="
                f"{self.sequence_parallel_size}: generation during training runs without sequence parallelism, which "
                "this run's attention is set up for. Set eval.generate_prompts=0 and sample afterwards with "
                "`dpo-scale eval` (one process per model, no sequence parallelism)"
            )
        if self.global_batch_size is not None and self.global_batch_size < 1:
            raise ConfigError(f"global_batch_size={self.global_batch_size}: must be at least 1")
        if self.micro_batch_size and self.global_batch_size is not None and self.global_batch_size % self.micro_batch_size:
            raise ConfigError(f"global_batch_size={self.global_batch_size} is not a multiple of micro_batch_size="
                              f"{self.micro_batch_size}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ConfigError(f"max_steps={self.max_steps}: must be at least 1 (or null)")
        if self.reference.source == "lora" and not self.lora.enabled:
            raise ConfigError("reference.source=lora needs lora.enabled=true (the reference is the adapter-free base)")
        if self.loss.reference_free and self.reference.source != "copy":
            raise ConfigError("loss.loss_type=simpo is reference-free: leave reference.source at its default")

    def _check_token_budget(self) -> None:
        if self.micro_batch_tokens < 1:
            raise ConfigError(f"micro_batch_tokens={self.micro_batch_tokens}: must be at least 1 (or null for "
                              "micro_batch_size pairs per micro-batch)")
        if self.global_batch_size is None:
            raise ConfigError(f"micro_batch_tokens={self.micro_batch_tokens} needs global_batch_size (pairs per "
                              "optimizer step over every rank): the budget decides only how they are split")
        for key, unused in (("micro_batch_size", self.micro_batch_size is not None),
                            ("gradient_accumulation_steps", self.gradient_accumulation_steps != 1)):  # fmt: skip
            if unused:
                raise ConfigError(
                    f"{key}={getattr(self, key)} and micro_batch_tokens={self.micro_batch_tokens} are both set: with "
                    f"a token budget the micro-batches are sized in tokens; drop {key} (remove it from the file, or "
                    f"{key}=null among the overrides), or drop micro_batch_tokens for fixed micro-batches"
                )
        if any(t in ("aot", "aot_unpaired") for t in self.loss.loss_types):
            raise ConfigError(
                f"loss.loss_type={self.loss.loss_type} sorts log-ratios over each micro-batch, so its update depends "
                "on which pairs share one; micro_batch_tokens groups them by length: use micro_batch_size"
            )

    @property
    def uses_token_budget(self) -> bool:
        return self.micro_batch_tokens is not None

    def global_batch(self, ranks: int) -> int:
        """Pairs per optimizer step on `ranks` ranks (of a config `for_world(ranks)` has resolved)."""
        if self.uses_token_budget:
            return self.global_batch_size
        return self.micro_batch_size * self.gradient_accumulation_steps * self.data_parallel_size(ranks)

    def require_run_dir(self, command: str) -> str:
        if not self.run_dir:
            raise ConfigError(
                f"run_dir is required by dpo-scale {command} (checkpoints, metrics and the resolved config go there): "
                "set it in the config file or as run_dir=runs/NAME"
            )
        return self.run_dir

    def data_parallel_size(self, ranks: int, allowed: set[int] | None = None) -> int:
        """Micro-batches per accumulation round over `ranks` ranks: ranks / sequence_parallel_size. `allowed`: the
        sizes the model allows (those whose heads Ulysses splits: sequence_parallel.check_sequence_parallel), so that
        a refusal suggests only sizes that work; None: any."""
        size = self.sequence_parallel_size
        if ranks % size:
            fits = [s for s in range(1, ranks + 1) if ranks % s == 0 and (allowed is None or s in allowed)]
            launch_more = f", or launch a multiple of {size} ranks" if allowed is None or size in allowed else ""
            raise ConfigError(
                f"sequence_parallel_size={size} does not divide the {ranks} ranks of this launch: use "
                f"{'one of ' if len(fits) > 1 else ''}{', '.join(map(str, fits))}{launch_more}"
            )
        return ranks // size

    def for_world(self, ranks: int) -> TrainConfig:
        """This config as it runs on `ranks` ranks: gradient_accumulation_steps derived from global_batch_size."""
        replicas = self.data_parallel_size(ranks)
        if self.uses_token_budget:
            if self.global_batch_size < replicas:
                raise ConfigError(f"global_batch_size={self.global_batch_size} gives fewer pairs than the {replicas} "
                                  "data-parallel replicas of this launch: raise it or launch fewer ranks")
            return self
        if self.global_batch_size is None:
            return self
        per_step = self.micro_batch_size * replicas
        if self.global_batch_size % per_step:
            fits = [r * self.sequence_parallel_size for r in range(1, self.global_batch_size // self.micro_batch_size + 1)
                    if self.global_batch_size % (self.micro_batch_size * r) == 0]  # fmt: skip
            raise ConfigError(
                f"global_batch_size={self.global_batch_size} does not split over {replicas} data-parallel "
                f"replica(s) of micro_batch_size={self.micro_batch_size} ({ranks} ranks, sequence_parallel_size="
                f"{self.sequence_parallel_size}): run on {', '.join(map(str, fits[:8]))} ranks, or change "
                "micro_batch_size"
            )
        derived = self.global_batch_size // per_step
        if self.gradient_accumulation_steps not in (1, derived):
            raise ConfigError(
                f"global_batch_size={self.global_batch_size} gives gradient_accumulation_steps={derived} on {ranks} "
                f"rank(s), but gradient_accumulation_steps={self.gradient_accumulation_steps} is set: unset one"
            )
        return replace(self, gradient_accumulation_steps=derived)


@dataclass
class DriftRunConfig:
    """`dpo-scale ref-drift`: how far an NF4 reference moves reference log-probs and margins from full precision."""

    model: ModelConfig
    data: DataConfig
    out: str
    """Output JSON, written atomically."""
    nf4: NF4Settings = field(default_factory=NF4Settings)
    logps: LogpsConfig = field(default_factory=LogpsConfig)
    num_pairs: int = 256
    """Score the first this many prepared pairs (file order)."""
    beta: float = 0.1
    """The beta of the run this is for: margin errors are reported as beta x |margin error|, the shift of DPO's logit."""
    batch_size: int = 8
    """Pairs per forward."""

    def __post_init__(self) -> None:
        if self.num_pairs < 1 or self.batch_size < 1:
            raise ConfigError(f"num_pairs={self.num_pairs}, batch_size={self.batch_size}: both must be at least 1")
        if self.beta <= 0:
            raise ConfigError(f"beta={self.beta}: must be positive")


@dataclass
class GenerationConfig:
    """Sampling from the policy and the reference for `dpo-scale eval`."""

    num_prompts: int = 32
    """Prompts to sample for (the first this many); 0: no generations."""
    prompts: str | None = None
    """A .txt file (one prompt per line) or .jsonl file (a "prompt" string per row), tokenized as plain text; None:
    the prompts of the held-out pairs, exactly as training tokenized them (chat template included)."""
    samples_per_prompt: int = 2
    max_new_tokens: int = 64
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    """0: no top-k filtering. The KL estimate is unbiased only at temperature 1, top_p 1, top_k 0."""
    batch_size: int = 8
    """Prompts per generate call."""
    seed: int = 0
    reward_fn: str | None = None
    """Optional reward: `package.module:function` or `path/to/file.py:function`, called as
    function(prompts: list[str], completions: list[str]) -> list[float]. Runs your code: name only code you trust."""

    def __post_init__(self) -> None:
        if min(self.samples_per_prompt, self.max_new_tokens, self.batch_size) < 1 or self.num_prompts < 0:
            raise ConfigError("generation: samples_per_prompt, max_new_tokens and batch_size must be >= 1, "
                              "num_prompts >= 0")  # fmt: skip
        if self.temperature <= 0 or not 0 < self.top_p <= 1 or self.top_k < 0:
            raise ConfigError(f"generation: temperature={self.temperature} must be > 0, top_p={self.top_p} in (0, 1], "
                              f"top_k={self.top_k} >= 0")  # fmt: skip
        if self.reward_fn is not None and ":" not in self.reward_fn:
            raise ConfigError(f"generation.reward_fn={self.reward_fn!r}: expected module:function or file.py:function")


@dataclass
class EvalRunConfig:
    """`dpo-scale eval`: a trained policy against its reference, on held-out pairs and on sampled generations."""

    policy: str
    """A run directory (its latest checkpoint), one checkpoint (run_dir/checkpoints/step-N) or a model directory
    (e.g. from `dpo-scale export`)."""
    out: str
    """Output JSON, written atomically; the samples go beside it, its suffix replaced (eval.json -> eval.samples.md)."""
    reference: str | None = None
    """The reference model directory; default: the run's model.path (required when policy is a model directory)."""
    reference_cache: str | None = None
    """Score held-out pairs against this precomputed cache instead of the reference model (generations still use
    the reference model for their KL)."""
    data: DataConfig | None = None
    """Held-out preference pairs; default: the pairs the run held out (eval.fraction of its data, same seed)."""
    num_pairs: int | None = None
    """Score at most this many held-out pairs (None: all)."""
    loss: LossConfig | None = None
    """Default: the run's loss settings (beta and the loss type)."""
    logps: LogpsConfig = field(default_factory=LogpsConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    batch_size: int = 8
    """Pairs per forward."""
    batch_tokens: int | None = None
    """Positions per forward, counted as the layout lays them out; set, each forward holds as many consecutive pairs
    as fit it (batch_size still caps the pairs); none: batch_size pairs."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    device: str = "auto"
    """auto: the first GPU if there is one, else the CPU."""

    def __post_init__(self) -> None:
        _check_choice(self, "", "dtype", Literal["float32", "bfloat16", "float16"])
        if self.batch_size < 1 or (self.num_pairs is not None and self.num_pairs < 1):
            raise ConfigError("batch_size and num_pairs must be at least 1")
        _check_batch_tokens(self.batch_tokens)


def _check_batch_tokens(batch_tokens: int | None) -> None:
    if batch_tokens is not None and batch_tokens < 1:
        raise ConfigError(f"batch_tokens={batch_tokens}: must be at least 1 (or null for batch_size pairs per forward)")


def _check_choice(section: Any, prefix: str, name: str, choices: Any) -> None:
    allowed = typing.get_args(choices)
    value = getattr(section, name)
    if value not in allowed:
        key = f"{prefix}.{name}" if prefix else name
        # YAML reads yes/no/on/off/true/false unquoted as booleans, so `resume=no` arrives as False
        shown = f"{value} (YAML's boolean; no, off and false all read so)" if isinstance(value, bool) else repr(value)
        raise ConfigError(f"{key}={shown}: must be one of {', '.join(allowed)}")


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """`["data.max_length=512", "loss.beta=0.2"]` -> nested dict, values parsed as YAML scalars."""
    tree: dict[str, Any] = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r}: expected key.sub=value, e.g. data.max_length=512")
        node = tree
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {part} is set both as a value and as a section")
        node[leaf] = yaml.safe_load(raw) if raw else ""
    return tree


def merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def load_yaml(path: str | Path) -> dict[str, Any]:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as error:
        raise ConfigError(f"config file {path}: cannot be read ({error.strerror})") from None
    try:
        tree = yaml.safe_load(text) or {}
    except yaml.YAMLError as error:
        raise ConfigError(f"config file {path}: invalid YAML: {error}") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"config file {path}: the top level must be a mapping of sections")
    return tree


# What a command that scores pairs reads from a training config (`--config run.yaml`): the sections it shares with
# training in the same meaning. eval reads neither data (the training data is not its held-out pairs: those come
# from the run, or --data) nor reference (a section in training, a model directory in eval).
_READ_FROM_TRAINING: dict[type, tuple[str, ...]] = {
    LogpsRunConfig: ("model", "data", "logps"),
    DriftRunConfig: ("model", "data", "logps"),
    EvalRunConfig: ("loss", "logps"),
}
# ... and the training keys a command reads under a name of its own: (section, key) -> its key
_ALIASES: dict[type, dict[tuple[str, str], str]] = {
    DriftRunConfig: {("reference", "nf4"): "nf4", ("loss", "beta"): "beta"},
}


def sections_for(cls: type, tree: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """A config file's tree as command `cls` reads it, and the training sections it leaves alone. A file is a
    training config when it has a key of TrainConfig's that `cls` lacks; then only the sections `cls` reads from
    training are kept, and the keys it reads under its own names (_ALIASES), beside `cls`'s own keys. A key no
    command knows is kept, so `build` names it."""
    training = {f.name for f in dataclasses.fields(TrainConfig)}
    own = {f.name for f in dataclasses.fields(cls)}
    if cls not in _READ_FROM_TRAINING or not set(tree) & (training - own):
        return tree, []
    kept = {key: value for key, value in tree.items() if key in _READ_FROM_TRAINING[cls] or key not in training}
    for (section, key), alias in _ALIASES.get(cls, {}).items():
        if isinstance(tree.get(section), dict) and key in tree[section]:
            kept.setdefault(alias, tree[section][key])
    return kept, sorted(set(tree) - set(kept))


def training_aliases(cls: type, tree: dict[str, Any]) -> dict[str, Any]:
    """`tree` with the training keys command `cls` reads under its own names (_ALIASES) moved there. What a command
    line's overrides go through: an override the command does not read stays, and `build` refuses it (asked for
    explicitly, it is not left alone)."""
    moved = dict(tree)
    for (section, key), alias in _ALIASES.get(cls, {}).items():
        values = moved.get(section)
        if isinstance(values, dict) and key in values:
            moved.setdefault(alias, values[key])
            rest = {name: value for name, value in values.items() if name != key}
            if rest:
                moved[section] = rest
            else:
                del moved[section]
    return moved


T = typing.TypeVar("T")


def build(cls: type[T], tree: dict[str, Any], prefix: str = "") -> T:
    """Build dataclass `cls` from a nested dict, naming the key in every error."""
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = set(tree) - set(known)
    if unknown:
        names = ", ".join(prefix + k for k in sorted(unknown))
        raise ConfigError(f"unknown key(s) {names}; known keys: {', '.join(prefix + k for k in known)}")
    kwargs = {}
    for name, f in known.items():
        key = prefix + name
        if name not in tree:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                if dataclasses.is_dataclass(hints[name]):
                    build(hints[name], {}, key + ".")  # raises, naming the first required key inside the section
                raise ConfigError(f"{key} is required and has no default: set it in the config file or as {key}=...")
            continue
        kwargs[name] = _coerce(hints[name], tree[name], key)
    try:
        return cls(**kwargs)
    except TypeError as error:
        raise ConfigError(f"{prefix or 'config'}: {error}") from None


def _coerce(hint: Any, value: Any, key: str) -> Any:
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, dict):
            raise ConfigError(f"{key} must be a section (a mapping), got {value!r}")
        return build(hint, value, key + ".")
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        candidates = [a for a in args if a is not type(None)]
        listed = [a for a in candidates if typing.get_origin(a) in (list, tuple)]
        if len(candidates) > 1 and listed:  # a value or a list of them: the value's shape decides
            scalar = [a for a in candidates if a not in listed]
            return _coerce(listed[0] if isinstance(value, (list, tuple)) else scalar[0], value, key)
        (inner,) = candidates
        return _coerce(inner, value, key)
    if origin is Literal:
        return value  # checked by the section's __post_init__ with the list of choices
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key} must be a list, got {value!r}")
        return origin(value)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key} must be a mapping, got {value!r}")
        return {str(k): str(v) for k, v in value.items()}
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str):  # YAML 1.1 reads 1e-6 (no dot) as a string
        try:
            return float(value)
        except ValueError:
            pass
    if hint in (int, float, str, bool) and not (isinstance(value, hint) and not (hint is int and isinstance(value, bool))):
        raise ConfigError(f"{key}={value!r}: expected {_KIND_NAMES[hint]}")
    return value


_KIND_NAMES = {int: "a whole number, e.g. 4", float: "a number, e.g. 0.1", str: "a string", bool: "true or false"}


def to_dict(config: Any) -> dict[str, Any]:
    return dataclasses.asdict(config)

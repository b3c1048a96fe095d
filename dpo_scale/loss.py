"""Preference losses as pure functions of sequence log-prob sums.

Every variant takes the canonical arguments (`policy_chosen_logps`, `policy_rejected_logps`,
`reference_chosen_logps`, `reference_rejected_logps`, `beta`, ...), all (B,), and returns per-pair
`(losses, chosen_rewards, rejected_rewards)`, all (B,); the caller reduces. With

    Δ = (π_chosen − ref_chosen) − (π_rejected − ref_rejected)        (log-ratio margin, nats)
    Δ_norm = (π_chosen − ref_chosen) / |y_chosen| − (π_rejected − ref_rejected) / |y_rejected|

where |y| is the number of scored completion tokens (clamped to at least 1), the rewards are β·(π − ref), detached
(DPO's implicit reward, eq. 5 of Rafailov et al. 2023, without the partition function), except for reference-free
SimPO whose reward is β·π/|y|.

`build_preference_loss(config)` picks one variant when the run is built and returns a callable on `PairLogps`.
`preference_metrics` gives the logged batch means as device tensors: nothing here calls `.item()`.

Only torch, the standard library and `dpo_scale.config` (which needs PyYAML) are imported, so this module works
without deepspeed or transformers.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F

from dpo_scale.config import FDivergence, LossConfig

LossTriple = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # (losses, chosen_rewards, rejected_rewards), each (B,)


class PairLogps(NamedTuple):
    """Log-prob sums of a batch of pairs under one model (policy or reference).

    A NamedTuple rather than a dataclass: ZeRO-3 attaches its backward hooks to the tensors of a module's output
    only when it can see them (tuples, lists, dicts), and the log-prob module returns this.
    """

    chosen_logps: torch.Tensor  # (B,) sum of log p over the chosen completion's scored tokens
    rejected_logps: torch.Tensor  # (B,)
    chosen_tokens: torch.Tensor  # (B,) number of scored chosen completion tokens (float or long)
    rejected_tokens: torch.Tensor  # (B,)
    chosen_shared_logps: torch.Tensor | None = None
    """(B,) the sum over the chosen completion's first min(|y_w|, |y_l|) tokens: LD-DPO's shared part."""
    rejected_shared_logps: torch.Tensor | None = None
    chosen_weighting_logps: torch.Tensor | None = None
    """(B,) Σ_t (log p_t − log Σ_v p_v²) over the chosen completion, detached: WPO's weight, before the mean."""
    rejected_weighting_logps: torch.Tensor | None = None


@dataclass
class LossOutput:
    losses: torch.Tensor  # (B,) per pair, with the RPO term when enabled; the caller reduces
    chosen_rewards: torch.Tensor  # (B,) detached
    rejected_rewards: torch.Tensor  # (B,) detached


def _upcast(*tensors: torch.Tensor) -> list[torch.Tensor]:
    """fp32 for bf16/fp16/fp32 inputs; float64 stays float64 (gradcheck).

    Why: a log-prob sum is hundreds of nats while Δ is a difference of four of them. bf16 keeps 8 significant bits,
    so a sum near -300 is only representable to within ±1 nat and Δ would be rounded to whole nats before β scales
    it; fp32 keeps that sum to ~2e-5. Our log-prob module already sums in fp32; this keeps a bf16 policy or cached
    reference, and the log σ / square that follow, from losing that precision here. The cast is differentiable, so
    gradients still reach low-precision inputs.
    """
    dtype = torch.float32
    for t in tensors:
        if t.is_floating_point():
            dtype = torch.promote_types(dtype, t.dtype)
    return [t.to(dtype) for t in tensors]


def _lengths(lengths: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Token counts (B,) as `like`'s dtype, clamped to at least 1 so an empty completion cannot divide by zero
    (TRL 1.16 clamps the same way)."""
    return lengths.to(like.dtype).clamp(min=1.0)


def _log_ratios(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    reference_chosen_logps: torch.Tensor,
    reference_rejected_logps: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """log π/π_ref of chosen and of rejected, each (B,), in float32 (or float64)."""
    pc, pr, rc, rr = _upcast(
        policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps
    )  # each (B,)
    return pc - rc, pr - rr


def f_divergence_scores(
    chosen_logratios: torch.Tensor,
    rejected_logratios: torch.Tensor,
    f_divergence: FDivergence = "reverse_kl",
    alpha: float = 0.5,
) -> tuple[torch.Tensor, torch.Tensor]:
    """f-DPO (Wang et al. 2023, arXiv:2309.16240, Table 1): DPO's log-ratio u = log π/π_ref replaced by f'(e^u),
    the derivative of the divergence's generator at the likelihood ratio, for chosen and rejected alike:

        reverse_kl        u                               (DPO)
        forward_kl        1 − e^(−u)
        js_divergence     log 2 + log σ(u)
        alpha_divergence  (e^((α−1)·u) − 1) / (α − 1)     exponent clamped at 80 as TRL 1.16 does; α → 1: u

    Only the losses built on the chosen-minus-rejected difference admit it: there β·log Z(x) cancels.
    """
    if f_divergence == "reverse_kl" or (f_divergence == "alpha_divergence" and abs(alpha - 1.0) < 1e-6):
        return chosen_logratios, rejected_logratios
    if f_divergence == "forward_kl":
        return 1 - torch.exp(-chosen_logratios), 1 - torch.exp(-rejected_logratios)
    if f_divergence == "js_divergence":
        return math.log(2) + F.logsigmoid(chosen_logratios), math.log(2) + F.logsigmoid(rejected_logratios)
    if f_divergence == "alpha_divergence":
        scale = 1.0 / (alpha - 1.0)
        chosen = torch.exp(torch.clamp((alpha - 1.0) * chosen_logratios, max=80.0)) - 1.0
        rejected = torch.exp(torch.clamp((alpha - 1.0) * rejected_logratios, max=80.0)) - 1.0
        return chosen * scale, rejected * scale
    raise ValueError(f"unknown f_divergence {f_divergence!r}")


def _score_margin(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    reference_chosen_logps: torch.Tensor,
    reference_rejected_logps: torch.Tensor,
    f_divergence: FDivergence,
    alpha: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(chosen log-ratio, rejected log-ratio, chosen score, rejected score), scores by `f_divergence_scores`."""
    chosen_logratios, rejected_logratios = _log_ratios(
        policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps
    )
    return chosen_logratios, rejected_logratios, *f_divergence_scores(
        chosen_logratios, rejected_logratios, f_divergence, alpha
    )


def _per_token_margin(
    chosen_logratios: torch.Tensor,
    rejected_logratios: torch.Tensor,
    chosen_lengths: torch.Tensor,
    rejected_lengths: torch.Tensor,
) -> torch.Tensor:
    """Δ_norm (B,), nats per token: each log-ratio divided by its completion's token count."""
    return chosen_logratios / _lengths(chosen_lengths, chosen_logratios) - rejected_logratios / _lengths(
        rejected_lengths, rejected_logratios
    )


def _rewards(
    chosen_logratios: torch.Tensor, rejected_logratios: torch.Tensor, beta: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """β·log π/π_ref of chosen and rejected, detached: DPO's implicit rewards (eq. 5 without β·log Z)."""
    return beta * chosen_logratios.detach(), beta * rejected_logratios.detach()


def sigmoid_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    reference_chosen_logps: torch.Tensor,
    reference_rejected_logps: torch.Tensor,
    beta: float,
    label_smoothing: float = 0.0,
    f_divergence: FDivergence = "reverse_kl",
    alpha: float = 0.5,
) -> LossTriple:
    """DPO (Rafailov et al. 2023, eq. 7) with conservative label smoothing (cDPO, Mitchell 2023, eq. 3):

        loss = −(1 − ε)·log σ(β·Δ) − ε·log σ(−β·Δ)

    ε = label_smoothing is the assumed probability that a pair's label is flipped; ε = 0 is plain DPO. Δ is taken
    over f-divergence scores (`f_divergence_scores`; reverse KL: the log-ratios).
    """
    chosen_logratios, rejected_logratios, chosen_scores, rejected_scores = _score_margin(
        policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps, f_divergence,
        alpha,
    )  # fmt: skip
    delta = chosen_scores - rejected_scores  # (B,) Δ
    losses = -(1 - label_smoothing) * F.logsigmoid(beta * delta) - label_smoothing * F.logsigmoid(-beta * delta)
    return (losses, *_rewards(chosen_logratios, rejected_logratios, beta))


def robust_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    reference_chosen_logps: torch.Tensor,
    reference_rejected_logps: torch.Tensor,
    beta: float,
    label_smoothing: float,
    f_divergence: FDivergence = "reverse_kl",
    alpha: float = 0.5,
) -> LossTriple:
    """Robust DPO (rDPO, Chowdhury et al. 2024, arXiv:2403.00409): the de-biased loss under label flips of rate ε,

        loss = [−(1 − ε)·log σ(β·Δ) + ε·log σ(−β·Δ)] / (1 − 2ε),   0 ≤ ε < 1/2

    i.e. ((1 − ε)·ℓ(y_w, y_l) − ε·ℓ(y_l, y_w)) / (1 − 2ε) with ℓ the DPO loss: its expectation over noisy
    labels is the clean DPO loss. Unlike cDPO it can be negative. Δ over f-divergence scores.
    """
    chosen_logratios, rejected_logratios, chosen_scores, rejected_scores = _score_margin(
        policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps, f_divergence,
        alpha,
    )  # fmt: skip
    delta = chosen_scores - rejected_scores  # (B,) Δ
    clean = -(1 - label_smoothing) * F.logsigmoid(beta * delta)  # (1 − ε)·ℓ(y_w, y_l)
    flipped = -label_smoothing * F.logsigmoid(-beta * delta)  # ε·ℓ(y_l, y_w)
    losses = (clean - flipped) / (1 - 2 * label_smoothing)
    return (losses, *_rewards(chosen_logratios, rejected_logratios, beta))


def ipo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    reference_chosen_logps: torch.Tensor,
    reference_rejected_logps: torch.Tensor,
    beta: float,
    chosen_lengths: torch.Tensor,
    rejected_lengths: torch.Tensor,
    f_divergence: FDivergence = "reverse_kl",
    alpha: float = 0.5,
) -> LossTriple:
    """IPO (Azar et al. 2023, eq. 17), β playing the role of the paper's τ, with per-token log-ratios:

        loss = (Δ_norm − 1/(2β))²

    The paper writes sequence log-ratios; summed over tokens they make the square grow with completion length, so
    each log-ratio (or f-divergence score) is divided by its token count (clamped to ≥ 1), exactly as TRL 1.16 does
    (which reports that the IPO authors confirmed this normalisation). Rewards stay un-normalised β·(π − ref).
    """
    chosen_logratios, rejected_logratios, chosen_scores, rejected_scores = _score_margin(
        policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps, f_divergence,
        alpha,
    )  # fmt: skip
    delta_norm = _per_token_margin(chosen_scores, rejected_scores, chosen_lengths, rejected_lengths)
    losses = (delta_norm - 1 / (2 * beta)) ** 2
    return (losses, *_rewards(chosen_logratios, rejected_logratios, beta))


def hinge_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    reference_chosen_logps: torch.Tensor,
    reference_rejected_logps: torch.Tensor,
    beta: float,
    f_divergence: FDivergence = "reverse_kl",
    alpha: float = 0.5,
) -> LossTriple:
    """SLiC hinge (Zhao et al. 2023, arXiv:2305.10425, rank-calibration loss; as used by RSO, arXiv:2309.06657):

        loss = max(0, 1 − β·Δ)

    i.e. a margin of 1/β nats on the log-ratio difference (or on the f-divergence scores' difference).
    """
    chosen_logratios, rejected_logratios, chosen_scores, rejected_scores = _score_margin(
        policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps, f_divergence,
        alpha,
    )  # fmt: skip
    losses = torch.relu(1 - beta * (chosen_scores - rejected_scores))
    return (losses, *_rewards(chosen_logratios, rejected_logratios, beta))


def sigmoid_norm_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    reference_chosen_logps: torch.Tensor,
    reference_rejected_logps: torch.Tensor,
    beta: float,
    chosen_lengths: torch.Tensor,
    rejected_lengths: torch.Tensor,
    f_divergence: FDivergence = "reverse_kl",
    alpha: float = 0.5,
) -> LossTriple:
    """Length-normalised DPO (TRL's `sigmoid_norm`): DPO eq. 7 on per-token log-ratios,

        loss = −log σ(β·Δ_norm)

    with Δ_norm normalised as in `ipo_loss`. Rewards stay un-normalised β·(π − ref).
    """
    chosen_logratios, rejected_logratios, chosen_scores, rejected_scores = _score_margin(
        policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps, f_divergence,
        alpha,
    )  # fmt: skip
    delta_norm = _per_token_margin(chosen_scores, rejected_scores, chosen_lengths, rejected_lengths)
    losses = -F.logsigmoid(beta * delta_norm)
    return (losses, *_rewards(chosen_logratios, rejected_logratios, beta))


def exo_pair_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    reference_chosen_logps: torch.Tensor,
    reference_rejected_logps: torch.Tensor,
    beta: float,
    label_smoothing: float,
    f_divergence: FDivergence = "reverse_kl",
    alpha: float = 0.5,
) -> LossTriple:
    """EXO (Ji et al. 2024, arXiv:2402.00856, eq. 16, K = 2): the reverse KL from the model's preference
    distribution q = softmax(β·(score_w, score_l)) to the labels' p = (1 − ε, ε):

        loss = σ(β·Δ)·(log σ(β·Δ) − log(1 − ε)) + σ(−β·Δ)·(log σ(−β·Δ) − log ε),   0 < ε < 1/2
    """
    chosen_logratios, rejected_logratios, chosen_scores, rejected_scores = _score_margin(
        policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps, f_divergence,
        alpha,
    )  # fmt: skip
    logits = beta * (chosen_scores - rejected_scores)  # (B,)
    losses = torch.sigmoid(logits) * (F.logsigmoid(logits) - math.log1p(-label_smoothing)) + torch.sigmoid(
        -logits
    ) * (F.logsigmoid(-logits) - math.log(label_smoothing))
    return (losses, *_rewards(chosen_logratios, rejected_logratios, beta))


def nca_pair_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    reference_chosen_logps: torch.Tensor,
    reference_rejected_logps: torch.Tensor,
    beta: float,
) -> LossTriple:
    """NCA (Chen et al. 2024, arXiv:2402.05369, eq. 11, K = 2), with r = β·log π/π_ref of each completion:

        loss = −log σ(r_w) − ½·log σ(−r_w) − ½·log σ(−r_l)

    Absolute rather than relative rewards: it raises the chosen likelihood, where DPO may lower both.
    """
    chosen_logratios, rejected_logratios = _log_ratios(
        policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps
    )
    chosen, rejected = beta * chosen_logratios, beta * rejected_logratios  # (B,) r_w, r_l
    losses = -F.logsigmoid(chosen) - 0.5 * F.logsigmoid(-chosen) - 0.5 * F.logsigmoid(-rejected)
    return (losses, *_rewards(chosen_logratios, rejected_logratios, beta))


def bco_pair_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    reference_chosen_logps: torch.Tensor,
    reference_rejected_logps: torch.Tensor,
    beta: float,
) -> LossTriple:
    """BCO on pairs (Jung et al. 2024, arXiv:2404.04656, eq. 6 without the running reward shift, as TRL 1.16):
    a binary classifier of chosen against rejected on the implicit rewards r = β·log π/π_ref,

        loss = −log σ(r_w) − log σ(−r_l)
    """
    chosen_logratios, rejected_logratios = _log_ratios(
        policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps
    )
    losses = -F.logsigmoid(beta * chosen_logratios) - F.logsigmoid(-beta * rejected_logratios)
    return (losses, *_rewards(chosen_logratios, rejected_logratios, beta))


def sppo_hard_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    reference_chosen_logps: torch.Tensor,
    reference_rejected_logps: torch.Tensor,
    beta: float,
) -> LossTriple:
    """SPPO (Wu et al. 2024, arXiv:2405.00675, eq. 4.7) with hard win probabilities (1 for the chosen, 0 for the
    rejected) in place of the paper's PairRM estimates:

        loss = (log π/π_ref(y_w) − 1/(2β))² + (log π/π_ref(y_l) + 1/(2β))²
    """
    chosen_logratios, rejected_logratios = _log_ratios(
        policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps
    )
    losses = (chosen_logratios - 0.5 / beta) ** 2 + (rejected_logratios + 0.5 / beta) ** 2
    return (losses, *_rewards(chosen_logratios, rejected_logratios, beta))


def aot_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    reference_chosen_logps: torch.Tensor,
    reference_rejected_logps: torch.Tensor,
    beta: float,
    label_smoothing: float = 0.0,
) -> LossTriple:
    """AOT, paired (Melnyk et al. 2024, arXiv:2406.05882): distributional alignment by optimal transport in one
    dimension, i.e. between the sorted batches of the policy's and the reference's chosen-minus-rejected
    log-probs,

        d = sort_B(π_w − π_l) − sort_B(ref_w − ref_l)
        loss = −(1 − ε)·log σ(β·d) − ε·log σ(−β·d)

    The losses are per rank of the sorted batch, not per pair: the batch (a micro-batch here) is the unit.
    """
    pc, pr, rc, rr = _upcast(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps)
    delta = torch.sort(pc - pr, dim=0).values - torch.sort(rc - rr, dim=0).values  # (B,)
    losses = -(1 - label_smoothing) * F.logsigmoid(beta * delta) - label_smoothing * F.logsigmoid(-beta * delta)
    return (losses, *_rewards(pc - rc, pr - rr, beta))


def aot_unpaired_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    reference_chosen_logps: torch.Tensor,
    reference_rejected_logps: torch.Tensor,
    beta: float,
    label_smoothing: float = 0.0,
) -> LossTriple:
    """AOT, unpaired (Melnyk et al. 2024, arXiv:2406.05882): the chosen and the rejected log-ratios sorted
    separately over the batch, for data whose chosen and rejected completions are not matched pairs,

        d = sort_B(log π/π_ref(y_w)) − sort_B(log π/π_ref(y_l))
        loss = −(1 − ε)·log σ(β·d) − ε·log σ(−β·d)
    """
    chosen_logratios, rejected_logratios = _log_ratios(
        policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps
    )
    delta = torch.sort(chosen_logratios, dim=0).values - torch.sort(rejected_logratios, dim=0).values  # (B,)
    losses = -(1 - label_smoothing) * F.logsigmoid(beta * delta) - label_smoothing * F.logsigmoid(-beta * delta)
    return (losses, *_rewards(chosen_logratios, rejected_logratios, beta))


def apo_zero_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    reference_chosen_logps: torch.Tensor,
    reference_rejected_logps: torch.Tensor,
    beta: float,
) -> LossTriple:
    """APO-zero (D'Oosterlinck et al. 2024, arXiv:2408.06266, eq. 7), for chosen completions better than the
    model's own: raise the chosen likelihood, lower the rejected one, each on its own,

        loss = 1 − σ(β·log π/π_ref(y_w)) + σ(β·log π/π_ref(y_l))
    """
    chosen_logratios, rejected_logratios = _log_ratios(
        policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps
    )
    losses = 1 - torch.sigmoid(beta * chosen_logratios) + torch.sigmoid(beta * rejected_logratios)
    return (losses, *_rewards(chosen_logratios, rejected_logratios, beta))


def apo_down_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    reference_chosen_logps: torch.Tensor,
    reference_rejected_logps: torch.Tensor,
    beta: float,
) -> LossTriple:
    """APO-down (D'Oosterlinck et al. 2024, arXiv:2408.06266, eq. 8), for chosen completions worse than the
    model's own: lower both likelihoods, the rejected one more,

        loss = σ(β·log π/π_ref(y_w)) + 1 − σ(β·Δ)
    """
    chosen_logratios, rejected_logratios = _log_ratios(
        policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps
    )
    losses = torch.sigmoid(beta * chosen_logratios) + 1 - torch.sigmoid(beta * (chosen_logratios - rejected_logratios))
    return (losses, *_rewards(chosen_logratios, rejected_logratios, beta))


def discopop_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    reference_chosen_logps: torch.Tensor,
    reference_rejected_logps: torch.Tensor,
    beta: float,
    tau: float = 0.05,
    f_divergence: FDivergence = "reverse_kl",
    alpha: float = 0.5,
) -> LossTriple:
    """DiscoPOP, the log-ratio modulated loss (Chris Lu et al. 2024, arXiv:2406.08414, eq. 5): the logistic (DPO)
    and exponential losses blended by a sigmoid of the margin at temperature τ,

        m = σ(β·Δ / τ)
        loss = (1 − m)·(−log σ(β·Δ)) + m·e^(−β·Δ)
    """
    chosen_logratios, rejected_logratios, chosen_scores, rejected_scores = _score_margin(
        policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps, f_divergence,
        alpha,
    )  # fmt: skip
    logits = beta * (chosen_scores - rejected_scores)  # (B,)
    modulation = torch.sigmoid(logits / tau)
    losses = -F.logsigmoid(logits) * (1 - modulation) + torch.exp(-logits) * modulation
    return (losses, *_rewards(chosen_logratios, rejected_logratios, beta))


def simpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    chosen_lengths: torch.Tensor,
    rejected_lengths: torch.Tensor,
    beta: float,
    gamma: float,
) -> LossTriple:
    """SimPO (Meng et al. 2024, eq. 6), reference-free, with γ the target reward margin:

        r(y) = β·log π(y|x) / |y|                                    (eq. 4, the average log-prob reward)
        loss = −log σ(r(y_w) − r(y_l) − γ)

    The rewards returned are r(y_w), r(y_l), detached.
    """
    chosen, rejected = _upcast(policy_chosen_logps, policy_rejected_logps)
    chosen_rewards = beta * chosen / _lengths(chosen_lengths, chosen)  # (B,) r(y_w)
    rejected_rewards = beta * rejected / _lengths(rejected_lengths, rejected)  # (B,) r(y_l)
    losses = -F.logsigmoid(chosen_rewards - rejected_rewards - gamma)
    return losses, chosen_rewards.detach(), rejected_rewards.detach()


def nll_loss(policy_chosen_logps: torch.Tensor, chosen_lengths: torch.Tensor) -> torch.Tensor:
    """Length-normalised NLL of the chosen completion, the term RPO adds to DPO (Pang et al. 2024,
    arXiv:2404.19733):

        nll = −log π(y_w|x) / |y_w|                                  (B,), nats per token
    """
    (chosen,) = _upcast(policy_chosen_logps)
    return -chosen / _lengths(chosen_lengths, chosen)


def sft_loss(
    policy_chosen_logps: torch.Tensor, chosen_lengths: torch.Tensor, chosen_tokens_per_pair: float | None = None
) -> torch.Tensor:
    """Supervised NLL of the chosen completions, the mean over their tokens (TRL 1.16's `sft`, the third term of
    MPO, arXiv:2411.10442), as per-pair terms whose batch mean is it:

        loss_i = −log π(y_w,i|x_i) / (Σ_b |y_w,b| / B)               (B,); mean_i loss_i = −Σ_b log π / Σ_b |y_w,b|

    `chosen_tokens_per_pair` is Σ|y_w| / B over the batch the token mean is taken on: by default this one; the
    training loop passes the optimizer step's, so that the term is the mean over the step's tokens however the
    step is split into micro-batches."""
    (chosen,) = _upcast(policy_chosen_logps)
    if chosen_tokens_per_pair is None:
        chosen_tokens_per_pair = chosen_lengths.to(chosen.dtype).sum().clamp(min=1.0) / chosen.numel()
    return -chosen / chosen_tokens_per_pair


def length_desensitised(logps: PairLogps, ld_alpha: float) -> PairLogps:
    """LD-DPO (Liu et al. 2024, arXiv:2409.06411, eq. 9): each completion's log-prob with the tokens beyond the
    shorter completion's length weighted by α,

        log π_ld(y) = log π(y_{≤ℓ}) + α·log π(y_{>ℓ}),   ℓ = min(|y_w|, |y_l|)

    so that the longer completion's extra tokens no longer dominate Δ. Needs the shared-part sums."""
    if logps.chosen_shared_logps is None or logps.rejected_shared_logps is None:
        raise ValueError("loss.ld_alpha needs the sums over the shared part of each pair (chosen_shared_logps)")
    chosen = logps.chosen_shared_logps + ld_alpha * (logps.chosen_logps - logps.chosen_shared_logps)
    rejected = logps.rejected_shared_logps + ld_alpha * (logps.rejected_logps - logps.rejected_shared_logps)
    return logps._replace(chosen_logps=chosen, rejected_logps=rejected)


def wpo_weights(policy: PairLogps) -> torch.Tensor:
    """WPO (Zhou et al. 2024, arXiv:2406.11827, eq. 2, with TRL 1.16's alignment of the sampling distribution): the
    probability that the current policy would have produced each completion, per token,

        w(y) = exp( Σ_t (log π(y_t) − log Σ_v π(v)²) / |y| ),     weight = w(y_w)·w(y_l)   (B,), detached

    log Σ_v π(v)² is the log-probability of the policy's own greedy-ish draw at that position: subtracting it keeps
    weights from shrinking with the model's entropy."""
    if policy.chosen_weighting_logps is None or policy.rejected_weighting_logps is None:
        raise ValueError("loss.use_weighting needs the policy's weighting sums: PairLogpsModel(..., weighting=True)")
    chosen = torch.exp(policy.chosen_weighting_logps / _lengths(policy.chosen_tokens, policy.chosen_weighting_logps))
    rejected = torch.exp(
        policy.rejected_weighting_logps / _lengths(policy.rejected_tokens, policy.rejected_weighting_logps)
    )
    return (chosen * rejected).detach()


# Adapters from (policy, reference, config) to one variant; `build_preference_loss` picks one, once.
_Variant = Callable[[PairLogps, PairLogps | None, LossConfig], LossTriple]


def _logps(policy: PairLogps, reference: PairLogps, config: LossConfig) -> tuple[torch.Tensor, ...]:
    """The four canonical positional arguments: policy chosen / rejected, reference chosen / rejected; LD-DPO's
    when loss.ld_alpha is set."""
    if config.ld_alpha is not None:
        policy, reference = length_desensitised(policy, config.ld_alpha), length_desensitised(reference, config.ld_alpha)
    return policy.chosen_logps, policy.rejected_logps, reference.chosen_logps, reference.rejected_logps


def _lengths_of(policy: PairLogps) -> dict[str, torch.Tensor]:
    return {"chosen_lengths": policy.chosen_tokens, "rejected_lengths": policy.rejected_tokens}


def _f(config: LossConfig) -> dict:
    return {"f_divergence": config.f_divergence, "alpha": config.f_alpha_divergence_coef}


def _sigmoid(policy: PairLogps, reference: PairLogps, config: LossConfig) -> LossTriple:
    return sigmoid_loss(*_logps(policy, reference, config), config.beta, config.label_smoothing, **_f(config))


def _robust(policy: PairLogps, reference: PairLogps, config: LossConfig) -> LossTriple:
    return robust_loss(*_logps(policy, reference, config), config.beta, config.label_smoothing, **_f(config))


def _ipo(policy: PairLogps, reference: PairLogps, config: LossConfig) -> LossTriple:
    return ipo_loss(*_logps(policy, reference, config), config.beta, **_lengths_of(policy), **_f(config))


def _hinge(policy: PairLogps, reference: PairLogps, config: LossConfig) -> LossTriple:
    return hinge_loss(*_logps(policy, reference, config), config.beta, **_f(config))


def _sigmoid_norm(policy: PairLogps, reference: PairLogps, config: LossConfig) -> LossTriple:
    return sigmoid_norm_loss(*_logps(policy, reference, config), config.beta, **_lengths_of(policy), **_f(config))


def _simpo(policy: PairLogps, reference: None, config: LossConfig) -> LossTriple:
    return simpo_loss(
        policy.chosen_logps, policy.rejected_logps, **_lengths_of(policy), beta=config.beta, gamma=config.simpo_gamma
    )


def _exo_pair(policy: PairLogps, reference: PairLogps, config: LossConfig) -> LossTriple:
    return exo_pair_loss(*_logps(policy, reference, config), config.beta, config.label_smoothing, **_f(config))


def _aot(policy: PairLogps, reference: PairLogps, config: LossConfig) -> LossTriple:
    return aot_loss(*_logps(policy, reference, config), config.beta, config.label_smoothing)


def _aot_unpaired(policy: PairLogps, reference: PairLogps, config: LossConfig) -> LossTriple:
    return aot_unpaired_loss(*_logps(policy, reference, config), config.beta, config.label_smoothing)


def _discopop(policy: PairLogps, reference: PairLogps, config: LossConfig) -> LossTriple:
    return discopop_loss(*_logps(policy, reference, config), config.beta, config.discopop_tau, **_f(config))


def _beta_only(loss: Callable[..., LossTriple]) -> _Variant:
    return lambda policy, reference, config: loss(*_logps(policy, reference, config), config.beta)


def _sft(
    policy: PairLogps, reference: PairLogps, config: LossConfig, chosen_tokens_per_pair: float | None = None
) -> LossTriple:
    """The NLL of the plain sums, LD-DPO or not (TRL); it has no rewards of its own, those logged are DPO's, as TRL
    logs them."""
    rewards = _rewards(*_log_ratios(*_logps(policy, reference, config)), config.beta)
    return (sft_loss(policy.chosen_logps, policy.chosen_tokens, chosen_tokens_per_pair), *rewards)


_VARIANTS: dict[str, _Variant] = {
    "sigmoid": _sigmoid,
    "robust": _robust,
    "ipo": _ipo,
    "hinge": _hinge,
    "sigmoid_norm": _sigmoid_norm,
    "simpo": _simpo,
    "exo_pair": _exo_pair,
    "nca_pair": _beta_only(nca_pair_loss),
    "bco_pair": _beta_only(bco_pair_loss),
    "sppo_hard": _beta_only(sppo_hard_loss),
    "aot": _aot,
    "aot_unpaired": _aot_unpaired,
    "apo_zero": _beta_only(apo_zero_loss),
    "apo_down": _beta_only(apo_down_loss),
    "discopop": _discopop,
    "sft": _sft,
}


def build_preference_loss(config: LossConfig) -> Callable[[PairLogps, PairLogps | None], LossOutput]:
    """The loss of `config.loss_type`, chosen once: one variant, or the weighted sum of several (per pair, so its
    mean is TRL's sum of weighted means), plus `rpo_alpha`·`nll_loss` when `rpo_alpha` is set.

    The returned callable takes the policy's `PairLogps` and the reference's (None for reference-free SimPO), and
    optionally `chosen_tokens_per_pair` for the `sft` term (`sft_loss`); token counts are read from the policy's. Losses are per pair: the caller reduces. Rewards are the first
    variant's: β·log π/π_ref for every variant but SimPO.
    """
    variants = [(_VARIANTS[loss_type], weight) for loss_type, weight in zip(config.loss_types, config.weights)]
    needs_reference = not config.reference_free
    rpo_alpha = config.rpo_alpha

    def term(variant: _Variant, policy: PairLogps, reference: PairLogps | None, tokens: float | None) -> LossTriple:
        return _sft(policy, reference, config, tokens) if variant is _sft else variant(policy, reference, config)

    def preference_loss(
        policy: PairLogps, reference: PairLogps | None, chosen_tokens_per_pair: float | None = None
    ) -> LossOutput:
        if needs_reference and reference is None:
            raise ValueError(
                f"loss.loss_type={config.loss_type} needs reference log-probs: pass the reference model's PairLogps "
                "(or use loss.loss_type=simpo, which is reference-free)"
            )
        if not needs_reference and reference is not None:
            raise ValueError(
                f"loss.loss_type={config.loss_type} is reference-free: pass reference=None (computing reference "
                "log-probs for it is wasted work)"
            )
        losses, chosen_rewards, rejected_rewards = term(variants[0][0], policy, reference, chosen_tokens_per_pair)
        losses = losses if variants[0][1] == 1.0 else variants[0][1] * losses  # each (B,)
        for variant, weight in variants[1:]:
            losses = losses + weight * term(variant, policy, reference, chosen_tokens_per_pair)[0]
        if config.use_weighting:
            losses = losses * wpo_weights(policy)
        if rpo_alpha is not None:
            losses = losses + rpo_alpha * nll_loss(policy.chosen_logps, policy.chosen_tokens)  # RPO
        return LossOutput(losses, chosen_rewards, rejected_rewards)

    return preference_loss


def preference_metrics(output: LossOutput, policy: PairLogps) -> dict[str, torch.Tensor]:
    """Batch means to log, each a detached 0-dim tensor on the losses' device.

    No `.item()` here: converting is a CPU-GPU sync point, which the caller does once per log interval.
    """
    chosen, rejected = output.chosen_rewards.detach(), output.rejected_rewards.detach()  # (B,)
    return {
        "loss": output.losses.detach().mean(),
        "rewards/chosen": chosen.mean(),
        "rewards/rejected": rejected.mean(),
        "rewards/margins": (chosen - rejected).mean(),
        "rewards/accuracies": (chosen > rejected).to(chosen.dtype).mean(),
        "logps/chosen": policy.chosen_logps.detach().to(chosen.dtype).mean(),
        "logps/rejected": policy.rejected_logps.detach().to(chosen.dtype).mean(),
    }

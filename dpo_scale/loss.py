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

from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F

from dpo_scale.config import LossConfig, LossType

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
) -> LossTriple:
    """DPO (Rafailov et al. 2023, eq. 7) with conservative label smoothing (cDPO, Mitchell 2023, eq. 3):

        loss = −(1 − ε)·log σ(β·Δ) − ε·log σ(−β·Δ)

    ε = label_smoothing is the assumed probability that a pair's label is flipped; ε = 0 is plain DPO.
    """
    chosen_logratios, rejected_logratios = _log_ratios(
        policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps
    )
    delta = chosen_logratios - rejected_logratios  # (B,) Δ
    losses = -(1 - label_smoothing) * F.logsigmoid(beta * delta) - label_smoothing * F.logsigmoid(-beta * delta)
    return (losses, *_rewards(chosen_logratios, rejected_logratios, beta))


def robust_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    reference_chosen_logps: torch.Tensor,
    reference_rejected_logps: torch.Tensor,
    beta: float,
    label_smoothing: float,
) -> LossTriple:
    """Robust DPO (rDPO, Chowdhury et al. 2024, arXiv:2403.00409): the de-biased loss under label flips of rate ε,

        loss = [−(1 − ε)·log σ(β·Δ) + ε·log σ(−β·Δ)] / (1 − 2ε),   0 ≤ ε < 1/2

    i.e. ((1 − ε)·ℓ(y_w, y_l) − ε·ℓ(y_l, y_w)) / (1 − 2ε) with ℓ the DPO loss: its expectation over noisy
    labels is the clean DPO loss. Unlike cDPO it can be negative.
    """
    chosen_logratios, rejected_logratios = _log_ratios(
        policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps
    )
    delta = chosen_logratios - rejected_logratios  # (B,) Δ
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
) -> LossTriple:
    """IPO (Azar et al. 2023, eq. 17), β playing the role of the paper's τ, with per-token log-ratios:

        loss = (Δ_norm − 1/(2β))²

    The paper writes sequence log-ratios; summed over tokens they make the square grow with completion length, so
    each log-ratio is divided by its token count (clamped to ≥ 1), exactly as TRL 1.16 does (which reports that the
    IPO authors confirmed this normalisation). Rewards stay un-normalised β·(π − ref).
    """
    chosen_logratios, rejected_logratios = _log_ratios(
        policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps
    )
    delta_norm = _per_token_margin(chosen_logratios, rejected_logratios, chosen_lengths, rejected_lengths)
    losses = (delta_norm - 1 / (2 * beta)) ** 2
    return (losses, *_rewards(chosen_logratios, rejected_logratios, beta))


def hinge_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    reference_chosen_logps: torch.Tensor,
    reference_rejected_logps: torch.Tensor,
    beta: float,
) -> LossTriple:
    """SLiC hinge (Zhao et al. 2023, arXiv:2305.10425, rank-calibration loss; as used by RSO, arXiv:2309.06657):

        loss = max(0, 1 − β·Δ)

    i.e. a margin of 1/β nats on the log-ratio difference.
    """
    chosen_logratios, rejected_logratios = _log_ratios(
        policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps
    )
    delta = chosen_logratios - rejected_logratios  # (B,) Δ
    losses = torch.relu(1 - beta * delta)
    return (losses, *_rewards(chosen_logratios, rejected_logratios, beta))


def sigmoid_norm_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    reference_chosen_logps: torch.Tensor,
    reference_rejected_logps: torch.Tensor,
    beta: float,
    chosen_lengths: torch.Tensor,
    rejected_lengths: torch.Tensor,
) -> LossTriple:
    """Length-normalised DPO (TRL's `sigmoid_norm`): DPO eq. 7 on per-token log-ratios,

        loss = −log σ(β·Δ_norm)

    with Δ_norm normalised as in `ipo_loss`. Rewards stay un-normalised β·(π − ref).
    """
    chosen_logratios, rejected_logratios = _log_ratios(
        policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps
    )
    delta_norm = _per_token_margin(chosen_logratios, rejected_logratios, chosen_lengths, rejected_lengths)
    losses = -F.logsigmoid(beta * delta_norm)
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


# Adapters from (policy, reference, config) to one variant; `build_preference_loss` picks one, once.
_Variant = Callable[[PairLogps, PairLogps | None, LossConfig], LossTriple]


def _logps(policy: PairLogps, reference: PairLogps) -> tuple[torch.Tensor, ...]:
    """The four canonical positional arguments: policy chosen / rejected, reference chosen / rejected."""
    return policy.chosen_logps, policy.rejected_logps, reference.chosen_logps, reference.rejected_logps


def _lengths_of(policy: PairLogps) -> dict[str, torch.Tensor]:
    return {"chosen_lengths": policy.chosen_tokens, "rejected_lengths": policy.rejected_tokens}


def _sigmoid(policy: PairLogps, reference: PairLogps, config: LossConfig) -> LossTriple:
    return sigmoid_loss(*_logps(policy, reference), beta=config.beta, label_smoothing=config.label_smoothing)


def _robust(policy: PairLogps, reference: PairLogps, config: LossConfig) -> LossTriple:
    return robust_loss(*_logps(policy, reference), beta=config.beta, label_smoothing=config.label_smoothing)


def _ipo(policy: PairLogps, reference: PairLogps, config: LossConfig) -> LossTriple:
    return ipo_loss(*_logps(policy, reference), beta=config.beta, **_lengths_of(policy))


def _hinge(policy: PairLogps, reference: PairLogps, config: LossConfig) -> LossTriple:
    return hinge_loss(*_logps(policy, reference), beta=config.beta)


def _sigmoid_norm(policy: PairLogps, reference: PairLogps, config: LossConfig) -> LossTriple:
    return sigmoid_norm_loss(*_logps(policy, reference), beta=config.beta, **_lengths_of(policy))


def _simpo(policy: PairLogps, reference: None, config: LossConfig) -> LossTriple:
    return simpo_loss(
        policy.chosen_logps, policy.rejected_logps, **_lengths_of(policy), beta=config.beta, gamma=config.simpo_gamma
    )


_VARIANTS: dict[LossType, _Variant] = {
    "sigmoid": _sigmoid,
    "robust": _robust,
    "ipo": _ipo,
    "hinge": _hinge,
    "sigmoid_norm": _sigmoid_norm,
    "simpo": _simpo,
}


def build_preference_loss(config: LossConfig) -> Callable[[PairLogps, PairLogps | None], LossOutput]:
    """The loss of `config.loss_type`, chosen once, plus `rpo_alpha`·`nll_loss` when `rpo_alpha` is set.

    The returned callable takes the policy's `PairLogps` and the reference's (None for reference-free SimPO);
    token counts are read from the policy's. Losses are per pair: the caller reduces.
    """
    variant = _VARIANTS[config.loss_type]
    needs_reference = not config.reference_free
    rpo_alpha = config.rpo_alpha

    def preference_loss(policy: PairLogps, reference: PairLogps | None) -> LossOutput:
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
        losses, chosen_rewards, rejected_rewards = variant(policy, reference, config)  # each (B,)
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

"""Preference losses: a paper-formula oracle, the policy = reference fixed points, TRL 1.16's own loss code,
config errors, gradients and metrics."""

from __future__ import annotations

import math
import typing
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from dpo_scale.config import ConfigError, LossConfig, LossType
from dpo_scale.loss import (
    LossOutput,
    PairLogps,
    aot_loss,
    aot_unpaired_loss,
    apo_down_loss,
    apo_zero_loss,
    bco_pair_loss,
    build_preference_loss,
    discopop_loss,
    exo_pair_loss,
    f_divergence_scores,
    hinge_loss,
    ipo_loss,
    nca_pair_loss,
    nll_loss,
    preference_metrics,
    robust_loss,
    sft_loss,
    sigmoid_loss,
    sigmoid_norm_loss,
    simpo_loss,
    sppo_hard_loss,
)

BETAS = [0.1, 0.5, 2.0]
SMOOTHINGS = [0.0, 0.1, 0.3]


# ---------------------------------------------------------------------------------------------------------------
# Oracle: each paper's formula for ONE pair, on Python floats (float64), no torch.
# pc, pr: policy log p(y_w|x), log p(y_l|x); rc, rr: the reference's; lc, lr: completion token counts.
# ---------------------------------------------------------------------------------------------------------------


def _log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def _dpo_margin(pc, pr, rc, rr, beta):
    """β·log π(y_w)/π_ref(y_w) − β·log π(y_l)/π_ref(y_l), the argument of σ in DPO eq. 7."""
    return beta * (pc - rc) - beta * (pr - rr)


def oracle_sigmoid(pc, pr, rc, rr, beta, eps):
    """DPO eq. 7 with cDPO's flip probability ε (Mitchell 2023): cross-entropy against soft labels (1 − ε, ε)."""
    u = _dpo_margin(pc, pr, rc, rr, beta)
    return -(1 - eps) * _log_sigmoid(u) - eps * _log_sigmoid(-u)


def oracle_robust(pc, pr, rc, rr, beta, eps):
    """rDPO (Chowdhury et al. 2024): ((1 − ε)·ℓ(y_w ≻ y_l) − ε·ℓ(y_l ≻ y_w)) / (1 − 2ε), ℓ DPO's loss."""
    loss_as_labelled = -_log_sigmoid(_dpo_margin(pc, pr, rc, rr, beta))
    loss_flipped = -_log_sigmoid(_dpo_margin(pr, pc, rr, rc, beta))
    return ((1 - eps) * loss_as_labelled - eps * loss_flipped) / (1 - 2 * eps)


def _per_token_margin(pc, pr, rc, rr, lc, lr):
    return (pc - rc) / max(lc, 1) - (pr - rr) / max(lr, 1)


def oracle_ipo(pc, pr, rc, rr, lc, lr, tau):
    """IPO eq. 17 (Azar et al. 2023): (h − 1/(2τ))², h the log-ratio margin per token (TRL's normalisation)."""
    return (_per_token_margin(pc, pr, rc, rr, lc, lr) - 1 / (2 * tau)) ** 2


def oracle_hinge(pc, pr, rc, rr, beta):
    """SLiC's rank-calibration hinge on the DPO margin: max(0, 1 − β·Δ)."""
    return max(0.0, 1 - _dpo_margin(pc, pr, rc, rr, beta))


def oracle_sigmoid_norm(pc, pr, rc, rr, lc, lr, beta):
    return -_log_sigmoid(beta * _per_token_margin(pc, pr, rc, rr, lc, lr))


def oracle_simpo(pc, pr, lc, lr, beta, gamma):
    """SimPO eq. 6 (Meng et al. 2024): −log σ(β/|y_w|·log π(y_w) − β/|y_l|·log π(y_l) − γ)."""
    return -_log_sigmoid(beta / max(lc, 1) * pc - beta / max(lr, 1) * pr - gamma)


def _sigmoid(x: float) -> float:
    return math.exp(_log_sigmoid(x))


def oracle_exo_pair(pc, pr, rc, rr, beta, eps):
    """EXO eq. 16, K = 2: KL(q || p) with q = (σ(βΔ), σ(−βΔ)) and p = (1 − ε, ε)."""
    u = _dpo_margin(pc, pr, rc, rr, beta)
    return _sigmoid(u) * (_log_sigmoid(u) - math.log(1 - eps)) + _sigmoid(-u) * (_log_sigmoid(-u) - math.log(eps))


def oracle_nca_pair(pc, pr, rc, rr, beta):
    """NCA eq. 11, K = 2: −log σ(r_w) − ½ log σ(−r_w) − ½ log σ(−r_l), r = β·log π/π_ref."""
    rw, rl = beta * (pc - rc), beta * (pr - rr)
    return -_log_sigmoid(rw) - 0.5 * _log_sigmoid(-rw) - 0.5 * _log_sigmoid(-rl)


def oracle_bco_pair(pc, pr, rc, rr, beta):
    return -_log_sigmoid(beta * (pc - rc)) - _log_sigmoid(-beta * (pr - rr))


def oracle_sppo_hard(pc, pr, rc, rr, beta):
    """SPPO eq. 4.7 with P(y_w ≻ π) = 1, P(y_l ≻ π) = 0: (log-ratio − (P − ½)/β)² for each."""
    return ((pc - rc) - 0.5 / beta) ** 2 + ((pr - rr) + 0.5 / beta) ** 2


def oracle_apo_zero(pc, pr, rc, rr, beta):
    return 1 - _sigmoid(beta * (pc - rc)) + _sigmoid(beta * (pr - rr))


def oracle_apo_down(pc, pr, rc, rr, beta):
    return _sigmoid(beta * (pc - rc)) + 1 - _sigmoid(_dpo_margin(pc, pr, rc, rr, beta))


def oracle_discopop(pc, pr, rc, rr, beta, tau=0.05):
    """DiscoPOP eq. 5: logistic and exponential losses blended by σ(βΔ/τ)."""
    u = _dpo_margin(pc, pr, rc, rr, beta)
    blend = _sigmoid(u / tau)
    return -_log_sigmoid(u) * (1 - blend) + math.exp(-u) * blend


def oracle_nll(pc, lc):
    """RPO's NLL term (Pang et al. 2024): −log π(y_w|x) / |y_w|."""
    return -pc / max(lc, 1)


# ---------------------------------------------------------------------------------------------------------------


def _random_batch(batch=24, dtype=torch.float32, seed=0, equal_chosen_lengths=False, spread=4.0):
    """Policy and reference PairLogps. Sums of 1-200 tokens at ~1.5 nats each; reference = policy + N(0, spread²)
    nats, so Δ spans roughly ±10 nats and β·Δ covers both tails of σ and both sides of the hinge for β in BETAS.
    (f-divergence cases take spread 0.5: forward KL's 1 − e^(−u) overflows the exponentials that follow at u = −10,
    in TRL and here alike.)"""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, 200, (2, batch), generator=g)
    lengths[1, 0] = 0  # an empty rejected completion: counts are clamped to 1
    if equal_chosen_lengths:
        lengths[0] = 37
    policy_sums = -1.5 * lengths * torch.rand(2, batch, generator=g, dtype=torch.float64).add(0.5)  # (2, B)
    reference_sums = policy_sums + spread * torch.randn(2, batch, generator=g, dtype=torch.float64)
    policy = PairLogps(policy_sums[0].to(dtype), policy_sums[1].to(dtype), lengths[0], lengths[1])
    reference = PairLogps(reference_sums[0].to(dtype), reference_sums[1].to(dtype), lengths[0], lengths[1])
    return policy, reference


def _columns(policy: PairLogps, reference: PairLogps):
    """Per pair (pc, pr, rc, rr, lc, lr) as Python floats: the exact values the tensors hold."""
    return list(
        zip(
            policy.chosen_logps.double().tolist(),
            policy.rejected_logps.double().tolist(),
            reference.chosen_logps.double().tolist(),
            reference.rejected_logps.double().tolist(),
            policy.chosen_tokens.tolist(),
            policy.rejected_tokens.tolist(),
        )
    )


# rtol, atol per dtype; see test_losses_match_paper_oracle
TOLERANCES = {torch.float32: (1e-5, 1e-5), torch.float64: (1e-12, 1e-12)}


def _canonical(policy: PairLogps, reference: PairLogps) -> dict:
    return dict(
        policy_chosen_logps=policy.chosen_logps,
        policy_rejected_logps=policy.rejected_logps,
        reference_chosen_logps=reference.chosen_logps,
        reference_rejected_logps=reference.rejected_logps,
    )


def _lengths(policy: PairLogps) -> dict:
    return dict(chosen_lengths=policy.chosen_tokens, rejected_lengths=policy.rejected_tokens)


ORACLE_CASES = {
    # name: (our loss on the batch, oracle on one pair's floats); `s` is the label smoothing
    "sigmoid": (
        lambda p, r, beta, s: sigmoid_loss(**_canonical(p, r), beta=beta, label_smoothing=s),
        lambda pc, pr, rc, rr, lc, lr, beta, s: oracle_sigmoid(pc, pr, rc, rr, beta, s),
    ),
    "robust": (
        lambda p, r, beta, s: robust_loss(**_canonical(p, r), beta=beta, label_smoothing=s),
        lambda pc, pr, rc, rr, lc, lr, beta, s: oracle_robust(pc, pr, rc, rr, beta, s),
    ),
    "ipo": (
        lambda p, r, beta, s: ipo_loss(**_canonical(p, r), beta=beta, **_lengths(p)),
        lambda pc, pr, rc, rr, lc, lr, beta, s: oracle_ipo(pc, pr, rc, rr, lc, lr, beta),
    ),
    "hinge": (
        lambda p, r, beta, s: hinge_loss(**_canonical(p, r), beta=beta),
        lambda pc, pr, rc, rr, lc, lr, beta, s: oracle_hinge(pc, pr, rc, rr, beta),
    ),
    "sigmoid_norm": (
        lambda p, r, beta, s: sigmoid_norm_loss(**_canonical(p, r), beta=beta, **_lengths(p)),
        lambda pc, pr, rc, rr, lc, lr, beta, s: oracle_sigmoid_norm(pc, pr, rc, rr, lc, lr, beta),
    ),
    "simpo": (
        lambda p, r, beta, s: simpo_loss(p.chosen_logps, p.rejected_logps, **_lengths(p), beta=beta, gamma=0.8),
        lambda pc, pr, rc, rr, lc, lr, beta, s: oracle_simpo(pc, pr, lc, lr, beta, 0.8),
    ),
    "exo_pair": (
        lambda p, r, beta, s: exo_pair_loss(**_canonical(p, r), beta=beta, label_smoothing=s),
        lambda pc, pr, rc, rr, lc, lr, beta, s: oracle_exo_pair(pc, pr, rc, rr, beta, s),
    ),
    "nca_pair": (
        lambda p, r, beta, s: nca_pair_loss(**_canonical(p, r), beta=beta),
        lambda pc, pr, rc, rr, lc, lr, beta, s: oracle_nca_pair(pc, pr, rc, rr, beta),
    ),
    "bco_pair": (
        lambda p, r, beta, s: bco_pair_loss(**_canonical(p, r), beta=beta),
        lambda pc, pr, rc, rr, lc, lr, beta, s: oracle_bco_pair(pc, pr, rc, rr, beta),
    ),
    "sppo_hard": (
        lambda p, r, beta, s: sppo_hard_loss(**_canonical(p, r), beta=beta),
        lambda pc, pr, rc, rr, lc, lr, beta, s: oracle_sppo_hard(pc, pr, rc, rr, beta),
    ),
    "apo_zero": (
        lambda p, r, beta, s: apo_zero_loss(**_canonical(p, r), beta=beta),
        lambda pc, pr, rc, rr, lc, lr, beta, s: oracle_apo_zero(pc, pr, rc, rr, beta),
    ),
    "apo_down": (
        lambda p, r, beta, s: apo_down_loss(**_canonical(p, r), beta=beta),
        lambda pc, pr, rc, rr, lc, lr, beta, s: oracle_apo_down(pc, pr, rc, rr, beta),
    ),
    "discopop": (
        lambda p, r, beta, s: discopop_loss(**_canonical(p, r), beta=beta),
        lambda pc, pr, rc, rr, lc, lr, beta, s: oracle_discopop(pc, pr, rc, rr, beta),
    ),
}
SMOOTHED = {"sigmoid", "robust", "exo_pair", "aot", "aot_unpaired"}


def _batch_oracle_aot(rows, beta, eps, unpaired):
    """AOT (Melnyk et al. 2024): sort the batch's policy and reference quantities separately, pair them by rank."""
    if unpaired:
        first, second = sorted(pc - rc for pc, pr, rc, rr, lc, lr in rows), sorted(pr - rr for pc, pr, rc, rr, lc, lr in rows)
    else:
        first, second = sorted(pc - pr for pc, pr, rc, rr, lc, lr in rows), sorted(rc - rr for pc, pr, rc, rr, lc, lr in rows)
    return [-(1 - eps) * _log_sigmoid(beta * (a - b)) - eps * _log_sigmoid(-beta * (a - b)) for a, b in zip(first, second)]


def _batch_oracle_sft(rows, beta, eps):
    """Per-pair terms whose mean is the batch's NLL per chosen token: each pair's NLL over the batch's mean chosen
    length."""
    tokens_per_pair = sum(lc for pc, pr, rc, rr, lc, lr in rows) / len(rows)
    return [-pc / tokens_per_pair for pc, *_ in rows]


# Losses whose per-pair values depend on the whole batch: our loss, and an oracle on the batch's rows
BATCH_CASES = {
    "aot": (
        lambda p, r, beta, s: aot_loss(**_canonical(p, r), beta=beta, label_smoothing=s),
        lambda rows, beta, s: _batch_oracle_aot(rows, beta, s, unpaired=False),
    ),
    "aot_unpaired": (
        lambda p, r, beta, s: aot_unpaired_loss(**_canonical(p, r), beta=beta, label_smoothing=s),
        lambda rows, beta, s: _batch_oracle_aot(rows, beta, s, unpaired=True),
    ),
    "sft": (
        lambda p, r, beta, s: (sft_loss(p.chosen_logps, p.chosen_tokens), *sigmoid_loss(**_canonical(p, r), beta=beta)[1:]),
        _batch_oracle_sft,
    ),
}


def _smoothings(name):
    if name == "exo_pair":  # its log ε needs ε > 0
        return [0.1, 0.3]
    return SMOOTHINGS if name in SMOOTHED else [0.0]  # LossConfig forbids ε elsewhere


ORACLE_PARAMS = [
    (name, beta, smoothing) for name in [*ORACLE_CASES, *BATCH_CASES] for beta in BETAS for smoothing in _smoothings(name)
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name,beta,smoothing", ORACLE_PARAMS)
def test_losses_match_paper_oracle(name, beta, smoothing, dtype):
    """Each loss against its paper's formula evaluated in Python float64 on the very values the tensors hold.

    float32: the log-ratios of nearby sums are exact (Sterbenz), then Δ, β·Δ, the division by token counts and
    log σ each round once at ~6e-8 relative; on losses up to ~30 (IPO with β = 0.1) that is a few 1e-6 absolute,
    so rtol = atol = 1e-5 is that with a margin, while a wrong sign, factor or missing ε term moves a loss by
    > 1e-2. float64: same formula, rounding ~1e-15, so 1e-12 pins the formula itself (e.g. the length clamp).
    """
    policy, reference = _random_batch(dtype=dtype)
    rows = _columns(policy, reference)
    if name in BATCH_CASES:
        ours, batch_oracle = BATCH_CASES[name]
        expected = torch.tensor(batch_oracle(rows, beta, smoothing), dtype=torch.float64)
    else:
        ours, oracle = ORACLE_CASES[name]
        expected = torch.tensor([oracle(*row, beta, smoothing) for row in rows], dtype=torch.float64)
    losses, chosen_rewards, rejected_rewards = ours(policy, reference, beta, smoothing)
    rtol, atol = TOLERANCES[dtype]
    assert losses.dtype == dtype and losses.shape == (len(rows),)
    torch.testing.assert_close(losses.double(), expected, rtol=rtol, atol=atol)

    if name == "simpo":  # reward: β·(average log-prob), SimPO eq. 4
        expected_chosen = [beta * pc / max(lc, 1) for pc, pr, rc, rr, lc, lr in rows]
        expected_rejected = [beta * pr / max(lr, 1) for pc, pr, rc, rr, lc, lr in rows]
    else:  # DPO's implicit reward β·log π/π_ref
        expected_chosen = [beta * (pc - rc) for pc, pr, rc, rr, lc, lr in rows]
        expected_rejected = [beta * (pr - rr) for pc, pr, rc, rr, lc, lr in rows]
    for got, want in ((chosen_rewards, expected_chosen), (rejected_rewards, expected_rejected)):
        torch.testing.assert_close(got.double(), torch.tensor(want, dtype=torch.float64), rtol=rtol, atol=atol)


def test_nll_matches_oracle():
    """−log π(y_w)/|y_w|: one fp32 division, so rtol = 1e-6 (a few ulps) is enough."""
    policy, _ = _random_batch()
    expected = [oracle_nll(pc, lc) for pc, lc in zip(policy.chosen_logps.tolist(), policy.chosen_tokens.tolist())]
    torch.testing.assert_close(
        nll_loss(policy.chosen_logps, policy.chosen_tokens), torch.tensor(expected), rtol=1e-6, atol=1e-6
    )


def test_oracle_spans_both_regimes():
    """The random batch is not degenerate: the hinge is active on some pairs and flat on others, and DPO losses
    sit both above and below ln 2 (so a sign error could not hide)."""
    policy, reference = _random_batch()
    hinge, _, _ = hinge_loss(**_canonical(policy, reference), beta=0.5)
    dpo, _, _ = sigmoid_loss(**_canonical(policy, reference), beta=0.5)
    assert (hinge == 0).any() and (hinge > 0).any()
    assert (dpo < math.log(2)).any() and (dpo > math.log(2)).any()


# ---------------------------------------------------------------------------------------------------------------
# Fixed points: policy == reference makes every log-ratio 0.
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("beta", BETAS)
@pytest.mark.parametrize(
    "loss_type,smoothing,expected",
    [
        ("sigmoid", 0.0, lambda beta: math.log(2)),
        ("sigmoid", 0.3, lambda beta: math.log(2)),  # −(1 − ε)·log ½ − ε·log ½
        ("robust", 0.3, lambda beta: math.log(2)),  # ((1 − ε) − ε)·ln 2 / (1 − 2ε)
        ("sigmoid_norm", 0.0, lambda beta: math.log(2)),
        ("hinge", 0.0, lambda beta: 1.0),
        ("ipo", 0.0, lambda beta: (1 / (2 * beta)) ** 2),
    ],
)
def test_policy_equal_to_reference(loss_type, smoothing, beta, expected):
    """Exact constants (ln 2 = 0.693147..., 1, (1/(2β))²): Δ is exactly 0, so only the last op rounds; fp32
    rtol = 1e-6."""
    policy, _ = _random_batch()
    loss = build_preference_loss(LossConfig(loss_type=loss_type, beta=beta, label_smoothing=smoothing))
    out = loss(policy, policy)
    torch.testing.assert_close(out.losses, torch.full_like(out.losses, expected(beta)), rtol=1e-6, atol=0)
    assert (out.chosen_rewards == 0).all() and (out.rejected_rewards == 0).all()


def test_ln2_value():
    assert math.isclose(sigmoid_loss(*[torch.tensor([-3.0])] * 4, beta=0.1)[0].item(), 0.6931471805599453, rel_tol=1e-7)


# ---------------------------------------------------------------------------------------------------------------
# build_preference_loss: dispatch, RPO, dtype, errors.
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("loss_type", typing.get_args(LossType))
def test_build_dispatches_to_the_named_variant(loss_type):
    """Every Literal value builds, and the built loss is the pure function of that name (bit-identical)."""
    smoothing = 0.1 if loss_type in SMOOTHED else 0.0
    config = LossConfig(loss_type=loss_type, beta=0.5, label_smoothing=smoothing)
    policy, reference = _random_batch()
    ours, _ = ORACLE_CASES.get(loss_type) or BATCH_CASES[loss_type]
    if loss_type == "simpo":
        config = LossConfig(loss_type="simpo", beta=0.5, simpo_gamma=0.8)  # ORACLE_CASES' γ
        out = build_preference_loss(config)(policy, None)
    else:
        out = build_preference_loss(config)(policy, reference)
    expected = ours(policy, reference, 0.5, smoothing)
    torch.testing.assert_close(out.losses, expected[0], rtol=0, atol=0)
    torch.testing.assert_close(out.chosen_rewards, expected[1], rtol=0, atol=0)
    torch.testing.assert_close(out.rejected_rewards, expected[2], rtol=0, atol=0)


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "simpo"])
def test_rpo_adds_alpha_times_nll(loss_type):
    """losses(rpo_alpha) − losses(None) = α·nll, per pair; one extra fp32 add, so 1e-5 absolute on values ~10."""
    policy, reference = _random_batch()
    reference = None if loss_type == "simpo" else reference
    plain = build_preference_loss(LossConfig(loss_type=loss_type, beta=0.1))(policy, reference)
    rpo = build_preference_loss(LossConfig(loss_type=loss_type, beta=0.1, rpo_alpha=0.7))(policy, reference)
    nll = torch.tensor([oracle_nll(pc, lc) for pc, pr, rc, rr, lc, lr in _columns(policy, policy)])
    torch.testing.assert_close(rpo.losses - plain.losses, 0.7 * nll, rtol=1e-5, atol=1e-5)
    assert torch.equal(rpo.chosen_rewards, plain.chosen_rewards)  # RPO changes the loss, not the rewards


def test_low_precision_inputs_are_upcast():
    """bf16 log-probs give fp32 losses equal to the fp32 loss of the same (bf16-rounded) values, and gradients
    still reach the bf16 inputs."""
    policy, reference = _random_batch()
    bf16 = {k: v.to(torch.bfloat16).requires_grad_() for k, v in _canonical(policy, reference).items()}
    losses, chosen_rewards, _ = sigmoid_loss(**bf16, beta=0.1, label_smoothing=0.1)
    assert losses.dtype == torch.float32 and chosen_rewards.dtype == torch.float32
    expected, _, _ = sigmoid_loss(**{k: v.detach().float() for k, v in bf16.items()}, beta=0.1, label_smoothing=0.1)
    torch.testing.assert_close(losses, expected, rtol=0, atol=0)
    losses.sum().backward()
    assert bf16["policy_chosen_logps"].grad.dtype == torch.bfloat16


def test_reference_must_match_loss_type():
    policy, reference = _random_batch()
    with pytest.raises(ValueError, match="simpo is reference-free"):
        build_preference_loss(LossConfig(loss_type="simpo"))(policy, reference)
    for loss_type in ("sigmoid", "ipo"):
        with pytest.raises(ValueError, match=f"{loss_type} needs reference log-probs"):
            build_preference_loss(LossConfig(loss_type=loss_type))(policy, None)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(loss_type="hinge", label_smoothing=0.1), "label_smoothing is only defined"),
        (dict(loss_type="ipo", label_smoothing=0.1), "label_smoothing is only defined"),
        (dict(beta=0.0), "beta=0.0: must be positive"),
        (dict(beta=-0.1), "must be positive"),
        (dict(loss_type="robust", label_smoothing=0.5), r"must be in \[0, 0.5\)"),
        (dict(rpo_alpha=-1.0), "rpo_alpha"),
        (dict(loss_type="kto"), "loss_type='kto': must be one of"),
        (dict(loss_type=["sigmoid", "kto"]), r"loss.loss_type\[1\]='kto': must be one of"),
        (dict(loss_type=[]), "an empty list"),
        (dict(loss_type=["sigmoid", "sft"], loss_weights=[1.0]), "has 1 weights for 2 loss types"),
        (dict(loss_type=["simpo", "sft"]), "simpo is reference-free and cannot be combined"),
        (dict(loss_type="exo_pair"), "exo_pair needs loss.label_smoothing > 0"),
        (dict(loss_type="nca_pair", label_smoothing=0.1), "label_smoothing is only defined"),
        (dict(loss_type=["sigmoid", "nca_pair"], f_divergence="js_divergence"), "not to nca_pair"),
        (dict(f_divergence="tv"), "f_divergence='tv': must be one of"),
        (dict(loss_type="discopop", discopop_tau=0.0), "discopop_tau=0.0: must be positive"),
    ],
)
def test_invalid_loss_config_raises(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        LossConfig(**kwargs)


# ---------------------------------------------------------------------------------------------------------------
# Gradients.
# ---------------------------------------------------------------------------------------------------------------

GRAD_CASES = {
    "sigmoid": lambda pc, pr, rc, rr, lc, lr: sigmoid_loss(pc, pr, rc, rr, beta=0.5, label_smoothing=0.1)[0],
    "robust": lambda pc, pr, rc, rr, lc, lr: robust_loss(pc, pr, rc, rr, beta=0.5, label_smoothing=0.2)[0],
    "ipo": lambda pc, pr, rc, rr, lc, lr: ipo_loss(pc, pr, rc, rr, 0.1, lc, lr)[0],
    "hinge": lambda pc, pr, rc, rr, lc, lr: hinge_loss(pc, pr, rc, rr, beta=0.5)[0],
    "sigmoid_norm": lambda pc, pr, rc, rr, lc, lr: sigmoid_norm_loss(pc, pr, rc, rr, 2.0, lc, lr)[0],
    "simpo": lambda pc, pr, rc, rr, lc, lr: simpo_loss(pc, pr, lc, lr, beta=2.0, gamma=0.5)[0],
    "nll": lambda pc, pr, rc, rr, lc, lr: nll_loss(pc, lc),
}


@pytest.mark.parametrize("name", list(GRAD_CASES))
def test_gradcheck_float64(name):
    """Analytic gradients against finite differences in float64 (gradcheck's own tolerances, atol 1e-5 /
    rtol 1e-3, are meaningful only in float64). Δ is ±several nats here, far from the hinge's kink at βΔ = 1."""
    policy, reference = _random_batch(batch=6, dtype=torch.float64, seed=1)
    inputs = [t.clone().requires_grad_() for t in _canonical(policy, reference).values()]
    fn = GRAD_CASES[name]
    assert torch.autograd.gradcheck(lambda *x: fn(*x, policy.chosen_tokens, policy.rejected_tokens), inputs)


def test_rewards_carry_no_gradient():
    policy, reference = _random_batch()
    inputs = {k: v.clone().requires_grad_() for k, v in _canonical(policy, reference).items()}
    losses, chosen_rewards, rejected_rewards = sigmoid_loss(**inputs, beta=0.1)
    assert losses.requires_grad and not chosen_rewards.requires_grad and not rejected_rewards.requires_grad


# ---------------------------------------------------------------------------------------------------------------
# Metrics.
# ---------------------------------------------------------------------------------------------------------------

METRIC_KEYS = {
    "loss",
    "rewards/chosen",
    "rewards/rejected",
    "rewards/margins",
    "rewards/accuracies",
    "logps/chosen",
    "logps/rejected",
}


def test_metrics_on_hand_computed_example():
    """Two pairs, β = 0.5. Pair 1: chosen log-ratio −10 − (−11) = +1, rejected −12 − (−11) = −1, so rewards
    +0.5 / −0.5, Δ = 2 and loss −log σ(1) = log(1 + e^−1). Pair 2: chosen −20 − (−19) = −1, rejected
    −18 − (−20) = +2, rewards −0.5 / +1, Δ = −3, loss log(1 + e^1.5). Each metric is one fp32 mean of two numbers:
    rtol 1e-6."""
    tokens = dict(chosen_tokens=torch.tensor([5, 8]), rejected_tokens=torch.tensor([6, 7]))
    policy = PairLogps(torch.tensor([-10.0, -20.0]), torch.tensor([-12.0, -18.0]), **tokens)
    reference = PairLogps(torch.tensor([-11.0, -19.0]), torch.tensor([-11.0, -20.0]), **tokens)
    out = build_preference_loss(LossConfig(loss_type="sigmoid", beta=0.5))(policy, reference)
    metrics = preference_metrics(out, policy)

    assert set(metrics) == METRIC_KEYS
    expected = {
        "loss": (math.log1p(math.exp(-1.0)) + math.log1p(math.exp(1.5))) / 2,  # (0.313262 + 1.701413) / 2
        "rewards/chosen": (0.5 - 0.5) / 2,
        "rewards/rejected": (-0.5 + 1.0) / 2,
        "rewards/margins": (1.0 - 1.5) / 2,
        "rewards/accuracies": 0.5,
        "logps/chosen": -15.0,
        "logps/rejected": -15.0,
    }
    for key, value in metrics.items():
        assert isinstance(value, torch.Tensor) and value.dim() == 0, key
        torch.testing.assert_close(value, torch.tensor(expected[key]), rtol=1e-6, atol=1e-7, msg=key)


def test_metrics_are_detached_device_tensors():
    policy, reference = _random_batch()
    policy = policy._replace(chosen_logps=policy.chosen_logps.clone().requires_grad_())
    out = build_preference_loss(LossConfig(loss_type="ipo", beta=0.1, rpo_alpha=0.5))(policy, reference)
    assert out.losses.requires_grad
    metrics = preference_metrics(out, policy)
    for key, value in metrics.items():
        assert isinstance(value, torch.Tensor) and not isinstance(value, float), key
        assert value.shape == () and not value.requires_grad and value.device == out.losses.device, key


def test_metrics_from_a_plain_loss_output():
    """preference_metrics needs only a LossOutput, e.g. one built by hand: accuracy counts strict wins only."""
    out = LossOutput(torch.tensor([1.0, 3.0, 2.0]), torch.tensor([0.5, 0.1, 0.2]), torch.tensor([0.1, 0.3, 0.2]))
    policy = PairLogps(torch.tensor([-1.0, -2.0, -3.0]), torch.tensor([-4.0, -5.0, -6.0]), torch.ones(3), torch.ones(3))
    metrics = preference_metrics(out, policy)
    torch.testing.assert_close(metrics["rewards/accuracies"], torch.tensor(1 / 3))  # the tie does not count
    torch.testing.assert_close(metrics["loss"], torch.tensor(2.0))
    torch.testing.assert_close(metrics["logps/rejected"], torch.tensor(-5.0))


# ---------------------------------------------------------------------------------------------------------------
# TRL 1.16: the real DPOTrainer._compute_loss, driven on given log-probs without a model.
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trl_dpo_trainer():
    module = pytest.importorskip("trl.trainer.dpo_trainer")
    import trl

    if trl.__version__ != "1.16.0":
        pytest.skip(f"the comparison is pinned to trl 1.16.0's loss code, found {trl.__version__}")
    return module.DPOTrainer


class _IdentityAccelerator:
    """One process: gathering returns the tensor itself."""

    device = torch.device("cpu")

    @staticmethod
    def gather(tensor):
        return tensor

    gather_for_metrics = gather


class _FixedLogProbsModel:
    """Stands in for the policy under TRL's fused LM head: returns given per-token log-probs (2B, T-1)."""

    def __init__(self, log_probs: torch.Tensor):
        self.log_probs = log_probs

    def __call__(self, *, input_ids, attention_mask, labels, use_cache, fused_lm_head):
        assert labels.shape == input_ids.shape and fused_lm_head
        zeros = torch.zeros_like(self.log_probs)
        return SimpleNamespace(log_probs=self.log_probs, entropy=zeros, mean_logits=zeros, is_top1=zeros.bool())


PROMPT_TOKENS = 3


def _trl_inputs(policy: PairLogps, reference: PairLogps):
    """TRL's padded batch: rows [chosen_0..chosen_B-1, rejected_0..rejected_B-1], each PROMPT_TOKENS prompt tokens
    then the completion, right-padded. Each row's whole log-prob sits at its first completion position (zeros on
    the others), so TRL's per-row sum, and its mean over chosen tokens, see exactly our sums."""
    sums = torch.cat([policy.chosen_logps, policy.rejected_logps])  # (2B,)
    counts = torch.cat([policy.chosen_tokens, policy.rejected_tokens]).long()  # (2B,)
    assert (counts >= 1).all(), "a row with no completion token cannot hold a log-prob"
    rows, width = len(sums), PROMPT_TOKENS + int(counts.max())
    position = torch.arange(width)
    completion_mask = ((position >= PROMPT_TOKENS) & (position < PROMPT_TOKENS + counts[:, None])).long()  # (2B, T)
    attention_mask = (position < PROMPT_TOKENS + counts[:, None]).long()  # (2B, T)
    log_probs = torch.zeros(rows, width - 1)  # (2B, T-1): position j scores token j + 1
    log_probs[:, PROMPT_TOKENS - 1] = sums
    inputs = dict(
        input_ids=torch.ones(rows, width, dtype=torch.long) * attention_mask,
        attention_mask=attention_mask,
        completion_mask=completion_mask,
        ref_chosen_logps=reference.chosen_logps,
        ref_rejected_logps=reference.rejected_logps,
    )
    return inputs, _FixedLogProbsModel(log_probs)


def _trl_trainer(dpo_trainer_class, loss_types, loss_weights, config: LossConfig, training):
    """A DPOTrainer with only the attributes `_compute_loss` reads (its __init__ needs a model and datasets)."""
    trainer = dpo_trainer_class.__new__(dpo_trainer_class)
    trainer.model = SimpleNamespace(training=training)
    trainer.accelerator = _IdentityAccelerator()
    trainer.args = SimpleNamespace(gradient_checkpointing_kwargs=None, discopop_tau=config.discopop_tau)
    trainer.loss_types = loss_types
    trainer.loss_weights = loss_weights
    trainer.beta = config.beta
    trainer.label_smoothing = config.label_smoothing
    trainer.f_divergence_type = config.f_divergence
    trainer.f_alpha_divergence_coef = config.f_alpha_divergence_coef
    trainer.ld_alpha = None
    trainer.precompute_ref_logps = True
    trainer.aux_loss_enabled = False
    trainer.use_weighting = False
    trainer._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
    trainer._total_train_tokens = 0
    trainer._tp_size = 1
    return trainer


TRL_CASES = {
    # name: (our config, TRL loss_types, TRL loss_weights, batch options)
    # TRL 1.16's "sigmoid" ignores label_smoothing (its cDPO term is gone), so only ε = 0 is comparable.
    "sigmoid": (LossConfig(loss_type="sigmoid", beta=0.1), ["sigmoid"], [1.0], {}),
    "robust": (LossConfig(loss_type="robust", beta=0.5, label_smoothing=0.2), ["robust"], [1.0], {}),
    "ipo": (LossConfig(loss_type="ipo", beta=0.1), ["ipo"], [1.0], {}),
    "hinge": (LossConfig(loss_type="hinge", beta=0.5), ["hinge"], [1.0], {}),
    "sigmoid_norm": (LossConfig(loss_type="sigmoid_norm", beta=2.0), ["sigmoid_norm"], [1.0], {}),
    # TRL's "sft" is −(sum of chosen token log-probs) / (chosen tokens in the batch), one scalar; it equals the
    # mean of our per-pair −log π(y_w)/|y_w| only when every chosen completion has the same length, so the
    # batch makes them equal (rejected lengths still differ).
    "sigmoid+rpo": (
        LossConfig(loss_type="sigmoid", beta=0.1, rpo_alpha=0.7),
        ["sigmoid", "sft"],
        [1.0, 0.7],
        dict(equal_chosen_lengths=True),
    ),
    "exo_pair": (LossConfig(loss_type="exo_pair", beta=0.1, label_smoothing=1e-3), ["exo_pair"], [1.0], {}),
    "nca_pair": (LossConfig(loss_type="nca_pair", beta=0.1), ["nca_pair"], [1.0], {}),
    "bco_pair": (LossConfig(loss_type="bco_pair", beta=0.1), ["bco_pair"], [1.0], {}),
    "sppo_hard": (LossConfig(loss_type="sppo_hard", beta=0.5), ["sppo_hard"], [1.0], {}),
    "aot": (LossConfig(loss_type="aot", beta=0.1, label_smoothing=0.1), ["aot"], [1.0], {}),
    "aot_unpaired": (LossConfig(loss_type="aot_unpaired", beta=0.1), ["aot_unpaired"], [1.0], {}),
    "apo_zero": (LossConfig(loss_type="apo_zero", beta=0.1), ["apo_zero"], [1.0], {}),
    "apo_down": (LossConfig(loss_type="apo_down", beta=0.1), ["apo_down"], [1.0], {}),
    "discopop": (LossConfig(loss_type="discopop", beta=0.1, discopop_tau=0.5), ["discopop"], [1.0], {}),
    "sft": (LossConfig(loss_type="sft"), ["sft"], [1.0], {}),
    # MPO (arXiv:2411.10442): preference, quality and generation losses, weighted
    "mpo": (
        LossConfig(loss_type=["sigmoid", "bco_pair", "sft"], loss_weights=[0.8, 0.2, 1.0]),
        ["sigmoid", "bco_pair", "sft"],
        [0.8, 0.2, 1.0],
        {},
    ),
    "ipo+apo_zero": (LossConfig(loss_type=["ipo", "apo_zero"]), ["ipo", "apo_zero"], [1.0, 1.0], {}),
    **{
        f"{loss_type}/{divergence}": (
            LossConfig(loss_type=loss_type, beta=0.1, f_divergence=divergence, f_alpha_divergence_coef=coef,
                       label_smoothing=1e-3 if loss_type == "exo_pair" else 0.0),
            [loss_type],
            [1.0],
            {"spread": 0.5},
        )  # fmt: skip
        for loss_type in ("sigmoid", "hinge", "ipo", "sigmoid_norm", "robust", "exo_pair", "discopop")
        for divergence, coef in (("forward_kl", 0.5), ("js_divergence", 0.5), ("alpha_divergence", 0.3))
    },
    "sigmoid/alpha_divergence=1": (
        LossConfig(f_divergence="alpha_divergence", f_alpha_divergence_coef=1.0), ["sigmoid"], [1.0], {}
    ),
}


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("name", list(TRL_CASES))
def test_matches_trl_dpo_trainer_compute_loss(trl_dpo_trainer, name, training):
    """Our mean loss and metrics against TRL 1.16's own `DPOTrainer._compute_loss` on the same log-probs.

    Both compute in fp32 with the same operations (TRL's per-row sums add exact zeros); the only differences are
    the order of the final means and, for RPO, TRL's one batch-wide division against our per-pair ones: a few ulps,
    < 1e-6 relative on losses and metrics of order 0.1-100. rtol = 1e-6 with atol = 1e-6 (for metrics near 0,
    e.g. a margin mean) leaves room for that and nothing more: a wrong length count or β moves them by >= 1e-3.
    """
    config, loss_types, loss_weights, batch_options = TRL_CASES[name]
    policy, reference = _random_batch(batch=16, seed=2, **batch_options)
    # TRL cannot express an empty completion (it clamps the count but its sum is then 0): give it one token.
    policy = policy._replace(rejected_tokens=policy.rejected_tokens.clamp(min=1))
    assert (policy.chosen_tokens != policy.rejected_tokens).any()

    trainer = _trl_trainer(trl_dpo_trainer, loss_types, loss_weights, config, training)
    inputs, model = _trl_inputs(policy, reference)
    trl_loss = trainer._compute_loss(model, inputs, return_outputs=False)

    out = build_preference_loss(config)(policy, reference)
    ours = preference_metrics(out, policy)
    torch.testing.assert_close(ours["loss"], trl_loss, rtol=1e-6, atol=1e-6)

    logged = trainer._metrics["train" if training else "eval"]
    for key in METRIC_KEYS - {"loss"}:  # TRL logs its loss through Trainer.log, not _metrics
        assert len(logged[key]) == 1, key
        trl_value = torch.tensor(logged[key][-1], dtype=torch.float64)  # TRL logs Python floats (.item())
        torch.testing.assert_close(ours[key].double(), trl_value, rtol=1e-6, atol=1e-6, msg=key)


# Batch-coupled losses: aot and aot_unpaired sort the batch, sft is a batch mean; their per-pair values are not a
# pair's own, so only their means compare (above).
PER_PAIR_TRL_CASES = [name for name in TRL_CASES if not {"aot", "aot_unpaired", "sft"} & set(TRL_CASES[name][1])]


@pytest.mark.parametrize("name", PER_PAIR_TRL_CASES)
def test_per_pair_losses_and_rewards_match_trl(trl_dpo_trainer, name):
    """Each pair's loss and rewards against TRL 1.16's `_compute_loss` given that pair alone (its mean over a batch
    of one is the pair's loss), within 1e-5."""
    config, loss_types, loss_weights, batch_options = TRL_CASES[name]
    policy, reference = _random_batch(batch=8, seed=3, **batch_options)
    policy = policy._replace(rejected_tokens=policy.rejected_tokens.clamp(min=1))
    out = build_preference_loss(config)(policy, reference)
    for i in range(8):
        one = [PairLogps(*(None if t is None else t[i : i + 1] for t in logps)) for logps in (policy, reference)]
        trainer = _trl_trainer(trl_dpo_trainer, loss_types, loss_weights, config, training=True)
        inputs, model = _trl_inputs(*one)
        trl_loss = trainer._compute_loss(model, inputs, return_outputs=False)
        torch.testing.assert_close(out.losses[i], trl_loss, rtol=1e-5, atol=1e-5, msg=f"pair {i}")
        logged = trainer._metrics["train"]
        for ours, key in ((out.chosen_rewards[i], "rewards/chosen"), (out.rejected_rewards[i], "rewards/rejected")):
            torch.testing.assert_close(ours.double(), torch.tensor(logged[key][0], dtype=torch.float64), rtol=1e-5,
                                       atol=1e-5, msg=f"{key} of pair {i}")  # fmt: skip


def test_f_divergence_scores_at_zero_and_one_of_alpha():
    """Every f'(1) is 0 at u = 0 except forward KL's 1 − 1 = 0 too (all vanish: policy = reference), and
    alpha = 1 is reverse KL exactly."""
    zero = torch.zeros(3)
    for divergence in ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence"):
        chosen, rejected = f_divergence_scores(zero, zero, divergence, 0.3)
        torch.testing.assert_close(chosen, zero, atol=1e-7, rtol=0)
    u = torch.linspace(-5, 5, 11)
    assert all(torch.equal(a, u) for a in f_divergence_scores(u, u, "alpha_divergence", 1.0))


def test_a_list_of_loss_types_from_yaml_and_overrides():
    from dpo_scale.config import TrainConfig, build, parse_overrides

    tree = {"model": {"path": "m"}, "data": {"path": "d"}, "run_dir": "r"}
    tree.update(parse_overrides(["loss.loss_type=[sigmoid, bco_pair, sft]", "loss.loss_weights=[0.8, 0.2, 1]"]))
    loss = build(TrainConfig, tree).loss
    assert loss.loss_types == ["sigmoid", "bco_pair", "sft"] and loss.weights == [0.8, 0.2, 1.0]
    assert build(TrainConfig, {**tree, "loss": {"loss_type": "ipo"}}).loss.loss_types == ["ipo"]


# ---------------------------------------------------------------------------------------------------------------
# LD-DPO and WPO need per-token quantities: our per-slot sums (model.sum_by_slot over a real collated batch) against
# TRL 1.16's _compute_loss given the same per-token values, reference run by a model (TRL applies ld_alpha there).
# ---------------------------------------------------------------------------------------------------------------


class _PerTokenModel:
    """TRL's fused-LM-head output for fixed per-token values: log-probs and, for WPO, log Σ p²."""

    def __init__(self, log_probs: torch.Tensor, log_sum_sq: torch.Tensor):
        self.log_probs, self.log_sum_sq = log_probs, log_sum_sq

    def __call__(self, *, input_ids, attention_mask, labels, use_cache, fused_lm_head):
        zeros = torch.zeros_like(self.log_probs)
        return SimpleNamespace(log_probs=self.log_probs, log_sum_sq_probs=self.log_sum_sq, entropy=zeros,
                               mean_logits=zeros, is_top1=zeros.bool())  # fmt: skip


def _per_token_case(seed=4, batch=6):
    """A collated prefix-shared, packed batch of pairs with unequal completion lengths, random per-token values in
    our scored order, and the same values laid out as TRL's (2B, T-1) rows."""
    from dpo_scale.config import LogpsConfig
    from dpo_scale.data.pairs import Pair
    from dpo_scale.model.layout import collate

    g = torch.Generator().manual_seed(seed)
    pairs = [
        Pair(i, f"row {i}", [5, 6, 7][: 1 + i % 3], list(range(10, 10 + 2 + (7 * i) % 9)), list(range(30, 30 + 1 + (5 * i) % 11)))
        for i in range(batch)
    ]  # fmt: skip
    layout = collate(pairs, LogpsConfig(), pad_token_id=0)
    n = len(layout.score_slots)
    policy_tokens = -3 * torch.rand(n, generator=g)  # (N,) log p of each scored token
    reference_tokens = policy_tokens + 0.3 * torch.randn(n, generator=g)
    log_sum_sq = -2 * torch.rand(n, generator=g) - 0.1  # (N,) log Σ p² in (−2.1, −0.1)
    counts = torch.bincount(layout.score_slots, minlength=2 * batch)
    width = PROMPT_TOKENS + int(counts.max())
    columns = PROMPT_TOKENS - 1 + layout.score_positions  # position j of the row predicts token j + 1

    def rows(values):
        out = torch.zeros(2 * batch, width - 1)
        out[layout.score_slots, columns] = values
        return out

    position = torch.arange(width)
    completion_mask = ((position >= PROMPT_TOKENS) & (position < PROMPT_TOKENS + counts[:, None])).long()
    attention_mask = (position < PROMPT_TOKENS + counts[:, None]).long()
    inputs = dict(input_ids=attention_mask.clone(), attention_mask=attention_mask, completion_mask=completion_mask)
    trl_policy = _PerTokenModel(rows(policy_tokens), rows(log_sum_sq))
    trl_reference = _PerTokenModel(rows(reference_tokens), rows(torch.zeros(n)))
    return layout, (policy_tokens, reference_tokens, log_sum_sq), inputs, trl_policy, trl_reference


LD_WPO_CASES = {
    "ld_alpha=0.5": LossConfig(beta=0.3, ld_alpha=0.5),
    "ld_alpha=0": LossConfig(beta=0.3, ld_alpha=0.0),
    "use_weighting": LossConfig(beta=0.3, use_weighting=True),
    "mpo+ld": LossConfig(loss_type=["sigmoid", "bco_pair", "sft"], loss_weights=[0.8, 0.2, 1.0], beta=0.3,
                         ld_alpha=0.4),  # fmt: skip
    # TRL 1.16 cannot weigh its sft term (an in-place product on an expanded tensor raises), so no sft here
    "sigmoid+bco_pair+ld+wpo": LossConfig(loss_type=["sigmoid", "bco_pair"], loss_weights=[0.8, 0.2], beta=0.3,
                                          ld_alpha=0.4, use_weighting=True),  # fmt: skip
    "ipo+ld": LossConfig(loss_type="ipo", ld_alpha=0.2),
}


@pytest.mark.parametrize("name", list(LD_WPO_CASES))
def test_ld_alpha_and_weighting_match_trl(trl_dpo_trainer, name):
    from dpo_scale.model.wrapper import sum_by_slot

    config = LD_WPO_CASES[name]
    layout, (policy_tokens, reference_tokens, log_sum_sq), inputs, trl_policy, trl_reference = _per_token_case()
    policy = sum_by_slot(policy_tokens, layout, log_sum_sq if config.use_weighting else None)
    reference = sum_by_slot(reference_tokens, layout)
    assert (policy.chosen_tokens > policy.rejected_tokens).any() and (policy.chosen_tokens < policy.rejected_tokens).any()
    out = build_preference_loss(config)(policy, reference)

    trainer = _trl_trainer(trl_dpo_trainer, config.loss_types, config.weights, config, training=True)
    trainer.model = SimpleNamespace(training=True, is_gradient_checkpointing=False, _modules={})  # not a peft model
    trainer.precompute_ref_logps, trainer.ref_model = False, trl_reference
    trainer.ld_alpha, trainer.use_weighting = config.ld_alpha, config.use_weighting
    trl_loss = trainer._compute_loss(trl_policy, inputs, return_outputs=False)
    torch.testing.assert_close(out.losses.mean(), trl_loss, rtol=1e-5, atol=1e-5)
    logged = trainer._metrics["train"]
    for ours, key in ((out.chosen_rewards, "rewards/chosen"), (out.rejected_rewards, "rewards/rejected")):
        torch.testing.assert_close(ours.mean().double(), torch.tensor(logged[key][0], dtype=torch.float64),
                                   rtol=1e-5, atol=1e-5, msg=key)  # fmt: skip


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(ld_alpha=1.5), r"ld_alpha=1.5: must be in \[0, 1\]"),
        (dict(ld_alpha=-0.1), "ld_alpha=-0.1"),
        (dict(loss_type="aot", use_weighting=True), "aot and aot_unpaired sort the batch"),
        (dict(loss_type="simpo", ld_alpha=0.5), "ld_alpha is defined for losses with a reference"),
    ],
)
def test_invalid_ld_and_weighting_config_raises(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        LossConfig(**kwargs)

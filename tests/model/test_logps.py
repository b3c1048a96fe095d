"""Streaming log-probs equal the full-logits path: values and gradients, for any chunk size."""

import pytest
import torch

from dpo_scale.model.streaming_logps import (
    CHUNK_BYTES,
    LMHead,
    default_chunk_size,
    full_logits_log_sum_sq,
    full_logits_token_logps,
    streaming_token_logps,
    streaming_token_logps_and_log_sum_sq,
)


def _full_path(hidden, head: LMHead, labels):
    """The plain computation, written the way a model's forward writes it."""
    logits = hidden @ head.weight.t()
    if head.bias is not None:
        logits = logits + head.bias
    logits = logits * head.scale
    if head.softcap is not None:
        logits = torch.tanh(logits / head.softcap) * head.softcap
    return full_logits_token_logps(logits, labels)


def _inputs(n=37, hidden_size=16, vocab=211, dtype=torch.float32, bias=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, hidden_size, generator=g, dtype=dtype).requires_grad_()
    weight = torch.randn(vocab, hidden_size, generator=g, dtype=dtype).requires_grad_()
    b = torch.randn(vocab, generator=g, dtype=dtype).requires_grad_() if bias else None
    labels = torch.randint(0, vocab, (n,), generator=g)
    return hidden, weight, b, labels


HEADS = {
    "plain": dict(),
    "bias": dict(bias=True),
    "scale": dict(scale=0.0625),
    "softcap": dict(softcap=3.0),
    "all": dict(bias=True, scale=0.5, softcap=2.0),
}


@pytest.mark.parametrize("chunk_size", [1, 5, 16, 4096])
@pytest.mark.parametrize("variant", list(HEADS))
def test_streaming_matches_full_logits(chunk_size, variant):
    """fp32, 37 tokens, vocab 211: the two paths sum the same terms in a different order (chunked matmul, fused
    log-sum-exp), so they agree to fp32 rounding: ~1e-6 relative on values of a few nats, and on gradients that are
    sums of up to 211 products. rtol=atol=1e-5 leaves a margin of ~10x over that rounding and would still catch a
    missing term (errors of order 1e-1)."""
    options = dict(HEADS[variant])
    hidden, weight, bias, labels = _inputs(bias=options.pop("bias", False))
    head = LMHead(weight, bias, **options)
    upstream = torch.randn(hidden.shape[0], generator=torch.Generator().manual_seed(1))

    expected = _full_path(hidden, head, labels)
    expected_grads = torch.autograd.grad((expected * upstream).sum(), [t for t in (hidden, weight, bias) if t is not None])
    got = streaming_token_logps(hidden, head, labels, chunk_size)
    got_grads = torch.autograd.grad((got * upstream).sum(), [t for t in (hidden, weight, bias) if t is not None])

    assert got.dtype == torch.float32
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    for g, e in zip(got_grads, expected_grads):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("chunk_size", [1, 5, 4096])
@pytest.mark.parametrize("variant", list(HEADS))
def test_log_sum_sq_matches_full_logits_and_leaves_gradients_alone(chunk_size, variant):
    """WPO's log Σ_v p_v², reduced in the same chunked pass, against log-softmax over materialized logits (fp32
    rounding: 1e-5); the log-probs and their gradients are those of `streaming_token_logps` bitwise."""
    options = dict(HEADS[variant])
    hidden, weight, bias, labels = _inputs(bias=options.pop("bias", False))
    head = LMHead(weight, bias, **options)
    logits = hidden @ weight.t() + (bias if bias is not None else 0)
    logits = logits * head.scale
    if head.softcap is not None:
        logits = torch.tanh(logits / head.softcap) * head.softcap
    leaves = [t for t in (hidden, weight, bias) if t is not None]

    logps, log_sum_sq = streaming_token_logps_and_log_sum_sq(hidden, head, labels, chunk_size)
    plain = streaming_token_logps(hidden, head, labels, chunk_size)
    torch.testing.assert_close(log_sum_sq, full_logits_log_sum_sq(logits), rtol=1e-5, atol=1e-5)
    assert not log_sum_sq.requires_grad and torch.equal(logps, plain)
    for a, b in zip(torch.autograd.grad(logps.sum(), leaves), torch.autograd.grad(plain.sum(), leaves)):
        assert torch.equal(a, b)


def test_streaming_log_sum_exp_is_stable_for_large_logits():
    """The forward's log-sum-exp is written by hand (in the logits' own buffer, to skip torch.logsumexp's (n, V)
    temporary), so it must subtract the row maximum as torch does: logits of about +-2,000 overflow exp() in fp32
    without it. Values and gradients against the full path at the same relative tolerance as the main test (the
    log-probs are now thousands of nats, so 1e-5 relative is ~1e-2 absolute)."""
    hidden, weight, _, labels = _inputs()
    hidden = (hidden.detach() * 100).requires_grad_()
    head = LMHead(weight, None)
    expected = _full_path(hidden, head, labels)
    got = streaming_token_logps(hidden, head, labels, 5)
    assert (expected.abs() > 100).any() and torch.isfinite(got).all()
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-3)
    torch.testing.assert_close(torch.autograd.grad(got.sum(), hidden)[0], torch.autograd.grad(expected.sum(), hidden)[0],
                               rtol=1e-5, atol=1e-3)  # fmt: skip


def test_streaming_gradcheck_float64():
    """Finite differences in float64 (gradcheck's own eps=1e-6, atol=1e-5): the hand-written backward, including
    soft-capping, scaling and bias, is the derivative of the forward."""
    hidden, weight, bias, labels = _inputs(n=7, hidden_size=4, vocab=11, dtype=torch.float64, bias=True)

    def fn(h, w, b):
        return streaming_token_logps(h, LMHead(w, b, scale=0.7, softcap=1.5), labels, 3)

    assert torch.autograd.gradcheck(fn, (hidden, weight, bias))


def test_chunk_count_does_not_change_result():
    """Chunking only partitions rows, but BLAS picks a different blocking for a different number of rows, so sums
    of products round differently: seen up to 3e-6 on values of a few nats. 1e-5 is fp32 rounding, not a bug."""
    hidden, weight, _, labels = _inputs(n=64)
    head = LMHead(weight, None)
    reference = streaming_token_logps(hidden, head, labels, 64)
    for chunk in (1, 7, 63):
        torch.testing.assert_close(streaming_token_logps(hidden, head, labels, chunk), reference, rtol=0, atol=1e-5)


def test_bfloat16_inputs_accumulate_in_float32():
    """bf16 hidden states and weights: the logits are rounded to bf16 by the matmul in both paths (as a bf16 model's
    head does), then the log-sum-exp runs in fp32. The two paths then differ only by fp32 rounding (1e-5)."""
    hidden, weight, _, labels = _inputs(dtype=torch.bfloat16)
    head = LMHead(weight, None)
    got = streaming_token_logps(hidden, head, labels, 8)
    expected = full_logits_token_logps(hidden @ weight.t(), labels)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    got.sum().backward()
    assert hidden.grad.dtype == torch.bfloat16 and weight.grad.dtype == torch.bfloat16


def test_no_gradient_requested_for_frozen_head():
    """A frozen head (the reference model, or LoRA's base) gets no gradient and costs no (V, H) accumulator."""
    hidden, weight, _, labels = _inputs()
    weight.requires_grad_(False)
    streaming_token_logps(hidden, LMHead(weight, None), labels, 8).sum().backward()
    assert weight.grad is None and hidden.grad is not None


def test_weight_gradient_goes_through_weight_grad_via():
    """`weight_grad_via` receives exactly the gradient `weight` would (the same accumulator, so bit for bit) and
    `weight` gets none from the head: one path back to the weight, chosen by the caller (model.py, tied embeddings)."""
    hidden, weight, bias, labels = _inputs(bias=True)
    streaming_token_logps(hidden, LMHead(weight, bias, scale=0.5), labels, 8).sum().backward()
    expected_weight, expected_hidden, expected_bias = weight.grad, hidden.grad, bias.grad
    weight.grad = hidden.grad = bias.grad = None
    via = torch.zeros_like(weight, requires_grad=True)
    streaming_token_logps(hidden, LMHead(weight, bias, scale=0.5, weight_grad_via=via), labels, 8).sum().backward()
    assert weight.grad is None
    assert torch.equal(via.grad, expected_weight)
    assert torch.equal(hidden.grad, expected_hidden) and torch.equal(bias.grad, expected_bias)


def peak_allocated_bytes(step, only_size: int | None = None) -> int:
    """Most bytes held at once by tensors allocated inside `step`, from the profiler's record of every allocation
    and free (in time order). `only_size`: count only allocations of exactly that many bytes, e.g. one (V, H) fp32
    gradient (test_tied_embedding.py)."""
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    records, pending = [], list(prof.profiler.kineto_results.experimental_event_tree())
    while pending:
        event = pending.pop()
        pending.extend(event.children)
        if event.tag == _EventType.Allocation and only_size in (None, abs(event.extra_fields.alloc_size)):
            records.append((event.start_time_ns, event.extra_fields.alloc_size))  # negative for a free
    live = peak = 0
    for _, size in sorted(records):
        live += size
        peak = max(peak, live)
    return peak


def test_one_chunk_of_logits_is_alive_at_a_time():
    """Forward and backward over 6 chunks hold one chunk's (chunk_size, vocab) fp32 logits at a time (plus the
    (vocab, hidden) gradient accumulator): a chunk's buffer kept until the next one exists would double the peak."""
    n, hidden_size, vocab, chunk_size = 384, 8, 8192, 64
    hidden, weight, _, labels = _inputs(n=n, hidden_size=hidden_size, vocab=vocab)
    head = LMHead(weight, None)
    chunk_bytes = chunk_size * vocab * 4
    accumulator_bytes = vocab * hidden_size * 4

    peak = peak_allocated_bytes(lambda: streaming_token_logps(hidden, head, labels, chunk_size).sum().backward())

    small = 16 * n * 4 + 2 * n * hidden_size * 4  # a few fp32 per-token vectors (lse, log-probs, ...), d hidden
    assert chunk_bytes + accumulator_bytes <= peak <= chunk_bytes + accumulator_bytes + small

    # with WPO's log Σ p² from the same chunks: one more (n,) vector, no second chunk-sized buffer
    with_sq = peak_allocated_bytes(
        lambda: streaming_token_logps_and_log_sum_sq(hidden, head, labels, chunk_size)[0].sum().backward()
    )
    assert chunk_bytes + accumulator_bytes <= with_sq <= chunk_bytes + accumulator_bytes + small


def test_default_chunk_holds_a_fixed_number_of_bytes_of_logits():
    for vocab, expected in ((32_000, 524), (50_257, 333), (128_256, 130), (2**30, 1)):
        assert default_chunk_size(vocab) == expected
        assert expected * vocab * 4 <= max(CHUNK_BYTES, vocab * 4)
    hidden, weight, _, labels = _inputs(n=40, vocab=CHUNK_BYTES // (4 * 16))  # the default chunk: 16 positions
    head = LMHead(weight, None)
    assert torch.equal(streaming_token_logps(hidden, head, labels), streaming_token_logps(hidden, head, labels, 16))

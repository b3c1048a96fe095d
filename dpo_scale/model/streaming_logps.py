"""Per-token log p(label) from final hidden states, without the [batch, seq, vocab] logits tensor.

`streaming_token_logps` projects only the scored positions, `chunk_size` of them at a time, and recomputes each
chunk's logits in backward instead of saving them: peak extra memory is one chunk's fp32 logits
(chunk_size x vocab x 4 bytes; each chunk's buffer is freed before the next one is made) plus the (vocab, hidden)
fp32 gradient accumulator, against 2+ full (rows x seq x vocab) tensors for the plain path. Log-sum-exp is always
taken in fp32.

The LM head weight is an explicit input rather than read from a module, so a caller running under ZeRO-3 can gather
it (inside a hooked module forward) and pass the full tensor; gradients flow back to that same tensor, or through
`LMHead.weight_grad_via` when the caller wants them to take another autograd path (wrapper.py, for a tied embedding).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class LMHead:
    """What turns a hidden state into logits: logits = cap * tanh((h @ W.T + b) * scale / cap), cap optional."""

    weight: torch.Tensor  # (V, H)
    bias: torch.Tensor | None  # (V,)
    scale: float = 1.0
    """Multiplier applied to the raw logits (Cohere's logit_scale, 1 / Granite's logits_scaling)."""
    softcap: float | None = None
    """Gemma-style final_logit_softcapping."""
    weight_grad_via: torch.Tensor | None = None
    """A (V, H) tensor that receives the weight's gradient in place of `weight` itself (which then gets none): an
    autograd path of the caller's choosing back to the weight. None: the gradient goes to `weight`."""


def _accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for bf16/fp16/fp32 inputs; float64 stays float64 (gradcheck)."""
    return torch.promote_types(dtype, torch.float32)


def _chunk_logits(hidden: torch.Tensor, head: LMHead) -> tuple[torch.Tensor, torch.Tensor | None]:
    """fp32 logits of one chunk (n, V), and tanh of the capped argument (needed by backward) when soft-capping."""
    raw = hidden @ head.weight.t()
    if head.bias is not None:
        raw = raw + head.bias
    logits = raw.to(_accumulation_dtype(raw.dtype))
    if head.scale != 1.0:
        logits = logits * head.scale
    if head.softcap is None:
        return logits, None
    squashed = torch.tanh(logits / head.softcap)
    return squashed * head.softcap, squashed


class _StreamingTokenLogps(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, weight_grad_via, labels, chunk_size, scale, softcap, with_log_sum_sq):
        # hidden (N, H), weight (V, H), bias (V,) or None, weight_grad_via (V, H) or None, labels (N,)
        head = LMHead(weight, bias, scale, softcap)
        logps = hidden.new_empty(hidden.shape[0], dtype=_accumulation_dtype(hidden.dtype))  # (N,)
        lse = torch.empty_like(logps)  # (N,), kept for backward so softmax needs no second reduction
        log_sum_sq = torch.empty_like(logps) if with_log_sum_sq else None  # (N,) log Σ_v p_v²
        for start in range(0, hidden.shape[0], chunk_size):
            stop = start + chunk_size
            logits, _ = _chunk_logits(hidden[start:stop], head)  # (n, V) fp32: the peak allocation
            picked = logits.gather(1, labels[start:stop, None]).squeeze(1)  # (n,)
            # log-sum-exp in the logits' own buffer: torch.logsumexp would allocate a second (n, V) temporary
            peak = logits.amax(dim=-1, keepdim=True)  # (n, 1)
            shifted = logits.sub_(peak).exp_()  # (n, V) e = exp(logit − max), in place
            log_total = shifted.sum(dim=-1).log_()  # (n,) log Σ e
            if with_log_sum_sq:  # log Σ p² = log Σ e² − 2 log Σ e; the norm reduces without an (n, V) square
                log_sum_sq[start:stop] = 2 * (torch.linalg.vector_norm(shifted, dim=-1).log_() - log_total)
            lse[start:stop] = log_total + peak.squeeze(1)
            logps[start:stop] = picked - lse[start:stop]
            # freed before the next chunk's matmul: rebinding `logits` there would keep two chunks alive at once
            del logits, shifted
        ctx.save_for_backward(hidden, weight, bias, labels, lse)
        ctx.chunk_size, ctx.scale, ctx.softcap = chunk_size, scale, softcap
        if with_log_sum_sq:
            ctx.mark_non_differentiable(log_sum_sq)
            return logps, log_sum_sq
        return logps

    @staticmethod
    def backward(ctx, grad_logps, *unused_grad_log_sum_sq):
        hidden, weight, bias, labels, lse = ctx.saved_tensors
        head = LMHead(weight, bias, ctx.scale, ctx.softcap)
        need_hidden, to_weight, need_bias, to_via = ctx.needs_input_grad[:4]
        need_weight = to_weight or to_via
        grad_hidden = torch.empty_like(hidden) if need_hidden else None  # every row is written below
        grad_weight = torch.zeros_like(weight, dtype=lse.dtype) if need_weight else None  # (V, H) fp32 sum
        grad_bias = torch.zeros_like(bias, dtype=lse.dtype) if need_bias else None
        for start in range(0, hidden.shape[0], ctx.chunk_size):
            stop = start + ctx.chunk_size
            h = hidden[start:stop]
            g = grad_logps[start:stop].to(lse.dtype)  # (n,)
            logits, squashed = _chunk_logits(h, head)  # recomputed, never stored across chunks
            # d logp / d logits = onehot(label) - softmax, built in place in the recomputed logits' buffer
            grad_logits = logits.sub_(lse[start:stop, None]).exp_().mul_(-g[:, None])  # (n, V)
            grad_logits.scatter_add_(1, labels[start:stop, None], g[:, None])
            if squashed is not None:
                grad_logits.mul_(1 - squashed.square())  # d cap*tanh(z/cap) / dz
            if head.scale != 1.0:
                grad_logits.mul_(head.scale)
            grad_raw = grad_logits.to(weight.dtype)
            if need_hidden:
                torch.mm(grad_raw, weight, out=grad_hidden[start:stop])
            if need_weight:
                grad_weight.addmm_(grad_logits.t(), h.to(lse.dtype))
            if need_bias:
                grad_bias += grad_logits.sum(0)
            del logits, squashed, grad_logits, grad_raw  # one chunk's buffer alive at a time, as in forward
        if need_weight:
            grad_weight = grad_weight.to(weight.dtype)
        if need_bias:
            grad_bias = grad_bias.to(bias.dtype)
        if to_via:  # one path back to the weight, not two
            return grad_hidden, None, grad_bias, grad_weight, None, None, None, None, None
        return grad_hidden, grad_weight, grad_bias, None, None, None, None, None, None


# The default chunk's fp32 logits: bounded in bytes, not positions, so a larger vocabulary means narrower chunks
# (more, smaller matmuls: slower per token) rather than more memory.
CHUNK_BYTES = 64 * 2**20


def default_chunk_size(vocab: int) -> int:
    """Scored positions per chunk whose fp32 logits fit CHUNK_BYTES."""
    return max(1, CHUNK_BYTES // (4 * vocab))


def streaming_token_logps(
    hidden: torch.Tensor, head: LMHead, labels: torch.Tensor, chunk_size: int | None = None
) -> torch.Tensor:
    """log p(labels[n] | hidden[n]) for hidden (N, H): (N,) fp32, differentiable in hidden, weight and bias.
    `chunk_size` None: default_chunk_size of the head's vocabulary."""
    if chunk_size is None:
        chunk_size = default_chunk_size(head.weight.shape[0])
    return _StreamingTokenLogps.apply(
        hidden, head.weight, head.bias, head.weight_grad_via, labels, chunk_size, head.scale, head.softcap, False
    )


def streaming_token_logps_and_log_sum_sq(
    hidden: torch.Tensor, head: LMHead, labels: torch.Tensor, chunk_size: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """`streaming_token_logps` and, from the same chunks, log Σ_v p_v² per position (N,) fp32, detached: the
    normaliser of WPO's weights (Zhou et al. 2024, arXiv:2406.11827). One more reduction over each chunk's
    exponentials, no other buffer."""
    if chunk_size is None:
        chunk_size = default_chunk_size(head.weight.shape[0])
    return _StreamingTokenLogps.apply(
        hidden, head.weight, head.bias, head.weight_grad_via, labels, chunk_size, head.scale, head.softcap, True
    )


def full_logits_token_logps(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The plain path: log_softmax over materialized logits (N, V) in fp32 -> (N,)."""
    return torch.log_softmax(logits.to(_accumulation_dtype(logits.dtype)), dim=-1).gather(1, labels[:, None]).squeeze(1)


def full_logits_log_sum_sq(logits: torch.Tensor) -> torch.Tensor:
    """The plain path's log Σ_v p_v² (N,) from materialized logits (N, V), detached."""
    with torch.no_grad():
        return torch.logsumexp(2 * torch.log_softmax(logits.to(_accumulation_dtype(logits.dtype)), dim=-1), dim=-1)

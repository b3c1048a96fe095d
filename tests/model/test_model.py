"""Every layout and the streaming head give the plain path's log-probs and gradients, on several architectures."""

import pytest
import torch

from dpo_scale.config import LogpsConfig
from dpo_scale.model.layout import collate
from dpo_scale.model.wrapper import PairLogpsModel, lm_head_of
from tiny import random_pairs, stories260k, story_pairs, tiny_llama, tiny_model

PLAIN = LogpsConfig(prefix_sharing=False, packing=False, streaming=False)
LAYOUTS = {
    "padded+streaming": LogpsConfig(prefix_sharing=False, packing=False, chunk_size=7),
    "packed": LogpsConfig(prefix_sharing=False, packing=True, chunk_size=16),
    "prefix_shared": LogpsConfig(prefix_sharing=True, packing=False, chunk_size=3),
    "prefix_shared+packed": LogpsConfig(prefix_sharing=True, packing=True, pack_length=40),
    "prefix_shared+full_logits": LogpsConfig(prefix_sharing=True, packing=False, streaming=False),
    "default": LogpsConfig(),  # what a run uses unless told otherwise
}


def _logps_and_grads(model, pairs, config, pad_token_id=0):
    model.zero_grad(set_to_none=True)
    out = PairLogpsModel(model, config, weighting=True)(collate(pairs, config, pad_token_id))
    # weights differ per slot so that a gradient landing on the wrong pair or branch would show
    weights = torch.linspace(0.5, 1.5, 2 * len(pairs))
    (torch.cat([out.chosen_logps, out.rejected_logps]) * weights).sum().backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return out, grads


def _assert_same(model, pairs, config, atol):
    """Values within `atol` (nats); each gradient within `atol` relative to its own largest entry, because fp32
    reordering errors scale with the magnitude of the terms summed."""
    expected, expected_grads = _logps_and_grads(model, pairs, PLAIN)
    got, got_grads = _logps_and_grads(model, pairs, config)
    for field in got._fields:  # sums, counts, LD-DPO's shared-part sums and WPO's weighting sums
        torch.testing.assert_close(getattr(got, field), getattr(expected, field), rtol=1e-5, atol=atol, msg=field)
    assert (got.chosen_shared_logps != got.chosen_logps).any()  # some pairs have a tail beyond the shared part
    assert got_grads.keys() == expected_grads.keys()
    for name, expected_grad in expected_grads.items():
        scale = max(1.0, expected_grad.abs().max().item())
        torch.testing.assert_close(got_grads[name], expected_grad, rtol=1e-4, atol=atol * scale, msg=name)


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("tie", [False, True])
def test_layouts_match_plain_path_tiny_llama(layout, tie):
    """fp32 tiny Llama, 6 pairs of 1-12 tokens. Sums of up to ~24 token log-probs of ~4.6 nats: attention over a
    different set of padded/masked keys and a chunked head reorder fp32 sums, so values agree to ~1e-6 and
    gradients (sums over all positions) to ~1e-6 relative. atol=2e-5 / rtol=1e-4 is that rounding with margin."""
    model = tiny_llama(tie=tie)
    _assert_same(model, random_pairs(6, model.config.vocab_size), LAYOUTS[layout], atol=2e-5)


@pytest.mark.parametrize("layout", ["prefix_shared", "prefix_shared+packed", "packed"])
def test_layouts_match_plain_path_stories260k(layout):
    """The real pretrained stories260K with its tokenizer on story text (../shared/data). Sums of 10-20 tokens of
    a few nats each: fp32 reordering moves them by ~1e-6; atol=2e-5 as for the tiny Llama."""
    _assert_same(stories260k(), story_pairs(), LAYOUTS[layout], atol=2e-5)


@pytest.mark.parametrize(
    "model_type,overrides",
    [
        ("gemma2", dict(final_logit_softcapping=5.0, attention="eager")),  # Gemma 2 has no SDPA path
        ("granite", dict(logits_scaling=4.0)),
        ("cohere", dict(logit_scale=0.25)),
        ("phi", dict()),  # a Linear LM head with a bias
        ("qwen2", dict()),
    ],
)
def test_streaming_head_reproduces_model_logits(model_type, overrides):
    """The streaming head rebuilds each architecture's logit transform (soft-capping, scaling, bias); compared with
    the model's own full-logits forward, prefix-shared, in fp32 (tolerance as for the tiny Llama)."""
    model = tiny_model(model_type, **overrides)
    pairs = random_pairs(4, model.config.vocab_size, seed=5)
    _assert_same(model, pairs, LAYOUTS["prefix_shared"], atol=2e-5)


@pytest.mark.parametrize("attention", ["eager", "sdpa"])
def test_attention_implementations_read_the_mask_alike(attention):
    """Eager attention adds the mask to the scores: a boolean mask would be read as +1/+0 and silently change
    every log-prob (seen: 0.09 nats). Both implementations must match the plain path (tolerance as above)."""
    model = tiny_model("llama", attention=attention)
    _assert_same(model, random_pairs(4, model.config.vocab_size, seed=2), LAYOUTS["prefix_shared+packed"], atol=2e-5)


def test_unsupported_logit_transform_is_refused():
    model = tiny_llama()
    model.config.dim_model_base = 16
    with pytest.raises(ValueError, match="streaming=false"):
        lm_head_of(model)


def test_pair_does_not_depend_on_its_batch():
    """Pair 0 alone vs pair 0 among 7 others of different lengths, in every layout: isolation by the mask and
    position ids means only fp32 rounding differs (1e-5)."""
    model = tiny_llama()
    pairs = random_pairs(8, model.config.vocab_size, seed=11)
    for config in LAYOUTS.values():
        alone = PairLogpsModel(model, config)(collate(pairs[:1], config, 0))
        together = PairLogpsModel(model, config)(collate(pairs, config, 0))
        torch.testing.assert_close(together.chosen_logps[:1], alone.chosen_logps, rtol=0, atol=1e-5)
        torch.testing.assert_close(together.rejected_logps[:1], alone.rejected_logps, rtol=0, atol=1e-5)

"""An input embedding tied to the LM head holds one vocabulary-sized gradient in backward, not two (model.py,
_HeadGradientAfterLookup), with the gradients, losses and weights of torch's own dense route."""

from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from dpo_scale.model import wrapper as model_module
from dpo_scale.training.checkpoint import load_weights
from dpo_scale.config import LogpsConfig, LoraConfig
from dpo_scale.commands.demo import write_demo_material
from dpo_scale.model.layout import collate
from dpo_scale.model.wrapper import PairLogpsModel, add_lora, enable_activation_checkpointing, tied_input_embedding
from launch import base_config, train, train_metrics
from test_logps import peak_allocated_bytes
from tiny import random_pairs, tiny_llama, tiny_model

HOOKS = Path(__file__).with_name("tied_embedding_hooks.py")


def _dense_route(monkeypatch) -> None:
    """Torch's own route for a tied embedding's gradient: a dense lookup gradient that autograd sums with the head's."""
    monkeypatch.setattr(model_module, "tied_input_embedding", lambda causal_lm: None)


def _gradients(model, batches, config, weighting=False) -> dict[str, torch.Tensor]:
    """Every parameter's gradient after one backward per batch (accumulated in .grad as training does)."""
    model.zero_grad(set_to_none=True)
    module = PairLogpsModel(model, config, weighting=weighting)
    for pairs in batches:
        out = module(collate(pairs, config, 0))
        weights = torch.linspace(0.5, 1.5, 2 * len(pairs))  # per-slot weights: a misplaced gradient would show
        (torch.cat([out.chosen_logps, out.rejected_logps]) * weights).sum().backward()
    return {name: p.grad for name, p in model.named_parameters() if p.grad is not None}


TIED_MODELS = {
    "llama": lambda: tiny_llama(tie=True),
    "gemma": lambda: tiny_model("gemma"),  # ties by default; scales its embeddings by sqrt(hidden)
    "gemma3_text": lambda: tiny_model("gemma3_text", final_logit_softcapping=5.0, attention="eager"),
    "qwen2": lambda: tiny_model("qwen2", tie_word_embeddings=True),
}
LAYOUTS = {
    "padded": LogpsConfig(prefix_sharing=False, packing=False, chunk_size=5),
    "prefix_shared+packed": LogpsConfig(prefix_sharing=True, packing=True, chunk_size=16),
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("name", list(TIED_MODELS))
def test_gradients_equal_torchs_dense_route(name, layout, monkeypatch):
    """fp32, two micro-batches accumulated, one with WPO's weighting pass. The two routes add the same terms into the
    tied weight's gradient in a different order (the lookup's rows one by one into the head's gradient, instead of
    into zeros first), so they agree to fp32 rounding: ~1e-7 relative to each gradient's largest entry; 1e-6 is that
    with margin. Every gradient stays dense: the optimizer never sees a sparse one."""
    model = TIED_MODELS[name]().train()
    assert tied_input_embedding(model) is not None
    config = LAYOUTS[layout]
    batches = [random_pairs(6, model.config.vocab_size, seed=1), random_pairs(3, model.config.vocab_size, seed=2)]
    got = _gradients(model, batches, config, weighting=True)
    assert model.get_input_embeddings().sparse
    with monkeypatch.context() as patch:
        _dense_route(patch)
        expected = _gradients(TIED_MODELS[name]().train(), batches, config, weighting=True)
    assert got.keys() == expected.keys()
    for param, grad in got.items():
        assert grad.layout == torch.strided, param
        scale = max(1.0, expected[param].abs().max().item())
        torch.testing.assert_close(grad, expected[param], rtol=0, atol=1e-6 * scale, msg=param)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_backward_holds_one_vocabulary_sized_gradient(checkpointing, monkeypatch):
    """Counted bytes (torch's profiler, every allocation and free) over forward + backward of a tied Llama whose
    (V, H) = (32768, 32) gradient, 4 MiB, outweighs everything else allocated (4-position chunks of logits: 0.5 MiB).
    Torch's route holds two (V, H) at once (the head's gradient and the lookup's dense one); this one holds the
    head's, into which the lookup's rows are added, plus less than half of another."""
    vocab, hidden = 32768, 32
    gradient_bytes = vocab * hidden * 4
    config = LogpsConfig(chunk_size=4)
    batch = collate(random_pairs(6, vocab), config, 0)

    def peak() -> int:
        model = tiny_llama(vocab_size=vocab, tie=True).train()
        if checkpointing:
            enable_activation_checkpointing(model)
        module = PairLogpsModel(model, config)

        def step():
            out = module(batch)
            torch.cat([out.chosen_logps, out.rejected_logps]).sum().backward()

        step()  # torch's first-call allocations out of the way
        model.zero_grad(set_to_none=True)
        return peak_allocated_bytes(step)

    one_route = peak()
    with monkeypatch.context() as patch:
        _dense_route(patch)
        dense_route = peak()
    assert dense_route >= 2 * gradient_bytes
    assert one_route < 1.5 * gradient_bytes


@pytest.mark.parametrize("name", ["llama", "gemma3_text"])
def test_lookup_rows_are_summed_per_token(name):
    """The lookup's rows reach the weight summed per token (coalesced), as torch's dense lookup gradient sums them,
    so that CUDA adds one row per token into the head's gradient instead of one atomic add per occurrence. Seen by
    a backward through the lookup alone: 24 lookups of 3 tokens give 3 rows (Gemma 3 scales its lookup first)."""
    model = TIED_MODELS[name]().train()
    PairLogpsModel(model, LogpsConfig())
    model.get_input_embeddings()(torch.tensor([[5, 7, 9] * 8])).sum().backward()
    grad = model.get_input_embeddings().weight.grad
    assert grad.is_sparse and grad._nnz() == 3


def test_only_a_trainable_embedding_tied_to_the_head_gets_sparse_rows():
    """An untied embedding's sparse gradient would reach the optimizer as is; a frozen one (LoRA's base) has none; the
    full-logits path computes the head as the model does. None of them is touched."""
    untied = tiny_llama(tie=False)
    PairLogpsModel(untied, LogpsConfig())
    assert tied_input_embedding(untied) is None and not untied.get_input_embeddings().sparse

    lora = add_lora(tiny_llama(tie=True), LoraConfig(enabled=True, target_modules=["q_proj", "v_proj"]))
    PairLogpsModel(lora, LogpsConfig())
    assert not lora.get_base_model().get_input_embeddings().sparse

    full_logits = tiny_llama(tie=True)
    PairLogpsModel(full_logits, LogpsConfig(streaming=False))
    assert not full_logits.get_input_embeddings().sparse


def test_a_forward_without_gradients_builds_no_graph():
    """A frozen reference's forward (no_grad) over a tied model whose lookup was made sparse: nothing is recorded
    for a backward, and the log-probs are the full-logits path's (tolerance as in test_model.py)."""
    model = tiny_llama(tie=True)
    batch = collate(random_pairs(4, model.config.vocab_size), LogpsConfig(), 0)
    expected = PairLogpsModel(model, LogpsConfig(streaming=False))(batch)
    with torch.no_grad():
        got = PairLogpsModel(model, LogpsConfig())(batch)
    assert model.get_input_embeddings().sparse and not got.chosen_logps.requires_grad
    torch.testing.assert_close(got.chosen_logps, expected.chosen_logps, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(got.rejected_logps, expected.rejected_logps, rtol=1e-6, atol=1e-5)


VOCAB, HIDDEN = 8192, 64
GRADIENT_BYTES = VOCAB * HIDDEN * 4  # one (V, H) fp32 tensor: 2 MiB


@pytest.fixture(scope="module")
def tied_material(tmp_path_factory):
    """The demo pairs and tokenizer with a tied 2-layer Llama over a larger vocabulary than the tokenizer uses."""
    model_dir, data_path = write_demo_material(tmp_path_factory.mktemp("tied"), rows=64)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, bos_token_id=1, eos_token_id=2, pad_token_id=0,
        tie_word_embeddings=True,
    )  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(model_dir)
    return model_dir, data_path


def _run(material, run_dir: Path, ranks: int, dense: bool, **sections) -> tuple[list[float], list[int]]:
    """Per-step losses, and per rank the most (V, H) fp32 tensors any backward after the first held at once. (ZeRO-3
    also gathers the tied weight, a (V, H) too, inside the first backward; in later ones it did not, here.)"""
    tree = base_config(material, run_dir, micro_batch_size=4, logps={"chunk_size": 8}, **sections)
    env = {
        "DPO_SCALE_TEST_BACKWARD_PEAK": str(run_dir.parent / f"{run_dir.name}-backward-peak"),
        "DPO_SCALE_TEST_TENSOR_BYTES": str(GRADIENT_BYTES),
    }
    if dense:
        env["DPO_SCALE_TEST_DENSE_TIED_GRADIENT"] = "1"
    result = train(tree, ranks=ranks, script=HOOKS, env_extra=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    held = []
    for rank in range(ranks):
        peaks = (run_dir.parent / f"{run_dir.name}-backward-peak.rank{rank}").read_text().split()
        held.append(max(map(int, peaks[1:])) // GRADIENT_BYTES)
    return [row["loss"] for row in train_metrics(run_dir)], held


@pytest.mark.slow
@pytest.mark.parametrize(
    "ranks,sections",
    [
        (1, dict(gradient_accumulation_steps=2, deepspeed={"config": "zero0", "activation_checkpointing": True})),
        (2, dict(deepspeed={"config": "zero3"})),
    ],
    ids=["zero0-one-process-accumulating-checkpointed", "zero3-two-ranks"],
)
def test_training_equals_the_dense_route_holding_one_gradient(tied_material, tmp_path, ranks, sections):
    """`dpo-scale train` on a tied Llama, this route against torch's dense one (tests/model/tied_embedding_hooks.py)
    in the same test. fp32: per-step losses and final weights agree to the rounding of one reordered sum per step (1e-6).
    Counted by torch's profiler, each rank's backward holds one (V, H) fp32 tensor at a time, against two. (Under
    ZeRO-3 the head's weight is gathered whole on each rank, and the backward's total peak is the gradient
    reduce-scatter's flat copy of every gradient, after the tied one is summed: so the (V, H) tensors are counted.)"""
    losses, held = _run(tied_material, tmp_path / "one", ranks, dense=False, **sections)
    dense_losses, dense_held = _run(tied_material, tmp_path / "dense", ranks, dense=True, **sections)
    assert len(losses) == 6 and len(set(round(x, 6) for x in losses)) > 2  # the weights did move
    assert losses == pytest.approx(dense_losses, abs=1e-6)
    final = {
        name: load_weights(sorted((tmp_path / name / "checkpoints").glob("step-*"))[-1]) for name in ("one", "dense")
    }
    for key, value in final["dense"].items():
        torch.testing.assert_close(final["one"][key], value, rtol=0, atol=1e-6, msg=key)
    assert held == [1] * ranks and dense_held == [2] * ranks

"""The kernel forms of the layouts' attention (logps.attention): the FlexAttention block mask, the varlen form
(position ids, no mask) and the units form (the kernel once per packed unit) compute what the dense mask computes,
and our code builds no (rows, 1, T, T) tensor for them.

On CPU, torch 2.13 runs FlexAttention's forward only (no backward) and, without torch.compile, through its unfused
reference implementation: these tests prove the masks; speed and memory belong to the GPU benchmark."""

import pytest
import torch
import torch.nn.functional as F
from tiny import random_pairs, stories260k, story_pairs, tiny_model
from torch.nn.attention.flex_attention import create_mask, flex_attention
from torch.utils._python_dispatch import TorchDispatchMode

from dpo_scale.config import ConfigError, LogpsConfig
from dpo_scale.data.pairs import Pair
from dpo_scale.model.layout import block_mask, collate, dense_mask, may_attend
from dpo_scale.model.wrapper import PairLogpsModel, enable_activation_checkpointing, resolve_attention

PAIR = Pair(0, "hand-made", prompt_ids=[10, 11, 12], chosen_ids=[20, 21], rejected_ids=[30, 31, 32])
ONE_TOKEN = Pair(1, "hand-made", prompt_ids=[13], chosen_ids=[22], rejected_ids=[33])
LONG_PROMPT = Pair(2, "hand-made", prompt_ids=list(range(3, 150)), chosen_ids=[40, 41], rejected_ids=[42])
LAYOUTS = {
    "padded": (LogpsConfig(prefix_sharing=False, packing=False), [PAIR, ONE_TOKEN]),
    "packed": (LogpsConfig(prefix_sharing=False, packing=True), [PAIR, ONE_TOKEN, LONG_PROMPT]),
    "prefix_shared": (LogpsConfig(prefix_sharing=True, packing=False), [PAIR, ONE_TOKEN]),
    "prefix_shared+packed": (LogpsConfig(), [PAIR, ONE_TOKEN, LONG_PROMPT]),
    "pack_length rows": (LogpsConfig(pack_length=160), [PAIR, ONE_TOKEN, LONG_PROMPT] * 3),
    "1-token completions": (LogpsConfig(), [ONE_TOKEN] * 4),
    "prompt fills the row": (LogpsConfig(pack_length=152), [LONG_PROMPT, PAIR]),
}


@pytest.fixture(autouse=True)
def eager_flex(monkeypatch):
    """transformers' FlexAttention without torch.compile (the CPU compile takes ~30 s and a C++ toolchain): torch's
    unfused reference implementation, the same function."""
    import transformers.integrations.flex_attention as integration

    def uncompiled(query, key, value, training=False, **kwargs):
        return flex_attention(query, key, value, **kwargs)

    monkeypatch.setattr(integration, "compile_friendly_flex_attention", uncompiled)


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_block_mask_expands_to_the_dense_mask(layout):
    """Elementwise: the mask_mod the BlockMask is built from, evaluated everywhere, is the dense mask; and attention
    through the BlockMask (its empty / full / partial blocks, T up to 480 so there are several 128-token blocks)
    equals SDPA through the dense mask on random queries, keys and values."""
    config, pairs = LAYOUTS[layout]
    batch = collate(pairs, config, pad_token_id=0)
    rows, length = batch.input_ids.shape
    dense = dense_mask(batch)
    expanded = create_mask(may_attend(batch.unit_ids, batch.branches), rows, 1, length, length, device="cpu")
    assert torch.equal(expanded, dense)
    blocks = block_mask(batch)
    assert blocks.shape == (rows, 1, length, length)
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(rows, 4, length, 8, generator=generator) for _ in range(3))
    torch.testing.assert_close(flex_attention(q, k, v, block_mask=blocks),
                               F.scaled_dot_product_attention(q, k, v, attn_mask=dense), rtol=1e-5, atol=1e-6)


MODELS = {
    "llama": lambda: tiny_model("llama"),
    "qwen2": lambda: tiny_model("qwen2"),
    "mistral": lambda: tiny_model("mistral"),
    "gemma2": lambda: tiny_model("gemma2", final_logit_softcapping=5.0, attention="eager"),
}


def _sums(model, pairs, config):
    with torch.no_grad():
        out = PairLogpsModel(model, config)(collate(pairs, config, pad_token_id=0))
    return torch.cat([out.chosen_logps, out.rejected_logps])


@pytest.mark.parametrize("name", [*MODELS, "stories260k"])
@pytest.mark.parametrize("layout", ["prefix_shared+packed", "packed"])
def test_flex_forward_equals_the_dense_forward(name, layout):
    """Per-pair log-prob sums through FlexAttention equal the dense-mask forward's within 1e-5, or 1e-6 relative for
    stories260K's sums of 30-70 nats, whose fp32 rounding alone is ~1e-5 (the path precompute and eval use; fp32,
    no gradients)."""
    model = stories260k() if name == "stories260k" else MODELS[name]()
    pairs = story_pairs() if name == "stories260k" else random_pairs(6, model.config.vocab_size, seed=3)
    config = LogpsConfig(prefix_sharing=layout.startswith("prefix"), packing=True, attention="dense")
    dense = _sums(model, pairs, config)
    flex = _sums(model, pairs, LogpsConfig(prefix_sharing=config.prefix_sharing, packing=True, attention="flex"))
    assert model.config._attn_implementation == "flex_attention"
    torch.testing.assert_close(flex, dense, rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("name", ["llama", "qwen2", "mistral"])
def test_varlen_forward_equals_the_dense_forward(name):
    """Packed, no prefix sharing, no mask: transformers reads the units from the restarting position ids (sdpa on
    CPU here; flash-attention's varlen kernel on a GPU takes the same inputs)."""
    model = MODELS[name]()
    pairs = random_pairs(6, model.config.vocab_size, seed=4)
    dense = _sums(model, pairs, LogpsConfig(prefix_sharing=False, attention="dense"))
    varlen = _sums(model, pairs, LogpsConfig(prefix_sharing=False, attention="varlen"))
    torch.testing.assert_close(varlen, dense, rtol=0, atol=1e-5)


class _Shapes(TorchDispatchMode):
    """Records the shape of every tensor an operation returns."""

    def __init__(self):
        super().__init__()
        self.shapes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(tensor, torch.Tensor):
                self.shapes.append(tuple(tensor.shape))
        return out


@pytest.mark.parametrize("attention", ["flex", "varlen", "units", "dense"])
def test_kernel_paths_build_no_dense_mask(attention):
    """What our code hands the kernel: on the flex and varlen paths no (rows, 1, T, T) or (rows, T, T) tensor is
    allocated (the dense path does allocate it: the counter works). What a kernel does inside is its own: on this
    CPU, eager FlexAttention and sdpa's packed-sequence mask materialize T x T; on a GPU neither does."""
    model = tiny_model("llama")
    config = LogpsConfig(prefix_sharing=attention != "varlen", attention=attention)
    scorer = PairLogpsModel(model, config)
    batch = collate(random_pairs(6, model.config.vocab_size, seed=5), config, pad_token_id=0)
    rows, length = batch.input_ids.shape
    with _Shapes() as seen:
        scorer._attention_mask(batch)
    dense_shapes = {(rows, 1, length, length), (rows, length, length)}
    assert bool(dense_shapes & set(seen.shapes)) == (attention == "dense"), seen.shapes


def test_choices_that_cannot_work_are_refused():
    with pytest.raises(ConfigError, match="logps.attention=varlen isolates whole units"):
        LogpsConfig(attention="varlen")
    with pytest.raises(ConfigError, match="does not support transformers' flex_attention"):
        model = tiny_model("llama")
        model._supports_flex_attn = False
        PairLogpsModel(model, LogpsConfig(attention="flex"))
    with pytest.raises(ConfigError, match="need a 4D attention mask"):
        model = tiny_model("llama")
        model.config._attn_implementation = "flash_attention_2"
        PairLogpsModel(model, LogpsConfig(attention="dense"))
    with pytest.raises(ConfigError, match="logps.attention=units runs each unit on one rank"):
        resolve_attention(LogpsConfig(attention="units"), tiny_model("llama"), cuda=False, sequence_parallel=True)
    assert PairLogpsModel(tiny_model("llama"), LogpsConfig()).attention == "units"  # auto on CPU
    assert resolve_attention(LogpsConfig(), tiny_model("llama"), cuda=False, sequence_parallel=True) == "dense"


@pytest.mark.parametrize("name", [*MODELS, "stories260k"])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_units_forward_and_backward_equal_the_dense_ones(name, checkpointing):
    """The kernel once per unit gives the dense mask's per-pair sums and every parameter's gradient (fp32: within
    1e-5 of the largest gradient; stories260K's reach ~60, and the kernels sum in different orders),
    for sdpa and eager (Gemma 2's soft-capped attention), GQA (Qwen2), and under activation checkpointing, whose
    recompute must see the units again. The layouts include a unit filling its row and rows ending in padding."""
    results = {}
    for attention in ("dense", "units"):
        if name == "llama":  # hand-made units, the longest filling its row of 160: a vocabulary for LONG_PROMPT's ids
            model, pairs = tiny_model("llama", vocab_size=160), [PAIR, ONE_TOKEN, LONG_PROMPT] * 3
        elif name == "stories260k":
            model, pairs = stories260k(), story_pairs()
        else:
            model = MODELS[name]()
            pairs = random_pairs(6, model.config.vocab_size, seed=3)
        if checkpointing:
            enable_activation_checkpointing(model)
        model.train()
        config = LogpsConfig(attention=attention, pack_length=160 if name == "llama" else None)
        out = PairLogpsModel(model, config)(collate(pairs, config, pad_token_id=0))
        (out.chosen_logps.sum() - 2 * out.rejected_logps.sum()).backward()
        grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
        results[attention] = torch.cat([out.chosen_logps, out.rejected_logps]).detach(), grads
    torch.testing.assert_close(results["units"][0], results["dense"][0], rtol=1e-6, atol=1e-5)
    units, dense = results["units"][1], results["dense"][1]
    assert (units - dense).abs().max() <= 1e-5 * dense.abs().max(), ((units - dense).abs().max(), dense.abs().max())


def test_units_run_the_kernel_on_each_unit_and_leave_generation_alone():
    """The kernel sees each unit's own length (the attention work is the units' squared lengths, not the row's), no
    (rows, 1, T, T) tensor is made in the whole forward (sdpa's own mask step included), and the routed model
    generates as before: a call without the units runs the model's own kernel and mask."""
    from transformers import AttentionInterface

    model = tiny_model("llama", vocab_size=160).eval()
    prompts = torch.tensor([[0, 0, 5, 6, 7], [3, 4, 5, 6, 7]])
    attention_mask = (prompts != 0).long()
    before = model.generate(prompts, attention_mask=attention_mask, max_new_tokens=4, do_sample=False, pad_token_id=0)
    config = LogpsConfig(attention="units")
    scorer = PairLogpsModel(model, config)
    batch = collate([PAIR, ONE_TOKEN, LONG_PROMPT], config, pad_token_id=0)
    routed = AttentionInterface._global_mapping[model.config._attn_implementation]
    kernel, lengths = routed.kernel, []

    def counting(module, query, *args, **kwargs):
        lengths.append(query.shape[2])
        return kernel(module, query, *args, **kwargs)

    routed.kernel = counting
    with torch.no_grad(), _Shapes() as seen:
        scorer(batch)
    routed.kernel = kernel
    layers = model.config.num_hidden_layers
    rows, length = batch.input_ids.shape
    assert rows == 1 and sorted(lengths) == sorted([8, 3, 150] * layers)
    assert not [shape for shape in seen.shapes if shape[-2:] == (length, length)], seen.shapes
    after = model.generate(prompts, attention_mask=attention_mask, max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert torch.equal(after, before)


@pytest.mark.slow
def test_training_through_varlen_follows_the_dense_mask(tmp_path):
    """`dpo-scale train` (ZeRO-3, one process) on packed, non-shared rows: no mask and restarting position ids give
    the dense mask's per-step losses (fp32; only the kernels' summation order differs)."""
    from dpo_scale.commands.demo import write_demo_material
    from launch import base_config, train, train_metrics

    material = write_demo_material(tmp_path / "demo", rows=64)
    losses = {}
    for attention in ("dense", "varlen"):
        tree = base_config(material, tmp_path / attention, logps={"prefix_sharing": False, "attention": attention})
        result = train(tree)
        assert result.returncode == 0, result.stderr[-3000:]
        losses[attention] = [row["loss"] for row in train_metrics(tmp_path / attention)]
    assert len(losses["dense"]) == 6 and len(set(losses["dense"])) > 2
    assert losses["varlen"] == pytest.approx(losses["dense"], rel=0, abs=1e-5)

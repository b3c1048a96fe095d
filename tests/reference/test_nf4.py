"""The NF4 reference: close to the full-precision model and not equal to it, 4-bit where bitsandbytes says, and
loadable beside a ZeRO-3 sharded policy on every rank (the real `deepspeed` launcher, 2 CPU ranks on gloo).

Run as a script (`deepspeed --num_gpus 2 tests/reference/test_nf4.py MODEL_DIR`) this file is the 2-rank driver that
`test_two_ranks_replicate_nf4_beside_zero3_policy` launches.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dpo_scale.config import LogpsConfig, ModelConfig
from dpo_scale.model.layout import collate
from dpo_scale.model.wrapper import PairLogpsModel
from dpo_scale.reference.nf4 import (
    NF4Reference,
    head_is_quantized,
    load_nf4_reference,
    nf4_memory,
    nf4_quantization_config,
    zero3_integration_paused,
)

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for tiny.py when deepspeed runs this file
from tiny import random_pairs, shared_path, stories260k, story_pairs, tiny_llama  # noqa: E402

bnb = pytest.importorskip("bitsandbytes")

PLAIN = LogpsConfig(prefix_sharing=False, packing=False, streaming=False)
DEVICE_MAP_ERROR = "DeepSpeed Zero-3 is not compatible with passing a `device_map`"
# stories260K: 5 layers x (q 64x64, k 32x64, v 32x64, o 64x64, gate/up 172x64, down 64x172) Linear weights
LINEAR_SHAPES = [(64, 64), (32, 64), (32, 64), (64, 64), (172, 64), (172, 64), (64, 172)] * 5
QUANTIZED_PARAMS = sum(o * i for o, i in LINEAR_SHAPES)  # 226,560
OTHER_PARAMS = 512 * 64 + 11 * 64  # tied embedding / LM head, 2 norms per layer + the final norm: 33,472


def _model_dir() -> str:
    return str(shared_path("models", "stories260K"))


def _logps(source, pairs, config=LogpsConfig()):
    with torch.no_grad():
        return source(collate(pairs, config, pad_token_id=0))


def test_nf4_reference_is_close_to_full_precision_and_not_equal():
    """stories260K on 6 story pairs (10-30 completion tokens each). Observed with double quantization:
    per-sequence |Δ log p| 0.40-3.15 nats, 0.13 nats per token (sum-level); bounds 6 nats and 0.3 nats per token
    leave 2x margin. fp32 reordering moves these sums by ~1e-5, so a max |Δ| above 0.1 nat is quantization.
    Its own streaming and full-logits paths agree to fp32 rounding (2e-5): the head stays a dense Linear."""
    nf4 = load_nf4_reference(ModelConfig(_model_dir()))
    linears = [m for m in nf4.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert [(m.out_features, m.in_features) for m in linears] == LINEAR_SHAPES
    assert all(m.weight.quant_state.quant_type == "nf4" for m in linears)
    head = nf4.get_output_embeddings()
    assert type(head) is torch.nn.Linear and head.weight is nf4.get_input_embeddings().weight  # tied, fp32
    assert not head_is_quantized(nf4) and not any(p.requires_grad for p in nf4.parameters()) and not nf4.training

    pairs = story_pairs()
    reference = NF4Reference(nf4, LogpsConfig())
    assert reference.logps_config.streaming
    got = reference.logps(collate(pairs, LogpsConfig(), pad_token_id=0))
    full = _logps(PairLogpsModel(stories260k(), LogpsConfig()), pairs)
    torch.testing.assert_close(got.chosen_tokens, full.chosen_tokens, rtol=0, atol=0)
    errors = torch.cat([got.chosen_logps - full.chosen_logps, got.rejected_logps - full.rejected_logps]).abs()
    tokens = (full.chosen_tokens.sum() + full.rejected_tokens.sum()).item()
    assert errors.max() < 6.0 and errors.sum() / tokens < 0.3, errors
    assert errors.max() > 0.1, errors  # it is quantized

    plain = _logps(PairLogpsModel(nf4, PLAIN), pairs, PLAIN)
    torch.testing.assert_close(got.chosen_logps, plain.chosen_logps, rtol=1e-5, atol=2e-5)
    torch.testing.assert_close(got.rejected_logps, plain.rejected_logps, rtol=1e-5, atol=2e-5)


@pytest.mark.parametrize("double_quant", [True, False])
def test_nf4_memory_of_stories260k(double_quant):
    """What is 4-bit is the 35 decoder Linear layers (87% of the parameters); the tied 512x64 embedding and the
    norms stay fp32. Bytes follow from the format, blocks of 64 weights: 1/2 byte per weight; one scale per
    block (uint8 with double quantization, else fp32); with double quantization per layer one fp32 scale per 256
    blocks and an fp32 offset; per layer a 16-entry fp32 NF4 table and, with double quantization, a 256-entry one.
    The tables are 1 KB per layer: 25% of this tiny model's 4-bit bytes, 0.01% of a 7B model's."""
    memory = nf4_memory(load_nf4_reference(ModelConfig(_model_dir()), double_quant=double_quant))
    blocks = [math.ceil(o * i / 64) for o, i in LINEAR_SHAPES]
    packed = QUANTIZED_PARAMS // 2
    if double_quant:
        scales = sum(blocks) + sum(4 * math.ceil(b / 256) + 4 for b in blocks)
        tables = len(blocks) * (16 + 256) * 4
    else:
        scales, tables = 4 * sum(blocks), len(blocks) * 16 * 4
    assert memory.quantized_params == QUANTIZED_PARAMS == 226_560
    assert memory.other_params == OTHER_PARAMS and memory.other_bytes == 4 * OTHER_PARAMS
    assert memory.quantized_bytes == packed + scales + tables == (155_180 if double_quant else 129_680)
    # without the per-layer tables: the documented 0.516 (0.5625) byte per parameter, plus per-layer rounding
    expected = 0.5 + 1 / 64 + 4 / (64 * 256) if double_quant else 0.5 + 4 / 64
    assert (packed + scales) / QUANTIZED_PARAMS == pytest.approx(expected, abs=1e-3)


def test_quantized_lm_head_falls_back_to_full_logits():
    """A `Linear4bit` head is an `nn.Linear` whose weight is packed uint8: the streaming head cannot read it (here
    a shape error), so NF4Reference takes the full-logits path, which equals the plain path exactly (same ops)."""
    model = tiny_llama(tie=False)
    dense = model.lm_head
    head = bnb.nn.Linear4bit(dense.in_features, dense.out_features, bias=False, compute_dtype=torch.float32)
    head.weight = bnb.nn.Params4bit(dense.weight.data.clone(), requires_grad=False, quant_type="nf4")
    model.lm_head = head.to("cpu")  # quantizes
    model.lm_head.support_avx512bf16_for_cpu = False  # as load_nf4_reference does on CPU
    assert head_is_quantized(model)

    pairs = random_pairs(4, model.config.vocab_size)
    reference = NF4Reference(model, LogpsConfig(chunk_size=7))
    assert not reference.logps_config.streaming and reference.logps_config.prefix_sharing
    got = reference.logps(collate(pairs, reference.logps_config, pad_token_id=0))
    plain = _logps(PairLogpsModel(model, PLAIN), pairs, PLAIN)
    torch.testing.assert_close(got.chosen_logps, plain.chosen_logps, rtol=1e-5, atol=2e-5)
    with pytest.raises(RuntimeError, match="shapes cannot be multiplied"):
        _logps(PairLogpsModel(model, LogpsConfig()), pairs)


@pytest.fixture
def zero3_integration():
    """A live HfDeepSpeedConfig for ZeRO-3, as dpo_scale.distributed keeps during training; always removed after,
    so no later from_pretrained in this pytest process is treated as a ZeRO-3 load."""
    from transformers.integrations import HfDeepSpeedConfig
    from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled, unset_hf_deepspeed_config

    config = HfDeepSpeedConfig({"zero_optimization": {"stage": 3}, "train_micro_batch_size_per_gpu": 1})
    assert is_deepspeed_zero3_enabled()
    try:
        yield config
    finally:
        unset_hf_deepspeed_config()
        del config


def test_device_map_is_refused_while_zero3_integration_is_live(zero3_integration):
    """The trap (open-instruct #98, accelerate #2312, DeepSpeed #7096): with the integration live, a quantized load
    that places the model with a device_map raises. load_nf4_reference pauses it for that one call and restores
    it, also when the block raises."""
    from transformers import AutoModelForCausalLM
    from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

    with pytest.raises(ValueError, match=re.escape(DEVICE_MAP_ERROR)):
        AutoModelForCausalLM.from_pretrained(
            _model_dir(), quantization_config=nf4_quantization_config(), device_map={"": "cpu"}
        )
    nf4 = load_nf4_reference(ModelConfig(_model_dir()))
    assert is_deepspeed_zero3_enabled()
    assert not any(hasattr(p, "ds_id") for p in nf4.parameters())  # whole, not partitioned

    with pytest.raises(KeyError), zero3_integration_paused():
        assert not is_deepspeed_zero3_enabled()
        raise KeyError("inside")
    assert is_deepspeed_zero3_enabled()


@pytest.mark.slow
def test_two_ranks_replicate_nf4_beside_zero3_policy(tmp_path):
    """2 ranks under the real deepspeed launcher (gloo, CPU). The policy loads into ZeRO-3 shards (each rank holds
    half of each weight); the NF4 reference loads whole on each rank with the integration live. Both ranks print
    the same NF4 log-probs as this process computes without DeepSpeed (same weights, same CPU kernels; 1e-5 for
    thread-count reordering), and the sharded policy gives the full-precision values (2e-5, gathered fp32)."""
    model_dir = _model_dir()
    deepspeed = shutil.which("deepspeed") or str(Path(sys.executable).with_name("deepspeed"))
    from dpo_scale.distributed import free_port

    command = [deepspeed, "--num_gpus", "2", "--master_port", str(free_port()), __file__, model_dir]
    result = subprocess.run(
        command, capture_output=True, text=True, timeout=240, env={**os.environ, "HF_HUB_OFFLINE": "1"},
        cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    reports = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    assert [r["rank"] for r in reports] == [0, 1]

    pairs = story_pairs()[:2]
    nf4 = _logps(NF4Reference(load_nf4_reference(ModelConfig(model_dir)), LogpsConfig()).module, pairs)
    full = _logps(PairLogpsModel(stories260k(), LogpsConfig()), pairs)
    for report in reports:
        assert report["trap"].startswith(DEVICE_MAP_ERROR)
        assert report["zero3_after_nf4_load"]
        assert 0.45 < report["policy_held"] / report["policy_total"] < 0.55
        assert report["policy_total"] == QUANTIZED_PARAMS + OTHER_PARAMS
        assert report["gate_proj"] == {"shape": [0], "ds_shape": [172, 64], "ds_tensor": [5504]}
        assert report["linear4bit"] == 35 and report["nf4_params"] == QUANTIZED_PARAMS + OTHER_PARAMS
        assert report["nf4_partitioned"] == 0
        got = torch.tensor(report["nf4_logps"])
        torch.testing.assert_close(got, torch.cat([nf4.chosen_logps, nf4.rejected_logps]), rtol=0, atol=1e-5)
        policy = torch.tensor(report["policy_logps"])
        torch.testing.assert_close(policy, torch.cat([full.chosen_logps, full.rejected_logps]), rtol=0, atol=2e-5)
    assert reports[0]["nf4_logps"] == reports[1]["nf4_logps"]


def _two_rank_driver(model_dir: str) -> None:
    """One rank of the 2-rank test: writes what the test checks to rank{N}.json in the working directory."""
    from transformers import AutoModelForCausalLM
    from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

    from dpo_scale import distributed
    from dpo_scale.config import DeepSpeedConfig, OptimConfig
    from dpo_scale.ds_config import resolve_deepspeed_config

    world = distributed.init(timeout_s=60)
    ds_config = resolve_deepspeed_config(DeepSpeedConfig(), OptimConfig(), 1, 1, world.size, total_steps=1)
    model_config = ModelConfig(model_dir)
    policy = distributed.load_model(model_config, ds_config)  # keeps the HfDeepSpeedConfig alive: ZeRO-3 shards
    held, total = distributed.held_parameters(policy)
    gate = policy.model.layers[0].mlp.gate_proj.weight
    try:
        AutoModelForCausalLM.from_pretrained(
            model_dir, quantization_config=nf4_quantization_config(), device_map={"": world.device}
        )
        trap = "no error"
    except ValueError as error:
        trap = str(error)
    nf4 = load_nf4_reference(model_config, device=world.device)
    memory = nf4_memory(nf4)
    pairs = story_pairs()[:2]
    batch = collate(pairs, LogpsConfig(), pad_token_id=0).to(world.device)
    nf4_out = NF4Reference(nf4, LogpsConfig()).logps(batch)
    policy_module = PairLogpsModel(policy, LogpsConfig())
    distributed.register_lm_head(policy_module, policy)
    engine = distributed.inference_engine(policy_module, ds_config)
    with torch.no_grad():
        policy_out = engine(batch)
    report = {
        "rank": world.rank,
        "trap": trap,
        "zero3_after_nf4_load": is_deepspeed_zero3_enabled(),
        "policy_held": held,
        "policy_total": total,
        "gate_proj": {"shape": list(gate.shape), "ds_shape": list(gate.ds_shape),
                      "ds_tensor": list(gate.ds_tensor.shape)},  # fmt: skip
        "linear4bit": sum(isinstance(m, bnb.nn.Linear4bit) for m in nf4.modules()),
        "nf4_params": memory.quantized_params + memory.other_params,
        "nf4_partitioned": sum(hasattr(p, "ds_id") for p in nf4.parameters()),
        "nf4_logps": torch.cat([nf4_out.chosen_logps, nf4_out.rejected_logps]).tolist(),
        "policy_logps": torch.cat([policy_out.chosen_logps, policy_out.rejected_logps]).tolist(),
    }
    Path(f"rank{world.rank}.json").write_text(json.dumps(report))  # a file each: the ranks' stdout interleaves
    distributed.close()


if __name__ == "__main__":
    _two_rank_driver([arg for arg in sys.argv[1:] if not arg.startswith("--local_rank")][0])

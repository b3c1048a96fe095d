"""The 4-bit reference: a frozen NF4 copy of the starting policy, replicated on every rank beside the ZeRO-3 shards.

Memory. bitsandbytes quantizes every `nn.Linear` inside the decoder layers (attention and MLP projections) to NF4
in blocks of 64 weights: 4 bits per weight plus one scale per block. With double quantization (QLoRA, Dettmers et
al. 2023, section 3) the scales are themselves quantized to 8 bits in blocks of 256 with one fp32 scale each:

    double_quant=True:   0.5 + 1/64 + 4/(64·256)  = 0.5159 byte per quantized parameter  (0.516 GB per 1B)
    double_quant=False:  0.5 + 4/64               = 0.5625 byte per quantized parameter  (0.563 GB per 1B)

plus a 16-entry NF4 table (and with double quantization a 256-entry one) per layer, negligible at scale. The input
embeddings, the LM head and the norms are *not* quantized: bitsandbytes skips the output embedding (and anything
tied to it) by default and never converts `nn.Embedding`. They stay in `model.dtype`, so they often dominate what
is left: Llama-3-8B's embeddings and head (2 x 128,256 x 4,096 = 1.05B parameters) take 2.1 GB in bf16 next to
3.6 GB for its 7.0B quantized parameters. `nf4_memory` measures a loaded model; on stories260K
(tests/reference/test_nf4.py) 226,560 of its 260,032 parameters (87%) are quantized and the 512 x 64 tied embedding
stays fp32.

ZeRO-3. While an `HfDeepSpeedConfig` is alive (dpo_scale.distributed keeps one so that the policy loads straight
into shards), transformers treats every `from_pretrained` as a ZeRO-3 load. For a quantized model that means: no
`device_map` allowed ("DeepSpeed Zero-3 is not compatible with passing a `device_map`", the trap reported in
open-instruct #98, accelerate #2312, DeepSpeed #7096), yet a `device_map` is how the replica is placed on this
rank's device. (transformers 5.24 without a `device_map` lets the bitsandbytes quantizer pick
`cuda.current_device()` and loads; we place the replica explicitly rather than depend on which device is current
and on how each transformers version treats quantized loads under ZeRO-3.) `zero3_integration_paused` sets the
integration aside for that one call and restores it, so the policy's later loads still shard. The result is a
plain (not partitioned) model on every rank: ZeRO never sees it, and its forward needs no collective.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from dpo_scale.config import ConfigError, LogpsConfig, ModelConfig
from dpo_scale.loss import PairLogps
from dpo_scale.model.layout import PairBatch
from dpo_scale.model.wrapper import PairLogpsModel, RowSlice

COMPUTE_DTYPES = ("float32", "bfloat16", "float16")


@contextmanager
def zero3_integration_paused() -> Iterator[None]:
    """Within the block transformers sees no DeepSpeed config (`is_deepspeed_zero3_enabled()` is False); the same
    config is back afterwards, also after an error. The config object itself stays alive: only transformers' weak
    reference to it is cleared and put back."""
    from transformers.integrations import deepspeed as hf_deepspeed

    saved = hf_deepspeed._hf_deepspeed_config_weak_ref
    hf_deepspeed.unset_hf_deepspeed_config()
    try:
        yield
    finally:
        hf_deepspeed._hf_deepspeed_config_weak_ref = saved


def nf4_quantization_config(double_quant: bool = True, compute_dtype: str = "float32"):
    """The `BitsAndBytesConfig` of an NF4 model whose 4-bit matmuls run in `compute_dtype`."""
    from transformers import BitsAndBytesConfig

    if compute_dtype not in COMPUTE_DTYPES:
        raise ConfigError(f"nf4 compute_dtype={compute_dtype!r}: must be one of {', '.join(COMPUTE_DTYPES)}")
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=double_quant,
        bnb_4bit_compute_dtype=getattr(torch, compute_dtype),
    )


def default_device() -> torch.device:
    """This rank's GPU (distributed.init has set it current), else the CPU."""
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def load_nf4_reference(
    model_config: ModelConfig,
    double_quant: bool = True,
    compute_dtype: str = "float32",
    device: torch.device | str | None = None,
) -> nn.Module:
    """`model_config`'s model with its decoder Linear layers in NF4, whole on `device`, frozen, in eval mode.

    Works with or without a live ZeRO-3 integration (see the module docstring). Unquantized modules are stored in
    `model_config.dtype`; the 4-bit matmuls dequantize to `compute_dtype`.
    """
    from transformers import AutoModelForCausalLM

    quantization = nf4_quantization_config(double_quant, compute_dtype)
    device = torch.device(device) if device is not None else default_device()
    with zero3_integration_paused():
        try:
            model = AutoModelForCausalLM.from_pretrained(
                model_config.path,
                quantization_config=quantization,
                dtype=getattr(torch, model_config.dtype),
                device_map={"": device},
                use_safetensors=True,
                trust_remote_code=model_config.trust_remote_code,
            )
        except OSError as error:
            raise ConfigError(
                f"model.path={model_config.path}: cannot load a causal LM with safetensors weights ({error})"
            ) from None
    model.requires_grad_(False)
    if device.type == "cpu":
        _use_portable_cpu_kernel(model)
    return model.eval()


def _use_portable_cpu_kernel(model: nn.Module) -> None:
    """Keep CPU inference on bitsandbytes' dequantize-and-matmul path.

    On CPUs with AVX512-BF16, bitsandbytes 0.50 repacks a `Linear4bit`'s weight at its first eval-mode, no-grad
    forward and asserts out_features % 32 == 0 there (stories260K's MLP has 172 outputs: AssertionError "N must be
    divisible by block_n"). That path also depends on the CPU model, so two CPU ranks on different machines could
    disagree. The portable path takes any shape. GPUs are unaffected.
    """
    from bitsandbytes.nn import Linear4bit

    for module in model.modules():
        if isinstance(module, Linear4bit):
            module.support_avx512bf16_for_cpu = False


def head_is_quantized(model: nn.Module) -> bool:
    """True when the LM head is a bitsandbytes 4-bit layer (only if asked for, e.g. via llm_int8_skip_modules)."""
    from bitsandbytes.nn import Linear4bit

    return isinstance(model.get_output_embeddings(), Linear4bit)


class NF4Reference:
    """Reference log-probs from a frozen NF4 model held whole on this rank.

    The streaming head reads `lm_head.weight` as a dense matrix. A 4-bit head is a `Linear4bit`, which subclasses
    `nn.Linear`, so it would pass the streaming check while its weight is packed uint8: for such a head this source
    falls back to the full-logits path (`streaming=False`), which calls the module and dequantizes properly. Costs
    rows x seq x vocab x 4 bytes of logits per forward, as the plain path does.
    """

    def __init__(self, model: nn.Module, logps_config: LogpsConfig, sequence: RowSlice | None = None):
        """`sequence`: this rank's slice of a sequence-parallel group (PairLogpsModel)."""
        if logps_config.streaming and head_is_quantized(model):
            logps_config = dataclasses.replace(logps_config, streaming=False)
        self.logps_config = logps_config
        self.module = PairLogpsModel(model, logps_config, sequence=sequence).eval()

    @torch.no_grad()
    def logps(self, batch: PairBatch) -> PairLogps:
        return self.module(batch)


@dataclass(frozen=True)
class NF4Memory:
    quantized_params: int
    """Weights stored in 4 bits (the decoder Linear layers)."""
    quantized_bytes: int
    """Their packed 4-bit storage plus block scales, double-quantization scales and NF4 tables."""
    other_params: int
    """Weights left in model.dtype: embeddings, LM head (when untied), norms, biases."""
    other_bytes: int

    @property
    def bytes_per_quantized_param(self) -> float:
        return self.quantized_bytes / max(self.quantized_params, 1)

    @property
    def total_bytes(self) -> int:
        return self.quantized_bytes + self.other_bytes


def nf4_memory(model: nn.Module) -> NF4Memory:
    """What a loaded NF4 model holds, counted from its tensors (each shared tensor once)."""
    from bitsandbytes.nn import Params4bit

    seen: set[int] = set()

    def nbytes(tensor: torch.Tensor | None) -> int:
        if tensor is None or tensor.data_ptr() in seen:
            return 0
        seen.add(tensor.data_ptr())
        return tensor.numel() * tensor.element_size()

    quantized_params = quantized_bytes = other_params = other_bytes = 0
    for parameter in model.parameters():  # tied weights are yielded once
        if isinstance(parameter, Params4bit):
            state = parameter.quant_state
            quantized_params += state.shape.numel()
            quantized_bytes += nbytes(parameter.data) + nbytes(state.absmax) + nbytes(state.code)
            if state.nested:
                quantized_bytes += nbytes(state.offset) + nbytes(state.state2.absmax) + nbytes(state.state2.code)
        else:
            other_params += parameter.numel()
            other_bytes += nbytes(parameter)
    return NF4Memory(quantized_params, quantized_bytes, other_params, other_bytes)

"""A causal LM as a function from a `PairBatch` to per-pair log-prob sums.

`PairLogpsModel.forward` runs the backbone and the LM head inside one module forward, which is where ZeRO-3 can
gather the head's weight for the streaming stage (training registers it as an external parameter of this module).
"""

from __future__ import annotations

import torch
from torch import nn

from dpo_scale.config import LogpsConfig
from dpo_scale.layout import PairBatch
from dpo_scale.logps import LMHead, full_logits_token_logps, streaming_token_logps
from dpo_scale.loss import PairLogps

# Config attributes that change logits in ways the streaming head does not reproduce.
_UNSUPPORTED_LOGIT_TRANSFORMS = ("dim_model_base",)


def lm_head_of(model: nn.Module) -> LMHead:
    """The LM head of a transformers causal LM with the logit transforms its config declares.

    Supported: a Linear head (tied or not, with or without bias), `logit_scale` (Cohere), `logits_scaling`
    (Granite), `output_multiplier` and `final_logit_softcapping` (Gemma 2/3). Anything else is refused with a
    message rather than scored wrongly.
    """
    head = model.get_output_embeddings()
    config = model.config.get_text_config()
    if not isinstance(head, nn.Linear):
        raise ValueError(
            f"{type(model).__name__}: its LM head is a {type(head).__name__}, not a Linear layer, so streaming "
            "log-probs cannot reproduce it; set logps.streaming=false"
        )
    for name in _UNSUPPORTED_LOGIT_TRANSFORMS:
        if getattr(config, name, None) is not None:
            raise ValueError(
                f"{type(model).__name__}: config.{name} rescales the logits in a way streaming log-probs do not "
                "reproduce; set logps.streaming=false"
            )
    scale = 1.0
    if getattr(config, "logit_scale", None) is not None:
        scale *= config.logit_scale
    if getattr(config, "logits_scaling", None) is not None:
        scale /= config.logits_scaling
    if getattr(config, "output_multiplier", None) is not None:
        scale *= config.output_multiplier
    return LMHead(head.weight, head.bias, scale, getattr(config, "final_logit_softcapping", None))


class PairLogpsModel(nn.Module):
    def __init__(self, model: nn.Module, config: LogpsConfig):
        super().__init__()
        self.model = model
        self.config = config
        if config.streaming:
            lm_head_of(model)  # refuse unsupported heads when the run is built, not at the first step

    def forward(self, batch: PairBatch) -> PairLogps:
        if self.config.streaming:
            backbone = getattr(self.model, self.model.base_model_prefix)
            hidden = backbone(
                input_ids=batch.input_ids,
                attention_mask=batch.attention_mask,
                position_ids=batch.position_ids,
                use_cache=False,
            ).last_hidden_state  # (R, T, H)
            scored = hidden[batch.score_rows, batch.score_cols]  # (N, H): completion positions only
            token_logps = streaming_token_logps(
                scored, lm_head_of(self.model), batch.score_labels, self.config.chunk_size
            )
        else:
            logits = self.model(
                input_ids=batch.input_ids,
                attention_mask=batch.attention_mask,
                position_ids=batch.position_ids,
                use_cache=False,
            ).logits  # (R, T, V): the tensor streaming avoids
            token_logps = full_logits_token_logps(logits[batch.score_rows, batch.score_cols], batch.score_labels)
        return sum_by_slot(token_logps, batch)


def sum_by_slot(token_logps: torch.Tensor, batch: PairBatch) -> PairLogps:
    """(N,) token log-probs -> per-pair chosen / rejected sums and scored-token counts."""
    slots = 2 * batch.num_pairs
    sums = torch.zeros(slots, dtype=torch.float32, device=token_logps.device).index_add(
        0, batch.score_slots, token_logps
    )
    counts = torch.zeros(slots, dtype=torch.float32, device=token_logps.device).index_add(
        0, batch.score_slots, torch.ones_like(token_logps)
    )
    b = batch.num_pairs
    return PairLogps(
        chosen_logps=sums[:b], rejected_logps=sums[b:], chosen_tokens=counts[:b], rejected_tokens=counts[b:]
    )

"""Per-pair chosen/rejected log-prob sums equal TRL 1.16's DPOTrainer for the same model and data.

TRL runs in fp32 (`bf16=False`): its DPOConfig defaults to bf16, which on CPU puts the forward under bf16 autocast
and moves summed log-probs by up to ~1 nat over a few hundred tokens. Our side uses the fast path (prefix sharing,
packing, streaming head), so the test checks tokenization, layout and head together against TRL's
`compute_ref_log_probs` (the log-prob path of its evaluation and reference computation).
"""

from __future__ import annotations

import json
import logging

import pytest
import torch
from transformers import AutoModelForCausalLM

from dpo_scale.config import DataConfig, LogpsConfig
from dpo_scale.data import load_tokenizer, prepare, read_examples
from dpo_scale.model.layout import collate
from dpo_scale.model.wrapper import PairLogpsModel
from tiny import shared_path, stories260k, tiny_llama

# TRL 1.16 reads and sets transformers' deprecated gradient-checkpointing names; the warnings are about TRL's code
pytestmark = [
    pytest.mark.filterwarnings("ignore:`gradient_checkpointing` is deprecated:FutureWarning"),
    pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning"),
]

trl = pytest.importorskip("trl", reason="TRL is the comparison here (pip install -e .[test])")


def _trl_logps(model, tokenizer, rows, tmp_path, max_length=None):
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    logging.getLogger("trl").setLevel(logging.ERROR)
    args = DPOConfig(
        output_dir=str(tmp_path / "trl"),
        bf16=False,
        use_cpu=True,
        report_to=[],
        per_device_eval_batch_size=4,
        max_length=max_length,
    )
    trainer = DPOTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer)
    chosen, rejected = [], []
    collator = trainer.data_collator
    examples = list(trainer.train_dataset)
    for start in range(0, len(examples), 4):
        batch = collator(examples[start : start + 4])
        batch = {k: v for k, v in batch.items() if isinstance(v, torch.Tensor)}
        c, r = trainer.compute_ref_log_probs(trainer.model, batch)
        chosen.append(c)
        rejected.append(r)
    return torch.cat(chosen), torch.cat(rejected), examples


def _our_logps(model, tokenizer, data_config):
    data = prepare(data_config, tokenizer)
    config = LogpsConfig(prefix_sharing=True, packing=True, streaming=True, chunk_size=64)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    with torch.no_grad():
        out = PairLogpsModel(model, config)(collate(data.pairs, config, pad))
    return out, data


def _explicit_rows(data_config, count):
    """Our normalised examples (prompt split already done) so that TRL sees the same prompt."""
    rows = []
    for example in read_examples(data_config):
        rows.append(example.as_dict())
        if len(rows) == count:
            break
    return rows


@pytest.mark.slow
def test_plain_text_matches_trl(tmp_path):
    """stories260K on 12 HH-RLHF dialogues, truncated to 256 tokens keep_start (identical to TRL's keep_start).
    Sums reach ~1,000 nats, where one fp32 ulp is 6e-5, and reordering across layouts costs a few ulps: seen
    2.4e-4 (2.5e-7 relative). rtol=1e-6 with atol=1e-4: a wrong token would move a sum by whole nats."""
    hh = shared_path("preferences", "hh-rlhf", "helpful-base", "test.jsonl.gz")
    model_dir = str(shared_path("models", "stories260K"))
    rows = _explicit_rows(DataConfig(str(hh)), 12)
    data_file = tmp_path / "rows.jsonl"
    data_file.write_text("".join(json.dumps(r) + "\n" for r in rows))

    tokenizer = load_tokenizer(model_dir)
    ours, data = _our_logps(stories260k(), tokenizer, DataConfig(str(data_file), max_length=256))
    theirs_chosen, theirs_rejected, examples = _trl_logps(stories260k(), tokenizer, rows, tmp_path, max_length=256)

    # both drop the dialogues whose prompt alone fills 256 tokens (TRL silently, we with a count)
    assert len(data.pairs) == len(examples) >= 6
    assert data.drop_counts() == ({"empty_completion": 12 - len(examples)} if len(examples) < 12 else {})
    for pair, example in zip(data.pairs, examples):
        assert pair.prompt_ids == example["prompt_ids"]
    torch.testing.assert_close(ours.chosen_logps, theirs_chosen.float(), rtol=1e-6, atol=1e-4)
    torch.testing.assert_close(ours.rejected_logps, theirs_rejected.float(), rtol=1e-6, atol=1e-4)


@pytest.mark.slow
def test_conversational_matches_trl(tmp_path):
    """Phi-3's chat template on 8 LLaMA-Factory ShareGPT rows, converted to messages, scored by a random tiny
    Llama with Phi-3's vocabulary (32,011 tokens). Random weights spread probability thinly (~10 nats per token,
    sums of thousands of nats), so fp32 reordering reaches a few ulps there: rtol=1e-6, atol=1e-3 still catches
    one wrong token (~10 nats)."""
    demo = shared_path("preferences", "llama-factory", "dpo_en_demo.json")
    tokenizer_dir = str(shared_path("tokenizers", "phi-3-mini"))
    rows = _explicit_rows(DataConfig(str(demo)), 8)
    assert isinstance(rows[0]["prompt"], list)
    data_file = tmp_path / "rows.jsonl"
    data_file.write_text("".join(json.dumps(r) + "\n" for r in rows))

    tokenizer = load_tokenizer(tokenizer_dir)
    # saved and reloaded: TRL builds its reference copy from the model's path
    tiny_llama(vocab_size=len(tokenizer), seed=1).save_pretrained(tmp_path / "model")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "model").eval()
    ours, data = _our_logps(model, tokenizer, DataConfig(str(data_file), max_length=384))
    theirs_chosen, theirs_rejected, examples = _trl_logps(model, tokenizer, rows, tmp_path, max_length=384)

    # (TRL's stored completions are untruncated: its collator truncates, so compare prompts and log-probs)
    assert [p.prompt_ids for p in data.pairs] == [e["prompt_ids"] for e in examples]
    torch.testing.assert_close(ours.chosen_logps, theirs_chosen.float(), rtol=1e-6, atol=1e-3)
    torch.testing.assert_close(ours.rejected_logps, theirs_rejected.float(), rtol=1e-6, atol=1e-3)

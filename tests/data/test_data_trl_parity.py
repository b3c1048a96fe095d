"""Our token ids equal TRL 1.16's, given TRL the same explicit prompt / chosen / rejected examples.

TRL's `DPOTrainer._prepare_dataset` reads only `self._tokenizer` and three fields of its `args`, so it is called on a
trainer made with `__new__`: no model, no accelerator set-up. Its truncation lives in its collator
(`DataCollatorForPreference`), which is compared with ours for keep_start.
"""

import itertools

import pytest

from dpo_scale.config import DataConfig
from dpo_scale.data import read_examples
from dpo_scale.data.tokenize import tokenize_examples
from dpo_scale.data.truncation import missing_signal, truncate

trl = pytest.importorskip("trl", reason="TRL is the comparison, installed with the `test` extra")
datasets = pytest.importorskip("datasets")

ROWS = 20
# DPOConfig's own defaults trip transformers' deprecation of `gradient_checkpointing`: nothing we can act on.
pytestmark = pytest.mark.filterwarnings("ignore:`gradient_checkpointing` is deprecated:FutureWarning")


def trl_prepare(examples, tokenizer, tmp_path, max_length=None):
    """Rows of TRL's tokenized dataset, in order; keep_start with max_length filters fully truncated pairs."""
    args = trl.DPOConfig(output_dir=str(tmp_path), report_to=[], use_cpu=True, bf16=False, max_length=max_length)
    trainer = trl.DPOTrainer.__new__(trl.DPOTrainer)
    trainer._tokenizer = tokenizer
    dataset = datasets.Dataset.from_list([{"id": e.index, **e.as_dict()} for e in examples])
    return list(trainer._prepare_dataset(dataset, tokenizer, args, "train"))


def spread(examples, n=ROWS):
    """n examples from across the file rather than its first rows."""
    examples = list(examples)
    return examples[:: max(len(examples) // n, 1)][:n]


def assert_same_ids(ours, theirs):
    assert len(ours) == len(theirs)
    for pair, row in zip(ours, theirs):
        assert pair.index == row["id"]
        assert pair.prompt_ids == row["prompt_ids"], pair.source
        assert pair.chosen_ids == row["chosen_ids"], pair.source
        assert pair.rejected_ids == row["rejected_ids"], pair.source


@pytest.mark.slow
def test_plain_text_hh_rlhf_with_stories260k(shared_data, stories_tokenizer, tmp_path):
    path = shared_data / "preferences" / "hh-rlhf" / "helpful-base" / "test.jsonl.gz"
    examples = spread(read_examples(DataConfig(path=str(path))))
    assert_same_ids(tokenize_examples(examples, stories_tokenizer), trl_prepare(examples, stories_tokenizer, tmp_path))


@pytest.mark.slow
def test_conversational_dpo_en_demo_with_phi3(shared_data, phi3_tokenizer, tmp_path):
    path = shared_data / "preferences" / "llama-factory" / "dpo_en_demo.json"
    examples = spread(read_examples(DataConfig(path=str(path))))
    assert any(len(e.prompt) > 1 for e in examples), "the sample should hold multi-turn and system prompts"
    assert_same_ids(tokenize_examples(examples, phi3_tokenizer), trl_prepare(examples, phi3_tokenizer, tmp_path))


def test_keep_start_truncation_matches_trls_collator(shared_data, stories_tokenizer, tmp_path):
    """Same kept pairs as TRL's filter (prompt shorter than max_length), same sequences as its collator's cut."""
    max_length = 96
    path = shared_data / "preferences" / "hh-rlhf" / "helpful-base" / "test.jsonl.gz"
    examples = list(itertools.islice(read_examples(DataConfig(path=str(path))), 60))
    ours = [truncate(p, max_length, "keep_start") for p in tokenize_examples(examples, stories_tokenizer)]
    kept = [p for p in ours if missing_signal(p) != "empty_completion"]
    theirs = trl_prepare(examples, stories_tokenizer, tmp_path, max_length=max_length)
    assert [p.index for p in kept] == [row["id"] for row in theirs]
    assert 0 < len(kept) < len(ours)

    collator = trl.trainer.dpo_trainer.DataCollatorForPreference(pad_token_id=0, max_length=max_length)
    batch = collator([{k: row[k] for k in ("prompt_ids", "chosen_ids", "rejected_ids")} for row in theirs])
    n = len(theirs)
    for i, pair in enumerate(kept):
        for row, completion in ((i, pair.chosen_ids), (n + i, pair.rejected_ids)):
            length = int(batch["attention_mask"][row].sum())
            assert batch["input_ids"][row, :length].tolist() == pair.prompt_ids + completion
            assert int(batch["completion_mask"][row].sum()) == len(completion)

def test_trl_extract_prompt_would_move_shared_answer_words_into_the_prompt():
    """Why implicit prompts are split at the last shared `\\n\\nAssistant:` (see formats.split_transcripts)."""
    from trl.data_utils import extract_prompt

    from dpo_scale.data import split_transcripts

    chosen = "\n\nHuman: Is it late?\n\nAssistant: I think yes."
    rejected = "\n\nHuman: Is it late?\n\nAssistant: I think no."
    assert extract_prompt({"chosen": chosen, "rejected": rejected})["prompt"].endswith("Assistant: I think")
    assert split_transcripts(chosen, rejected)[0].endswith("Assistant:")

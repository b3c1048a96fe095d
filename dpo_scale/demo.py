"""The embedded default: a tiny Llama, a word-level tokenizer and a preference dataset, all generated here.

Nothing is downloaded. The task is learnable on purpose: the prompt names an animal, the chosen answer is the sound
it makes, the rejected answer another animal's sound.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from dpo_scale.io import atomic_open

ANIMALS = {"cow": "moo", "dog": "woof", "cat": "meow", "duck": "quack", "sheep": "baa", "owl": "hoot", "frog": "croak"}
ADJECTIVES = ["big", "small", "old", "young", "happy", "sleepy", "brown", "white"]
PLACES = ["farm", "barn", "pond", "field", "house", "forest"]
SPECIAL = ["<pad>", "<s>", "</s>", "<unk>"]
WORDS = ["the", "in", "says", "and", "then", "loudly", "softly", *ANIMALS, *ANIMALS.values(), *ADJECTIVES, *PLACES]


def write_tokenizer(directory: Path):
    """A word-level fast tokenizer that `AutoTokenizer.from_pretrained(directory)` loads; BOS is prepended."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(SPECIAL + WORDS)}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    core.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    core.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", vocab["<s>"])])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )
    tokenizer.save_pretrained(directory)
    return tokenizer


def write_model(directory: Path, vocab_size: int, seed: int = 0) -> None:
    """A randomly initialised 2-layer Llama saved as safetensors (about 120k parameters)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    LlamaForCausalLM(config).save_pretrained(directory)


def preference_rows(count: int, seed: int = 0) -> list[dict[str, str]]:
    rng = random.Random(seed)
    rows = []
    for _ in range(count):
        animal, sound = rng.choice(list(ANIMALS.items()))
        wrong = rng.choice([s for s in ANIMALS.values() if s != sound])
        manner = rng.choice(["loudly", "softly"])
        prompt = f"in the {rng.choice(PLACES)} the {rng.choice(ADJECTIVES)} {animal} says"
        rows.append({"prompt": prompt, "chosen": f" {sound} {manner}", "rejected": f" {wrong} {manner}"})
    return rows


def write_demo_material(directory: str | Path, rows: int = 256) -> tuple[Path, Path]:
    """Create `directory/model` (weights + tokenizer) and `directory/preferences.jsonl`; return both paths."""
    directory = Path(directory)
    model_dir = directory / "model"
    tokenizer = write_tokenizer(model_dir)
    write_model(model_dir, vocab_size=len(tokenizer))
    data_path = directory / "preferences.jsonl"
    with atomic_open(data_path) as handle:
        for row in preference_rows(rows):
            handle.write(json.dumps(row) + "\n")
    return model_dir, data_path


def run_demo(out: str | Path) -> None:
    """Generate the material, then score it on the plain path and on the fast path, and show they agree."""
    from dpo_scale.config import DataConfig, LogpsConfig, LogpsRunConfig, ModelConfig
    from dpo_scale.logps_job import run_logps

    out = Path(out)
    model_dir, data_path = write_demo_material(out)
    print(f"generated {model_dir} and {data_path}")
    paths = {}
    for name, logps in {
        "plain": LogpsConfig(prefix_sharing=False, packing=False, streaming=False),
        "prefix_shared_packed_streaming": LogpsConfig(prefix_sharing=True, packing=True, streaming=True),
    }.items():
        paths[name] = out / f"logps_{name}.jsonl"
        config = LogpsRunConfig(
            model=ModelConfig(str(model_dir)), data=DataConfig(str(data_path)), out=str(paths[name]), logps=logps
        )
        counts = run_logps(config)
        print(
            f"{name}: {counts['tokens']} tokens computed for {counts['unique_tokens']} unique "
            f"({counts['tokens'] / counts['unique_tokens']:.2f}x) -> {paths[name]}"
        )
    plain, fast = ([json.loads(line) for line in p.read_text().splitlines()] for p in paths.values())
    worst = max(
        abs(a[key] - b[key]) for a, b in zip(plain, fast) for key in ("chosen_logps", "rejected_logps")
    )
    print(f"largest difference between the two paths over {len(plain)} pairs: {worst:.2e} nats")

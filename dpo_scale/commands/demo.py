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


def write_tokenizer(directory: Path, words: list[str] = WORDS):
    """A word-level fast tokenizer over SPECIAL + `words` (one token per word) that
    `AutoTokenizer.from_pretrained(directory)` loads; BOS is prepended."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(SPECIAL + words)}
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


DEMO_TRAINING = {
    "optim": {"lr": 0.003, "warmup_steps": 4},
    "micro_batch_size": 8,
    "epochs": 4,
    "logging": {"every": 2},
    "eval": {"every": 10, "fraction": 0.125},
    "checkpoint": {"every": 0},
}


def run_demo(out: str | Path, ranks: int = 2) -> None:
    """Generate the material, train on it with ZeRO-3 on `ranks` CPU processes through the deepspeed launcher, and
    plot the DPO story: the loss starts at ln 2 and falls while accuracy and margin rise."""
    import shutil
    import subprocess
    import sys

    import yaml

    from dpo_scale.distributed import free_port
    from dpo_scale.training.plot import plot_training
    from dpo_scale.training.tracking import read_metrics

    out = Path(out).resolve()
    model_dir, data_path = write_demo_material(out)
    run_dir = out / "run"
    config_path = out / "run.yaml"
    tree = {"model": {"path": str(model_dir)}, "data": {"path": str(data_path)}, "run_dir": str(run_dir)}
    with atomic_open(config_path) as handle:
        yaml.safe_dump({**tree, **DEMO_TRAINING}, handle, sort_keys=False)
    print(f"generated {model_dir}, {data_path} and {config_path}", flush=True)

    bin_dir = Path(sys.executable).parent
    launcher = shutil.which("deepspeed") or str(bin_dir / "deepspeed")
    command = [
        launcher, "--num_gpus", str(ranks), "--master_port", str(free_port()),
        shutil.which("dpo-scale") or str(bin_dir / "dpo-scale"), "train", "--config", str(config_path),
        "checkpoint.resume=never",
    ]  # fmt: skip
    print("$ " + " ".join(command), flush=True)
    subprocess.run(command, check=True)

    rows = [r for r in read_metrics(run_dir / "metrics.jsonl") if r["split"] == "train"]
    png = plot_training(run_dir / "metrics.jsonl", run_dir / "training.png")
    first, last = rows[0], rows[-1]
    print(
        f"loss {first['loss']:.4f} (ln 2 = 0.6931) -> {last['loss']:.4f}; "
        f"accuracy {first['rewards/accuracies']:.2f} -> {last['rewards/accuracies']:.2f}; "
        f"margin {first['rewards/margins']:.4f} -> {last['rewards/margins']:.4f}\nplot: {png}"
    )

"""Fixtures shared by the test files. Data-preparation fixtures are named for what they give (`shared_data`,
`phi3_tokenizer`, ...); the tokenizers are built or loaded locally, nothing is downloaded.

Markers (pyproject.toml): `slow` marks every test that launches processes or trains end to end (multi-rank runs,
SLURM, TRL's trainer, the examples, bench dry runs) or uses a module fixture that does; it took 1 s or more in a
full run. `python -m pytest -q -m "not slow" tests` is the edit-test loop (904 tests in about 30 s on the
2-core machine, every module's unit tests); `python -m pytest -q tests` (the README's command, CI's) runs all."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests build or read everything locally; never wait on a hub
if "DPO_SCALE_CACHE" not in os.environ:  # token stores of this session (train subprocesses too), not the user's cache
    os.environ["DPO_SCALE_CACHE"] = tempfile.mkdtemp(prefix="dpo_scale-test-cache-")
    atexit.register(shutil.rmtree, os.environ["DPO_SCALE_CACHE"], True)
# Many tests launch 2 CPU ranks on a 2-core machine, and each rank's torch would start one OpenMP thread per core:
# oversubscribed, they spin against each other (a 2-rank, 20-step demo run: 18.2 s with the default, 15.0 s with
# a core's share each; one process: 7.6 s vs 7.9 s). torchrun makes the same choice for its ranks.
os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 2) // 2)))

import pytest

from tiny import shared_path  # after the line above: transformers reads HF_HUB_OFFLINE when first imported


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data beside the repository, or skip: a fresh clone of the project has no such folder."""
    return shared_path()


def make_byte_tokenizer(chat_template: str | None = None):
    """One token per UTF-8 byte plus `</s>` (id 0) as eos, so token counts in tests can be read off the text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {"</s>": 0, **{char: i + 1 for i, char in enumerate(alphabet)}}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="</s>")
    tokenizer.chat_template = chat_template
    return tokenizer


@pytest.fixture(scope="session")
def byte_tokenizer():
    return make_byte_tokenizer()


@pytest.fixture(scope="session")
def byte_tokenizer_with_template():
    """`make_byte_tokenizer` as a fixture: call it with a chat template."""
    return make_byte_tokenizer


@pytest.fixture(scope="session")
def phi3_tokenizer(shared_data):
    """Phi-3-mini's tokenizer with its chat template (`<|user|>\\n...<|end|>\\n<|assistant|>\\n`)."""
    from dpo_scale.data import load_tokenizer

    return load_tokenizer(str(shared_data / "tokenizers" / "phi-3-mini"))


@pytest.fixture(scope="session")
def stories_tokenizer(shared_data):
    """stories260K's tokenizer: adds BOS, eos `</s>`, no chat template."""
    from dpo_scale.data import load_tokenizer

    return load_tokenizer(str(shared_data / "models" / "stories260K"))

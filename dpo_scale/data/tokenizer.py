"""Load the tokenizer that prepares the data, turning every way it can fail to load into one DataError."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from dpo_scale.config import DataConfig
from dpo_scale.data.errors import DataError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


def load_tokenizer(path: str, setting: str | None = None) -> PreTrainedTokenizerBase:
    """A tokenizer directory (read with AutoTokenizer, no remote code), a tokenizer.json file, or a hub id. `setting`
    names the config key `path` came from, for the messages."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    from dpo_scale.hub import not_on_hub

    local = Path(path)
    name = f"{setting}={path}" if setting else f"tokenizer {path}"
    why = None if local.exists() else not_on_hub(path)
    if why is not None:
        raise DataError(f"{name}: no such file or directory ({why}). Fix: {_missing_fix(setting)}")
    try:
        if local.is_file():
            return PreTrainedTokenizerFast(tokenizer_file=str(local))
        return AutoTokenizer.from_pretrained(str(local), trust_remote_code=False, local_files_only=local.exists())
    except Exception as error:  # tokenizers and transformers raise many unrelated types for a bad file
        raise DataError(
            f"{name}: does not load ({_reason(local, error)}). "
            "Fix: replace it with an intact copy of the model's tokenizer files, or point data.tokenizer elsewhere"
        ) from None


def run_tokenizer(data: DataConfig, model_path: str) -> PreTrainedTokenizerBase:
    """The tokenizer a run prepares its data with: data.tokenizer when set, else the model's (model.path)."""
    if data.tokenizer:
        return load_tokenizer(data.tokenizer, "data.tokenizer")
    return load_tokenizer(model_path, "model.path")


def _missing_fix(setting: str | None) -> str:
    if setting == "model.path":
        return ("point model.path at a model directory (config.json, *.safetensors and its tokenizer files) or a hub "
                "id; set data.tokenizer to read the tokenizer from elsewhere")  # fmt: skip
    return "give a tokenizer directory (tokenizer.json + tokenizer_config.json) or a tokenizer.json file"


def _reason(local: Path, error: Exception) -> str:
    """The clearest account of the failure: the tokenizers library names the bad line of a tokenizer.json,
    where transformers (loading a directory) reports only the Python type it failed to build."""
    tokenizer_json = local / "tokenizer.json" if local.is_dir() else local
    if tokenizer_json.is_file():
        from tokenizers import Tokenizer

        try:
            Tokenizer.from_file(str(tokenizer_json))
        except Exception as json_error:
            return f"{tokenizer_json.name}: {json_error}"
    return f"{type(error).__name__}: {error}"


def padding_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """The id that fills padding positions: never attended to nor scored, so any id works; pad, else eos, else 0."""
    if tokenizer.pad_token_id is not None:
        return tokenizer.pad_token_id
    return tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0

"""load_tokenizer reads a tokenizer directory or a bare tokenizer.json, offline (failures: test_data_errors.py)."""

from dpo_scale.data import load_tokenizer


def test_directory(shared_data):
    tokenizer = load_tokenizer(str(shared_data / "models" / "stories260K"))
    assert tokenizer.is_fast
    assert (tokenizer.bos_token, tokenizer.eos_token) == ("<s>", "</s>")
    assert tokenizer("Once")["input_ids"][0] == tokenizer.bos_token_id


def test_directory_with_a_chat_template(shared_data):
    tokenizer = load_tokenizer(str(shared_data / "tokenizers" / "phi-3-mini"))
    assert tokenizer.chat_template and tokenizer.eos_token == "<|endoftext|>"


def test_tokenizer_json_file(shared_data):
    tokenizer = load_tokenizer(str(shared_data / "tokenizers" / "gpt2" / "tokenizer.json"))
    assert tokenizer.is_fast and len(tokenizer) == 50257
    assert tokenizer.eos_token is None  # a bare tokenizer.json names no special-token roles

"""The typed config: YAML plus dotted overrides, validated on creation with messages that name the key."""

import pytest

from dpo_scale.config import (
    ConfigError,
    DataConfig,
    LogpsConfig,
    LogpsRunConfig,
    LossConfig,
    build,
    load_yaml,
    merge,
    parse_overrides,
)


def test_yaml_then_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("model: {path: m}\ndata: {path: d.jsonl, max_length: 128}\nout: o.jsonl\nlogps: {packing: false}\n")
    tree = merge(load_yaml(path), parse_overrides(["data.max_length=256", "logps.chunk_size=64", "data.columns={prompt: q}"]))
    config = build(LogpsRunConfig, tree)
    assert config.data.max_length == 256 and config.data.path == "d.jsonl"
    assert config.data.columns == {"prompt": "q"}
    assert config.logps == LogpsConfig(packing=False, chunk_size=64)
    assert config.batch_size == 8  # the dataclass default


def test_integer_accepted_for_float():
    assert build(LossConfig, {"beta": 1}).beta == 1.0


def test_exponent_without_dot_is_a_float():
    """YAML 1.1 (PyYAML) reads `1e-6` as a string; `optim.lr=1e-6` must still mean 1e-6."""
    assert build(LossConfig, parse_overrides(["beta=5e-2"])).beta == 0.05
    with pytest.raises(ConfigError, match="loss.beta='abc': expected a float"):
        build(LossConfig, {"beta": "abc"}, "loss.")


@pytest.mark.parametrize(
    "tree,message",
    [
        ({"data": {"path": "x"}, "out": "o"}, "model.path is required"),
        ({"model": {"path": "m"}, "data": {"path": "x"}, "out": "o", "logps": 3}, "logps must be a section"),
        ({"model": {"path": "m"}, "data": {"path": "x", "strict": "yes"}, "out": "o"}, "data.strict='yes': expected a bool"),
        ({"model": {"path": "m"}, "data": {"path": "x", "columns": {"answer": "a"}}, "out": "o"}, "data.columns: unknown key"),
        ({"model": {"path": "m"}, "data": {"path": "x"}, "out": "o", "logps": {"packing": False, "pack_length": 64}}, "logps.packing is false"),
    ],
)
def test_invalid_settings_name_their_key(tree, message):
    with pytest.raises(ConfigError, match=None) as error:
        build(LogpsRunConfig, tree)
    assert message in str(error.value)


def test_invalid_loss_combinations_raise():
    with pytest.raises(ConfigError, match="label_smoothing"):
        LossConfig(loss_type="hinge", label_smoothing=0.1)
    with pytest.raises(ConfigError, match="loss_type='dpo'"):
        LossConfig(loss_type="dpo")


def test_override_syntax_errors():
    with pytest.raises(ConfigError, match="expected key.sub=value"):
        parse_overrides(["data.max_length"])
    with pytest.raises(ConfigError, match="both as a value and as a section"):
        parse_overrides(["data=1", "data.path=x"])


def test_unreadable_or_non_mapping_yaml(tmp_path):
    with pytest.raises(ConfigError, match="cannot be read"):
        load_yaml(tmp_path / "missing.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="must be a mapping"):
        load_yaml(tmp_path / "list.yaml")


def test_data_config_max_length_floor():
    with pytest.raises(ConfigError, match="at least 2"):
        DataConfig(path="x", max_length=1)

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
    with pytest.raises(ConfigError, match="loss.beta='abc': expected a number, e.g. 0.1"):
        build(LossConfig, {"beta": "abc"}, "loss.")


@pytest.mark.parametrize(
    "tree,message",
    [
        ({"data": {"path": "x"}, "out": "o"}, "model.path is required"),
        ({"model": {"path": "m"}, "data": {"path": "x"}, "out": "o", "logps": 3}, "logps must be a section"),
        ({"model": {"path": "m"}, "data": {"path": "x", "strict": "yes"}, "out": "o"}, "data.strict='yes': expected true or false"),
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


def test_yaml_boolean_for_a_choice_names_the_values_that_work():
    """`checkpoint.resume=no` reaches the config as YAML's False: the message says so and names auto / never."""
    from dpo_scale.config import CheckpointConfig

    with pytest.raises(ConfigError) as error:
        build(CheckpointConfig, parse_overrides(["resume=no"]), "checkpoint.")
    assert str(error.value) == (
        "checkpoint.resume=False (YAML's boolean; no, off and false all read so): must be one of auto, never"
    )


def test_varlen_with_prefix_sharing_suggests_choices_that_run_on_any_device():
    """flex is refused off CUDA, so it is not the advice: auto picks units on CPU and flex on CUDA."""
    with pytest.raises(ConfigError) as error:
        LogpsConfig(attention="varlen")
    assert "logps.attention=auto (units on CPU, flex on CUDA)" in str(error.value)
    assert "use logps.attention=flex" not in str(error.value)


TRAINING = {
    "model": {"path": "m"}, "data": {"path": "train.jsonl", "max_length": 64}, "run_dir": "runs/a",
    "loss": {"beta": 0.3}, "logps": {"packing": False}, "reference": {"source": "nf4", "nf4": {"double_quant": False}},
    "optim": {"lr": 1e-6}, "checkpoint": {"every": 5}, "eval": {"every": 2}, "micro_batch_size": 2,
}  # fmt: skip


def test_scoring_commands_read_their_sections_of_a_training_config():
    from dpo_scale.config import DriftRunConfig, EvalRunConfig, sections_for

    tree, ignored = sections_for(LogpsRunConfig, TRAINING)
    config = build(LogpsRunConfig, {**tree, "out": "o.jsonl"})
    assert config.model.path == "m" and config.data.max_length == 64 and not config.logps.packing
    assert "run_dir" in ignored and "optim" in ignored

    tree, _ = sections_for(DriftRunConfig, TRAINING)
    drift = build(DriftRunConfig, {**tree, "out": "d.json"})
    assert drift.beta == 0.3 and drift.nf4.double_quant is False  # loss.beta and reference.nf4, as training uses them

    tree, ignored = sections_for(EvalRunConfig, TRAINING)
    evaluation = build(EvalRunConfig, {**tree, "policy": "runs/a", "out": "e.json"})
    assert evaluation.loss.beta == 0.3 and not evaluation.logps.packing
    assert evaluation.data is None and evaluation.reference is None  # the training data is not the held-out pairs
    assert {"data", "reference", "model"} <= set(ignored)


def test_a_key_no_command_knows_is_still_refused():
    from dpo_scale.config import sections_for

    tree, _ = sections_for(LogpsRunConfig, {**TRAINING, "otpim": {"lr": 1}})
    with pytest.raises(ConfigError, match="unknown key\\(s\\) otpim"):
        build(LogpsRunConfig, {**tree, "out": "o.jsonl"})


def test_a_command_config_file_is_read_whole():
    """An eval config of its own (no training keys) keeps its data section: those are its held-out pairs."""
    from dpo_scale.config import EvalRunConfig, sections_for

    own = {"policy": "runs/a", "out": "e.json", "data": {"path": "held.jsonl"}}
    assert sections_for(EvalRunConfig, own) == (own, [])


def test_run_dir_is_required_only_where_it_is_used():
    from dpo_scale.config import TrainConfig

    config = build(TrainConfig, {"model": {"path": "m"}, "data": {"path": "d"}})
    assert config.run_dir is None
    with pytest.raises(ConfigError, match="run_dir is required by dpo-scale train"):
        config.require_run_dir("train")

"""`dpo-scale logps` end to end on the generated demo model, and user mistakes as messages, not tracebacks."""

import json
import re
import subprocess
import sys

import pytest

from dpo_scale.cli import main
from dpo_scale.commands.demo import write_demo_material


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return write_demo_material(tmp_path_factory.mktemp("demo"), rows=12)


def _rows_with_problems(path, rows):
    """The demo rows plus one identical pair (row 3) that must be reported, not silently lost."""
    lines = path.read_text().splitlines()[:rows]
    identical = json.loads(lines[3])
    identical["rejected"] = identical["chosen"]
    lines[3] = json.dumps(identical)
    return "\n".join(lines) + "\n"


def test_logps_writes_every_row_in_input_order(demo, tmp_path, capsys):
    model_dir, data_path = demo
    data = tmp_path / "pairs.jsonl"
    data.write_text(_rows_with_problems(data_path, 10))
    out = tmp_path / "out" / "logps.jsonl"
    assert main(["logps", "--model", str(model_dir), "--data", str(data), "--out", str(out), "batch_size=3"]) == 0

    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["index"] for r in records] == list(range(10))
    assert records[3] == {"index": 3, "source": f"{data} line 4", "dropped": "identical_completions"}
    scored = [r for r in records if "dropped" not in r]
    assert all(r["chosen_logps"] < 0 and r["rejected_logps"] < 0 for r in scored)
    # " moo loudly" + EOS under the word-level tokenizer: 3 scored tokens each
    assert all(r["chosen_tokens"] == 3 and r["rejected_tokens"] == 3 for r in scored)
    printed = capsys.readouterr().out
    assert "1 dropped (identical_completions: 1)" in printed and "9 pairs" in printed


def test_logps_same_numbers_on_plain_and_fast_paths(demo, tmp_path):
    """The command's options reach the computation, and every path gives the same sums (fp32 rounding, 1e-4)."""
    model_dir, data_path = demo
    outputs = {}
    for name, options in {
        "plain": ["logps.prefix_sharing=false", "logps.streaming=false"],
        "fast": ["logps.packing=true", "logps.chunk_size=5"],
    }.items():
        outputs[name] = tmp_path / f"{name}.jsonl"
        args = ["logps", "--model", str(model_dir), "--data", str(data_path), "--out", str(outputs[name])]
        assert main(args + options) == 0
    plain, fast = ([json.loads(x) for x in p.read_text().splitlines()] for p in outputs.values())
    for a, b in zip(plain, fast, strict=True):
        assert a["chosen_logps"] == pytest.approx(b["chosen_logps"], abs=1e-4)
        assert a["rejected_logps"] == pytest.approx(b["rejected_logps"], abs=1e-4)


@pytest.mark.slow
def test_bad_data_is_a_message_and_writes_nothing(demo, tmp_path):
    model_dir, _ = demo
    data = tmp_path / "bad.jsonl"
    data.write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n{"prompt": "a", "chosen": 3, "rejected": "c"}\n')
    out = tmp_path / "out.jsonl"
    result = subprocess.run(
        [sys.executable, "-m", "dpo_scale.cli", "logps", "--model", str(model_dir), "--data", str(data),
         "--out", str(out)],
        capture_output=True, text=True,
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "bad.jsonl line 2" in result.stderr and "chosen" in result.stderr
    assert not out.exists() and list(tmp_path.glob(".out.jsonl*")) == []


@pytest.mark.parametrize(
    "override,message",
    [
        ("data.max_lenght=5", "unknown key(s) data.max_lenght"),
        ("logps.chunk_size=0", "logps.chunk_size=0"),
        ("data.truncation_mode=middle", "must be one of keep_start, keep_end"),
        ("batch_size=many", "batch_size='many': expected a whole number, e.g. 4"),
    ],
)
def test_bad_config_is_a_message(demo, tmp_path, capsys, override, message):
    model_dir, data_path = demo
    args = ["logps", "--model", str(model_dir), "--data", str(data_path), "--out", str(tmp_path / "o.jsonl")]
    assert main(args + [override]) == 2
    assert message in capsys.readouterr().err


def test_missing_required_setting_names_it(tmp_path, capsys):
    assert main(["logps", "--data", "x.jsonl", "--out", str(tmp_path / "o.jsonl")]) == 2
    assert "model.path is required" in capsys.readouterr().err


def test_model_that_does_not_load_is_a_message(demo, tmp_path, capsys):
    _, data_path = demo
    args = ["logps", "--model", str(tmp_path / "nowhere"), "--data", str(data_path), "--out", str(tmp_path / "o")]
    assert main(args + ["data.tokenizer=" + str(demo[0])]) == 2
    assert "model.path=" in capsys.readouterr().err


def test_config_prints_resolved_values_for_job_scripts(tmp_path, capsys):
    run = tmp_path / "run.yaml"
    run.write_text("model: {path: m}\ndata: {path: d}\nrun_dir: runs/base\n")
    assert main(["config", "--config", str(run), "run_dir=runs/point-1", "--get", "run_dir"]) == 0
    assert capsys.readouterr().out == "runs/point-1\n"
    assert main(["config", "--config", str(run), "--get", "reference.cache_dir"]) == 0
    assert capsys.readouterr().out == "\n"  # unset: empty, not "None"
    assert main(["config", "--config", str(run), "loss.beta=0.5", "--get", "loss"]) == 0
    assert "beta: 0.5" in capsys.readouterr().out
    assert main(["config", "--config", str(run), "--get", "loss.nope"]) == 2
    assert "--get loss.nope: no such key" in capsys.readouterr().err
    run.write_text("model: {path: m}\ndata: {path: d}\n")
    assert main(["config", "--config", str(run), "--get", "run_dir"]) == 2  # never an empty run_dir for a job script
    assert "run_dir is required by dpo-scale train" in capsys.readouterr().err


def test_every_command_stops_the_tqdm_monitor_before_it_runs(monkeypatch):
    """The command owns its process: no tqdm monitor thread will be alive at its exit (tracking.stop_tqdm_monitor),
    whatever bars the command's own work opens."""
    import dpo_scale.cli as cli

    calls = []
    monkeypatch.setattr(cli, "stop_tqdm_monitor", lambda: calls.append("tqdm"))
    monkeypatch.setattr(cli, "_config", lambda args: calls.append("command"))
    assert main(["config", "--get", "run_dir"]) == 0
    assert calls == ["tqdm", "command"]


def test_missing_model_directory_is_named_as_model_path(demo, tmp_path, capsys):
    """The tokenizer is read from model.path unless data.tokenizer is set: a missing model directory is reported as
    model.path, in one line."""
    missing = tmp_path / "no-model"
    args = ["prepare-data", f"model.path={missing}", f"data.path={demo[1]}", f"run_dir={tmp_path / 'run'}"]
    assert main(args) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith(f"dpo-scale prepare-data: error: model.path={missing}: no such file or directory")
    assert len(error.splitlines()) == 1


@pytest.mark.parametrize("command", ["logps", "eval"])
def test_flex_attention_off_cuda_is_refused_up_front(demo, tmp_path, capsys, command):
    """On a CPU, logps.attention=flex would fail after a minute in torch.compile's C++ build: refused in one line
    naming the choice that works, before any model is loaded, and nothing written."""
    model_dir, data_path = demo
    out = tmp_path / "out.json"
    if command == "logps":
        args = ["logps", "--model", str(model_dir), "--data", str(data_path), "--out", str(out)]
    else:
        args = ["eval", "--policy", str(model_dir), "--data", str(data_path), "--out", str(out), f"reference={model_dir}"]
    assert main([*args, "logps.attention=flex"]) == 2
    error = capsys.readouterr().err.strip()
    assert error == (f"dpo-scale {command}: error: logps.attention=flex runs on CUDA only, and this command computes "
                     "on cpu: use logps.attention=dense (the same log-probs) or auto")  # fmt: skip
    assert not out.exists()


def _dpo_scale(*args, **kwargs):
    return subprocess.run([sys.executable, "-m", "dpo_scale.cli", *map(str, args)], capture_output=True, text=True,
                          **kwargs)  # fmt: skip


@pytest.mark.slow
def test_overrides_anywhere_among_the_flags(demo, tmp_path):
    """As a user typed it: an override before --out and one after it (argparse alone refused the second)."""
    model_dir, data_path = demo
    out = tmp_path / "logps.jsonl"
    result = _dpo_scale("logps", "--model", model_dir, "--data", data_path, "data.max_length=64", "--out", out,
                        "data.filters.drop_duplicates=true")  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert len(out.read_text().splitlines()) == 12


def test_an_unknown_flag_is_still_refused(demo, tmp_path, capsys):
    model_dir, data_path = demo
    with pytest.raises(SystemExit) as stop:
        main(["logps", "--model", str(model_dir), "--data", str(data_path), "--bogus", "data.max_length=8"])
    assert stop.value.code == 2
    assert "unrecognized arguments: --bogus" in capsys.readouterr().err


def test_a_command_without_overrides_refuses_one(capsys):
    with pytest.raises(SystemExit):
        main(["plot", "runs/a", "--out", "a.png", "loss.beta=1"])
    assert "unrecognized arguments: loss.beta=1" in capsys.readouterr().err


def _training_config(tmp_path, model_dir, data_path) -> str:
    path = tmp_path / "run.yaml"
    path.write_text(
        f"model: {{path: {model_dir}}}\ndata: {{path: {data_path}, max_length: 64}}\nrun_dir: {tmp_path / 'run'}\n"
        "loss: {beta: 0.2}\noptim: {lr: 1.0e-6}\ncheckpoint: {every: 5}\neval: {every: 2}\nmicro_batch_size: 2\n"
    )
    return str(path)


def test_logps_reads_a_training_config(demo, tmp_path):
    """The model, data and logps sections of a training config; run_dir, optim, checkpoint, eval left alone."""
    model_dir, data_path = demo
    out = tmp_path / "logps.jsonl"
    assert main(["logps", "--config", _training_config(tmp_path, model_dir, data_path), "--out", str(out)]) == 0
    assert len(out.read_text().splitlines()) == 12


def test_eval_of_a_training_config_points_to_policy(demo, tmp_path, capsys):
    model_dir, data_path = demo
    config = _training_config(tmp_path, model_dir, data_path)
    assert main(["eval", "--config", config, "--out", str(tmp_path / "e.json")]) == 2
    error = capsys.readouterr().err.strip()
    assert error == (f"dpo-scale eval: error: --policy RUN_DIR is required: the run directory (or one of its "
                     f"checkpoints, or a model directory) to evaluate; this config's run is --policy {tmp_path / 'run'}")


def test_commands_that_write_elsewhere_need_no_run_dir(demo, tmp_path, capsys):
    """prepare-data, data-report and precompute-ref read a training config for its data and model: no run_dir; train
    and sweep refuse its absence by name."""
    model_dir, data_path = demo
    tree = [f"model.path={model_dir}", f"data.path={data_path}"]
    assert main(["prepare-data", *tree]) == 0
    assert "12 pairs kept" in capsys.readouterr().out.replace("12 rows: ", "")
    assert main(["data-report", *tree, "--out", str(tmp_path / "report")]) == 0
    assert (tmp_path / "report" / "report.json").exists()
    capsys.readouterr()
    for command in (["train"], ["sweep", "--grid", "loss.beta=0.1,0.2"]):
        assert main([*command[:1], *tree, *command[1:]]) == 2
        assert f"run_dir is required by dpo-scale {command[0]}" in capsys.readouterr().err


def test_output_paths_are_checked_before_the_work(demo, tmp_path, capsys, monkeypatch):
    """eval --out DIR failed with IsADirectoryError after the whole evaluation, data-report --out FILE with
    FileExistsError after the report: now one line each, before anything is loaded or built."""
    import dpo_scale.commands.eval

    model_dir, data_path = demo
    monkeypatch.setattr(dpo_scale.commands.eval, "run_eval", lambda config: pytest.fail("evaluated before the check"))
    taken = tmp_path / "taken"
    taken.mkdir()
    args = ["eval", "--policy", str(model_dir), "--data", str(data_path), f"reference={model_dir}", "--out", str(taken)]
    assert main(args) == 2
    assert capsys.readouterr().err.strip() == (f"dpo-scale eval: error: --out {taken}: is a directory; give a file "
                                               f"path, e.g. {taken / 'out.json'}")  # fmt: skip
    existing = tmp_path / "report.md"
    existing.write_text("mine")
    cache = tmp_path / "cache"
    monkeypatch.setenv("DPO_SCALE_CACHE", str(cache))
    assert main(["data-report", f"model.path={model_dir}", f"data.path={data_path}", "--out", str(existing)]) == 2
    assert "is a file, not a directory" in capsys.readouterr().err
    assert existing.read_text() == "mine" and not cache.exists()  # no token store was built for a report refused


@pytest.mark.slow
def test_ctrl_c_while_tokenizing_is_one_line_and_the_rerun_continues(shared_data, tmp_path):
    """Ctrl-C (SIGINT to the whole process group, as a terminal sends it) in prepare-data with worker processes:
    one line on stderr, exit 130 (it printed three tracebacks); the next run builds only the missing shards."""
    import os
    import signal
    import time

    config = tmp_path / "hh.yaml"
    config.write_text(
        f"model: {{path: {shared_data / 'models' / 'stories260K'}}}\n"
        f"data: {{path: {shared_data / 'preferences' / 'hh-rlhf' / 'helpful-base' / 'test.jsonl.gz'}, "
        "max_length: 256, truncation_mode: keep_end, shard_rows: 20, num_workers: 2}\n"
    )
    env = {**os.environ, "DPO_SCALE_CACHE": str(tmp_path / "cache")}
    command = [sys.executable, "-m", "dpo_scale.cli", "prepare-data", "--config", str(config)]
    # a terminal's foreground process takes SIGINT's default action, whatever this test runner inherited (a shell
    # running it in the background ignores SIGINT, and the child would inherit that and never be interrupted)
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                               start_new_session=True,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # fmt: skip
    assert "tokenizing" in process.stdout.readline()
    deadline = time.monotonic() + 60
    while not any((tmp_path / "cache").glob("*/shard-*.rows.npy")) and time.monotonic() < deadline:
        time.sleep(0.02)  # interrupted once the first of 118 shards is written: the workers are busy with others
    os.killpg(process.pid, signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130
    errors = [line for line in stderr.replace("\r", "\n").splitlines() if line and not line.startswith("tokenizing")]
    assert errors == ["dpo-scale prepare-data: interrupted; the token store's finished shards are kept: the same "
                      "command builds only the missing ones"]  # fmt: skip
    rerun = subprocess.run(command, capture_output=True, text=True, env=env)
    assert rerun.returncode == 0, rerun.stderr
    built = re.search(r"rank 0 built (\d+) of (\d+) shards", rerun.stdout)
    assert built and 0 < int(built.group(1)) < int(built.group(2)) == 118


def test_training_overrides_reach_the_commands_that_read_a_training_config(tmp_path):
    """`loss.beta=0.2` after a training config is ref-drift's beta, as the file's loss.beta is; an override the
    command does not read is kept for `build` to refuse (asked for, not ignored); eval's own data override is kept."""
    import argparse

    from dpo_scale.cli import _config_tree
    from dpo_scale.config import DriftRunConfig, EvalRunConfig

    config = tmp_path / "run.yaml"
    config.write_text("model: {path: m}\ndata: {path: d.jsonl}\nrun_dir: runs/a\nloss: {beta: 0.1}\n")
    args = argparse.Namespace(config=str(config), overrides=["loss.beta=0.2", "optim.lr=1e-6", "num_pairs=8"])
    drift = _config_tree(args, {}, DriftRunConfig)
    assert drift["beta"] == 0.2 and drift["num_pairs"] == 8 and "loss" not in drift
    assert drift["optim"] == {"lr": "1e-6"}  # build names it: unknown key(s) optim
    args = argparse.Namespace(config=str(config), overrides=["data.path=held.jsonl", "loss.beta=0.3"])
    evaluation = _config_tree(args, {}, EvalRunConfig)
    assert evaluation["data"] == {"path": "held.jsonl"} and evaluation["loss"] == {"beta": 0.3}

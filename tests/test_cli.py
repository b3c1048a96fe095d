"""`dpo-scale logps` end to end on the generated demo model, and user mistakes as messages, not tracebacks."""

import json
import subprocess
import sys

import pytest

from dpo_scale.cli import main
from dpo_scale.demo import write_demo_material


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
        ("batch_size=many", "batch_size='many': expected a int"),
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

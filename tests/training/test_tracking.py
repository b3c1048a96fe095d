"""Metrics sinks: metrics.jsonl (line by line, truncated on resume), the rank-0 helpers, secret redaction, the
progress bar, and a real wandb run in offline mode that touches no network."""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import textwrap

import pytest
import torch

from dpo_scale.config import LoggingConfig
from dpo_scale.training.tracking import (
    MetricsLog,
    NullTracker,
    ProgressBar,
    WandbTracker,
    build_tracker,
    is_main_process,
    print0,
    print_line,
    read_metrics,
    redact_secrets,
)


@pytest.mark.parametrize(("rank", "main"), [(None, True), ("0", True), ("1", False), ("7", False)])
def test_rank_zero_prints_and_others_stay_quiet(monkeypatch, capsys, rank, main):
    if rank is None:
        monkeypatch.delenv("RANK", raising=False)
    else:
        monkeypatch.setenv("RANK", rank)
    assert is_main_process() is main
    print0("step", 3)
    assert capsys.readouterr().out == ("step 3\n" if main else "")


class _Writes:
    """A stdout that records each write."""

    def __init__(self):
        self.writes: list[str] = []

    def write(self, text: str) -> None:
        self.writes.append(text)

    def flush(self) -> None:
        pass


@pytest.mark.parametrize("say", [print0, print_line])
def test_a_line_reaches_stdout_in_one_write_with_its_newline(monkeypatch, say):
    """The deepspeed launcher runs ranks under `python -u`, where every write reaches the shared output at once:
    `print` wrote a line and its newline separately, so two ranks' lines ran together ("...group 0 (ranks
    0-1)rank 1 on node ...")."""
    monkeypatch.delenv("RANK", raising=False)
    stdout = _Writes()
    monkeypatch.setattr(sys, "stdout", stdout)
    say("rank 0 on node n1: sequence-parallel group 0 (ranks 0-1)")
    assert stdout.writes == ["rank 0 on node n1: sequence-parallel group 0 (ranks 0-1)\n"]


def test_metrics_log_appends_one_json_line_per_call(tmp_path):
    log = MetricsLog(tmp_path / "run" / "metrics.jsonl")
    log.write(1, "train", {"loss": torch.tensor(0.6931), "rewards/accuracies": 1})
    log.write(1, "eval", {"loss": 0.5})

    text = log.path.read_text(encoding="utf-8")
    assert text.count("\n") == 2 and text.endswith("\n")
    rows = read_metrics(log.path)
    assert rows == [
        {"step": 1, "split": "train", "loss": pytest.approx(0.6931), "rewards/accuracies": 1.0},
        {"step": 1, "split": "eval", "loss": 0.5},
    ]
    assert type(rows[0]["rewards/accuracies"]) is float and type(rows[0]["step"]) is int


def test_truncate_after_drops_the_steps_a_resumed_run_logs_again(tmp_path):
    log = MetricsLog(tmp_path / "metrics.jsonl")
    for step in range(1, 6):
        log.write(step, "train", {"loss": 1.0 / step})
        if step % 2 == 0:
            log.write(step, "eval", {"loss": 2.0 / step})

    log.truncate_after(3)  # the last checkpoint was at step 3
    assert [(row["step"], row["split"]) for row in read_metrics(log.path)] == [
        (1, "train"),
        (2, "train"),
        (2, "eval"),
        (3, "train"),
    ]
    for step in (4, 5):  # the resumed run logs steps 4 and 5 again
        log.write(step, "train", {"loss": 0.1})
    rows = read_metrics(log.path)
    assert [row["step"] for row in rows] == [1, 2, 2, 3, 4, 5]
    assert [row["loss"] for row in rows] == [1.0, 0.5, 1.0, 1.0 / 3, 0.1, 0.1]
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.jsonl"]  # no temporary file left beside it


def test_truncate_after_without_a_file_creates_none(tmp_path):
    MetricsLog(tmp_path / "metrics.jsonl").truncate_after(10)
    assert list(tmp_path.iterdir()) == []


def test_a_line_torn_by_a_killed_run_is_dropped_and_truncated_away(tmp_path):
    log = MetricsLog(tmp_path / "metrics.jsonl")
    log.write(1, "train", {"loss": 0.69})
    log.write(2, "train", {"loss": 0.68})
    with open(log.path, "a", encoding="utf-8") as handle:
        handle.write('{"step": 3, "split": "tr')  # killed in the middle of a write

    assert [row["step"] for row in read_metrics(log.path)] == [1, 2]
    log.truncate_after(2)
    log.write(3, "train", {"loss": 0.67})
    assert [row["loss"] for row in read_metrics(log.path)] == [0.69, 0.68, 0.67]


def test_redact_secrets_removes_credentials_at_any_depth_and_keeps_the_rest():
    config = {
        "loss": {"beta": 0.1, "api_key": "k1"},
        "HF_TOKEN": "t1",
        "wandb": {"nested": {"Password": "p1", "kept": 3}, "client_secret": "s1"},
        "data": {"path": "pairs.jsonl", "tokenizer": "tok/"},
        "lora": {"target_modules": ["q_proj"]},
    }
    assert redact_secrets(config) == {
        "loss": {"beta": 0.1},
        "wandb": {"nested": {"kept": 3}},
        "data": {"path": "pairs.jsonl"},  # "tokenizer" contains "token": dropped on purpose, see the docstring
        "lora": {"target_modules": ["q_proj"]},
    }
    assert config["loss"]["api_key"] == "k1"  # the caller's dict is not modified


def test_build_tracker_is_null_when_wandb_is_off_or_on_other_ranks(monkeypatch, tmp_path):
    def no_wandb(*args, **kwargs):
        raise AssertionError("wandb must not start")

    monkeypatch.setattr(WandbTracker, "__init__", no_wandb)
    monkeypatch.setenv("RANK", "0")
    assert isinstance(build_tracker(LoggingConfig(wandb=False), tmp_path, {}), NullTracker)
    monkeypatch.setenv("RANK", "1")
    assert isinstance(build_tracker(LoggingConfig(wandb=True), tmp_path, {}), NullTracker)
    tracker = NullTracker()
    tracker.log({"loss": 0.5}, 1, "train")
    tracker.close()
    assert list(tmp_path.iterdir()) == []


@pytest.fixture
def offline_wandb(monkeypatch, tmp_path):
    """wandb offline, its files under tmp_path, and any attempt to leave this machine would fail rather than go out:
    the server and proxies point at a closed local port, and this process refuses internet sockets outright."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_CONSOLE", "off")  # leave pytest's capture of stdout alone
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")
    for proxy in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy"):
        monkeypatch.setenv(proxy, "http://127.0.0.1:9")
    monkeypatch.setenv("RANK", "0")
    connect = socket.socket.connect

    def local_only(sock, address):
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            raise AssertionError(f"network connection attempted to {address}")
        return connect(sock, address)

    monkeypatch.setattr(socket.socket, "connect", local_only)
    return tmp_path


@pytest.mark.slow
def test_wandb_offline_writes_the_run_under_run_dir(offline_wandb):
    run_dir = offline_wandb / "run"
    config = LoggingConfig(wandb=True, wandb_mode="offline", wandb_project="dpo_scale_test")
    tracker = build_tracker(config, run_dir, {"loss": {"beta": 0.125}, "hub": {"hf_token": "hf_SECRET_VALUE"}})
    assert isinstance(tracker, WandbTracker)
    tracker.log({"loss": 0.6931, "rewards/accuracies": 0.5}, step=1, split="train")
    tracker.log({"loss": 0.4321}, step=1, split="eval")
    tracker.close()

    (record,) = run_dir.glob("wandb/offline-run-*/run-*.wandb")  # the binary log `wandb sync` uploads
    data = record.read_bytes()
    assert b'{"beta":0.125}' in data  # the run config
    assert b"train/loss" in data and b"0.6931" in data
    assert b"train/rewards/accuracies" in data
    assert b"eval/loss" in data and b"0.4321" in data
    assert not any(b"SECRET" in p.read_bytes() for p in offline_wandb.rglob("*") if p.is_file())


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("strace") is None, reason="strace proves what the wandb-core process connects to")
def test_wandb_offline_opens_no_network_socket_in_any_process(tmp_path):
    """The in-process guard above cannot see wandb-core, a separate Go process: trace every process's connect()."""
    script = textwrap.dedent(
        f"""
        from dpo_scale.config import LoggingConfig
        from dpo_scale.training.tracking import WandbTracker
        tracker = WandbTracker(LoggingConfig(wandb=True, wandb_mode="offline"), {str(tmp_path / "run")!r}, {{}})
        tracker.log({{"loss": 0.5}}, step=1, split="train")
        tracker.close()
        """
    )
    trace = tmp_path / "connect.trace"
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "WANDB_SILENT": "true", "WANDB_MODE": "offline"}
    subprocess.run(
        ["strace", "-f", "-qq", "-e", "trace=connect", "-o", str(trace), sys.executable, "-c", script],
        env=env, check=True, timeout=60,
    )
    connects = [line for line in trace.read_text().splitlines() if "connect(" in line]
    assert connects, "strace saw no connect() at all: the trace is not working"
    assert [line for line in connects if "AF_INET" in line] == []
    assert list((tmp_path / "run").glob("wandb/offline-run-*/run-*.wandb"))


def test_progress_bar_shows_step_loss_accuracy_margin_and_tokens_per_second(monkeypatch, capsys):
    monkeypatch.setenv("RANK", "0")
    bar = ProgressBar(total_steps=10, initial=2, enabled=True)
    bar.update(3, {"loss": 0.693147, "rewards/accuracies": 0.5, "rewards/margins": 0.123456, "lr": 1e-6,
                   "tokens_per_second": 12345.6})  # fmt: skip
    bar.update(4, {})  # between logs: keeps the last values on screen
    bar.close()
    err = capsys.readouterr().err
    assert "4/10" in err
    assert "loss=0.6931" in err and "acc=0.5000" in err and "margin=0.1235" in err and "tok/s=12,346" in err
    assert "lr" not in err


def test_progress_bar_is_labelled_for_the_work_it_counts(monkeypatch, capsys):
    monkeypatch.setenv("RANK", "0")
    bar = ProgressBar(total_steps=4, initial=0, enabled=True, label="precompute-ref", unit="shard")
    bar.update(4, {})
    bar.close()
    err = capsys.readouterr().err
    assert "precompute-ref: 100%" in err and "4/4" in err and "shard/s" in err and "train" not in err


@pytest.mark.parametrize(("rank", "enabled"), [("1", True), ("0", False)])
def test_progress_bar_is_silent_off_rank_zero_or_when_disabled(monkeypatch, capsys, rank, enabled):
    monkeypatch.setenv("RANK", rank)
    bar = ProgressBar(total_steps=10, initial=0, enabled=enabled)
    bar.update(5, {"loss": 0.5})
    bar.close()
    assert capsys.readouterr() == ("", "")


THREADS_AFTER_BARS = textwrap.dedent("""
    import sys, threading
    from tqdm import tqdm
    from transformers.utils.logging import tqdm as transformers_tqdm
    from dpo_scale.training.tracking import stop_tqdm_monitor

    if sys.argv[1] == "stopped":
        stop_tqdm_monitor()
    for bar in (tqdm(range(3)), transformers_tqdm(range(3))):  # ours, and from_pretrained's "Loading weights"
        list(bar)
    print(",".join(sorted(thread.name for thread in threading.enumerate())))
""")


@pytest.mark.slow
@pytest.mark.parametrize(("mode", "threads"), [("default", "MainThread,tqdm_monitor"), ("stopped", "MainThread")])
def test_no_tqdm_monitor_thread_is_left_to_die_at_exit(mode, threads):
    """`dpo-scale` stops tqdm's monitor before any bar starts: a daemon thread that frees tensors while the
    interpreter exits aborts the process (a finished SLURM job reported FAILED). The default shows the thread."""
    result = subprocess.run([sys.executable, "-c", THREADS_AFTER_BARS, mode], capture_output=True, text=True,
                            timeout=120, check=True)  # fmt: skip
    assert result.stdout.strip() == threads

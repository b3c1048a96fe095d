"""Training when things go wrong: a NaN loss, too many of them, a rank that dies, hangs or raises.

Every run is a subprocess (DeepSpeed is never initialised in the pytest process). Faults are injected by a small
driver script that wraps `dpo_scale.commands.train.build_preference_loss` and then runs `dpo-scale train` through
`dpo_scale.cli.main`, so what the tests read is what a user would see on the terminal.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import psutil
import pytest
import torch
import yaml

from dpo_scale.commands.demo import write_demo_material
from dpo_scale.config import DataConfig
from dpo_scale.data import load_tokenizer, prepare
from dpo_scale.distributed import free_port
from dpo_scale.training.checkpoint import load_weights
from fixed_split import Split
from launch import DPO_SCALE, base_config, train_metrics

DRIVER = textwrap.dedent(
    '''
    """dpo-scale train with NaN losses on chosen optimizer steps (1-based); optionally a sampler that leaves out one
    batch (a reference run), or one rank that sleeps forever or raises at one step. Prints DeepSpeed's skipped_steps
    at the end, also when the run stops with an error. The spec is the last argument (the deepspeed launcher puts
    --local_rank=N before it)."""
    import dataclasses
    import json
    import os
    import sys
    import time
    from pathlib import Path

    import dpo_scale.commands.train as loop
    from dpo_scale import cli

    spec = json.loads(sys.argv[-1])
    nan_steps = set(spec["nan_steps"])
    accumulation = spec["gradient_accumulation_steps"]
    fault = spec.get("fault")  # {"rank", "step", "marker", "action": "sleep" | "raise"}

    build_loss = loop.build_preference_loss

    def build_preference_loss(config):
        loss = build_loss(config)
        calls = 0  # one call per micro-batch: `accumulation` calls per optimizer step

        def faulty_loss(policy, reference, *args):
            nonlocal calls
            step = calls // accumulation + 1
            calls += 1
            if fault and step == fault["step"] and int(os.environ["RANK"]) == fault["rank"]:
                Path(fault["marker"]).write_text(str(time.time()))
                if fault["action"] == "sleep":
                    time.sleep(3600)  # alive, but never reaches the next collective
                raise RuntimeError(f"injected failure on rank {fault['rank']} at step {step}")
            output = loss(policy, reference, *args)
            if step in nan_steps:  # NaN losses, so NaN gradients for every weight
                output = dataclasses.replace(output, losses=output.losses * float("nan"))
            return output

        return faulty_loss

    loop.build_preference_loss = build_preference_loss

    if spec.get("leave_out_batch") is not None:
        left_out = spec["leave_out_batch"]  # 0-based step whose batch this run never sees

        class LeaveOutOne(loop.StepSampler):
            def step_pairs(self, step):
                return super().step_pairs(step + (step >= left_out))

        loop.StepSampler = LeaveOutOne

    train_loop = loop.train

    def train(state):
        try:
            train_loop(state)
        finally:
            print(f"deepspeed skipped_steps={state.engine.skipped_steps}", flush=True)

    loop.train = train
    sys.exit(cli.main(["train", "--config", spec["config"]]))
    '''
)


@pytest.fixture(scope="module")
def material(tmp_path_factory):
    return write_demo_material(tmp_path_factory.mktemp("demo"), rows=128)


def _write_driver(tmp_path, tree, nan_steps=(), **extra):
    """The driver script and the run's config beside the run; returns the driver's arguments."""
    script = tmp_path / "driver.py"
    script.write_text(DRIVER)
    config = tmp_path / f"{os.path.basename(tree['run_dir'])}.yaml"
    config.write_text(yaml.safe_dump(tree))
    spec = {
        "config": str(config),
        "nan_steps": sorted(nan_steps),
        "gradient_accumulation_steps": tree.get("gradient_accumulation_steps", 1),
        **extra,
    }
    return [str(script), json.dumps(spec)]


def _drive(tmp_path, tree, nan_steps, leave_out_batch=None, timeout=300):
    """Run the driver as one plain process (a world of one); returns the CompletedProcess."""
    command = [sys.executable, *_write_driver(tmp_path, tree, nan_steps, leave_out_batch=leave_out_batch)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env)


def _ok(result):
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


def _weights(run_dir, step):
    return load_weights(run_dir / "checkpoints" / f"step-{step:08d}")


def _all_finite(weights):
    return all(torch.isfinite(tensor).all() for tensor in weights.values())


def _equal(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[name], b[name]) for name in a)


@pytest.mark.slow
def test_nan_loss_on_one_step_skips_that_update(material, tmp_path):
    """NaN losses at step 3 of 6: a warning names step 3 and the broken term, DeepSpeed skips exactly that update
    (skipped_steps=1) and its metrics stay out of the log, and the run goes on as if batch 3 had never been there.
    The reference is a clean 5-step run whose sampler leaves out batch 3: with the constant schedule both runs see
    the same batches at the same learning rates, and a skipped update touches neither the weights nor Adam's moments
    and step count nor the scheduler, so on CPU fp32 (deterministic) the losses and the final weights must be bitwise
    equal, not merely close."""
    optim = {"lr": 0.001, "warmup_steps": 2, "schedule": "constant"}
    nan_run = tmp_path / "nan"
    result = _drive(tmp_path, base_config(material, nan_run, optim=optim, checkpoint={"every": 1, "keep_last": 6}), {3})
    _ok(result)
    reference_run = tmp_path / "reference"
    _ok(_drive(tmp_path, base_config(material, reference_run, optim=optim, max_steps=5), set(), leave_out_batch=2))

    assert "warning: step 3: non-finite loss (4 values); update skipped (1 of at most 5)" in result.stdout
    assert result.stdout.count("update skipped") == 1
    assert "deepspeed skipped_steps=1" in result.stdout

    rows = train_metrics(nan_run)
    assert [r["step"] for r in rows] == [1, 2, 4, 5, 6]  # nothing of the skipped update's batch is logged
    for row in rows:
        assert all(torch.isfinite(torch.tensor(v)) for k, v in row.items() if k != "split"), row
    expected = [r["loss"] for r in train_metrics(reference_run)]
    assert [r["loss"] for r in rows] == expected  # steps 4-6 of one are steps 3-5 of the other
    # the weights did move: update 1 runs at lr 0 (linear warm-up from 0), so only steps 1 and 2 share a loss (ln 2)
    assert len(set(expected)) == 4

    checkpoints = {step: _weights(nan_run, step) for step in range(1, 7)}
    assert all(_all_finite(weights) for weights in checkpoints.values())
    assert _equal(checkpoints[2], checkpoints[3])  # the update of step 3 was skipped
    assert not _equal(checkpoints[3], checkpoints[4])  # and step 4 updated again
    assert _equal(checkpoints[6], _weights(reference_run, 5))


@pytest.mark.slow
def test_too_many_nan_steps_stop_the_run_with_a_diagnostic(material, tmp_path):
    """NaN losses at steps 3, 4 and 5 with max_nonfinite_skips=2: steps 3 and 4 are skipped with warnings, step 5 is
    one too many and `dpo-scale train` stops with a message (exit 3, no traceback) naming the step, the limit, the
    broken term and the first rows of the bad batch (computed here from the same sampler). The last checkpoint is
    step 4's, finite, and bitwise step 2's weights (3 and 4 were skipped); no checkpoint of step 5, complete or
    partial, exists."""
    run_dir = tmp_path / "run"
    tree = base_config(material, run_dir, checkpoint={"every": 1, "keep_last": 6}, max_nonfinite_skips=2)
    result = _drive(tmp_path, tree, nan_steps={3, 4, 5})

    assert result.returncode == 3, result.stdout[-3000:] + result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    for step, skipped in ((3, 1), (4, 2), (5, 3)):
        assert f"warning: step {step}: non-finite loss (4 values); update skipped ({skipped} of at most 2)" in (
            result.stdout
        )
    assert "deepspeed skipped_steps=3" in result.stdout
    pairs = prepare(DataConfig(str(material[1])), load_tokenizer(str(material[0]))).pairs
    sampler = Split(len(pairs), micro_batch_size=4, gradient_accumulation_steps=1, world_size=1, seed=0)
    sources = [pairs[i].source for batch in sampler.micro_batches(4, rank=0) for i in batch]
    assert len(sources) == 4 and all(source.startswith(f"{material[1]} line ") for source in sources)
    assert (
        "dpo-scale train: stopped: step 5: 3 updates skipped for non-finite values (limit max_nonfinite_skips=2); "
        f"this one in loss (4 values). Its batch began with {sources}."
    ) in result.stderr

    checkpoints = run_dir / "checkpoints"
    assert (checkpoints / "latest").read_text().strip() == "step-00000004"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["latest", *(f"step-{s:08d}" for s in range(1, 5))]
    weights = {step: _weights(run_dir, step) for step in range(1, 5)}
    assert all(_all_finite(w) for w in weights.values())
    assert not _equal(weights[1], weights[2])  # step 2 updated (step 1 ran at warm-up lr 0) ...
    assert _equal(weights[2], weights[4])  # ... steps 3 and 4 did not
    assert [r["step"] for r in train_metrics(run_dir)] == [1, 2]  # skipped updates log no row


# --- two ranks under the deepspeed launcher: one of them dies, hangs or raises -------------------------------------


def _launch_two_ranks(tmp_path, program):
    """`deepspeed --num_gpus 2 PROGRAM...` in its own session (so a failed test can kill the whole job), output to
    tmp_path/launcher.log."""
    deepspeed = shutil.which("deepspeed") or os.path.join(os.path.dirname(sys.executable), "deepspeed")
    command = [deepspeed, "--num_gpus", "2", "--master_port", str(free_port()), *program]
    with open(tmp_path / "launcher.log", "w") as log:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "HF_HUB_OFFLINE": "1"},
            start_new_session=True,
        )  # fmt: skip


def _wait_for(condition, proc, tmp_path, limit_s=120):
    """Poll until `condition()` while the launcher runs; fail with the launcher's log otherwise."""
    deadline = time.time() + limit_s
    while time.time() < deadline and proc.poll() is None and not condition():
        time.sleep(0.1)
    assert proc.poll() is None and condition(), (tmp_path / "launcher.log").read_text()[-3000:]


def _wait_for_exit(proc, what, limit_s=150):
    try:
        return proc.wait(timeout=limit_s)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the launcher still runs {limit_s:.0f} s after {what}")


def _end_session(proc):
    """Whatever is left of the launcher's session (something only if the test failed), then reap the launcher."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def _long_run(material, run_dir, timeout_s):
    tree = base_config(material, run_dir, max_steps=100_000, deepspeed={"timeout_s": timeout_s})
    tree.update(epochs=10_000)  # one epoch of the demo material is only 16 steps of 2 ranks x 4 pairs
    return tree


def _launch_with_fault(material, tmp_path, action, timeout_s):
    """Rank 1 sleeps forever or raises inside step 3's loss; returns the launcher and the fault's marker file."""
    marker = tmp_path / "fault"
    fault = {"rank": 1, "step": 3, "marker": str(marker), "action": action}
    program = _write_driver(tmp_path, _long_run(material, tmp_path / "run", timeout_s), fault=fault)
    return _launch_two_ranks(tmp_path, program), marker


@pytest.mark.slow
def test_killed_rank_ends_the_job_without_hanging(material, tmp_path):
    """SIGKILL one of two ranks mid-run under the deepspeed launcher: the launcher must exit non-zero within 120 s
    (deepspeed.timeout_s=30 bounds a blocked collective; on gloo the survivor sees the dead peer's closed socket at
    once and the launcher reaps its dead child, so it takes seconds). No process of the job outlives the launcher."""
    run_dir = tmp_path / "run"
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(_long_run(material, run_dir, timeout_s=30)))
    proc = _launch_two_ranks(tmp_path, [DPO_SCALE, "train", "--config", str(config)])
    try:
        metrics = run_dir / "metrics.jsonl"
        _wait_for(lambda: metrics.exists() and len(metrics.read_text().splitlines()) >= 3, proc, tmp_path)
        job = psutil.Process(proc.pid).children(recursive=True)
        rank1 = [p for p in job if "--local_rank=1" in p.cmdline()]
        assert len(rank1) == 1, [p.cmdline() for p in job]
        steps_before = len(metrics.read_text().splitlines())
        rank1[0].send_signal(signal.SIGKILL)
        killed_at = time.time()
        code = _wait_for_exit(proc, "one rank was killed")
        seconds = time.time() - killed_at
        print(f"\nkilled rank 1 after {steps_before} logged steps: launcher exited {code} after {seconds:.1f} s")
        assert code != 0
        assert seconds < 120
        _, alive = psutil.wait_procs(job, timeout=10)
        assert not alive, [p.cmdline() for p in alive]  # no orphaned rank keeps the job's memory
    finally:
        _end_session(proc)


@pytest.mark.slow
def test_hung_rank_ends_the_job_after_the_collective_timeout(material, tmp_path):
    """One of two ranks stops making progress without dying (it sleeps inside step 3's loss): only the collective
    timeout can end that. With deepspeed.timeout_s=6 the other rank's collective fails after 6 s, it exits, and the
    launcher (which polls once a second) terminates the sleeper and exits non-zero: about 7-9 s after the hang
    began, asserted within [6, 30) s so a slow machine does not fail it. Under 6 s would mean something other than
    the timeout ended the job."""
    proc, marker = _launch_with_fault(material, tmp_path, "sleep", timeout_s=6)
    try:
        _wait_for(marker.exists, proc, tmp_path)
        job = psutil.Process(proc.pid).children(recursive=True)
        code = _wait_for_exit(proc, "one rank hung")
        seconds = time.time() - float(marker.read_text())
        print(f"\nrank 1 hung at step 3: launcher exited {code} after {seconds:.1f} s")
        log = (tmp_path / "launcher.log").read_text()
        assert code != 0
        assert 6 <= seconds < 30, log[-3000:]
        assert "Timed out waiting 6000ms" in log  # gloo's words: the configured timeout is what fired
        _, alive = psutil.wait_procs(job, timeout=10)
        assert not alive, [p.cmdline() for p in alive]
    finally:
        _end_session(proc)


@pytest.mark.slow
def test_exception_on_one_rank_ends_the_job_promptly_with_that_error(material, tmp_path):
    """One of two ranks raises inside step 3's loss while the other goes on to its next collective. The job must end
    as soon as the launcher sees the failed rank (it polls once a second: about 3-4 s), well before the collective
    timeout (deepspeed.timeout_s=10), and the failed rank's last error must be the one it raised, not a timeout."""
    proc, marker = _launch_with_fault(material, tmp_path, "raise", timeout_s=10)
    try:
        _wait_for(marker.exists, proc, tmp_path)
        raised_at = float(marker.read_text())
        code = _wait_for_exit(proc, "rank 1 raised (the collective timeout)", limit_s=raised_at + 10 - time.time())
        seconds = time.time() - raised_at
        print(f"\nrank 1 raised at step 3: launcher exited {code} after {seconds:.1f} s")
        assert code != 0
        errors = [line for line in (tmp_path / "launcher.log").read_text().splitlines() if line.startswith("[rank1]: ")]
        assert "RuntimeError: injected failure on rank 1 at step 3" in errors[-1], errors[-5:]
    finally:
        _end_session(proc)

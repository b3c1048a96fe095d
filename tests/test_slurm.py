"""The SLURM batch scripts, submitted for real to a two-node cluster on this machine (slurm/local_cluster.sh).

Each node runs one CPU rank (gloo). Skipped only where SLURM is not installed: `.ci/run` installs it
(`bash slurm/local_cluster.sh install`), so CI runs these.
"""

import json
import math
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from dpo_scale.commands.demo import write_demo_material
from dpo_scale.training.checkpoint import load_weights
from launch import DPO_SCALE, base_config, train_metrics

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "slurm" / "local_cluster.sh"
STATE_DIR = Path("/tmp/dpo-scale-slurm")

pytestmark = pytest.mark.skipif(
    shutil.which("slurmctld") is None or shutil.which("sbatch") is None,
    reason="SLURM is not installed here: bash slurm/local_cluster.sh install (CI does)",
)


@pytest.fixture(scope="module")
def cluster():
    """Start the cluster (or use the one already running from the same script), stop it afterwards if we started it."""
    already_running = (STATE_DIR / "slurmctld.pid").exists()
    started = subprocess.run(["bash", str(CLUSTER), "start"], capture_output=True, text=True, timeout=120)
    assert started.returncode == 0, started.stderr
    env = {
        **os.environ, "SLURM_CONF": str(STATE_DIR / "slurm.conf"), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
    }  # fmt: skip
    yield env
    if not already_running:
        subprocess.run(["bash", str(CLUSTER), "stop"], capture_output=True, timeout=120)


@pytest.fixture(scope="module")
def material(tmp_path_factory):
    return write_demo_material(tmp_path_factory.mktemp("demo"), rows=96)


def _config(material, tmp_path, name, **extra) -> Path:
    tree = base_config(material, tmp_path / name, micro_batch_size=2, **extra)
    tree["reference"] = {"cache_dir": str(tmp_path / "cache"), "shard_size": 16}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(tree))
    return path


def _run(command, env, **kwargs):
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=60, **kwargs)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def _job(job_id, env) -> dict[str, str]:
    out = _run(["scontrol", "show", "job", "-o", str(job_id)], env)
    return dict(re.findall(r"(\w+)=(\S*)", out))


def _wait(job_id, env, states=("COMPLETED",), timeout=300) -> dict[str, str]:
    deadline = time.time() + timeout
    while time.time() < deadline:
        job = _job(job_id, env)
        if job["JobState"] in states:
            return job
        if job["JobState"] in ("FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"):
            break
        time.sleep(1)
    raise AssertionError(f"job {job_id} is {job['JobState']} (waited for {states}): {job}")


def _log(pattern: str, tmp_path) -> str:
    return "\n".join(p.read_text() for p in sorted(tmp_path.glob(pattern)))


@pytest.mark.slow
def test_pipeline_precomputes_then_trains_on_two_nodes_from_the_cache(cluster, material, tmp_path):
    config = _config(material, tmp_path, "run")
    output = f"--output={tmp_path}/%x-%j.out"
    env = {**cluster, "PRECOMPUTE_SBATCH": output, "TRAIN_SBATCH": output}
    printed = _run(["slurm/pipeline.sh", "--config", str(config)], env)
    precompute_id, train_id = re.findall(r"job:\s+(\d+)", printed)

    precompute = _wait(precompute_id, cluster)
    trained = _wait(train_id, cluster)
    assert trained["Dependency"] == "(null)" and trained["StartTime"] >= precompute["EndTime"]
    assert trained["NodeList"] == "node[1-2]" and trained["NumNodes"] == "2"
    assert (tmp_path / "cache" / "manifest.json").exists()

    log = _log(f"dpo-train-{train_id}.out", tmp_path)
    assert "rank 0: holds" in log and "rank 1: holds" in log  # two ranks, one per node
    assert f"reference log-probs from the cache {tmp_path / 'cache'}" in log
    rows = train_metrics(tmp_path / "run")
    assert [r["step"] for r in rows] == list(range(1, 7))
    assert rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert (tmp_path / "run" / "checkpoints" / "step-00000006" / "model.safetensors.index.json").exists()
    hostfiles = Path(os.environ.get("TMPDIR", "/tmp")).glob(f"dpo-scale-hosts-{train_id}-*")
    assert not list(hostfiles), "each node removes the hostfile it wrote"


@pytest.mark.slow
def test_usr1_saves_requeues_and_resumes_on_one_node_to_the_same_weights(cluster, material, tmp_path):
    """Two jobs side by side (each takes one core per node): one runs through on 2 nodes, the other gets USR1 (what
    --signal=B:USR1@600 sends before the time limit), checkpoints, requeues itself and resumes on 1 node (a node was
    drained, say): global_batch_size makes that launch accumulate 2 micro-batches where 2 ranks ran 1 each. Both end
    with the same per-step losses and weights within 1e-6 (relative)."""
    steps = {"max_steps": 30, "epochs": 2, "global_batch_size": 4}
    straight = _config(material, tmp_path, "straight", **steps)
    interrupted = _config(material, tmp_path, "interrupted", **steps)
    subprocess.run([DPO_SCALE, "precompute-ref", "--config", str(straight)], env=cluster, check=True,
                   capture_output=True, timeout=120)  # fmt: skip
    submit = ["sbatch", "--parsable", f"--output={tmp_path}/%x-%j.out", "slurm/train.sbatch"]
    straight_id = _run([*submit, "--config", str(straight), "reference.source=cache"], cluster).strip()
    job_id = _run([*submit, "--config", str(interrupted), "reference.source=cache"], cluster).strip()

    metrics = tmp_path / "interrupted" / "metrics.jsonl"
    deadline = time.time() + 180
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3) and time.time() < deadline:
        time.sleep(0.2)
    _run(["scancel", "--signal=USR1", "--batch", job_id], cluster)
    requeued = _wait(job_id, cluster, states=("PENDING",), timeout=120)
    assert requeued["Restarts"] == "1"
    stopped_at = len(train_metrics(tmp_path / "interrupted"))
    assert 3 <= stopped_at < 30, "USR1 must land mid-run"
    assert (tmp_path / "interrupted" / "checkpoints" / "latest").read_text().strip() == f"step-{stopped_at:08d}"
    # slurm holds a requeued job for a fixed ~2 minutes (EligibleTime) while the nodes clean up the first run; wait
    # for that clean-up only (its files leave the nodes' spool directories), then let the job start
    deadline = time.time() + 120
    on_nodes = [f"spool/*/job{int(job_id):05d}", f"spool/*/node*_{job_id}.*"]  # batch script, step sockets
    while any(list(STATE_DIR.glob(pattern)) for pattern in on_nodes) and time.time() < deadline:
        time.sleep(0.5)
    time.sleep(2)
    _run(["scontrol", "update", f"JobId={job_id}", "NumTasks=1", "NumNodes=1"], cluster)  # as `sbatch -N 1` asks
    _run(["scontrol", "update", f"JobId={job_id}", "StartTime=now"], cluster)

    _wait(straight_id, cluster)
    _wait(job_id, cluster)
    log = _log(f"dpo-train-{job_id}.out", tmp_path)
    assert "slurm: USR1: the time limit is near" in log and f"stopped after step {stopped_at} on request" in log
    assert "requeueing job" in log and "restart 1" in log and "(1 nodes)" in log
    resumed_rows, straight_rows = train_metrics(tmp_path / "interrupted"), train_metrics(tmp_path / "straight")
    assert [r["step"] for r in resumed_rows] == list(range(1, 31))
    assert [r["loss"] for r in resumed_rows] == pytest.approx([r["loss"] for r in straight_rows], rel=1e-6, abs=0)
    final = "checkpoints/step-00000030"
    resumed, uninterrupted = load_weights(tmp_path / "interrupted" / final), load_weights(tmp_path / "straight" / final)
    for name in uninterrupted:
        scale = uninterrupted[name].abs().max()
        assert (resumed[name] - uninterrupted[name]).abs().max() <= 1e-6 * scale, name
    assert not (tmp_path / "interrupted" / "stop-requested").exists()


@pytest.mark.slow
def test_sweep_array_runs_every_point_from_one_cache(cluster, material, tmp_path):
    """slurm/sweep.sh: the cache does not exist yet, so the precompute job goes first and the 3-point array waits for
    it; every point trains in its own run directory from that one cache."""
    config = _config(material, tmp_path, "sweep", max_steps=3)
    tree = yaml.safe_load(config.read_text())
    tree["reference"] = {"source": "cache", "cache_dir": str(tmp_path / "cache"), "shard_size": 16}
    config.write_text(yaml.safe_dump(tree))
    env = {
        **cluster, "PRECOMPUTE_SBATCH": f"--output={tmp_path}/%x-%j.out", "SWEEP_SBATCH": f"--output={tmp_path}/%x-%A_%a.out",
        "SUMMARY_SBATCH": f"--output={tmp_path}/%x-%j.out",
    }  # fmt: skip
    printed = _run(["slurm/sweep.sh", "--config", str(config), "--grid", "beta=0.05,0.1,0.5"], env)
    precompute_id = re.search(r"precompute job: (\d+)", printed).group(1)
    array_id = re.search(r"sweep array job: (\d+) \(3 points\)", printed).group(1)
    summary_id = re.search(r"summary job: (\d+)", printed).group(1)

    precompute = _wait(precompute_id, cluster)
    for task in range(3):
        job = _wait(f"{array_id}_{task}", cluster)
        assert job["StartTime"] >= precompute["EndTime"]
    log = _log(f"dpo-sweep-{array_id}_*.out", tmp_path)
    assert log.count(f"reference log-probs from the cache {tmp_path / 'cache'}") == 3
    for beta in ("0.05", "0.1", "0.5"):
        run_dir = tmp_path / "sweep" / f"beta={beta}"
        saved = yaml.safe_load((run_dir / "config.yaml").read_text())
        assert saved["loss"]["beta"] == float(beta) and saved["reference"]["cache_dir"] == str(tmp_path / "cache")
        assert [r["step"] for r in train_metrics(run_dir)] == [1, 2, 3]
    assert len(json.loads((tmp_path / "cache" / "manifest.json").read_text())["shards"]) == 6
    _wait(summary_id, cluster)
    summary = (tmp_path / "sweep" / "summary.md").read_text()
    assert all(f"| beta={beta} | done | 3 |" in summary for beta in ("0.05", "0.1", "0.5"))
    assert (tmp_path / "sweep" / "sweep.png").exists()


@pytest.mark.slow
def test_sequence_parallel_groups_stay_inside_a_node(cluster, material, tmp_path):
    """2 nodes x 2 ranks with sequence_parallel_size=2, one short launch: the launcher numbers ranks node by node, so
    each group of 2 consecutive ranks sits on one node (its all-to-alls stay there) and only the data-parallel
    reduction crosses nodes. Read from the groups each rank logs with its SLURM node name."""
    config = _config(material, tmp_path, "sp", max_steps=2, sequence_parallel_size=2)
    submit = ["sbatch", "--parsable", f"--output={tmp_path}/%x-%j.out", "slurm/train.sbatch", "--config", str(config)]
    job_id = _run(submit, {**cluster, "NUM_GPUS": "2"}).strip()
    _wait(job_id, cluster)
    log = _log(f"dpo-train-{job_id}.out", tmp_path)
    placed = re.findall(r"rank (\d) on node (\S+): sequence-parallel group (\d) \(ranks (\d)-(\d)\)", log)
    assert sorted(int(rank) for rank, *_ in placed) == [0, 1, 2, 3], log[-2000:]
    nodes_of_group: dict[str, set[str]] = {}
    for rank, node, group, first, last in placed:
        assert int(first) <= int(rank) <= int(last) and int(last) - int(first) == 1
        nodes_of_group.setdefault(group, set()).add(node)
    assert all(len(nodes) == 1 for nodes in nodes_of_group.values()), nodes_of_group
    assert {node for nodes in nodes_of_group.values() for node in nodes} == {"node1", "node2"}
    assert [r["step"] for r in train_metrics(tmp_path / "sp")] == [1, 2]

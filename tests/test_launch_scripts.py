"""launch/: the deepspeed commands the scripts build for each layout, their refusals, and one real 2-rank run.

The multi-node no-ssh path runs for real in tests/test_slurm.py (one launcher per node under srun)."""

import os
import subprocess
from pathlib import Path

import pytest
import yaml

from dpo_scale.commands.demo import write_demo_material
from launch import base_config, free_port, train_metrics

REPO = Path(__file__).resolve().parents[1]


def _script(name, *args, **env):
    return subprocess.run(
        [str(REPO / "launch" / name), *args], capture_output=True, text=True, timeout=300,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "DPO_SCALE": "/opt/dpo-scale", **env},
    )  # fmt: skip


def test_dry_run_commands_for_each_layout(tmp_path):
    hosts = tmp_path / "hosts"
    hosts.write_text("# two nodes\nnode1 slots=8\nnode2 slots=8\n")
    single = _script("train.sh", "--config", "run.yaml", "loss.beta=0.2", DRY_RUN="1", NUM_GPUS="4")
    assert single.stdout.split() == ["deepspeed", "--num_gpus", "4", "--master_addr", "127.0.0.1", "--master_port",
                                     "29500", "/opt/dpo-scale", "train", "--config", "run.yaml", "loss.beta=0.2"]  # fmt: skip
    over_ssh = _script("precompute_ref.sh", "--config", "r.yaml", DRY_RUN="1", NUM_GPUS="8", NUM_NODES="2",
                       HOSTFILE=str(hosts))  # fmt: skip
    assert over_ssh.stdout.split() == ["deepspeed", "--hostfile", str(hosts), "--num_nodes", "2", "--num_gpus", "8",
                                       "--master_addr", "node1", "--master_port", "29500", "/opt/dpo-scale",
                                       "precompute-ref", "--config", "r.yaml"]  # fmt: skip
    no_ssh = _script("train.sh", "--config", "r.yaml", DRY_RUN="1", NUM_GPUS="8", NUM_NODES="2", HOSTFILE=str(hosts),
                     NODE_RANK="1", MASTER_ADDR="10.0.0.1", MASTER_PORT="6000")  # fmt: skip
    assert "--no_ssh --node_rank 1 --master_addr 10.0.0.1 --master_port 6000" in no_ssh.stdout


@pytest.mark.parametrize(
    "env,message",
    [
        ({"NUM_NODES": "2"}, "NUM_NODES=2 needs HOSTFILE"),
        ({"NUM_NODES": "2", "HOSTFILE": "/no/such/hosts"}, "HOSTFILE=/no/such/hosts does not exist"),
        ({"NUM_NODES": "3", "HOSTFILE": "HOSTS"}, "lists 2 nodes, NUM_NODES=3"),
        ({"DPO_SCALE": "", "PATH": "/usr/bin:/bin"}, "dpo-scale is not on PATH"),
    ],
)
def test_refusals_name_the_setting(tmp_path, env, message):
    hosts = tmp_path / "hosts"
    hosts.write_text("node1 slots=1\nnode2 slots=1\n")
    env = {k: str(hosts) if v == "HOSTS" else v for k, v in env.items()}
    result = _script("train.sh", "--config", "r.yaml", DRY_RUN="1", **env)
    assert result.returncode == 2 and message in result.stderr


@pytest.mark.slow
def test_train_sh_runs_two_ranks_on_this_machine(tmp_path):
    material = write_demo_material(tmp_path / "demo", rows=32)
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(base_config(material, tmp_path / "run", max_steps=2, micro_batch_size=2)))
    environment = {k: v for k, v in os.environ.items() if k != "DPO_SCALE"}
    result = subprocess.run([str(REPO / "launch" / "train.sh"), "--config", str(config)], capture_output=True,
                            text=True, timeout=300, env={**environment, "NUM_GPUS": "2", "MASTER_PORT": str(free_port())})  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "rank 1: holds" in result.stdout and [r["step"] for r in train_metrics(tmp_path / "run")] == [1, 2]

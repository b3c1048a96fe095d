"""DeepSpeed JSON resolution: every "auto" filled from our config, explicit values checked, DeepSpeed accepts it."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dpo_scale.config import ConfigError, DeepSpeedConfig, OptimConfig
from dpo_scale.ds_config import (
    DS_CONFIGS,
    load_deepspeed_json,
    offloads_optimizer,
    offloads_params,
    resolve_deepspeed_config,
    single_process_advice,
    zero_stage,
)

SHIPPED = ["zero3", "zero3_offload", "zero2", "zero0"]
REPO = Path(__file__).resolve().parents[1]


def resolve(config: str = "zero3", precision: str = "fp32", optim: OptimConfig | None = None, micro: int = 4,
            accum: int = 2, world: int = 8, total: int = 100) -> dict:
    return resolve_deepspeed_config(DeepSpeedConfig(config=config, precision=precision), optim or OptimConfig(),
                                    micro, accum, world, total)


def write_json(tmp_path: Path, tree: dict, name: str = "mine.json") -> str:
    path = tmp_path / name
    path.write_text(json.dumps(tree))
    return str(path)


def autos(tree) -> list:
    if isinstance(tree, dict):
        return [a for v in tree.values() for a in autos(v)]
    if isinstance(tree, list):
        return [a for v in tree for a in autos(v)]
    return [tree] if tree == "auto" else []


@pytest.mark.parametrize("name", SHIPPED)
@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_shipped_configs_resolve_completely(name, precision):
    loaded = json.loads((DS_CONFIGS / f"{name}.json").read_text())
    resolved = resolve(name, precision)
    assert autos(resolved) == []
    assert resolved["bf16"]["enabled"] is (precision == "bf16")
    assert resolved["fp16"]["enabled"] is (precision == "fp16")
    assert resolved["train_micro_batch_size_per_gpu"] == 4 and resolved["gradient_accumulation_steps"] == 2
    assert resolved["train_batch_size"] == 64 and resolved["gradient_clipping"] == 1.0
    assert resolved["optimizer"] == {
        "type": "AdamW",
        "params": {"lr": 5e-7, "betas": [0.9, 0.95], "eps": 1e-8, "weight_decay": 0.0,
                   **({} if offloads_optimizer(resolved) else {"torch_adam": True, "fused": True})},
    }
    assert resolved["zero_optimization"] == loaded["zero_optimization"]  # choices pass through untouched
    assert resolved["steps_per_print"] == loaded["steps_per_print"]
    assert json.loads((DS_CONFIGS / f"{name}.json").read_text()) == loaded  # the file is never written


def test_shipped_stage_and_offload():
    assert [zero_stage(resolve(n)) for n in SHIPPED] == [3, 3, 2, 0]
    assert [offloads_optimizer(resolve(n)) for n in SHIPPED] == [False, True, False, False]
    assert [offloads_params(resolve(n)) for n in SHIPPED] == [False, True, False, False]
    assert resolve("zero3")["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True


@pytest.mark.parametrize(
    "schedule,expected",
    [
        ("cosine", {"type": "WarmupCosineLR", "params": {"total_num_steps": 100, "warmup_min_ratio": 0.0,
                                                         "warmup_num_steps": 10, "cos_min_ratio": 0.0,
                                                         "warmup_type": "linear", "last_batch_iteration": 0}}),
        ("linear", {"type": "WarmupDecayLR", "params": {"total_num_steps": 100, "warmup_min_lr": 0.0,
                                                        "warmup_max_lr": 2e-6, "warmup_num_steps": 10,
                                                        "warmup_type": "linear", "last_batch_iteration": 0}}),
        ("constant", {"type": "WarmupLR", "params": {"warmup_min_lr": 0.0, "warmup_max_lr": 2e-6,
                                                     "warmup_num_steps": 10, "warmup_type": "linear",
                                                     "last_batch_iteration": 0}}),
    ],
)
def test_every_schedule(schedule, expected):
    assert resolve(optim=OptimConfig(lr=2e-6, schedule=schedule, warmup_steps=10))["scheduler"] == expected


def test_constant_without_warmup_starts_at_the_peak():
    params = resolve(optim=OptimConfig(lr=3e-6, schedule="constant", warmup_steps=0))["scheduler"]["params"]
    assert params["warmup_min_lr"] == params["warmup_max_lr"] == 3e-6 and params["warmup_num_steps"] == 1


@pytest.mark.parametrize("schedule,warmup", [("cosine", 0), ("linear", 0), ("cosine", 1), ("constant", 1)])
def test_warmup_deepspeed_cannot_express_raises(schedule, warmup):
    """DeepSpeed's warm-up schedulers reject 0 steps and run 1 as 2: refused when the config is created."""
    with pytest.raises(ConfigError) as error:
        OptimConfig(schedule=schedule, warmup_steps=warmup)
    assert f"optim.warmup_steps={warmup} with optim.schedule={schedule}" in str(error.value)
    assert "use 2 or more warm-up steps" in str(error.value)


@pytest.mark.parametrize("micro,accum,world", [(1, 1, 1), (4, 1, 2), (2, 8, 16), (3, 5, 7)])
def test_train_batch_size_is_micro_times_accumulation_times_world(micro, accum, world):
    resolved = resolve(micro=micro, accum=accum, world=world)
    assert resolved["train_batch_size"] == micro * accum * world
    assert resolved["train_micro_batch_size_per_gpu"] == micro and resolved["gradient_accumulation_steps"] == accum


def test_clipping_off_is_zero():
    assert resolve(optim=OptimConfig(max_grad_norm=0.0))["gradient_clipping"] == 0.0


def test_user_json_with_autos_and_missing_sections(tmp_path):
    """A minimal user file: absent managed keys are filled like "auto"; keys we do not manage pass through."""
    tree = {
        "train_micro_batch_size_per_gpu": "auto",
        "optimizer": {"params": {"lr": "auto", "fp32_optimizer_states": False}},
        "scheduler": {"type": "auto", "params": {"warmup_num_steps": "auto"}},
        "zero_optimization": {"stage": 1},
        "communication_data_type": "fp32",
    }
    path = write_json(tmp_path, tree)
    resolved = resolve(path, "bf16", OptimConfig(lr=1e-6, schedule="linear"), micro=2, accum=3, world=4, total=50)
    assert resolved["train_batch_size"] == 24 and resolved["gradient_clipping"] == 1.0
    assert resolved["bf16"] == {"enabled": True} and resolved["fp16"] == {"enabled": False}
    assert resolved["optimizer"]["type"] == "AdamW"
    assert resolved["optimizer"]["params"] == {"lr": 1e-6, "fp32_optimizer_states": False, "betas": [0.9, 0.95],
                                               "eps": 1e-8, "weight_decay": 0.0, "torch_adam": True, "fused": True}
    assert resolved["scheduler"]["type"] == "WarmupDecayLR"
    assert resolved["scheduler"]["params"]["total_num_steps"] == 50
    assert resolved["zero_optimization"] == {"stage": 1} and resolved["communication_data_type"] == "fp32"
    assert json.loads(Path(path).read_text()) == tree


def test_agreeing_explicit_values_are_fine(tmp_path):
    tree = {"train_micro_batch_size_per_gpu": 4.0, "train_batch_size": 64, "gradient_clipping": 1,
            "bf16": {"enabled": False}, "optimizer": {"type": "adamw", "params": {"lr": 5e-7, "betas": [0.9, 0.95],
                                                                                  "torch_adam": False}},
            "scheduler": {"type": "WarmupCosineLR", "params": {"cos_min_ratio": 0, "total_num_steps": 100}}}
    resolved = resolve(write_json(tmp_path, tree))
    micro = resolved["train_micro_batch_size_per_gpu"]
    assert micro == 4 and isinstance(micro, int)  # 4.0 agrees, and is written back as the int DeepSpeed wants
    assert resolved["optimizer"]["params"]["torch_adam"] is False  # an explicit choice is the user's
    assert "fused" not in resolved["optimizer"]["params"]  # an option of torch's AdamW, which the user turned down
    assert resolved["scheduler"]["params"]["cos_min_ratio"] == 0.0


@pytest.mark.parametrize(
    "tree,message",
    [
        ({"train_micro_batch_size_per_gpu": 8},
         'train_micro_batch_size_per_gpu=8, but micro_batch_size gives 4; '
         'set train_micro_batch_size_per_gpu to "auto" or change micro_batch_size'),
        ({"train_batch_size": 32},
         "train_batch_size=32, but micro_batch_size x gradient_accumulation_steps x data-parallel replicas (4 x 2 x 8) gives 64; "
         'set train_batch_size to "auto" or change micro_batch_size or gradient_accumulation_steps'),
        ({"gradient_clipping": 0.5},
         'gradient_clipping=0.5, but optim.max_grad_norm gives 1.0; set gradient_clipping to "auto" or change '
         "optim.max_grad_norm"),
        ({"optimizer": {"type": "AdamW", "params": {"lr": 1e-5}}},
         'optimizer.params.lr=1e-05, but optim.lr gives 5e-07; set optimizer.params.lr to "auto" or change optim.lr'),
        ({"optimizer": {"params": {"betas": [0.9, 0.999]}}}, "optimizer.params.betas=[0.9, 0.999], but optim.betas"),
        ({"bf16": {"enabled": True}},
         'bf16.enabled=true, but deepspeed.precision=fp32 gives false; set bf16.enabled to "auto" or change '
         "deepspeed.precision"),
        ({"scheduler": {"type": "WarmupLR"}},
         'scheduler.type="WarmupLR", but optim.schedule=cosine gives "WarmupCosineLR"'),
        ({"scheduler": {"params": {"cos_min_ratio": 0.1}}},
         'scheduler.params.cos_min_ratio=0.1, but optim.schedule=cosine gives 0.0'),
        ({"optimizer": {"type": "Lion"}}, "optimizer.type='Lion', but dpo_scale's optim section describes AdamW"),
        ({"optimizer": []}, "optimizer must be a JSON object"),
        ({"zero_optimization": {"stage": 3, "reduce_bucket_size": "auto"}},
         'zero_optimization.reduce_bucket_size = "auto", which dpo_scale does not fill'),
    ],
)
def test_conflicting_explicit_value_names_key_values_and_fix(tmp_path, tree, message):
    path = write_json(tmp_path, tree)
    with pytest.raises(ConfigError) as error:
        resolve(path)
    assert str(error.value).startswith(f"{path}: ")
    assert message in str(error.value)


def test_invalid_json_names_the_path(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('{"zero_optimization": {"stage": 3,}}')
    with pytest.raises(ConfigError, match=f"deepspeed.config: {path} is not valid JSON: .*line 1 column"):
        resolve(str(path))
    path.write_text('{"gradient_clipping": 1.0, "gradient_clipping": 2.0}')
    with pytest.raises(ConfigError, match=f"{path} sets 'gradient_clipping' twice"):
        resolve(str(path))
    path.write_text("[1, 2]")
    with pytest.raises(ConfigError, match="must hold a JSON object"):
        resolve(str(path))


def test_missing_name_and_missing_file():
    with pytest.raises(ConfigError) as error:
        resolve("zero4")
    message = str(error.value)
    assert f"deepspeed.config='zero4': there is no {DS_CONFIGS / 'zero4.json'}" in message
    assert "shipped configs: zero0, zero2, zero3, zero3_offload" in message and f"looked in {DS_CONFIGS}" in message
    with pytest.raises(ConfigError, match=r"deepspeed.config: /nonexistent/ds.json cannot be read \(No such file"):
        resolve("/nonexistent/ds.json")


def test_a_bare_name_is_a_shipped_file_and_a_path_is_the_users(tmp_path):
    assert load_deepspeed_json("zero2")[0] == str(DS_CONFIGS / "zero2.json")
    assert load_deepspeed_json(write_json(tmp_path, {}, "zero2.json"))[1] == {}


def test_importing_needs_neither_torch_nor_deepspeed():
    code = ("import sys, dpo_scale.ds_config; "
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'deepspeed', 'transformers'}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize("name", SHIPPED)
def test_deepspeed_parser_accepts_resolved_config(name):
    """DeepSpeed's own config class: it validates every section with pydantic (unknown keys are errors) and
    checks train_batch_size = micro x accumulation x world size. With no process group it takes a world of one."""
    runtime_config = pytest.importorskip("deepspeed.runtime.config")
    resolved = resolve(name, "bf16", OptimConfig(lr=2e-6, schedule="cosine", warmup_steps=5), micro=3, accum=2,
                       world=1, total=40)
    parsed = runtime_config.DeepSpeedConfig(resolved)
    assert parsed.world_size == 1
    assert parsed.train_batch_size == 6
    assert (parsed.train_micro_batch_size_per_gpu, parsed.gradient_accumulation_steps) == (3, 2)
    assert parsed.gradient_clipping == 1.0
    assert parsed.bfloat16_config.enabled and not parsed.float16_config.enabled
    assert parsed.zero_optimization_stage == zero_stage(resolved)
    assert parsed.zero_config.offload_optimizer is None or parsed.zero_config.offload_optimizer.device == "cpu"
    assert parsed.optimizer_name == "adamw"
    assert parsed.optimizer_params["lr"] == 2e-6
    assert parsed.optimizer_params.get("torch_adam") is (None if offloads_optimizer(resolved) else True)
    assert parsed.optimizer_params.get("fused") is (None if offloads_optimizer(resolved) else True)
    assert parsed.scheduler_name == "WarmupCosineLR"
    assert parsed.scheduler_params == {"total_num_steps": 40, "warmup_min_ratio": 0.0, "warmup_num_steps": 5,
                                       "cos_min_ratio": 0.0, "warmup_type": "linear", "last_batch_iteration": 0}


ENGINE_SCRIPT = r"""
import json, os, socket, sys
with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
import deepspeed, torch
deepspeed.init_distributed(dist_backend="gloo")
from dpo_scale.distributed import training_engine
engine = training_engine(torch.nn.Linear(4, 4), json.loads(sys.argv[1]))
lrs = []
for _ in range(8):
    lrs.append(engine.get_lr()[0])
    engine.backward(engine(torch.randn(2, 4)).pow(2).mean())
    engine.step()
print(json.dumps({"optimizer": type(engine.basic_optimizer).__name__, "scheduler": type(engine.lr_scheduler).__name__,
                  "lrs": lrs}))
torch.distributed.destroy_process_group()
"""


@pytest.mark.slow
def test_deepspeed_engine_runs_resolved_zero3_on_cpu():
    """A real ZeRO-3 engine (one gloo rank on the CPU) built by `distributed.training_engine` from the resolved
    zero3.json: the optimizer is torch's AdamW (no extension to compile) and the lr follows WarmupCosineLR as the
    engine drives it. The scheduler is built at iteration 0 and the engine steps it after each optimizer step, so
    optimizer step k uses the schedule at iteration k - 1: linear warm-up from 0, then DeepSpeed's cosine, whose
    first decay iteration already counts one step, down to 0 at the last step."""
    pytest.importorskip("deepspeed")
    resolved = resolve("zero3", "fp32", OptimConfig(lr=1.0, schedule="cosine", warmup_steps=4), micro=2, accum=1,
                       world=1, total=8)
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "CUDA_VISIBLE_DEVICES": ""}
    run = subprocess.run([sys.executable, "-c", ENGINE_SCRIPT, json.dumps(resolved)], capture_output=True, text=True,
                         cwd=REPO, env=env, timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result["optimizer"] == "AdamW" and result["scheduler"] == "WarmupCosineLR"
    cosine = [(1 + math.cos(math.pi * i / 4)) / 2 for i in (1, 2, 3, 4)]  # 4 decay steps after 4 warm-up steps
    expected = [0.0, 0.25, 0.5, 0.75, *cosine]
    assert result["lrs"] == pytest.approx(expected, abs=1e-12)


def test_a_named_adam_kernel_is_the_users(tmp_path):
    """torch's AdamW refuses fused together with foreach: a JSON that asks for either keeps exactly its choice."""
    for choice in ({"foreach": True}, {"fused": False}):
        tree = {"optimizer": {"type": "AdamW", "params": dict(choice)}}
        params = resolve(write_json(tmp_path, tree))["optimizer"]["params"]
        assert params["torch_adam"] is True
        assert {key: params[key] for key in ("foreach", "fused") if key in params} == choice


def test_fused_adamw_takes_the_same_steps_as_the_per_tensor_loop():
    """The kernel `fused: true` selects against torch's default on CPU, over 5 steps on the same gradients: only the
    order of float operations differs, so 1e-6 relative (fp32 rounding, compounded over steps)."""
    torch.manual_seed(0)
    start = [torch.randn(64, 32), torch.randn(32)]
    updated = {}
    for fused in (False, True):
        weights = [w.clone().requires_grad_() for w in start]
        optimizer = torch.optim.AdamW(weights, lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1, fused=fused)
        generator = torch.Generator().manual_seed(1)
        for _ in range(5):
            for w in weights:
                w.grad = torch.randn(w.shape, generator=generator)
            optimizer.step()
        updated[fused] = [w.detach() for w in weights]
    for plain, fused in zip(updated[False], updated[True]):
        torch.testing.assert_close(fused, plain, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize(("config", "world", "advised"), [
    ("zero3", 1, True), ("zero3", 2, False), ("zero3_offload", 1, False), ("zero2", 1, False), ("zero0", 1, False),
])  # fmt: skip
def test_one_process_under_zero3_without_offload_is_advised_to_use_zero0(config, world, advised):
    advice = single_process_advice(resolve(config, world=world, accum=1), world)
    assert (advice is not None) == advised
    if advised:
        assert "deepspeed.config=zero0" in advice


@pytest.mark.parametrize("world,stage", [(1, 0), (2, 3), (64, 3)])
def test_auto_partitions_only_when_there_are_ranks_to_share_with(world, stage):
    """The default: no partitioning for one process (ZeRO-3 would only add a master copy and buffers there)."""
    assert DeepSpeedConfig().config == "auto"
    resolved = resolve("auto", world=world, accum=1)
    assert zero_stage(resolved) == stage and single_process_advice(resolved, world) is None
    assert resolved == resolve(f"zero{stage}", world=world, accum=1)
    # bf16 / fp16 without ZeRO: DeepSpeed's mixed-precision wrapper, whose master weights checkpoints cannot read
    assert zero_stage(resolve("auto", "bf16", world=world, accum=1)) == 3

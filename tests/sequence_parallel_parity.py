"""Run under `deepspeed --num_gpus 2` (tests/distributed/test_sequence_parallel.py): every rank scores the same
batches whole (a plain copy of the model, no sequence parallelism) and as its slice of a sequence-parallel group of 2
(Ulysses), and writes, per model and layout, the largest relative differences of the per-pair sums, the DPO loss and
every parameter's gradient to OUT_DIR/rank<r>.json.

The group's gradient of a parameter is the sum of its ranks' gradients (each rank back-propagates the loss through
its own slice; DeepSpeed's reduction then adds them), so the script all-reduces them over the group before
comparing with the whole row's.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).parent))

from tiny import random_pairs, stories260k, story_pairs, tiny_model  # noqa: E402

from dpo_scale import distributed  # noqa: E402
from dpo_scale.config import LogpsConfig  # noqa: E402
from dpo_scale.data.pairs import Pair  # noqa: E402
from dpo_scale.loss import sigmoid_loss  # noqa: E402
from dpo_scale.model.layout import collate  # noqa: E402
from dpo_scale.model.wrapper import PairLogpsModel  # noqa: E402

LAYOUTS = {
    "padded": LogpsConfig(prefix_sharing=False, packing=False),
    "packed": LogpsConfig(prefix_sharing=False, packing=True, attention="dense"),
    "prefix_shared": LogpsConfig(prefix_sharing=True, packing=False),
    "prefix_shared_packed": LogpsConfig(prefix_sharing=True, packing=True),
}


def boundary_pairs() -> list[list[Pair]]:
    """Batches whose rows need padding to a multiple of 2 (odd natural length), and one pair whose prompt ends
    exactly at the slice boundary of its prefix-shared row: prompt 9, chosen 4, rejected 5 -> 18 = 2 x 9."""
    odd = random_pairs(3, 97, seed=3, max_len=9)
    at_boundary = Pair(100, "prompt ends at the boundary", list(range(3, 12)), [20, 21, 22, 23], [30, 31, 32, 33, 34])
    return [random_pairs(4, 97, seed=1, max_len=14), odd, [at_boundary]]


def relative(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).abs().max() / want.abs().max().clamp_min(1e-12))


def compare(model: torch.nn.Module, batches: list[list[Pair]], layout: LogpsConfig, sequence) -> dict:
    whole_model = copy.deepcopy(model)
    plain = PairLogpsModel(whole_model, layout)
    sliced = PairLogpsModel(model, layout, sequence=sequence)  # routes the model's attention through Ulysses
    worst = {"sums": 0.0, "loss": 0.0, "gradients": 0.0, "shared_sums": 0.0}
    for pairs in batches:
        for module in (plain, sliced):
            module.zero_grad(set_to_none=True)
        batch = collate(pairs, layout, 0, sliced.length_multiple)
        assert batch.input_ids.shape[1] % sequence.size == 0
        outputs = []
        for module in (plain, sliced):
            out = module(batch)
            losses, *_ = sigmoid_loss(out.chosen_logps, out.rejected_logps, out.chosen_logps.detach() * 0.9,
                                      out.rejected_logps.detach() * 1.1, beta=0.1)  # fmt: skip
            losses.mean().backward()
            outputs.append((out, losses.mean().detach()))
        (want, want_loss), (got, got_loss) = outputs
        worst["sums"] = max(worst["sums"], relative(torch.cat([got.chosen_logps, got.rejected_logps]).detach(),
                                                    torch.cat([want.chosen_logps, want.rejected_logps]).detach()))
        worst["shared_sums"] = max(worst["shared_sums"], relative(got.chosen_shared_logps.detach(),
                                                                  want.chosen_shared_logps.detach()))
        worst["loss"] = max(worst["loss"], relative(got_loss, want_loss))
        for (name, p_whole), p_slice in zip(whole_model.named_parameters(), model.parameters()):
            gradient = p_slice.grad.clone()
            dist.all_reduce(gradient, group=sequence.group)  # the group's gradient: its ranks' terms added
            worst["gradients"] = max(worst["gradients"], relative(gradient, p_whole.grad))
    return worst


def main() -> None:
    out_dir = Path(os.environ["OUT_DIR"])
    world = distributed.init(timeout_s=120)
    sequence = distributed.init_groups(2)
    torch.manual_seed(0)
    models = {
        "llama_gqa": lambda: tiny_model("llama"),  # 4 query heads, 2 key/value heads: 2 of each per rank
        "qwen2_one_kv_head": lambda: tiny_model("qwen2", num_key_value_heads=1),  # the one KV head replicated
        "stories260k": stories260k,
    }
    results = {}
    for name, build in models.items():
        batches = [story_pairs()[:3], story_pairs()[3:]] if name == "stories260k" else boundary_pairs()
        vocab = 97 if name != "stories260k" else 512
        for layout_name, layout in LAYOUTS.items():
            layout = dataclasses.replace(layout, chunk_size=7)  # several chunks per slice
            model = build().float().train()
            assert all(max(max(p.prompt_ids + p.chosen_ids + p.rejected_ids) for p in b) < vocab for b in batches)
            results[f"{name}/{layout_name}"] = compare(model, batches, layout, sequence)
    (out_dir / f"rank{world.rank}.json").write_text(json.dumps(results, indent=1))
    distributed.close()


if __name__ == "__main__":
    main()

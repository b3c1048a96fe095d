"""`dpo-scale` with test hooks, chosen by environment variables; run in place of the entry point (tests/launch.py).

DPO_SCALE_TEST_KILL_DURING_SAVE=N   SIGKILL this process while it writes the training state of checkpoint N
DPO_SCALE_TEST_NO_PICKLE=1          fail on torch.load without weights_only=True, on pickle.load, and on opening
                                    any .pt / .pkl / .pickle file
DPO_SCALE_TEST_NATIVE_SAVE=1        save checkpoints in DeepSpeed's own format, as runs did before portable ones
"""

import builtins
import io
import os
import pickle
import shutil
import signal
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from dpo_scale.cli import main
from dpo_scale.config import to_dict
from dpo_scale.io import atomic_open
from dpo_scale.training import checkpoint


def _kill_during_save(step: int) -> None:
    write = checkpoint.SafetensorsWriter.write

    def write_then_die(self, name, tensor):
        write(self, name, tensor)
        if f".step-{step:08d}.partial" in self._handle.name:
            self._handle.flush()  # half a file on disk, as a real kill would leave
            os.kill(os.getpid(), signal.SIGKILL)

    checkpoint.SafetensorsWriter.write = write_then_die


def _forbid_pickle() -> None:
    load, opener = torch.load, builtins.open

    def weights_only_load(*args, **kwargs):
        if kwargs.get("weights_only") is not True:
            raise AssertionError(f"torch.load without weights_only=True: {args[:1]}")
        return load(*args, **kwargs)

    def no_pickle_files(file, *args, **kwargs):
        if isinstance(file, (str, os.PathLike)) and Path(file).suffix in (".pt", ".pkl", ".pickle"):
            raise AssertionError(f"a pickle file was opened: {file}")
        return opener(file, *args, **kwargs)

    def no_unpickling(*args, **kwargs):
        raise AssertionError("pickle.load was called")

    torch.load = weights_only_load
    builtins.open = io.open = no_pickle_files
    pickle.load = no_unpickling


def _save_natively() -> None:
    """What `checkpoint.save` wrote before portable checkpoints (dpo_scale 0.1.0 up to issue 15)."""

    def save(engine, step, config, world):
        checkpoint._check_finite(engine, step)
        root = Path(config.run_dir) / "checkpoints"
        final, partial = root / f"step-{step:08d}", root / f".step-{step:08d}.partial"
        if world.is_main:
            shutil.rmtree(partial, ignore_errors=True)
            partial.mkdir(parents=True)
        torch.distributed.barrier()
        engine.save_checkpoint(str(partial / "ds"), tag=checkpoint.NATIVE_ENGINE_TAG, save_latest=False)
        torch.save({"rng": torch.get_rng_state()}, partial / f"rng-rank{world.rank}.pt")
        weights = engine._zero3_consolidated_16bit_state_dict()  # the hooks run ZeRO-3 only
        if world.is_main:
            save_file({k.removeprefix("model."): v.contiguous() for k, v in weights.items()}, partial / "model.safetensors")
            torch.save({"step": step, "config": to_dict(config)}, partial / checkpoint.NATIVE_STATE)
        torch.distributed.barrier()
        if world.is_main:
            partial.rename(final)
            with atomic_open(root / "latest") as handle:
                handle.write(final.name)
            checkpoint._prune(root, config.checkpoint)
        torch.distributed.barrier()
        return final

    checkpoint.save = save


if __name__ == "__main__":
    if os.environ.get("DPO_SCALE_TEST_KILL_DURING_SAVE"):
        _kill_during_save(int(os.environ["DPO_SCALE_TEST_KILL_DURING_SAVE"]))
    if os.environ.get("DPO_SCALE_TEST_NO_PICKLE"):
        _forbid_pickle()
    if os.environ.get("DPO_SCALE_TEST_NATIVE_SAVE"):
        _save_natively()
    status = main(sys.argv[1:])
    if os.environ.get("DPO_SCALE_TEST_NATIVE_SAVE"):
        # After DeepSpeed's own save_checkpoint a rank sometimes aborts in C++ teardown once everything is written
        # ("terminate called without an active exception", exit -6: 2 of 8 runs of the native test before issue 29,
        # 2 of 12 after): leave without running the interpreter's and the extensions' exit handlers
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status or 0)
    sys.exit(status)

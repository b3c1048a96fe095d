"""A build lock left by an interrupted DeepSpeed op build is reported, not waited on forever; a live build is waited for."""

import os
import subprocess
import sys
import threading
import time

import pytest

from dpo_scale import distributed
from dpo_scale.config import ConfigError


@pytest.fixture
def extensions(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    (tmp_path / "deepspeed_shm_comm").mkdir()
    return tmp_path


def _age(path, seconds):
    then = time.time() - seconds
    os.utime(path, (then, then))


def test_stale_lock_stops_with_the_file_and_the_fix(extensions):
    lock = extensions / "deepspeed_shm_comm" / "lock"
    lock.touch()
    _age(lock, distributed.BUILD_TAKES_AT_MOST_S + 60)
    message = rf"{lock} is left from a build of DeepSpeed's deepspeed_shm_comm op .* \(rm {lock}\)"
    with pytest.raises(ConfigError, match=message):
        distributed.wait_for_op_builds(0)


def test_a_build_in_progress_is_waited_for(extensions, capsys):
    """The lock is old but a live process holds it open (what torch's FileBaton does while it builds): wait until
    that process deletes it, saying what we wait for."""
    lock = extensions / "deepspeed_shm_comm" / "lock"
    holder = subprocess.Popen([sys.executable, "-c", (
        "import os, sys, time; fd = os.open(sys.argv[1], os.O_CREAT | os.O_EXCL); print('held', flush=True); "
        "time.sleep(3); os.close(fd); os.remove(sys.argv[1])"
    ), str(lock)], stdout=subprocess.PIPE, text=True)  # fmt: skip
    assert holder.stdout.readline().strip() == "held"
    _age(lock, distributed.BUILD_TAKES_AT_MOST_S + 60)
    distributed.wait_for_op_builds(0)
    assert holder.wait(timeout=30) == 0 and not lock.exists()
    assert f"rank 0: waiting for a build of DeepSpeed's deepspeed_shm_comm op to finish ({lock}" in capsys.readouterr().out


def test_a_young_lock_is_waited_for_even_without_a_holder_here(extensions):
    """Another node sharing the directory may hold it: a lock younger than a build could take is waited for."""
    lock = extensions / "deepspeed_shm_comm" / "lock"
    lock.touch()
    threading.Timer(2, lock.unlink).start()
    distributed.wait_for_op_builds(0)
    assert not lock.exists()

"""The glibc setting that lets freed activation-sized blocks leave the process, counted in resident bytes.

Each case runs in a fresh interpreter: malloc's state is per process and the setting cannot be undone."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from dpo_scale.host_memory import USER_SETTINGS, return_freed_blocks_to_the_os

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc: Linux only")

# A 8 MiB block freed (glibc then raises its mmap threshold to 8 MiB), then sixteen 4 MiB blocks, each followed by a
# small block that stays alive above it on the heap, then the 4 MiB blocks freed: the shape of a training step's
# activations among longer-lived small objects. Prints the MiB that left the process's resident set.
FRAGMENT_THEN_FREE = textwrap.dedent("""
    import os, sys
    import torch
    from dpo_scale.host_memory import return_freed_blocks_to_the_os

    def resident_mib():
        return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

    print(return_freed_blocks_to_the_os() if sys.argv[1] == "pinned" else None)
    first = torch.ones(8 << 20, dtype=torch.uint8)
    del first
    blocks, small = [], []
    for _ in range(16):
        blocks.append(torch.ones(4 << 20, dtype=torch.uint8))
        small.append(torch.ones(16 << 10, dtype=torch.uint8))
    before = resident_mib()
    del blocks
    print(before - resident_mib())
""")


def _released_mib(mode: str, **env: str) -> tuple[str, float]:
    import os

    result = subprocess.run([sys.executable, "-c", FRAGMENT_THEN_FREE, mode], env={**os.environ, **env},
                            capture_output=True, text=True, timeout=120, check=True)  # fmt: skip
    was_set, released = result.stdout.split()
    return was_set, float(released)


def test_pinned_threshold_returns_freed_blocks_that_the_default_keeps():
    """64 MiB freed: glibc's default keeps nearly all of it (the blocks came from the heap, under live ones); with
    the threshold pinned every block had its own mapping and leaves. Margins of 8 MiB absorb page-table noise."""
    _, default_released = _released_mib("default")
    was_set, pinned_released = _released_mib("pinned")
    assert was_set == "True"
    assert default_released < 8
    assert pinned_released > 64 - 8


@pytest.mark.parametrize("name", USER_SETTINGS)
def test_a_users_malloc_environment_setting_stands(monkeypatch, name):
    """glibc has read MALLOC_*_ at start-up; a user who tuned malloc that way keeps exactly what they asked for."""
    monkeypatch.setenv(name, "1048576")
    assert return_freed_blocks_to_the_os() is False

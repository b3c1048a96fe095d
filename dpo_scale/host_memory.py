"""Keep a CPU process's resident memory at what its live tensors need (Linux, glibc malloc).

glibc serves a block of more than M_MMAP_THRESHOLD bytes with its own mmap and unmaps it on free, but every time
such a block is freed it raises that threshold to the block's size (up to 32 MiB). From then on blocks of a few MiB
come from the heap, where a freed block that sits below a live one cannot be given back. DPO batches change shape
every step, so activations of ever-different sizes fragment the heap and the process's resident memory creeps up
step after step (16M-parameter Llama on CPU: +110 MiB over 23 steps, BENCHMARKS.md). Pinning the threshold keeps
large blocks on their own mappings, returned on free, as glibc does before its first adjustment.

The cost is a page fault per page of each new large block instead of reusing heap pages; the benchmark measures it.
"""

from __future__ import annotations

import ctypes
import os
import sys

M_MMAP_THRESHOLD = -3  # mallopt parameter number, from glibc's malloc.h
MMAP_THRESHOLD_BYTES = 1 << 20
"""Blocks from 1 MiB up get their own mapping: every activation and chunk buffer, none of the small objects."""

USER_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_", "MALLOC_MMAP_MAX_")


def return_freed_blocks_to_the_os() -> bool:
    """Pin glibc's mmap threshold for this process; True if it was set. Nothing happens off Linux/glibc, or when the
    user has tuned malloc through its MALLOC_*_ environment variables (their setting stands)."""
    if not sys.platform.startswith("linux") or any(name in os.environ for name in USER_SETTINGS):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES))
    except (OSError, AttributeError):  # another C library (musl): it has its own allocator and no mallopt
        return False

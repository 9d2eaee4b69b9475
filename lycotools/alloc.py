"""Keep glibc from returning large freed blocks to the OS between tensors.

Streaming a checkpoint allocates and frees one tensor after another. glibc serves allocations over
its mmap threshold with fresh mappings and unmaps them on free, so every tensor's pages are faulted
in again (zero-filled by the kernel): on a 2 GB bake that kernel work was half the run time.
Raising the mmap and trim thresholds makes freed tensor memory reusable from the heap: the bake of
an SD1.5-sized checkpoint went from ~10 s to ~5.5 s, with peak RSS ~850 MB -> ~1050 MB
(bench/merge.py). The CLI calls this once at start; library users may call it themselves.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import sys
import threading

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_LIMIT = 512 * 1024 * 1024


def tune_allocator() -> bool:
    """Raise glibc's mmap/trim thresholds (512 MiB). Returns whether it took effect (Linux glibc only)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        ok = libc.mallopt(_M_MMAP_THRESHOLD, _LIMIT) == 1
        ok = libc.mallopt(_M_TRIM_THRESHOLD, _LIMIT) == 1 and ok
        return ok
    except (OSError, AttributeError):
        return False


_stream_lock = threading.Lock()
_streams = 0  # streams running now (batch jobs run several in threads)
_saved: tuple[int, bool] | None = None  # torch threads and GC state before the first of them


@contextlib.contextmanager
def streaming_threads(io_threads: int = 2):
    """For a tensor-by-tensor stream whose reading, writing and hashing run in ``io_threads`` threads
    of their own: give torch's math the remaining cores, and pause Python's cyclic GC.

    torch's OpenMP workers spin for a while after each op; with as many of them as cores they took
    a fifth of the CPU of a 2-core bake from the writer and hasher threads. The GC pass, triggered by
    the many small objects a stream allocates, walked the large heap of key maps each time (~4%).
    Both are process-wide: the first stream to start changes them, the last to end restores them."""
    import gc

    import torch

    global _streams, _saved
    with _stream_lock:
        if _streams == 0:
            _saved = (torch.get_num_threads(), gc.isenabled())
            cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
            torch.set_num_threads(max(1, min(_saved[0], cores - io_threads)))
            gc.disable()
        _streams += 1
    try:
        yield
    finally:
        with _stream_lock:
            _streams -= 1
            if _streams == 0 and _saved is not None:
                torch.set_num_threads(_saved[0])
                if _saved[1]:
                    gc.enable()
                _saved = None

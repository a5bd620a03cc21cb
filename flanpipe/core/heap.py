"""How glibc's allocator treats a process's large tensors: kept for reuse (training, scoring) or given back
(a converter's peak memory).

torch allocates CPU tensors with plain ``malloc``. glibc serves a large request (above a threshold that
starts at 128 KiB and rises to at most 32 MiB) with a fresh ``mmap`` and unmaps it on ``free``, and it
trims the heap's top once more than twice that threshold lies free there. A training step frees
nearly everything it allocated (activations, their gradients, the logits) and allocates it again the
next step, so without these settings every step asks the kernel for new zeroed pages: on the
Llama-shaped bench model (``flanpipe bench train --peer``, 8 x 256 tokens, 1 thread, load 4-13),
41,000-47,000 minor page faults per step, 4 KiB each = ~160-190 MiB of pages zeroed per step, and
0.04-0.3 s of a 0.7-1.0 s step in the kernel. ``keep_freed_memory`` keeps freed memory in the heap for the
next step: 1-3 faults per step. Both settings are process-wide and only change where memory comes from,
never what is computed. A no-op where the C library is not glibc.

This module imports nothing heavy (no torch): any layer may use it.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools

# malloc.h's mallopt parameter numbers
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
M_MMAP_MAX = -4

DEFAULT_MMAP_MAX = 65536  # glibc's default: mappings allowed (undoes keep_freed_memory's 0)
KEEP_TRIM_THRESHOLD = 2**31 - 1  # mallopt takes a C int: trim only past 2 GiB free at the heap's top


@functools.cache
def _libc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt  # noqa: B018 (glibc only: musl and macOS have no mallopt)
    except (OSError, AttributeError):
        return None
    return libc


def mallopt(param: int, value: int) -> bool:
    """glibc's ``mallopt(param, value)``; False where it is missing or refuses the value."""
    libc = _libc()
    return bool(libc is not None and libc.mallopt(param, value) == 1)


def keep_freed_memory() -> bool:
    """Serve every allocation from the heap and never trim it (training and scoring processes).

    ``M_MMAP_MAX = 0``: no allocation gets its own mapping, so the 32 MiB logits of a 2,048-token
    micro-batch at vocabulary 4,096 (2,048 x 4,096 x 4 bytes, just above glibc's largest threshold)
    are reused too. ``M_TRIM_THRESHOLD`` at its maximum: freed memory stays mapped for the next
    step. The price: the process keeps its peak heap until it exits (a training job's peak is its
    steady state anyway). Returns whether both settings took.
    """
    return mallopt(M_MMAP_MAX, 0) & mallopt(M_TRIM_THRESHOLD, KEEP_TRIM_THRESHOLD)


def return_large_frees_to_the_os() -> bool:
    """Fix glibc's mmap threshold at 1 MiB (a converter that holds one tensor at a time).

    Every tensor of 1 MiB or more then lives in its own mapping and goes back to the OS when freed.
    Left dynamic, glibc raises the threshold after each freed mapping (up to 32 MiB), so chunks of a
    few MB to 32 MB land in the heap, which only shrinks from its top: the 2 GiB bench import held
    0.44 GiB beyond the interpreter that way, 0.25 GiB with the threshold fixed.
    """
    return mallopt(M_MMAP_MAX, DEFAULT_MMAP_MAX) & mallopt(M_MMAP_THRESHOLD, 1 << 20)

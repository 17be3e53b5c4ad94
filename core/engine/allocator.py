"""How the C allocator treats tensor-sized blocks during training (glibc on Linux only).

glibc serves every block above its mmap threshold (which it adapts, up to 32 MiB) with a fresh
``mmap`` and unmaps it again on ``free``, and it returns free memory at the top of its heap to
the OS. Training allocates and frees the same large activations every step, so each step
page-faults them back in, zero-filled, 4 KiB at a time. On the 2-core benchmark machine that
was close to half of a SASRec step on Beauty (10.0k → 18.4k samples/s once memory is kept) and
about 7 % of a DeepFM step on Frappe; see ``benchmarks/peers/README.md``. PyTorch's CPU tuning
guide reaches the same end by preloading jemalloc or tcmalloc; this needs no extra library.

The price is that freed memory stays with the process (SASRec's peak RSS: 0.99 → 1.21 GB).
``REX_MALLOC=system`` keeps glibc's defaults.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

from rex.config.errors import RexError

ENV_VAR = "REX_MALLOC"
# mallopt(3) parameter numbers from <malloc.h>.
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
# Free memory at the top of the heap is handed back to the OS only beyond this much.
KEEP_FREE_BYTES = 1 << 30

_applied: str | None = None


def reuse_freed_memory() -> str:
    """Make malloc keep freed blocks for reuse (training calls this first); returns the policy.

    ``"reuse"`` once applied (every block from the heap, trimmed only beyond 1 GiB free),
    ``"system"`` when ``REX_MALLOC=system`` asks for the defaults or the C library is not glibc.
    Applying it twice is harmless; the first answer sticks for the process.
    """
    global _applied
    if _applied is not None:
        return _applied
    wanted = os.environ.get(ENV_VAR, "reuse").strip().lower()
    if wanted not in ("reuse", "system"):
        raise RexError(f"{ENV_VAR} must be 'reuse' or 'system', got {wanted!r}; unset it for the default")
    _applied = "system"
    if wanted == "reuse" and sys.platform.startswith("linux"):
        libc = _glibc()
        if (
            libc is not None
            and libc.mallopt(_M_MMAP_MAX, 0)
            and libc.mallopt(_M_TRIM_THRESHOLD, KEEP_FREE_BYTES)
        ):
            _applied = "reuse"
    return _applied


def malloc_policy() -> str:
    """The policy in force: ``"reuse"`` once :func:`reuse_freed_memory` applied it, else ``"system"``."""
    return _applied or "system"


def _glibc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        libc = ctypes.CDLL(name)
    except OSError:
        return None
    # musl and other C libraries have no mallopt, or one that ignores these parameters.
    if not hasattr(libc, "mallopt") or not hasattr(libc, "gnu_get_libc_version"):
        return None
    libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    libc.mallopt.restype = ctypes.c_int
    return libc


def available_memory() -> int | None:
    """Bytes of memory the system can still give (Linux's MemAvailable: free plus reclaimable
    cache), or free pages elsewhere; None where neither is known."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None

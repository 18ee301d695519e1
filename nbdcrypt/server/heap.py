"""Keep the C heap from shrinking and regrowing under every large request.

Each large request allocates and frees a buffer of its size (a read's data, a write's
ciphertext). With glibc's defaults, freeing the top of the heap gives the memory back to the
kernel (brk) and the next request takes it again, page-faulting and zeroing every page: that
cost about as much CPU as the request itself (1 GiB of 256 KiB reads: 1.05 s of CPU before, 0.59 s
after, nbdkit 0.67 s). Here freed memory stays in the heap, up to TRIM_THRESHOLD, for reuse.
What the server holds is bounded anyway by the per-connection cap on bytes in flight.

Connection threads (`io: threads`) would each get a malloc arena of their own, and each arena
keeps its own TRIM_THRESHOLD of freed memory: every thread allocates under the server lock or
the GIL anyway, so one arena serves them all and the bound stays one threshold.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import platform

log = logging.getLogger("nbdcrypt.heap")

_M_TRIM_THRESHOLD = -1  # glibc <malloc.h>
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8
TRIM_THRESHOLD = 256 * 1024 * 1024  # free heap kept before glibc gives memory back
MMAP_THRESHOLD = 64 * 1024 * 1024  # allocations this large get their own mapping (> MAX_PAYLOAD)


def keep_freed_memory() -> bool:
    """Tune glibc's malloc for the server's allocation pattern; False where it is not glibc."""
    if platform.libc_ver()[0] != "glibc":
        return False
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    libc = ctypes.CDLL(name)
    ok = (
        bool(libc.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))
        and bool(libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD))
        and bool(libc.mallopt(_M_ARENA_MAX, 1))
    )
    if not ok:
        log.debug("mallopt refused the heap thresholds; keeping glibc's defaults")
    return ok

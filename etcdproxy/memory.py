"""Memory the proxy frees goes back to the system.

glibc's malloc serves a large block from mmap (returned to the system when
freed) only above a threshold that it raises to the size of each such block
freed, up to 32 MiB: after a burst of large answers (a client that stalled
big ranges), later ones come from the heap, which keeps its peak size for
good. A fixed threshold keeps large buffers on mmap, so the proxy's memory
returns to its baseline once they are freed.
"""

import ctypes
import ctypes.util

M_MMAP_THRESHOLD = -3
LARGE_BLOCK = 128 * 1024  # glibc's initial threshold


def keep_large_blocks_returnable():
    """Fixes glibc's mmap threshold; False where there is no glibc."""
    name = ctypes.util.find_library("c")
    if not name:
        return False
    try:
        mallopt = ctypes.CDLL(name).mallopt
    except (OSError, AttributeError):
        return False  # not glibc (musl has no mallopt)
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    return mallopt(M_MMAP_THRESHOLD, LARGE_BLOCK) == 1

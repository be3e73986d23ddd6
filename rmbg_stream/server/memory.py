"""The server's process memory: glibc malloc settings, and handing freed memory back to the system.

Frames and the tensors made from them are large (a 1080p frame is 6 MB as RGB, 25 MB as float) and are allocated
and freed on many threads: the engine's, the executor's decoders and encoders, aiortc's codec threads. glibc gives
threads their own arenas (up to 8 per core) and, after a large block is freed, raises its mmap threshold up to
32 MB, so later frames come from those arenas rather than fresh mappings; freed blocks in the middle of an arena are
never returned. RSS then climbs with every burst of traffic and stays up after the clients are gone. Measured with
`scripts/flood.py` (see `tune` and `trim`). Elsewhere than glibc both are no-ops.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os

log = logging.getLogger(__name__)

# mallopt parameter, from glibc's malloc.h.
M_ARENA_MAX = -8
# Arenas for the whole process (glibc's default: 8 per core). Two cost nothing measurable on the engine's path
# (640x480 and 1080p frames through the chroma engine, tens of runs on two cores).
ARENA_MAX = 2


def _glibc():
    if os.name != "posix":
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None
    # musl and others have no malloc_trim / mallopt with these meanings.
    if not (hasattr(libc, "gnu_get_libc_version") and hasattr(libc, "malloc_trim") and hasattr(libc, "mallopt")):
        return None
    return libc


_LIBC = _glibc()


def tune() -> bool:
    """Caps the malloc arenas (call it before the threads start); False where malloc is not glibc's.

    The mmap threshold stays dynamic: fixing it (M_MMAP_THRESHOLD or M_TRIM_THRESHOLD, 128 kB to 16 MB) made every
    large tensor a fresh mapping, and 640x480 frames through the chroma engine 2-3x slower (20-27 -> 55-78 ms).
    `trim` hands back what the bursts leave behind instead.
    """
    if _LIBC is None:
        return False
    if _LIBC.mallopt(M_ARENA_MAX, ARENA_MAX) != 1:
        log.warning("mallopt refused M_ARENA_MAX: memory may not be handed back after bursts of traffic")
        return False
    return True


def trim() -> bool:
    """Hands free memory in every arena back to the system (it blocks malloc briefly: run it off the loop)."""
    return _LIBC is not None and bool(_LIBC.malloc_trim(0))

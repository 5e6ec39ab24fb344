"""The peak memory of a run, for summary.json (``peak_rss_bytes``, and ``peak_gpu_bytes`` on a GPU).

    reset_peak_memory()        # when the run starts
    ...                        # build, train, test
    peak_memory()              # {"peak_rss_bytes": ..., "peak_gpu_bytes": ...}

The resident-set peak is the process's (``getrusage``'s ``ru_maxrss``). Runs that share a
process (a sweep, a comparison) would each see the largest before them, so on Linux the peak is
reset when a run starts (writing ``5`` to ``/proc/self/clear_refs``): it then counts what the
process held at that moment and what the run added. Where the reset is refused, or on another
system, the figure is the process's peak so far. Before the reset, what earlier runs freed is
handed back to the system (``malloc_trim``, glibc), so that it counts neither in the next
run's peak nor hides what that run adds. The GPU figure is torch's, whose peak counter resets
cleanly.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import resource
import sys
from pathlib import Path

CLEAR_REFS = Path("/proc/self/clear_refs")
RESET_PEAK_RSS = "5"  # proc(5): "reset the peak resident set size" (Linux 4.0)


def reset_peak_memory() -> None:
    """Start counting the peaks from now (best effort for the resident set)."""
    release_freed_memory()
    try:
        CLEAR_REFS.write_text(RESET_PEAK_RSS)
    except OSError:  # not Linux, or /proc read-only: the process's own peak it is
        pass
    torch = sys.modules.get("torch")  # a run that never loaded torch used no GPU
    if torch is not None and torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def release_freed_memory() -> None:
    """Collect garbage and return the C heap's free pages to the system (glibc only)."""
    gc.collect()
    name = ctypes.util.find_library("c")
    try:
        ctypes.CDLL(name).malloc_trim(0)
    except (OSError, AttributeError, TypeError):  # not glibc: its heap stays as it is
        pass


def peak_rss_bytes() -> int:
    """The peak resident set size in bytes (``ru_maxrss`` is KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def resident_bytes() -> int | None:
    """The resident set size now (Linux's ``/proc/self/statm``); None elsewhere."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, IndexError, ValueError):
        return None
    return pages * resource.getpagesize()


def peak_memory() -> dict[str, int]:
    """The peaks since `reset_peak_memory`: resident set, and GPU memory torch allocated."""
    peaks = {"peak_rss_bytes": peak_rss_bytes()}
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        peaks["peak_gpu_bytes"] = int(torch.cuda.max_memory_allocated())
    return peaks

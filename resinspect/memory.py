"""Peak memory of one phase of a run (a plugin's analysis), so that the report can say what each cost.

The process's resident-set high-water mark (``VmHWM``) is reset through ``/proc/self/clear_refs`` (Linux) at
the start of a phase and read at its end; where that is not possible (other systems) the peak is the whole
process's so far, and says so. On CUDA, torch's own peak-allocation counters are used the same way.
"""

from __future__ import annotations

import resource
import sys
from pathlib import Path

import torch

__all__ = ["reset_peak", "peak_rss_mb", "overall_peak_rss_mb", "peak_cuda_mb", "PEAK_IS_PER_PHASE"]


def _can_reset() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return Path("/proc/self/status").is_file()


PEAK_IS_PER_PHASE = sys.platform.startswith("linux") and _can_reset()


_overall = [0.0]  # the process's peak before the last reset (the reset also clears getrusage's maxrss)


def _trim() -> None:
    """Give freed heap memory back to the system (glibc), so that a phase's peak is not an earlier one's
    leftover."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def reset_peak() -> None:
    """Start measuring a phase: the resident-set high-water mark (and CUDA's peak) set to what is used now."""
    if PEAK_IS_PER_PHASE:
        _overall[0] = max(_overall[0], peak_rss_mb())
        _trim()
        try:
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            pass
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.reset_peak_memory_stats()


def peak_rss_mb() -> float:
    """The process's peak resident memory in MiB since :func:`reset_peak` (since it started where the mark
    cannot be reset)."""
    if PEAK_IS_PER_PHASE:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 1024**2 if sys.platform == "darwin" else peak / 1024  # bytes on macOS, KiB on Linux


def overall_peak_rss_mb() -> float:
    """The process's peak resident memory in MiB since it started, across every phase measured."""
    return max(_overall[0], peak_rss_mb())


def peak_cuda_mb() -> float | None:
    """Peak CUDA memory allocated by torch in MiB since :func:`reset_peak`; None without CUDA in use."""
    if not (torch.cuda.is_available() and torch.cuda.is_initialized()):
        return None
    return torch.cuda.max_memory_allocated() / 1024**2

"""Timing helper shared by the benchmarks: run competing functions alternately, in one process."""

from __future__ import annotations

import time
from typing import Any, Callable


def alternate(fns: dict[str, Callable[[], Any]], repeats: int) -> tuple[dict[str, list[float]], dict[str, Any]]:
    """Call each function ``repeats`` times, swapping which goes first every round so that a drift of the
    machine falls on all of them alike. Returns the wall times per name and each function's last result."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    last: dict[str, Any] = {}
    order = list(fns)
    for i in range(repeats):
        for name in (order if i % 2 == 0 else order[::-1]):
            t = time.perf_counter()
            last[name] = fns[name]()
            times[name].append(time.perf_counter() - t)
    return times, last

"""The timing loop the algorithm benchmarks share (not a benchmark itself)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any


def round_robin_medians(
    built: dict[str, Any], next_batch: Callable[[int], Any], steps: int, warmup: int
) -> dict[str, float]:
    """Median seconds per ``update`` of each algorithm in ``built`` (name -> algorithm).

    Every step draws one batch with ``next_batch(step)`` and gives it to every algorithm,
    in an order rotated each step so that machine noise falls on all of them alike; the
    first ``warmup`` steps are not timed.
    """
    names = list(built)
    times: dict[str, list[float]] = {name: [] for name in names}
    for step in range(warmup + steps):
        batch = next_batch(step)
        for name in names[step % len(names) :] + names[: step % len(names)]:
            start = time.perf_counter()
            built[name].update(batch)
            if step >= warmup:
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}

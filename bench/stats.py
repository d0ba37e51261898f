"""Percentiles and timing helpers shared by every measurement."""

from __future__ import annotations

import time
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Latency:
    n: int
    p50_ms: float
    p99_ms: float
    max_ms: float

    @classmethod
    def of(cls, samples_s: list[float]) -> Latency:
        xs = sorted(samples_s)
        if not xs:
            return cls(0, float("nan"), float("nan"), float("nan"))

        def pct(p: float) -> float:
            return xs[min(len(xs) - 1, int(p * len(xs)))] * 1000

        return cls(len(xs), pct(0.50), pct(0.99), xs[-1] * 1000)


def now() -> float:
    return time.perf_counter()

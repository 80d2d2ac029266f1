"""`--benchmark-timer gxpo_bench.suites.timer.machine_units`: time in units of this machine's speed (a copy
and a matmul, measured when the timer is first imported), so that a baseline saved on one CPU compares with
a run on another as ratios, not absolute seconds (make bench-compare)."""

import statistics
import time

import torch


def _unit_seconds() -> float:
    a, src = torch.randn(256, 256), torch.randn(1 << 22)
    dst = torch.empty_like(src)
    times = []
    for _ in range(7):
        t0 = time.perf_counter()
        dst.copy_(src)
        a @ a
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


UNIT_S = _unit_seconds()


def machine_units() -> float:
    return time.perf_counter() / UNIT_S

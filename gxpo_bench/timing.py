"""Timing and the two ceilings. Each repetition gets fresh inputs from setup() (untimed), so caches
never hold the inputs; CUDA regions are timed with events after a warm-up; the median is reported."""

import statistics
import time

import torch


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(fn, setup, device, reps: int, warmup: int = 2) -> dict:
    """fn(*setup()) timed reps times: median and IQR in seconds, and on CUDA the peak memory fn
    allocated beyond its inputs."""
    for _ in range(warmup):
        fn(*setup())
    times, peak = [], 0
    for _ in range(reps):
        args = setup()
        sync(device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn(*args)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
            peak = max(peak, torch.cuda.max_memory_allocated(device) - base)
        else:
            t0 = time.perf_counter()
            fn(*args)
            times.append(time.perf_counter() - t0)
        del args
    q = statistics.quantiles(times, n=4) if len(times) > 1 else [times[0]] * 3
    return {"median_s": statistics.median(times), "iqr_s": q[2] - q[0],
            "peak_mib": peak / 2**20 if device.type == "cuda" else None}


def copy_bandwidth(device, nbytes: int, reps: int) -> float:
    """Bytes per second of a large device-to-device copy, counting bytes read plus bytes written."""
    src = torch.randn(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    t = measure(lambda: dst.copy_(src), lambda: (), device, reps)["median_s"]
    return 2 * nbytes / t


def matmul_rate(device, dtype, n: int, reps: int) -> float:
    """FLOP/s of an n x n x n matrix product in dtype on random data."""
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    t = measure(lambda: a @ b, lambda: (), device, reps)["median_s"]
    return 2 * n**3 / t


def ceilings(device, dtype, fast: bool) -> dict:
    cuda = device.type == "cuda"
    nbytes = (1 << 30 if fast else 1 << 32) if cuda else 1 << 26  # well past the last-level cache
    n = (8192 if cuda else 1024) // (2 if fast else 1)
    reps = 5 if fast else 20
    return {"copy_bytes_per_s": copy_bandwidth(device, nbytes, reps),
            "matmul_flops_per_s": matmul_rate(device, dtype, n, reps),
            "copy_bytes": nbytes, "matmul_n": n, "matmul_dtype": str(dtype).removeprefix("torch.")}

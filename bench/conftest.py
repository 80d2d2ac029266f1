import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
CUDA = torch.cuda.is_available()


@pytest.fixture
def measure(benchmark):
    """Time fn(*setup()) with fresh inputs each round (setup untimed); on CUDA, synchronized, and
    record the peak memory fn allocated beyond its inputs."""
    peak = [0]

    def run(fn, setup, rounds=None):
        def timed(*args):
            base = torch.cuda.memory_allocated() if CUDA else 0
            fn(*args)
            if CUDA:
                torch.cuda.synchronize()
                peak[0] = max(peak[0], torch.cuda.max_memory_allocated() - base)

        def fresh():
            args = setup()
            if CUDA:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            return args, {}

        benchmark.pedantic(timed, setup=fresh, rounds=rounds or (10 if CUDA else 5), warmup_rounds=2)
        benchmark.extra_info["device"] = torch.cuda.get_device_name() if CUDA else "cpu"
        if CUDA:
            benchmark.extra_info["peak_extra_mib"] = round(peak[0] / 2**20, 1)

    return run

"""The tiled LM-head kernels, compiled for sm_90 as the GPU runs them, form every row offset in int64:
rows * stride_h, cols * stride_w and cols * H pass 2^31 at a 262k vocabulary and H = 8192."""

import subprocess
import sys
from pathlib import Path

from helpers import uninterpreted_env

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = """
from gxpo_bench import sass, static
with static.sm90_target():
    for launch in static.tiled_launches():
        kernel = launch.fn.warmup(*launch.args, grid=launch.grid, **launch.kwargs)
        print(launch.name, len(sass.int32_tensor_products(kernel.asm["ttgir"])))
"""


def test_no_int32_tensor_products_in_the_tiled_kernels():
    proc = subprocess.run([sys.executable, "-c", SCRIPT], env=uninterpreted_env(TRITON_DEFAULT_FP_FUSION="1"),
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    counts = dict(line.split() for line in proc.stdout.splitlines())
    assert set(counts) == {"_lm_head_fwd_kernel", "_lm_head_bwd_kernel"}, proc.stdout
    assert all(n == "0" for n in counts.values()), counts

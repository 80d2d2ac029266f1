"""The per-launch time model's readings of SASS and its wave arithmetic, on hand-made inputs (no compile)."""

import pytest

from gxpo_bench import kernel_time, sass
from gxpo_kernels.devices import H100_SXM

HGMMA_SS = "/*0a10*/                   HGMMA.64x128x16.F32.BF16 R24, gdesc[UR8], R24 ;"
HGMMA_RS = "/*0a20*/                   HGMMA.64x64x16.F32.BF16 R24, R120, gdesc[UR8], R24 ;"
HMMA = "/*0a30*/                   HMMA.16816.F32.BF16 R4, R8, R12, R4 ;"


@pytest.mark.parametrize("line, flops, smem", [
    (HGMMA_SS, 2 * 64 * 128 * 16 / 4, 2 * (64 * 16 + 128 * 16) / 4),  # both operands through descriptors
    (HGMMA_RS, 2 * 64 * 64 * 16 / 4, 2 * 64 * 16 / 4),  # A from registers: only B from shared memory
    (HMMA, 2 * 16 * 8 * 16, 0),
    ("/*0a40*/                   FFMA R1, R2, R3, R4 ;", 0, 0),
])
def test_tensor_core_instructions_give_their_flops_and_operand_bytes(line, flops, smem):
    [(_, op, args)] = sass.sass_instructions(line)
    assert sass.mma_flops_per_warp(op, args) == flops
    assert sass.mma_smem_bytes_per_warp(op, args) == smem


def test_a_partial_last_wave_lowers_the_busy_share():
    slots = H100_SXM.sms * 8
    assert kernel_time.wave_efficiency(H100_SXM, slots, 8) == (1, 1.0)
    waves, busy = kernel_time.wave_efficiency(H100_SXM, slots + 1, 8)
    assert waves == 2 and busy == pytest.approx((slots + 1) / (2 * slots))


def _row(**over):
    loop = {"instrs": 100, "mufu": 2, "mma_flops_per_warp": 0.0, "mma_smem_bytes_per_warp": 0.0}
    row = {"kernel": "k", "hot_loops": [loop], "hot_loop": 0, "outside_loops": dict(loop), "threads": 128,
           "num_warps": 4, "hot_loop_elems": 1024, "bytes_per_elem": 8.0, "atomic_bytes_per_elem": 0.0,
           "ctas_per_sm": 8, "program_bytes": {"load": 0, "store": 0}, "atomic_bytes_per_program": 0}
    return {**row, **over}


def test_a_streaming_launch_takes_the_largest_resource_time():
    elements = 1e9
    t = kernel_time.streaming(H100_SXM, _row(), elements, programs=10 ** 6)
    hbm_ms = 8.0 * elements / (H100_SXM.hbm_bytes_per_s * H100_SXM.hbm_efficiency) * 1e3
    assert t["bound"] == "hbm" and t["resource_ms"]["hbm"] == pytest.approx(hbm_ms / t["wave_efficiency"])
    assert t["ms"] == max(t["resource_ms"].values()) and set(t["resource_ms"]) == set(kernel_time.RESOURCES)
    heavy = _row(hot_loops=[{"instrs": 4000, "mufu": 2, "mma_flops_per_warp": 0.0, "mma_smem_bytes_per_warp": 0.0}])
    assert kernel_time.streaming(H100_SXM, heavy, elements, programs=10 ** 6)["bound"] == "issue"

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


PIPELINED_TTGIR = """
  tt.func public @k(%p: !tt.ptr<bf16>) {
    %a0 = ttg.async_copy_global_to_local %p0, %s0 : tensor<64x32x!tt.ptr<bf16>, #blocked1> -> <64x32xbf16, #shared>
    %r:2 = scf.for %i = %c0_i32 to %n step %c1_i32 iter_args(%x = %y) -> (tensor<64x32xf32, #mma>) {
      %a1 = ttg.async_copy_global_to_local %p1, %s1 : tensor<64x32x!tt.ptr<bf16>, #blocked1> -> <64x32xbf16, #shared>
      scf.yield %x : tensor<64x32xf32, #mma>
    }
    %q:1 = scf.for %j = %c0_i32 to %n2 step %c1_i32 iter_args(%z = %w) -> (tensor<128x!tt.ptr<f32>, #blocked>) {
      scf.while : () -> () {
        scf.condition(%spin)
      } do {
        scf.yield
      }
      %v = tt.load %z : tensor<128x!tt.ptr<f32>, #blocked>
      tt.store %z, %v : tensor<128x!tt.ptr<f32>, #blocked>
      scf.yield %z : tensor<128x!tt.ptr<f32>, #blocked>
    }
    tt.return
  }
"""


def test_ttgir_bytes_count_async_copies_once_per_trip_and_each_loop_its_own_trips():
    """The pipeliner's copy hoisted ahead of its loop is the loop's first iteration, not extra bytes; a lock's
    while loop ("} do {") does not close the loop around it; run-time loops take their own trip counts."""
    from gxpo_bench import sass

    program = sass.program_bytes(PIPELINED_TTGIR, [10, 3])
    assert program["max"] == {"load": 10 * 64 * 32 * 2 + 3 * 128 * 4, "store": 3 * 128 * 4}
    assert sass.program_bytes(PIPELINED_TTGIR, 2)["max"]["load"] == 2 * (64 * 32 * 2 + 128 * 4)


def test_a_spin_loop_runs_once_per_trip_of_the_loop_around_it():
    from gxpo_bench.kernel_time import loop_trips

    row = {"kernel": "k", "loop_tree": [{"depth": 0, "spin": False}, {"depth": 0, "spin": False},
                                        {"depth": 1, "spin": True}, {"depth": 0, "spin": True}]}
    assert loop_trips(row, [72, 36]) == [72, 36, 36, 1]
    with pytest.raises(AssertionError):
        loop_trips(row, [72, 36, 5])


def test_beside_pairs_each_kernel_row_with_the_same_row_of_another_report():
    from gxpo_bench import static

    def row(impl, config, regs, ms):
        return {"impl": impl, "kernel": "k", "config": config, "regs": regs, "spill_bytes": 0, "ctas_per_sm": 4,
                "hot_loop_instrs_per_elem": [1.5], "time": {"ms": ms}}
    mine = {"triton": "3.9.0", "kernels": [row("ours", "A=1", 40, 1.0), row("ours", "A=2", 48, 2.0)]}
    other = {"triton": "3.6.0", "kernels": [row("ours", "A=2", 56, 2.5)]}
    mine["beside"] = static.beside(mine, other, "other.json")
    assert [r["theirs"] and r["theirs"]["regs"] for r in mine["beside"]["rows"]] == [None, 56]
    table = static._beside_markdown(mine)
    assert table[0] == "## Kernels under Triton 3.9.0 and Triton 3.6.0"
    assert "| ours | k | A=2 | 48 / 56 | 0 / 0 | 4 / 4 | 1.5 / 1.5 | 2 / 2.5 |" in table
    assert "| ours | k | A=1 | 40 / - |" in table[-3]

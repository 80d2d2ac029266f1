"""Modelled time of one launch of a compiled kernel (a row of `gxpo-bench static`) at a reference size: the
largest of its resource times, each reported, over the busy share of its last wave of programs.

Streaming kernels (the loss rows, the flat ops, CAPO) are read per element of their hot loop: its warp
instructions (issue), MUFU ops and the bytes and atomics of the program's TTGIR per element. Tile kernels
(tensor cores in their innermost loops: the tiled LM-head kernels) are read per tile: the instructions outside
the innermost loops once, each innermost loop once per H-chunk; their tensor-core FLOPs and shared-memory
operand bytes come from the HGMMA shapes in the SASS. A model of the chip, not a timing."""

import math

from gxpo_kernels.devices import DeviceProfile
from gxpo_kernels.loss.lm_head_cost import Step, matmul_peak

RESOURCES = ("hbm", "l2", "tensor", "smem", "issue", "mufu", "atomics")


def wave_efficiency(dev: DeviceProfile, programs: int, ctas_per_sm: int) -> tuple:
    """(waves, busy share of the resident slots over all waves)."""
    slots = dev.sms * max(1, ctas_per_sm)
    waves = max(1, math.ceil(programs / slots))
    return waves, programs / (waves * slots)


def _step(dev, name, work: dict, programs: int, ctas_per_sm: int, dtype: str) -> dict:
    hbm = dev.hbm_bytes_per_s * dev.hbm_efficiency
    seconds = {"hbm": work["hbm_bytes"] / hbm, "l2": work["l2_bytes"] / dev.l2_bytes_per_s,
               "tensor": work["mma_flops"] / (matmul_peak(dev, dtype) * dev.tensor_efficiency),
               "smem": work["smem_bytes"] / dev.smem_bytes_per_s, "issue": work["warp_instrs"] / dev.warp_instr_per_s,
               "mufu": work["mufu"] / dev.mufu_per_s, "atomics": work["atomic_bytes"] / dev.atomic_bytes_per_s}
    waves, busy = wave_efficiency(dev, programs, ctas_per_sm)
    step = Step(name, {r: t / busy for r, t in seconds.items()})
    return {"device": dev.name, "programs": programs, "waves": waves, "wave_efficiency": busy,
            "resource_ms": {r: t * 1e3 for r, t in step.times.items()}, "ms": step.seconds * 1e3,
            "bound": step.bound, "work": work}


def streaming(dev: DeviceProfile, row: dict, elements: float, programs: int, dtype="bf16",
              bytes_per_elem: float | None = None, every_loop: bool = False) -> dict:
    """A kernel that streams `elements` (logits, parameters) through its hot loop, `programs` programs;
    bytes_per_elem: where the TTGIR's count walks alternative loops both (default: the row's); every_loop:
    its innermost loops run one after another over the same elements (passes), not as alternatives."""
    if every_loop and row["hot_loops"]:
        hot = {key: sum(loop[key] for loop in row["hot_loops"])
               for key in ("instrs", "mufu", "mma_flops_per_warp", "mma_smem_bytes_per_warp")}
    else:
        hot = row["hot_loops"][row["hot_loop"]] if row["hot_loops"] else row["outside_loops"]
    per_elem = row["threads"] / row["hot_loop_elems"]  # one thread's share of an iteration, per element
    nbytes = (row["bytes_per_elem"] if bytes_per_elem is None else bytes_per_elem) * elements
    work = {"hbm_bytes": nbytes, "l2_bytes": nbytes, "mma_flops": hot["mma_flops_per_warp"] * per_elem / 32 * elements,
            "smem_bytes": hot["mma_smem_bytes_per_warp"] * per_elem / 32 * elements,
            "warp_instrs": hot["instrs"] * per_elem / 32 * elements, "mufu": hot["mufu"] * per_elem * elements,
            "atomic_bytes": row["atomic_bytes_per_elem"] * elements}
    return _step(dev, row["kernel"], work, programs, row["ctas_per_sm"], dtype)


def tiled(dev: DeviceProfile, row: dict, tiles: int, h_chunks: int, programs: int, hbm_bytes: float,
          dtype="bf16") -> dict:
    """A tile kernel over `tiles` output tiles, each innermost loop run `h_chunks` times per tile; its L2
    traffic and atomics are the TTGIR's per-chunk bytes of a program (compiled with one trip of the run-time
    loops), and its HBM bytes the caller's model of L2 reuse (gxpo_bench/static.py fused_linear_bytes)."""
    warps, out = row["num_warps"], row["outside_loops"]
    per_tile = {key: out[key] + h_chunks * sum(loop[key] for loop in row["hot_loops"])
                for key in ("instrs", "mufu", "mma_flops_per_warp", "mma_smem_bytes_per_warp")}
    chunk_bytes = sum(row["program_bytes"].values()) * h_chunks * tiles
    work = {"hbm_bytes": hbm_bytes, "l2_bytes": chunk_bytes,
            "mma_flops": per_tile["mma_flops_per_warp"] * warps * tiles,
            "smem_bytes": per_tile["mma_smem_bytes_per_warp"] * warps * tiles,
            "warp_instrs": per_tile["instrs"] * warps * tiles, "mufu": per_tile["mufu"] * warps * 32 * tiles,
            "atomic_bytes": row["atomic_bytes_per_program"] * h_chunks * tiles}
    return _step(dev, row["kernel"], work, programs, row["ctas_per_sm"], dtype)


def loop_trips(row: dict, trips: list) -> list:
    """Trips per tile of each loop of row["loop_tree"]: `trips` for its loops in address order, a lock's spin
    loop once per trip of the loop around it (uncontended)."""
    given, at_depth, out = iter(trips), {}, []
    for loop in row["loop_tree"]:
        n = at_depth.get(loop["depth"] - 1, 1) * (1 if loop["spin"] else next(given))
        at_depth[loop["depth"]] = n
        out.append(n)
    assert next(given, None) is None, f"{row['kernel']}: more trip counts than loops"
    return out


def tiled_loops(dev: DeviceProfile, row: dict, tiles: int, trips: list, programs: int, hbm_bytes: float,
                dtype="bf16") -> dict:
    """A tile kernel whose loops run different trip counts per tile (a peer's kernel: CCE's backward walks H in
    one step in its logits loop and in twice that in its two gradient loops): each loop's own instructions
    times its trips (loop_trips), the rest once per tile; L2 traffic and atomics from the program's TTGIR,
    compiled with these trips (compile_launch(launch, trips, ...))."""
    warps, out = row["num_warps"], row["outside_all_loops"]
    per_loop = loop_trips(row, trips)
    per_tile = {key: out[key] + sum(n * loop["own"][key] for n, loop in zip(per_loop, row["loop_tree"], strict=True))
                for key in ("instrs", "mufu", "mma_flops_per_warp", "mma_smem_bytes_per_warp")}
    work = {"hbm_bytes": hbm_bytes, "l2_bytes": sum(row["program_bytes"].values()) * tiles,
            "mma_flops": per_tile["mma_flops_per_warp"] * warps * tiles,
            "smem_bytes": per_tile["mma_smem_bytes_per_warp"] * warps * tiles,
            "warp_instrs": per_tile["instrs"] * warps * tiles, "mufu": per_tile["mufu"] * warps * 32 * tiles,
            "atomic_bytes": row["atomic_bytes_per_program"] * tiles}
    return _step(dev, row["kernel"], work, programs, row["ctas_per_sm"], dtype)


def markdown(rows: list, dev_name: str) -> list:
    out = [f"## Kernel launches: modelled time ({dev_name} profile)", "",
           "Each compiled kernel above at its reference launch: the loss kernels over N x V logits (N = 16384, V = "
           "151936), the flat kernels over 1.5e9 parameters, CAPO at its captured launch, the tiled LM-head kernels "
           "at N = 16384, V = 151936, H = 1536. Every resource's time (ms) over the busy share of the launch's "
           "waves; `ms` is the largest, `bound` names it. A model of sm_90, not a GPU timing.", "",
           "| impl | kernel | config | launch | programs (waves, busy) | HBM | L2 | tensor | smem | issue | MUFU | "
           "atomics | ms | bound |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for k in rows:
        t = k["time"]
        r = t["resource_ms"]
        out.append(f"| {k['impl']} | {k['kernel']} | {k['config']} | {t['reference']} | {t['programs']} "
                   f"({t['waves']}, {100 * t['wave_efficiency']:.0f}%) | "
                   + " | ".join(f"{r[name]:.3g}" for name in RESOURCES) + f" | {t['ms']:.3g} | {t['bound']} |")
    return out + [""]

"""Reading what ptxas, cuobjdump and Triton's TTGIR say about a kernel compiled for sm_90: registers and
spills, global access widths, innermost loops, occupancy, and the bytes each program moves."""

import math
import os
import re
from collections import Counter

# H100 SXM (sm_90) per-SM limits
REGS_PER_SM, MAX_THREADS_PER_SM, MAX_CTAS_PER_SM, SMEM_PER_SM = 65536, 2048, 32, 228 * 1024
REG_ALLOC_UNIT = 256  # registers are allocated per warp in units of 256

_INSTR = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_.]*)([^;]*);")
_DTYPE_BYTES = {"bf16": 2, "f16": 2, "f32": 4, "f64": 8, "i64": 8, "i32": 4, "i16": 2, "i8": 1, "i1": 1}


def tool(name: str) -> str:
    """Path of one of the NVIDIA tools Triton bundles (cuobjdump, nvdisasm, ptxas)."""
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def sass_instructions(sass: str) -> list:
    """[(address, opcode, operands)] of the (single) function in `cuobjdump -sass` output, NOPs dropped."""
    out = []
    for line in sass.splitlines():
        m = _INSTR.search(line)
        if m and m.group(2) != "NOP":
            out.append((int(m.group(1), 16), m.group(2), m.group(3).strip()))
    return out


def access_bits(opcode: str) -> int:
    """Width of a global load/store: LDG.E.128 -> 128, LDG.E.U16 -> 16, LDG.E -> 32."""
    for part in opcode.split(".")[1:]:
        if part in ("128", "64"):
            return int(part)
        if part in ("U16", "S16"):
            return 16
        if part in ("U8", "S8"):
            return 8
    return 32


def widths(instrs, kind: str) -> dict:
    """{bits: count} of the LDG or STG instructions."""
    return dict(sorted(Counter(access_bits(op) for _, op, _ in instrs if op.split(".")[0] == kind).items(),
                       reverse=True))


GLOBAL_ACCESS = ("LDG", "STG", "LDGSTS", "RED", "REDG", "ATOMG", "UTMALDG")  # loads, stores, async copies, atomics
ATOMICS = ("RED", "REDG", "ATOMG", "ATOM")  # sm_90 spells a global reduction REDG


def _loop_spans(instrs) -> set:
    """(first, last address) of each backward branch's loop."""
    spans = set()
    for addr, op, args in instrs:
        m = re.search(r"0x([0-9a-f]+)", args) if op.split(".")[0] == "BRA" else None
        if m and int(m.group(1), 16) < addr:
            spans.add((int(m.group(1), 16), addr))
    return spans


def loop_tree(instrs) -> list:
    """Every loop that touches global memory, in address order: {"depth": loops around it, "spin": a lock's
    wait (an atomic compare-and-swap in its own body: one trip when uncontended), "own": loop_summary of the
    instructions in it and in none of its nested loops}."""
    touches = lambda lo, hi: any(lo <= a <= hi and op.split(".")[0] in GLOBAL_ACCESS  # noqa: E731
                                 for a, op, _ in instrs)
    spans = sorted(s for s in _loop_spans(instrs) if touches(*s))
    out = []
    for lo, hi in spans:
        inner = [o for o in spans if o != (lo, hi) and lo <= o[0] and o[1] <= hi]
        own = [i for i in instrs if lo <= i[0] <= hi and not any(a <= i[0] <= b for a, b in inner)]
        out.append({"depth": sum(o[0] <= lo and hi <= o[1] for o in spans) - 1,
                    "spin": any(op.startswith(("ATOMG", "ATOM")) and ".CAS" in op for _, op, _ in own),
                    "own": loop_summary(own)})
    return out


def innermost_memory_loops(instrs) -> list:
    """Bodies of the innermost backward-branch loops that touch global memory, in address order."""
    spans = _loop_spans(instrs)
    touches = lambda lo, hi: any(lo <= a <= hi and op.split(".")[0] in GLOBAL_ACCESS  # noqa: E731
                                 for a, op, _ in instrs)
    spans = [s for s in spans if touches(*s)]
    inner = [s for s in spans if not any(o != s and s[0] <= o[0] and o[1] <= s[1] for o in spans)]
    return [[i for i in instrs if lo <= i[0] <= hi] for lo, hi in sorted(inner)]


_MMA_SHAPE = re.compile(r"(\d+)x(\d+)x(\d+)")


def mma_flops_per_warp(opcode: str, operands: str) -> float:
    """FLOPs of one warp's share of a tensor-core instruction: HGMMA.64xNxK is one warpgroup's (4 warps)
    64 x N x K multiply-add; HMMA.16816 one warp's m16 n8 k16. 0 for anything else."""
    kind = opcode.split(".")[0]
    if kind == "HGMMA":
        m, n, k = (int(g) for g in _MMA_SHAPE.search(opcode + operands).groups())
        return 2.0 * m * n * k / 4
    if kind == "HMMA":
        digits = opcode.split(".")[1]
        m, rest = (16, digits[2:]) if digits.startswith("16") else (8, digits[1:])
        return 2.0 * m * int(rest[0]) * int(rest[1:])
    return 0.0


def mma_smem_bytes_per_warp(opcode: str, operands: str) -> float:
    """Shared-memory operand bytes of one warp's share of an HGMMA (16-bit inputs): A (64 x K) and B (N x K)
    both read through descriptors, or B alone where A comes from registers."""
    if opcode.split(".")[0] != "HGMMA":
        return 0.0
    m, n, k = (int(g) for g in _MMA_SHAPE.search(opcode + operands).groups())
    a_in_smem = operands.count("gdesc") >= 1 and not re.search(r"^x\S+\s+R\d+,\s*R\d+", operands)
    return 2.0 * ((m * k if a_in_smem else 0) + n * k) / 4


def loop_summary(body) -> dict:
    ops = Counter(op.split(".")[0] for _, op, _ in body)
    return {"instrs": len(body), "ldg_bits": widths(body, "LDG"), "stg_bits": widths(body, "STG"),
            "mufu": ops["MUFU"], "barriers": ops["BAR"], "tensor_core": ops["HGMMA"] + ops["HMMA"],
            "mma_flops_per_warp": sum(mma_flops_per_warp(op, args) for _, op, args in body),
            "mma_smem_bytes_per_warp": sum(mma_smem_bytes_per_warp(op, args) for _, op, args in body),
            "atomics": sum(ops[a] for a in ATOMICS), "async_copies": ops["LDGSTS"] + ops["UTMALDG"]}


def outside_loops(instrs, loops) -> list:
    """The instructions in none of the given loop bodies."""
    inside = {addr for body in loops for addr, _, _ in body}
    return [i for i in instrs if i[0] not in inside]


def access_widths(loop: dict) -> set:
    """The bit widths of a loop_summary's global loads and stores."""
    return set(loop["ldg_bits"]) | set(loop["stg_bits"])


def ptxas_usage(log: str) -> dict:
    """Registers, spill bytes and stack from `ptxas -v`."""
    out = {}
    m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", log)
    if m:
        out.update(stack=int(m.group(1)), spill_bytes=int(m.group(2)) + int(m.group(3)))
    m = re.search(r"Used (\d+) registers", log)
    if m:
        out["regs"] = int(m.group(1))
    return out


def ctas_per_sm(threads: int, regs: int, smem_bytes: int) -> tuple:
    """(resident CTAs per SM, what limits it)."""
    warps = math.ceil(threads / 32)
    regs_per_warp = math.ceil(max(regs, 1) * 32 / REG_ALLOC_UNIT) * REG_ALLOC_UNIT
    limits = {"regs": REGS_PER_SM // regs_per_warp // warps, "threads": MAX_THREADS_PER_SM // threads,
              "ctas": MAX_CTAS_PER_SM, "smem": SMEM_PER_SM // smem_bytes if smem_bytes else MAX_CTAS_PER_SM}
    limiter = min(limits, key=limits.get)
    return limits[limiter], limiter


def ttgir_accesses(ttgir: str) -> dict:
    """Tensor loads and stores of a program per basic block of its control flow:
    {block: {"accesses": [(kind, bytes, loops, branch)], "next": [blocks]}}; loops: the trip counts of the
    enclosing scf.for loops, outermost first (for run-time bounds, RuntimeLoop(i): the i-th such loop in the
    program); branch: ((if number, "then" | "else"), ...) of the enclosing scf.if regions. Early returns show
    up as cf.cond_br between blocks. Asynchronous copies to shared memory (LDGSTS, the software pipeline's
    loads) count as loads; those the pipeliner hoists ahead of their loop (its first stages) are left out, since
    the loop's own copy, times its trips, already counts every iteration."""
    blocks, cur, stack, n_ifs, body_depth, n_runtime = {}, "^entry", [], 0, None, 0
    blocks[cur] = {"accesses": [], "next": []}
    for raw in ttgir.splitlines():
        line = raw.strip()
        if line.startswith("^bb"):
            if len(stack) == body_depth:  # a block of the function's control flow, not of a reduce's region
                cur = line.split(":")[0].split("(")[0]
                blocks.setdefault(cur, {"accesses": [], "next": []})
            continue
        if line.startswith("}"):
            top = stack.pop() if stack else None
            if line.endswith("{") and top:  # "} else {", or a while loop's "} do {"
                stack.append(("if", top[1], "else") if top[0] == "if" else top)
            continue
        if re.search(r"\bcf\.(cond_)?br\b", line):
            blocks[cur]["next"] += [b.split("(")[0] for b in re.findall(r"\^bb\d+", line)]
        m = _ACCESS.search(line)
        if m:
            branch = tuple((f[1], f[2]) for f in stack if f[0] == "if")
            numel = math.prod(int(d) for d in m.group(3).rstrip("x").split("x"))
            kind = "load" if m.group(1) else m.group(2)
            blocks[cur]["accesses"].append(_Access(kind, numel * _DTYPE_BYTES.get(m.group(4), 4),
                                                   tuple(f[1] for f in stack if f[0] == "for"), branch,
                                                   m.group(5) if m.group(1) else None))
        if line.endswith("{"):
            if "scf.if" in line:
                stack.append(("if", n_ifs, "then"))
                n_ifs += 1
            elif "scf.for" in line:
                trips = constant_trips(line)
                if trips is None:
                    trips, n_runtime = RuntimeLoop(n_runtime), n_runtime + 1
                stack.append(("for", trips))
            else:
                stack.append(("block",))
            if "tt.func" in line:
                body_depth = len(stack)
    return {name: {**b, "accesses": _without_pipeline_prologue(b["accesses"], blocks)} for name, b in blocks.items()}


_ACCESS = re.compile(r"\b(?:(ttg\.async_copy_global_to_local)|tt\.(load|store|atomic_rmw))\b.*"
                     r"tensor<((?:\d+x)+)!tt\.ptr<(\w+)>(, #\w+)?")


class RuntimeLoop(int):
    """An scf.for whose bounds are run-time values, numbered in program order."""


class _Access(tuple):
    """(kind, bytes, loops, branch) of ttgir_accesses; `copy`: an asynchronous copy's source layout."""

    def __new__(cls, kind, nbytes, loops, branch, copy=None):
        out = super().__new__(cls, (kind, nbytes, loops, branch))
        out.copy = copy
        return out


def _without_pipeline_prologue(accesses, blocks) -> list:
    deeper = [(a[1], a.copy, a[2]) for b in blocks.values() for a in b["accesses"] if a.copy is not None]

    def hoisted(a):
        return a.copy is not None and any(n == a[1] and c == a.copy and len(loops) > len(a[2])
                                          and loops[:len(a[2])] == a[2] for n, c, loops in deeper)
    return [a for a in accesses if not hoisted(a)]


_CONSTANT = r"%c(\d+)_i(?:32|64)(?:_\d+)?"
_FOR_BOUNDS = re.compile(rf"scf\.for %\S+ = {_CONSTANT} to {_CONSTANT} step {_CONSTANT}\b")


def constant_trips(line: str):
    """(hi - lo) / step of an scf.for whose bounds are constants, else None. Fractional: the masked lanes
    of a last, partial iteration move no bytes."""
    m = _FOR_BOUNDS.search(line)
    if not m:
        return None
    lo, hi, step = (int(g) for g in m.groups())
    return max(0, hi - lo) / step


def tile_loop_trips(ttgir: str) -> float:
    """Trips of a tile loop: a constant-bounds innermost loop inside a run-time loop (a kernel's walk of a
    block's tiles inside its walk of blocks), so one iteration of the innermost loop handles block / trips
    elements; 1 where the innermost loops are the run-time ones."""
    accesses = [a for block in ttgir_accesses(ttgir).values() for a in block["accesses"]]
    trips = {loops[-1] for _, _, loops, _ in accesses if len(loops) >= 2 and not isinstance(loops[-1], RuntimeLoop)}
    assert len(trips) <= 1, f"tile loops with different trip counts: {trips}"
    return next(iter(trips), 1)


def _branch_costs(accesses, loop_trips) -> list:
    """{"load", "store", "atomic_rmw"} bytes of each combination of scf.if sides within one basic block."""
    ifs = sorted({i for *_, branch in accesses for i, _ in branch})
    out = []
    for choice in range(2 ** len(ifs)):
        sides = {i: ("then", "else")[(choice >> k) & 1] for k, i in enumerate(ifs)}
        total = {"load": 0, "store": 0, "atomic_rmw": 0}
        for kind, nbytes, loops, branch in accesses:
            if all(sides[i] == side for i, side in branch):
                total[kind] += nbytes * math.prod(_trips(t, loop_trips) for t in loops)
        out.append(total)
    return out


def _trips(trips, loop_trips):
    if not isinstance(trips, RuntimeLoop):
        return trips
    return loop_trips[trips] if isinstance(loop_trips, (list, tuple)) else loop_trips


def program_bytes(ttgir: str, loop_trips) -> dict:
    """{"max": {"load", "store"}, "min": {...}, "atomic": bytes}: the bytes one program moves down its costliest
    path (an unmasked row) and its cheapest (a masked one), and the bytes its atomics add at L2 down the
    costliest; accesses in a loop count its constant trip count, or loop_trips times where its bounds are
    run-time values (a sequence: the trips of each such loop, in program order)."""
    blocks = ttgir_accesses(ttgir)
    pick = {"max": max, "min": min}

    def walk(name, how, seen=()):
        own = pick[how](_branch_costs(blocks[name]["accesses"], loop_trips), key=lambda t: sum(t.values()))
        nexts = [walk(b, how, seen + (name,)) for b in blocks[name]["next"] if b in blocks and b not in seen]
        tail = pick[how](nexts, key=lambda t: sum(t.values()), default={"load": 0, "store": 0, "atomic_rmw": 0})
        return {k: own[k] + tail[k] for k in own}

    out = {how: walk("^entry", how) for how in pick}
    atomic = out["max"]["atomic_rmw"]
    return {**{how: {k: out[how][k] for k in ("load", "store")} for how in pick}, "atomic": atomic}


def int32_tensor_products(ttgir: str) -> list:
    """The TTGIR's multiplications of int32 tensors: an address offset formed this way wraps past 2^31."""
    return [line.strip() for line in ttgir.splitlines()
            if "arith.muli" in line and re.search(r":\s*tensor<(?:\d+x)+i32", line)]

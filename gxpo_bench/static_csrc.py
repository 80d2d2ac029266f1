"""The csrc CUDA flat kernels (gxpo_kernels/optim/flat/csrc/flat_ops_cuda.cu, GXPO_FLAT_CUDA=csrc) in the static
sm_90 model: compiled with nvcc by csrc/check_cuda_compiles.sh (which keeps the object and ptxas' report), read
with the same SASS tools as the Triton kernels. Only where nvcc is installed; a model of sm_90, not a timing."""

import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from . import sass

ROOT = Path(__file__).resolve().parents[1]
CHECK_SCRIPT = ROOT / "gxpo_kernels" / "optim" / "flat" / "csrc" / "check_cuda_compiles.sh"
THREADS = 128  # kThreads in flat_ops_cuda.cu
DTYPES = {"f": "float32", "N3c108BFloat16E": "bfloat16"}  # the instantiations reported (float16 is as bfloat16)
_NAME = re.compile(r"([a-z_]+_kernel)I(f|N3c108BFloat16E)E")


def available() -> bool:
    return shutil.which("nvcc") is not None


def _per_function(text: str, start: re.Pattern) -> dict:
    """{mangled name: its lines} of a tool's report, each function starting at a line matching `start`."""
    out, name = {}, None
    for line in text.splitlines():
        m = start.search(line)
        if m:
            name = m.group(1)
            out[name] = []
        elif name:
            out[name].append(line)
    return out


def report() -> list:
    """One row per (kernel, dtype) with the Triton rows' fields; [] without nvcc."""
    if not available():
        return []
    with tempfile.TemporaryDirectory(prefix="gxpo_csrc_") as tmp:
        subprocess.run(["bash", str(CHECK_SCRIPT), sys.executable, tmp], check=True,
                       capture_output=True, text=True)
        log = (Path(tmp) / "ptxas.log").read_text()
        dump = subprocess.run([sass.tool("cuobjdump"), "-sass", str(Path(tmp) / "flat_ops_cuda.o")], check=True,
                              capture_output=True, text=True).stdout
    ptxas = {name: "\n".join(lines)
             for name, lines in _per_function(log, re.compile(r"Compiling entry function '(\w+)'")).items()}
    rows = []
    for name, lines in _per_function(dump, re.compile(r"Function : (\w+)")).items():
        m = _NAME.search(name)
        if not m:
            continue
        instrs = sass.sass_instructions("\n".join(lines))
        loops = [sass.loop_summary(body) for body in sass.innermost_memory_loops(instrs)]
        usage = sass.ptxas_usage(ptxas[name])
        smem = re.search(r"(\d+) bytes smem", ptxas[name])
        regs = usage.get("regs", 0)
        ctas, limiter = sass.ctas_per_sm(THREADS, regs, int(smem.group(1)) if smem else 0)
        rows.append({"impl": "csrc", "kernel": m.group(1), "config": f"threads={THREADS} T={DTYPES[m.group(2)]}",
                     "regs": regs, "spill_bytes": usage.get("spill_bytes"), "threads": THREADS,
                     "ctas_per_sm": ctas, "occupancy_limiter": limiter, "ldg_bits": sass.widths(instrs, "LDG"),
                     "stg_bits": sass.widths(instrs, "STG"),
                     "generic_accesses": sum(op.split(".")[0] in ("LD", "ST") for _, op, _ in instrs),
                     "barriers": sum(op.split(".")[0] == "BAR" for _, op, _ in instrs), "hot_loops": loops})
    return sorted(rows, key=lambda r: (r["kernel"], r["config"]))


def to_markdown(rows: list) -> list:
    if not rows:
        return ["", "## csrc CUDA flat kernels", "", "Not compiled: nvcc was not found."]
    out = ["", "## csrc CUDA flat kernels (GXPO_FLAT_CUDA=csrc)", "",
           "Compiled by `gxpo_kernels/optim/flat/csrc/check_cuda_compiles.sh` (nvcc, sm_90). Widths of the global "
           "accesses in the whole "
           "kernel and in its innermost loops (a full block's 128-bit path, the scalar path of tails and unaligned "
           "tensors).", "",
           "| kernel | config | regs | spill B | CTAs/SM | LDG bits | STG bits | generic LD/ST | barriers "
           "| loops: LDG / STG bits |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    fmt = lambda d: " ".join(f"{n}x{w}" for w, n in d.items()) or "-"  # noqa: E731
    for r in rows:
        loops = "; ".join(f"{fmt(loop['ldg_bits'])} / {fmt(loop['stg_bits'])}" for loop in r["hot_loops"])
        out.append(f"| {r['kernel']} | {r['config']} | {r['regs']} | {r['spill_bytes']} | {r['ctas_per_sm']} | "
                   f"{fmt(r['ldg_bits'])} | {fmt(r['stg_bits'])} | {r['generic_accesses']} | {r['barriers']} | "
                   f"{loops} |")
    return out

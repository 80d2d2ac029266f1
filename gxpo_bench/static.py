"""`gxpo-bench static`: a static model of every Triton kernel on an H100 (sm_90), with no GPU.

Our launchers run on small CPU tensors with every kernel launch captured instead of executed, so each
kernel is compiled with exactly the constexprs, num_warps and argument specializations its launcher
uses (Liger-Kernel's GRPO kernels the same way, as the peer). Triton compiles each for sm_90 through a
stub driver; its bundled ptxas and cuobjdump give registers, spills, occupancy, the width of every
global load and store and the instructions of each hot loop; the TTGIR's per-program loads and stores
times the loop trip counts and the grid give the bytes a call moves, and autograd's own tensor ops
during forward+backward (slices, rescales, copies) are traced and added. A model of sm_90, not a timing.
"""

import math
import os
import subprocess
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from gxpo_kernels.devices import H100_SXM

from . import kernel_time, sass, static_csrc, time_report

HBM_BYTES_PER_S = H100_SXM.hbm_bytes_per_s * H100_SXM.hbm_efficiency  # the roofline the report divides by
WARP_ISSUE_PER_S = H100_SXM.warp_instr_per_s  # one warp instruction per scheduler per clock
FLAT_PARAMS = 1.5e9  # the flat kernels' reference launch: a 1.5B-parameter policy's fp32 state
ROWS = 16  # token rows the loss calls are captured at; bytes scale linearly to the modelled N


@dataclass
class Launch:
    fn: object
    grid: tuple
    args: tuple
    kwargs: dict

    @property
    def name(self):
        return self.fn.__name__

    @property
    def num_programs(self):
        return math.prod(self.grid)


@contextmanager
def captured_launches():
    """Launches of Triton kernels are recorded, not run; every launcher picks its Triton path."""
    from triton.runtime.jit import JITFunction

    from gxpo_kernels import backend
    from gxpo_kernels.loss import lm_head_kernels, logits_kernels

    launches, run, use_triton, block_v = [], JITFunction.run, backend.use_triton, logits_kernels.default_block_v
    tiles = lm_head_kernels.tile_config

    def record(self, *args, grid, warmup, **kwargs):
        launches.append(Launch(self, tuple(grid(kwargs) if callable(grid) else grid), args, kwargs))

    JITFunction.run = record
    backend.use_triton = lambda t: t.dtype in backend.KERNEL_DTYPES
    logits_kernels.default_block_v = lambda V, device: block_v(V, torch.device("cuda"))  # the GPU's launch config
    lm_head_kernels.tile_config = lambda N, V, H, device: tiles(N, V, H, torch.device("cuda"))
    try:
        yield launches
    finally:
        JITFunction.run, backend.use_triton, logits_kernels.default_block_v = run, use_triton, block_v
        lm_head_kernels.tile_config = tiles


@contextmanager
def sm90_target(arch: int = 90):
    """Triton compiles for an H100 (or another compute capability: 80, an A100) on a machine without one."""
    from triton.backends.compiler import GPUTarget
    from triton.backends.driver import DriverBase
    from triton.runtime.driver import driver

    class SM90(DriverBase):
        @classmethod
        def is_active(cls):
            return True

        def get_current_target(self):
            return GPUTarget("cuda", arch, 32)

        def get_active_torch_device(self):
            return torch.device("cpu")

        def get_current_device(self):
            return 0

        def get_current_stream(self, device=None):
            return 0

        def set_current_device(self, device):
            pass

        def map_python_to_cpp_type(self, ty):
            return ty

        def get_benchmarker(self):
            raise NotImplementedError

        def get_device_interface(self):
            return torch.cuda

    previous = getattr(driver, "_active", None)
    driver.set_active(SM90())
    try:
        yield
    finally:
        driver._active = previous


def compile_launch(launch: Launch, loop_trips, block: int, arch: int = 90) -> dict:
    """Compile one captured launch for sm_90 (under sm90_target(arch): that arch) and read what the chip would
    run. block: the elements one program handles per hot-loop iteration (or in all, for a kernel without a
    loop); a tile loop inside it (sass.tile_loop_trips) handles a share. loop_trips: the trips of its loops
    with run-time bounds, or a list of them per loop in program order (sass.program_bytes)."""
    from triton.backends.nvidia.compiler import get_ptxas

    kernel = launch.fn.warmup(*launch.args, grid=launch.grid, **launch.kwargs)
    with tempfile.TemporaryDirectory(prefix="gxpo_static_") as tmp:
        ptx, cubin = os.path.join(tmp, "k.ptx"), os.path.join(tmp, "k.cubin")
        open(ptx, "w").write(kernel.asm["ptx"])
        open(cubin, "wb").write(kernel.asm["cubin"])
        log = subprocess.run([get_ptxas(arch).path, "-v", f"--gpu-name=sm_{arch}{'a' if arch == 90 else ''}", ptx,
                              "-o", os.path.join(tmp, "r.cubin")], capture_output=True, text=True)
        dump = subprocess.run([sass.tool("cuobjdump"), "-sass", cubin], capture_output=True, text=True).stdout
    usage = sass.ptxas_usage(log.stdout + log.stderr)
    instrs = sass.sass_instructions(dump)
    threads = kernel.metadata.num_warps * 32
    ctas, limiter = sass.ctas_per_sm(threads, usage.get("regs", 0), kernel.metadata.shared)
    bodies = sass.innermost_memory_loops(instrs)
    loops = [sass.loop_summary(body) for body in bodies]
    loop_elems = block / sass.tile_loop_trips(kernel.asm["ttgir"]) if loops else block
    per_elem = [round(n * threads / loop_elems, 2) for n in ([loop["instrs"] for loop in loops] or [len(instrs)])]
    program = sass.program_bytes(kernel.asm["ttgir"], loop_trips)
    walk = loop_trips if isinstance(loop_trips, (int, float)) else loop_trips[0]  # a tile kernel's first loop
    bytes_per_elem = sum(program["max"].values()) / (block * walk)
    # the hottest loop's instruction issue at the ideal rate, as a share of its bytes' time at the roofline;
    # of loops that differ in access width only the widest count: a masked tail (scalar, predicated accesses)
    # runs once per tensor, the vectorized full-block loop everywhere else
    widest = [max(sass.access_widths(loop), default=0) for loop in loops]
    hot_index = max((i for i, w in enumerate(widest) if w == max(widest)), key=lambda i: per_elem[i], default=None)
    issue_s = (per_elem[hot_index] if loops else per_elem[0]) / 32 / WARP_ISSUE_PER_S
    issue_vs_memory = issue_s / (bytes_per_elem / HBM_BYTES_PER_S) if bytes_per_elem else None
    tensor_core = sum(op.split(".")[0] in ("HGMMA", "HMMA") for _, op, _ in instrs)
    if tensor_core:  # a matmul tile loop: judged by its tensor-core use, not by issue against streamed bytes
        issue_vs_memory = None
    constexprs = {k: v for k, v in launch.kwargs.items() if k.isupper() or k == "num_warps"}
    first = next((a for a in (*launch.args, *launch.kwargs.values()) if torch.is_tensor(a)), None)
    config = " ".join([f"{k}={_short(v)}" for k, v in constexprs.items()] + [f"arg0={str(first.dtype)[6:]}"])
    return {"kernel": launch.name, "config": config,
            "regs": usage.get("regs"), "spill_bytes": usage.get("spill_bytes"), "threads": threads,
            "ctas_per_sm": ctas, "occupancy_limiter": limiter, "ldg_bits": sass.widths(instrs, "LDG"),
            "stg_bits": sass.widths(instrs, "STG"), "barriers": sum(op.split(".")[0] == "BAR" for _, op, _ in instrs),
            "tensor_core_instrs": tensor_core,
            "atomic_instrs": sum(op.split(".")[0] in sass.ATOMICS for _, op, _ in instrs),
            "atomic_bytes_per_program": program["atomic"],
            "tensor_core_in_loops": sum(loop["tensor_core"] for loop in loops),
            "hot_loops": loops, "hot_loop_elems": loop_elems, "hot_loop_instrs_per_elem": per_elem,
            "hot_loop": hot_index, "outside_loops": sass.loop_summary(sass.outside_loops(instrs, bodies)),
            "loop_tree": sass.loop_tree(instrs),
            "outside_all_loops": sass.loop_summary(sass.outside_loops(instrs, _all_loop_bodies(instrs))),
            "num_warps": kernel.metadata.num_warps, "bytes_per_elem": bytes_per_elem,
            "atomic_bytes_per_elem": program["atomic"] / (block * walk),
            "issue_vs_memory": issue_vs_memory,
            "program_bytes": program["max"], "masked_program_bytes": program["min"]}


def _all_loop_bodies(instrs) -> list:
    return [[i for i in instrs if lo <= i[0] <= hi] for lo, hi in sass._loop_spans(instrs)]


def _pct(x):
    return "-" if x is None else f"{100 * x:.0f}%"


def _short(v):
    return getattr(v, "__name__", None) or str(v).replace("triton.language.", "")


# -- the calls that are modelled ------------------------------------------------------------------------

class ByteTrace:
    """Bytes that torch's own ops move during a call (autograd's slices, rescales, copies, zero fills),
    counting only tensors of at least `min_numel` elements (the [rows, V] ones)."""

    VIEWS = {"view", "_unsafe_view", "slice", "select", "as_strided", "t", "transpose", "expand", "alias",
             "detach", "unsqueeze", "squeeze", "reshape", "permute", "empty", "empty_like", "empty_strided",
             "new_empty", "new_empty_strided", "_to_copy_noop", "lift_fresh"}
    WRITE_ONLY = {"zeros", "zeros_like", "new_zeros", "fill_", "zero_", "full", "new_full", "ones", "ones_like"}
    SCATTER_INTO_ZEROS = {"slice_backward", "select_backward", "as_strided_backward", "index_select_backward"}

    def __init__(self, min_numel):
        self.min_numel, self.bytes, self.ops = min_numel, 0, {}

    def __call__(self):
        from torch.utils._python_dispatch import TorchDispatchMode

        trace = self

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                trace.record(func.overloadpacket.__name__, args, out)
                return out

        return Mode()

    def record(self, name, args, out):
        if name in self.VIEWS:
            return
        big = lambda ts: [t for t in ts if torch.is_tensor(t) and t.numel() >= self.min_numel]  # noqa: E731
        outs = big(out if isinstance(out, (tuple, list)) else [out])
        ins = [] if name in self.WRITE_ONLY else big(args[1:] if name == "copy_" else args)
        nbytes = sum(t.numel() * t.element_size() for t in ins + outs)
        if name in self.SCATTER_INTO_ZEROS:  # a zero-filled output first, then the gradient copied into it
            nbytes += sum(t.numel() * t.element_size() for t in outs)
        if nbytes:
            self.bytes += nbytes
            self.ops[name] = self.ops.get(name, 0) + 1


LOSS_CALLS = {
    "whole": "grpo_loss(logits [B, T, V]) with loss.backward()",
    "sliced": "a causal LM's [B, T + 1, V] logits (ours: passed whole; Liger: its own input layout)",
    "scaled": "as whole, with (loss * w).backward(): grad_output != 1",
    "sliced_view": "ours on logits[:, :-1] (the view a user might pass): autograd's slice_backward",
}


def _loss_inputs(V, rows, dtype=torch.bfloat16, extra_position=False):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, rows + int(extra_position), V, generator=g).to(dtype).requires_grad_()
    ids = torch.randint(0, V, (1, rows), generator=g)
    old = -torch.rand(1, rows, generator=g) * 3
    return x, ids, torch.ones(1, rows), torch.randn(1, generator=g), old, old + 0.01


def run_loss_call(impl: str, call: str, V: int, rows: int = ROWS):
    """(captured launches, torch-op bytes) of one forward+backward of a loss call at `rows` token rows; impl
    "ours_vocab": the vocabulary primitive (log-probs and entropies, entropy gradient on) and TRL's dapo loss
    with an entropy bonus on its [B, T] vectors."""
    from gxpo_kernels import grpo_loss
    from gxpo_kernels.loss import PolicyObjective, policy_loss, token_logprobs

    causal = impl == "liger" or call in ("sliced", "sliced_view")
    x, ids, mask, adv, old, ref = _loss_inputs(V, rows, extra_position=causal)
    trace = ByteTrace(min_numel=V)
    with captured_launches() as launches, trace():
        if impl == "ours":
            logits = x[:, :-1] if call == "sliced_view" else x
            loss, _ = grpo_loss(logits, ids, adv, mask, old, ref, beta=0.04, eps_low=0.2, eps_high=0.28, inplace=True)
        elif impl == "ours_vocab":
            logp, entropy = token_logprobs(x, ids, mask, inplace=True)
            objective = PolicyObjective(loss_type="dapo", epsilon_high=0.28, beta=0.04, entropy_coef=0.001)
            loss, _ = policy_loss(objective, logp, entropy, adv, mask, old, ref)
        else:
            from liger_kernel.transformers.grpo_loss import triton_grpo_loss

            loss = triton_grpo_loss(x, old, ref, ids, adv, mask, temperature=1.0, beta=0.04, eps_low=0.2,
                                    eps_high=0.28, inplace=True, loss_type="dapo", reduce=True)[0]
        # the logits' gradient as a model's LM head would receive it (no AccumulateGrad into a leaf)
        torch.autograd.grad(loss * 0.5 if call == "scaled" else loss, x)
    return launches, trace


ONE_UNALIGNED = "_one_unaligned"  # flat launches whose group has one tensor off the 16-byte boundary


def flat_launches(numels=(4096, 1000, 16, 4100)):
    """Every flat-op and fused-AdamW launch of one GXPO active step (unfused and fused), on a small group."""
    from gxpo_kernels.optim.flat import ops as flat_ops
    from gxpo_kernels.optim.flat.adamw_kernel import FUSED_SPACES, Retention, adamw_step
    from gxpo_kernels.optim.flat.buffers import BLOCK, FlatGroup

    params = [torch.randn(n) for n in numels]
    grads = [torch.randn(n) for n in numels]
    state = [[torch.zeros(n) for n in numels] for _ in range(2)]
    per = [1e-3] * len(numels)
    with captured_launches() as launches:
        group = FlatGroup(params, BLOCK)
        flat_ops.snapshot(group, grads)
        flat_ops.grad_dots(group, grads, with_g0=False)
        flat_ops.extrapolate(group, grads, K=3, alpha=0.5, delta=1e-8)
        flat_ops.grad_dots(group, grads, with_g0=True)
        flat_ops.restore(group)
        for kwargs in ({}, {"snapshot": True}, {"extrapolate": {"K": 3, "alpha": 0.5, "delta": 1e-8}}):
            adamw_step(group, grads, *state, per, per, per, per, beta1=0.9, beta2=0.999, eps=1e-8, **kwargs)
        for space in FUSED_SPACES:  # the GXPO authors' current spaces (optim/fused_retention.py)
            adamw_step(group, grads, *state, per, per, per, per, beta1=0.9, beta2=0.999, eps=1e-8, snapshot=True,
                       retention=Retention(space))
            adamw_step(group, grads, *state, per, per, per, per, beta1=0.9, beta2=0.999, eps=1e-8,
                       extrapolate={"K": 3, "alpha": 0.8, "delta": 1e-8}, bc1_prev=per, bc2_sqrt_prev=per,
                       retention=Retention(space, torch.full((len(numels),), 1e-6), 1.0, 0.0))
        lrs = [1e-3 * (i + 1) for i in range(len(numels))]  # per-tensor hyperparameters: the table variant
        adamw_step(group, grads, *state, lrs, per, per, per, beta1=0.9, beta2=0.999, eps=1e-8)
        # one parameter 4 bytes past a 16-byte boundary: the others' full blocks keep their 128-bit path
        mixed = FlatGroup([torch.randn(p.numel() + 1)[1:] if i == 1 else p for i, p in enumerate(params)], BLOCK)
        flat_ops.snapshot(mixed, grads)
        flat_ops.extrapolate(mixed, grads, K=3, alpha=0.5, delta=1e-8)
        adamw_step(mixed, grads, *state, per, per, per, per, beta1=0.9, beta2=0.999, eps=1e-8,
                   extrapolate={"K": 3, "alpha": 0.5, "delta": 1e-8})
    labels = ["snapshot", "grad_norm", "extrapolate", "grad_dots_g0", "restore", "adamw", "adamw_snapshot",
              "adamw_extrapolate"]
    labels += [f"adamw_{name}_{space}" for space in FUSED_SPACES for name in ("snapshot", "extrapolate")]
    labels += ["adamw_per_tensor"]
    labels += [name + ONE_UNALIGNED for name in ("snapshot", "extrapolate", "adamw_extrapolate")]
    assert len(launches) == len(labels), [launch.name for launch in launches]
    return list(zip(labels, launches, strict=True)), sum(numels)


def _block_of(launch: Launch) -> int:
    kw = launch.kwargs
    return kw.get("BLOCK_V") or kw.get("BLOCK_N") or kw.get("BLOCK_H") or kw.get("BLOCK") or kw.get("BLOCK_SIZE") or 1


class Compiler:
    """Compiles each distinct (kernel, constexprs, argument types) once."""

    def __init__(self):
        self.cache = {}

    def __call__(self, impl: str, launch: Launch, loop_trips: int) -> dict:
        key = (launch.name, repr(sorted((k, str(v.dtype) if torch.is_tensor(v) else _short(v))
                                        for k, v in launch.kwargs.items())),
               tuple(str(a.dtype) if torch.is_tensor(a) else type(a).__name__ for a in launch.args), loop_trips)
        if key not in self.cache:
            self.cache[key] = {"impl": impl, **compile_launch(launch, loop_trips, _block_of(launch))}
        return self.cache[key]


def loss_report(compile_, N: int, V: int, T: int, with_liger: bool) -> list:
    """Per implementation and calling convention: the GB one forward+backward over N tokens moves."""
    rows = []
    for impl in ("ours", "ours_vocab", "liger") if with_liger else ("ours", "ours_vocab"):
        for call in LOSS_CALLS:
            if impl in ("liger", "ours_vocab") and call == "sliced_view":
                continue
            launches, trace = run_loss_call(impl, call, V, rows=T)
            # ours on a causal LM's logits: the extra position's row is masked (it only writes its zero
            # gradient); Liger's grid leaves that row out and zero-fills it with torch
            masked = 1 if impl != "liger" and call in ("sliced", "sliced_view") else 0
            kernel_bytes, kernel_ms = 0, 0.0
            for launch in launches:
                kernel_impl = "ours" if impl == "ours_vocab" else impl  # our kernels, whichever call launched them
                m = compile_(kernel_impl, launch, V / _block_of(launch))  # masked tail lanes move no bytes
                kernel_bytes += (sum(m["program_bytes"].values()) * (launch.num_programs - masked)
                                 + sum(m["masked_program_bytes"].values()) * masked)
                kernel_ms += _time_logit_rows(m, launch, N / T, V)["ms"]
            total = (kernel_bytes + trace.bytes) * N / T
            torch_ms = trace.bytes * N / T / HBM_BYTES_PER_S * 1e3
            rows.append({"impl": impl, "call": call, "gb": total / 1e9, "kernel_gb": kernel_bytes * N / T / 1e9,
                         "modelled_ms": kernel_ms + torch_ms, "kernel_modelled_ms": kernel_ms,
                         "torch_op_gb": trace.bytes * N / T / 1e9, "torch_ops": trace.ops,
                         "kernels": [launch.name for launch in launches]})
    liger = {r["call"]: r["gb"] for r in rows if r["impl"] == "liger"}
    for r in rows:
        r["vs_liger"] = r["gb"] / liger[r["call"]] if r["call"] in liger else None
    return rows


def _time_logit_rows(row: dict, launch: Launch, scale: float, V: int) -> dict:
    """A loss kernel's launch (one program per token row) at `scale` times its captured rows, over V logits each."""
    programs = round(launch.num_programs * scale)
    t = kernel_time.streaming(H100_SXM, row, programs * V, programs, _dtype_name(launch))
    row.setdefault("time", {**t, "reference": f"{programs} rows x V = {V}"})
    return t


def _dtype_name(launch: Launch) -> str:
    first = next((a for a in launch.args if torch.is_tensor(a) and a.is_floating_point()), None)
    return {torch.float32: "tf32"}.get(getattr(first, "dtype", None), "bf16")


def flat_report(compile_) -> tuple:
    """(per-kernel rows' bytes per parameter, GXPO bookkeeping bytes per parameter and modelled ms at
    FLAT_PARAMS: unfused and fused into FlatAdamW)."""
    from gxpo_kernels.optim.flat.adamw_kernel import FUSED_SPACES

    labelled, _ = flat_launches()
    per_param, ms = {}, {}
    for label, launch in labelled:  # the aligned twin of a one-unaligned launch comes first
        m = compile_("ours", launch, 1)
        programs = math.ceil(FLAT_PARAMS / (_block_of(launch) * launch.kwargs.get("BPP", 1)))
        twin_bytes = per_param.get(label.removesuffix(ONE_UNALIGNED))  # one of its two block loops runs per block
        m.setdefault("time", {**kernel_time.streaming(H100_SXM, m, FLAT_PARAMS, programs, "tf32", twin_bytes),
                              "reference": f"{FLAT_PARAMS:.3g} parameters"})
        if not label.endswith(ONE_UNALIGNED):  # compiled for their rows; their TTGIR holds both loops, one walked
            per_param[label] = sum(m["program_bytes"].values()) / _block_of(launch)
            ms[label] = m["time"]["ms"]

    def fused(x, suffix=""):  # the AdamW launches' bytes beyond a plain AdamW step's
        return ((x["adamw_snapshot" + suffix] - x["adamw"]) + 2 * x["grad_norm"]
                + (x["adamw_extrapolate" + suffix] - x["adamw"]) + x["grad_dots_g0"])

    def step(x):  # one GXPO active step: probe snapshot, two norms, extrapolation, the corrective dots
        return {"unfused": x["snapshot"] + x["grad_norm"] + x["extrapolate"] + x["grad_dots_g0"],
                "fused_flat_adamw": fused(x),
                **{f"fused_flat_adamw_{space}": fused(x, "_" + space) for space in FUSED_SPACES}}

    return per_param, step(per_param), step(ms)


def loss_variant_launches(V=151936, rows=4):
    """The loss launchers' other constexpr combinations (dual clip, entropy, on-policy, no reference, fp32
    logits, the fused-linear path), so that every configuration is compiled and checked for spills."""
    from gxpo_kernels import fused_linear_grpo_loss, grpo_loss

    launches = []
    variants = ((torch.bfloat16, {"dual_clip_c": 3.0, "return_entropy": True}), (torch.bfloat16, {"on_policy": 1}),
                (torch.float32, {}))
    for dtype, kw in variants:
        x, ids, mask, adv, old, ref = _loss_inputs(V, rows, dtype)
        on_policy = kw.pop("on_policy", 0)
        with captured_launches() as captured:
            loss, _ = grpo_loss(x, ids, adv, mask, None if on_policy else old, None if on_policy else ref,
                                beta=0.0 if on_policy else 0.04, **kw)
            torch.autograd.grad(loss, x)
        launches += captured
    hidden, weight = torch.randn(1, rows, 64, dtype=torch.bfloat16), torch.randn(V, 64, dtype=torch.bfloat16)
    ids = torch.randint(0, V, (1, rows))
    with captured_launches() as captured:
        fused_linear_grpo_loss(hidden, weight, ids, torch.ones(1), torch.ones(1, rows), return_entropy=True,
                               impl="chunked")
    return launches + captured


def tiled_launches(N=256, V=4096, H=256):
    """The tiled LM-head loss's kernels at the GPU's tile config, bf16: forward (bias, entropy) and backward
    (all three gradients), and the filtered backward."""
    from gxpo_kernels import fused_linear_grpo_loss

    g = torch.Generator().manual_seed(0)
    launches = []
    for filter_eps in (0.0, 2.0**-12):
        hidden, weight, bias = (torch.randn(*shape, generator=g).to(torch.bfloat16).requires_grad_()
                                for shape in ((1, N, H), (V, H), (V,)))
        ids, old = torch.randint(0, V, (1, N), generator=g), -torch.rand(1, N, generator=g)
        with captured_launches() as captured:
            loss, _ = fused_linear_grpo_loss(hidden, weight, ids, torch.ones(1), torch.ones(1, N), old,
                                             lm_head_bias_V=bias, return_entropy=True, impl="tiled",
                                             filter_eps=filter_eps)
            torch.autograd.grad(loss, (hidden, weight, bias))
        launches += captured if filter_eps == 0 else captured[1:]
    from gxpo_kernels.loss import fused_linear_token_logprobs

    with captured_launches() as captured:  # the vocabulary primitive's backward, entropy coefficient on
        logp, entropy = fused_linear_token_logprobs(hidden, weight, ids, torch.ones(1, N), lm_head_bias_V=bias,
                                                    impl="tiled")
        torch.autograd.grad((logp + 0.01 * entropy).sum(), (hidden, weight, bias))
    return launches + captured[1:]


def _time_tiled_row(row: dict, launch: Launch, N: int, V: int, H: int) -> dict:
    """A tiled LM-head kernel at [N, H] x [V, H]: its tiles, H-chunks, programs and the HBM bytes of its half
    of fused_linear_bytes' tiled terms."""
    from gxpo_kernels.loss.lm_head_kernels import tile_config

    kw, cfg = launch.kwargs, tile_config(N, V, H, torch.device("cuda"))
    terms = fused_linear_bytes(N, V, H)["tiled_terms"]
    row_tiles, tiles = math.ceil(N / kw["BLOCK_N"]), math.ceil(N / kw["BLOCK_N"]) * math.ceil(V / kw["BLOCK_V"])
    forward = launch.name == "_lm_head_fwd_kernel"
    hbm = sum(v for k, v in terms.items() if k.startswith("forward" if forward else "backward"))
    t = kernel_time.tiled(H100_SXM, row, tiles, math.ceil(H / kw["BLOCK_H"]),
                          row_tiles * cfg["splits"] if forward else tiles, hbm)
    return {**t, "reference": f"N = {N}, V = {V}, H = {H}"}


def fused_linear_bytes(N: int, V: int, H: int, dtype_bytes: int = 2) -> dict:
    """Bytes one forward+backward of the LM-head loss moves through HBM at [N, H] x [V, H], per path, with the
    L2 reuse each path's launch order gives (a model, spelled out term by term in the returned dict).

    chunked: per chunk of C tokens (the launcher's default C) the logits matmul writes [C, V], pass 1 reads it,
    pass 2 reads and writes it, the two gradient matmuls read it; each matmul streams the weight (and the
    d_weight addmm reads and writes d_weight). tiled: the forward streams the weight once and the hidden
    states once per vocabulary split; the backward streams both again, its fp32 d_hidden rows of a group
    stay in L2 (one read and write each), every d_weight tile is read and written once per group of token
    tiles, and both fp32 accumulators are cast to the weights' dtype at the end."""
    import triton

    from gxpo_kernels.loss.lm_head_autograd import default_chunk_tokens
    from gxpo_kernels.loss.lm_head_kernels import tile_config

    h, w, logits = N * H * dtype_bytes, V * H * dtype_bytes, N * V * dtype_bytes

    def chunked_terms(C):
        return {"logit passes (write, pass 1, pass 2 read+write, 2 matmul reads)": 6 * logits,
                "weight per chunk (logits mm, d_hidden mm, d_weight read+write)": triton.cdiv(N, C) * 4 * w,
                "hidden (3 reads), d_hidden write": 4 * h}

    C = default_chunk_tokens(N, V, H)
    chunked, chunked_2048 = chunked_terms(C), chunked_terms(2048)
    cfg = tile_config(N, V, H, torch.device("cuda"))
    groups = triton.cdiv(triton.cdiv(N, cfg["BLOCK_N"]), cfg["group_n"])
    tiled = {"forward: weight once, hidden once per split": w + cfg["splits"] * h,
             "forward: [N] partials": 4 * 4 * cfg["splits"] * N,
             "backward: weight and hidden": w + h,
             "backward: fp32 d_hidden read+write": 2 * N * H * 4,
             "backward: fp32 d_weight read+write per token group": groups * 2 * V * H * 4,
             "casts of both accumulators to the weights' dtype": (N + V) * H * (4 + dtype_bytes)}
    total = {"chunked": sum(chunked.values()), "chunked_2048": sum(chunked_2048.values()), "tiled": sum(tiled.values())}
    return {"N": N, "V": V, "H": H, "chunk_tokens": C, "tile_config": cfg, "token_groups": groups,
            "chunked_terms": chunked, "tiled_terms": tiled, "gb": {k: v / 1e9 for k, v in total.items()},
            "tiled_vs_chunked": total["tiled"] / total["chunked"],
            "tiled_vs_chunked_2048": total["tiled"] / total["chunked_2048"]}


def capo_launches(H=1536, V=4096, K=50, n=8):
    """Both CAPO modes' kernels: the variant's gathered quadratic form, the official prospective Adam terms."""
    from trainer.plugins.capo.kernels import gathered_quadratic
    from trainer.plugins.capo.official_kernels import prospective_adam_terms

    rows = torch.randint(0, V, (n, K))
    with captured_launches() as launches:
        gathered_quadratic(torch.randn(n, H), torch.rand(V, H), rows)
        prospective_adam_terms(torch.randn(n, H), torch.randn(n, K), rows,
                               (torch.zeros(V, H), torch.rand(V, H), 0.9, 0.999, 1e-8, 3))
    return launches


def build(N=16384, V=151936, T=1024, params=FLAT_PARAMS, with_liger=True, H=1536) -> dict:
    compile_ = Compiler()
    with sm90_target():
        calls = loss_report(compile_, N, V, T, with_liger)
        per_param, bookkeeping, bookkeeping_ms = flat_report(compile_)
        for launch in capo_launches():
            trips = math.ceil(1536 / _block_of(launch))
            m = compile_("ours", launch, trips)
            m.setdefault("time", {**kernel_time.streaming(H100_SXM, m, launch.num_programs * _block_of(launch) * trips,
                                                          launch.num_programs, "tf32"), "reference": "as captured"})
        for launch in loss_variant_launches(V):
            m = compile_("ours", launch, V / _block_of(launch))
            _time_logit_rows(m, launch, N / launch.num_programs, V)
        for launch in tiled_launches():
            m = compile_("ours", launch, 1)  # bytes of the tiled kernels: fused_linear_bytes (L2 reuse modelled)
            m.setdefault("time", _time_tiled_row(m, launch, N, V, H))
    kernels = list(compile_.cache.values())
    import triton

    return {"model": "static sm_90 (H100 SXM) model: compiled, not run", "triton": triton.__version__,
            "shape": {"N": N, "V": V, "T": T, "H": H,
                                "params": params, "logits_dtype": "bf16", "hbm_bytes_per_s": HBM_BYTES_PER_S},
            "kernels": kernels, "loss_calls": calls, "flat_bytes_per_param": per_param,
            "fused_linear": fused_linear_bytes(N, V, H),
            "gxpo_bookkeeping_bytes_per_param": bookkeeping,
            "gxpo_bookkeeping_ms_at_roofline": {k: v * params / HBM_BYTES_PER_S * 1e3 for k, v in bookkeeping.items()},
            "gxpo_bookkeeping_modelled_ms": bookkeeping_ms,
            "csrc_kernels": static_csrc.report(), "time_model": time_report.report(compiled_peers=with_liger)}


def _kernel_key(k: dict) -> tuple:
    return k["impl"], k["kernel"], k["config"]


def spilling(report: dict) -> list:
    """Our compiled kernels (Triton and CUDA C++) that spill registers: 'kernel [config]: N B'."""
    rows = [k for k in report["kernels"] if k["impl"] == "ours"] + report.get("csrc_kernels", [])
    return [f"{k['kernel']} [{k['config']}]: {k['spill_bytes']} B" for k in rows if k.get("spill_bytes")]


def beside(report: dict, other: dict, path: str) -> dict:
    """Each kernel row of `report` next to the same kernel (impl, kernel, config) in `other`, a report built
    under another Triton: registers, spills, CTAs/SM, the hot loop's instructions and the modelled time."""
    theirs = {_kernel_key(k): k for k in other["kernels"]}
    pick = lambda k: None if k is None else {  # noqa: E731
        "regs": k["regs"], "spill_bytes": k["spill_bytes"], "ctas_per_sm": k["ctas_per_sm"],
        "hot_loop_instrs_per_elem": k["hot_loop_instrs_per_elem"], "ms": k.get("time", {}).get("ms")}
    return {"path": path, "triton": other.get("triton", "unrecorded"),
            "rows": [{"key": list(_kernel_key(k)), "ours": pick(k), "theirs": pick(theirs.get(_kernel_key(k)))}
                     for k in report["kernels"]]}


def _beside_markdown(report: dict) -> list:
    b = report.get("beside")
    if not b:
        return []
    mine, other = report["triton"], b["triton"]
    out = [f"## Kernels under Triton {mine} and Triton {other}", "",
           f"The rows above (Triton {mine}) beside the same kernel and config compiled by Triton {other} "
           f"(`{b['path']}`, `make compat`: the lower bounds); `-`: no such row there. Modelled ms: the launch's "
           "time in the table below, a model of sm_90.", "",
           f"| impl | kernel | config | regs {mine} / {other} | spill B | CTAs/SM | hot-loop instrs/elem | "
           "modelled ms |", "|---|---|---|---|---|---|---|---|"]
    fmt = lambda r, key, f=str: "-" if r is None or r[key] is None else f(r[key])  # noqa: E731
    for row in b["rows"]:
        a, t = row["ours"], row["theirs"]
        cells = [f"{fmt(a, key, f)} / {fmt(t, key, f)}" for key, f in
                 (("regs", str), ("spill_bytes", str), ("ctas_per_sm", str),
                  ("hot_loop_instrs_per_elem", lambda v: ", ".join(map(str, v))), ("ms", lambda v: f"{v:.3g}"))]
        out.append("| " + " | ".join(row["key"] + cells) + " |")
    return out + [""]


def _fused_linear_markdown(fl: dict) -> list:
    cfg = fl["tile_config"]
    out = ["## LM-head loss (fused linear): bytes of one forward+backward", "",
           f"N = {fl['N']}, V = {fl['V']}, H = {fl['H']}, bf16 hidden states and weight. Chunked: the launcher's "
           f"default {fl['chunk_tokens']} tokens per chunk (and 2048 for comparison). Tiled: {cfg['BLOCK_N']} x "
           f"{cfg['BLOCK_V']} tiles, {cfg['splits']} vocabulary splits in the forward, {fl['token_groups']} token "
           "groups in the backward. L2 reuse as each launch order gives it (gxpo_bench/static.py fused_linear_bytes); "
           "the tiled kernels' rows in the table above count per-program bytes, not these.", "",
           "| path | GB | tiled / path |", "|---|---|---|",
           f"| chunked ({fl['chunk_tokens']}) | {fl['gb']['chunked']:.1f} | {fl['tiled_vs_chunked']:.3f} |",
           f"| chunked (2048) | {fl['gb']['chunked_2048']:.1f} | {fl['tiled_vs_chunked_2048']:.3f} |",
           f"| tiled | {fl['gb']['tiled']:.1f} | 1 |", "", "| tiled term | GB |", "|---|---|"]
    out += [f"| {k} | {v / 1e9:.2f} |" for k, v in fl["tiled_terms"].items()]
    return out + [""]


def to_markdown(report: dict, command: str) -> str:
    sh = report["shape"]
    out = [f"# Static sm_90 model (`{command}`)", "",
           "A model of an H100 from kernels compiled for sm_90 on a CPU machine: not a GPU timing. Issue / memory "
           "time: the hottest loop's instructions at one warp instruction per scheduler per clock, over its bytes at "
           "the roofline (above 100% a kernel would be issue-bound); a flat kernel's loop over a tensor's masked tail "
           "(scalar accesses, once per tensor) is listed but not the hot loop. "
           f"Loss calls at N = {sh['N']} tokens, V = {sh['V']}, bf16 logits; roofline "
           f"{sh['hbm_bytes_per_s'] / 1e12:g} TB/s.",
           "", "## Kernels", "",
           "| impl | kernel | config | regs | spill B | CTAs/SM | LDG bits | STG bits | barriers | tensor-core "
           "instrs (in loops) | atomic instrs (B/program) | hot-loop instrs/elem | B/elem | issue / memory time |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    hist = lambda h: " ".join(f"{n}x{w}" for w, n in h.items()) or "-"  # noqa: E731
    for k in report["kernels"]:
        out.append(f"| {k['impl']} | {k['kernel']} | {k['config']} | {k['regs']} | {k['spill_bytes']} | "
                   f"{k['ctas_per_sm']} ({k['occupancy_limiter']}) | {hist(k['ldg_bits'])} | {hist(k['stg_bits'])} | "
                   f"{k['barriers']} | {k['tensor_core_instrs']} ({k['tensor_core_in_loops']}) | "
                   f"{k['atomic_instrs']} ({k['atomic_bytes_per_program']:g}) | "
                   f"{', '.join(map(str, k['hot_loop_instrs_per_elem']))} | "
                   f"{k['bytes_per_elem']:g} | {_pct(k['issue_vs_memory'])} |")
    out += ["", "## Loss calls: bytes of one forward+backward", "",
            "| impl | call | GB | vs Liger | kernels GB | torch ops GB | torch ops | ms at roofline | modelled ms |",
            "|---|---|---|---|---|---|---|---|---|"]
    for c in report["loss_calls"]:
        vs = f"{c['vs_liger']:.2f}x" if c["vs_liger"] else "-"
        ops = ", ".join(f"{k} x{v}" for k, v in c["torch_ops"].items()) or "-"
        out.append(f"| {c['impl']} | {c['call']} | {c['gb']:.1f} | {vs} | {c['kernel_gb']:.1f} | "
                   f"{c['torch_op_gb']:.1f} | {ops} | {c['gb'] * 1e9 / sh['hbm_bytes_per_s'] * 1e3:.2f} | "
                   f"{c['modelled_ms']:.2f} |")
    out += ["", "Calls: " + "; ".join(f"`{k}`: {v}" for k, v in LOSS_CALLS.items()) + ".", "",
            *_fused_linear_markdown(report["fused_linear"]),
            "## GXPO bookkeeping, bytes per parameter (fp32 state)", "",
            "| kernel | B/param |", "|---|---|"]
    out += [f"| {k} | {v:g} |" for k, v in report["flat_bytes_per_param"].items()]
    bk, ms = report["gxpo_bookkeeping_bytes_per_param"], report["gxpo_bookkeeping_ms_at_roofline"]
    modelled = report["gxpo_bookkeeping_modelled_ms"]
    out += ["", f"Per GXPO active step: {bk['unfused']:g} B/param with separate flat kernels, "
            f"{bk['fused_flat_adamw']:g} B/param fused into FlatAdamW; at {sh['params']:.3g} parameters "
            f"{ms['unfused']:.1f} ms and {ms['fused_flat_adamw']:.1f} ms at the roofline; modelled (the kernel "
            f"launches' times below, {FLAT_PARAMS:.3g} parameters): {modelled['unfused']:.1f} ms and "
            f"{modelled['fused_flat_adamw']:.1f} ms. In the GXPO authors' current retention spaces, fused: "
            + "; ".join(f"{key.split('_')[-1]} {bk[key]:g} B/param, {modelled[key]:.1f} ms modelled"
                        for key in bk if key.startswith("fused_flat_adamw_"))
            + "."]
    out += ["", *_beside_markdown(report), *kernel_time.markdown(report["kernels"], H100_SXM.name)]
    out += static_csrc.to_markdown(report.get("csrc_kernels", []))
    out += [""] + time_report.to_markdown(report["time_model"])
    return "\n".join(out) + "\n"

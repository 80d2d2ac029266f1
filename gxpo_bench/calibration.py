"""The time model against timings nobody here wrote: each row a published measurement, the model's
prediction for the same work on the same GPU, and the error. Rows marked `fit` set the profiles' efficiency
constants (gxpo_kernels/devices.py); the others check the model on work it was not fit to."""

import math
from dataclasses import dataclass

from gxpo_kernels.devices import A100_SXM4, H200
from gxpo_kernels.loss import lm_head_cost as cost

MIB = 1 << 20
LIGER_SOURCE = "linkedin/Liger-Kernel benchmark/data/all_benchmark_data.csv"
LIGER_MAIN = f"{LIGER_SOURCE} @ ead96b61 (liger 0.2.1, A100-SXM4-80GB)"
LIGER_H200 = f"{LIGER_SOURCE} @ 8ca11b28 (pull request 1348, liger 0.8.0, H200)"
CCE_SOURCE = "Wijmans et al., arXiv 2411.09009, Table 1 (A100-SXM4 80GB)"

# (V, forward ms, full ms): Liger's cross-entropy kernel, fp32 logits [16384, V] (B = 8, T = 2048)
LIGER_CE_A100 = [(4096, 0.5324, 0.8637), (8192, 0.8101, 1.4623), (16384, 1.4321, 2.7455),
                 (32768, 2.8378, 5.4033), (65536, 6.8051, 11.9250), (131072, 15.0094, 25.2229)]
# (BT, forward ms, backward ms, full ms): torch's Linear + CrossEntropyLoss, bf16, H = 4096, V = 128256
TORCH_FLCE_H200 = [(1024, 1.7448, 3.8478, 5.5110), (2048, 3.4155, 7.2115, 10.7412),
                   (4096, 6.5651, 13.4718, 21.3533), (8192, 14.4502, 27.4364, 42.0916)]
# CCE's kernels at N = 8192, V = 256000, H = 2304, bf16 (Gemma 2 2B): (row, measured ms)
CCE_A100 = [("CCE loss (forward)", 43.0), ("CCE, no gradient filter: gradient", 324.0)]
CCE_README = "apple/ml-cross-entropy README.md @ 18e76ada, `python -m benchmark` (A100-SXM4, PyTorch 2.4.1)"
# the same shape, its benchmark's expected output: (method, loss-fw, loss-bw, loss-fw-bw ms)
CCE_README_A100 = [("torch_compile", 49.9, 92.3, 144.0), ("baseline", 81.9, 122.4, 208.8)]
CCE_FWD_TILES = {"BLOCK_N": 256, "BLOCK_V": 128}  # cut_cross_entropy's forward config (BLOCK_B, BLOCK_V)
CCE_BWD_TILES = {"BLOCK_N": 128, "BLOCK_V": 128}


@dataclass
class Row:
    what: str
    device: str
    source: str
    measured_ms: float
    modelled_ms: float
    fit: bool = False

    @property
    def error(self) -> float:
        return self.modelled_ms / self.measured_ms - 1


def fit_efficiencies() -> dict:
    """The achievable fractions the measurements give: an 8192^3 bf16 GEMM at about 790 TFLOP/s on an H200 (wave
    quantization of its 2048 output tiles on 132 SMs taken out), a device-to-device copy at about 4.3 TB/s."""
    quantization = cost.wave_quantization(H200, 8192, 8192, 8192)
    return {"tensor_efficiency": 790e12 / (H200.tensor_flops["bf16"] * quantization),
            "hbm_efficiency": 4.3e12 / H200.hbm_bytes_per_s}


def _ms(step_or_plan) -> float:
    return step_or_plan.seconds * 1e3


def rows() -> list:
    out = [Row("bf16 GEMM 8192^3", "H200", "measured about 790 TFLOP/s",
               2 * 8192**3 / 790e12 * 1e3, _ms(cost.gemm(H200, "", 8192, 8192, 8192, 3 * 8192**2 * 2)), fit=True),
           Row("device-to-device copy, 1 GiB", "H200", "measured about 4.3 TB/s read+write",
               2 * 1024 * MIB / 4.3e12 * 1e3, _ms(cost.memory_pass(H200, "", 2 * 1024 * MIB)), fit=True)]
    for V, fwd, full in LIGER_CE_A100:
        logits = 16384 * V * 4
        # forward: the loss and the gradient in place, two reads and one write; full adds AccumulateGrad's copy
        out.append(Row(f"Liger cross_entropy forward, V = {V}", "A100", LIGER_MAIN, fwd,
                       _ms(cost.memory_pass(A100_SXM4, "", 3 * logits))))
        out.append(Row(f"Liger cross_entropy full, V = {V}", "A100", LIGER_MAIN, full,
                       _ms(cost.memory_pass(A100_SXM4, "", 5 * logits))))
    H, V = 4096, 128256
    for BT, fwd, bwd, full in TORCH_FLCE_H200:
        logits = BT * V * 2
        forward = [cost.gemm(H200, "", BT, V, H, (BT + V) * H * 2 + logits),
                   cost.memory_pass(H200, "", 4 * logits)]  # log_softmax: two reads, a write; nll: a read
        backward = [cost.gemm(H200, "", BT, H, V, logits + V * H * 2 + BT * H * 2),
                    cost.gemm(H200, "", V, H, BT, logits + BT * H * 2 + V * H * 2),
                    cost.memory_pass(H200, "", 4 * logits)]  # nll and log_softmax backward
        f, b = sum(_ms(s) for s in forward), sum(_ms(s) for s in backward)
        out += [Row(f"torch Linear+CE forward, BT = {BT}", "H200", LIGER_H200, fwd, f),
                Row(f"torch Linear+CE backward, BT = {BT}", "H200", LIGER_H200, bwd, b),
                Row(f"torch Linear+CE full, BT = {BT}", "H200", LIGER_H200, full, f + b)]
    N, V, H = 8192, 256000, 2304
    fwd_step = cost.tiled(A100_SXM4, N, V, H, {**CCE_FWD_TILES, "splits": 1}).steps[0]
    bwd_step = cost.tiled(A100_SXM4, N, V, H, {**CCE_BWD_TILES, "group_n": 8}).steps[1]
    out += [Row(CCE_A100[0][0], "A100", CCE_SOURCE, CCE_A100[0][1], _ms(fwd_step)),
            Row(CCE_A100[1][0], "A100", CCE_SOURCE, CCE_A100[1][1], _ms(bwd_step))]
    return out


LIGER_CE_ROWS = 16384  # B = 8, T = 2048


def compiled_liger_rows() -> list:
    """Liger's cross-entropy rows again, from its kernel as compiled for sm_80 (liger_cross_entropy_kernel at
    each V, captured from liger_kernel.transformers.functional.liger_cross_entropy) and the per-launch time
    model (gxpo_bench/kernel_time.py) on the A100 profile; full adds AccumulateGrad's copy of the gradient.
    Needs liger-kernel and a Triton that compiles for sm_80 (the static report's toolchain)."""
    from importlib.metadata import version

    import torch
    from liger_kernel.transformers.functional import liger_cross_entropy

    from . import kernel_time, static

    out = []
    with static.sm90_target(arch=80):
        for V, fwd, full in LIGER_CE_A100:
            x = torch.randn(4, V, requires_grad=True)
            with static.captured_launches() as launches:
                liger_cross_entropy(x, torch.randint(0, V, (4,))).backward()
            [launch] = launches  # the loss and its gradient in one kernel; backward with grad_output 1 skips its mul
            block = static._block_of(launch)
            row = static.compile_launch(launch, V / block, block, arch=80)
            t = kernel_time.streaming(A100_SXM4, row, LIGER_CE_ROWS * V, LIGER_CE_ROWS, "tf32", every_loop=True)
            copy = _ms(cost.memory_pass(A100_SXM4, "", 2 * LIGER_CE_ROWS * V * 4))
            where = (f"{LIGER_MAIN}; liger {version('liger-kernel')}'s kernel compiled for sm_80, {row['regs']} "
                     f"registers, bound: {t['bound']}")
            out += [Row(f"Liger cross_entropy forward, V = {V}, compiled", "A100", where, fwd, t["ms"]),
                    Row(f"Liger cross_entropy full, V = {V}, compiled", "A100", where, full, t["ms"] + copy)]
    return out


CCE_SHAPE = (8192, 256000, 2304)  # N, V, H (Gemma 2 2B on Alpaca), bf16


def cce_baseline_rows() -> list:
    """The CCE benchmark's two baselines at its shape, as their torch ops: `baseline` is F.cross_entropy of
    (E @ C.T).float() in eager mode (the logits GEMM writes bf16 logits; the cast reads them and writes fp32;
    log_softmax reads its input twice and writes once; its backward reads the gradient and the output and
    writes once, the cast's backward reads fp32 and writes bf16, nll_loss's backward writes a dense fp32
    gradient); torch_compile fuses the row work into one read of the bf16 logits forward and one read and one
    bf16 write backward. Both backwards run the two gradient GEMMs."""
    N, V, H = CCE_SHAPE
    L, dev = N * V, A100_SXM4
    operands = (N + V) * H * 2

    def gemms(backward_logit_bytes):
        return [cost.gemm(dev, "", N, H, V, L * backward_logit_bytes + operands),
                cost.gemm(dev, "", V, H, N, L * backward_logit_bytes + operands)]
    logits = cost.gemm(dev, "", N, V, H, operands + L * 2)
    plans = {"baseline": ([logits, cost.memory_pass(dev, "", L * (2 + 4) + L * (3 * 4))],
                          [cost.memory_pass(dev, "", L * 4 + L * 3 * 4 + L * (4 + 2))] + gemms(2)),
             "torch_compile": ([logits, cost.memory_pass(dev, "", L * 2)],
                               [cost.memory_pass(dev, "", L * (2 + 2))] + gemms(2))}
    out = []
    for method, fwd, bwd, full in CCE_README_A100:
        f, b = (sum(_ms(step) for step in steps) for steps in plans[method])
        out += [Row(f"CCE benchmark {method} loss-fw", "A100", CCE_README, fwd, f),
                Row(f"CCE benchmark {method} loss-bw", "A100", CCE_README, bwd, b),
                Row(f"CCE benchmark {method} loss-fw-bw", "A100", CCE_README, full, f + b)]
    return out


def compiled_cce_rows() -> list:
    """CCE's own kernels (cut-cross-entropy 25.1.1, its default configs: forward BLOCK_B 256 x BLOCK_V 128 x
    BLOCK_D 32, 8 warps; backward 128 x 128 x 32, 4 warps, gradients added under per-chunk locks) compiled for
    sm_80 and read loop by loop (kernel_time.tiled_loops) on the A100 profile at the paper's shape. HBM: E once;
    C once per group of GROUP_B = 8 token tiles (the launch order keeps a group's C tile in L2 across it); the
    backward adds dC's read-modify-write once per group (dE's group slab stays in L2). The forward's
    indexed dot (the target logits) is one read of E and of the targets' rows of C. Needs cut-cross-entropy
    and a Triton that compiles for sm_80."""
    from importlib.metadata import version

    import torch
    from cut_cross_entropy.cce_backward import cce_backward_kernel
    from cut_cross_entropy.cce_lse_forward import cce_lse_forward_kernel

    from . import kernel_time, static

    N, V, H = CCE_SHAPE
    n, v, h = 256, 256, 256  # a capture shape with CCE's even-H heuristics as at H = 2304
    e, c = torch.randn(n, h).bfloat16(), torch.randn(v, h).bfloat16().requires_grad_()
    with static.sm90_target(arch=80), static.captured_launches() as launches:
        cce_lse_forward_kernel(e, c)
        cce_backward_kernel(torch.ones(n), e, c, torch.zeros(n), None, None, None, targets=torch.zeros(n).long())
    out, where = [], f"{CCE_SOURCE}; cut-cross-entropy {version('cut-cross-entropy')}'s kernels compiled for sm_80"
    with static.sm90_target(arch=80):
        for launch, measured in zip(launches, CCE_A100, strict=True):
            kw = launch.kwargs
            backward = "MM_BACK_BLOCK_D" in kw  # its two gradient loops walk H in twice the logits loop's step
            trips = [H // kw["BLOCK_D"]] + ([H // kw["MM_BACK_BLOCK_D"]] * 2 if backward else [])
            row = static.compile_launch(launch, trips, kw["BLOCK_V"], arch=80)
            row_tiles = math.ceil(N / kw["BLOCK_B"])
            tiles = row_tiles * math.ceil(V / kw["BLOCK_V"])
            groups = math.ceil(row_tiles / kw["GROUP_B"])
            hbm = N * H * 2 * (1 + backward) + groups * V * H * 2 * (1 + 2 * backward) + N * 4
            t = kernel_time.tiled_loops(A100_SXM4, row, tiles, trips, tiles, hbm)
            ms = t["ms"] + (0 if backward else _ms(cost.memory_pass(A100_SXM4, "", 2 * N * H * 2)))
            out.append(Row(f"{measured[0]}, compiled", "A100", f"{where}, {row['regs']} registers, "
                           f"{row['spill_bytes']} B spilled, bound: {t['bound']}", measured[1], ms))
            if backward:  # its gradient loops are not pipelined and hold a lock over their read-modify-write
                r = t["resource_ms"]
                out.append(Row(f"{measured[0]}, compiled, tensor + L2 serialized", "A100",
                               f"{where}; the gradient loops' L2 traffic ({r['l2']:.0f} ms) after their tensor work "
                               f"({r['tensor']:.0f} ms), not under it", measured[1], r["tensor"] + r["l2"]))
    return out


def to_markdown(table: list) -> list:
    fit = fit_efficiencies()
    out = ["## Time model: calibration", "",
           "Published timings next to the model's prediction for the same work on the same GPU. `fit` rows set "
           f"the profiles' constants: tensor-core efficiency {fit['tensor_efficiency']:.3f} of the dense peak, HBM "
           f"efficiency {fit['hbm_efficiency']:.3f} of the nominal bandwidth (gxpo_kernels/devices.py carries them "
           "rounded; a test keeps the two within 1%). Other rows check the model on work it was not fit to; their "
           "error is shown, not fit away.", "",
           "| row | GPU | measured ms | modelled ms | error | source |", "|---|---|---|---|---|---|"]
    for r in table:
        out.append(f"| {r.what}{' (fit)' if r.fit else ''} | {r.device} | {r.measured_ms:.3f} | "
                   f"{r.modelled_ms:.3f} | {100 * r.error:+.0f}% | {r.source} |")
    checked = [r for r in table if not r.fit]
    within = sum(abs(r.error) <= 0.30 for r in checked)
    out += ["", f"{within} of {len(checked)} checked rows within +-30%."]
    return out + [""]

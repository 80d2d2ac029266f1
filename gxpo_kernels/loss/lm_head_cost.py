"""A time and memory model of one forward+backward of the LM-head loss at [N, H] x [V, H], per design, on a
device profile: each step is a GEMM (cuBLAS: tensor-core FLOPs at the fit efficiency and the wave
quantization of its output tiles, or its bytes, whichever is longer), a pass over memory (bytes at the fit
HBM efficiency), or a fused kernel with HBM, L2, tensor-core and atomic terms. impl="auto" picks by it;
`gxpo-bench static` reports it next to the compiled kernels. A model of the chip, not a timing."""

import math
from dataclasses import dataclass, field

from ..devices import DeviceProfile

ELEMENT_BYTES = {"bf16": 2, "fp16": 2, "tf32": 4, "fp32": 4}


@dataclass
class Step:
    name: str
    times: dict  # resource -> seconds
    count: int = 1  # how many times the step runs (chunks)

    @property
    def seconds(self) -> float:
        return self.count * max(self.times.values())

    @property
    def bound(self) -> str:
        return max(self.times, key=self.times.get)


@dataclass
class Plan:
    impl: str
    chunk_tokens: int | None
    steps: list = field(default_factory=list)
    extra_bytes: int = 0  # peak memory beyond the inputs and the gradients handed back

    @property
    def seconds(self) -> float:
        return sum(s.seconds for s in self.steps)

    def resource_seconds(self) -> dict:
        out = {}
        for s in self.steps:
            out[s.bound] = out.get(s.bound, 0.0) + s.seconds
        return out

    @property
    def bound(self) -> str:
        totals = self.resource_seconds()
        return max(totals, key=totals.get)


MAX_SPLIT_K, MIN_SPLIT_K = 16, 512  # at most 16 K-splits, each at least 512 deep


def matmul_peak(dev: DeviceProfile, dtype: str) -> float:
    """Dense FLOP/s of a matmul with inputs of `dtype` ("bf16", "fp16", "tf32"; "fp32": FFMA, no tensor cores)."""
    return dev.ffma_flops if dtype == "fp32" else dev.tensor_flops[dtype]


def wave_quantization(dev: DeviceProfile, M: int, N: int, K: int) -> float:
    """The busy share of the SMs over a GEMM's waves of output tiles; a long K is split (cuBLAS's split-K /
    stream-K) to fill them."""
    tm, tn = dev.gemm_tile
    tiles = math.ceil(M / tm) * math.ceil(N / tn)
    return max(tiles * s / (math.ceil(tiles * s / dev.sms) * dev.sms)
               for s in range(1, max(1, min(MAX_SPLIT_K, K // MIN_SPLIT_K)) + 1))


def gemm(dev: DeviceProfile, name: str, M: int, N: int, K: int, nbytes: float, dtype="bf16", count=1) -> Step:
    quantization = wave_quantization(dev, M, N, K)
    flops = 2.0 * M * N * K
    return Step(name, {"tensor": flops / (matmul_peak(dev, dtype) * dev.tensor_efficiency * quantization),
                       "hbm": nbytes / (dev.hbm_bytes_per_s * dev.hbm_efficiency)}, count)


def memory_pass(dev: DeviceProfile, name: str, nbytes: float, count=1) -> Step:
    return Step(name, {"hbm": nbytes / (dev.hbm_bytes_per_s * dev.hbm_efficiency)}, count)


def chunks(total: int, size: int) -> list:
    """[(rows, count)]: `count` chunks of `rows` that cover `total`, the short last one apart."""
    n, last = divmod(total, size)
    return [(size, n)] * bool(n) + [(last, 1)] * bool(last)


def three_gemms_at_peak(dev: DeviceProfile, N: int, V: int, H: int, dtype="bf16") -> float:
    """The floor the issue's moonshot is set against: logits, d_hidden and d_weight GEMMs at the dense peak."""
    return 3 * 2.0 * N * V * H / matmul_peak(dev, dtype)


def chunked(dev: DeviceProfile, N: int, V: int, H: int, C: int, dtype: str = "bf16") -> Plan:
    """loss/lm_head_autograd.py ChunkedLMHeadGRPOLossFunction: per chunk of C tokens the logits GEMM writes
    [C, V], the row kernels read it (pass 1) and read+write dlogits in place (pass 2), the d_hidden GEMM reads
    it and the d_weight GEMM adds into d_weight (read+write); the backward scales the two gradients."""
    e = ELEMENT_BYTES[dtype]
    plan = Plan("chunked", C, extra_bytes=C * V * e)
    for rows, count in chunks(N, C):
        logits = rows * V * e
        plan.steps += [
            gemm(dev, "logits GEMM", rows, V, H, rows * H * e + V * H * e + logits, dtype, count),
            memory_pass(dev, "row pass 1 + pass 2 (dlogits in place)", 3 * logits, count=count),
            gemm(dev, "d_hidden GEMM", rows, H, V, logits + V * H * e + rows * H * e, dtype, count),
            gemm(dev, "d_weight GEMM (addmm_)", V, H, rows, logits + rows * H * e + 2 * V * H * e, dtype, count),
        ]
    plan.steps.append(memory_pass(dev, "backward: gradients * grad_output", 2 * (N + V) * H * e))
    return plan


def tiled(dev: DeviceProfile, N: int, V: int, H: int, cfg: dict, dtype: str = "bf16") -> Plan:
    """loss/lm_head_kernels.py: the forward's (token tile, split) programs and the backward's (token tile,
    vocabulary tile) programs; every tile reloads its operands from L2; the backward recomputes the logits
    and adds fp32 d_hidden and d_weight tiles atomically ((BLOCK_N + BLOCK_V) x H adds per tile)."""
    e, bn, bv = ELEMENT_BYTES[dtype], cfg["BLOCK_N"], cfg["BLOCK_V"]
    tiles = math.ceil(N / bn) * math.ceil(V / bv)
    operands = tiles * (bn + bv) * H * e  # one read of both operand tiles over H, per tile
    flops = 2.0 * N * V * H
    peak = matmul_peak(dev, dtype) * dev.tensor_efficiency
    l2, hbm = dev.l2_bytes_per_s, dev.hbm_bytes_per_s * dev.hbm_efficiency
    splits = cfg.get("splits", 1)
    groups = math.ceil(math.ceil(N / bn) / cfg.get("group_n", 1))
    fwd = Step("tiled forward", {"tensor": flops / peak, "l2": operands / l2,
                                 "hbm": (V * H * e + splits * N * H * e) / hbm})
    atomics = tiles * (bn + bv) * H * 4
    bwd = Step("tiled backward", {"tensor": 3 * flops / peak, "l2": 2 * operands / l2,
                                  "atomics": atomics / dev.atomic_bytes_per_s,
                                  "hbm": (V * H * e + N * H * e + 2 * N * H * 4 + groups * 2 * V * H * 4) / hbm})
    cast = memory_pass(dev, "casts of the fp32 accumulators", (N + V) * H * (4 + e))
    return Plan("tiled", None, [fwd, bwd, cast], extra_bytes=(N + V) * H * 4)


CHUNK_CANDIDATES = (256, 512, 1024, 2048, 4096, 8192)
NEAR_BEST = 1.03  # the smallest chunk within 3% of the fastest: its logits buffer is the smallest


def best_chunked(dev: DeviceProfile, N: int, V: int, H: int, dtype: str = "bf16") -> Plan:
    """The fastest chunk whose [C, V] logits buffer is no larger than the LM head's weight (C <= H; 256 at
    least), the smallest one within NEAR_BEST of it."""
    sizes = [C for C in CHUNK_CANDIDATES if C <= max(H, CHUNK_CANDIDATES[0])]
    plans = [chunked(dev, N, V, H, min(C, N), dtype) for C in sizes if C < 2 * N or C == sizes[0]]
    fastest = min(p.seconds for p in plans)
    return next(p for p in plans if p.seconds <= NEAR_BEST * fastest)


def matmul_dtype(dtype, fp32_precision: str) -> str:
    """The matmul input type a torch dtype runs as: fp32 follows torch.get_float32_matmul_precision()
    ("highest": FFMA, no tensor cores; "high" / "medium": tf32)."""
    name = str(dtype).removeprefix("torch.")
    if name == "float32":
        return "fp32" if fp32_precision == "highest" else "tf32"
    return {"bfloat16": "bf16", "float16": "fp16"}[name]


def choose(dev: DeviceProfile, N: int, V: int, H: int, dtype: str, tiled_config: dict | None) -> Plan:
    """The faster of the chunked plan and the tiled one (tiled_config None: the tiled kernels are not an
    option, e.g. deterministic=True rules out their atomics)."""
    plans = [best_chunked(dev, N, V, H, dtype)]
    if tiled_config is not None:
        plans.append(tiled(dev, N, V, H, tiled_config, dtype))
    return min(plans, key=lambda p: p.seconds)

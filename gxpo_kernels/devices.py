"""GPU profiles for the time model: peak rates with their sources, and the achievable fractions fit to
published measurements (gxpo_bench/calibration.py shows the fit). The LM-head loss's impl="auto" reads
them (loss/lm_head_cost.py) and so does `gxpo-bench static`."""

from dataclasses import dataclass


@dataclass(frozen=True)
class DeviceProfile:
    name: str
    sm: int  # compute capability, e.g. 90
    sms: int
    clock_hz: float  # boost clock: the issue, MUFU and FFMA rates
    hbm_bytes_per_s: float  # nominal
    l2_bytes: int
    l2_bytes_per_s: float  # all SMs reading from L2
    tensor_flops: dict  # dense peak by input dtype name ("bf16", "tf32")
    ffma_flops: float  # fp32 FMA peak (2 FLOP each)
    mufu_per_clk_per_sm: int = 16  # ex2 / rcp / rsqrt / lg2
    schedulers_per_sm: int = 4  # one warp instruction per scheduler per clock
    smem_bytes_per_clk_per_sm: int = 128  # 32 banks x 4 bytes
    # achievable fractions of the peaks: fit to the calibration table's measurements (gxpo_bench/calibration.py)
    hbm_efficiency: float = 0.90
    tensor_efficiency: float = 0.80
    l2_atomic_bytes_per_s: float | None = None  # fp32 reductions at L2 (4 B each); None: l2_bytes_per_s
    gemm_tile: tuple = (128, 256)  # cuBLAS's output tile for large bf16 GEMMs (wave quantization)
    sources: tuple = ()

    @property
    def warp_instr_per_s(self) -> float:
        return self.sms * self.schedulers_per_sm * self.clock_hz

    @property
    def smem_bytes_per_s(self) -> float:
        return self.sms * self.smem_bytes_per_clk_per_sm * self.clock_hz

    @property
    def mufu_per_s(self) -> float:
        return self.sms * self.mufu_per_clk_per_sm * self.clock_hz

    @property
    def atomic_bytes_per_s(self) -> float:
        return self.l2_atomic_bytes_per_s or self.l2_bytes_per_s


_HOPPER_SOURCES = (
    "SMs, clock: NVIDIA H100 Tensor Core GPU Architecture whitepaper (132 SMs on SXM5) and datasheet (max boost "
    "1.98 GHz)",
    "dense tensor peaks: NVIDIA H100 / H200 datasheets (bf16 1979 TFLOP/s and tf32 989 TFLOP/s with sparsity, "
    "half that dense); FFMA: 128 fp32 lanes per SM per clock (CUDA C++ Programming Guide, throughput table, cc 9.0)",
    "MUFU: 16 per SM per clock for exp2 / rcp / rsqrt (CUDA C++ Programming Guide, throughput table, cc 9.0)",
    "shared memory: 32 banks of 4 bytes per SM per clock (CUDA C++ Programming Guide, shared memory, cc 9.0)",
    "L2: 50 MB (whitepaper); bandwidth: Chips and Cheese's H100 PCIe measurement (~5.5 TB/s at 1.755 GHz) scaled "
    "to the SXM boost clock",
    "efficiencies: fit to a bf16 8192^3 GEMM on an H200 (about 790 TFLOP/s) and a device-to-device copy (about "
    "4.3 TB/s read+write), gxpo_bench/calibration.py",
)

H100_SXM = DeviceProfile(
    name="H100 SXM", sm=90, sms=132, clock_hz=1.98e9, hbm_bytes_per_s=3.35e12, l2_bytes=50 << 20,
    l2_bytes_per_s=5.5e12 * 1.98 / 1.755, tensor_flops={"bf16": 989.4e12, "fp16": 989.4e12, "tf32": 494.7e12},
    ffma_flops=132 * 128 * 2 * 1.98e9, sources=_HOPPER_SOURCES + ("HBM3 3.35 TB/s: H100 SXM datasheet",))

H200 = DeviceProfile(
    name="H200", sm=90, sms=132, clock_hz=1.98e9, hbm_bytes_per_s=4.8e12, l2_bytes=50 << 20,
    l2_bytes_per_s=5.5e12 * 1.98 / 1.755, tensor_flops={"bf16": 989.4e12, "fp16": 989.4e12, "tf32": 494.7e12},
    ffma_flops=132 * 128 * 2 * 1.98e9, sources=_HOPPER_SOURCES + ("HBM3e 4.8 TB/s: H200 datasheet",))

A100_SXM4 = DeviceProfile(
    name="A100 SXM4 80GB", sm=80, sms=108, clock_hz=1.41e9, hbm_bytes_per_s=2.039e12, l2_bytes=40 << 20,
    l2_bytes_per_s=4.8e12,  # Chips and Cheese's A100 L2 measurement (about 4.8 TB/s)
    tensor_flops={"bf16": 312e12, "fp16": 312e12, "tf32": 156e12}, ffma_flops=19.5e12, gemm_tile=(128, 128),
    sources=("NVIDIA A100 datasheet: 108 SMs, 1.41 GHz, bf16 312 TFLOP/s dense, HBM2e 2.039 TB/s, L2 40 MB",
             "MUFU 16 per SM per clock (CUDA C++ Programming Guide, cc 8.0)",
             "efficiencies: the Hopper fit (no A100 measurement of our own); the CCE table checks them"))

PROFILES = {"h100": H100_SXM, "h200": H200, "a100": A100_SXM4}


def profile_for(device_name: str | None) -> DeviceProfile:
    """The profile of a torch.cuda.get_device_name() string (H100 when unknown or None)."""
    name = (device_name or "").lower()
    for key in ("h200", "a100"):
        if key in name:
            return PROFILES[key]
    return H100_SXM

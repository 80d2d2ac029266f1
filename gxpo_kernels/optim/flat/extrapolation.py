"""The one home of GXPO's extrapolation constants (docs/algorithm.md, step 3) and of the layout of its
statistics. The torch reference, the Triton kernels and (through csrc/extrapolation.h, generated from
this file by setup.py and checked by tests/test_extrapolation_constants.py) the C++ and CUDA kernels all
take them from here, so a change is one edit. A leaf module: it imports nothing of the package."""

R_MIN, R_MAX = -2.0, 3.0  # the retention ratio r = g1 / g0 is clamped to [R_MIN, R_MAX]
DELTA = 1e-8  # |g0| <= DELTA: an inactive coordinate (r = scale = 1); also the S_2 guard
TINY_G0_NORM = 1e-8  # ||g0|| <= this (or non-finite): no extrapolation, one plain step


def scale_cap(K: int) -> float:
    """The largest per-coordinate scale S_K / S_2 may take: K / 2 + 1."""
    return K / 2 + 1


def kernel_scalars(K: int, alpha: float, delta: float, g1_scale: float = 1.0) -> tuple:
    """(g1_scale, alpha, delta, scale cap): the scalar arguments every backend's extrapolation (Triton, C++,
    CUDA) takes, in this order."""
    return float(g1_scale), float(alpha), float(delta), scale_cap(K)


# Sums (and one max) reduced over all coordinates; every path writes them in this order.
EXTRAP_STATS = ("g0_sq", "g1_sq", "g0_g1", "n_active", "r_sum", "r_sq", "n_clipped", "scale_sum", "scale_max",
                "d_sq", "scaled_d_sq")
MAX_STAT = "scale_max"  # reduced by max (starting at 1); every other statistic by sum


def c_header() -> str:
    """csrc/extrapolation.h: these constants for the C++ and CUDA kernels."""
    lines = ["// Generated from gxpo_kernels/optim/flat/extrapolation.py by setup.py; edit that file, not this one.",
             "#pragma once", "",
             f"constexpr double kRMin = {R_MIN!r};", f"constexpr double kRMax = {R_MAX!r};",
             f"constexpr int kNumStats = {len(EXTRAP_STATS)};",
             f"constexpr int kMaxStat = {EXTRAP_STATS.index(MAX_STAT)};  // {MAX_STAT}, reduced by max", "",
             "// Slots of the statistics vector:"]
    lines += [f"//   {i}: {name}" for i, name in enumerate(EXTRAP_STATS)]
    return "\n".join(lines) + "\n"

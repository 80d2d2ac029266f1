// Generated from gxpo_kernels/optim/flat/extrapolation.py by setup.py; edit that file, not this one.
#pragma once

constexpr double kRMin = -2.0;
constexpr double kRMax = 3.0;
constexpr int kNumStats = 11;
constexpr int kMaxStat = 8;  // scale_max, reduced by max

// Slots of the statistics vector:
//   0: g0_sq
//   1: g1_sq
//   2: g0_g1
//   3: n_active
//   4: r_sum
//   5: r_sq
//   6: n_clipped
//   7: scale_sum
//   8: scale_max
//   9: d_sq
//   10: scaled_d_sq

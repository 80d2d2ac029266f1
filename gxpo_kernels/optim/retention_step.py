"""GXPO's extrapolation in the retention spaces its authors run now (optim/retention.py), on the live
parameters one tensor at a time in torch (github SwapniL-afk-now/final-gxpo 1a301e16, dp_actor.py's
_gxpo_minibatch_step):

- raw_grad: r = g1 / g0 on raw gradients, |g0| > delta: the earlier code the presets `final` and `paper`
  follow; the flat kernels' path (optim/flat), not this module's.
- grad: r = (c1 g1) / (c0 g0) with the clip multipliers c = min(1, max_grad_norm / (||g|| + 1e-12)), active
  where the raw |g0| > 1e-3 RMS(g0) (their legacy space; the A/B baseline's).
- update: the base optimizer's own space. For decoupled AdamW, d_t = ((1 - lr wd) theta_t - theta_{t+1}) / lr
  reconstructed from the probe displacement u0 = theta1 - theta0 and theta2, r = d1 / d0, active where
  |d0| > 1e-3 RMS(d0).
- auto: update under decoupled AdamW, else grad with one warning (as theirs).

Over a Muon base (optim/muon.py) the authors' kinds (dp_actor.py, _gxpo_retention_kinds): under auto ("update"
here) a Muon-owned matrix takes one scalar per matrix, rho = <u0, u1> / <u0, u0> with u1 = theta2 - theta1 (as
theirs, <u0, u1> = <u0, theta2 - theta0> - <u0, u0>), both dots over the whole matrix (one all-reduce for all
matrices), rho clamped to [-1, 1], scale S_K(rho) / S_2(rho) in [0, K/2 + 1] (retention.update_space_retention),
the matrix moved as a whole (its direction, Muon's, kept); the AdamW-owned parameters take AdamW's direction
space above (Muon's AdamW branch is a decoupled step too). Their forced "update" takes the per-matrix scalar
for every tensor ("update_per_tensor" here); grad takes the gradient space everywhere.

RMS is over the whole tensor: the local shards' sums of squares and element counts are summed over ranks
first. Buffers: theta0 and g0 (the flat snapshot) and one more per parameter, u0 (update) or the raw g1
(grad): three model-sized, as the authors keep. This module runs over any base but FlatAdamW on the Triton path,
whose two launches compute the update and grad spaces themselves (optim/fused_retention.py: two buffers, d0
rebuilt from AdamW's moments)."""

import math
import warnings

import torch

from .flat.buffers import local
from .flat.extrapolation import EXTRAP_STATS
from .muon import Muon, muon_owned
from .retention import (
    adamw_direction,
    adamw_direction_from_step,
    coordinatewise_retention,
    reposition,
    rms_of_sums,
    update_space_retention,
    work_dtype,
)

RETENTION_SPACES = ("raw_grad", "grad", "update", "auto")
PER_TENSOR = "update_per_tensor"  # what "update" resolves to over a Muon base: one scalar per tensor, every tensor
CLIP_EPS = 1e-12  # their recorded clip multiplier min(1, clip / (||g|| + 1e-12))
# How a tensor's retention is estimated: coordinatewise on the raw gradients (grad) or on AdamW's direction
# (direction), or one scalar for the whole tensor from the probe displacements (matrix)
GRAD, DIRECTION, MATRIX = "grad", "direction", "matrix"
SPACE_FAMILY = {"grad": GRAD, "update": DIRECTION, PER_TENSOR: MATRIX}  # a space's family unless classified
COORDINATEWISE_KEYS = ("cos_g0_g1", "r_mean", "r_std", "r_mean_active", "scale_mean_active", "inactive_frac",
                       "ratio_clip_frac")  # GXPO's statistics of the coordinatewise ratio (family_stats)


def decoupled_adamw(base) -> bool:
    return isinstance(base, torch.optim.AdamW)


def resolve_space(space: str, base) -> str:
    """The space this base optimizer runs in: auto -> update (decoupled AdamW) or grad (one warning). Over a Muon
    base: auto -> update (per matrix for its matrices, AdamW's direction for the rest), update -> PER_TENSOR."""
    if isinstance(base, Muon):
        return {"auto": "update", "update": PER_TENSOR}.get(space, space)
    if space == "update" and not decoupled_adamw(base):
        raise ValueError(f"retention_space = 'update' reads the step of a decoupled AdamW; {type(base).__name__} "
                         "is not one: use 'grad' or 'auto'")
    if space != "auto":
        return space
    if decoupled_adamw(base):
        return "update"
    warnings.warn(f"GXPO retention_space = 'auto': {type(base).__name__} is not a decoupled AdamW, so the retention "
                  "ratio is taken in the gradient space (r = c1 g1 / c0 g0)", stacklevel=4)
    return "grad"


def clip_multiplier(norm: float, max_grad_norm) -> float:
    return 1.0 if max_grad_norm is None else min(1.0, max_grad_norm / (abs(norm) + CLIP_EPS))


def hyperparameters(base) -> dict:
    """id(param) -> (lr, decoupled weight decay) as the base optimizer's groups hold them now."""
    return {id(p): (float(g["lr"]), float(g.get("weight_decay", g.get("wd", 0.0))))
            for g in base.param_groups for p in g["params"]}


class Probe:
    """The third model-sized buffer per parameter: u0 = theta1 - theta0 (direction and matrix families) or the raw
    g1 (grad); each tensor's family (families, set at the first step; the space's own family when unset); and,
    after extrapolate, the per-matrix family's statistics (matrix_stats)."""

    def __init__(self, space: str):
        self.space, self.bufs, self.hp0, self.families = space, {}, {}, {}
        self.muon_base = False
        self.matrix_stats = None  # extrapolate: {"n", "numel", "n_direction", "n_coordinatewise", "sums"}

    def family(self, p) -> str:
        return self.families.get(id(p), SPACE_FAMILY[self.space])

    def after_first_step(self, groups, base, had_grad):
        """theta1 is in place: each tensor's family, u0 and the pass-1 hyperparameters."""
        self.hp0 = hyperparameters(base)
        self.muon_base = isinstance(base, Muon)
        if self.space == "update" and self.muon_base:
            owned = muon_owned(base)
            self.families = {id(p): MATRIX if id(p) in owned else DIRECTION for g in groups for p in g.params}
        for g in groups:
            for j, p in enumerate(g.params):
                if id(p) in had_grad and self.family(p) != GRAD:
                    self.bufs[id(p)] = local(p).detach() - g.view(g.theta0, j)

    def after_second_backward(self, groups):
        """The raw (pre-clip) g1 (grad family)."""
        for g in groups:
            for p in g.params:
                if p.grad is not None and self.family(p) == GRAD:
                    self.bufs[id(p)] = local(p.grad).detach().clone()


def matrix_dots(theta0, u0, theta2) -> torch.Tensor:
    """[<u0, u1>, <u0, u0>] of this rank's shard, float64, as theirs: <u0, theta2 - theta0> - <u0, u0> (theta1 is
    never formed: the two large dots <u0, theta2>, <u0, theta1> would cancel away the digits)."""
    work = work_dtype(theta0, u0, theta2)
    u0 = u0.to(work)
    disp2 = theta2.to(work) - theta0.to(work)
    self_dot = (u0 * u0).sum(dtype=torch.float64)
    return torch.stack([(u0 * disp2).sum(dtype=torch.float64) - self_dot, self_dot])


def reduce_matrix_dots(dots: torch.Tensor, all_reduce) -> torch.Tensor:
    """Every matrix's dots summed over the FSDP shards: one collective for all of them."""
    return all_reduce(dots)


def extrapolate(probe: Probe, groups, base, had_grad, *, K: int, alpha: float, delta: float, min_eff: float,
                c0: float, c1: float, all_reduce) -> torch.Tensor:
    """theta_tilde into the parameters (theta2 -> theta0 + eff (theta2 - theta0)); returns the EXTRAP_STATS
    sums of this rank (float64), in the coordinatewise families' own den / num (the per-matrix family adds its
    scale to scale_max and its displacements to d_sq / scaled_d_sq, its own statistics to probe.matrix_stats)."""
    hp1 = hyperparameters(base)
    items, matrices = [], []  # (group, index, param, den, num) coordinatewise; (group, index, param) per matrix
    n_direction = 0
    for g in groups:
        for j, p in enumerate(g.params):
            if id(p) not in had_grad:
                continue
            theta0, family = g.view(g.theta0, j), probe.family(p)
            if family == MATRIX:
                matrices.append((g, j, p))
                continue
            if family == GRAD:
                den = g.view(g.g0, j)  # g1 = 0 where pass 2 gave this tensor no gradient
                num = probe.bufs[id(p)] if id(p) in probe.bufs else torch.zeros_like(den)
            else:
                n_direction += 1
                (lr0, wd0), (lr1, wd1) = probe.hp0[id(p)], hp1[id(p)]
                if not (lr0 > 0 and lr1 > 0):  # their neutral branch: scale 1, no ratio
                    items.append((g, j, p, None, None))
                    continue
                u0 = probe.bufs[id(p)]
                den = adamw_direction_from_step(theta0, u0, lr0, wd0)
                num = adamw_direction(theta0 + u0, local(p).detach(), lr1, wd1)
            items.append((g, j, p, den, num))
    device = groups[0].device
    rows = [torch.stack([den.double().square().sum(), torch.full((), float(den.numel()), dtype=torch.float64,
                                                                 device=den.device)]).to(device)
            for *_, den, _ in items if den is not None]
    totals = all_reduce(torch.stack(rows)) if rows else None
    index = {k: i for i, k in enumerate(EXTRAP_STATS)}
    sums = torch.zeros(len(EXTRAP_STATS), dtype=torch.float64, device=device)
    sums[index["scale_max"]] = 1.0

    def move(theta0, theta2, scale):
        disp2 = theta2.to(scale.dtype) - theta0.to(scale.dtype)
        sums[index["d_sq"]] += (disp2 * disp2).double().sum().to(device)
        sums[index["scaled_d_sq"]] += ((disp2 * scale) ** 2).double().sum().to(device)
        theta2.copy_(reposition(theta0, theta2, scale, alpha, min_eff).to(theta2.dtype))

    row = 0
    for g, j, p, den, num in items:
        theta0, theta2 = g.view(g.theta0, j), local(p).detach()
        if den is None:
            scale = torch.ones((), dtype=work_dtype(theta2), device=theta2.device)
        else:
            rms = rms_of_sums(totals[row, 0], totals[row, 1])
            row += 1
            scale_c0, scale_c1 = (c0, c1) if probe.family(p) == GRAD else (1.0, 1.0)
            ratio, scale, active, clipped = coordinatewise_retention(den, num, K, delta, scale_c0, scale_c1, rms)
            d, n, r = den.double(), num.double(), torch.where(active, ratio, 0).double()
            part = {"g0_sq": (d * d).sum(), "g1_sq": (n * n).sum(), "g0_g1": (d * n).sum(),
                    "n_active": active.sum().double(), "r_sum": r.sum(), "r_sq": (r * r).sum(),
                    "n_clipped": clipped.sum().double(), "scale_sum": torch.where(active, scale, 0).double().sum()}
            for k, v in part.items():
                sums[index[k]] += v.to(device)
            sums[index["scale_max"]] = torch.maximum(sums[index["scale_max"]], scale.max().double().to(device))
        move(theta0, theta2, scale)

    probe.matrix_stats = {"n": len(matrices), "numel": float(sum(p.numel() for _, _, p in matrices)),
                          "n_direction": n_direction, "n_coordinatewise": len(items), "sums": None}
    if matrices:
        dots = reduce_matrix_dots(torch.stack([
            matrix_dots(g.view(g.theta0, j), probe.bufs[id(p)], local(p).detach()).to(device)
            for g, j, p in matrices]), all_reduce)
        rho, scales = update_space_retention(dots[:, 0], dots[:, 1], K, delta)  # one scalar per matrix
        numels = torch.tensor([float(p.numel()) for _, _, p in matrices], dtype=torch.float64, device=device)
        probe.matrix_stats["sums"] = torch.stack([rho.sum(), (rho < 0).double().sum(), scales.sum(),
                                                  (scales * numels).sum()])  # the same on every rank
        sums[index["scale_max"]] = torch.maximum(sums[index["scale_max"]], scales.max())
        for (g, j, p), scale in zip(matrices, scales, strict=True):
            theta2 = local(p).detach()
            move(g.view(g.theta0, j), theta2, scale.to(work_dtype(theta2)))
    return sums


def family_stats(probe, sums: dict, n_total: float, **stats) -> dict:
    """An active GXPO step's last_stats: stats (over every coordinate, gxpo.py) as they are unless the base is
    Muon. Then the census n_params_muon (tensors on the per-matrix estimator) and n_params_adamw (on AdamW's
    direction); where matrices took the per-matrix estimator, rho_mean, rho_neg_frac and rho_scale_mean over the
    matrices, the coordinatewise ratio's statistics over the other coordinates only (absent when no tensor took a
    coordinatewise estimator), and scale_mean over all coordinates with each matrix's scale on its coordinates."""
    if probe is None or not probe.muon_base or probe.matrix_stats is None:
        return stats
    family = probe.matrix_stats
    stats = {**stats, "n_params_muon": float(family["n"]), "n_params_adamw": float(family["n_direction"])}
    if not family["n"]:
        return stats
    rho_sum, n_negative, scale_sum, weighted_scale_sum = family["sums"].tolist()
    n_coords = n_total - family["numel"]  # the coordinates outside the matrices (inactive ones count as 1)
    n_inactive = n_coords - sums["n_active"]
    stats["scale_mean"] = (sums["scale_sum"] + n_inactive + weighted_scale_sum) / n_total
    if family["n_coordinatewise"]:
        r_mean = (sums["r_sum"] + n_inactive) / n_coords
        stats.update(r_mean=r_mean, r_std=math.sqrt(max((sums["r_sq"] + n_inactive) / n_coords - r_mean**2, 0.0)),
                     inactive_frac=n_inactive / n_coords)
    else:
        stats = {k: v for k, v in stats.items() if k not in COORDINATEWISE_KEYS}
    return {**stats, "rho_mean": rho_sum / family["n"], "rho_neg_frac": n_negative / family["n"],
            "rho_scale_mean": scale_sum / family["n"]}


RETENTION_KINDS = {"gradient": 0.0, "adamw_direction": 1.0, "muon_matrix": 2.0, "mixed": 3.0}  # the authors' codes
DISP_EPS = 1e-12  # their dispK / (disp2 + 1e-12)


def reposition_stats(stats: dict, *, space: str, alpha: float, min_eff: float, n_tensors: int, c0: float,
                     c1: float) -> dict:
    """The authors' reposition diagnostics on top of an active step's stats (gxpo.py, family_stats):
    effective_multiplier, the mean over every coordinate of max(alpha scale, min_effective_multiplier), and
    contracting (1 where it is below 1), given only where the stats determine it (no floor, or a floor at most
    alpha with no per-matrix scale below 1 possible); dispK_over_disp2 = ||scale (theta2 - theta0)|| /
    ||theta2 - theta0||; retention_kind (RETENTION_KINDS) and the tensors per estimator family, n_params_grad /
    adamw / muon (tensors with a gradient, as theirs count, all three always); clip_scale_g0 / g1, the clip
    multipliers c0, c1."""
    out = dict(stats)
    if min_eff == 0 or (min_eff <= alpha and not stats.get("n_params_muon")):
        out["effective_multiplier"] = alpha * stats["scale_mean"]
        out["contracting"] = float(out["effective_multiplier"] < 1.0)
    out["dispK_over_disp2"] = stats["scaled_step_norm"] / (stats["step_norm"] + DISP_EPS)
    n_muon = stats.get("n_params_muon", 0.0)  # family_stats' census over a Muon base
    n_adamw = stats.get("n_params_adamw", float(n_tensors) if space == "update" else 0.0)
    counts = {"gradient": n_tensors - n_muon - n_adamw, "adamw_direction": n_adamw, "muon_matrix": n_muon}
    present = [kind for kind, n in counts.items() if n > 0]
    out["retention_kind"] = RETENTION_KINDS["mixed" if len(present) > 1 else present[0] if present else "gradient"]
    out.update(n_params_grad=float(counts["gradient"]), n_params_adamw=float(n_adamw), n_params_muon=float(n_muon))
    return {**out, "clip_scale_g0": c0, "clip_scale_g1": c1}

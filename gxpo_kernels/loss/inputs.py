"""Validation of grpo_loss arguments and their per-token form ([N] vectors, N = B * T)."""

import dataclasses
from dataclasses import dataclass

import torch

from .settings import LOSS_AGGS, STAT_NAMES, LossParams


@dataclass
class TokenInputs:
    B: int
    T: int
    ids_N: torch.Tensor
    adv_N: torch.Tensor
    mask_N: torch.Tensor
    weight_N: torch.Tensor  # loss = sum_t weight_t * per_token_loss_t (the loss_agg mode)
    old_N: torch.Tensor | None
    ref_N: torch.Tensor | None
    num_active: int


def _check_tensor(name, x, shape, device):
    if not torch.is_tensor(x):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if tuple(x.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(x.shape)}")
    if x.device != device:
        raise ValueError(f"{name} is on {x.device} but the logits are on {device}; move it there")


def _check_float(name, x):
    if x.dtype.is_floating_point is False:
        raise ValueError(f"{name} must be a floating-point tensor, got {x.dtype}")


def _check_ids_and_mask(B, T, device, completion_ids_BT, completion_mask_BT):
    """Shapes, device and dtype of the completion ids and mask: what every loss function checks first."""
    if B * T == 0:
        raise ValueError(f"empty batch: B={B}, T={T}; the loss needs at least one token position")
    _check_tensor("completion_ids_BT", completion_ids_BT, (B, T), device)
    if completion_ids_BT.dtype.is_floating_point or completion_ids_BT.dtype == torch.bool:
        raise ValueError(f"completion_ids_BT must be an integer tensor, got {completion_ids_BT.dtype}")
    _check_tensor("completion_mask_BT", completion_mask_BT, (B, T), device)


def _ids_and_mask_checks(ids_BT, mask_BT, on, V) -> list:
    """The device-side value checks of the ids and the mask (mask_ok, ids_ok), stacked with the caller's into one
    host sync; _raise_for_ids_and_mask reads them."""
    return [((mask_BT == 0) | (mask_BT == 1)).all(), ((ids_BT >= 0) & (ids_BT < V) | ~on).all()]


def _raise_for_ids_and_mask(mask_ok, ids_ok, V):
    if not mask_ok:
        raise ValueError("completion_mask_BT must hold only 0/1 (or bool) values")
    if not ids_ok:
        raise ValueError(f"completion_ids_BT has ids outside [0, {V}) at unmasked tokens; the vocabulary "
                         f"of the logits / LM head has V={V}")


def make_config(*, beta, eps_low, eps_high, dual_clip_c, temperature, loss_agg, max_completion_len,
                return_entropy, ref_logp_BT, log_ratio_clamp=None) -> LossParams:
    for name, eps in (("eps_low", eps_low), ("eps_high", eps_high)):
        if not 0 < eps < 1:
            raise ValueError(f"{name} must be in (0, 1), got {eps}")
    if dual_clip_c is not None and not dual_clip_c > 1:
        raise ValueError(f"dual_clip_c must be > 1 (or None to disable dual clipping), got {dual_clip_c}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if log_ratio_clamp is not None and not log_ratio_clamp > 0:
        raise ValueError(f"log_ratio_clamp must be > 0 (verl uses 20) or None to disable it, got {log_ratio_clamp}")
    if not beta >= 0:
        raise ValueError(f"beta must be >= 0, got {beta}")
    if beta > 0 and ref_logp_BT is None:
        raise ValueError("beta > 0 needs ref_logp_BT (the reference policy's log-probs) for the KL term")
    if loss_agg not in LOSS_AGGS:
        raise ValueError(f"unknown loss_agg {loss_agg!r}; choose one of {LOSS_AGGS}")
    if loss_agg == "seq-mean-token-sum-norm" and not (max_completion_len and max_completion_len > 0):
        raise ValueError("loss_agg='seq-mean-token-sum-norm' needs max_completion_len > 0 (Dr. GRPO's "
                         f"constant normalizer), got {max_completion_len}")
    return LossParams(temperature=float(temperature), eps_low=float(eps_low), eps_high=float(eps_high),
                      dual_clip_c=None if dual_clip_c is None else float(dual_clip_c), beta=float(beta),
                      with_entropy=bool(return_entropy),
                      log_ratio_clamp=None if log_ratio_clamp is None else float(log_ratio_clamp))


def prepare_token_inputs(B, T, V, device, stats_dtype, completion_ids_BT, advantages_B, completion_mask_BT,
                         old_logp_BT, ref_logp_BT, loss_agg, max_completion_len) -> TokenInputs:
    _check_ids_and_mask(B, T, device, completion_ids_BT, completion_mask_BT)
    if not torch.is_tensor(advantages_B) or advantages_B.dim() not in (1, 2):
        raise ValueError("advantages_B must be a tensor of shape [B] or per-token [B, T]")
    _check_tensor("advantages_B", advantages_B, (B,) if advantages_B.dim() == 1 else (B, T), device)
    _check_float("advantages_B", advantages_B)
    for name, x in (("old_logp_BT", old_logp_BT), ("ref_logp_BT", ref_logp_BT)):
        if x is not None:
            _check_tensor(name, x, (B, T), device)
            _check_float(name, x)

    mask_BT = completion_mask_BT.to(stats_dtype)
    adv_BT = advantages_B.to(stats_dtype)
    adv_BT = adv_BT[:, None].expand(B, T) if adv_BT.dim() == 1 else adv_BT
    on = mask_BT != 0
    ids_BT = completion_ids_BT.long()
    checks = [*_ids_and_mask_checks(ids_BT, mask_BT, on, V), (torch.isfinite(adv_BT) | ~on).all(), on.sum()]
    for x in (old_logp_BT, ref_logp_BT):
        checks.append(True if x is None else (torch.isfinite(x) | ~on).all())
    mask_ok, ids_ok, adv_ok, num_active, old_ok, ref_ok = torch.stack(
        [torch.as_tensor(c, device=device).to(torch.int64) for c in checks]).tolist()
    _raise_for_ids_and_mask(mask_ok, ids_ok, V)
    if not adv_ok:
        raise ValueError("advantages_B has NaN or inf at unmasked tokens; check the rewards (NaN rewards, "
                         "or a zero-variance group divided by std without an epsilon)")
    if not old_ok:
        raise ValueError("old_logp_BT has NaN or inf at unmasked tokens")
    if not ref_ok:
        raise ValueError("ref_logp_BT has NaN or inf at unmasked tokens")

    if loss_agg == "token-mean":
        weight_BT = mask_BT / mask_BT.sum().clamp(min=1)
    elif loss_agg == "seq-mean-token-mean":
        weight_BT = mask_BT / (B * mask_BT.sum(-1, keepdim=True).clamp(min=1))
    elif loss_agg == "seq-mean-token-sum":
        weight_BT = mask_BT / B
    else:
        weight_BT = mask_BT / (B * max_completion_len)

    flat = lambda x: None if x is None else x.reshape(B * T).to(stats_dtype).contiguous()  # noqa: E731
    masked = lambda x: None if x is None else flat(torch.where(on, x.to(stats_dtype), 0))  # noqa: E731
    return TokenInputs(
        B=B, T=T, ids_N=torch.where(on, ids_BT, 0).reshape(B * T).contiguous(),
        adv_N=flat(torch.where(on, adv_BT, 0)), mask_N=flat(mask_BT), weight_N=flat(weight_BT),
        old_N=masked(old_logp_BT), ref_N=masked(ref_logp_BT), num_active=num_active,
    )


def token_rows(B, T, V, device, completion_ids_BT, completion_mask_BT, L) -> tuple:
    """The vocabulary primitive's per-row inputs over L >= T logit positions: (ids_N, active_N), ids 0 and
    active 0.0 at masked tokens and at the last L - T positions; checked as grpo_loss checks them."""
    if completion_mask_BT is None:
        completion_mask_BT = torch.ones(B, T, device=device)
    _check_ids_and_mask(B, T, device, completion_ids_BT, completion_mask_BT)
    mask_BT = completion_mask_BT.to(torch.float32)
    on = mask_BT != 0
    ids_BT = completion_ids_BT.long()
    _raise_for_ids_and_mask(*torch.stack(_ids_and_mask_checks(ids_BT, mask_BT, on, V)).tolist(), V)
    pad = lambda x: torch.nn.functional.pad(x, (0, L - T)).reshape(B * L).contiguous()  # noqa: E731
    return pad(torch.where(on, ids_BT, 0)), pad(mask_BT)


def extend_positions(inputs: TokenInputs, L: int) -> TokenInputs:
    """The per-token vectors over L >= T logit positions per sequence: the last L - T positions score no
    token (weight 0), as a causal LM's final position does. The kernels then read and write the logits
    tensor as it is, with no slice and no copy."""
    pad = lambda x: None if x is None else torch.nn.functional.pad(  # noqa: E731
        x.view(inputs.B, inputs.T), (0, L - inputs.T)).reshape(inputs.B * L).contiguous()
    return dataclasses.replace(inputs, T=L, ids_N=pad(inputs.ids_N), adv_N=pad(inputs.adv_N), mask_N=pad(inputs.mask_N),
                               weight_N=pad(inputs.weight_N), old_N=pad(inputs.old_N), ref_N=pad(inputs.ref_N))


def nan_if_nonfinite(loss, stats, inputs: TokenInputs):
    """loss, or NaN when an unmasked token's log-prob is not finite (a NaN or inf logit, LM-head weight, bias or
    hidden state). On-policy the GRPO loss's value does not depend on the log-probs (the ratio is 1), so without
    this a diverged policy would report an ordinary loss; no host sync, and the gradient is left as it is."""
    bad = (~torch.isfinite(stats[STAT_NAMES.index("logp")]) & (inputs.mask_N != 0)).any()
    return loss + torch.where(bad, float("nan"), 0.0).to(loss.dtype)


def summarize(stats, inputs: TokenInputs, cfg: LossParams, has_ref: bool) -> dict:
    """Masked means of the per-token statistics, and the per-token log-probs (0 at masked tokens)."""
    row = {name: stats[i] for i, name in enumerate(STAT_NAMES)}
    n = inputs.mask_N.sum().clamp(min=1)
    mean = lambda name: (row[name] * inputs.mask_N).sum() / n  # noqa: E731
    metrics = {
        "clip_frac_low": mean("clip_low"),
        "clip_frac_high": mean("clip_high"),
        "ratio_mean": mean("ratio"),
        "logp_BT": row["logp"].view(inputs.B, inputs.T),
    }
    if cfg.dual_clip_c is not None:
        metrics["clip_frac_dual"] = mean("clip_dual")
    if has_ref:
        metrics["kl_mean"] = mean("kl")
    if cfg.with_entropy:
        metrics["entropy_mean"] = mean("entropy")
    return metrics

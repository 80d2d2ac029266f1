"""The public functions: the GRPO token-level clipped loss, and the vocabulary primitive any objective trains
through (vocab.py, objectives.py), each from logits or fused with the LM head."""

import functools
import inspect

import torch

from .. import backend, devices
from . import lm_head_cost
from .inputs import extend_positions, make_config, nan_if_nonfinite, prepare_token_inputs, summarize, token_rows
from .lm_head_autograd import ChunkedLMHeadGRPOLossFunction, TiledLMHeadGRPOLossFunction
from .lm_head_kernels import tile_config
from .logits_autograd import GRPOLossFunction
from .objectives import PolicyObjective, policy_loss
from .vocab import ChunkedLMHeadTokenLogprobs, LogitsTokenLogprobs, TiledLMHeadTokenLogprobs


def _stats_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _check_floating(name, x, dim):
    if not torch.is_tensor(x) or x.dim() != dim or not x.dtype.is_floating_point:
        shape = getattr(x, "shape", type(x).__name__)
        raise ValueError(f"{name} must be a floating-point tensor with {dim} dims, got {shape}")


def grpo_loss(
    logits_BTV, completion_ids_BT, advantages_B, completion_mask_BT,
    old_logp_BT=None, ref_logp_BT=None, beta=0.0,
    eps_low=0.2, eps_high=0.2, dual_clip_c=None, temperature=1.0,
    loss_agg="token-mean", max_completion_len=None, return_entropy=False,
    inplace=False, log_ratio_clamp=None, objective=None, sampling_logp_BT=None,
):
    """GRPO token-level clipped loss from logits [B, T, V]; logits[:, t] scores completion_ids[:, t].

    logits_BTV may also be a causal LM's [B, T + 1, V] (the positions that predict the completion, plus
    the last one, which predicts nothing): pass it whole rather than logits[:, :-1], and the kernels
    read and write it as it is (a slice would cost autograd a zero-filled [B, T + 1, V] and a copy).

    per_token = -min(rho * A, clip(rho, 1 - eps_low, 1 + eps_high) * A), rho = exp(logp - old_logp)
    (old_logp None: on-policy, rho == 1 with its gradient kept); with dual_clip_c = c and A < 0 the
    loss is capped at -c * A (dual clip); plus beta * k3 KL to ref_logp. A token with A == 0 has policy
    loss and gradient 0 even where rho overflows. log_ratio_clamp = c clamps logp - old_logp to [-c, c]
    before exp, with no gradient through rho outside it (verl's guard, c = 20; default off). Aggregated over the mask by
    loss_agg. On the Triton path the gradient is written in the backward (grad_output folded in on the
    device; elsewhere it is computed in the forward and scaled); inplace=True lets the kernel write it
    over the logits (saves an [N, V] buffer; the logits hold dlogits afterwards, so nothing else may
    need them).

    Returns (loss, metrics): metrics holds 0-d tensors clip_frac_low, clip_frac_high, ratio_mean,
    clip_frac_dual (dual clip), kl_mean (ref_logp given), entropy_mean (return_entropy), and logp_BT,
    the detached per-token log-probs (0 at masked tokens).

    objective=PolicyObjective(...) takes any other objective (TRL's loss types, GSPO, rollout correction
    from sampling_logp_BT, ...) in place of the GRPO arguments, through the vocabulary primitive: metrics
    then carry TRL's names (objectives.policy_loss), plus logp_BT.
    """
    if objective is not None:
        _check_no_grpo_args(beta, eps_low, eps_high, dual_clip_c, loss_agg, max_completion_len, log_ratio_clamp)
        logp_BT, entropy_BT = token_logprobs(logits_BTV, completion_ids_BT, completion_mask_BT, temperature,
                                             inplace=inplace)
        return _objective_loss(objective, logp_BT, entropy_BT, advantages_B, completion_mask_BT, old_logp_BT,
                               ref_logp_BT, sampling_logp_BT)
    _check_floating("logits_BTV", logits_BTV, 3)
    B, L, V = logits_BTV.shape
    T = _completion_len(completion_ids_BT, B, L)
    cfg = make_config(beta=beta, eps_low=eps_low, eps_high=eps_high, dual_clip_c=dual_clip_c,
                      temperature=temperature, loss_agg=loss_agg, max_completion_len=max_completion_len,
                      return_entropy=return_entropy, ref_logp_BT=ref_logp_BT, log_ratio_clamp=log_ratio_clamp)
    inputs = prepare_token_inputs(B, T, V, logits_BTV.device, _stats_dtype(logits_BTV), completion_ids_BT,
                                  advantages_B, completion_mask_BT, old_logp_BT, ref_logp_BT, loss_agg,
                                  max_completion_len)
    if L > T:
        inputs = extend_positions(inputs, L)
    loss, stats = GRPOLossFunction.apply(logits_BTV, inputs.ids_N, inputs.adv_N, inputs.weight_N,
                                         inputs.old_N, inputs.ref_N, cfg, inplace, None)
    metrics = summarize(stats, inputs, cfg, ref_logp_BT is not None)
    metrics["logp_BT"] = metrics["logp_BT"][:, :T]
    return nan_if_nonfinite(loss, stats, inputs), metrics


def fused_linear_grpo_loss(
    hidden_BTH, lm_head_weight_VH, completion_ids_BT, advantages_B, completion_mask_BT,
    old_logp_BT=None, ref_logp_BT=None, beta=0.0,
    eps_low=0.2, eps_high=0.2, dual_clip_c=None, temperature=1.0,
    loss_agg="token-mean", max_completion_len=None, return_entropy=False,
    lm_head_bias_V=None, chunk_tokens=None, log_ratio_clamp=None, impl="auto", filter_eps=0.0,
    deterministic=False, objective=None, sampling_logp_BT=None,
):
    """grpo_loss(hidden_BTH @ lm_head_weight_VH.T + lm_head_bias_V, ...) without the [N, V] logits.

    Only unmasked tokens go through the LM head. Differentiable w.r.t. hidden, weight and bias. impl:
    - "tiled": Triton kernels that compute the logits tile by tile with tensor-core dots and never write
      them (the Cut Cross-Entropy class): extra memory O(N) plus fp32 accumulators for the gradients;
      filter_eps > 0 skips the backward of a [tokens x vocab] tile whose every probability is below it
      and that holds no target (each skipped dlogits entry is below |c_n| * filter_eps, c_n the token's
      gradient coefficient; docs/algorithm.md). Needs CUDA (or Triton's interpreter, fp32).
    - "chunked": chunk_tokens tokens at a time through a logits buffer of [chunk_tokens, V] (default: on
      CUDA the time model's chunk, at most H tokens; elsewhere about the size of the hidden states); runs
      anywhere (torch ops on CPU).
    - "auto": on CUDA the faster by the time model (loss/lm_head_cost.py, the GPU's profile) at this shape
      and dtype, chunk size included: the chunked path at the reference shapes (its GEMMs run in cuBLAS);
      under the interpreter tiled; chunked elsewhere or when chunk_tokens is given.
    fp32 inputs follow torch.get_float32_matmul_precision() ("high" / "medium": tf32 tensor cores).
    deterministic=True: bitwise-reproducible gradients run to run (no atomics: the chunked path).
    objective=PolicyObjective(...): any other objective, as for grpo_loss (impl tiled or chunked; the chunked
    path then recomputes each chunk's logits in the backward).
    """
    if objective is not None:
        _check_no_grpo_args(beta, eps_low, eps_high, dual_clip_c, loss_agg, max_completion_len, log_ratio_clamp)
        if filter_eps or deterministic:
            raise ValueError("filter_eps and deterministic apply to the GRPO kernels, not to objective=")
        logp_BT, entropy_BT = fused_linear_token_logprobs(
            hidden_BTH, lm_head_weight_VH, completion_ids_BT, completion_mask_BT, lm_head_bias_V, temperature,
            impl=impl, chunk_tokens=chunk_tokens)
        return _objective_loss(objective, logp_BT, entropy_BT, advantages_B, completion_mask_BT, old_logp_BT,
                               ref_logp_BT, sampling_logp_BT)
    B, T, H = _check_lm_head(hidden_BTH, lm_head_weight_VH, lm_head_bias_V, chunk_tokens)
    V = lm_head_weight_VH.shape[0]
    impl, chunk_tokens = _fused_impl(impl, hidden_BTH, lm_head_weight_VH, chunk_tokens, filter_eps, deterministic)
    cfg = make_config(beta=beta, eps_low=eps_low, eps_high=eps_high, dual_clip_c=dual_clip_c,
                      temperature=temperature, loss_agg=loss_agg, max_completion_len=max_completion_len,
                      return_entropy=return_entropy, ref_logp_BT=ref_logp_BT, log_ratio_clamp=log_ratio_clamp)
    stats_dtype = _stats_dtype(hidden_BTH)
    inputs = prepare_token_inputs(B, T, V, hidden_BTH.device, stats_dtype, completion_ids_BT, advantages_B,
                                  completion_mask_BT, old_logp_BT, ref_logp_BT, loss_agg, max_completion_len)
    hidden_NH = hidden_BTH.reshape(B * T, H)
    per_token = [inputs.ids_N, inputs.adv_N, inputs.weight_N, inputs.old_N, inputs.ref_N]
    active_idx = None
    if inputs.num_active < B * T:
        active_idx = inputs.mask_N.nonzero().squeeze(1)
        hidden_NH = hidden_NH.index_select(0, active_idx)
        per_token = [None if x is None else x.index_select(0, active_idx) for x in per_token]
    if active_idx is not None and active_idx.numel() == 0:
        # Nothing to score: a zero loss that still connects to every input, so backward gives zeros.
        loss = _zero_connected(hidden_NH, lm_head_weight_VH, lm_head_bias_V, stats_dtype)
        stats = torch.zeros(8, 0, dtype=stats_dtype, device=hidden_BTH.device)
    elif impl == "tiled":
        loss, stats = TiledLMHeadGRPOLossFunction.apply(hidden_NH.contiguous(), lm_head_weight_VH.contiguous(),
                                                        lm_head_bias_V, *per_token, cfg, filter_eps)
    else:
        loss, stats = ChunkedLMHeadGRPOLossFunction.apply(hidden_NH, lm_head_weight_VH, lm_head_bias_V,
                                                        *per_token, cfg, chunk_tokens)
    if active_idx is not None:
        stats = torch.zeros(stats.shape[0], B * T, dtype=stats_dtype, device=stats.device).index_copy_(
            1, active_idx, stats)
    return nan_if_nonfinite(loss, stats, inputs), summarize(stats, inputs, cfg, ref_logp_BT is not None)


def _check_no_grpo_args(beta, eps_low, eps_high, dual_clip_c, loss_agg, max_completion_len, log_ratio_clamp):
    given = dict(beta=beta, eps_low=eps_low, eps_high=eps_high, dual_clip_c=dual_clip_c, loss_agg=loss_agg,
                 max_completion_len=max_completion_len, log_ratio_clamp=log_ratio_clamp)
    defaults = inspect.signature(grpo_loss).parameters  # fused_linear_grpo_loss has the same defaults
    for name, value in given.items():
        if value != defaults[name].default:
            raise ValueError(f"{name}={value!r} with objective=: set it in the PolicyObjective instead (beta, "
                             "epsilon, epsilon_high, dual_clip_c, loss_type, max_completion_length)")


def _objective_loss(objective, logp_BT, entropy_BT, advantages, mask_BT, old_logp_BT, ref_logp_BT, sampling_logp_BT):
    if not isinstance(objective, PolicyObjective):
        raise ValueError(f"objective must be a gxpo_kernels.loss.PolicyObjective, got {type(objective).__name__}")
    loss, metrics = policy_loss(objective, logp_BT, entropy_BT, advantages, mask_BT, old_logp_BT,
                                ref_logp_BT if objective.beta else None, sampling_logp_BT)
    metrics["logp_BT"] = logp_BT.detach()
    return loss, metrics


def _completion_len(completion_ids_BT, B: int, L: int) -> int:
    """T, the completion's length: logits position t scores token t, with L = T or a causal LM's L = T + 1."""
    T = completion_ids_BT.shape[-1] if torch.is_tensor(completion_ids_BT) and completion_ids_BT.dim() == 2 else L
    if L not in (T, T + 1):
        raise ValueError(f"completion_ids_BT must have shape [{B}, {L}] (logits_BTV's position t scores token t) "
                         f"or [{B}, {L - 1}] (a causal LM's logits, one position more), got "
                         f"{tuple(completion_ids_BT.shape)}")
    return T


def _zero_connected(hidden_NH, weight_VH, bias_V, dtype):
    """Nothing to score: a zero that still connects to every input, so backward gives zeros."""
    zero = (hidden_NH.sum() + weight_VH.sum() * 0).to(dtype) * 0
    return zero if bias_V is None else zero + bias_V.sum().to(dtype) * 0


def _check_temperature(temperature):
    if not (isinstance(temperature, (int, float)) and temperature > 0):
        raise ValueError(f"temperature must be > 0, got {temperature!r}")


def _check_lm_head(hidden_BTH, lm_head_weight_VH, lm_head_bias_V, chunk_tokens) -> tuple:
    _check_floating("hidden_BTH", hidden_BTH, 3)
    _check_floating("lm_head_weight_VH", lm_head_weight_VH, 2)
    B, T, H = hidden_BTH.shape
    V = lm_head_weight_VH.shape[0]
    if lm_head_weight_VH.shape[1] != H:
        raise ValueError(f"lm_head_weight_VH must have shape [V, {H}] to match hidden_BTH, got "
                         f"{tuple(lm_head_weight_VH.shape)}")
    if lm_head_bias_V is not None and (not torch.is_tensor(lm_head_bias_V) or lm_head_bias_V.shape != (V,)):
        raise ValueError(f"lm_head_bias_V must have shape [{V}], got {getattr(lm_head_bias_V, 'shape', None)}")
    for name, x in (("lm_head_weight_VH", lm_head_weight_VH), ("lm_head_bias_V", lm_head_bias_V)):
        if x is not None and (x.dtype != hidden_BTH.dtype or x.device != hidden_BTH.device):
            raise ValueError(f"{name} is {x.dtype} on {x.device}, hidden_BTH is {hidden_BTH.dtype} on "
                             f"{hidden_BTH.device}; they must match")
    if chunk_tokens is not None and not (isinstance(chunk_tokens, int) and chunk_tokens > 0):
        raise ValueError(f"chunk_tokens must be a positive int or None, got {chunk_tokens!r}")
    return B, T, H


def token_logprobs(logits_BTV, completion_ids_BT, completion_mask_BT=None, temperature=1.0, with_entropy=True,
                   inplace=False):
    """(logp_BT, entropy_BT): the log-prob of each completion token under softmax(logits / temperature) and
    the entropy of that distribution, both differentiable (vocab.py: the backward takes a coefficient per
    token for each), 0 at masked tokens. logits_BTV may be a causal LM's [B, T + 1, V], as for grpo_loss;
    inplace=True lets the backward write dlogits over the logits. Any objective on these vectors
    (objectives.policy_loss, TRL's loss types) then trains through the kernels."""
    _check_floating("logits_BTV", logits_BTV, 3)
    B, L, V = logits_BTV.shape
    T = _completion_len(completion_ids_BT, B, L)
    ids_N, active_N = token_rows(B, T, V, logits_BTV.device, completion_ids_BT, completion_mask_BT, L)
    _check_temperature(temperature)
    logp_N, entropy_N = LogitsTokenLogprobs.apply(logits_BTV, ids_N, active_N, float(temperature),
                                                  bool(with_entropy), bool(inplace))
    return logp_N.view(B, L)[:, :T], entropy_N.view(B, L)[:, :T]


def fused_linear_token_logprobs(hidden_BTH, lm_head_weight_VH, completion_ids_BT, completion_mask_BT=None,
                                lm_head_bias_V=None, temperature=1.0, with_entropy=True, impl="auto",
                                chunk_tokens=None):
    """token_logprobs(hidden_BTH @ lm_head_weight_VH.T + lm_head_bias_V, ...) without the [N, V] logits:
    impl "tiled" (the logits never in memory), "chunked" ([chunk_tokens, V] at a time) or "auto", as for
    fused_linear_grpo_loss. Only unmasked tokens go through the LM head."""
    B, T, H = _check_lm_head(hidden_BTH, lm_head_weight_VH, lm_head_bias_V, chunk_tokens)
    V = lm_head_weight_VH.shape[0]
    _check_temperature(temperature)
    impl, chunk_tokens = _fused_impl(impl, hidden_BTH, lm_head_weight_VH, chunk_tokens, 0.0, False)
    ids_N, active_N = token_rows(B, T, V, hidden_BTH.device, completion_ids_BT, completion_mask_BT, T)
    rows = active_N.nonzero().squeeze(1)
    hidden_nH = hidden_BTH.reshape(B * T, H).index_select(0, rows)
    if rows.numel() == 0:
        zero = _zero_connected(hidden_nH, lm_head_weight_VH, lm_head_bias_V, _stats_dtype(hidden_BTH))
        return (zero.expand(B, T),) * 2
    if impl == "tiled":
        logp_n, entropy_n = TiledLMHeadTokenLogprobs.apply(hidden_nH.contiguous(), lm_head_weight_VH.contiguous(),
                                                           lm_head_bias_V, ids_N[rows], float(temperature),
                                                           bool(with_entropy))
    else:
        logp_n, entropy_n = ChunkedLMHeadTokenLogprobs.apply(hidden_nH, lm_head_weight_VH, lm_head_bias_V,
                                                             ids_N[rows], float(temperature), bool(with_entropy),
                                                             chunk_tokens)
    scatter = lambda x: torch.zeros(B * T, dtype=x.dtype, device=x.device).index_copy(0, rows, x).view(B, T)  # noqa: E731
    return scatter(logp_n), scatter(entropy_n)


FUSED_IMPLS = ("auto", "tiled", "chunked")


def _fused_impl(impl, hidden, weight, chunk_tokens, filter_eps, deterministic) -> tuple:
    """(impl, chunk_tokens) the call runs with."""
    if impl not in FUSED_IMPLS:
        raise ValueError(f"impl must be one of {FUSED_IMPLS}, got {impl!r}")
    if not (isinstance(filter_eps, (int, float)) and 0 <= filter_eps < 1):
        raise ValueError(f"filter_eps must be in [0, 1) (0: exact, no filtering), got {filter_eps!r}")
    if not isinstance(deterministic, bool):
        raise ValueError(f"deterministic must be a bool, got {deterministic!r}")
    triton_ok = backend.use_triton(hidden)
    # on CUDA the model plans the call once: auto may take the tiled kernels (not with deterministic=True),
    # the chunked path takes the model's chunk
    plan = None
    if hidden.is_cuda and chunk_tokens is None and impl != "tiled":
        plan = _cuda_plan(hidden, weight, tiled_ok=impl == "auto" and triton_ok and not deterministic)
    if impl == "auto":
        impl = plan.impl if plan is not None else ("tiled" if triton_ok and chunk_tokens is None else "chunked")
    if impl == "tiled" and not triton_ok:
        raise ValueError(f"impl='tiled' needs Triton on this tensor (CUDA, or CPU float32 under TRITON_INTERPRET=1), "
                         f"got {hidden.dtype} on {hidden.device}; use impl='chunked'")
    if impl == "tiled" and chunk_tokens is not None:
        raise ValueError("chunk_tokens applies to impl='chunked' only; the tiled kernels need no chunking")
    if impl == "tiled" and deterministic and hidden.is_cuda:
        raise ValueError("deterministic=True needs impl='chunked' or 'auto': the tiled backward adds its gradients "
                         "with atomics, in no fixed order")
    if filter_eps and impl != "tiled":
        raise ValueError(f"filter_eps applies to impl='tiled' only (impl is {impl!r})")
    if impl == "chunked" and plan is not None:
        chunk_tokens = plan.chunk_tokens
    return impl, chunk_tokens


def _cuda_plan(hidden, weight, tiled_ok: bool):
    N, H = hidden.shape[0] * hidden.shape[1], hidden.shape[-1]
    dtype = lm_head_cost.matmul_dtype(hidden.dtype, torch.get_float32_matmul_precision())
    return _plan(torch.cuda.get_device_name(hidden.device), N, weight.shape[0], H, dtype, tiled_ok)


@functools.lru_cache(maxsize=256)
def _plan(device_name: str, N: int, V: int, H: int, dtype: str, tiled_ok: bool):
    cfg = tile_config(N, V, H, torch.device("cuda")) if tiled_ok else None
    return lm_head_cost.choose(devices.profile_for(device_name), N, V, H, dtype, cfg)

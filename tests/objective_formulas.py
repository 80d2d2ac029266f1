"""Each policy objective written from its paper's formula, one completion at a time in float64 (python loops over
sequences and tokens, no shared helpers with gxpo_kernels.loss.objectives): the second oracle of
tests/test_objective_formulas.py, beside stock TRL. o_i: completion i's unmasked tokens; r_it = pi / pi_old."""

import math

import torch


def _clip_surrogate(r, a, eps_low, eps_high, delta=None):
    """PPO's clipped surrogate, negated: -min(r A, clip(r, 1 - eps_low, 1 + eps_high) A); delta caps r (INTELLECT-2)."""
    clipped = torch.clamp(r, 1 - eps_low, 1 + eps_high)
    if delta is not None:
        r = torch.clamp(r, max=delta)
    return -torch.minimum(r * a, clipped * a)


def formula_loss(loss_type, logp, old, adv, mask, *, level="token", eps_low=0.2, eps_high=0.28, delta=None,
                 max_len=None, tau_pos=1.0, tau_neg=1.05, vespo=(2.0, 3.0, 3.0, 2.0)):
    """The objective's loss over a batch: logp, old [B, T] float64 (logp differentiable), adv [B], mask [B, T]."""
    B = logp.shape[0]
    seq_terms, token_count = [], 0
    for i in range(B):
        tokens = [t for t in range(logp.shape[1]) if mask[i, t]]
        n, a = len(tokens), adv[i]
        token_count += n
        if n == 0:
            seq_terms.append((logp.sum() * 0, 0))
            continue
        lp = torch.stack([logp[i, t] for t in tokens])
        lr = lp - torch.stack([old[i, t] for t in tokens])
        if level == "sequence":  # GSPO: s_i = (pi(o_i) / pi_old(o_i))^(1 / |o_i|), the gradient through the mean
            r = torch.exp(lr.sum() / n).expand(n)
        else:
            r = torch.exp(lr)
        if loss_type == "cispo":  # MiniMax-M1: -sg(min(r, eps_max)) A log pi
            per_token = -torch.clamp(r, max=eps_high).detach() * a * lp
        elif loss_type == "sapo":  # soft gate: -(4 / tau) sigmoid(tau (r - 1)) A
            tau = tau_pos if a > 0 else tau_neg
            per_token = -(4 / tau) * torch.sigmoid(tau * (r - 1)) * a
        elif loss_type == "vespo":  # -phi(w) A log pi, w the sequence ratio, phi(w) = e^lambda w^k e^(-lambda w)
            k, lam = (vespo[0], vespo[1]) if a >= 0 else (vespo[2], vespo[3])
            # TRL's guard, not the paper's: each log-ratio within +-20, log w within [log 1e-8, 20]
            log_w = min(max(sum(min(max(float(x), -20.0), 20.0) for x in lr.detach()), math.log(1e-8)), 20.0)
            w = math.exp(log_w)
            phi = math.exp(lam) * w ** k * math.exp(-lam * w)
            per_token = -phi * a * lp
        else:
            per_token = _clip_surrogate(r, a, eps_low, eps_high, delta)
        seq_terms.append((per_token.sum(), n))
    sums = [s for s, _ in seq_terms]
    if loss_type in ("grpo", "sapo"):  # DeepSeekMath: 1/G sum_i 1/|o_i| sum_t
        return sum(s / max(n, 1) for s, n in seq_terms) / B
    if loss_type == "dr_grpo":  # Dr. GRPO: sum_i sum_t / (G * L_max)
        return sum(sums) / (B * max_len)
    if loss_type == "luspo":  # length-unbiased: 1/G sum_i sum_t
        return sum(sums) / B
    return sum(sums) / max(token_count, 1)  # DAPO / BNPO / CISPO / VESPO: a token mean over the batch


def formula_k3_kl(logp, ref, mask):
    """Schulman's k3 estimator of KL(pi || pi_ref), the batch's token mean of e^(ref - logp) - (ref - logp) - 1."""
    d = ref - logp
    kl = torch.exp(d) - d - 1
    return (kl * mask).sum() / mask.sum()

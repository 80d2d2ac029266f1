"""CAPO (Melo, Abate, Gal 2025, arXiv 2510.00819): curvature-aware token masking on the LM head (the
token-mask slot), computed without autograd before the update. Each completion token's predicted change of
the objective (m_H) and predicted KL (m_F) under one optimizer step on its own LM-head gradient (top-K
rows); tokens whose m_F >= tau_F, or whose m_H is outside (-tau_H, tau_H) (symmetric clipping) or
[0, tau_H) (one-sided), leave the loss and its token count; a tau of 0 turns its check off.

capo.mode "official" computes what the authors' code computes (github luckeciano/stable-pg-llm,
GRPOEntropyTrainer, capo_only): untempered logits, no forced sampled token, a prospective Adam step from
moments CAPO keeps itself (an SGD step while they are empty), fed after each mask with the kept tokens'
batch-mean gradient per vocabulary row (official_kernels.py). "optimizer_moments", our variant,
models the step the optimizer will actually take: the real AdamW's second moment of the LM head as the
preconditioner (nothing masked before its first step), the sampled token forced into the rows, at the
sampling temperature (kernels.py). With a frozen LM head (LoRA) neither can run."""

import dataclasses
from dataclasses import dataclass

import torch

from .. import Plugin
from .kernels import capo_scores
from .official_kernels import CAPOMoments, capo_official_scores

QUANTILES = (0.5, 0.9, 0.99)
CAPO_PRESETS = {"grpo": (1e-4, 0.01), "dr-grpo": (1e-3, 5e-4)}  # (tau_F, tau_H) of the two published recipes
CAPO_MODES = ("official", "optimizer_moments")


@dataclass
class CAPOConfig:
    enabled: bool | None = None  # None: on under --recipe capo
    # "official": the authors' computation (own Adam moments, prospective step, untempered, no forced token) |
    # "optimizer_moments": ours (the real optimizer's moments, sampled token forced in, at the sampling temperature)
    mode: str = "official"
    preset: str = "grpo"  # | "dr-grpo": sets tau_F, tau_H to 1e-3, 5e-4 unless given (the published recipes)
    tau_F: float | None = None  # predicted-KL threshold; None: the preset's (1e-4); 0: no KL check
    tau_H: float | None = None  # predicted objective-change threshold; None: the preset's (0.01); 0: no check
    hessian_symmetric_clipping: bool = True  # m_H in (-tau_H, tau_H) (both recipes); false: [0, tau_H)
    top_k: int = 50
    eps: float = 1e-8
    chunk_tokens: int = 1024

    def checks(self, cfg) -> list:
        """(field, holds, what it must be) for each field; cfg is the whole config."""
        return [
            ("top_k", self.top_k >= 2, ">= 2"),
            ("mode", self.mode in CAPO_MODES, f"one of {CAPO_MODES}"),
            ("tau_F", self.tau_F >= 0, ">= 0 (0: no predicted-KL check)"),
            ("tau_H", self.tau_H >= 0, ">= 0 (0: no predicted-objective check)"),
            ("chunk_tokens", self.chunk_tokens >= 1, ">= 1"),
        ]

    def resolve(self, recipe_on: bool):
        """On under --recipe capo unless set; thresholds left unset take the preset's."""
        if self.enabled is None:
            self.enabled = recipe_on
        if self.preset not in CAPO_PRESETS:
            raise ValueError(f"config key 'capo.preset' must be one of {tuple(CAPO_PRESETS)}")
        tau_F, tau_H = CAPO_PRESETS[self.preset]
        self.tau_F = tau_F if self.tau_F is None else self.tau_F
        self.tau_H = tau_H if self.tau_H is None else self.tau_H


def lm_head_preconditioner(rule, head_weight: torch.Tensor, eps: float) -> torch.Tensor | None:
    """The variant's preconditioner: the real optimizer's 1 / (sqrt(v_hat) + eps) for the LM head as
    [V, H] float32, or None before its first step."""
    group = head_group(rule, head_weight)
    state = rule.base.state.get(head_weight, {})
    if "exp_avg_sq" not in state:
        return None
    v_hat = state["exp_avg_sq"].float() / (1 - group["betas"][1] ** float(state["step"]))
    return 1 / (v_hat.sqrt() + eps)


def keep_tokens(m_H, m_F, tau_H: float, tau_F: float, symmetric: bool) -> torch.Tensor:
    """The official mask rules (_compute_hessian_token_mask, _compute_fisher_token_mask): a tau of 0 skips
    its check; m_H must lie in (-tau_H, tau_H), or [0, tau_H) without symmetric clipping."""
    keep = torch.ones_like(m_H, dtype=torch.bool)
    if tau_F != 0:
        keep &= m_F < tau_F
    if tau_H != 0:
        keep &= (m_H > -tau_H) if symmetric else (m_H >= 0)
        keep &= m_H < tau_H
    return keep


def head_group(rule, head_weight: torch.Tensor) -> dict:
    """The base optimizer's param group holding the LM head (CAPO models its step)."""
    group = next((g for g in rule.base.param_groups if any(p is head_weight for p in g["params"])), None)
    if group is None:
        raise ValueError("capo models the LM head's optimizer step, but the LM head is not trained here "
                         "(frozen, or LoRA); turn capo off or train the head")
    return group


def make_moments(cfg, model, device) -> CAPOMoments | None:
    """CAPO's own moments for capo.mode = "official" (betas from optim.betas, as the authors take
    TrainingArguments' adam_beta1 / adam_beta2); None otherwise."""
    if not cfg.capo.enabled or cfg.capo.mode != "official":
        return None
    V, H = model.get_output_embeddings().weight.shape
    return CAPOMoments(V, H, betas=cfg.optim.betas, eps=cfg.capo.eps, device=device)


@torch.no_grad()
def capo_token_mask(runner, batch, adv, rule, cfg, world: int = 1, moments: CAPOMoments | None = None):
    """(batch with the rejected tokens out of completion_mask, stats). capo.mode "official" needs the run's
    moments (make_moments), which it feeds."""
    if world > 1:
        raise ValueError("capo under FSDP (several ranks) is not supported yet: it needs the full LM head and "
                         "its optimizer moments on every rank; run it on one GPU")
    c = cfg.capo
    mask_BT = batch.completion_mask
    hidden_BTH, head = runner("completion_hidden", batch)
    lr = head_group(rule, head.weight)["lr"]
    adv_BT = adv[:, None].expand_as(mask_BT) if adv.dim() == 1 else adv
    hidden_NH, actions_N = hidden_BTH[mask_BT], batch.completion_ids[mask_BT]
    adv_N = adv_BT.to(hidden_BTH.device)[mask_BT]
    if c.mode == "official":
        assert moments is not None, "capo.mode official keeps its own moments: pass make_moments(...)"
        m_H, m_F, coef_NK, rows_NK = capo_official_scores(hidden_NH, head.weight, actions_N, adv_N, moments, lr,
                                                          top_k=c.top_k, chunk_tokens=c.chunk_tokens)
    else:
        precond_VH = lm_head_preconditioner(rule, head.weight, c.eps)
        if precond_VH is None:
            return batch, {"capo/rejected_frac": 0.0}
        m_H, m_F = capo_scores(hidden_NH, head.weight, actions_N, adv_N, precond_VH.to(head.weight.dtype), lr,
                               top_k=c.top_k, temperature=cfg.rollout.temperature, chunk_tokens=c.chunk_tokens)
    keep = keep_tokens(m_H, m_F, c.tau_H, c.tau_F, c.hessian_symmetric_clipping)
    if c.mode == "official":
        moments.update(hidden_NH[keep], coef_NK[keep], rows_NK[keep])
    new_mask = mask_BT.clone()
    new_mask[mask_BT] = keep
    stats = {"capo/rejected_frac": 1 - keep.float().mean().item() if keep.numel() else 0.0}
    if keep.numel():
        for name, values in (("m_H", m_H.abs()), ("m_F", m_F)):
            qs = torch.quantile(values.double().cpu(), torch.tensor(QUANTILES, dtype=torch.float64))
            stats.update({f"capo/{name}_q{int(100 * q)}": v for q, v in zip(QUANTILES, qs.tolist(), strict=True)})
    return dataclasses.replace(batch, completion_mask=new_mask), stats


def mask_tokens(trainer, batch, adv):
    """The token-mask slot."""
    return capo_token_mask(trainer.runner, batch, adv, trainer.rule, trainer.cfg, trainer.d.world,
                           trainer.plugin_states.get("capo"))


PLUGIN = Plugin("capo", "capo", enabled=lambda cfg: cfg.capo.enabled, token_mask=mask_tokens,
                state=lambda trainer: make_moments(trainer.cfg, trainer.model, trainer.device))

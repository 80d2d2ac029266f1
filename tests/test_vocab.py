"""The vocabulary primitive (token_logprobs, fused_linear_token_logprobs) against float64 torch: the target
log-probs and entropies, and the gradients of sum(g_logp * logp + g_H * H) for random per-token coefficients
(the entropy's true gradient included), from logits (Triton under the interpreter, and torch) and fused with
the LM head (tiled, chunked), at shapes off the block sizes, ragged masks, large biases, all-negative logits
and a temperature; masked tokens give 0 and take no gradient."""

import pytest
import torch
from helpers import rel_err

from gxpo_kernels import backend
from gxpo_kernels.loss import fused_linear_token_logprobs, policy_loss, token_logprobs
from gxpo_kernels.loss.objectives import PolicyObjective

TOL = 2e-5


def reference(logits_BTV, ids_BT, mask_BT, temperature):
    logq = torch.log_softmax(logits_BTV.double() / temperature, -1)
    logp = logq.gather(-1, ids_BT[..., None]).squeeze(-1)
    entropy = -(logq.exp() * logq).sum(-1)
    return logp * mask_BT, entropy * mask_BT


def coefficients(B, T, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, T, generator=g, dtype=torch.float64), torch.randn(B, T, generator=g, dtype=torch.float64)


def logits_batch(B, T, V, seed, scale=3.0, shift=0.0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, T, V, generator=g) * scale + shift
    ids = torch.randint(0, V, (B, T), generator=g)
    mask = (torch.rand(B, T, generator=g) > 0.3).float()
    mask[0, 0] = 1
    return logits, ids, mask


@pytest.fixture(params=["triton", "torch"])
def path(request, monkeypatch):
    if request.param == "torch":
        monkeypatch.setattr(backend, "use_triton", lambda t: False)
    return request.param


@pytest.mark.parametrize("B,T,V,temperature,scale,shift", [(1, 1, 7, 1.0, 3.0, 0.0), (3, 5, 1030, 0.7, 3.0, 0.0),
                                                           (2, 9, 257, 1.0, 40.0, 0.0), (2, 4, 300, 1.3, 1.0, -90.0)])
@pytest.mark.parametrize("with_entropy", [True, False])
def test_from_logits(path, B, T, V, temperature, scale, shift, with_entropy):
    logits, ids, mask = logits_batch(B, T, V, seed=V + T, scale=scale, shift=shift)
    g_logp, g_h = coefficients(B, T, seed=V)
    x = logits.clone().requires_grad_()
    logp, entropy = token_logprobs(x, ids, mask, temperature=temperature, with_entropy=with_entropy)
    want_logp, want_h = reference(logits, ids, mask, temperature)
    assert rel_err(logp, want_logp) < TOL
    if with_entropy:  # fp32's lse - E[z] cancels: absolute error relative to the logits' scale
        assert (entropy - want_h).abs().max() < TOL * max(1.0, (logits / temperature).abs().max().item())
    else:
        assert not entropy.any()
    objective = (g_logp * logp).sum() + ((g_h * entropy).sum() if with_entropy else 0)
    objective.backward()
    x64 = logits.double().requires_grad_()
    w_logp, w_h = reference(x64, ids, mask, temperature)
    ((g_logp * w_logp).sum() + ((g_h * w_h).sum() if with_entropy else 0)).backward()
    assert rel_err(x.grad, x64.grad) < TOL
    assert not x.grad[mask == 0].any()


@pytest.mark.parametrize("impl", ["tiled", "chunked"])
@pytest.mark.parametrize("B,T,H,V,bias", [(1, 1, 16, 32, True), (3, 7, 17, 97, False), (2, 8, 40, 130, True)])
def test_fused_with_the_lm_head(impl, B, T, H, V, bias):
    g = torch.Generator().manual_seed(H * V)
    hidden = torch.randn(B, T, H, generator=g)
    weight = torch.randn(V, H, generator=g) / H ** 0.5
    bias_V = torch.randn(V, generator=g) if bias else None
    ids = torch.randint(0, V, (B, T), generator=g)
    mask = (torch.rand(B, T, generator=g) > 0.3).float()
    mask[0, 0] = 1
    g_logp, g_h = coefficients(B, T, seed=V)
    leaves = [t.clone().requires_grad_() for t in (hidden, weight) + ((bias_V,) if bias else ())]
    logp, entropy = fused_linear_token_logprobs(leaves[0], leaves[1], ids, mask, lm_head_bias_V=leaves[2] if bias
                                                else None, temperature=0.8, impl=impl,
                                                chunk_tokens=5 if impl == "chunked" else None)
    ((g_logp * logp).sum() + (g_h * entropy).sum()).backward()
    leaves64 = [t.double().requires_grad_() for t in (hidden, weight) + ((bias_V,) if bias else ())]
    logits64 = leaves64[0] @ leaves64[1].t() + (leaves64[2] if bias else 0)
    w_logp, w_h = reference(logits64, ids, mask, 0.8)
    ((g_logp * w_logp).sum() + (g_h * w_h).sum()).backward()
    assert rel_err(logp, w_logp) < TOL and rel_err(entropy, w_h) < TOL
    for got, want in zip(leaves, leaves64, strict=True):
        assert rel_err(got.grad, want.grad) < TOL


def test_an_objective_trains_through_the_primitive():
    """The entropy bonus's gradient arrives in the logits: the objective on the primitive's vectors equals the
    same objective on float64 torch log-probs, loss and dlogits."""
    logits, ids, mask = logits_batch(4, 6, 77, seed=5)
    adv = torch.randn(4, dtype=torch.float64)
    obj = PolicyObjective(loss_type="grpo", entropy_coef=0.05, beta=0.0)
    old = reference(logits, ids, mask, 1.0)[0] + 0.1 * torch.randn(4, 6, dtype=torch.float64)
    x = logits.clone().requires_grad_()
    logp, entropy = token_logprobs(x, ids, mask)
    loss, _ = policy_loss(obj, logp.double(), entropy.double(), adv, mask, old)
    loss.backward()
    x64 = logits.double().requires_grad_()
    logp64, h64 = reference(x64, ids, mask, 1.0)
    loss64, _ = policy_loss(obj, logp64, h64, adv, mask, old)
    loss64.backward()
    assert rel_err(loss, loss64) < TOL and rel_err(x.grad, x64.grad) < TOL


@pytest.mark.parametrize("bad,match", [(dict(ids=torch.zeros(2, 3)), "completion_ids_BT"),
                                       (dict(mask=torch.ones(2, 4)), "completion_mask_BT"),
                                       (dict(temperature=0.0), "temperature")])
def test_bad_inputs_name_the_argument(bad, match):
    kw = dict(ids=torch.zeros(2, 3, dtype=torch.long), mask=torch.ones(2, 3), temperature=1.0)
    kw.update(bad)
    with pytest.raises(ValueError, match=match):
        token_logprobs(torch.randn(2, 3, 11), kw["ids"], kw["mask"], temperature=kw["temperature"])


@pytest.mark.parametrize("impl", ["logits", "tiled", "chunked"])
def test_objective_through_the_grpo_loss_functions(impl):
    """grpo_loss / fused_linear_grpo_loss with objective=: TRL's sapo at sequence level with the bias-corrected
    KL and a sequence-mask rollout correction, equal to policy_loss on float64 log-probs (loss, gradient)."""
    from gxpo_kernels import fused_linear_grpo_loss, grpo_loss

    g = torch.Generator().manual_seed(9)
    B, T, H, V = 3, 6, 24, 70
    hidden, weight = torch.randn(B, T, H, generator=g), torch.randn(V, H, generator=g) / H ** 0.5
    ids = torch.randint(0, V, (B, T), generator=g)
    mask = (torch.rand(B, T, generator=g) > 0.2).float()
    mask[0, 0] = 1
    adv = torch.randn(B, generator=g)
    old = -torch.rand(B, T, generator=g) * 4
    ref, sampling = old + 0.05, old + 0.1 * torch.randn(B, T, generator=g)
    obj = PolicyObjective(loss_type="sapo", importance_sampling_level="sequence", beta=0.1,
                          rollout_correction="sequence_mask", rollout_clip_max=5.0)
    h = hidden.clone().requires_grad_()
    if impl == "logits":
        loss, metrics = grpo_loss(h @ weight.t(), ids, adv, mask, old, ref, objective=obj, sampling_logp_BT=sampling)
    else:
        loss, metrics = fused_linear_grpo_loss(h, weight, ids, adv, mask, old, ref, objective=obj,
                                               sampling_logp_BT=sampling, impl=impl)
    loss.backward()
    h64 = hidden.double().requires_grad_()
    logp64, h_64 = reference(h64 @ weight.double().t(), ids, mask, 1.0)
    want, want_metrics = policy_loss(obj, logp64, h_64, adv.double(), mask, old.double(), ref.double(),
                                     sampling.double())
    want.backward()
    assert rel_err(loss, want) < TOL and rel_err(h.grad, h64.grad) < TOL
    assert set(want_metrics) <= set(metrics) and "sampling/importance_sampling_ratio/mean" in metrics
    assert rel_err(metrics["kl"], want_metrics["kl"]) < TOL


def test_objective_errors_name_the_argument():
    from gxpo_kernels import grpo_loss

    logits, ids, mask = logits_batch(2, 3, 11, seed=1)
    adv = torch.randn(2)
    with pytest.raises(ValueError, match="beta=0.1 with objective="):
        grpo_loss(logits, ids, adv, mask, beta=0.1, objective=PolicyObjective())
    with pytest.raises(ValueError, match="objective must be"):
        grpo_loss(logits, ids, adv, mask, objective="dapo")
    logp, entropy = token_logprobs(logits, ids, mask)
    with pytest.raises(ValueError, match="advantages has NaN"):
        policy_loss(PolicyObjective(), logp, entropy, torch.tensor([float("nan"), 1.0]), mask)
    with pytest.raises(ValueError, match="old_logp_BT must have"):
        policy_loss(PolicyObjective(), logp, entropy, adv, mask, old_logp_BT=torch.zeros(2, 4))


@pytest.mark.parametrize("impl", ["logits", "tiled", "chunked"])
def test_without_entropy_the_entropy_takes_no_gradient(impl):
    """with_entropy=False: the entropy is not computed (zeros) and adding it to the loss changes no gradient."""
    logits, ids, mask = logits_batch(2, 5, 40, seed=4)
    g = torch.Generator().manual_seed(4)
    hidden, weight = torch.randn(2, 5, 16, generator=g), torch.randn(40, 16, generator=g)
    grads = []
    for with_h in (False, True):
        x = (logits if impl == "logits" else hidden).clone().requires_grad_()
        if impl == "logits":
            logp, entropy = token_logprobs(x, ids, mask, with_entropy=False)
        else:
            logp, entropy = fused_linear_token_logprobs(x, weight, ids, mask, with_entropy=False, impl=impl)
        assert not entropy.any()
        (logp.sum() + (3.0 * entropy.sum() if with_h else 0)).backward()
        grads.append(x.grad)
    assert grads[0].abs().max() > 0 and torch.equal(grads[0], grads[1])


def test_dual_clip_objective_equals_the_grpo_kernels():
    """PolicyObjective's dual clip (bnpo: a token mean) against grpo_loss's own kernels: loss, dlogits and the
    dual-clipped fraction."""
    from gxpo_kernels import grpo_loss

    logits, ids, mask = logits_batch(4, 7, 90, seed=8)
    adv = torch.tensor([1.5, -2.0, 0.5, -0.7])
    noise = torch.rand(4, 7, generator=torch.Generator().manual_seed(8))
    old = reference(logits, ids, mask, 1.0)[0].float() - 0.8 * noise
    x, y = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    want, want_metrics = grpo_loss(x, ids, adv, mask, old, dual_clip_c=1.5)
    got, metrics = grpo_loss(y, ids, adv, mask, old, objective=PolicyObjective(loss_type="bnpo", epsilon_high=0.2,
                                                                                  dual_clip_c=1.5))
    want.backward()
    got.backward()
    assert float(want_metrics["clip_frac_dual"]) > 0
    assert rel_err(got, want) < TOL and rel_err(y.grad, x.grad) < TOL
    assert float(metrics["clip_ratio/dual_mean"]) == pytest.approx(float(want_metrics["clip_frac_dual"]), abs=1e-6)

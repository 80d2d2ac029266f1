"""grpo_loss (Triton kernel; interpreter on CPU) against the float64 torch reference."""

import zlib

import pytest
import torch
from helpers import loss_batch, loss_close, rel_err

from gxpo_kernels import grpo_loss
from gxpo_kernels.loss.inputs import make_config, prepare_token_inputs, summarize
from gxpo_kernels.loss.logits_autograd import GRPOLossFunction
from gxpo_kernels.loss.reference import grpo_loss_reference
from gxpo_kernels.loss.settings import LOSS_AGGS

TOL = 1e-5
CASES = {
    "plain": {},
    "asym_clip": {"eps_low": 0.1, "eps_high": 0.28},
    "dual_clip": {"dual_clip_c": 1.5},
    "kl": {"beta": 0.1},
    "temperature": {"temperature": 0.7},
    "on_policy": {"on_policy": True},
    "everything": {"eps_low": 0.15, "eps_high": 0.25, "dual_clip_c": 1.5, "beta": 0.05, "temperature": 1.3,
                   "return_entropy": True},
}


def run_both(batch, *, on_policy=False, loss_agg="token-mean", grad_scale=1.0, block_v=None,
             logits=None, **kw):
    """(ours, reference): each a (loss, metrics, dlogits) triple."""
    if loss_agg == "seq-mean-token-sum-norm":
        kw["max_completion_len"] = batch["ids"].shape[1] + 3
    old = None if on_policy else batch["old"]
    ref = batch["ref"] if kw.get("beta", 0) > 0 else None
    x = (batch["logits"] if logits is None else logits).clone().requires_grad_()
    if block_v is None:
        loss, metrics = grpo_loss(x, batch["ids"], batch["adv"], batch["mask"], old, ref, loss_agg=loss_agg, **kw)
    else:  # the public wrapper picks the block; tests also force small ones
        B, T, V = x.shape
        cfg = make_config(loss_agg=loss_agg, ref_logp_BT=ref, **{
            "beta": 0.0, "eps_low": 0.2, "eps_high": 0.2, "dual_clip_c": None, "temperature": 1.0,
            "max_completion_len": None, "return_entropy": False, **kw})
        inp = prepare_token_inputs(B, T, V, x.device, torch.float32, batch["ids"], batch["adv"], batch["mask"],
                                   old, ref, loss_agg, kw.get("max_completion_len"))
        loss, stats = GRPOLossFunction.apply(x, inp.ids_N, inp.adv_N, inp.weight_N, inp.old_N, inp.ref_N,
                                             cfg, False, block_v)
        metrics = summarize(stats, inp, cfg, ref is not None)
    (loss * grad_scale).backward()

    x64 = batch["logits"].double().requires_grad_()
    dbl = lambda t: None if t is None else t.double()  # noqa: E731
    loss64, metrics64 = grpo_loss_reference(x64, batch["ids"], dbl(batch["adv"]), batch["mask"], dbl(old),
                                            dbl(ref), loss_agg=loss_agg, **kw)
    (loss64 * grad_scale).backward()
    return (loss, metrics, x.grad), (loss64, metrics64, x64.grad)


def assert_close(ours, ref, tol=TOL):
    loss, metrics, grad = ours
    loss64, metrics64, grad64 = ref
    assert torch.isfinite(grad).all(), "unwritten (poisoned) or non-finite gradient entries"
    assert loss_close(loss, loss64, tol), (loss.item(), loss64.item())
    assert rel_err(grad, grad64) < tol
    assert set(metrics) == set(metrics64)
    for name in metrics64:
        assert rel_err(metrics[name], metrics64[name]) < tol, name


@pytest.mark.parametrize("loss_agg", LOSS_AGGS)
@pytest.mark.parametrize("case", list(CASES))
def test_matches_reference(path, loss_agg, case):
    batch = loss_batch(4, 7, 300, seed=zlib.crc32(f"{loss_agg}/{case}".encode()))
    assert_close(*run_both(batch, loss_agg=loss_agg, block_v=128, **CASES[case]))


@pytest.mark.parametrize("B,T,V,block_v", [(1, 1, 5, None), (3, 5, 77, 32), (2, 9, 1000, 256),
                                           (5, 3, 513, 512), (2, 4, 2051, None)])
def test_shapes_and_blocks(path, B, T, V, block_v):
    batch = loss_batch(B, T, V, seed=B * 1000 + V)
    assert_close(*run_both(batch, block_v=block_v, **CASES["everything"]))


def test_per_token_advantages(path):
    batch = loss_batch(4, 6, 200, seed=1, per_token_adv=True)
    assert_close(*run_both(batch, loss_agg="seq-mean-token-mean", beta=0.02))


def test_grad_output_scaling(path):
    batch = loss_batch(3, 5, 100, seed=2)
    assert_close(*run_both(batch, grad_scale=-2.5, beta=0.1))


@pytest.mark.parametrize("where", ["head", "tail", "transposed"])
def test_noncontiguous_logits_view(path, where):
    batch = loss_batch(3, 6, 150, seed=3)
    padded = torch.randn(3, 7, 150)
    if where == "transposed":  # [T, B, V] storage: rows are V-runs but b is the inner stride
        padded = torch.randn(6, 3, 150)
        padded.copy_(batch["logits"].transpose(0, 1))
        view = padded.transpose(0, 1)
    elif where == "head":  # [B, T, V] slice of [B, T + 1, V], as from a causal LM's output
        padded[:, :-1] = batch["logits"]
        view = padded[:, :-1]
    else:  # the same slice at a storage offset
        padded[:, 1:] = batch["logits"]
        view = padded[:, 1:]
    assert not view.is_contiguous()
    assert_close(*run_both(batch, logits=view, beta=0.1))


def test_inplace_writes_gradient_over_logits(path):
    batch = loss_batch(3, 5, 120, seed=4)
    x = batch["logits"].clone().requires_grad_()
    buf = x * 1.0  # a non-leaf whose storage the loss may overwrite
    loss, _ = grpo_loss(buf, batch["ids"], batch["adv"], batch["mask"], batch["old"], inplace=True)
    loss.backward()
    x64 = batch["logits"].double().requires_grad_()
    grpo_loss_reference(x64, batch["ids"], batch["adv"].double(), batch["mask"], batch["old"].double())[0].backward()
    assert rel_err(x.grad, x64.grad) < TOL
    if path == "triton":
        assert rel_err(buf.detach(), x64.grad) < TOL  # the logits buffer now holds dlogits


def test_all_masked_gives_zero_loss_and_grad(path):
    batch = loss_batch(3, 4, 50, seed=5)
    x = batch["logits"].clone().requires_grad_()
    for agg in LOSS_AGGS:
        loss, metrics = grpo_loss(x, batch["ids"], batch["adv"], torch.zeros(3, 4, dtype=torch.bool),
                                  batch["old"], loss_agg=agg, max_completion_len=4)
        loss.backward()
        assert loss.item() == 0.0 and torch.equal(x.grad, torch.zeros_like(x))
        assert all(torch.isfinite(v).all() for v in metrics.values())
        x.grad = None


def test_no_grad_forward_matches(path):
    batch = loss_batch(3, 5, 90, seed=6)
    with torch.no_grad():
        loss, metrics = grpo_loss(batch["logits"], batch["ids"], batch["adv"], batch["mask"], batch["old"])
    ref, ref_metrics = grpo_loss_reference(batch["logits"].double(), batch["ids"], batch["adv"].double(),
                                           batch["mask"], batch["old"].double())
    assert loss_close(loss, ref) and rel_err(metrics["logp_BT"], ref_metrics["logp_BT"]) < TOL


def test_on_policy_logp_feeds_next_pass():
    """Pass 1 on-policy gives logp_BT; used as old_logp on the same weights the ratio is exactly 1."""
    batch = loss_batch(3, 5, 90, seed=7)
    _, m1 = grpo_loss(batch["logits"], batch["ids"], batch["adv"], batch["mask"])
    _, m2 = grpo_loss(batch["logits"], batch["ids"], batch["adv"], batch["mask"], old_logp_BT=m1["logp_BT"])
    assert m2["ratio_mean"].item() == pytest.approx(1.0, abs=1e-6)
    assert m2["clip_frac_low"].item() == 0 and m2["clip_frac_high"].item() == 0


def test_backward_twice_is_an_error():
    batch = loss_batch(2, 3, 40, seed=8)
    x = batch["logits"].clone().requires_grad_()
    loss, _ = grpo_loss(x, batch["ids"], batch["adv"], batch["mask"])
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward ran twice"):
        loss.backward()


def test_every_clip_branch_is_exercised(path):
    batch = loss_batch(8, 16, 64, seed=9)
    ours, ref = run_both(batch, eps_low=0.1, eps_high=0.1, dual_clip_c=1.2, beta=0.1)
    assert_close(ours, ref)
    metrics = ours[1]
    for name in ("clip_frac_low", "clip_frac_high", "clip_frac_dual"):
        assert metrics[name].item() > 0, name


@pytest.mark.parametrize("inplace", [False, True])
@pytest.mark.parametrize("loss_agg", ["token-mean", "seq-mean-token-mean"])
def test_causal_lm_logits_with_one_extra_position(path, inplace, loss_agg):
    """[B, T + 1, V] passed whole: the gradient is the input's shape, its last position zero, and autograd
    goes straight to the logits (no slice_backward, no zero-filled copy)."""
    batch = loss_batch(4, 6, 131, seed=21)
    full = torch.randn(4, 7, 131, dtype=torch.float64)
    full[:, :-1] = batch["logits"].double()
    x = full.float().requires_grad_()
    buf = x * 1.0 if inplace else x
    loss, metrics = grpo_loss(buf, batch["ids"], batch["adv"], batch["mask"], batch["old"], batch["ref"], beta=0.1,
                              loss_agg=loss_agg, return_entropy=True, inplace=inplace)
    function = loss.grad_fn.next_functions[0][0]  # past the add that makes a non-finite log-prob's loss NaN
    assert type(function).__name__ == "GRPOLossFunctionBackward"
    assert type(function.next_functions[0][0]).__name__ == ("MulBackward0" if inplace else "AccumulateGrad")
    (loss * -1.5).backward()
    x64 = full.clone().requires_grad_()
    loss64, metrics64 = grpo_loss_reference(x64[:, :-1], batch["ids"], batch["adv"].double(), batch["mask"],
                                            batch["old"].double(), batch["ref"].double(), beta=0.1, loss_agg=loss_agg,
                                            return_entropy=True)
    (loss64 * -1.5).backward()
    assert loss_close(loss, loss64)
    assert x.grad.shape == x64.grad.shape and x.grad[:, -1].abs().max() == 0
    assert rel_err(x.grad, x64.grad) < TOL
    assert metrics["logp_BT"].shape == (4, 6) and rel_err(metrics["logp_BT"], metrics64["logp_BT"]) < TOL
    assert rel_err(metrics["entropy_mean"], metrics64["entropy_mean"]) < TOL


def test_triton_backward_reads_grad_output_without_a_host_sync(monkeypatch):
    """The Triton path folds grad_output into pass 2 on the device: its backward never turns a tensor into a
    Python value (on a GPU that would be a host sync)."""
    batch = loss_batch(3, 5, 70, seed=22)
    x = batch["logits"].clone().requires_grad_()
    loss, _ = grpo_loss(x, batch["ids"], batch["adv"], batch["mask"], batch["old"])

    def refuse(*_):
        raise AssertionError("host sync in the backward")

    for name in ("__bool__", "item", "tolist", "__float__"):
        monkeypatch.setattr(torch.Tensor, name, refuse)
    (loss * 3.0).backward()
    monkeypatch.undo()
    x64 = batch["logits"].double().requires_grad_()
    (grpo_loss_reference(x64, batch["ids"], batch["adv"].double(), batch["mask"], batch["old"].double())[0]
     * 3.0).backward()
    assert rel_err(x.grad, x64.grad) < TOL

"""Packed (padding-free) micro-batches against the padded path: the same loss and parameter gradients
for every loss_agg, token budgets that hold, and a clear error for a sequence over the budget."""

import pytest
import torch
from helpers import rel_err

pytest.importorskip("transformers")
from trainer.closure import LossClosure  # noqa: E402
from trainer.config import load_config  # noqa: E402
from trainer.models import load_policy  # noqa: E402
from trainer.packing import pack, plan_bins  # noqa: E402
from trainer.policy import PolicyRunner  # noqa: E402
from trainer.rollout import RolloutBatch  # noqa: E402

LOSS_AGGS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")


def ragged_batch(vocab, B=7, max_prompt=9, max_completion=11, seed=0, device="cpu"):
    """Very ragged rows: prompts of 1..max_prompt tokens, completions of 1..max_completion."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(B):
        p = int(torch.randint(1, max_prompt + 1, (1,), generator=g))
        c = int(torch.randint(1, max_completion + 1, (1,), generator=g))
        rows.append((torch.randint(3, vocab, (p,), generator=g).to(device),
                     torch.randint(3, vocab, (c,), generator=g).to(device)))
    return RolloutBatch.from_rows(rows, [""] * B, pad_id=0)


def grads_after_closure(loss_agg, attn="sdpa", dtype=torch.float32, device="cpu", **loss):
    cfg = load_config(overrides=[("model", "tiny-random"), ("loss.loss_agg", loss_agg), ("loss.beta", "0.1"),
                                 ("rollout.max_new_tokens", "11"), *((f"loss.{k}", str(v)) for k, v in loss.items())])
    model, tok = load_policy("tiny-random", dtype, seed=0, attn_implementation=attn)
    model.to(device)
    batch = ragged_batch(len(tok), device=device)
    g = torch.Generator().manual_seed(1)
    adv = torch.randn(batch.completion_ids.shape[0], generator=g).to(device)
    ref = -torch.rand(batch.completion_ids.shape, generator=g).to(device)
    closure = LossClosure(PolicyRunner(model), batch, adv, cfg, ref)
    loss, metrics = closure()
    closure()  # a second pass: old log-probs from the first
    return loss, metrics, {n: p.grad.clone() for n, p in model.named_parameters()}, closure


@pytest.mark.parametrize("loss_agg", LOSS_AGGS)
def test_packed_equals_padded(loss_agg):
    loss_pad, m_pad, g_pad, _ = grads_after_closure(loss_agg, pack=False)
    loss_pack, m_pack, g_pack, closure = grads_after_closure(loss_agg, pack=True)
    assert len(closure.micro_batches) == 1 and closure.micro_batches[0][1].num_tokens == int(
        closure.batch.attention_mask.sum())  # one stream, no padding in it
    assert closure.stats["pack/padding_frac_packed"] == 0 < closure.stats["pack/padding_frac_padded"]
    assert loss_pack.item() == pytest.approx(loss_pad.item(), rel=1e-5, abs=1e-7)
    assert m_pack["entropy_mean"] == pytest.approx(m_pad["entropy_mean"], rel=1e-5)
    for name in g_pad:
        assert rel_err(g_pack[name], g_pad[name]) < 1e-5, name


@pytest.mark.parametrize("loss_agg", LOSS_AGGS)
def test_token_budget_micro_batches_equal_one_batch(loss_agg):
    _, _, g_one, _ = grads_after_closure(loss_agg, pack=True)
    loss, _, g_budget, closure = grads_after_closure(loss_agg, pack=True, max_tokens_per_micro_batch=24)
    assert len(closure.micro_batches) > 2
    assert all(m.num_tokens <= 24 for _, m in closure.micro_batches)
    assert sorted(torch.cat([r for r, _ in closure.micro_batches]).tolist()) == list(range(7))
    for name in g_one:
        assert rel_err(g_budget[name], g_one[name]) < 1e-5, name


def test_packed_equals_padded_with_eager_attention():
    loss_pad, _, g_pad, _ = grads_after_closure("token-mean", attn="eager", pack=False)
    loss_pack, _, g_pack, _ = grads_after_closure("token-mean", attn="eager", pack=True)
    assert loss_pack.item() == pytest.approx(loss_pad.item(), rel=1e-5, abs=1e-7)
    for name in g_pad:
        assert rel_err(g_pack[name], g_pad[name]) < 1e-5, name


def test_attention_and_liger_options_fail_clearly():
    from trainer.models import apply_liger_patches, resolve_attn_implementation

    assert resolve_attn_implementation("eager") == "eager"
    with pytest.raises(ValueError, match="attn_implementation"):
        load_config(overrides=[("attn_implementation", "flash")])
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="needs CUDA"):
            apply_liger_patches(load_policy("tiny-random", torch.float32)[0])


def test_plan_bins():
    assert plan_bins([5, 3, 9, 2], 0) == [[0, 1, 2, 3]]
    bins = plan_bins([5, 3, 9, 2, 7, 1], 10)
    assert sorted(i for b in bins for i in b) == list(range(6))
    assert all(sum([5, 3, 9, 2, 7, 1][i] for i in b) <= 10 for b in bins) and len(bins) == 3  # 27 tokens
    with pytest.raises(ValueError, match="max_tokens_per_micro_batch = 8 is smaller than sequence 2"):
        plan_bins([5, 3, 9], 8)


def test_pack_layout():
    batch = ragged_batch(50, B=3)
    micro = pack(batch, 0)[0]
    lengths = batch.attention_mask.sum(1).tolist()
    assert micro.num_tokens == sum(lengths)
    starts = (micro.position_ids[0] == 0).nonzero().flatten().tolist()
    assert starts == [0, lengths[0], lengths[0] + lengths[1]]
    for j, r in enumerate(micro.rows.tolist()):  # the hidden state before each completion token predicts it
        n = int(batch.completion_mask[r].sum())
        predicted = micro.input_ids[0, micro.index_nT[j, :n] + 1]
        assert torch.equal(predicted, batch.completion_ids[r, :n])


@pytest.mark.parametrize("mode", ["full", "selective"])
def test_activation_checkpointing_gives_identical_gradients(mode):
    from trainer.blocks import checkpoint_blocks
    from trainer.distributed import decoder_layers

    grads = []
    for ckpt in ("off", mode):
        cfg = load_config(overrides=[("model", "tiny-random"), ("rollout.max_new_tokens", "11")])
        model, tok = load_policy("tiny-random", torch.float32, seed=0)
        checkpoint_blocks(model, ckpt)
        wrapped = [type(layer).__name__ == "CheckpointWrapper" for layer in decoder_layers(model)]
        assert wrapped == {"off": [False, False], "full": [True, True], "selective": [True, False]}[ckpt]
        batch = ragged_batch(len(tok))
        LossClosure(PolicyRunner(model), batch, torch.linspace(-1, 1, 7), cfg)()
        grads.append({n.replace("._checkpoint_wrapped_module", ""): p.grad for n, p in model.named_parameters()})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        assert torch.equal(grads[0][name], grads[1][name]), name

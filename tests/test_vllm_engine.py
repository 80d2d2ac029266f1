"""The vLLM rollout engine's glue (weight names and LoRA merge, weight sync after every update, sleep and
wake, seeds, sampled log-probs) against tests/fake_vllm.py, a CPU stand-in for vLLM's API. Real vLLM
needs CUDA; these tests do not run it."""

import copy
import sys

import pytest
import torch

pytest.importorskip("transformers")
import fake_vllm  # noqa: E402
from test_trainer import capture_export, fake_reward_and_cpu_paths, read_metrics, tiny_cfg  # noqa: E402, F401

from trainer import train as train_module  # noqa: E402
from trainer.blocks import checkpoint_blocks  # noqa: E402
from trainer.models import apply_lora, load_policy  # noqa: E402
from trainer.weights import hf_weight_items  # noqa: E402


@pytest.fixture
def vllm(monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", fake_vllm)
    fake_vllm.LLM.instances.clear()
    return fake_vllm


def test_weight_names_survive_checkpoint_wrappers():
    model = load_policy("tiny-random", torch.float32)[0]
    plain = copy.deepcopy(model).state_dict()
    checkpoint_blocks(model, "full")
    items = dict(hf_weight_items(model))
    assert items.keys() == plain.keys()
    assert all(torch.equal(items[k], plain[k]) for k in plain)


def test_lora_is_merged_into_the_base_weights(tmp_path):
    cfg = tiny_cfg(tmp_path, "grpo", **{"lora.r": 4, "lora.alpha": 8})
    model = apply_lora(load_policy("tiny-random", torch.float32)[0], cfg.lora)
    g = torch.Generator().manual_seed(0)
    for name, p in model.named_parameters():
        if "lora_B" in name:  # peft starts B at 0; a merge of zeros would prove nothing
            p.data = torch.randn(p.shape, generator=g)
    merged = copy.deepcopy(model).merge_and_unload().state_dict()
    items = dict(hf_weight_items(model))
    assert items.keys() == merged.keys()
    for k in merged:
        assert torch.allclose(items[k], merged[k], atol=1e-6), k
    assert any(not torch.equal(items[k], load_policy("tiny-random", torch.float32)[0].state_dict()[k])
               for k in merged if "q_proj" in k)


@pytest.mark.parametrize("sleep", [False, True])
def test_training_with_vllm_rollouts(tmp_path, monkeypatch, vllm, sleep):
    cfg = tiny_cfg(tmp_path, "gxpo", steps=2, **{"rollout.engine": "vllm", "rollout.vllm_sleep": sleep,
                                                  "rollout.temperature": 0.7})
    exported = capture_export(monkeypatch)
    out = train_module.train(cfg, log=lambda *_: None)
    rows = read_metrics(out)
    assert [r["backward_passes"] for r in rows] == [3, 6]
    (llm,) = vllm.LLM.instances
    assert llm.logprobs_mode == "processed_logprobs"
    for r in rows:
        assert r["time/weight_sync"] > 0
        # the engine sampled with the trainer's weights: its log-probs are the trainer's pass-1 log-probs
        assert r["rollout/logp_abs_diff"] < 1e-4, r["rollout/logp_abs_diff"]
    trained = exported["model"].state_dict()
    synced = llm.hf_model.state_dict()
    assert all(torch.equal(synced[k], trained[k]) for k in trained)  # synced after the last update too
    expected = ["reset_prefix_cache", "generate"] * 2 + ["reset_prefix_cache"]
    if sleep:
        expected = ["reset_prefix_cache", "generate", "sleep", "wake_up", "reset_prefix_cache", "generate", "sleep",
                    "wake_up", "reset_prefix_cache"]
    assert llm.events == expected


def test_vllm_logprobs_survive_xrpo_allocation(tmp_path, vllm):
    """The allocator samples in phases and regroups rows by prompt; the engine's log-probs follow them."""
    cfg = tiny_cfg(tmp_path, "grpo", steps=1, **{"rollout.engine": "vllm", "xrpo.allocator": True,
                                                  "xrpo.n0": 2})
    (row,) = read_metrics(train_module.train(cfg, log=lambda *_: None))
    assert row["rollout/logp_abs_diff"] < 1e-4, row["rollout/logp_abs_diff"]


def test_vllm_rows_are_keyed_and_cut_at_eos(tmp_path, vllm):
    from trainer.distributed import SINGLE
    from trainer.engines import make_engine
    from trainer.policy import PolicyRunner

    cfg = tiny_cfg(tmp_path, "grpo", **{"rollout.engine": "vllm", "rollout.max_new_tokens": 16})
    model, tok = load_policy("tiny-random", torch.float32)
    engine = make_engine("vllm", PolicyRunner(model), tok, cfg.rollout, SINGLE, tmp_path / "cfg")
    prompts = ["user: 1 + 1\nassistant: ", "user: 22 + 3\nassistant: "]
    batch = engine.generate(prompts, 3, [5, 6])
    again = engine.generate(prompts[::-1], 3, [6, 5])  # other order, same keys: same rows
    rows, rows_again = batch.rows(), again.rows()
    for i in range(3):
        assert torch.equal(rows[i][1], rows_again[3 + i][1])
    for (_, completion), mask, logp in zip(rows, batch.completion_mask, batch.sampled_logp, strict=True):
        eos = (completion == tok.eos_token_id).nonzero()
        assert len(eos) <= 1 and (len(eos) == 0 or eos[0, 0] == len(completion) - 1)
        assert (logp[mask] < 0).all() and (logp[~mask] == 0).all()
    picked = batch.select([5, 0], tok.pad_token_id)
    assert torch.equal(picked.row_logps()[1], batch.row_logps()[0])


def test_missing_vllm_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)
    cfg = tiny_cfg(tmp_path, "grpo", **{"rollout.engine": "vllm"})
    with pytest.raises(ValueError, match="needs vLLM"):
        train_module.train(cfg, log=lambda *_: None)


def test_vllm_config_errors(tmp_path):
    with pytest.raises(ValueError, match="rollout.vllm_gpu_memory_utilization"):
        tiny_cfg(tmp_path, "grpo", **{"rollout.vllm_gpu_memory_utilization": 1.5})


def test_vllm_logprobs_drive_the_rollout_correction(tmp_path, vllm):
    """loss.objective = 'policy' with TRL's rollout correction on vLLM rollouts: the engine's log-probs are the
    trainer's (the fake samples with the trainer's weights), so the correction's ratios are 1."""
    cfg = tiny_cfg(tmp_path, "grpo", steps=2, **{"rollout.engine": "vllm", "rollout.temperature": 0.7,
                                                  "loss.objective": "policy",
                                                  "objective.rollout_correction": "sequence_mask",
                                                  "objective.rollout_clip_min": 0.5})
    for row in read_metrics(train_module.train(cfg, log=lambda *_: None)):
        for stat in ("min", "max"):
            assert abs(row[f"sampling/importance_sampling_ratio/{stat}"] - 1) < 1e-3, (stat, row)
        assert row["sampling/sampling_logp_difference/max"] < 1e-4

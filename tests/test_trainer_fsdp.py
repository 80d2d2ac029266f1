"""The trainer under torchrun on 2 CPU ranks (FSDP2 over gloo) against the same run in one process:
rollouts are keyed per prompt, so both sample the same completions and must reach the same weights."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
from helpers import rel_err  # noqa: E402
from test_trainer import tiny_cfg  # noqa: E402

from trainer.config import to_toml  # noqa: E402
from trainer.models import load_policy  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = """import os
import sys
from gxpo_kernels import backend
from test_trainer import length_reward
from trainer import train as t
from trainer.cli import main

backend.use_triton = lambda x: x.is_cuda
t.make_reward = lambda kind, format_weight=0.0: length_reward
if os.environ.get("GXPO_TEST_FAKE_VLLM") == "1":
    import fake_vllm
    sys.modules["vllm"] = fake_vllm
main(sys.argv[1:])
"""


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_cli(cfg, tmp_path, ranks, extra=(), fake_vllm=False):
    """gxpo-train in a subprocess: plain python for 1 rank, torchrun for more (fake_vllm: tests/fake_vllm.py
    stands in for vLLM)."""
    config = tmp_path / f"{Path(cfg.out).name}.toml"
    config.write_text(to_toml(cfg))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(PYTHONPATH=f"{ROOT}:{ROOT / 'tests'}", OMP_NUM_THREADS="1", GXPO_TEST_FAKE_VLLM=str(int(fake_vllm)))
    script = tmp_path / "launch.py"
    script.write_text(SCRIPT)
    launcher = [sys.executable]
    if ranks > 1:
        launcher += ["-m", "torch.distributed.run", f"--nproc_per_node={ranks}", "--master_addr=127.0.0.1",
                     f"--master_port={_free_port()}"]
    proc = subprocess.run([*launcher, str(script), "--config", str(config), *extra], cwd=ROOT / "tests", env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return [json.loads(line) for line in (Path(cfg.out) / "metrics.jsonl").read_text().splitlines()]


def final_weights(out):
    from safetensors.torch import load_file

    return load_file(str(Path(out) / "final" / "model.safetensors"))


@pytest.mark.parametrize("algo", ["grpo", "gxpo"])
def test_two_ranks_match_one(tmp_path, algo):
    # 320 tokens per packed micro-batch: rank 0's sequences (106-107 tokens) fit 3 to a bin and rank 1's
    # (107) only 2, so the ranks run 3 and 4 micro-batches; rank 0 adds a zero-loss pass, no deadlock
    common = {"rollout.num_prompts": 4, "eval.every": 3, "eval.num_problems": 2, "eval.n_samples": 2, "eval.k": 2,
              "save_every": 2, "loss.max_tokens_per_micro_batch": 320}
    one = tiny_cfg(tmp_path / "one", algo, steps=3, **common)
    two = tiny_cfg(tmp_path / "two", algo, steps=3, **common)
    rows_one, rows_two = run_cli(one, tmp_path, 1), run_cli(two, tmp_path, 2)
    assert {r["world_size"] for r in rows_one} == {1} and {r["world_size"] for r in rows_two} == {2}
    assert rows_two[0]["micro_batches_min"] < rows_two[0]["micro_batches_max"]
    for r1, r2 in zip(rows_one, rows_two, strict=True):
        for key in ("reward_mean", "accuracy", "response_len", "backward_passes", "zero_variance_groups",
                    "eval/pass@1", "rule/active"):
            assert r1.get(key) == r2.get(key), (r1["step"], key)
        for key in ("loss", "entropy_mean", "grad_norm"):
            assert r1[key] == pytest.approx(r2[key], rel=1e-4, abs=1e-6), (r1["step"], key)
    w1, w2 = final_weights(one.out), final_weights(two.out)
    init = load_policy("tiny-random", torch.float32)[0].state_dict()
    assert w1.keys() == w2.keys()
    moved = 0
    for name in w1:
        assert rel_err(w2[name], w1[name]) < 1e-4, name  # fp32 reduction order, through Adam
        moved += rel_err(w1[name], init[name]) > 1e-4
    assert moved > len(w1) // 2, "training barely moved the weights; the comparison would prove little"


def test_two_ranks_match_one_with_mini_batches(tmp_path):
    """update.mini_batches = 2 on 2 ranks: each rank holds its share of each mini-batch, so the two GXPO steps per
    rollout step train on the one-process run's mini-batches (the later one's old log-probs taken by a no-grad
    forward in which a rank with fewer micro-batches runs zero-loss forwards) and reach its weights."""
    common = {"rollout.num_prompts": 4, "update.mini_batches": 2, "loss.max_tokens_per_micro_batch": 320}
    one, two = (tiny_cfg(tmp_path / name, "gxpo", steps=2, **common) for name in ("one", "two"))
    rows_one, rows_two = run_cli(one, tmp_path, 1), run_cli(two, tmp_path, 2)
    for r1, r2 in zip(rows_one, rows_two, strict=True):
        assert r1["backward_passes"] == r2["backward_passes"] == 6 * r1["step"] and r2["rule/active"] == 1
        assert r1["reward_mean"] == r2["reward_mean"]
        for key in ("loss", "entropy_mean", "grad_norm", "rule/gate_stat"):
            assert r1[key] == pytest.approx(r2[key], rel=1e-4, abs=1e-6), (r1["step"], key)
    w1, w2 = final_weights(one.out), final_weights(two.out)
    for name in w1:
        assert rel_err(w2[name], w1[name]) < 1e-4, name


def test_two_ranks_resume_from_a_checkpoint(tmp_path):
    """Stopped after 2 of 3 steps on 2 ranks, resumed on 2 ranks: the last step equals the straight run
    (with activation checkpointing under FSDP2)."""
    extra = {"rollout.num_prompts": 4, "activation_checkpointing": "selective"}
    straight = run_cli(tiny_cfg(tmp_path / "straight", "gxpo", steps=3, **extra), tmp_path, 2)
    run_cli(tiny_cfg(tmp_path / "resumed", "gxpo", steps=2, **extra), tmp_path, 2)
    resumed = run_cli(tiny_cfg(tmp_path / "resumed", "gxpo", steps=3, resume=True, **extra), tmp_path, 2)
    assert [r["step"] for r in resumed] == [1, 2, 3]
    for key in ("reward_mean", "loss", "backward_passes", "rule/gtilde_norm"):
        assert straight[-1][key] == pytest.approx(resumed[-1][key], rel=1e-6), key


def test_two_ranks_with_vllm_rollouts(tmp_path):
    """Each rank's engine gets the full weights gathered from the FSDP2 shards (its log-probs are the
    trainer's), and the run matches one rank (per-request seeds)."""
    common = {"rollout.num_prompts": 4, "rollout.engine": "vllm"}
    one = tiny_cfg(tmp_path / "one", "gxpo", steps=2, **common)
    two = tiny_cfg(tmp_path / "two", "gxpo", steps=2, **common)
    rows_one, rows_two = run_cli(one, tmp_path, 1, fake_vllm=True), run_cli(two, tmp_path, 2, fake_vllm=True)
    for r1, r2 in zip(rows_one, rows_two, strict=True):
        assert r2["rollout/logp_abs_diff"] < 1e-4 and r1["rollout/logp_abs_diff"] < 1e-4
        assert r1["reward_mean"] == r2["reward_mean"] and r1["response_len"] == r2["response_len"]
        assert r1["loss"] == pytest.approx(r2["loss"], rel=1e-4, abs=1e-6)
    w1, w2 = final_weights(one.out), final_weights(two.out)
    assert max(rel_err(w2[k], w1[k]) for k in w1) < 1e-4

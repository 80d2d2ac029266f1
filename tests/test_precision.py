"""fp32 master parameters: bf16 compute never means bf16 storage under AdamW, unless asked for."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import uninterpreted_env

pytest.importorskip("transformers")
from test_trainer import fake_reward_and_cpu_paths, tiny_cfg  # noqa: E402, F401
from test_trainer_fsdp import SCRIPT, _free_port  # noqa: E402

from gxpo_kernels import GXPO, SFPO, FlatAdamW  # noqa: E402
from trainer import policy_stack as stack_module  # noqa: E402
from trainer import train as train_module  # noqa: E402
from trainer.config import to_toml  # noqa: E402
from trainer.models import load_policy  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("build", [
    lambda ps, **kw: GXPO(ps, lr=1e-3, **kw), lambda ps, **kw: SFPO(ps, lr=1e-3, **kw),
    lambda ps, **kw: GXPO(ps, base=FlatAdamW, lr=1e-3, **kw), lambda ps, **kw: FlatAdamW(ps, lr=1e-3, **kw),
])
def test_bf16_parameters_under_adamw_are_an_error_unless_asked_for(build):
    params = [torch.nn.Parameter(torch.zeros(3, dtype=torch.bfloat16)), torch.nn.Parameter(torch.zeros(2))]
    with pytest.raises(ValueError, match="allow_bf16_params=True"):
        build(params)
    build(params, allow_bf16_params=True)


def test_bf16_parameters_under_sgd_are_fine():
    GXPO([torch.nn.Parameter(torch.zeros(3, dtype=torch.bfloat16))], base=torch.optim.SGD, lr=0.1, gate="never")


def _dtypes_after_run(rule, model) -> dict:
    local = lambda t: t.to_local() if hasattr(t, "to_local") else t  # noqa: E731
    base = rule.base
    return {"params": sorted({str(local(p).dtype) for p in model.parameters()}),
            "state": sorted({str(local(v).dtype) for s in base.state.values() for k, v in s.items()
                             if torch.is_tensor(v) and k != "step"})}


def test_bf16_compute_trains_fp32_masters_at_a_tiny_learning_rate(tmp_path, monkeypatch):
    seen = {}
    make_rule = stack_module.make_update_rule
    monkeypatch.setattr(stack_module, "make_update_rule",
                        lambda cfg, params: seen.setdefault("rule", make_rule(cfg, params)))
    real_export = train_module.export_final
    monkeypatch.setattr(train_module, "export_final", lambda model, *a: (
        seen.update(dtypes=_dtypes_after_run(seen["rule"], model)), real_export(model, *a)))
    cfg = tiny_cfg(tmp_path, "gxpo", steps=2, **{"dtype": "bfloat16", "optim.lr": 1e-7, "gxpo.gate": "never"})
    out = train_module.train(cfg, log=lambda *_: None)
    assert seen["dtypes"] == {"params": ["torch.float32"], "state": ["torch.float32"]}
    initial = load_policy("tiny-random", torch.float32, seed=cfg.seed)[0].state_dict()
    from transformers import AutoModelForCausalLM

    final = AutoModelForCausalLM.from_pretrained(out / "final", torch_dtype=torch.float32).state_dict()
    moved = sum(int((final[k] != v).sum()) for k, v in initial.items() if k in final)
    total = sum(v.numel() for k, v in initial.items() if k in final)
    assert moved / total > 0.5, f"only {moved} of {total} master weights moved at lr 1e-7"
    assert not torch.distributed.is_initialized(), "the one-rank group is torn down after the run"


def test_bf16_params_is_an_explicit_opt_in(tmp_path, monkeypatch):
    seen = {}
    make_rule = stack_module.make_update_rule
    monkeypatch.setattr(stack_module, "make_update_rule",
                        lambda cfg, params: seen.setdefault("rule", make_rule(cfg, params)))
    monkeypatch.setattr(train_module, "export_final",
                        lambda model, *a: seen.update(dtypes=_dtypes_after_run(seen["rule"], model)))
    cfg = tiny_cfg(tmp_path, "grpo", steps=1, **{"bf16_params": "true"})
    train_module.train(cfg, log=lambda *_: None)
    assert seen["dtypes"] == {"params": ["torch.bfloat16"], "state": ["torch.bfloat16"]}


DTYPE_SCRIPT = SCRIPT.replace("main(sys.argv[1:])", """import json
seen = {}
import trainer.policy_stack as stack
make_rule, export = stack.make_update_rule, t.export_final
stack.make_update_rule = lambda cfg, params: seen.setdefault("rule", make_rule(cfg, params))
def export_final(model, *a):
    from test_precision import _dtypes_after_run
    with open(os.environ["GXPO_TEST_DTYPES"] + os.environ.get("RANK", "0"), "w") as f:
        json.dump(_dtypes_after_run(seen["rule"], model), f)
    export(model, *a)
t.export_final = export_final
main(sys.argv[1:])
""")


@pytest.mark.parametrize("ranks", [1, 2])
def test_parameter_and_optimizer_state_dtypes_on_each_rank(tmp_path, ranks):
    cfg = tiny_cfg(tmp_path, "gxpo", steps=1, **{"dtype": "bfloat16", "rollout.num_prompts": 2,
                                                  "rollout.max_new_tokens": 6})
    config = tmp_path / "run.toml"
    config.write_text(to_toml(cfg))
    script = tmp_path / "launch.py"
    script.write_text(DTYPE_SCRIPT)
    env = uninterpreted_env()
    env.update(PYTHONPATH=f"{ROOT}:{ROOT / 'tests'}", OMP_NUM_THREADS="1", GXPO_TEST_DTYPES=str(tmp_path / "dtypes"))
    launcher = [sys.executable]
    if ranks > 1:
        launcher += ["-m", "torch.distributed.run", f"--nproc_per_node={ranks}", "--master_addr=127.0.0.1",
                     f"--master_port={_free_port()}"]
    proc = subprocess.run([*launcher, str(script), "--config", str(config)], cwd=ROOT / "tests", env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    for rank in range(ranks):
        dtypes = json.loads((tmp_path / f"dtypes{rank}").read_text())
        assert dtypes == {"params": ["torch.float32"], "state": ["torch.float32"]}, (rank, dtypes)


def test_one_rank_mixed_precision_keeps_loss_inputs_fp32(monkeypatch):
    """Under FSDP2's bf16 policy the hidden states and LM head reach the loss in bf16, while advantages and
    old log-probs stay fp32 (the root must not cast its inputs)."""
    import trainer.policy
    from gxpo_bench.step import synthetic_batch
    from trainer.closure import LossClosure
    from trainer.config import load_config
    from trainer.distributed import init_single_rank_group, shard_policy
    from trainer.policy import PolicyRunner

    seen = []
    fused = trainer.policy.fused_linear_grpo_loss

    def spy(hidden, weight, ids, adv, mask, **kw):
        old = kw.get("old_logp_BT")
        seen.append((hidden.dtype, weight.dtype, adv.dtype, None if old is None else old.dtype))
        return fused(hidden, weight, ids, adv, mask, **kw)

    monkeypatch.setattr(trainer.policy, "fused_linear_grpo_loss", spy)
    model, tokenizer = load_policy("tiny-random", torch.float32, seed=0)
    runner = PolicyRunner(model)
    own = init_single_rank_group(torch.device("cpu"))
    try:
        shard_policy(runner, torch.bfloat16)
        cfg = load_config(overrides=[("model", "tiny-random"), ("rollout.max_new_tokens", "8")])
        batch = synthetic_batch(len(tokenizer), 4, 5, 8, torch.device("cpu"))
        closure = LossClosure(runner, batch, torch.tensor([0.3, -1.1547, 0.8, 0.0]), cfg)
        closure()
        closure()  # the second pass gets pass 1's log-probs as old_logp
    finally:
        if own:
            torch.distributed.destroy_process_group()
    assert seen[0][:3] == (torch.bfloat16, torch.bfloat16, torch.float32)
    assert seen[-1] == (torch.bfloat16, torch.bfloat16, torch.float32, torch.float32)

"""The trainer on a tiny random Qwen2 model (built locally): every update rule, metrics, resume."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import rel_err, uninterpreted_env

pytest.importorskip("transformers")
from trainer import data as data_module  # noqa: E402
from trainer import train as train_module  # noqa: E402
from trainer.cli import main as cli_main  # noqa: E402
from trainer.config import load_config, to_toml  # noqa: E402
from trainer.tasks import Problem  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def length_reward(text, gold):
    """A reward the untrained tiny model can earn: completions of even length."""
    return float(len(text) % 2 == 0)


def tiny_cfg(tmp_path, algo, steps=3, **extra):
    overrides = {"model": "tiny-random", "algo": algo, "steps": steps, "out": str(tmp_path / algo),
                 "rollout.num_prompts": 3, "rollout.group_size": 4, "rollout.max_new_tokens": 12,
                 "optim.lr": 1e-3, "gxpo.tau": 100.0, "sfpo.tau": 100.0, **extra}
    return load_config(overrides=[(k, str(v)) for k, v in overrides.items()])


@pytest.fixture(autouse=True)
def fake_reward_and_cpu_paths(monkeypatch):
    """A learnable reward; and the CPU paths a user runs (C++ / torch), not the Triton interpreter,
    whose kernels are tested on their own."""
    from gxpo_kernels import backend

    monkeypatch.setattr(train_module, "make_reward", lambda kind, format_weight=0.0: length_reward)
    monkeypatch.setattr(backend, "use_triton", lambda t: t.is_cuda)


def capture_export(monkeypatch) -> dict:
    """Runs export_final as usual and keeps the model it exported under "model"."""
    exported = {}
    real_export = train_module.export_final
    monkeypatch.setattr(train_module, "export_final", lambda model, *a: (exported.update(model=model),
                                                                           real_export(model, *a)))
    return exported


def read_metrics(out):
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("algo,passes_per_step", [("grpo", 1), ("sfpo", 4), ("gxpo", 3)])
def test_three_steps_with_each_rule(tmp_path, algo, passes_per_step):
    cfg = tiny_cfg(tmp_path, algo, **({"loss.micro_batch_size": 5} if algo == "gxpo" else {}))
    out = train_module.train(cfg, log=lambda *_: None)
    rows = read_metrics(out)
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert [r["backward_passes"] for r in rows] == [passes_per_step * (i + 1) for i in range(3)]
    for r in rows:
        assert r["loss"] is not None and abs(r["loss"]) < 1e3
        for key in ("reward_mean", "accuracy", "wall_time_s", "time/rollout", "time/reward", "time/pass_1",
                    "time/update_rule", "time/unaccounted", "tokens_per_s", "entropy_mean"):
            assert key in r, key
        phases = sum(v for k, v in r.items() if k.startswith("time/") and k != "time/step")
        assert phases == pytest.approx(r["time/step"], rel=1e-6, abs=1e-6)
    assert (out / "config.toml").exists() and (out / "final" / "config.json").exists()
    assert load_config(out / "config.toml").algo == algo  # the written config reads back


def test_micro_batches_give_the_whole_batch_gradient(tmp_path):
    from trainer.closure import LossClosure
    from trainer.engines import make_engine
    from trainer.models import load_policy
    from trainer.policy import PolicyRunner

    for loss_agg in ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"):
        grads = []
        for micro in (0, 3):
            cfg = tiny_cfg(tmp_path, "grpo", **{"loss.loss_agg": loss_agg, "loss.micro_batch_size": micro})
            torch.manual_seed(0)
            model, tok = load_policy("tiny-random", torch.float32)
            runner = PolicyRunner(model)
            batch = make_engine("hf", runner, tok, cfg.rollout).generate(["user: 1 + 1\nassistant: "] * 2, 4, [0, 1])
            adv = torch.linspace(-1, 1, 8)
            model.zero_grad()
            LossClosure(runner, batch, adv, cfg)()
            grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
        assert rel_err(grads[1], grads[0]) < 1e-5, loss_agg


@pytest.mark.parametrize("mini_batches", [1, 3])
def test_resume_continues_exactly(tmp_path, mini_batches):
    extra, steps = {"update.mini_batches": mini_batches}, 4 if mini_batches == 1 else 3
    straight = train_module.train(tiny_cfg(tmp_path / "a", "gxpo", steps=steps, **extra), log=lambda *_: None)
    first = tiny_cfg(tmp_path / "b", "gxpo", steps=2, **extra)
    train_module.train(first, log=lambda *_: None)
    resumed = train_module.train(tiny_cfg(tmp_path / "b", "gxpo", steps=steps, resume=True, **extra),
                                 log=lambda *_: None)
    a, b = read_metrics(straight), read_metrics(resumed)
    assert [r["step"] for r in b] == list(range(1, steps + 1))
    for ra, rb in zip(a, b, strict=True):
        for key in ("reward_mean", "loss", "backward_passes", "rule/gtilde_norm", "rule/gate_stat", "entropy_mean"):
            assert ra.get(key) == rb.get(key), (ra["step"], key)


def varied_reward(text, gold):
    """A reward under which no group of the tiny model's completions has zero variance (distinct completions score
    differently), so that every GXPO step extrapolates."""
    return sum((i + 1) * ord(c) for i, c in enumerate(text)) % 997 / 997


@pytest.mark.parametrize("n", [1, 2])
def test_ppo_mini_batches_step_the_rule_on_whole_groups(tmp_path, monkeypatch, n):
    """update.mini_batches = n: per rollout step n rule steps (GXPO: 3 passes each), on consecutive runs of whole
    groups that cover the batch; mini-batch 1 on-policy, the others with the sampling policy's log-probs taken
    before the first step; the gate observes once per rollout step the token mean of the mini-batches' corrective
    passes' entropies (the GXPO authors' update_policy_gxpo). n = 1 is the single update over the whole batch."""
    from gxpo_kernels.optim.gate import ZScoreGate

    monkeypatch.setattr(train_module, "make_reward", lambda kind, format_weight=0.0: varied_reward)
    events, observed = [], []
    real_update, real_run, real_observe = train_module.Trainer.update, train_module.run_update, ZScoreGate.observe

    def spy_update(self, step, batch, adv, phases, group_sizes):
        events.append(("rollout step", batch, list(group_sizes)))
        return real_update(self, step, batch, adv, phases, group_sizes)

    def spy_run(rule, closure):
        on_policy = closure.old_logp_BT is None
        stats = real_run(rule, closure)
        events.append(("rule step", closure.batch, on_policy, closure.last_metrics["entropy_mean"],
                       closure.trained_tokens, len(closure.pass_times)))
        return stats

    monkeypatch.setattr(train_module.Trainer, "update", spy_update)
    monkeypatch.setattr(train_module, "run_update", spy_run)
    monkeypatch.setattr(ZScoreGate, "observe", lambda gate, h: observed.append(h) or real_observe(gate, h))
    cfg = tiny_cfg(tmp_path, "gxpo", steps=2, **{"rollout.num_prompts": 4, "update.mini_batches": n})
    trainer = train_module.Trainer(cfg, log=lambda *_: None)
    rows = read_metrics(trainer.run())
    assert [r["backward_passes"] for r in rows] == [3 * n, 6 * n] == [r["rule/backward_passes"] for r in rows]
    assert trainer.rule.steps == 2 * n and trainer.rule.gate_steps == 2 and [r["rule/active"] for r in rows] == [1, 1]
    assert len(events) == 2 * (1 + n) and len(observed) == trainer.rule.gate.seen == 2
    for s in range(2):
        (_, batch, group_sizes), *steps = events[s * (1 + n):(s + 1) * (1 + n)]
        assert group_sizes == [4] * 4
        if n == 1:
            assert steps[0][1] is batch
        rows_of = [step[1].completion_ids.shape[0] for step in steps]
        assert rows_of == [16 // n] * n  # whole groups of 4, the same number in each
        for key in ("completion_ids", "completion_mask", "input_ids"):
            assert torch.equal(torch.cat([getattr(step[1], key) for step in steps]), getattr(batch, key))
        assert [step[2] for step in steps] == [True] + [False] * (n - 1)
        assert [step[5] for step in steps] == [3] * n
        tokens = sum(step[4] for step in steps)  # the token mean of the corrective passes' entropies
        assert observed[s] == pytest.approx(sum(step[3] * step[4] for step in steps) / tokens, rel=1e-12)
        assert rows[s]["rule/gate_stat"] == observed[s] == pytest.approx(rows[s]["entropy_mean"], rel=1e-12)


def test_mini_batches_must_divide_the_prompt_groups(tmp_path):
    for bad in (0, 2, -1):
        with pytest.raises(ValueError, match=r"'update\.mini_batches' must be an int >= 1 that divides "
                                             r"rollout\.num_prompts \(3\)"):
            tiny_cfg(tmp_path, "gxpo", **{"update.mini_batches": bad})
    with pytest.raises(ValueError, match=r"config key 'update\.mini_batches': cannot read '1\.5' as int"):
        tiny_cfg(tmp_path, "gxpo", **{"update.mini_batches": 1.5})
    assert tiny_cfg(tmp_path, "gxpo", **{"update.mini_batches": 3}).update.mini_batches == 3


def test_torn_checkpoint_falls_back_to_the_previous_one(tmp_path):
    from trainer.checkpoint import complete_checkpoints

    cfg = tiny_cfg(tmp_path, "gxpo", steps=3, save_every=1)
    out = train_module.train(cfg, log=lambda *_: None)
    assert [p.name for p in complete_checkpoints(out)] == ["step_00000003", "step_00000002"]
    newest = complete_checkpoints(out)[0]
    (newest.parent / "step_00000004.tmp").mkdir()  # an unfinished save is never a candidate
    for data in newest.glob("*.distcp"):
        data.write_bytes(data.read_bytes()[:1000])  # torn mid-write
    messages = []
    train_module.train(tiny_cfg(tmp_path, "gxpo", steps=4, save_every=1, resume=True), log=messages.append)
    assert any("unreadable" in m and "step_00000003" in m for m in messages), messages
    assert "resumed from step 2" in messages
    assert [r["step"] for r in read_metrics(out)] == [1, 2, 3, 4]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_killed_run_resumes_exactly(tmp_path, sig):
    """SIGTERM: the run checkpoints after the current step and exits 0. SIGKILL: it dies wherever it is.
    Either way --resume continues from the newest whole checkpoint, and the steps after it equal an
    uninterrupted run's."""
    steps, run = 6, tmp_path / "run"
    env = uninterpreted_env()
    env["PYTHONPATH"] = str(ROOT)
    script = ("import sys; from trainer import train as t; from test_trainer import length_reward;"
              "t.make_reward = lambda kind, format_weight=0.0: length_reward;"
              "from trainer.cli import main; main(sys.argv[1:])")
    cfg = tiny_cfg(run, "gxpo", steps=steps, save_every=1)
    args = ["--config", str(tmp_path / "cfg.toml")]

    (tmp_path / "cfg.toml").write_text(to_toml(cfg))
    proc = subprocess.Popen([sys.executable, "-c", script, *args], cwd=Path(__file__).parent, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    metrics = Path(cfg.out) / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (metrics.exists() and metrics.read_text().count("\n") >= 2):
        time.sleep(0.02)
    proc.send_signal(sig)
    output, _ = proc.communicate(timeout=120)
    if sig == signal.SIGTERM:
        assert proc.returncode == 0 and "SIGTERM" in output, output
    stopped_at = len(read_metrics(cfg.out))
    assert 2 <= stopped_at < steps, "the run finished before the signal; make it longer"

    resumed = read_metrics(train_module.train(tiny_cfg(run, "gxpo", steps=steps, save_every=1, resume=True),
                                              log=lambda *_: None))
    straight = read_metrics(train_module.train(tiny_cfg(tmp_path / "straight", "gxpo", steps=steps),
                                               log=lambda *_: None))
    assert [r["step"] for r in resumed] == list(range(1, steps + 1))
    for ra, rb in zip(straight, resumed, strict=True):
        for key in ("reward_mean", "loss", "backward_passes", "rule/gtilde_norm"):
            assert ra.get(key) == rb.get(key), (ra["step"], key)


def test_config_errors_and_help(capsys, tmp_path):
    with pytest.raises(SystemExit, match="unknown config key 'gxpo.KK'"):
        cli_main(["--gxpo.KK", "3"])
    with pytest.raises(SystemExit, match="'algo' must be one of"):
        cli_main(["--algo", "ppo"])
    bad = tmp_path / "bad.toml"
    bad.write_text("[rollout]\ngroup_sizes = 4\n")
    with pytest.raises(SystemExit, match="unknown config key 'rollout.group_sizes'"):
        cli_main(["--config", str(bad)])
    with pytest.raises(SystemExit) as e:
        cli_main(["--help"])
    assert e.value.code == 0 and "gxpo-train" in capsys.readouterr().out


def test_pass_at_k_by_hand():
    from trainer.evaluate import pass_at_k

    assert pass_at_k(4, 1, 2) == pytest.approx(0.5)  # 1 - C(3,2)/C(4,2)
    assert pass_at_k(4, 0, 4) == 0.0 and pass_at_k(4, 3, 2) == 1.0 and pass_at_k(5, 2, 1) == pytest.approx(0.4)
    with pytest.raises(ValueError):
        pass_at_k(4, 5, 1)


def test_held_out_evaluation_every_n_steps(tmp_path):
    cfg = tiny_cfg(tmp_path, "grpo", steps=3, **{"eval.every": 2, "eval.num_problems": 3, "eval.n_samples": 4,
                                                 "eval.k": 2})
    rows = read_metrics(train_module.train(cfg, log=lambda *_: None))
    assert ["eval/pass@1" in r for r in rows] == [False, True, True]
    for r in rows[1:]:
        assert 0 <= r["eval/pass@1"] <= r["eval/pass@2"] <= 1 and r["time/eval"] > 0
    held_out = {p.question for p in data_module.held_out_problems(cfg, log=None)}
    trained = {p.question for s in range(3) for p in data_module.problems_for_step(cfg, s, None)}
    assert held_out and not held_out & trained
    assert (Path(cfg.out) / "tensorboard").is_dir()


@pytest.mark.parametrize("path", sorted((ROOT / "trainer" / "configs").glob("*.toml")), ids=lambda p: p.name)
def test_shipped_configs_load(path, tmp_path):
    cfg = load_config(path)
    round_trip = tmp_path / "again.toml"
    round_trip.write_text(to_toml(cfg))
    assert load_config(round_trip) == cfg


def test_lora_trains_only_the_adapters(tmp_path, monkeypatch):
    from safetensors.torch import load_file

    from trainer.models import load_policy

    exported = capture_export(monkeypatch)
    cfg = tiny_cfg(tmp_path, "gxpo", steps=2, **{"lora.r": 4, "lora.alpha": 8})
    out = train_module.train(cfg, log=lambda *_: None)
    assert [r["backward_passes"] for r in read_metrics(out)] == [3, 6]
    adapter = load_file(str(out / "final" / "adapter_model.safetensors"))
    assert adapter and all(k.split(".")[-2] in ("lora_A", "lora_B") for k in adapter)
    assert {k.split(".")[-3] for k in adapter} == {"q_proj", "k_proj", "v_proj", "o_proj"}
    assert any(v.abs().sum() > 0 for k, v in adapter.items() if "lora_B" in k), "lora_B starts at 0 and must move"
    base_before = load_policy("tiny-random", torch.float32)[0].state_dict()
    base_after = {k.replace(".base_layer", ""): v for k, v in exported["model"].get_base_model().state_dict().items()
                  if "lora_" not in k}
    assert base_after.keys() == base_before.keys()
    for name, value in base_after.items():
        assert torch.equal(value, base_before[name]), name


def test_lora_config_errors(tmp_path):
    from trainer.models import apply_lora, load_policy

    with pytest.raises(ValueError, match="lora.r"):
        tiny_cfg(tmp_path, "grpo", **{"lora.r": -1})
    model = load_policy("tiny-random", torch.float32)[0]
    cfg = tiny_cfg(tmp_path, "grpo", **{"lora.r": 4, "lora.target_modules": "q_proj,qkv"})
    with pytest.raises(ValueError, match=r"\['qkv'\] are not modules"):
        apply_lora(model, cfg.lora)


def test_flops_per_token_by_hand():
    from trainer.flops import train_flops_per_token
    from trainer.models import load_policy

    model = load_policy("tiny-random", torch.float32)[0]
    c = model.config
    n = sum(p.numel() for p in model.parameters())
    n_matmul = n - c.vocab_size * c.hidden_size  # untied: the input embedding is a lookup
    assert train_flops_per_token(model, 10) == 6 * n_matmul + 12 * c.num_hidden_layers * c.hidden_size * 10
    model.requires_grad_(False)
    assert train_flops_per_token(model, 10) == 4 * n_matmul + 12 * c.num_hidden_layers * c.hidden_size * 10


@pytest.mark.parametrize("algo", ["grpo", "gxpo"])
@pytest.mark.parametrize("recipe", ["xrpo", "capo", "grpo-lambda"])
def test_plugins_train_two_steps(tmp_path, recipe, algo):
    # CAPO's thresholds are scaled to the tiny model's lr here so that GXPO keeps tokens to extrapolate with
    cfg = tiny_cfg(tmp_path, algo, steps=2, recipe=recipe, **{"rollout.group_size": 6, "xrpo.n0": 2,
                                                               "capo.tau_H": 1e3, "capo.tau_F": 1e3})
    rows = read_metrics(train_module.train(cfg, log=lambda *_: None))
    assert [r["backward_passes"] for r in rows] == [(1 if algo == "grpo" else 3) * (i + 1) for i in range(2)]
    for r in rows:
        assert r["rollouts"] == 3 * 6 and abs(r["loss"]) < 1e3  # the budget is conserved
        if recipe == "xrpo":
            assert {"xrpo/seeded_rows", "xrpo/sharpened_rows", "xrpo/max_group", "xrpo/min_group"} <= r.keys()
            assert r["xrpo/min_group"] >= 2
        if recipe == "capo":
            assert 0 <= r["capo/rejected_frac"] <= 1 and r["time/token_mask"] > 0
            assert "capo/m_F_q99" in r  # official mode: an SGD step is modelled before CAPO's moments exist
    assert load_config(Path(cfg.out) / "config.toml").recipe == recipe


def test_xrpo_seeds_all_fail_prompts_and_resumes_exactly(tmp_path, monkeypatch):
    """A reward no completion of the first prompt earns: from step 2 on its extra rollouts are sampled with
    exemplars from the corpus; the corpus rides in the checkpoint, so a resumed run equals a straight one."""
    def reward(text, gold):
        return float(gold != "2" and len(text) % 2 == 0)

    monkeypatch.setattr(train_module, "make_reward", lambda kind, format_weight=0.0: reward)
    monkeypatch.setattr(train_module, "problems_for_step", lambda cfg, step, dataset: [
        Problem("1 + 1", "2"), Problem(f"{step} + 5", str(step + 5)), Problem(f"{step} + 6", str(step + 6))])
    extra = {"recipe": "xrpo", "rollout.group_size": 6, "save_every": 1}
    straight = read_metrics(train_module.train(tiny_cfg(tmp_path / "a", "grpo", steps=3, **extra), log=print))
    assert straight[0]["xrpo/seeded_rows"] == 0 and straight[1]["xrpo/seeded_rows"] > 0
    train_module.train(tiny_cfg(tmp_path / "b", "grpo", steps=2, **extra), log=lambda *_: None)
    resumed = read_metrics(train_module.train(tiny_cfg(tmp_path / "b", "grpo", steps=3, resume=True, **extra),
                                              log=lambda *_: None))
    for key in ("reward_mean", "loss", "xrpo/seeded_rows", "xrpo/max_group"):
        assert straight[-1][key] == resumed[-1][key], key


@pytest.mark.parametrize("mode", ["official", "optimizer_moments"])
def test_capo_masks_tokens_with_a_huge_predicted_kl(tmp_path, mode):
    """With a learning rate large enough every token's predicted KL passes tau_F: all are masked, and
    they leave the loss's token count; with a tiny one none is. The official mode models an SGD step
    before its moments are fed (so it masks from the first step) and feeds them only with kept tokens;
    the variant waits for the optimizer's first step."""
    from trainer.closure import LossClosure, make_update_rule
    from trainer.engines import make_engine
    from trainer.models import load_policy
    from trainer.plugins.capo.plugin import capo_token_mask, make_moments
    from trainer.policy import PolicyRunner

    cfg = tiny_cfg(tmp_path, "grpo", recipe="capo", **{"capo.mode": mode})
    model, tok = load_policy("tiny-random", torch.float32)
    runner = PolicyRunner(model)
    batch = make_engine("hf", runner, tok, cfg.rollout).generate(["user: 1 + 1\nassistant: "] * 2, 4, [0, 1])
    adv = torch.linspace(-1, 1, 8)
    rule = make_update_rule(cfg, list(model.parameters()))
    moments = make_moments(cfg, model, "cpu")
    assert (moments is None) == (mode != "official")
    if mode == "optimizer_moments":
        masked, stats = capo_token_mask(runner, batch, adv, rule, cfg)
        assert masked is batch and stats["capo/rejected_frac"] == 0  # no optimizer moments yet: nothing to model
        rule.step(LossClosure(runner, batch, adv, cfg))
    kept = {}
    for lr in (1e3, 1e-12):
        rule.param_groups[0]["lr"] = lr
        masked, stats = capo_token_mask(runner, batch, adv, rule, cfg, moments=moments)
        assert (masked.completion_mask <= batch.completion_mask).all()  # only ever removes tokens
        kept[lr] = LossClosure(runner, masked, adv, cfg).total_tokens
        assert stats["capo/rejected_frac"] == pytest.approx(1 - kept[lr] / batch.completion_mask.sum().item())
        if moments is not None:  # every token masked at lr 1e3: t advances, nothing fed; then all fed
            assert moments.t == len(kept) and moments.fed == (lr == 1e-12)
    assert kept[1e3] == 0 and kept[1e-12] == batch.completion_mask.sum().item()
    with pytest.raises(ValueError, match="FSDP"):
        capo_token_mask(runner, batch, adv, rule, cfg, world=2, moments=moments)


def test_capo_official_moments_ride_in_the_checkpoint(tmp_path):
    """A resumed CAPO run (official mode: its own moments) equals a straight one."""
    extra = {"recipe": "capo", "save_every": 1, "capo.tau_F": 1e-12, "capo.tau_H": 0.0, "optim.lr": 1e-2}
    straight = read_metrics(train_module.train(tiny_cfg(tmp_path / "a", "grpo", steps=3, **extra),
                                               log=lambda *_: None))
    assert 0 < straight[-1]["capo/rejected_frac"] < 1
    train_module.train(tiny_cfg(tmp_path / "b", "grpo", steps=2, **extra), log=lambda *_: None)
    resumed = read_metrics(train_module.train(tiny_cfg(tmp_path / "b", "grpo", steps=3, resume=True, **extra),
                                              log=lambda *_: None))
    for key in ("reward_mean", "loss", "capo/rejected_frac", "capo/m_F_q50", "grad_norm"):
        assert straight[-1][key] == resumed[-1][key], key


def test_checkpointed_and_compiled_blocks_train(tmp_path):
    """activation_checkpointing and compile through the trainer: the same metrics as plain blocks."""
    plain = read_metrics(train_module.train(tiny_cfg(tmp_path / "plain", "gxpo", steps=2), log=lambda *_: None))
    other = read_metrics(train_module.train(tiny_cfg(tmp_path / "ckpt", "gxpo", steps=2,
                                                     activation_checkpointing="selective", compile=True),
                                            log=lambda *_: None))
    for a, b in zip(plain, other, strict=True):
        assert a["reward_mean"] == b["reward_mean"]
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4, abs=1e-6)


def test_flat_adamw_base_trains_like_adamw(tmp_path, monkeypatch):
    """optim.name = flat_adamw: FlatAdamW's kernel (the interpreter here) takes GXPO's pass-1 snapshot
    and steps; the C++ flat ops do the rest. The run equals the torch-AdamW run."""
    from gxpo_kernels import FlatAdamW

    if not os.environ.get("TRITON_INTERPRET") and not torch.cuda.is_available():
        pytest.skip("FlatAdamW's kernel needs CUDA or TRITON_INTERPRET=1")
    plain = read_metrics(train_module.train(tiny_cfg(tmp_path / "a", "gxpo", steps=2), log=lambda *_: None))
    monkeypatch.setattr(FlatAdamW, "uses_kernel", lambda self: True)
    flat = read_metrics(train_module.train(tiny_cfg(tmp_path / "b", "gxpo", steps=2, **{"optim.name": "flat_adamw"}),
                                           log=lambda *_: None))
    for a, b in zip(plain, flat, strict=True):
        assert a["reward_mean"] == b["reward_mean"] and b["rule/active"] == 1
        for key in ("loss", "rule/gtilde_norm", "rule/r_mean"):
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), key

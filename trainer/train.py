"""The training loop: rollouts, rewards, advantages, one update per step with the configured rule,
per-phase wall-clock, metrics.jsonl, checkpoints, resume, and the final HF-format model."""

import contextlib
import copy
import json
import math
import random
import signal
import time
from pathlib import Path

import torch

from .advantages import group_normalized
from .checkpoint import load_latest_checkpoint, restore_rng, save_checkpoint
from .config import TrainConfig, to_toml
from .evaluate import evaluate
from .models import load_policy
from .rollout import make_engine
from .step import LossClosure, decoder_and_head, make_update_rule, run_update
from .tasks import arithmetic_problems, jsonl_problems, make_reward


class Phases:
    """Wall-clock per named phase within a step: `with phases("rollout"): ...`."""

    def __init__(self):
        self.times = {}

    @contextlib.contextmanager
    def __call__(self, name):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.times[name] = self.times.get(name, 0.0) + time.perf_counter() - t0


def problems_for_step(cfg: TrainConfig, step: int, dataset):
    """The step's prompts; a pure function of (seed, step), so a resumed run sees the same data."""
    n = cfg.rollout.num_prompts
    if dataset is None:
        stream = arithmetic_problems(cfg.seed * 1_000_003 + step, cfg.task.difficulty)
        return [next(stream) for _ in range(n)]
    order = random.Random(cfg.seed + step // max(1, len(dataset) // n)).sample(range(len(dataset)), len(dataset))
    start = (step * n) % len(dataset)
    return [dataset[order[(start + i) % len(dataset)]] for i in range(n)]


def held_out_problems(cfg: TrainConfig, log):
    """Evaluation problems: arithmetic from seeds no training step uses, or the eval JSONL file."""
    if cfg.task.name == "jsonl":
        return jsonl_problems(cfg.eval.path, cfg.task.on_bad_record, log)[:cfg.eval.num_problems]
    stream = arithmetic_problems(2**40 + cfg.seed, cfg.task.difficulty)  # training seeds stay far below
    return [next(stream) for _ in range(cfg.eval.num_problems)]


def prompt_text(tokenizer, question, system_prompt):
    messages = [{"role": "system", "content": system_prompt}, {"role": "user", "content": question}]
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


@torch.no_grad()
def reference_logp(ref_model, batch, cfg):
    """Per-token log-probs of the frozen reference policy (only when beta > 0)."""
    from gxpo_kernels import fused_linear_grpo_loss

    decoder, head = decoder_and_head(ref_model)
    hidden = decoder(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                     position_ids=batch.position_ids).last_hidden_state
    P, T = batch.prompt_len, batch.completion_ids.shape[1]
    zeros = torch.zeros(batch.completion_ids.shape[0], device=hidden.device)
    _, metrics = fused_linear_grpo_loss(hidden[:, P - 1:P - 1 + T], head.weight, batch.completion_ids, zeros,
                                        batch.completion_mask, temperature=cfg.rollout.temperature)
    return metrics["logp_BT"]


def train(cfg: TrainConfig, log=None) -> Path:
    log = log or (lambda message: print(message, flush=True))
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.toml").write_text(to_toml(cfg))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}.get(
        cfg.dtype, torch.bfloat16 if device.type == "cuda" else torch.float32)
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    model, tokenizer = load_policy(cfg.model, dtype, cfg.seed)
    model.to(device)
    ref_model = copy.deepcopy(model).eval().requires_grad_(False) if cfg.loss.beta > 0 else None
    params = [p for p in model.parameters() if p.requires_grad]
    rule = make_update_rule(cfg, params)
    warmup = cfg.optim.warmup_steps
    scheduler = torch.optim.lr_scheduler.LambdaLR(rule, lambda s: min(1.0, (s + 1) / (warmup + 1)))
    engine = make_engine(cfg.rollout.engine, model, tokenizer, cfg.rollout)
    reward_fn = make_reward(cfg.task.reward, cfg.task.format_reward)
    dataset = jsonl_problems(cfg.task.path, cfg.task.on_bad_record, log) if cfg.task.name == "jsonl" else None

    start_step, wall_offset, backward_passes = 0, 0.0, 0
    if cfg.resume and (ckpt := load_latest_checkpoint(cfg.out, log)) is not None:
        model.load_state_dict(ckpt["model"])
        rule.load_state_dict(ckpt["rule"])
        scheduler.load_state_dict(ckpt["scheduler"])
        restore_rng(ckpt["rng"])
        start_step, wall_offset, backward_passes = ckpt["step"], ckpt["wall_time_s"], ckpt["backward_passes"]
        log(f"resumed from step {start_step}")
    metrics_path = out / "metrics.jsonl"
    if start_step == 0:
        metrics_path.write_text("")
    else:  # drop lines past the checkpoint, written by the interrupted run
        lines = [ln for ln in metrics_path.read_text().splitlines() if ln and json.loads(ln)["step"] <= start_step]
        metrics_path.write_text("".join(ln + "\n" for ln in lines))

    eval_problems = None
    tb = _tensorboard_writer(out)
    stop = {"requested": False}
    previous_handler = signal.signal(signal.SIGTERM, lambda *_: stop.update(requested=True))
    t_start = time.perf_counter() - wall_offset
    bar = _progress_bar(cfg.steps, start_step)
    try:
        for step in range(start_step, cfg.steps):
            t_step = time.perf_counter()
            phases = Phases()
            problems = problems_for_step(cfg, step, dataset)
            with phases("rollout"):
                prompts = [prompt_text(tokenizer, p.question, cfg.task.system_prompt) for p in problems]
                batch = engine.generate(prompts, cfg.rollout.group_size)
            with phases("reward"):
                golds = [p.answer for p in problems for _ in range(cfg.rollout.group_size)]
                rewards = torch.tensor([reward_fn(t, g) for t, g in zip(batch.texts, golds, strict=True)])
                adv, adv_stats = group_normalized(rewards.view(len(problems), -1))
            ref_logp = None
            if ref_model is not None:
                with phases("ref_logprob"):
                    ref_logp = reference_logp(ref_model, batch, cfg)
            closure = LossClosure(model, batch, adv.to(device), cfg, ref_logp)
            with phases("update"):
                rule_stats = run_update(rule, closure, cfg, params)
            scheduler.step()
            backward_passes += rule_stats.pop("backward_passes_step")
            for i, t in enumerate(closure.pass_times):
                phases.times[f"pass_{i + 1}"] = t
            phases.times["update_rule"] = phases.times.pop("update") - sum(closure.pass_times)
            record = {"step": step + 1, "reward_mean": rewards.mean().item(), "reward_std": rewards.std().item(),
                      "accuracy": (rewards >= 1).float().mean().item(),
                      "response_len": batch.completion_mask.sum(1).float().mean().item(),
                      **adv_stats, **closure.last_metrics, **rule_stats, "backward_passes": backward_passes,
                      "lr": scheduler.get_last_lr()[0]}
            tokens = int(batch.attention_mask.sum()) * len(closure.pass_times)
            update_time = sum(closure.pass_times)
            record["tokens_per_s"] = tokens / update_time if update_time > 0 else float("nan")
            if device.type == "cuda":
                record["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
            if cfg.eval.every and ((step + 1) % cfg.eval.every == 0 or step + 1 == cfg.steps):
                eval_problems = eval_problems or held_out_problems(cfg, log)
                rng_state = torch.get_rng_state()  # evaluation must not shift the training samples
                with phases("eval"):
                    record.update(evaluate(engine, [prompt_text(tokenizer, p.question, cfg.task.system_prompt)
                                                    for p in eval_problems], [p.answer for p in eval_problems],
                                           reward_fn, cfg.eval.n_samples, cfg.eval.k))
                torch.set_rng_state(rng_state)
            save = step + 1 == cfg.steps or stop["requested"] or (cfg.save_every and (step + 1) % cfg.save_every == 0)
            if save:
                with phases("checkpoint"):
                    save_checkpoint(cfg.out, step + 1, model, rule, scheduler,
                                    {"wall_time_s": time.perf_counter() - t_start, "backward_passes": backward_passes})
            step_time = time.perf_counter() - t_step
            record.update({f"time/{k}": v for k, v in phases.times.items()})
            record["time/unaccounted"] = step_time - sum(phases.times.values())
            record["time/step"] = step_time
            record["wall_time_s"] = time.perf_counter() - t_start
            with open(metrics_path, "a") as f:
                f.write(json.dumps({k: _jsonable(v) for k, v in record.items()}) + "\n")
            if tb is not None:
                for key, value in record.items():
                    if isinstance(value, (int, float)) and key != "step":
                        tb.add_scalar(key, value, step + 1)
            eta = (cfg.steps - step - 1) * (record["wall_time_s"] - wall_offset) / (step + 1 - start_step)
            summary = (f"reward {record['reward_mean']:.3f} acc {record['accuracy']:.2f} loss {record['loss']:+.4f} "
                       f"passes {backward_passes}")
            if bar is not None:
                bar.update(bar.task_ids[0], completed=step + 1, summary=summary)
            else:
                log(f"step {step + 1}/{cfg.steps} {summary} {step_time:.1f}s (ETA {eta:.0f}s)")
            if stop["requested"]:
                log(f"SIGTERM: stopped after step {step + 1} with a checkpoint; rerun with --resume to continue")
                return out
    finally:
        signal.signal(signal.SIGTERM, previous_handler)
        if bar is not None:
            bar.stop()
        if tb is not None:
            tb.close()
    model.save_pretrained(out / "final")
    tokenizer.save_pretrained(out / "final")
    return out


def _progress_bar(total, start):
    """A rich progress bar with ETA on an interactive console; None (plain log lines) otherwise."""
    import sys

    try:
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
    except ImportError:
        return None
    if not sys.stdout.isatty():
        return None
    bar = Progress(TextColumn("step {task.completed}/{task.total}"), BarColumn(), TimeElapsedColumn(),
                   TextColumn("ETA"), TimeRemainingColumn(), TextColumn("{task.fields[summary]}"))
    bar.add_task("train", total=total, completed=start, summary="")
    bar.start()
    return bar


def _tensorboard_writer(out: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is part of the train extra, not a core dependency
        return None
    return SummaryWriter(str(out / "tensorboard"))


def _jsonable(v):
    v = float(v) if isinstance(v, torch.Tensor) else v
    return None if isinstance(v, float) and not math.isfinite(v) else v

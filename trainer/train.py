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

from .advantages import group_normalized_ragged
from .checkpoint import load_latest_checkpoint, save_checkpoint
from .closure import LossClosure, MiniBatchClosures, NonFiniteLoss, combine_rule_stats, run_update, split_groups
from .collect import collect
from .config import TrainConfig, to_toml
from .data import held_out_sets, problems_for_step, task_problems
from .distributed import init_distributed
from .engines import make_engine
from .entropy_control import AdaptiveEntropy
from .evaluate import evaluate_sets
from .flops import peak_flops, train_flops_per_token
from .plugins import enabled_plugins
from .policy_stack import build_policy_stack
from .sampling import row_seed
from .tasks import make_reward


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


class Trainer:
    """One run: the components built from the config (policy, rollout engine, task, update rule, schedule,
    plug-ins), resumed from the newest checkpoint when asked; run() trains to cfg.steps."""

    def __init__(self, cfg: TrainConfig, log=None):
        log = log or (lambda message: print(message, flush=True))
        d = self.d = init_distributed()
        if cfg.rollout.num_prompts % d.world:
            raise ValueError(f"rollout.num_prompts ({cfg.rollout.num_prompts}) must be a multiple of the number "
                             f"of ranks ({d.world})")
        if (cfg.rollout.num_prompts // d.world) % cfg.update.mini_batches:
            raise ValueError(f"update.mini_batches ({cfg.update.mini_batches}) must divide each rank's prompt groups "
                             f"(rollout.num_prompts / ranks = {cfg.rollout.num_prompts // d.world})")
        if cfg.eval.every and cfg.eval.num_problems < d.world:
            raise ValueError(f"eval.num_problems ({cfg.eval.num_problems}) must be at least the number of ranks "
                             f"({d.world})")
        self.cfg, self.log = cfg, (log if d.main else (lambda *_: None))
        self.out = Path(cfg.out)
        if d.main:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "config.toml").write_text(to_toml(cfg))
        self.device = device = d.device
        # bad eval data fails before the model loads
        self.eval_sets = held_out_sets(cfg, self.log) if cfg.eval.every else None
        torch.manual_seed(cfg.seed)
        random.seed(cfg.seed)
        stack = build_policy_stack(cfg, device, d.world)
        self.model, self.tokenizer, self.runner, self.ref_runner = stack.model, stack.tokenizer, stack.runner, \
            stack.ref_runner
        self.rule, self.own_group = stack.rule, stack.own_group
        warmup = cfg.optim.warmup_steps
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.rule, lambda s: min(1.0, (s + 1) / (warmup + 1)))
        self.plugins = enabled_plugins(cfg)
        rollout_plugins = [p for p in self.plugins if p.rollouts is not None]
        if len(rollout_plugins) > 1:
            raise ValueError(f"plug-ins {[p.name for p in rollout_plugins]} each take over the rollouts; "
                             "enable one of them")
        self.rollout_plugin = rollout_plugins[0] if rollout_plugins else None
        self.plugin_states = {p.name: state for p in self.plugins if p.state and (state := p.state(self)) is not None}
        self.entropy_control = None
        if cfg.loss.use_adaptive_entropy:  # checkpointed beside the plug-ins' states
            self.entropy_control = self.plugin_states["adaptive_entropy"] = AdaptiveEntropy(
                cfg.loss, cfg.objective.entropy_coef)
        self.peak = peak_flops(device)
        self.engine = make_engine(cfg.rollout.engine, self.runner, self.tokenizer, cfg.rollout, d,
                                  self.out / "vllm_config", cfg.seed)
        self.reward_fn = make_reward(cfg.task.reward, cfg.task.format_reward)
        self.dataset = task_problems(cfg.task, self.log)
        self.start_step, self.wall_offset, self.backward_passes = 0, 0.0, 0
        if cfg.resume:
            self._resume()
        self.metrics_path = self.out / "metrics.jsonl"

    def _resume(self):
        state = load_latest_checkpoint(self.cfg.out, self.model, self.rule, self.scheduler, self.d, self.log,
                                       plugins=self.plugin_states)
        if not state:
            return
        self.start_step, self.wall_offset, self.backward_passes = (state["step"], state["wall_time_s"],
                                                                   state["backward_passes"])
        self.log(f"resumed from step {self.start_step}")

    # -- the step, slot by slot ------------------------------------------------------------------------
    def collect(self, step: int, phases):
        """This rank's prompts of the step, their completions and rewards (the rollout plug-ins' slot). With PPO
        mini-batches a rank holds its share of each mini-batch in turn (mini-batch k is prompts k P / N to
        (k + 1) P / N on any number of ranks, so a multi-rank run takes the one-process run's updates)."""
        cfg, d = self.cfg, self.d
        problems = problems_for_step(cfg, step, self.dataset)
        keyed, n = [(p, row_seed(cfg.seed, step, i)) for i, p in enumerate(problems)], cfg.update.mini_batches
        per = len(keyed) // n
        keyed = [item for k in range(n) for item in d.shard(keyed[k * per:(k + 1) * per])]
        plugin = self.rollout_plugin
        got = collect(self.engine, self.tokenizer, cfg, keyed, step, self.reward_fn, phases,
                      plugin and plugin.rollouts, plugin and self.plugin_states.get(plugin.name))
        return keyed, got

    def advantages(self, keyed, got, phases):
        """Group-normalized GRPO advantages, then each enabled plug-in's advantages hook; then its observe hook
        (what the step's rollouts add to its state)."""
        with phases("advantages"):
            adv, adv_stats = group_normalized_ragged(got.rewards, got.group_sizes)
            for plugin in self.plugins:
                if plugin.advantages is not None:
                    adv, stats = plugin.advantages(self, got, adv)
                    adv_stats.update(stats)
        for plugin in self.plugins:
            if plugin.observe is not None:
                plugin.observe(self, keyed, got, self.plugin_states.get(plugin.name))
        return adv, adv_stats

    def mask(self, got, adv, phases):
        """The batch the loss sees: each enabled plug-in's token-mask hook may drop tokens from it."""
        hooks = [p.token_mask for p in self.plugins if p.token_mask is not None]
        batch = got.batch
        if hooks:
            with phases("token_mask"):
                for hook in hooks:
                    batch, stats = hook(self, batch, adv)
                    got.stats.update(stats)
        return batch

    def update(self, step, batch, adv, phases, group_sizes):
        """The rule's step over a closure on the batch; with update.mini_batches = N > 1, N rule steps, one per
        mini-batch of whole prompt groups (the advantages and reference log-probs are the whole batch's, the
        sampling policy's log-probs are taken for mini-batches 2..N before the first step, and the rule's gate
        observes once, after the last). The weights then reach the rollout engine. A pass whose loss is not finite
        stops the run (on_nonfinite = "stop") or undoes the whole step (weights, optimizer and rule state as
        before it; "skip"). Returns (the closure, or MiniBatchClosures over the N, and the rule's stats)."""
        ref_logp = None
        if self.ref_runner is not None:
            with phases("ref_logprob"):
                ref_logp = self.ref_runner.logp(batch, self.cfg.rollout.temperature)
        coef = None if self.entropy_control is None else self.entropy_control.applied()
        n = self.cfg.update.mini_batches
        parts = [(batch, adv, ref_logp)] if n == 1 else split_groups(batch, adv, ref_logp, group_sizes, n)
        closures = [LossClosure(self.runner, b, a.to(self.device), self.cfg, r, self.d, entropy_coef=coef)
                    for b, a, r in parts]
        if n > 1:
            with phases("old_logprob"):  # the sampling policy's, for the mini-batches that train after an update
                for c in closures[1:]:
                    c.compute_old_logp()
        closure = closures[0] if n == 1 else MiniBatchClosures(closures)
        before = None
        if self.cfg.on_nonfinite == "skip":  # not sharded_state_dict: DCP's get_state_dict would step a fresh optimizer
            before = copy.deepcopy({"model": self.model.state_dict(), "rule": self.rule.state_dict()})
        with phases("update"):
            try:
                if n == 1:
                    rule_stats = run_update(self.rule, closure)
                else:
                    with self.rule.gate_batch():
                        per_step = [self._mini_batch_update(k, c) for k, c in enumerate(closures)]
                    rule_stats = combine_rule_stats(per_step, self.rule.last_stats)
            except NonFiniteLoss as e:
                if before is None:
                    raise NonFiniteLoss(f"step {step + 1}: {e}, so the run stops before training on it (the weights "
                                        "may hold what the step's earlier passes moved). Resume from the last "
                                        "checkpoint (--resume true), or set on_nonfinite = 'skip'") from None
                rule_stats = self._undo_step(before, closures, step, e)
            if before is not None:
                rule_stats.setdefault("nonfinite_skipped", 0)
        if self.entropy_control is not None and not rule_stats.get("nonfinite_skipped"):
            total, tokens = self.d.sum(list(closure.entropy_sums))
            self.entropy_control.step(total / max(tokens, 1.0))
        self.scheduler.step()
        if hasattr(self.engine, "sync_weights"):
            with phases("weight_sync"):
                self.engine.sync_weights()
        self.backward_passes += rule_stats.pop("backward_passes_step")
        for i, t in enumerate(closure.pass_times):
            phases.times[f"pass_{i + 1}"] = t
        phases.times["update_rule"] = phases.times.pop("update") - sum(closure.pass_times)
        return closure, rule_stats

    def _mini_batch_update(self, k: int, closure) -> dict:
        try:
            return run_update(self.rule, closure)
        except NonFiniteLoss as e:
            raise NonFiniteLoss(f"mini-batch {k + 1} of {self.cfg.update.mini_batches}: {e}") from None

    def _undo_step(self, before: dict, closures: list, step: int, error) -> dict:
        self.model.load_state_dict(before["model"])
        self.rule.load_state_dict(before["rule"])
        for p in self.runner.parameters():
            p.grad = None
        self.log(f"step {step + 1}: {error}; step skipped (on_nonfinite = 'skip'), the weights as before it")
        return {"nonfinite_skipped": 1, "grad_norm": float("nan"),
                "backward_passes_step": sum(len(c.pass_times) for c in closures)}

    def record(self, step, got, batch, adv_stats, closure, rule_stats) -> dict:
        """The step's metrics (rewards, loss, rule, throughput), reduced over ranks."""
        d = self.d
        all_rewards = torch.tensor([r for part in d.gather(got.rewards.tolist()) for r in part])
        zero_var_groups, tokens, sampled_tokens = d.sum([
            adv_stats.pop("zero_variance_groups"), batch.attention_mask.sum(), got.batch.completion_mask.sum()])
        counts = got.stats | adv_stats
        plugin_stats = dict(zip(sorted(counts), d.sum([counts[k] for k in sorted(counts)]), strict=True))
        record = {"step": step + 1, "reward_mean": all_rewards.mean().item(),
                  "reward_std": all_rewards.std().item(), "accuracy": (all_rewards >= 1).float().mean().item(),
                  "response_len": sampled_tokens / closure.total_seqs, "rollouts": int(closure.total_seqs),
                  "loss_tokens": int(closure.total_tokens),
                  "zero_variance_groups": int(zero_var_groups), **plugin_stats, **closure.last_metrics,
                  **rule_stats,
                  "backward_passes": self.backward_passes, "lr": self.scheduler.get_last_lr()[0],
                  "world_size": d.world, **closure.stats}
        if self.entropy_control is not None:
            record["entropy_coef"] = closure.entropy_coef
        if batch.sampled_logp is not None:  # the engine's log-probs against the trainer's pass 1 (trained rows)
            mask = closure.trained_mask
            gap, n_tokens = d.sum([((batch.sampled_logp - closure.old_logp_BT).abs() * mask).sum(), mask.sum()])
            record["rollout/logp_abs_diff"] = gap / max(n_tokens, 1)
        update_time = sum(closure.pass_times)
        if isinstance(closure, MiniBatchClosures):  # the tokens the passes ran over: each mini-batch's times its passes
            local = sum(float(c.batch.attention_mask.sum()) * len(c.pass_times) for c in closure.parts)
            token_passes = d.sum([local])[0]
        else:
            token_passes = tokens * len(closure.pass_times)
        record["tokens_per_s"] = token_passes / update_time if update_time > 0 else float("nan")
        if self.peak is not None and update_time > 0:
            per_token = train_flops_per_token(self.model, int(tokens / closure.total_seqs))
            record["mfu"] = record["tokens_per_s"] * per_token / (self.peak * d.world)
        if self.device.type == "cuda":
            record["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
        return record

    def evaluate(self, step: int) -> dict:
        return evaluate_sets(self.eval_sets, self.engine, self.tokenizer, self.cfg, step, self.reward_fn, self.d)

    def checkpoint(self, step: int, t_start: float):
        train_state = {"wall_time_s": time.perf_counter() - t_start, "backward_passes": self.backward_passes}
        save_checkpoint(self.cfg.out, step + 1, self.model, self.rule, self.scheduler, train_state, self.d,
                        plugins=self.plugin_states)

    def step(self, step: int, t_start: float, stopping_requested: bool) -> tuple:
        """One training step: collect, advantages, mask, update, record, evaluate, checkpoint.
        Returns (record, stopping)."""
        cfg = self.cfg
        t_step = time.perf_counter()
        phases = Phases()
        keyed, got = self.collect(step, phases)
        adv, adv_stats = self.advantages(keyed, got, phases)
        batch = self.mask(got, adv, phases)
        closure, rule_stats = self.update(step, batch, adv, phases, got.group_sizes)
        record = self.record(step, got, batch, adv_stats, closure, rule_stats)
        if cfg.eval.every and ((step + 1) % cfg.eval.every == 0 or step + 1 == cfg.steps):
            with phases("eval"):
                record.update(self.evaluate(step))
        stopping = self.d.any(stopping_requested)  # SIGTERM may reach the ranks in different steps
        if step + 1 == cfg.steps or stopping or (cfg.save_every and (step + 1) % cfg.save_every == 0):
            with phases("checkpoint"):
                self.checkpoint(step, t_start)
        step_time = time.perf_counter() - t_step
        record.update({f"time/{k}": v for k, v in phases.times.items()})
        record["time/unaccounted"] = step_time - sum(phases.times.values())
        record["time/step"] = step_time
        record["wall_time_s"] = time.perf_counter() - t_start
        return record, stopping

    # -- the loop --------------------------------------------------------------------------------------
    def _open_metrics(self):
        if not self.d.main:
            return
        if self.start_step == 0:
            self.metrics_path.write_text("")
            return
        lines = [ln for ln in self.metrics_path.read_text().splitlines()  # drop lines past the checkpoint,
                 if ln and json.loads(ln)["step"] <= self.start_step]      # written by the interrupted run
        self.metrics_path.write_text("".join(ln + "\n" for ln in lines))

    def run(self) -> Path:
        cfg, d = self.cfg, self.d
        self._open_metrics()
        tb = _tensorboard_writer(self.out) if d.main else None
        stop = {"requested": False}
        previous_handler = signal.signal(signal.SIGTERM, lambda *_: stop.update(requested=True))
        t_start = time.perf_counter() - self.wall_offset
        bar = _progress_bar(cfg.steps, self.start_step) if d.main else None
        try:
            for step in range(self.start_step, cfg.steps):
                record, stopping = self.step(step, t_start, stop["requested"])
                if d.main:
                    _write_record(self.metrics_path, tb, record)
                self._report(step, record, bar)
                if stopping:
                    self.log(f"SIGTERM: stopped after step {step + 1} with a checkpoint; rerun with --resume to "
                             "continue")
                    return self.out
            export_final(self.model, self.tokenizer, self.out / "final", d)
        finally:
            signal.signal(signal.SIGTERM, previous_handler)
            if bar is not None:
                bar.stop()
            if tb is not None:
                tb.close()
            if self.own_group:
                torch.distributed.destroy_process_group()
        return self.out

    def _report(self, step, record, bar):
        summary = (f"reward {record['reward_mean']:.3f} acc {record['accuracy']:.2f} loss {record['loss']:+.4f} "
                   f"passes {self.backward_passes}")
        if bar is not None:
            bar.update(bar.task_ids[0], completed=step + 1, summary=summary)
            return
        done = step + 1 - self.start_step
        eta = (self.cfg.steps - step - 1) * (record["wall_time_s"] - self.wall_offset) / done
        self.log(f"step {step + 1}/{self.cfg.steps} {summary} {record['time/step']:.1f}s (ETA {eta:.0f}s)")


def train(cfg: TrainConfig, log=None) -> Path:
    """Train with cfg (resuming when cfg.resume); returns the output directory."""
    return Trainer(cfg, log).run()


def export_final(model, tokenizer, path: Path, d):
    """The trained policy in HF format (gathered from the shards under FSDP2), written by rank 0."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if d.main:
        model.save_pretrained(path, state_dict=full)
        tokenizer.save_pretrained(path)
    d.barrier()


def _write_record(metrics_path: Path, tb, record: dict):
    with open(metrics_path, "a") as f:
        f.write(json.dumps({k: _jsonable(v) for k, v in record.items()}) + "\n")
    if tb is not None:
        for key, value in record.items():
            if isinstance(value, (int, float)) and key != "step":
                tb.add_scalar(key, value, record["step"])


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

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
from .blocks import checkpoint_blocks, compile_blocks
from .checkpoint import load_latest_checkpoint, save_checkpoint
from .collect import collect, prompt_text
from .config import TrainConfig, to_toml
from .distributed import init_distributed, init_single_rank_group, shard_policy
from .engines import make_engine
from .evaluate import evaluate
from .flops import peak_flops, train_flops_per_token
from .hf_tasks import hf_problems
from .models import apply_liger_patches, apply_lora, load_policy
from .plugins.capo import capo_token_mask
from .plugins.grpo_lambda import grpo_lambda_advantages
from .plugins.xrpo_seeding import SolutionCorpus
from .plugins.xrpo_sharpening import sharpen
from .policy import PolicyRunner
from .sampling import row_seed
from .step import LossClosure, make_update_rule, run_update
from .tasks import arithmetic_problems, jsonl_problems, make_reward

EVAL_KEY = 2**31  # keys evaluation samples apart from training samples


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


def task_problems(task, log, spec=None, split=None):
    """The dataset of a jsonl or hf task (None for arithmetic, which is generated per step)."""
    if task.name == "jsonl":
        return jsonl_problems(spec or task.path, task.on_bad_record, log)
    if task.name == "hf":
        return hf_problems(spec or task.dataset, split or task.split, task.question_field, task.answer_field,
                           task.answer_from, task.filter, task.on_bad_record, log)
    return None


def held_out_problems(cfg: TrainConfig, log):
    """Evaluation problems: arithmetic from seeds no training step uses, or the held-out file / dataset."""
    if cfg.task.name != "arithmetic":
        return task_problems(cfg.task, log, cfg.eval.path or None, cfg.eval.split)[:cfg.eval.num_problems]
    stream = arithmetic_problems(2**40 + cfg.seed, cfg.task.difficulty)  # training seeds stay far below
    return [next(stream) for _ in range(cfg.eval.num_problems)]


def held_out_sets(cfg: TrainConfig, log) -> dict:
    """{name: problems}: each of eval.benchmarks, or the task's held-out problems under the name ""."""
    if not cfg.eval.benchmarks:
        return {"": held_out_problems(cfg, log)}
    sets = {}
    for b in cfg.eval.benchmarks:
        problems = hf_problems(b["path"], b["split"], b["question_field"], b["answer_field"], b["answer_from"],
                               b["filter"], cfg.task.on_bad_record, log)
        sets[b["name"]] = problems[:b["num_problems"]] if b["num_problems"] else problems
    return sets


def evaluate_sets(sets: dict, engine, tokenizer, cfg: TrainConfig, step: int, reward_fn, d) -> dict:
    """pass@1 and pass@k of each held-out set (eval/<name>/...), and their means as eval/pass@1, eval/pass@k."""
    out = {}
    for index, (name, problems) in enumerate(sets.items()):
        prompts = [prompt_text(tokenizer, p.question, cfg.task.system_prompt) for p in problems]
        keys = [row_seed(cfg.seed, EVAL_KEY + index, step, i) for i in range(len(problems))]
        scores = evaluate(engine, prompts, [p.answer for p in problems], keys, reward_fn, cfg.eval.n_samples,
                          cfg.eval.k, d, cfg.eval.temperature)
        out.update({k.replace("eval/", f"eval/{name}/") if name else k: v for k, v in scores.items()})
    if "" not in sets:  # benchmarks: their mean
        for metric in ("pass@1", f"pass@{cfg.eval.k}"):
            out[f"eval/{metric}"] = sum(out[f"eval/{name}/{metric}"] for name in sets) / len(sets)
    return out


def advantages(cfg, runner, got, d):
    """The advantage slot: group-normalized GRPO, then XRPO sharpening and GRPO-lambda when on."""
    adv, stats = group_normalized_ragged(got.rewards, got.group_sizes)
    if cfg.xrpo.sharpening:
        temperature = 1.0 if cfg.xrpo.sharpen_temperature == "policy" else cfg.rollout.temperature
        logp_BT = runner.logp(got.batch, temperature)  # one no-grad forward: s(y) under pi_theta (paper)
        mask = got.batch.completion_mask
        mean_logp = (torch.where(mask, logp_BT, 0.0).sum(1) / mask.sum(1).clamp(min=1)).cpu()
        adv, grown = sharpen(adv, mean_logp, got.group_sizes, cfg.xrpo.sharpen_l, cfg.xrpo.sharpen_k)
        stats["xrpo/sharpened_rows"] = grown
    if cfg.grpo_lambda.enabled:
        g = cfg.grpo_lambda
        adv = grpo_lambda_advantages(adv.to(got.batch.completion_mask.device), got.batch.completion_mask, g.lam,
                                     g.gamma, g.trace, g.neg_clamp)
    return adv, stats


def corpus_add(corpus, keyed, got, d):
    """Correct completions join XRPO's exemplar corpus (gathered over ranks, so every rank has the same)."""
    owners = [i for i, n in enumerate(got.group_sizes) for _ in range(n)]
    solved = [(keyed[i][0].question, text) for i, text, r in zip(owners, got.batch.texts, got.rewards.tolist(),
                                                                  strict=True) if r >= 1]
    for part in d.gather(solved):
        for question, text in part:
            corpus.add(question, text)


def _dtypes(cfg: TrainConfig, device: torch.device):
    """(parameter storage dtype, compute dtype). Parameters and optimizer state are fp32 masters unless
    bf16_params opts in; compute is bf16 on GPU and fp32 on CPU unless dtype names one."""
    compute = {"float32": torch.float32, "bfloat16": torch.bfloat16}.get(cfg.dtype)
    compute = compute or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    return (torch.bfloat16 if cfg.bf16_params else torch.float32), compute


def train(cfg: TrainConfig, log=None) -> Path:
    log = log or (lambda message: print(message, flush=True))
    d = init_distributed()
    if cfg.rollout.num_prompts % d.world:
        raise ValueError(f"rollout.num_prompts ({cfg.rollout.num_prompts}) must be a multiple of the number "
                         f"of ranks ({d.world})")
    if cfg.eval.every and cfg.eval.num_problems < d.world:
        raise ValueError(f"eval.num_problems ({cfg.eval.num_problems}) must be at least the number of ranks "
                         f"({d.world})")
    if not d.main:
        log = lambda *_: None  # noqa: E731
    out = Path(cfg.out)
    if d.main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.toml").write_text(to_toml(cfg))
    device = d.device
    param_dtype, compute_dtype = _dtypes(cfg, device)
    # Mixed precision is FSDP2's policy on every world size (a one-rank mesh on one device): bf16 copies for
    # compute, fp32 masters for the optimizer, and the same numerics on 1 GPU as on 8.
    shard = d.world > 1 or compute_dtype != param_dtype
    own_group = shard and d.world == 1 and init_single_rank_group(device)
    eval_sets = held_out_sets(cfg, log) if cfg.eval.every else None  # bad eval data fails before the model loads
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    model, tokenizer = load_policy(cfg.model, param_dtype, cfg.seed, cfg.attn_implementation)
    model.to(device)
    if cfg.liger_patches:
        apply_liger_patches(model)
    ref_runner = PolicyRunner(copy.deepcopy(model).eval().requires_grad_(False)) if cfg.loss.beta > 0 else None
    model = apply_lora(model, cfg.lora)
    checkpoint_blocks(model, cfg.activation_checkpointing)
    if cfg.compile:
        compile_blocks(model)
    runner = PolicyRunner(model)
    if shard:
        mixed = compute_dtype if compute_dtype != param_dtype else None
        shard_policy(runner, mixed)
        if ref_runner is not None:
            shard_policy(ref_runner, mixed)
    params = [p for p in runner.parameters() if p.requires_grad]
    rule = make_update_rule(cfg, params)
    warmup = cfg.optim.warmup_steps
    scheduler = torch.optim.lr_scheduler.LambdaLR(rule, lambda s: min(1.0, (s + 1) / (warmup + 1)))
    corpus = SolutionCorpus() if cfg.xrpo.seeding else None
    peak = peak_flops(device)
    engine = make_engine(cfg.rollout.engine, runner, tokenizer, cfg.rollout, d, out / "vllm_config", cfg.seed)
    reward_fn = make_reward(cfg.task.reward, cfg.task.format_reward)
    dataset = task_problems(cfg.task, log)

    start_step, wall_offset, backward_passes = 0, 0.0, 0
    template = {"corpus": ""} if corpus is not None else {}
    if cfg.resume and (state := load_latest_checkpoint(cfg.out, model, rule, scheduler, d, log, template)):
        start_step, wall_offset, backward_passes = state["step"], state["wall_time_s"], state["backward_passes"]
        if corpus is not None and state["corpus"]:
            corpus.load_state_dict(json.loads(state["corpus"]))
        log(f"resumed from step {start_step}")
    metrics_path = out / "metrics.jsonl"
    if d.main and start_step == 0:
        metrics_path.write_text("")
    elif d.main:  # drop lines past the checkpoint, written by the interrupted run
        lines = [ln for ln in metrics_path.read_text().splitlines() if ln and json.loads(ln)["step"] <= start_step]
        metrics_path.write_text("".join(ln + "\n" for ln in lines))

    tb = _tensorboard_writer(out) if d.main else None
    stop = {"requested": False}
    previous_handler = signal.signal(signal.SIGTERM, lambda *_: stop.update(requested=True))
    t_start = time.perf_counter() - wall_offset
    bar = _progress_bar(cfg.steps, start_step) if d.main else None
    try:
        for step in range(start_step, cfg.steps):
            t_step = time.perf_counter()
            phases = Phases()
            problems = problems_for_step(cfg, step, dataset)
            keyed = d.shard([(p, row_seed(cfg.seed, step, i)) for i, p in enumerate(problems)])
            got = collect(engine, tokenizer, cfg, keyed, step, reward_fn, phases, corpus)
            batch, rewards = got.batch, got.rewards
            with phases("advantages"):
                adv, adv_stats = advantages(cfg, runner, got, d)
            if corpus is not None:
                corpus_add(corpus, keyed, got, d)
            if cfg.capo.enabled:
                with phases("token_mask"):
                    batch, capo_stats = capo_token_mask(runner, batch, adv, rule, cfg, d.world)
                got.stats.update(capo_stats)
            ref_logp = None
            if ref_runner is not None:
                with phases("ref_logprob"):
                    ref_logp = ref_runner.logp(batch, cfg.rollout.temperature)
            closure = LossClosure(runner, batch, adv.to(device), cfg, ref_logp, d)
            with phases("update"):
                rule_stats = run_update(rule, closure, cfg, params)
            scheduler.step()
            if hasattr(engine, "sync_weights"):
                with phases("weight_sync"):
                    engine.sync_weights()
            backward_passes += rule_stats.pop("backward_passes_step")
            for i, t in enumerate(closure.pass_times):
                phases.times[f"pass_{i + 1}"] = t
            phases.times["update_rule"] = phases.times.pop("update") - sum(closure.pass_times)
            all_rewards = torch.tensor([r for part in d.gather(rewards.tolist()) for r in part])
            zero_var_groups, tokens, sampled_tokens = d.sum([
                adv_stats.pop("zero_variance_groups"), batch.attention_mask.sum(), got.batch.completion_mask.sum()])
            plugin_stats = dict(zip(sorted(got.stats | adv_stats),  # counts, summed over ranks
                                    d.sum([(got.stats | adv_stats)[k] for k in sorted(got.stats | adv_stats)]),
                                    strict=True))
            record = {"step": step + 1, "reward_mean": all_rewards.mean().item(),
                      "reward_std": all_rewards.std().item(), "accuracy": (all_rewards >= 1).float().mean().item(),
                      "response_len": sampled_tokens / closure.total_seqs, "rollouts": int(closure.total_seqs),
                      "loss_tokens": int(closure.total_tokens),
                      "zero_variance_groups": int(zero_var_groups), **plugin_stats, **closure.last_metrics,
                      **rule_stats,
                      "backward_passes": backward_passes, "lr": scheduler.get_last_lr()[0], "world_size": d.world,
                      **closure.stats}
            if batch.sampled_logp is not None:  # the engine's log-probs against the trainer's pass 1 (trained rows)
                mask = closure.trained_mask
                gap, n_tokens = d.sum([((batch.sampled_logp - closure.old_logp_BT).abs() * mask).sum(), mask.sum()])
                record["rollout/logp_abs_diff"] = gap / max(n_tokens, 1)
            update_time = sum(closure.pass_times)
            record["tokens_per_s"] = tokens * len(closure.pass_times) / update_time if update_time > 0 else float("nan")
            if peak is not None and update_time > 0:
                per_token = train_flops_per_token(model, int(tokens / closure.total_seqs))
                record["mfu"] = record["tokens_per_s"] * per_token / (peak * d.world)
            if device.type == "cuda":
                record["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
            if cfg.eval.every and ((step + 1) % cfg.eval.every == 0 or step + 1 == cfg.steps):
                with phases("eval"):
                    record.update(evaluate_sets(eval_sets, engine, tokenizer, cfg, step, reward_fn, d))
            stopping = d.any(stop["requested"])  # SIGTERM may reach the ranks in different steps
            save = step + 1 == cfg.steps or stopping or (cfg.save_every and (step + 1) % cfg.save_every == 0)
            if save:
                with phases("checkpoint"):
                    save_checkpoint(cfg.out, step + 1, model, rule, scheduler,
                                    {"wall_time_s": time.perf_counter() - t_start, "backward_passes": backward_passes,
                                     **({"corpus": json.dumps(corpus.state_dict())} if corpus is not None else {})},
                                    d)
            step_time = time.perf_counter() - t_step
            record.update({f"time/{k}": v for k, v in phases.times.items()})
            record["time/unaccounted"] = step_time - sum(phases.times.values())
            record["time/step"] = step_time
            record["wall_time_s"] = time.perf_counter() - t_start
            if d.main:
                _write_record(metrics_path, tb, record)
            eta = (cfg.steps - step - 1) * (record["wall_time_s"] - wall_offset) / (step + 1 - start_step)
            summary = (f"reward {record['reward_mean']:.3f} acc {record['accuracy']:.2f} loss {record['loss']:+.4f} "
                       f"passes {backward_passes}")
            if bar is not None:
                bar.update(bar.task_ids[0], completed=step + 1, summary=summary)
            else:
                log(f"step {step + 1}/{cfg.steps} {summary} {step_time:.1f}s (ETA {eta:.0f}s)")
            if stopping:
                log(f"SIGTERM: stopped after step {step + 1} with a checkpoint; rerun with --resume to continue")
                return out
        export_final(model, tokenizer, out / "final", d)
    finally:
        signal.signal(signal.SIGTERM, previous_handler)
        if bar is not None:
            bar.stop()
        if tb is not None:
            tb.close()
        if own_group:
            torch.distributed.destroy_process_group()
    return out


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

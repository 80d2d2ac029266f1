"""`gxpo-bench step`: whole training updates on a fixed synthetic batch (no rollout variance), per
update rule, through the trainer's own closure and rules. Per-phase wall-clock (each forward+backward
pass, base-optimizer steps, the rule's bookkeeping, reference log-probs, the micro-batch plan; old
log-probs are reused from pass 1 and cost nothing), tokens/s over real tokens, MFU and peak memory on
GPU, and the ratios that matter for GXPO."""

import dataclasses
import statistics
import time

import torch

from gxpo_kernels.optim import RULES
from trainer.closure import LossClosure, run_update
from trainer.config import load_config
from trainer.flops import peak_flops, train_flops_per_token
from trainer.policy_stack import build_policy_stack
from trainer.rollout import RolloutBatch

from .timing import sync

PHASES = ("ref_logprob", "plan", "optimizer", "bookkeeping")


def completion_lengths(B: int, completion_len: int, distribution: str, g) -> torch.Tensor:
    """uniform in [T/4, T]; or longtail: log-normal around T/8 (sigma 1), clipped to [1, T], as GRPO
    responses are (most short, a few at the cap)."""
    if distribution == "uniform":
        return torch.randint(max(1, completion_len // 4), completion_len + 1, (B,), generator=g)
    if distribution == "longtail":
        z = torch.randn(B, generator=g, dtype=torch.float64)
        return torch.exp(torch.log(torch.tensor(completion_len / 8)) + z).ceil().clamp(1, completion_len).long()
    raise ValueError(f"--lengths must be 'uniform' or 'longtail', got {distribution!r}")


def synthetic_batch(vocab: int, B: int, prompt_len: int, completion_len: int, device, seed=0,
                    distribution: str = "uniform") -> RolloutBatch:
    """Random tokens (ids >= 3: no pad/eos), prompts of equal length, completion lengths drawn from
    `distribution`."""
    g = torch.Generator().manual_seed(seed)
    prompt = torch.randint(3, vocab, (B, prompt_len), generator=g)
    completion = torch.randint(3, vocab, (B, completion_len), generator=g)
    lengths = completion_lengths(B, completion_len, distribution, g)
    mask = torch.arange(completion_len)[None] < lengths[:, None]
    input_ids = torch.cat([prompt, completion], 1)
    attention = torch.cat([torch.ones_like(prompt, dtype=torch.bool), mask], 1)
    return RolloutBatch(input_ids.to(device), attention.to(device), prompt_len, completion.to(device), mask.to(device),
                        [""] * B)


class _TimedStep:
    """Wraps a base optimizer's step() to add its (synchronized) time to a counter."""

    def __init__(self, optimizer, device):
        self.inner, self.device, self.seconds = optimizer.step, device, 0.0
        optimizer.step = self

    def __call__(self, *args, **kwargs):
        sync(self.device)
        t0 = time.perf_counter()
        out = self.inner(*args, **kwargs)
        sync(self.device)
        self.seconds += time.perf_counter() - t0
        return out


class AlgoBench:
    """One update rule on its own copy of the model (same seed for all), stepped on the fixed batch."""

    def __init__(self, name: str, model_name: str, batch_shape: tuple, beta: float, device, overrides=(),
                 distribution="uniform", zero_adv_frac: float = 0.0):
        self.algo, self.device = name, device
        gates_off = [(f"{rule}.gate", "never") for rule, config in RULES.items()  # every pass of a step is timed
                     if "gate" in {f.name for f in dataclasses.fields(config)}]
        self.cfg = load_config(overrides=[("model", model_name), ("algo", name.split("+")[0]), *gates_off,
                                          ("loss.beta", str(beta)),
                                          ("rollout.max_new_tokens", str(batch_shape[2])), *overrides])
        stack = build_policy_stack(self.cfg, device)  # as the trainer builds it: bf16 compute on GPU, fp32 masters
        model, tokenizer, self.runner, self.ref_runner, self.rule = (stack.model, stack.tokenizer, stack.runner,
                                                                     stack.ref_runner, stack.rule)
        self.params = [p for p in self.runner.parameters() if p.requires_grad]
        self.opt_timer = _TimedStep(self.rule.base, device)
        self.batch = synthetic_batch(len(tokenizer), *batch_shape, device, distribution=distribution)
        self.adv = torch.randn(batch_shape[0], generator=torch.Generator().manual_seed(1))
        self.adv[:round(zero_adv_frac * batch_shape[0])] = 0.0  # zero-variance groups' completions
        self.adv = self.adv.to(device)
        self.per_token = train_flops_per_token(model, int(self.batch.attention_mask.sum(1).float().mean()))
        self.peak = peak_flops(device)
        self.rows = []

    def step(self, record: bool):
        device, rule = self.device, self.rule
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        self.opt_timer.seconds = 0.0
        passes_before = rule.backward_passes
        sync(device)
        t_step = time.perf_counter()
        times = {}
        ref_logp = None
        if self.ref_runner is not None:
            ref_logp = self.ref_runner.logp(self.batch, self.cfg.rollout.temperature)
            sync(device)
            times["ref_logprob"] = time.perf_counter() - t_step
        t_plan = time.perf_counter()
        closure = LossClosure(self.runner, self.batch, self.adv, self.cfg, ref_logp)
        times["plan"] = time.perf_counter() - t_plan  # the micro-batch (packing) plan, made once per step
        t_update = time.perf_counter()
        run_update(rule, closure)
        sync(device)
        update = time.perf_counter() - t_update
        step_time = time.perf_counter() - t_step
        for j, t in enumerate(closure.pass_times):
            times[f"pass_{j + 1}"] = t
        times["optimizer"] = self.opt_timer.seconds
        times["bookkeeping"] = update - sum(closure.pass_times) - self.opt_timer.seconds
        times["unaccounted"] = step_time - sum(times.values())
        real_tokens = float(self.batch.attention_mask.sum())
        row = {"step_s": step_time, "times": times, "passes": len(closure.pass_times),
               "rule_passes": rule.backward_passes - passes_before,
               "tokens_per_s": real_tokens * len(closure.pass_times) / update}
        row.update(closure.stats)
        if self.peak is not None:
            row["mfu"] = row["tokens_per_s"] * self.per_token / self.peak
        if device.type == "cuda":
            row["peak_mem_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        if record:
            self.rows.append(row)


def plan(algos: list, cuda: bool, fast: bool, model=None, batch=0, prompt_len=0, completion_len=0, steps=0,
         beta=0.0, pack="on", ckpt="off", max_tokens=0, micro_batch=0, zero_adv_frac=0.0, lengths="uniform") -> dict:
    """The step suite's spec: the variants (name, config overrides; the algorithm is the name up to "+"), the
    model, batch shape, timed and warm-up steps (gxpo-bench step's options; unset ones at their defaults)."""
    model = model or ("tiny-random" if fast else "smollm2-135m")
    B, P, T = (8, 16, 32) if fast else (64, 256, 1024) if cuda else (16, 32, 64)
    B, P, T = batch or B, prompt_len or P, completion_len or T
    steps, warmup = steps or (3 if fast else 10 if cuda else 4), 1 if fast or not cuda else 2
    common = [("activation_checkpointing", ckpt), ("loss.max_tokens_per_micro_batch", str(max_tokens))]
    variants = []
    for a in algos:
        if pack in ("on", "both"):
            variants.append((a, [*common, ("loss.pack", "true")]))
        if pack in ("off", "both"):
            variants.append((a if pack == "off" else f"{a}+nopack",
                             [*common, ("loss.pack", "false"), ("loss.micro_batch_size", str(micro_batch))]))
    if zero_adv_frac:  # each rule also without skipping, side by side: the time skipping saves
        variants += [(f"{name}+noskip", [*overrides, ("loss.skip_zero_advantage", "false")])
                     for name, overrides in list(variants) if "+" not in name]
    return {"fast": fast, "variants": variants, "model": model, "batch_shape": [B, P, T], "steps": steps,
            "warmup": warmup, "beta": beta, "lengths": lengths, "zero_adv_frac": zero_adv_frac, "pack": pack,
            "ckpt": ckpt, "max_tokens": max_tokens}


def summarize(algo: str, rows: list) -> dict:
    """Medians over the timed steps; phases in a fixed order; every step's raw numbers kept."""
    med = lambda xs: statistics.median(xs)  # noqa: E731
    keys = [k for k in rows[0]["times"] if k.startswith("pass_")] + [k for k in PHASES if k in rows[0]["times"]]
    out = {"algo": algo, "step_ms": 1e3 * med([r["step_s"] for r in rows]),
           "phases_ms": {k: 1e3 * med([r["times"][k] for r in rows]) for k in keys + ["unaccounted"]},
           "passes_per_step": rows[0]["passes"], "rule_passes_per_step": rows[0]["rule_passes"],
           "tokens_per_s": med([r["tokens_per_s"] for r in rows]), "steps": rows}
    for key in ("mfu", "peak_mem_gib", "pack/padding_frac_padded", "pack/padding_frac_packed",
                "pack/skipped_token_frac"):
        if key in rows[0]:
            out[key] = med([r[key] for r in rows])
    return out


def ratios(results: dict) -> dict:
    """The ratios of the issue, from the medians of one run."""
    out = {}

    def pass_mean(r):
        passes = [v for k, v in r["phases_ms"].items() if k.startswith("pass_")]
        return sum(passes) / len(passes)

    if "gxpo" in results and "grpo" in results:
        gx, gr = results["gxpo"], results["grpo"]
        out["gxpo_step / grpo_step"] = gx["step_ms"] / gr["step_ms"]
        out["gxpo_step / (3 x grpo fwd+bwd)"] = gx["step_ms"] / (3 * gr["phases_ms"]["pass_1"])
    if "gxpo" in results:
        gx = results["gxpo"]
        out["gxpo bookkeeping / one fwd+bwd"] = gx["phases_ms"]["bookkeeping"] / pass_mean(gx)
    if "sfpo" in results and "gxpo" in results:
        out["sfpo_step / gxpo_step"] = results["sfpo"]["step_ms"] / results["gxpo"]["step_ms"]
    for name, r in results.items():
        padded = results.get(f"{name}+nopack")
        if "+" not in name and padded is not None:
            out[f"{name}: tokens/s packed / padded"] = r["tokens_per_s"] / padded["tokens_per_s"]
            if "peak_mem_gib" in r:
                out[f"{name}: peak memory packed / padded"] = r["peak_mem_gib"] / padded["peak_mem_gib"]
        unskipped = results.get(f"{name}+noskip")
        if "+" not in name and unskipped is not None:
            out[f"{name}: step without / with zero-advantage skipping"] = unskipped["step_ms"] / r["step_ms"]
    return out

"""gxpo-bench study: does GXPO pay for its passes? GRPO, GXPO (each preset) and SFPO trained from the same
start on the same data for several seeds, held-out accuracy evaluated every few steps, and per rule the
steps, backward passes and training seconds to reach GRPO's peak held-out accuracy, the accuracy at equal
backward passes, and a figure of held-out accuracy against backward passes and seconds with a band over
seeds.

The target is the peak of GRPO's seed-mean held-out curve; a run reaches it at its first evaluation at
or above it (runs that never do are counted as such). Training seconds leave out evaluation and
checkpoint time. Runs live under --runs (each resumable: an interrupted study continues where it
stopped); the report is rebuilt from their metrics.jsonl."""

import json
import statistics
from pathlib import Path

from trainer.config import load_config
from trainer.train import train

CPU_DEFAULT = Path(__file__).resolve().parent.parent / "trainer" / "configs" / "cpu_default.toml"
METRIC = "eval/pass@1"

RULES = {
    "grpo": [("algo", "grpo")],
    "gxpo-authors-1p5b": [("algo", "gxpo"), ("gxpo.preset", "authors-1p5b")],  # the default
    "gxpo-final": [("algo", "gxpo"), ("gxpo.preset", "final")],
    "gxpo-paper": [("algo", "gxpo"), ("gxpo.preset", "paper")],
    "sfpo-official": [("algo", "sfpo"), ("sfpo.preset", "official")],
}
BASELINE = "grpo"

# The full study: the embedded model on the demo's task, sized for about 90 minutes on 2 CPU cores.
FULL = {"steps": 20, "eval.every": 4, "eval.num_problems": 32, "eval.n_samples": 2, "eval.k": 2, "save_every": 10}
# --fast: the tiny random model, seconds per run (CI).
FAST = {"model": "tiny-random", "steps": 2, "eval.every": 1, "eval.num_problems": 2, "eval.n_samples": 2,
        "eval.k": 2, "rollout.num_prompts": 2, "rollout.group_size": 2, "rollout.max_new_tokens": 8,
        "save_every": 0}


def run_dir(runs: Path, rule: str, seed: int) -> Path:
    return runs / rule / f"seed{seed}"


def _rows(path: Path) -> list:
    f = path / "metrics.jsonl"
    return [json.loads(ln) for ln in f.read_text().splitlines() if ln.strip()] if f.exists() else []


def run_all(rules, seeds, runs: Path, fast: bool, extra=(), log=print):
    """Train every (rule, seed) not yet complete; an interrupted run resumes from its last checkpoint."""
    sizes = FAST if fast else FULL
    for seed in seeds:  # seed-major: a study cut short still has every rule on its first seeds
        for rule in rules:
            out = run_dir(runs, rule, seed)
            overrides = [(k, str(v)) for k, v in sizes.items()] + RULES[rule] + [
                ("seed", str(seed)), ("out", str(out)), ("resume", "true"), *extra]
            cfg = load_config(CPU_DEFAULT, overrides)
            if len(_rows(out)) >= cfg.steps and (out / "final").exists():
                log(f"study: {rule} seed {seed} done, kept")
                continue
            log(f"study: {rule} seed {seed}: {cfg.steps} steps -> {out}")
            train(cfg, log=lambda *_: None)


def _curve(rows):
    """Evaluation points of one run: step, backward passes, training seconds (no eval/checkpoint), accuracy."""
    points, seconds = [], 0.0
    for r in rows:
        seconds += r["time/step"] - r.get("time/eval", 0.0) - r.get("time/checkpoint", 0.0)
        if r.get(METRIC) is not None:
            points.append({"step": r["step"], "backward_passes": r["backward_passes"], "train_s": seconds,
                           "acc": r[METRIC]})
    return points


def _mean_std(xs):
    xs = [x for x in xs if x is not None]
    if not xs:
        return None, None
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def analyse(curves: dict) -> dict:
    """curves: {rule: {seed: [points]}}, the baseline among them. Time to target and accuracy at equal passes."""
    if BASELINE not in curves:
        raise ValueError(f"the study needs the baseline rule {BASELINE!r} to set the target")
    base = list(curves[BASELINE].values())
    n_eval = min(len(c) for c in base)
    if n_eval == 0:
        raise ValueError("the baseline runs have no evaluation points (eval.every must be > 0)")
    base_mean = [statistics.fmean(c[i]["acc"] for c in base) for i in range(n_eval)]
    target = max(base_mean)
    final_passes = statistics.fmean(c[-1]["backward_passes"] for c in base)
    budgets = sorted({max(1, round(final_passes * f)) for f in (0.25, 0.5, 1.0)})
    out = {"metric": METRIC, "target": target, "target_step": base[0][base_mean.index(target)]["step"],
           "budgets": budgets, "rules": {}}
    for rule, by_seed in curves.items():
        hits = {seed: next((p for p in pts if p["acc"] >= target - 1e-12), None) for seed, pts in by_seed.items()}
        reached = [h for h in hits.values() if h is not None]
        entry = {"seeds": sorted(by_seed), "reached": len(reached), "runs": len(hits),
                 "final_acc": _mean_std([pts[-1]["acc"] for pts in by_seed.values() if pts]),
                 "peak_acc": _mean_std([max(p["acc"] for p in pts) for pts in by_seed.values() if pts])}
        for key in ("step", "backward_passes", "train_s"):
            entry[f"to_target_{key}"] = _mean_std([h[key] for h in reached])
        entry["acc_at_passes"] = {
            str(b): _mean_std([max((p for p in pts if p["backward_passes"] <= b), key=lambda p: p["backward_passes"],
                                   default={"acc": None})["acc"] for pts in by_seed.values()])
            for b in budgets}
        out["rules"][rule] = entry
    return out


def _fmt(ms, spec=".1f"):
    mean, std = ms
    return "-" if mean is None else f"{mean:{spec}} ± {std:{spec}}"


def to_markdown(result: dict) -> str:
    a = result["analysis"]
    lines = [f"# gxpo-bench study{' (--fast)' if result['fast'] else ''}", "",
             f"Device: {result['device']}; torch {result['torch']}; {result['date']}", "",
             f"Command: `{result['command']}`", "",
             f"Setup: {result['setup']}", "",
             f"Target: the peak of {BASELINE}'s seed-mean held-out {a['metric']} = {a['target']:.3f} (step "
             f"{a['target_step']}). Mean ± standard deviation over the seeds that reach it; training seconds leave "
             "out evaluation and checkpoints.", "",
             "| rule | reached | steps to target | backward passes to target | training s to target | "
             "peak held-out | final held-out |", "|---|---|---|---|---|---|---|"]
    for rule, e in a["rules"].items():
        lines.append(f"| {rule} | {e['reached']}/{e['runs']} | {_fmt(e['to_target_step'])} | "
                     f"{_fmt(e['to_target_backward_passes'])} | {_fmt(e['to_target_train_s'])} | "
                     f"{_fmt(e['peak_acc'], '.3f')} | {_fmt(e['final_acc'], '.3f')} |")
    lines += ["", f"Held-out {a['metric']} at equal backward passes (the last evaluation within the budget):", "",
              "| rule | " + " | ".join(f"<= {b} passes" for b in a["budgets"]) + " |",
              "|---|" + "---|" * len(a["budgets"])]
    for rule, e in a["rules"].items():
        lines.append(f"| {rule} | " + " | ".join(_fmt(e["acc_at_passes"][str(b)], ".3f") for b in a["budgets"]) + " |")
    return "\n".join(lines) + "\n"


def plot(curves: dict, path: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    for ax, (x, label) in zip(axes, (("backward_passes", "backward passes"), ("train_s", "training seconds")),
                              strict=True):
        for rule, by_seed in curves.items():
            runs = [pts for pts in by_seed.values() if pts]
            n = min(len(pts) for pts in runs)
            xs = np.array([[pts[i][x] for i in range(n)] for pts in runs]).mean(0)
            acc = np.array([[pts[i]["acc"] for i in range(n)] for pts in runs])
            mean, std = acc.mean(0), acc.std(0)
            (line,) = ax.plot(xs, mean, marker="o", ms=3, label=f"{rule} ({len(runs)} seeds)")
            ax.fill_between(xs, mean - std, mean + std, color=line.get_color(), alpha=0.15)
        ax.set_xlabel(label)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(f"held-out {METRIC} (mean ± std over seeds)")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def load_curves(rules, seeds, runs: Path) -> dict:
    curves = {}
    for rule in rules:
        by_seed = {s: _curve(_rows(run_dir(runs, rule, s))) for s in seeds}
        by_seed = {s: pts for s, pts in by_seed.items() if pts}
        if by_seed:
            curves[rule] = by_seed
    return curves

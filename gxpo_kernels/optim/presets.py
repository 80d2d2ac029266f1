"""Named hyperparameter sets for GXPO and SFPO, each as its authors ran it. The one home of these values:
the update rules and the trainer's config take a preset and override single fields.

GXPO (github SwapniL-afk-now/final-gxpo):
- paper: the paper-era code (commit 1aeea653, "paper reproduction"; Algorithm 1's defaults): K = 5,
  alpha = 0.5, EMA gate on the corrective gradient's pre-clip norm ||g~|| from mu = sigma = 1, w = 0.1,
  two-sided |Z| >= 0.5, no warm-up.
- final: the authors' final runs (train-scripts/final run scripts/run_gxpo.sh: K = 3, alpha = 0.5,
  gxpo_tau = 2.0) under their final trainer, whose gate is SFPO's: the corrective pass's batch entropy
  against the last 30 values including it, one-sided Z >= 2.0, once the window is full
  (verl/trainer/ppo/ray_trainer.py, gxpo_trigger_signal = "entropy"; gxpo_warmup_steps = 0).
The default is `final`: the authors' last word, and its gate is scale-free, where the paper-era EMA
starting from mu = sigma = 1 trips within a step or two whenever ||g~|| is far from 1.

SFPO (github Urheen/SFPO, train-scripts/*_sfpo.sh and ray_trainer.py):
- official: K = 3 fast steps, alpha = 0.8, the corrective pass's batch entropy against the last 30
  values including it, one-sided z >= 1.0, once the window is full.
"""

GXPO_PRESETS = {
    "paper": {"K": 5, "alpha": 0.5, "tau": 0.5, "gate": "ema", "gate_stat": "trajectory", "omega": 0.1,
              "window": 30, "warmup": 0},
    "final": {"K": 3, "alpha": 0.5, "tau": 2.0, "gate": "window_inclusive", "gate_stat": "entropy", "omega": 0.1,
              "window": 30, "warmup": 0},
}
SFPO_PRESETS = {
    "official": {"K": 3, "alpha": 0.8, "tau": 1.0, "gate": "window_inclusive", "omega": 0.1, "window": 30,
                 "warmup": 0},
}
DEFAULT_GXPO_PRESET = "final"
DEFAULT_SFPO_PRESET = "official"
# trajectory: pre-clip ||g~|| of the corrective pass; g0: pre-clip ||g0||; entropy: the corrective pass's
# batch token entropy (the closure returns (loss, {"entropy_mean": H}))
GATE_STATS = ("trajectory", "g0", "entropy")
MIN_K = {"GXPO": 2, "SFPO": 1}


def resolve(presets: dict, preset: str, what: str, **given) -> dict:
    """The preset's values with every field given (not None) in its place."""
    if preset not in presets:
        raise ValueError(f"unknown {what} preset {preset!r}; choose one of {tuple(presets)}")
    unknown = set(given) - set(presets[preset])
    assert not unknown, f"fields without a preset value: {unknown}"
    return {k: (v if given.get(k) is None else given[k]) for k, v in presets[preset].items()}


def hyperparameter_checks(rule: str, h: dict) -> list:
    """(field, holds, what it must be) for GXPO's or SFPO's hyperparameters h (gate_stat for GXPO only):
    the one home of their ranges, read by the rules' constructors and by the trainer's config."""
    from .gate import GATES

    checks = [("K", isinstance(h["K"], int) and h["K"] >= MIN_K[rule], f"an int >= {MIN_K[rule]}"),
              ("alpha", 0 < h["alpha"] <= 1, "in (0, 1]"),
              ("tau", h["tau"] > 0, "> 0"),
              ("gate", h["gate"] in GATES, f"one of {GATES}"),
              ("window", isinstance(h["window"], int) and h["window"] >= 1, "an int >= 1"),
              ("warmup", isinstance(h["warmup"], int) and h["warmup"] >= 0, "an int >= 0")]
    if rule == "GXPO":
        checks.append(("gate_stat", h["gate_stat"] in GATE_STATS, f"one of {GATE_STATS}"))
    return checks


def check_hyperparameters(rule: str, h: dict):
    for name, ok, expected in hyperparameter_checks(rule, h):
        if not ok:
            raise ValueError(f"{name} must be {expected}, got {h[name]!r}")

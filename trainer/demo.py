"""`make demo`: the embedded SmolLM2-135M-Instruct on arithmetic, a few GRPO steps then a few GXPO
steps from the same start, and the report (figure + speedup table) under runs/demo/."""

import sys
from pathlib import Path

from .config import load_config
from .report import main as report
from .train import train

CONFIG = Path(__file__).parent / "configs" / "cpu_default.toml"


def main(argv=None):
    out = Path("runs/demo")
    extra = [a.lstrip("-").split("=", 1) for a in (argv if argv is not None else sys.argv[1:])]
    for algo in ("grpo", "gxpo"):
        cfg = load_config(CONFIG, [("algo", algo), ("out", str(out / algo)), *map(tuple, extra)])
        print(f"== {algo}: {cfg.steps} steps of {cfg.rollout.num_prompts} x {cfg.rollout.group_size} rollouts "
              f"on {cfg.model} ==", flush=True)
        train(cfg)
    report([str(out / "grpo"), str(out / "gxpo"), "--out", str(out)])


if __name__ == "__main__":
    main()

"""gxpo-report RUN_DIR [RUN_DIR ...]: reward and accuracy against steps, wall-clock and backward passes
for several runs on one figure, and the speedup table: the steps, seconds and backward passes each run
needs to reach the first (baseline) run's peak accuracy."""

import argparse
import json
from pathlib import Path


def read_run(run_dir):
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        raise ValueError(f"{run_dir}: no metrics.jsonl (is it a gxpo-train --out directory?)")
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if not rows:
        raise ValueError(f"{path} is empty")
    return rows


def first_reaching(rows, key, target):
    for r in rows:
        if r.get(key) is not None and r[key] >= target:
            return r
    return None


def speedup_table(runs: dict, key="accuracy") -> str:
    names = list(runs)
    baseline = runs[names[0]]
    peak = max(r.get(key) or 0.0 for r in baseline)
    lines = [f"Target: the baseline ({names[0]})'s peak {key} = {peak:.3f}", "",
             "| run | steps | wall-clock s | backward passes | speedup (steps / time / passes) |",
             "|---|---|---|---|---|"]
    base_hit = first_reaching(baseline, key, peak)
    for name in names:
        hit = first_reaching(runs[name], key, peak)
        if hit is None:
            lines.append(f"| {name} | not reached | - | - | - |")
            continue
        ratios = " / ".join(f"{base_hit[k] / hit[k]:.2f}x" if hit[k] else "-"
                            for k in ("step", "wall_time_s", "backward_passes"))
        lines.append(f"| {name} | {hit['step']} | {hit['wall_time_s']:.1f} | {hit['backward_passes']} | {ratios} |")
    return "\n".join(lines)


def eval_keys(runs: dict) -> list:
    """The held-out pass@1 series the runs logged: eval/pass@1 (the mean) and each benchmark's."""
    keys = {k for rows in runs.values() for r in rows for k in r if k.startswith("eval/") and k.endswith("/pass@1")}
    return sorted(keys, key=lambda k: (k != "eval/pass@1", k))


def plot(runs: dict, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = [("step", "step"), ("wall_time_s", "wall-clock (s)"), ("backward_passes", "backward passes")]
    held_out = eval_keys(runs)
    panels = [("reward_mean", ["reward_mean"]), ("accuracy", ["accuracy"])] + (
        [("held-out pass@1", held_out)] if held_out else [])
    fig, axes = plt.subplots(len(panels), 3, figsize=(14, 3.5 * len(panels)), sharey="row", squeeze=False)
    for row, (label_y, keys) in enumerate(panels):
        for col, (x, label) in enumerate(xs):
            ax = axes[row][col]
            for name, rows in runs.items():
                for key in keys:
                    pts = [(r[x], r[key]) for r in rows if r.get(key) is not None]
                    if pts:
                        tag = name if len(keys) == 1 else f"{name} {key[5:-7] or 'mean'}"
                        ax.plot(*zip(*pts, strict=True), marker="o", ms=3, label=tag)
            ax.set_xlabel(label)
            ax.set_ylabel(label_y if col == 0 else "")
            ax.grid(alpha=0.3)
        axes[row][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="gxpo-report", description=__doc__)
    parser.add_argument("runs", nargs="+", help="gxpo-train --out directories; the first is the baseline")
    parser.add_argument("--out", default=None,
                        help="directory for report.png and report.md (default: the first run's parent)")
    parser.add_argument("--metric", default="accuracy", help="what 'reaching the peak' is measured on")
    args = parser.parse_args(argv)
    try:
        runs = {Path(r).name: read_run(r) for r in args.runs}
    except ValueError as e:
        parser.exit(2, f"gxpo-report: {e}\n")
    out = Path(args.out or Path(args.runs[0]).parent)
    out.mkdir(parents=True, exist_ok=True)
    plot(runs, out / "report.png")
    table = speedup_table(runs, args.metric)
    (out / "report.md").write_text(f"![report](report.png)\n\n{table}\n")
    print(table)
    print(f"\nwrote {out / 'report.png'} and {out / 'report.md'}")


if __name__ == "__main__":
    main()

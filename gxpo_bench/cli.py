"""gxpo-bench: what each kernel and each training-step phase costs on this device, against the
alternatives and against the hardware's floor.

  gxpo-bench kernels [--fast] [--out FILE.json]
  gxpo-bench step [--model smollm2-135m] [--algo grpo,sfpo,gxpo] [--pack on|off|both] [--ckpt full]
                  [--lengths uniform|longtail] [--zero-adv-frac F] [--fast] [--out FILE.json]
  gxpo-bench static [--json FILE.json] [--md FILE.md] [--no-liger] [--beside OTHER.json]
                    [--N 16384] [--V 151936] [--params 1.5e9]
  gxpo-bench study [--fast] [--seeds 0,1,2] [--rules grpo,gxpo-authors-1p5b,gxpo-final,...] [--runs DIR]
                   [--report-only] [--out FILE.json]
  gxpo-bench compare A.json B.json [--threshold 1.10]

`static` needs no GPU: every Triton kernel compiled for sm_90 at its launchers' configs, with registers,
spills, occupancy, access widths, hot-loop instructions and bytes per call (a model of an H100, not a
timing; see gxpo_bench/static.py).

Results go to FILE.json and FILE.md (default bench/results/DATE-DEVICE-KIND[-fast].json). On CPU the
losses' "ours" is the torch fallback and the bookkeeping's is the C++ extension; Triton's interpreter is
never timed. --fast uses tiny shapes (seconds on CPU) and, on CPU, leaves torch.compile out (its compile
alone takes ~20 s per shape there).
"""

import argparse
import json
import os
import shlex
import sys

import torch


def _device():
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def run_kernels(args) -> dict:
    from gxpo_bench import results
    from gxpo_bench.suites import run

    device = _device()
    raw = run.run("test_kernels.py", {"fast": args.fast, "reps": args.reps, "compile": args.compile})
    return {**results.header("kernels", device, args.fast, args.command), "ceilings": run.ceilings(raw),
            "cases": run.kernel_cases(raw, device, args.fast), "pytest_benchmark": raw}


def run_step(args) -> dict:
    from gxpo_bench import results, step
    from gxpo_bench.suites import run
    from gxpo_kernels.optim import RULES

    device = _device()
    algos = [a.strip() for a in args.algo.split(",") if a.strip()]
    if bad := [a for a in algos if a not in RULES]:
        raise ValueError(f"--algo: {bad} not among {', '.join(RULES)}")
    spec = step.plan(algos, device.type == "cuda", args.fast, args.model, args.batch, args.prompt_len,
                     args.completion_len, args.steps, args.beta, args.pack, args.ckpt, args.max_tokens,
                     args.micro_batch, args.zero_adv_frac, args.lengths)
    raw = run.run("test_step.py", spec)
    per_algo = run.step_algos(raw)
    B, P, T = spec["batch_shape"]
    real_tokens = int(step.synthetic_batch(100, B, P, T, "cpu", distribution=args.lengths).attention_mask.sum())
    setup = {k: spec[k] for k in ("model", "steps", "warmup", "beta", "lengths", "zero_adv_frac", "pack", "ckpt",
                                  "max_tokens")}
    return {**results.header("step", device, args.fast, args.command),
            "setup": {**setup, "batch": B, "prompt_len": P, "completion_len": T, "real_tokens": real_tokens},
            "algos": per_algo, "ratios": step.ratios(per_algo), "pytest_benchmark": raw}


def run_static(args):
    import datetime
    from pathlib import Path

    from gxpo_bench import static

    report = static.build(N=args.N, V=args.V, T=args.T, params=args.params, with_liger=not args.no_liger)
    if args.beside:
        report["beside"] = static.beside(report, json.loads(Path(args.beside).read_text()), args.beside)
    path = Path(args.json or f"bench/results/{datetime.date.today():%Y-%m-%d}-static-sm90.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=1) + "\n")
    md = Path(args.md) if args.md else path.with_suffix(".md")
    md.write_text(static.to_markdown(report, args.command))
    print(md.read_text())
    print(f"wrote {path} and {md}", file=sys.stderr)
    spilled = static.spilling(report)
    if args.no_spills and spilled:
        sys.exit(f"gxpo-bench static --no-spills: under Triton {report['triton']} these kernels spill: {spilled}")


def run_study(args) -> dict:
    from pathlib import Path

    from gxpo_bench import results, study

    rules = [r.strip() for r in args.rules.split(",") if r.strip()]
    if bad := [r for r in rules if r not in study.RULES]:
        raise ValueError(f"--rules: {bad} not among {', '.join(study.RULES)}")
    if study.BASELINE not in rules:
        raise ValueError(f"--rules must include the baseline {study.BASELINE!r}: it sets the target")
    try:
        seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    except ValueError:
        raise ValueError(f"--seeds: comma-separated integers, got {args.seeds!r}") from None
    if not seeds:
        raise ValueError("--seeds: at least one seed")
    runs = Path(args.runs or ("runs/study-fast" if args.fast else "runs/study"))
    if not args.report_only:
        study.run_all(rules, seeds, runs, args.fast, log=lambda m: print(m, file=sys.stderr, flush=True))
    curves = study.load_curves(rules, seeds, runs)
    setup = {**(study.FAST if args.fast else study.FULL), "config": study.CPU_DEFAULT.name, "seeds": seeds,
             "runs": str(runs)}
    return {**results.header("study", _device(), args.fast, args.command), "setup": setup,
            "analysis": study.analyse(curves), "curves": curves}


def write_study(result: dict, path):
    from pathlib import Path

    from gxpo_bench import study

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1) + "\n")
    study.plot(result["curves"], path.with_suffix(".png"))
    md = study.to_markdown(result) + f"\n![study]({path.with_suffix('.png').name})\n"
    path.with_suffix(".md").write_text(md)
    print(md)
    print(f"wrote {path} and its .md and .png", file=sys.stderr)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="gxpo-bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    for name in ("kernels", "step"):
        p = sub.add_parser(name)
        p.add_argument("--fast", action="store_true", help="tiny shapes: seconds on CPU (what CI runs)")
        p.add_argument("--out", help="FILE.json (FILE.md next to it); default under bench/results/")
    k = sub.choices["kernels"]
    k.add_argument("--reps", type=int, default=0, help="timed repetitions per implementation")
    k.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="include torch.compile (default: yes, except --fast on CPU)")
    s = sub.choices["step"]
    s.add_argument("--model", help="smollm2-135m (default), tiny-random (--fast default) or an HF path")
    s.add_argument("--algo", default="grpo,sfpo,gxpo")
    s.add_argument("--steps", type=int, default=0, help="timed steps per rule")
    s.add_argument("--batch", type=int, default=0)
    s.add_argument("--prompt-len", type=int, default=0)
    s.add_argument("--completion-len", type=int, default=0)
    s.add_argument("--beta", type=float, default=0.0, help="KL weight; > 0 adds the reference forward")
    s.add_argument("--pack", choices=("on", "off", "both"), default="on",
                   help="packed micro-batches (default), padded rows, or both side by side with their ratios")
    s.add_argument("--ckpt", choices=("off", "full", "selective"), default="off", help="activation checkpointing")
    s.add_argument("--zero-adv-frac", type=float, default=0.0,
                   help="share of completions with zero advantage; adds each rule without skipping, side by side")
    s.add_argument("--lengths", choices=("uniform", "longtail"), default="uniform",
                   help="completion lengths: uniform in [T/4, T] or log-normal around T/8")
    s.add_argument("--max-tokens", type=int, default=0, help="packed: tokens per micro-batch (0: one)")
    s.add_argument("--micro-batch", type=int, default=0, help="padded: sequences per micro-batch (0: one)")
    st = sub.add_parser("static", help="the static sm_90 model of every kernel (no GPU needed)")
    st.add_argument("--json", help="FILE.json (default bench/results/DATE-static-sm90.json)")
    st.add_argument("--md", help="FILE.md (default: next to the JSON)")
    st.add_argument("--no-liger", action="store_true",
                    help="leave the peers' kernels out: Liger-Kernel's GRPO loss rows, Liger's and CCE's compiled "
                         "calibration rows")
    st.add_argument("--beside", metavar="OTHER.json",
                    help="a static report under another Triton (make compat): its kernel rows beside these")
    st.add_argument("--no-spills", action="store_true", help="exit 1 when one of our kernels spills (make compat)")
    st.add_argument("--N", type=int, default=16384, help="tokens of the modelled loss call")
    st.add_argument("--V", type=int, default=151936, help="vocabulary of the modelled loss call")
    st.add_argument("--T", type=int, default=1024, help="completion tokens per sequence (rows captured)")
    st.add_argument("--params", type=float, default=1.5e9, help="parameters for the bookkeeping roofline")
    sy = sub.add_parser("study", help="GRPO, GXPO presets and SFPO over seeds: time to GRPO's peak")
    sy.add_argument("--fast", action="store_true", help="the tiny random model, 2 steps (what CI runs)")
    sy.add_argument("--seeds", default="0,1,2")
    sy.add_argument("--rules", default="grpo,gxpo-authors-1p5b,gxpo-final,gxpo-paper,sfpo-official")
    sy.add_argument("--runs", help="run directories (default runs/study or runs/study-fast); finished runs are kept")
    sy.add_argument("--report-only", action="store_true", help="rebuild the report from the runs, train nothing")
    sy.add_argument("--out", help="FILE.json (FILE.md and FILE.png next to it); default under bench/results/")
    c = sub.add_parser("compare", help="B / A per row of two result files")
    c.add_argument("a")
    c.add_argument("b")
    c.add_argument("--threshold", type=float, default=1.10, help="exit 1 when a row of B is slower than this x A")
    args = parser.parse_args(argv)
    os.environ.pop("TRITON_INTERPRET", None)  # before gxpo_kernels is imported: the interpreter is never timed
    from gxpo_bench import results

    if args.cmd == "compare":
        with open(args.a) as fa, open(args.b) as fb:
            table, slower = results.compare(json.load(fa), json.load(fb), args.threshold)
        print(table)
        if slower:
            print(f"\n{len(slower)} row(s) slower than {args.threshold}x", file=sys.stderr)
            sys.exit(1)
        return
    args.command = "gxpo-bench " + shlex.join(argv)
    if args.cmd == "static":
        return run_static(args)
    if args.cmd == "study":
        try:
            result = run_study(args)
        except ValueError as e:
            sys.exit(f"gxpo-bench: {e}")
        return write_study(result, args.out or results.default_path("study", _device(), args.fast))
    try:
        result = run_kernels(args) if args.cmd == "kernels" else run_step(args)
    except ValueError as e:
        sys.exit(f"gxpo-bench: {e}")
    device = _device()
    path = args.out or results.default_path(args.cmd, device, args.fast)
    md = results.write(result, path)
    print(md.read_text())
    print(f"wrote {path} and {md}", file=sys.stderr)


if __name__ == "__main__":
    main()

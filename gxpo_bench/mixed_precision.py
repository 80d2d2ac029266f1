"""How to compute in bf16 with fp32 master weights on one device: FSDP2's MixedPrecisionPolicy on a one-rank
mesh (what the trainer does) against torch.autocast, both against fp32 compute. One forward+backward of
the trainer's loss closure on a fixed synthetic batch, each variant in its own process (peak RSS is per
process): seconds (median of --reps), peak resident memory, and the gradient's and loss's relative error
against fp32 compute (float64 norms).

  .venv/bin/python -m gxpo_bench.mixed_precision [--model smollm2-135m] [--rows 8] [--tokens 32] [--out FILE.md]
"""

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = ("fp32", "fsdp2_bf16", "autocast_bf16")


def run_variant(variant, model_name, rows, tokens, reps, grads_path):
    from gxpo_bench.step import synthetic_batch
    from trainer.closure import LossClosure
    from trainer.config import load_config
    from trainer.policy_stack import build_policy_stack

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    compute = "bfloat16" if variant == "fsdp2_bf16" else "float32"  # fsdp2_bf16: the trainer's mixed precision
    cfg = load_config(overrides=[("model", model_name), ("rollout.max_new_tokens", str(tokens)), ("dtype", compute)])
    stack = build_policy_stack(cfg, device, with_rule=False)
    runner, tokenizer = stack.runner, stack.tokenizer
    if variant == "autocast_bf16":
        # Under autocast our fused loss gets bf16 logit chunks and an fp32 weight and fails (its out= buffers
        # have the weight's dtype); the usual fix is to run the loss outside autocast, in fp32.
        import trainer.policy

        fused = trainer.policy.fused_linear_grpo_loss

        def loss_in_fp32(hidden, weight, *a, **k):
            with torch.autocast(device.type, enabled=False):
                return fused(hidden.float(), weight.float(), *a, **k)

        trainer.policy.fused_linear_grpo_loss = loss_in_fp32
    batch = synthetic_batch(len(tokenizer), rows, 16, tokens, device)
    adv = torch.randn(rows, generator=torch.Generator().manual_seed(1)).to(device)
    times, loss = [], None
    for _ in range(reps):
        for p in runner.parameters():
            p.grad = None
        closure = LossClosure(runner, batch, adv, cfg)
        t0 = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=variant == "autocast_bf16"):
            loss, _ = closure()
        times.append(time.perf_counter() - t0)
    local = lambda t: t.to_local() if hasattr(t, "to_local") else t  # noqa: E731
    grads = torch.cat([local(p.grad).double().flatten() for p in runner.parameters() if p.grad is not None])
    torch.save({"grad": grads, "loss": float(loss)}, grads_path)
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    dtypes = sorted({str(local(p).dtype) for p in runner.parameters()} | {str(local(p.grad).dtype)
                    for p in runner.parameters() if p.grad is not None})
    print(json.dumps({"variant": variant, "seconds": statistics.median(times), "peak_rss_mib": peak_mib,
                      "param_and_grad_dtypes": dtypes}))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--rows", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--out", default=None)
    ap.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)
    ap.add_argument("--grads", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.variant:
        return run_variant(args.variant, args.model, args.rows, args.tokens, args.reps, args.grads)
    rows, work = [], Path("runs/mixed_precision")
    work.mkdir(parents=True, exist_ok=True)
    for variant in VARIANTS:
        cmd = [sys.executable, __file__, "--variant", variant, "--model", args.model, "--rows", str(args.rows),
               "--tokens", str(args.tokens), "--reps", str(args.reps), "--grads", str(work / f"{variant}.pt")]
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env={"PYTHONPATH": str(ROOT),
                                                                                   **_env()})
        if proc.returncode:
            raise SystemExit(f"{variant} failed:\n{proc.stderr[-3000:]}")
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    ref = torch.load(work / "fp32.pt")
    for row in rows:
        got = torch.load(work / f"{row['variant']}.pt")
        row["grad_rel_err"] = ((got["grad"] - ref["grad"]).norm() / ref["grad"].norm()).item()
        row["loss_rel_err"] = abs(got["loss"] - ref["loss"]) / max(abs(ref["loss"]), 1e-30)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    lines = [f"# bf16 compute with fp32 masters, one device ({device})", "",
             f"`{' '.join(['python -m gxpo_bench.mixed_precision', *(argv if argv is not None else sys.argv[1:])])}`: "
             f"{args.model}, {args.rows} rows x (16 prompt + {args.tokens} completion) tokens, one loss-closure "
             f"forward+backward, median of {args.reps}; each variant in its own process.", "",
             "| variant | seconds | vs fp32 | peak RSS MiB | grad rel. err vs fp32 | loss rel. err | dtypes |",
             "|---|---|---|---|---|---|---|"]
    base = rows[0]["seconds"]
    for r in rows:
        lines.append(f"| {r['variant']} | {r['seconds']:.3f} | {r['seconds'] / base:.2f}x | {r['peak_rss_mib']:.0f} | "
                     f"{r['grad_rel_err']:.2e} | {r['loss_rel_err']:.2e} | {', '.join(r['param_and_grad_dtypes'])} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        Path(args.out).write_text(text)


def _env():
    import os

    return {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "PYTHONPATH")}


if __name__ == "__main__":
    main()

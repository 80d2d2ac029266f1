"""`make gpu-check`'s timing step: every LM-head impl, TRL's and Liger's fused heads where they import, our
grpo_loss and Liger's on [N, V] logits, the GXPO flat kernels, and the calibration's copy and GEMM, timed with
CUDA events at the reference shapes, each printed next to the time model's figure for the same work on this
GPU's profile, into bench/results/DATE-gpu-check.{json,md}. Where `ncu` exists, the LM-head and loss cases
run once more under it (atomics at L2, tensor-pipe use, DRAM bytes) into DATE-gpu-check-ncu-CASE.csv.
--dry-run: the same code on the CPU at tiny shapes (CI runs it), so the script cannot rot before a GPU
meets it; its timings are CPU timings and say so."""

import argparse
import datetime
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import torch

from gxpo_kernels import fused_linear_grpo_loss, grpo_loss
from gxpo_kernels.devices import profile_for
from gxpo_kernels.loss import lm_head_cost as cost
from gxpo_kernels.loss.lm_head_kernels import tile_config

from . import lm_head_peers
from .timing import copy_bandwidth, matmul_rate, measure

REFERENCE = {"N": 16384, "V": 151936, "H": 1536, "params": 250_000_000}
DRY = {"N": 64, "V": 320, "H": 48, "params": 20_000}
LOSS_BYTES_PER_LOGIT = 6  # bf16: the forward reads the logits, the backward reads them and writes the gradient
FLAT_BYTES_PER_PARAM = {"snapshot": 16, "extrapolate": 20}  # fp32 state (gxpo-bench static's flat rows)


def _inputs(N, V, H, device, dtype, seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    hidden = torch.randn(1, N, H, device=device, generator=g).to(dtype)
    weight = (torch.randn(V, H, device=device, generator=g) / H**0.5).to(dtype)
    ids = torch.randint(0, V, (1, N), device=device, generator=g)
    adv, mask = torch.randn(1, device=device, generator=g), torch.ones(1, N, dtype=torch.bool, device=device)
    old = -torch.rand(1, N, device=device, generator=g) * 3
    return hidden, weight, ids, adv, mask, old


def _ours(impl, **kw):
    def run(hidden, weight, ids, adv, mask, old):
        h, w = hidden.detach().requires_grad_(), weight.detach().requires_grad_()
        fused_linear_grpo_loss(h, w, ids, adv, mask, old, impl=impl, **kw)[0].backward()
    return run


def _trl():
    from trl.kernels.chunked_logprob import ChunkedLogProbFunction  # noqa: F401  (present from TRL 1.16)
    from trl.trainer.utils import _CHUNKED_LOGPROB_CHUNK_SIZE

    def run(hidden, weight, ids, adv, mask, old):
        h, w = hidden[0].detach().requires_grad_(), weight.detach().requires_grad_()
        logp = ChunkedLogProbFunction.apply(h, w, None, ids[0], 1.0, _CHUNKED_LOGPROB_CHUNK_SIZE)[0]
        (-(logp - old[0]).exp() * adv).mean().backward()
    return run


def _liger():
    from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss

    loss = LigerFusedLinearGRPOLoss(beta=0.0, use_ref_model=False)

    def run(hidden, weight, ids, adv, mask, old):
        h, w = hidden.detach().requires_grad_(), weight.detach().requires_grad_()
        out = loss(h, w, ids, mask, adv, old_per_token_logps=old)
        (out[0] if isinstance(out, tuple) else out).backward()
    return run


def _logits_inputs(N, V, device, dtype, causal=False, seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    logits = torch.randn(1, N + int(causal), V, device=device, generator=g).to(dtype)
    ids = torch.randint(0, V, (1, N), device=device, generator=g)
    old = -torch.rand(1, N, device=device, generator=g) * 3
    return logits, ids, torch.randn(1, device=device, generator=g), torch.ones(1, N, device=device), old


def _grpo_loss_ours(logits, ids, adv, mask, old):
    x = logits.requires_grad_()
    grpo_loss(x, ids, adv, mask, old, None, beta=0.0, eps_low=0.2, eps_high=0.28, inplace=True)[0].backward()


def _grpo_loss_liger(logits, ids, adv, mask, old):
    from liger_kernel.transformers.grpo_loss import triton_grpo_loss

    x = logits.requires_grad_()
    triton_grpo_loss(x, old, None, ids, adv, mask, temperature=1.0, beta=0.0, eps_low=0.2, eps_high=0.28,
                     inplace=True, loss_type="dapo", reduce=True)[0].backward()


def flat_cases(params: int, device):
    """(name, fn, setup, bytes moved) of the GXPO flat kernels over one group of `params` fp32 parameters."""
    from gxpo_kernels.optim.flat import ops as flat_ops
    from gxpo_kernels.optim.flat.buffers import BLOCK, FlatGroup

    sizes = [params // 2, params // 3, params - params // 2 - params // 3]
    weights = [torch.randn(n, device=device) for n in sizes]
    grads = [torch.randn(n, device=device) for n in sizes]
    group = FlatGroup(weights, BLOCK)
    flat_ops.snapshot(group, grads)  # theta0 and g0 exist before extrapolate is timed
    return [("flat snapshot", lambda: flat_ops.snapshot(group, grads), FLAT_BYTES_PER_PARAM["snapshot"] * params),
            ("flat extrapolate", lambda: flat_ops.extrapolate(group, grads, K=3, alpha=0.5, delta=1e-8),
             FLAT_BYTES_PER_PARAM["extrapolate"] * params)]


def cases(N, V, H, dev):
    """(name, fn, modelled plan or None) of one forward+backward each."""
    cfg = tile_config(N, V, H, torch.device("cuda"))
    auto = cost.choose(dev, N, V, H, "bf16", cfg)
    out = [("ours auto", _ours("auto"), auto),
           ("ours chunked, deterministic", _ours("chunked", deterministic=True), cost.best_chunked(dev, N, V, H)),
           ("ours tiled", _ours("tiled"), cost.tiled(dev, N, V, H, cfg))]
    for name, make, model in (("TRL 1.16 fused head", _trl, lm_head_peers.trl),
                              ("Liger 0.8.5 fused linear GRPO", _liger, lm_head_peers.liger)):
        try:
            out.append((name, make(), model(dev, N, V, H)))
        except ImportError as e:
            out.append((name, None, f"not importable here: {e}"))
    return out


def ncu_available() -> bool:
    return shutil.which("ncu") is not None


NCU_METRICS = ("gpu__time_duration.sum", "dram__bytes.sum", "lts__t_sectors_op_red.sum", "lts__t_sectors_op_atom.sum",
               "sm__pipe_tensor_op_gmma_cycles_active.avg.pct_of_peak_sustained_active",
               "sm__pipe_tensor_op_hmma_cycles_active.avg.pct_of_peak_sustained_active")
NCU_CASES = ("ours auto", "ours tiled", "grpo_loss ours")


def ncu_command(case: str, metrics=NCU_METRICS) -> list:
    """ncu over one run of one case (clocks left alone, as the device notes ask; at most 40 kernels)."""
    cmd = ["ncu", "--clock-control", "none", "--csv", "--launch-count", "40", "--target-processes", "all"]
    cmd += ["--metrics", ",".join(metrics)] if metrics else ["--section", "SpeedOfLight"]
    return cmd + [sys.executable, "-m", "gxpo_bench.gpu_check", "--one", case]


def ncu_counters(stem: Path) -> dict:
    """Each NCU_CASES case under ncu, its CSV beside the report; a metric this ncu does not know falls back to
    its SpeedOfLight section. {case: csv path or the error}."""
    out = {}
    for case in NCU_CASES:
        path = Path(f"{stem}-ncu-{re.sub(r'[^a-z0-9]+', '_', case)}.csv")
        for metrics in (NCU_METRICS, None):
            try:
                proc = subprocess.run(ncu_command(case, metrics), capture_output=True, text=True, timeout=150)
            except subprocess.TimeoutExpired:
                out[case] = "ncu timed out after 150 s"
                break
            if proc.returncode == 0:
                path.write_text(proc.stdout)
                out[case] = str(path)
                break
            out[case] = f"ncu rc {proc.returncode}: {proc.stderr.strip()[-300:]}"
    return out


def run_one(case: str):
    """One run of one case on CUDA at the reference shape (what ncu profiles)."""
    device, dtype, s = torch.device("cuda"), torch.bfloat16, REFERENCE
    if case.startswith("grpo_loss"):
        fn = _grpo_loss_ours if case == "grpo_loss ours" else _grpo_loss_liger
        fn(*_logits_inputs(s["N"], s["V"], device, dtype, causal=case != "grpo_loss ours"))
    else:
        [fn] = [f for name, f, _ in cases(s["N"], s["V"], s["H"], profile_for(torch.cuda.get_device_name())) if
                name == case]
        fn(*_inputs(s["N"], s["V"], s["H"], device, dtype))
    torch.cuda.synchronize()


STACK = ("triton", "transformers", "flash_attn", "vllm", "liger_kernel", "trl")


def stack_versions() -> dict:
    """The installed version of each package the GPU tests exercise, None where it does not import (flash_attn
    None: the packed varlen path was not run, tests/test_gpu_flash.py skipped)."""
    import importlib

    out = {}
    for name in STACK:
        try:
            out[name] = getattr(importlib.import_module(name), "__version__", "?")
        except Exception:  # not installed, or broken against this torch: not run either way
            out[name] = None
    return out


def run(dry_run: bool, out_dir: Path, reps: int) -> dict:
    cuda = torch.cuda.is_available() and not dry_run
    if not cuda and not dry_run:
        raise SystemExit("gpu-check needs CUDA; use --dry-run to exercise it on the CPU")
    device = torch.device("cuda" if cuda else "cpu")
    dev = profile_for(torch.cuda.get_device_name(device) if cuda else None)
    shape = REFERENCE if cuda else DRY
    dtype = torch.bfloat16 if cuda else torch.float32
    rows = []
    copy_bytes = (1 << 30) if cuda else (1 << 20)
    rows.append({"case": f"copy {copy_bytes >> 20} MiB",
                 "measured_ms": 2 * copy_bytes / copy_bandwidth(device, copy_bytes, reps) * 1e3,
                 "modelled_ms": cost.memory_pass(dev, "", 2 * copy_bytes).seconds * 1e3})
    n = 8192 if cuda else 128
    rows.append({"case": f"GEMM {n}^3 {str(dtype)[6:]}",
                 "measured_ms": 2 * n**3 / matmul_rate(device, dtype, n, reps) * 1e3,
                 "modelled_ms": cost.gemm(dev, "", n, n, n, 3 * n * n * dtype.itemsize).seconds * 1e3})
    for name, fn, model in cases(shape["N"], shape["V"], shape["H"], dev):
        row = {"case": name, "N": shape["N"], "V": shape["V"], "H": shape["H"]}
        if fn is None:
            rows.append({**row, "skipped": model})
            continue
        try:
            t = measure(fn, lambda: _inputs(shape["N"], shape["V"], shape["H"], device, dtype), device, reps)
        except Exception as e:  # a peer's API at this version: reported, not fatal
            rows.append({**row, "skipped": f"{type(e).__name__}: {e}"[:200]})
            continue
        rows.append({**row, "measured_ms": t["median_s"] * 1e3, "peak_mib": t["peak_mib"],
                     "modelled_ms": model.seconds * 1e3, "modelled_bound": model.bound,
                     "chunk_tokens": model.chunk_tokens})
    N, V = shape["N"], shape["V"]
    loss_model = cost.memory_pass(dev, "", LOSS_BYTES_PER_LOGIT * N * V)
    for name, fn, causal in (("grpo_loss ours", _grpo_loss_ours, False), ("grpo_loss Liger", _grpo_loss_liger, True)):
        rows.append(_timed(name, fn, lambda c=causal: _logits_inputs(N, V, device, dtype, c), device, reps,
                           loss_model, {"N": N, "V": V}))
    for name, fn, nbytes in flat_cases(shape["params"], device):
        rows.append(_timed(name, fn, tuple, device, reps, cost.memory_pass(dev, "", nbytes),
                           {"params": shape["params"]}))
    result = {"device": torch.cuda.get_device_name(device) if cuda else "cpu (dry run: CPU timings)",
              "profile": dev.name, "dtype": str(dtype), "torch": torch.__version__, "stack": stack_versions(),
              "ncu": ncu_available(),
              "date": datetime.date.today().isoformat(), "rows": rows}
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = out_dir / f"{result['date']}-gpu-check{'-dry-run' if dry_run else ''}"
    if cuda and ncu_available():
        result["ncu"] = ncu_counters(stem)
    stem.with_suffix(".json").write_text(json.dumps(result, indent=1))
    stem.with_suffix(".md").write_text(to_markdown(result))
    print(to_markdown(result))
    return result


def _timed(name, fn, setup, device, reps, model, shape: dict) -> dict:
    row = {"case": name, **shape}
    try:
        t = measure(fn, setup, device, reps)
    except Exception as e:  # a peer's API at this version: reported, not fatal
        return {**row, "skipped": f"{type(e).__name__}: {e}"[:200]}
    return {**row, "measured_ms": t["median_s"] * 1e3, "peak_mib": t["peak_mib"], "modelled_ms": model.seconds * 1e3,
            "modelled_bound": model.bound}


def to_markdown(result: dict) -> str:
    out = [f"# gpu-check on {result['device']} ({result['dtype']}, torch {result['torch']})", "",
           ("Dry run: CPU timings at tiny shapes, which only show that the script runs; the modelled column is "
            "the GPU's." if result["device"].startswith("cpu") else "Measured with CUDA events (median)")
           + f", next to the time model on the {result['profile']} profile (a model of the chip).", "",
           "Installed: " + ", ".join(f"{k} {v or 'not installed (not run)'}"
                                     for k, v in result.get("stack", {}).items()),
           "",
           "| case | measured ms | modelled ms | measured / modelled | bound (model) | peak MiB |",
           "|---|---|---|---|---|---|"]
    for r in result["rows"]:
        if "skipped" in r:
            out.append(f"| {r['case']} | skipped: {r['skipped']} | | | | |")
            continue
        ratio = r["measured_ms"] / r["modelled_ms"] if r["modelled_ms"] else float("nan")
        peak = r.get("peak_mib")
        out.append(f"| {r['case']} | {r['measured_ms']:.3f} | {r['modelled_ms']:.3f} | {ratio:.2f} | "
                   f"{r.get('modelled_bound', '-')} | {'-' if peak is None else f'{peak:.0f}'} |")
    if isinstance(result.get("ncu"), dict):
        out += ["", "ncu counters (one run per case, clocks not locked): "
                + "; ".join(f"{case}: {where}" for case, where in result["ncu"].items())]
    return "\n".join(out) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m gxpo_bench.gpu_check")
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes: checks the script, times nothing real")
    p.add_argument("--out", type=Path, default=Path("bench/results"))
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--one", choices=NCU_CASES, help="run one case once on CUDA (what ncu profiles) and exit")
    args = p.parse_args(argv)
    if args.one:
        return run_one(args.one)
    run(args.dry_run, args.out, args.reps)


if __name__ == "__main__":
    main()

"""`make gpu-check`'s timing step: every LM-head impl, TRL's and Liger's fused heads where they import, and the
calibration's copy and GEMM, timed with CUDA events at the reference shapes, each printed next to the time
model's figure for the same work on this GPU's profile, into bench/results/DATE-gpu-check.{json,md}.
--dry-run: the same code on the CPU at tiny shapes (CI runs it), so the script cannot rot before a GPU
meets it; its timings are CPU timings and say so."""

import argparse
import datetime
import json
import shutil
from pathlib import Path

import torch

from gxpo_kernels import fused_linear_grpo_loss
from gxpo_kernels.devices import profile_for
from gxpo_kernels.ops import lm_head_cost as cost
from gxpo_kernels.ops.lm_head_grpo_loss import tile_config

from . import lm_head_peers
from .timing import copy_bandwidth, matmul_rate, measure

REFERENCE = {"N": 16384, "V": 151936, "H": 1536}
DRY = {"N": 64, "V": 320, "H": 48}


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
    result = {"device": torch.cuda.get_device_name(device) if cuda else "cpu (dry run: CPU timings)",
              "profile": dev.name, "dtype": str(dtype), "torch": torch.__version__, "ncu": ncu_available(),
              "date": datetime.date.today().isoformat(), "rows": rows}
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = out_dir / f"{result['date']}-gpu-check{'-dry-run' if dry_run else ''}"
    stem.with_suffix(".json").write_text(json.dumps(result, indent=1))
    stem.with_suffix(".md").write_text(to_markdown(result))
    print(to_markdown(result))
    return result


def to_markdown(result: dict) -> str:
    out = [f"# gpu-check on {result['device']} ({result['dtype']}, torch {result['torch']})", "",
           ("Dry run: CPU timings at tiny shapes, which only show that the script runs; the modelled column is "
            "the GPU's." if result["device"].startswith("cpu") else "Measured with CUDA events (median)")
           + f", next to the time model on the {result['profile']} profile (a model of the chip).", "",
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
    return "\n".join(out) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m gxpo_bench.gpu_check")
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes: checks the script, times nothing real")
    p.add_argument("--out", type=Path, default=Path("bench/results"))
    p.add_argument("--reps", type=int, default=5)
    args = p.parse_args(argv)
    run(args.dry_run, args.out, args.reps)


if __name__ == "__main__":
    main()

"""The time model's sections of `gxpo-bench static`: device profiles, the LM-head loss per design at the
issue's shapes (ours as impl="auto" picks it, today's tiled kernels, the chunked path at its former default
chunk, TRL 1.16's and Liger 0.8.5's fused heads), and the calibration table. A model of the chip, not a timing."""

import torch

from gxpo_kernels.devices import H100_SXM, H200
from gxpo_kernels.loss import lm_head_cost as cost
from gxpo_kernels.loss.lm_head_autograd import default_chunk_tokens
from gxpo_kernels.loss.lm_head_kernels import tile_config

from . import calibration, lm_head_peers

SHAPES = [(N, V, H) for N in (4096, 16384, 65536) for V in (151936, 262144) for H in (1536, 4096)]


def _summary(p, peers: float, floor: float, liger_mem: float) -> dict:
    return {"impl": p.impl, "chunk_tokens": p.chunk_tokens, "ms": p.seconds * 1e3, "bound": p.bound,
            "resource_ms": {r: t * 1e3 for r, t in p.resource_seconds().items()}, "extra_gb": p.extra_bytes / 1e9,
            "vs_peers": p.seconds / peers, "vs_floor": p.seconds / floor, "mem_vs_liger": p.extra_bytes / liger_mem}


def lm_head_rows(dev=H100_SXM) -> list:
    out = []
    for N, V, H in SHAPES:
        cfg = tile_config(N, V, H, torch.device("cuda"))
        plans = {"ours (auto)": cost.choose(dev, N, V, H, "bf16", cfg),
                 "tiled (the former auto)": cost.tiled(dev, N, V, H, cfg),
                 "chunked at the former default chunk": cost.chunked(dev, N, V, H, default_chunk_tokens(N, V, H)),
                 "TRL 1.16 fused head": lm_head_peers.trl(dev, N, V, H),
                 "Liger 0.8.5 fused linear GRPO": lm_head_peers.liger(dev, N, V, H)}
        floor = cost.three_gemms_at_peak(dev, N, V, H)
        peers = min(plans["TRL 1.16 fused head"].seconds, plans["Liger 0.8.5 fused linear GRPO"].seconds)
        liger_mem = plans["Liger 0.8.5 fused linear GRPO"].extra_bytes
        out.append({"N": N, "V": V, "H": H, "floor_ms": floor * 1e3, "device": dev.name,
                    "plans": {k: _summary(p, peers, floor, liger_mem) for k, p in plans.items()}})
    return out


def profile_rows() -> list:
    return [{"name": d.name, "sms": d.sms, "clock_ghz": d.clock_hz / 1e9, "hbm_tb_s": d.hbm_bytes_per_s / 1e12,
             "l2_tb_s": d.l2_bytes_per_s / 1e12, "bf16_tflops": d.tensor_flops["bf16"] / 1e12,
             "tensor_efficiency": d.tensor_efficiency, "hbm_efficiency": d.hbm_efficiency, "sources": list(d.sources)}
            for d in (H100_SXM, H200)]


def report(compiled_peers: bool = True) -> dict:
    """compiled_peers: add the calibration rows of Liger's cross-entropy kernel and of CCE's kernels as
    compiled (needs liger-kernel and cut-cross-entropy)."""
    table = calibration.rows() + calibration.cce_baseline_rows()
    if compiled_peers:
        table += calibration.compiled_liger_rows() + calibration.compiled_cce_rows()
    return {"profiles": profile_rows(), "lm_head": lm_head_rows(),
            "calibration": [{**vars(r), "error": r.error} for r in table],
            "fit": calibration.fit_efficiencies()}


def to_markdown(tm: dict) -> list:
    out = ["## Time model: device profiles", "",
           "| device | SMs | clock GHz | HBM TB/s | L2 TB/s | bf16 dense TFLOP/s | tensor eff. | HBM eff. |",
           "|---|---|---|---|---|---|---|---|"]
    out += [f"| {p['name']} | {p['sms']} | {p['clock_ghz']:.2f} | {p['hbm_tb_s']:.2f} | {p['l2_tb_s']:.2f} | "
            f"{p['bf16_tflops']:.1f} | {p['tensor_efficiency']:.2f} | {p['hbm_efficiency']:.2f} |"
            for p in tm["profiles"]]
    out += ["", "Sources: " + "; ".join(tm["profiles"][0]["sources"]) + ".", "",
            "## LM-head GRPO loss: modelled time of one forward+backward (H100 SXM profile, bf16)", "",
            "Each design's steps (gxpo_kernels/loss/lm_head_cost.py, gxpo_bench/lm_head_peers.py) as the largest of "
            "their resource times, summed; `bound`: the resource that takes the most of it. Floor: the three GEMMs "
            "(logits, d_hidden, d_weight) at the dense tensor-core peak. Extra memory: beyond the inputs and the "
            "gradients handed back.", "",
            "| N | V | H | design | chunk | ms | bound | vs best peer | vs floor | extra GB | vs Liger's memory |",
            "|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in tm["lm_head"]:
        for name, p in row["plans"].items():
            out.append(f"| {row['N']} | {row['V']} | {row['H']} | {name} | {p['chunk_tokens'] or '-'} | "
                       f"{p['ms']:.1f} | {p['bound']} | {p['vs_peers']:.2f}x | {p['vs_floor']:.2f}x | "
                       f"{p['extra_gb']:.2f} | {p['mem_vs_liger']:.2f} |")
    worst = max(r["plans"]["ours (auto)"]["vs_floor"] for r in tm["lm_head"])
    out += ["", f"Ours against the floor: at most {worst:.2f}x. What stops it at the moonshot's 1.3x: the tensor "
            f"cores at the calibrated {H100_SXM.tensor_efficiency:.2f} of their peak (cuBLAS's own efficiency, "
            f"1.25x by itself) plus the row passes over the [C, V] logits (HBM), which run between the GEMMs rather "
            "than under them.", ""]
    return out + calibration.to_markdown([calibration.Row(**{k: v for k, v in r.items() if k != "error"})
                                          for r in tm["calibration"]])

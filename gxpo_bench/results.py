"""Results: JSON (everything) and a markdown table (what a reader needs), named by date and device
under bench/results/ unless --out says otherwise; and the ratios between two JSON files."""

import datetime
import json
import platform
from pathlib import Path

import torch


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def default_path(kind: str, device: torch.device, fast: bool) -> Path:
    tag = torch.cuda.get_device_name(device).replace(" ", "-") if device.type == "cuda" else "cpu"
    return Path("bench/results") / f"{datetime.date.today()}-{tag}-{kind}{'-fast' if fast else ''}.json"


def header(kind: str, device, fast: bool, command: str) -> dict:
    return {"kind": kind, "device": device_name(device), "date": datetime.datetime.now().isoformat(timespec="seconds"),
            "fast": fast, "command": command, "torch": torch.__version__}


def write(result: dict, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1) + "\n")
    md = path.with_suffix(".md")
    md.write_text(render(result))
    return md


def _fmt(x, spec=".3f"):
    return "-" if x is None else format(x, spec)


def render(result: dict) -> str:
    lines = [f"# gxpo-bench {result['kind']}{' (--fast)' if result['fast'] else ''}", "",
             f"Device: {result['device']}; torch {result['torch']}; {result['date']}", "",
             f"Command: `{result['command']}`", ""]
    return "\n".join(lines + (_render_kernels(result) if result["kind"] == "kernels" else _render_step(result))) + "\n"


def _render_kernels(result):
    c = result["ceilings"]
    lines = [f"Ceilings measured in this run: copy {c['copy_bytes_per_s'] / 1e9:.1f} GB/s (read + write, "
             f"{c['copy_bytes'] >> 20} MiB), matmul {c['matmul_flops_per_s'] / 1e12:.2f} TFLOP/s "
             f"({c['matmul_n']}^3 {c['matmul_dtype']}). Floor: the larger of bytes / copy rate and "
             "FLOPs / matmul rate.", ""]
    for case in result["cases"]:
        lines += [f"## {case['case']} {case['shape']}", "",
                  f"Floor {_fmt(case['floor_ms'])} ms ({case['bytes'] / 1e6:.1f} MB, {case['flops'] / 1e9:.2f} GFLOP)",
                  "", "| impl | median ms | IQR ms | peak MiB | GB/s | TFLOP/s | time / floor | time / ours |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in case["rows"]:
            if r.get("skipped"):
                lines.append(f"| {r['impl']} | skipped: {r['skipped']} | | | | | | |")
                continue
            lines.append(f"| {r['impl']} | {_fmt(r['median_ms'])} | {_fmt(r['iqr_ms'])} | {_fmt(r['peak_mib'], '.1f')} "
                         f"| {_fmt(r['gbps'], '.1f')} | {_fmt(r['tflops'], '.2f')} | {_fmt(r['x_floor'], '.2f')} "
                         f"| {_fmt(r['x_ours'], '.2f')} |")
        lines.append("")
    return lines


def _render_step(result):
    s = result["setup"]
    lines = [f"Model {s['model']}; batch {s['batch']} sequences, prompt {s['prompt_len']} + up to "
             f"{s['completion_len']} completion tokens ({s['real_tokens']} real tokens); {s['steps']} timed "
             f"steps after {s['warmup']} warm-up, the rules stepped in turn; medians. GXPO and SFPO with "
             f"the gate off (every step active). Completion lengths {s.get('lengths', 'uniform')}, packing "
             f"{s.get('pack', 'off')} (+nopack: padded rows), activation checkpointing {s.get('ckpt', 'off')}.",
             ""]
    algos = result["algos"]
    seen = {k for r in algos.values() for k in r["phases_ms"]}
    passes = sorted((k for k in seen if k.startswith("pass_")), key=lambda k: int(k.removeprefix("pass_")))
    phases = passes + [k for k in ("ref_logprob", "plan", "optimizer", "bookkeeping", "unaccounted") if k in seen]
    lines += ["| algo | step ms | " + " | ".join(f"{p} ms" for p in phases) +
              " | passes | tokens/s | padding | MFU | peak GiB |",
              "|---|---|" + "---|" * len(phases) + "---|---|---|---|---|"]
    for name, r in algos.items():
        cells = [_fmt(r["phases_ms"].get(p)) for p in phases]
        lines.append(f"| {name} | {_fmt(r['step_ms'])} | " + " | ".join(cells) +
                     f" | {r['passes_per_step']} | {r['tokens_per_s']:.0f} "
                     f"| {_fmt(r.get('pack/padding_frac_packed', r.get('pack/padding_frac_padded')), '.2f')} "
                     f"| {_fmt(r.get('mfu'), '.3f')} "
                     f"| {_fmt(r.get('peak_mem_gib'), '.2f')} |")
    lines += ["", "| ratio | value |", "|---|---|"]
    lines += [f"| {k} | {v:.2f} |" for k, v in result["ratios"].items()]
    return lines + [""]


def _keyed(result: dict) -> dict:
    """{row key: time in ms} for either kind."""
    if result["kind"] == "kernels":
        return {f"{c['case']} {c['shape']} {r['impl']}": r["median_ms"] for c in result["cases"]
                for r in c["rows"] if not r.get("skipped")}
    return {f"{name} step": r["step_ms"] for name, r in result["algos"].items()} | {
        f"{name} {phase}": ms for name, r in result["algos"].items() for phase, ms in r["phases_ms"].items()
        if phase != "unaccounted"}


def compare(a: dict, b: dict, threshold: float) -> tuple:
    """(markdown table of B / A per row both have, rows slower than threshold x)."""
    if a["kind"] != b["kind"]:
        raise ValueError(f"cannot compare a {a['kind']} run with a {b['kind']} run")
    ka, kb = _keyed(a), _keyed(b)
    rows, slower = [], []
    for key in sorted(ka.keys() & kb.keys()):
        ratio = kb[key] / ka[key] if ka[key] > 0 else float("inf")
        if ratio > threshold:
            slower.append(key)
        flag = " (slower)" if ratio > threshold else ""
        rows.append(f"| {key} | {ka[key]:.3f} | {kb[key]:.3f} | {ratio:.2f}{flag} |")
    only = sorted(ka.keys() ^ kb.keys())
    lines = [f"A: {a['device']} {a['date']}", f"B: {b['device']} {b['date']}", "",
             "| row | A ms | B ms | B / A |", "|---|---|---|---|", *rows]
    if only:
        lines += ["", f"In one run only: {', '.join(only)}"]
    return "\n".join(lines), slower

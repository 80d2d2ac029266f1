"""Runs a suite under pytest-benchmark in this process and reads its JSON back into gxpo-bench's results
(gxpo_bench/results.py renders them)."""

import json
import tempfile
from pathlib import Path

import pytest

from gxpo_bench import kernels

HERE = Path(__file__).parent


def run(suite: str, spec: dict, extra_args=()) -> dict:
    """pytest-benchmark's JSON of gxpo_bench/suites/<suite> at this spec (plus the suite's `gxpo` additions)."""
    with tempfile.TemporaryDirectory(prefix="gxpo_bench_") as tmp:
        out = Path(tmp) / "benchmark.json"
        code = pytest.main([str(HERE / suite), "-q", "-p", "no:cacheprovider", f"--rootdir={HERE.parents[1]}",
                            f"--gxpo-spec={json.dumps(spec)}", f"--benchmark-json={out}", *extra_args])
        if code not in (pytest.ExitCode.OK, pytest.ExitCode.NO_TESTS_COLLECTED):
            raise RuntimeError(f"the {suite} suite failed (pytest exit code {int(code)}): see its output above")
        return json.loads(out.read_text())


def kernel_cases(raw: dict, device, fast: bool) -> list:
    """gxpo-bench kernels' cases (rows per impl, floor, ratios to ours and to the floor) from the JSON."""
    timed = {(b["extra_info"]["case"], b["extra_info"]["shape"], b["extra_info"]["impl"]): b
             for b in raw["benchmarks"]}
    skipped = {(s["case"], s["shape"], s["impl"]): s["reason"] for s in raw["gxpo"]["skipped"]}
    out = []
    for case, shape, impls, _ in kernels.case_list(device, fast):
        rows, info = [], None
        for impl in impls:
            key = (case, shape, impl)
            if key in skipped:
                rows.append({"impl": impl, "skipped": skipped[key]})
                continue
            b = timed[key]
            info, median = b["extra_info"], b["stats"]["median"]
            floor = info["floor_s"]
            rows.append({"impl": impl, "median_ms": 1e3 * median, "iqr_ms": 1e3 * b["stats"]["iqr"],
                         "peak_mib": info["peak_mib"], "gbps": info["bytes"] / median / 1e9 if info["bytes"] else None,
                         "tflops": info["flops"] / median / 1e12 if info["flops"] else None,
                         "x_floor": median / floor if floor else None})
        ours = next((r["median_ms"] for r in rows if r["impl"] == "ours" and "median_ms" in r), None)
        for r in rows:
            r["x_ours"] = r["median_ms"] / ours if ours and "median_ms" in r else None
        if info is not None:
            out.append({"case": case, "shape": shape, "bytes": info["bytes"], "flops": info["flops"],
                        "floor_ms": 1e3 * info["floor_s"], "rows": rows})
    return out


def ceilings(raw: dict) -> dict:
    return raw["benchmarks"][0]["extra_info"]["ceilings"]


def step_algos(raw: dict) -> dict:
    return {b["extra_info"]["summary"]["algo"]: b["extra_info"]["summary"] for b in raw["benchmarks"]}

"""gxpo-bench end to end on CPU at --fast shapes (what CI runs): valid JSON and markdown, phase times
that add up, backward-pass counts equal to the rules' own counters, and the compare mode."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import uninterpreted_env

pytest.importorskip("transformers")
ROOT = Path(__file__).resolve().parents[1]


def gxpo_bench(*args, check=True):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "gxpo_bench.cli", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)
    if check:
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc


@pytest.fixture(scope="module")
def kernels_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "k.json"
    gxpo_bench("kernels", "--fast", "--reps", "3", "--out", str(out))
    return out


def test_kernels_fast_writes_json_and_table(kernels_run):
    result = json.loads(kernels_run.read_text())
    assert result["kind"] == "kernels" and result["fast"] and result["device"].startswith("cpu")
    assert result["ceilings"]["copy_bytes_per_s"] > 0 and result["ceilings"]["matmul_flops_per_s"] > 0
    assert {c["case"] for c in result["cases"]} == {"grpo_loss", "fused_linear_grpo_loss", "capo_scores",
                                                  "adamw_step", "gxpo_bookkeeping"}
    for case in result["cases"]:
        timed = {r["impl"]: r for r in case["rows"] if "median_ms" in r}
        if case["case"] == "adamw_step":  # Triton-only: on CPU torch's two AdamW paths, ours skipped
            assert set(timed) == {"torch_foreach", "torch_fused"}
            continue
        assert "ours" in timed and len(timed) >= 2, case["case"]  # ours and at least one alternative
        assert timed["ours"]["x_ours"] == 1.0 and case["floor_ms"] > 0
        for r in timed.values():
            assert r["median_ms"] > 0 and r["x_floor"] == pytest.approx(r["median_ms"] / case["floor_ms"])
    skipped = [r for c in result["cases"] for r in c["rows"] if "skipped" in r]
    assert all(r["impl"] in ("liger", "torch_compile", "ours", "ours_with_snapshot", "ours_chunked", "ours_filtered")
               for r in skipped)
    table = kernels_run.with_suffix(".md").read_text()
    assert "## gxpo_bookkeeping" in table and "time / floor" in table and "skipped:" in table


def test_step_fast_phases_add_up_and_passes_match_the_rules(tmp_path):
    out = tmp_path / "s.json"
    gxpo_bench("step", "--fast", "--algo", "grpo,sfpo,gxpo", "--out", str(out))
    result = json.loads(out.read_text())
    expected_passes = {"grpo": 1, "sfpo": 4, "gxpo": 3}  # SFPO K=3 -> K+1; GXPO: two fast steps + corrective
    for algo, r in result["algos"].items():
        assert r["passes_per_step"] == r["rule_passes_per_step"] == expected_passes[algo], algo
        for step in r["steps"]:
            assert sum(step["times"].values()) == pytest.approx(step["step_s"], rel=1e-9, abs=1e-9)
            assert step["times"]["unaccounted"] >= -1e-6 and step["tokens_per_s"] > 0
    ratios = result["ratios"]
    assert set(ratios) == {"gxpo_step / grpo_step", "gxpo_step / (3 x grpo fwd+bwd)",
                           "gxpo bookkeeping / one fwd+bwd", "sfpo_step / gxpo_step"}
    assert ratios["gxpo_step / grpo_step"] > 1.5  # three passes against one
    assert "| gxpo |" in out.with_suffix(".md").read_text()


def test_compare_flags_a_slower_run(kernels_run, tmp_path):
    same = gxpo_bench("compare", str(kernels_run), str(kernels_run))
    assert "| 1.00 |" in same.stdout and "slower" not in same.stdout
    slower = json.loads(kernels_run.read_text())
    for case in slower["cases"]:
        for r in case["rows"]:
            if r["impl"] == "ours" and "median_ms" in r:
                r["median_ms"] *= 2
    path = tmp_path / "slower.json"
    path.write_text(json.dumps(slower))
    proc = gxpo_bench("compare", str(kernels_run), str(path), check=False)
    assert proc.returncode == 1 and proc.stdout.count("(slower)") == 4  # adamw has no "ours" row on CPU


def test_step_packed_vs_padded_ratios(tmp_path):
    out = tmp_path / "p.json"
    gxpo_bench("step", "--fast", "--algo", "grpo", "--pack", "both", "--lengths", "longtail", "--ckpt", "full",
               "--out", str(out))
    result = json.loads(out.read_text())
    packed, padded = result["algos"]["grpo"], result["algos"]["grpo+nopack"]
    assert packed["pack/padding_frac_packed"] == 0 and padded["pack/padding_frac_padded"] > 0.3  # long tail
    assert result["ratios"]["grpo: tokens/s packed / padded"] == pytest.approx(
        packed["tokens_per_s"] / padded["tokens_per_s"])
    assert result["setup"]["ckpt"] == "full" and result["setup"]["lengths"] == "longtail"


def test_step_reports_the_time_zero_advantage_skipping_saves(tmp_path):
    out = tmp_path / "s.json"
    gxpo_bench("step", "--fast", "--algo", "grpo", "--zero-adv-frac", "0.5", "--out", str(out))
    result = json.loads(out.read_text())
    skipping, full = result["algos"]["grpo"], result["algos"]["grpo+noskip"]
    assert 0.3 < skipping["pack/skipped_token_frac"] < 0.7 and full["pack/skipped_token_frac"] == 0
    assert result["ratios"]["grpo: step without / with zero-advantage skipping"] == pytest.approx(
        full["step_ms"] / skipping["step_ms"])


def test_bad_arguments_are_named():
    proc = gxpo_bench("step", "--fast", "--algo", "grpo,ppo", check=False)
    assert proc.returncode != 0 and "['ppo'] not among" in proc.stderr


def test_benchmark_compare_flags_a_regression_in_machine_units(tmp_path):
    """The suites under pytest-benchmark's own --benchmark-compare, timed in machine units (make bench-compare):
    a run against its own saved baseline passes; against a baseline ten times faster it fails."""
    storage = tmp_path / "store"
    pytest_args = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "gxpo_bench/suites/test_kernels.py",
                   "-k", "gxpo_bookkeeping", "--benchmark-timer", "gxpo_bench.suites.timer.machine_units",
                   f"--benchmark-storage=file://{storage}"]

    def run(*extra):
        return subprocess.run([*pytest_args, *extra], cwd=ROOT, env=uninterpreted_env(PYTHONPATH=str(ROOT)),
                              capture_output=True, text=True, timeout=600)

    saved = run("--benchmark-save=base")
    assert saved.returncode == 0, saved.stdout[-3000:] + saved.stderr[-3000:]
    baseline = next(storage.rglob("0001_base.json"))
    assert run("--benchmark-compare=0001", "--benchmark-compare-fail=median:400%").returncode == 0
    doc = json.loads(baseline.read_text())
    assert {b["extra_info"]["impl"] for b in doc["benchmarks"]} == {"ours", "per_tensor"}
    for b in doc["benchmarks"]:
        for key in ("min", "max", "mean", "median", "q1", "q3"):
            b["stats"][key] /= 10
    baseline.write_text(json.dumps(doc))
    slower = run("--benchmark-compare=0001", "--benchmark-compare-fail=median:100%")
    assert slower.returncode != 0 and "Performance has regressed" in slower.stdout + slower.stderr

"""gxpo-bench study: the analysis on hand-made curves, and the --fast study end to end on the tiny model."""

import json
import subprocess
import sys

import pytest
from helpers import uninterpreted_env

from gxpo_bench import cli, study


def _pts(accs, passes_per_step, seconds_per_step=1.0, every=2):
    return [{"step": s, "backward_passes": s * passes_per_step, "train_s": s * seconds_per_step, "acc": a}
            for s, a in zip(range(every, every * (len(accs) + 1), every), accs, strict=True)]


def test_analysis_by_hand():
    curves = {
        "grpo": {0: _pts([0.2, 0.4, 0.3], 1), 1: _pts([0.2, 0.6, 0.5], 1)},  # mean 0.2, 0.5, 0.4: target 0.5
        "gxpo-final": {0: _pts([0.5, 0.7, 0.7], 3, 2.0), 1: _pts([0.3, 0.4, 0.45], 3, 2.0)},
    }
    a = study.analyse(curves)
    assert a["target"] == pytest.approx(0.5) and a["target_step"] == 4
    assert a["budgets"] == [2, 3, 6]  # GRPO's final 6 passes x (1/4, 1/2, 1), rounded
    g = a["rules"]["grpo"]
    assert (g["reached"], g["runs"]) == (1, 2)  # seed 0 peaks at 0.4 < 0.5
    assert g["to_target_step"] == (4, 0.0) and g["to_target_backward_passes"] == (4, 0.0)
    x = a["rules"]["gxpo-final"]
    assert (x["reached"], x["runs"]) == (1, 2)
    assert x["to_target_step"] == (2, 0.0) and x["to_target_backward_passes"] == (6, 0.0)
    assert x["to_target_train_s"] == (4.0, 0.0)
    assert x["acc_at_passes"]["2"] == (None, None)  # GXPO's first evaluation is at 6 passes
    assert x["acc_at_passes"]["6"][0] == pytest.approx(0.4)
    assert g["acc_at_passes"]["3"][0] == pytest.approx(0.2)
    assert g["peak_acc"][0] == pytest.approx(0.5) and g["final_acc"][0] == pytest.approx(0.4)
    with pytest.raises(ValueError, match="baseline"):
        study.analyse({"gxpo-final": curves["gxpo-final"]})


def test_curve_leaves_out_eval_and_checkpoint_time():
    rows = [{"step": 1, "backward_passes": 3, "time/step": 5.0, "time/eval": 2.0},
            {"step": 2, "backward_passes": 6, "time/step": 4.0, "time/checkpoint": 1.5, "eval/pass@1": 0.25}]
    assert study._curve(rows) == [{"step": 2, "backward_passes": 6, "train_s": 5.5, "acc": 0.25}]


def _study_cli(args):
    """As a user runs it: its own process (gxpo-bench drops TRITON_INTERPRET, this process keeps it)."""
    env = uninterpreted_env()
    done = subprocess.run([sys.executable, "-m", "gxpo_bench.cli", *args], env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stderr


def test_fast_study_end_to_end_and_resume(tmp_path):
    runs, out = tmp_path / "runs", tmp_path / "study.json"
    args = ["study", "--fast", "--seeds", "0,1", "--rules", "grpo,gxpo-final", "--runs", str(runs), "--out", str(out)]
    _study_cli(args)
    result = json.loads(out.read_text())
    assert set(result["analysis"]["rules"]) == {"grpo", "gxpo-final"}
    for rule in ("grpo", "gxpo-final"):
        for seed in ("0", "1"):
            assert [p["step"] for p in result["curves"][rule][seed]] == [1, 2]  # eval every step
    assert out.with_suffix(".png").stat().st_size > 0
    assert "| grpo |" in out.with_suffix(".md").read_text()
    assert _study_cli(args).count("done, kept") == 4  # finished runs are kept, not retrained


def test_bad_arguments():
    with pytest.raises(SystemExit, match="--rules"):
        cli.main(["study", "--fast", "--rules", "gxpo-final", "--report-only"])
    with pytest.raises(SystemExit, match="--rules"):
        cli.main(["study", "--fast", "--rules", "grpo,ppo", "--report-only"])
    with pytest.raises(SystemExit, match="--seeds"):
        cli.main(["study", "--fast", "--seeds", "a,b", "--report-only"])

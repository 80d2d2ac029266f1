"""gxpo-report: the figure and the speedup table from metrics.jsonl files."""

import json

import pytest

from trainer.report import main, speedup_table


def write_run(path, accuracies, seconds_per_step, passes_per_step):
    path.mkdir(parents=True)
    rows = [{"step": i + 1, "accuracy": a, "reward_mean": a, "wall_time_s": seconds_per_step * (i + 1),
             "backward_passes": passes_per_step * (i + 1)} for i, a in enumerate(accuracies)]
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {r["step"]: r for r in rows}


def test_speedup_table_against_the_baseline_peak(tmp_path):
    grpo = write_run(tmp_path / "grpo", [0.1, 0.2, 0.3, 0.4], 10.0, 1)
    gxpo = write_run(tmp_path / "gxpo", [0.2, 0.45, 0.5, 0.5], 25.0, 3)
    table = speedup_table({"grpo": list(grpo.values()), "gxpo": list(gxpo.values())})
    assert "peak accuracy = 0.400" in table
    assert "| gxpo | 2 | 50.0 | 6 | 2.00x / 0.80x / 0.67x |" in table  # 4/2 steps, 40/50 s, 4/6 passes


def test_cli_writes_figure_and_table(tmp_path, capsys):
    write_run(tmp_path / "a", [0.0, 0.5], 1.0, 1)
    write_run(tmp_path / "b", [0.0, 0.1], 1.0, 3)
    main([str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(tmp_path / "rep")])
    assert (tmp_path / "rep" / "report.png").stat().st_size > 1000
    assert "| b | not reached |" in (tmp_path / "rep" / "report.md").read_text()
    with pytest.raises(SystemExit):
        main([str(tmp_path / "missing")])


def test_held_out_benchmarks_get_their_own_row(tmp_path):
    import matplotlib.image

    from trainer.report import eval_keys

    runs = {}
    for name in ("a", "b"):
        rows = list(write_run(tmp_path / name, [0.1, 0.3], 1.0, 1).values())
        for r in rows:
            r.update({"eval/pass@1": 0.2, "eval/math/pass@1": 0.3, "eval/gsm/pass@1": 0.1, "eval/math/pass@4": 0.5})
        (tmp_path / name / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        runs[name] = rows
    assert eval_keys(runs) == ["eval/pass@1", "eval/gsm/pass@1", "eval/math/pass@1"]
    write_run(tmp_path / "c", [0.1, 0.3], 1.0, 1)  # no evaluation logged
    main([str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(tmp_path / "with")])
    main([str(tmp_path / "c"), "--out", str(tmp_path / "without")])
    height = lambda d: matplotlib.image.imread(tmp_path / d / "report.png").shape[0]  # noqa: E731
    assert height("with") > 1.4 * height("without")  # a third row of panels: held-out pass@1

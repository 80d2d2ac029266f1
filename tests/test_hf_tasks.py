"""The hf task: local parquet / JSON / JSONL / CSV files through `datasets` (files the tests write), field
mapping, split, filter, answers from \\boxed{}, bad records, clear errors; and a training run on it."""

import json

import pytest

pytest.importorskip("datasets")

from trainer.config import load_config  # noqa: E402
from trainer.hf_tasks import hf_problems, parse_filter  # noqa: E402

ROWS = [{"problem": "What is 2 + 3?", "solution": "We add: \\boxed{5}.", "level": "Level 3", "n": 5},
        {"problem": "What is 7 * 6?", "solution": "So \\boxed{42}", "level": "Level 1", "n": 42},
        {"problem": "Simplify \\frac{2}{4}.", "solution": "It is \\boxed{\\frac{1}{2}}", "level": "Level 5", "n": 0},
        {"problem": "What is 1 + 1?", "solution": "two, no box", "level": "Level 4", "n": 2}]


def write(tmp_path, kind, rows=ROWS, name="data"):
    path = tmp_path / f"{name}.{kind}"
    if kind == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif kind == "json":
        path.write_text(json.dumps(rows))
    else:
        import pyarrow as pa
        import pyarrow.csv
        import pyarrow.parquet

        table = pa.Table.from_pylist(rows)
        (pyarrow.parquet.write_table if kind == "parquet" else pyarrow.csv.write_csv)(table, str(path))
    return str(path)


@pytest.mark.parametrize("kind", ["parquet", "jsonl", "json", "csv"])
def test_field_mapping_and_boxed_answers(tmp_path, kind):
    messages = []
    problems = hf_problems(write(tmp_path, kind), question_field="problem", answer_field="solution",
                           answer_from="boxed", log=messages.append)
    assert [(p.question, p.answer) for p in problems] == [
        ("What is 2 + 3?", "5"), ("What is 7 * 6?", "42"), ("Simplify \\frac{2}{4}.", "\\frac{1}{2}")]
    assert len(messages) == 1 and "row 3" in messages[0] and "boxed" in messages[0]


def test_filter_split_numbers_and_directories(tmp_path):
    (tmp_path / "d").mkdir()
    write(tmp_path / "d", "parquet", ROWS[:2], name="part0")
    write(tmp_path / "d", "parquet", ROWS[2:], name="part1")
    problems = hf_problems(str(tmp_path / "d"), split="test", question_field="problem", answer_field="n",
                           filter_spec="level=Level 3, Level 4,Level 5")
    assert [(p.question, p.answer) for p in problems] == [("What is 2 + 3?", "5"), ("Simplify \\frac{2}{4}.", "0"),
                                                          ("What is 1 + 1?", "2")]


def test_bad_records_and_errors_name_what_is_wrong(tmp_path):
    path = write(tmp_path, "jsonl")
    with pytest.raises(ValueError, match="row 3"):
        hf_problems(path, question_field="problem", answer_field="solution", answer_from="boxed",
                    on_bad_record="error")
    with pytest.raises(ValueError, match=r"task.question_field = 'question' is not a column.*'problem'"):
        hf_problems(path)
    with pytest.raises(ValueError, match="task.filter"):
        hf_problems(path, question_field="problem", answer_field="n", filter_spec="grade=A")
    with pytest.raises(ValueError, match="no usable records after task.filter"):
        hf_problems(path, question_field="problem", answer_field="n", filter_spec="level=Level 9")
    with pytest.raises(ValueError, match="no such local file"):
        hf_problems(str(tmp_path / "missing" / "data.parquet"))
    with pytest.raises(ValueError, match="field=value1"):
        parse_filter("level")


@pytest.mark.parametrize("key,value", [("task.name", "hf"), ("task.answer_from", "solution"),
                                       ("task.filter", "=x")])
def test_config_names_the_key(key, value):
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        load_config(overrides=[(key, value)])


def test_local_files_need_held_out_files_to_evaluate(tmp_path):
    train_path = write(tmp_path, "jsonl")
    with pytest.raises(ValueError, match=r"eval\.path.*training rows"):
        load_config(overrides=[("task.name", "hf"), ("task.dataset", train_path), ("eval.every", "5")])
    assert load_config(overrides=[("task.name", "hf"), ("task.dataset", "org/some-dataset"),
                                  ("eval.every", "5")]).eval.path == ""  # a hub id: its test split


def test_trains_and_evaluates_on_local_files(tmp_path, monkeypatch):
    from test_trainer import read_metrics, tiny_cfg

    from gxpo_kernels import backend
    from trainer.train import train

    monkeypatch.setattr(backend, "use_triton", lambda t: t.is_cuda)  # the CPU path a user runs

    train_path, test_path = write(tmp_path, "parquet", name="train"), write(tmp_path, "jsonl", ROWS[:2], name="test")
    cfg = tiny_cfg(tmp_path, "grpo", steps=2, **{"task.name": "hf", "task.dataset": train_path,
                                                 "task.question_field": "problem", "task.answer_field": "solution",
                                                 "task.answer_from": "boxed", "eval.every": 1,
                                                 "eval.path": test_path, "eval.split": "train",
                                                 "eval.num_problems": 2, "eval.n_samples": 2, "eval.k": 2})
    train(cfg, log=lambda *_: None)
    rows = read_metrics(cfg.out)
    assert [r["step"] for r in rows] == [1, 2] and all("eval/pass@1" in r for r in rows)


def test_hashes_answers(tmp_path):
    rows = [{"question": "Sam has 1,200 apples...", "answer": "He has 1200.\n#### 1,200"},
            {"question": "No final line", "answer": "forty"}]
    problems = hf_problems(write(tmp_path, "jsonl", rows), answer_from="hashes", log=lambda *_: None)
    assert [(p.question, p.answer) for p in problems] == [("Sam has 1,200 apples...", "1200")]


def _bench_toml(tmp_path, entries):
    lines = ['model = "tiny-random"', "[eval]", "every = 1"]
    for e in entries:
        lines += ["[[eval.benchmarks]]"] + [f"{k} = {json.dumps(v)}" for k, v in e.items()]
    path = tmp_path / "bench.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_benchmarks_config_round_trips_and_names_bad_keys(tmp_path):
    from trainer.config import to_toml

    cfg = load_config(_bench_toml(tmp_path, [{"name": "a", "path": "x.jsonl"},
                                             {"name": "b", "path": "y.parquet", "answer_from": "boxed"}]))
    assert cfg.eval.benchmarks[0] == {"name": "a", "path": "x.jsonl", "split": "test", "question_field": "question",
                                      "answer_field": "answer", "answer_from": "field", "filter": "",
                                      "num_problems": 0}
    (tmp_path / "again.toml").write_text(to_toml(cfg))
    assert load_config(tmp_path / "again.toml").eval.benchmarks == cfg.eval.benchmarks
    for entries, message in (([{"name": "a", "path": "x", "fields": 1}], r"eval\.benchmarks\[0\]'?: unknown keys"),
                             ([{"name": "a"}], r"eval\.benchmarks\[0\]\.path"),
                             ([{"name": "a", "path": "x"}, {"name": "a", "path": "y"}], "unique"),
                             ([{"name": "a", "path": "x", "answer_from": "last"}], r"\[0\]\.answer_from")):
        with pytest.raises(ValueError, match=message):
            load_config(_bench_toml(tmp_path, entries))
    with pytest.raises(ValueError, match="TOML"):
        load_config(overrides=[("eval.benchmarks", "a=x.jsonl")])


def test_trains_with_several_benchmarks(tmp_path, monkeypatch):
    from test_trainer import read_metrics, tiny_cfg

    import trainer.train as train_module
    from gxpo_kernels import backend
    from trainer.config import resolve_benchmark

    monkeypatch.setattr(backend, "use_triton", lambda t: t.is_cuda)
    temperatures = []
    import trainer.evaluate as evaluate_module
    evaluate = evaluate_module.evaluate
    monkeypatch.setattr(evaluate_module, "evaluate", lambda *a, **k: temperatures.append(a[-1]) or evaluate(*a, **k))
    a, b = write(tmp_path, "jsonl", ROWS[:2], name="a"), write(tmp_path, "parquet", ROWS, name="b")
    benches = [{"name": "easy", "path": a, "question_field": "problem", "answer_field": "n"},
               {"name": "math", "path": b, "question_field": "problem", "answer_field": "solution",
                "answer_from": "boxed", "num_problems": 2}]
    cfg = tiny_cfg(tmp_path, "grpo", steps=1, **{"eval.every": 1, "eval.n_samples": 2, "eval.k": 2,
                                                 "eval.temperature": 1.0})
    cfg.eval.benchmarks = [resolve_benchmark(i, b) for i, b in enumerate(benches)]  # as load_config does
    train_module.train(cfg, log=lambda *_: None)
    (row,) = read_metrics(cfg.out)
    for name in ("easy", "math"):
        assert 0 <= row[f"eval/{name}/pass@1"] <= row[f"eval/{name}/pass@2"] <= 1
    assert row["eval/pass@1"] == pytest.approx((row["eval/easy/pass@1"] + row["eval/math/pass@1"]) / 2)
    assert temperatures == [1.0, 1.0]

"""Which problems a run sees: each step's prompts (a pure function of seed and step, so a resumed run
sees the same data) and the held-out sets evaluation samples."""

import random

from .config import TrainConfig
from .hf_tasks import hf_problems
from .tasks import arithmetic_problems, jsonl_problems


def problems_for_step(cfg: TrainConfig, step: int, dataset):
    """The step's prompts; a pure function of (seed, step), so a resumed run sees the same data."""
    n = cfg.rollout.num_prompts
    if dataset is None:
        stream = arithmetic_problems(cfg.seed * 1_000_003 + step, cfg.task.difficulty)
        return [next(stream) for _ in range(n)]
    order = random.Random(cfg.seed + step // max(1, len(dataset) // n)).sample(range(len(dataset)), len(dataset))
    start = (step * n) % len(dataset)
    return [dataset[order[(start + i) % len(dataset)]] for i in range(n)]


def dataset_problems(spec: dict, on_bad_record: str, log) -> list:
    """The problems of one Hugging Face dataset spec (the keys of config.BENCHMARK_KEYS but name)."""
    return hf_problems(spec["path"], spec["split"], spec["question_field"], spec["answer_field"],
                       spec["answer_from"], spec["filter"], on_bad_record, log)


def task_problems(task, log, path=None, split=None):
    """The dataset of a jsonl or hf task (None for arithmetic, which is generated per step); path and split
    replace the task's own (its held-out data)."""
    if task.name == "jsonl":
        return jsonl_problems(path or task.path, task.on_bad_record, log)
    if task.name == "hf":
        spec = {"path": path or task.dataset, "split": split or task.split, "question_field": task.question_field,
                "answer_field": task.answer_field, "answer_from": task.answer_from, "filter": task.filter}
        return dataset_problems(spec, task.on_bad_record, log)
    return None


def held_out_problems(cfg: TrainConfig, log):
    """Evaluation problems: arithmetic from seeds no training step uses, or the held-out file / dataset."""
    if cfg.task.name != "arithmetic":
        return task_problems(cfg.task, log, cfg.eval.path or None, cfg.eval.split)[:cfg.eval.num_problems]
    stream = arithmetic_problems(2**40 + cfg.seed, cfg.task.difficulty)  # training seeds stay far below
    return [next(stream) for _ in range(cfg.eval.num_problems)]


def held_out_sets(cfg: TrainConfig, log) -> dict:
    """{name: problems}: each of eval.benchmarks, or the task's held-out problems under the name ""."""
    if not cfg.eval.benchmarks:
        return {"": held_out_problems(cfg, log)}
    sets = {}
    for b in cfg.eval.benchmarks:
        problems = dataset_problems(b, cfg.task.on_bad_record, log)
        sets[b["name"]] = problems[:b["num_problems"]] if b["num_problems"] else problems
    return sets

"""Problems from a Hugging Face dataset: a hub id (for users with a network) or local parquet / JSON /
JSONL / CSV files (a file, a glob or a directory), read through `datasets`, with a field mapping for the
question and the answer, a split, an optional filter (e.g. MATH levels 3-5) and, for solution fields, the
answer taken from the last \\boxed{}."""

import glob
import os

from .tasks import BOXED, Problem

BUILDERS = {".parquet": "parquet", ".json": "json", ".jsonl": "json", ".csv": "csv"}
ANSWER_FROM = ("field", "boxed", "hashes")  # the field as it is, its last \boxed{}, or what follows its last
# "####" (GSM8K's worked answers)


def parse_filter(spec: str) -> tuple | None:
    """"field=a,b,c" -> (field, {"a", "b", "c"}); "" -> None."""
    if not spec:
        return None
    field, sep, values = spec.partition("=")
    allowed = {v.strip() for v in values.split(",") if v.strip()}
    if not sep or not field.strip() or not allowed:
        raise ValueError(f"task.filter must look like 'field=value1,value2' (e.g. 'level=Level 3,Level 4'), "
                         f"got {spec!r}")
    return field.strip(), allowed


def _local_files(spec: str) -> list:
    if os.path.isdir(spec):
        return sorted(f for f in glob.glob(os.path.join(spec, "**", "*"), recursive=True)
                      if os.path.splitext(f)[1] in BUILDERS)
    return sorted(glob.glob(spec)) if any(c in spec for c in "*?[") else ([spec] if os.path.exists(spec) else [])


def _looks_local(spec: str) -> bool:
    return spec.startswith(("/", ".", "~")) or os.path.splitext(spec)[1] in BUILDERS or any(c in spec for c in "*?[")


def is_local(spec: str) -> bool:
    """spec names local files (existing ones, or a path that can only be one) rather than a hub id."""
    return bool(_local_files(spec)) or _looks_local(spec)


def load_records(spec: str, split: str):
    """The dataset's rows: local files by their extension, otherwise `spec` as a hub id."""
    from datasets import load_dataset

    files = _local_files(spec)
    if files:
        kinds = {BUILDERS.get(os.path.splitext(f)[1]) for f in files}
        if None in kinds or len(kinds) > 1:
            raise ValueError(f"task.dataset {spec!r}: local files must all be one of {sorted(BUILDERS)}, got "
                             f"{sorted(os.path.basename(f) for f in files)[:5]}")
        return load_dataset(kinds.pop(), data_files={split: files}, split=split)
    if _looks_local(spec):
        raise ValueError(f"task.dataset {spec!r}: no such local file or directory")
    return load_dataset(spec, split=split)


def hf_problems(spec: str, split: str = "train", question_field: str = "question", answer_field: str = "answer",
                answer_from: str = "field", filter_spec: str = "", on_bad_record: str = "skip", log=print) -> list:
    if answer_from not in ANSWER_FROM:
        raise ValueError(f"task.answer_from must be one of {ANSWER_FROM}, got {answer_from!r}")
    keep = parse_filter(filter_spec)
    records = load_records(spec, split)
    columns = set(records.column_names)
    for key, field in (("task.question_field", question_field), ("task.answer_field", answer_field),
                       *((("task.filter", keep[0]),) if keep else ())):
        if field not in columns:
            raise ValueError(f"{key} = {field!r} is not a column of {spec!r} (split {split!r}); its columns: "
                             f"{sorted(columns)}")
    problems = []
    for i, row in enumerate(records):
        if keep and str(row[keep[0]]) not in keep[1]:
            continue
        question, answer = row[question_field], row[answer_field]
        if answer_from == "boxed" and isinstance(answer, str):
            boxed = BOXED.findall(answer)
            answer = boxed[-1].strip() if boxed else None
        elif answer_from == "hashes" and isinstance(answer, str):
            answer = answer.rpartition("####")[2].strip().replace(",", "") if "####" in answer else None
        if isinstance(question, str) and question.strip() and isinstance(answer, (str, int, float)) \
                and not isinstance(answer, bool):
            problems.append(Problem(question, str(answer)))
            continue
        why = {"boxed": ", no \\boxed{} in it", "hashes": ", no #### in it"}.get(answer_from, "")
        message = f"{spec} [{split}] row {i}: no usable question / answer ({question_field!r}, {answer_field!r}{why})"
        if on_bad_record == "error":
            raise ValueError(message)
        log(f"skipping {message}")
    if not problems:
        raise ValueError(f"{spec} [{split}]: no usable records" + (f" after task.filter {filter_spec!r}" if keep
                                                                  else ""))
    return problems

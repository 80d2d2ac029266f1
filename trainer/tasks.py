"""Verifiable tasks: a seeded arithmetic generator (no download) and JSONL question/answer files,
answer extraction from model outputs, and rewards (math-verify when installed, exact match otherwise)."""

import json
import random
import re
from dataclasses import dataclass


@dataclass(frozen=True)
class Problem:
    question: str
    answer: str


def arithmetic_problems(seed: int, difficulty: int = 1):
    """Endless seeded stream of integer arithmetic problems. Difficulty 0: a + b with single digits;
    d >= 1: d + 1 operands with up to d + 1 digits, '+', '-' and (d >= 2) '*'."""
    if difficulty < 0:
        raise ValueError(f"task.difficulty must be >= 0, got {difficulty}")
    rng = random.Random(seed)
    ops = ["+"] if difficulty == 0 else ["+", "-"] + (["*"] if difficulty >= 2 else [])
    hi = 10 ** (difficulty + 1) - 1
    while True:
        terms = [str(rng.randint(0, hi))]
        for _ in range(max(difficulty, 1)):
            terms += [rng.choice(ops), str(rng.randint(0, hi))]
        expr = " ".join(terms)
        yield Problem(f"What is {expr}?", str(eval(expr)))  # noqa: S307 - digits and + - * only


def jsonl_problems(path: str, on_bad_record: str = "skip", log=print):
    """Problems from a JSONL file of {"question": str, "answer": str|number}; malformed lines are
    reported with their line number, then skipped or (on_bad_record="error") raised."""
    problems = []
    with open(path) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                question, answer = record["question"], record["answer"]
                if not isinstance(question, str) or not isinstance(answer, (str, int, float)):
                    raise TypeError("question must be a string and answer a string or number")
                problems.append(Problem(question, str(answer)))
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                message = f"{path}:{lineno}: malformed record ({type(e).__name__}: {e})"
                if on_bad_record == "error":
                    raise ValueError(message) from None
                log(f"skipping {message}")
    if not problems:
        raise ValueError(f"{path}: no usable records")
    return problems


BOXED = re.compile(r"\\boxed\{((?:[^{}]|\{[^{}]*\})*)\}")
_NUMBER = re.compile(r"-?\d+(?:,\d{3})*(?:\.\d+)?")


def extract_answer(text: str) -> str | None:
    """The last \\boxed{...} content, else the last number in the text, else None."""
    boxed = BOXED.findall(text)
    if boxed:
        return boxed[-1].strip()
    numbers = _NUMBER.findall(text)
    return numbers[-1].replace(",", "") if numbers else None


def _exact(pred: str, gold: str) -> bool:
    try:
        return float(pred.replace(",", "")) == float(gold.replace(",", ""))
    except ValueError:
        return pred.strip() == gold.strip()


def make_reward(kind: str = "math-verify", format_weight: float = 0.0):
    """reward(completion_text, gold_answer): 1.0 for a correct answer, plus format_weight when the answer
    is given in \\boxed{} (so accuracy is still reward >= 1 for format_weight < 1)."""
    correctness = _correctness(kind)
    if format_weight == 0.0:
        return correctness
    return lambda text, gold: correctness(text, gold) + format_weight * float(bool(BOXED.search(text)))


def _correctness(kind: str):
    verify = None
    if kind == "math-verify":
        try:
            from math_verify import parse
            from math_verify import verify as mv_verify

            verify = lambda pred, gold: bool(mv_verify(parse(f"${gold}$"), parse(f"${pred}$")))  # noqa: E731
        except ImportError:
            verify = None

    def reward(text: str, gold: str) -> float:
        pred = extract_answer(text)
        if pred is None:
            return 0.0
        if _exact(pred, gold):
            return 1.0
        if verify is not None:
            try:
                return float(verify(pred, gold))
            except Exception:  # math-verify raises on unparsable input; that is a wrong answer
                return 0.0
        return 0.0

    return reward

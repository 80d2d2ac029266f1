"""Task generation, answer extraction, rewards, JSONL loading, advantages."""

import json

import pytest
import torch

from trainer.advantages import group_normalized
from trainer.tasks import arithmetic_problems, extract_answer, jsonl_problems, make_reward


def test_arithmetic_answers_are_exact_and_seeded():
    problems = [p for _, p in zip(range(50), arithmetic_problems(seed=3, difficulty=2), strict=False)]
    for p in problems:
        expr = p.question.removeprefix("What is ").removesuffix("?")
        assert int(p.answer) == eval(expr)  # noqa: S307
        assert "*" in expr or "+" in expr or "-" in expr
    again = [p for _, p in zip(range(50), arithmetic_problems(seed=3, difficulty=2), strict=False)]
    assert problems == again
    with pytest.raises(ValueError, match="difficulty"):
        next(arithmetic_problems(0, difficulty=-1))


@pytest.mark.parametrize("text,expected", [
    ("so the answer is \\boxed{47}.", "47"),
    ("\\boxed{1} then \\boxed{\\frac{3}{4}}", "\\frac{3}{4}"),
    ("12 + 35 = 47", "47"),
    ("it is 1,234 apples", "1234"),
    ("-18", "-18"),
    ("no idea", None),
    ("\\boxed{unclosed", None),
    ("", None),
])
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


@pytest.mark.parametrize("kind", ["math-verify", "exact"])
def test_reward(kind):
    reward = make_reward(kind)
    assert reward("\\boxed{47}", "47") == 1.0
    assert reward("47.0", "47") == 1.0
    assert reward("\\boxed{46}", "47") == 0.0
    assert reward("garbage }{ \\boxed{", "47") == 0.0
    assert reward("", "47") == 0.0


def test_format_reward_bonus():
    reward = make_reward("exact", format_weight=0.2)
    assert reward("\\boxed{47}", "47") == pytest.approx(1.2)
    assert reward("\\boxed{46}", "47") == pytest.approx(0.2)
    assert reward("47", "47") == 1.0 and reward("46", "47") == 0.0


def test_jsonl_reports_bad_records_by_line(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join([json.dumps({"question": "1+1?", "answer": 2}), "{not json",
                               json.dumps({"question": "no answer"}), json.dumps({"question": 3, "answer": "x"}),
                               json.dumps({"question": "2+2?", "answer": "4"})]) + "\n")
    messages = []
    problems = jsonl_problems(str(path), "skip", log=messages.append)
    assert [p.answer for p in problems] == ["2", "4"]
    assert [m.split(":")[1] for m in messages] == ["2", "3", "4"]  # line numbers
    with pytest.raises(ValueError, match=":2: malformed record"):
        jsonl_problems(str(path), "error")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("{}\n")
    with pytest.raises(ValueError, match="no usable records"):
        jsonl_problems(str(empty), "skip", log=lambda m: None)


def test_group_normalized_advantages():
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0], [1.0, 1.0, 1.0, 1.0]])
    adv, stats = group_normalized(rewards)
    std = torch.tensor([1.0, 0.0, 0.0, 1.0]).std()
    assert torch.allclose(adv[:4], (rewards[0] - 0.5) / (std + 1e-6))
    assert torch.equal(adv[4:], torch.zeros(4)) and stats["zero_variance_groups"] == 1
    adv_no_std, _ = group_normalized(rewards, scale_by_std=False)
    assert torch.allclose(adv_no_std[:4], rewards[0] - 0.5)
    with pytest.raises(ValueError, match="NaN"):
        group_normalized(torch.tensor([[1.0, float("nan")]]))

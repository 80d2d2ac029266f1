"""XRPO in-context seeding (Bamba et al. 2025, arXiv 2510.06672): a prompt whose rollouts all failed gets up to
`max_exemplars` verified-correct solutions of other training problems as few-shot turns before its own
question. The corpus grows with every correct training rollout. Similarity is pluggable; the default is
lexical (cosine of word-count vectors), which needs no download (the paper used a large embedding
model). Exemplar solutions longer than `max_chars` are cut there. A problem never gets its own solution."""

import json
import math
import re
from collections import Counter

WORD = re.compile(r"[A-Za-z]+|\d+|[^\sA-Za-z\d]")


def lexical_similarity(a: str, b: str) -> float:
    """Cosine of word-count vectors (numbers and symbols are words too)."""
    ca, cb = Counter(WORD.findall(a.lower())), Counter(WORD.findall(b.lower()))
    dot = sum(v * cb[k] for k, v in ca.items())
    norm = math.sqrt(sum(v * v for v in ca.values()) * sum(v * v for v in cb.values()))
    return dot / norm if norm else 0.0


class SolutionCorpus:
    """Verified-correct (question, solution) pairs, one solution kept per question (the first)."""

    def __init__(self, similarity=lexical_similarity, max_size: int = 10_000):
        self.similarity, self.max_size = similarity, max_size
        self.solutions = {}

    def __len__(self):
        return len(self.solutions)

    def add(self, question: str, solution: str):
        if question not in self.solutions and len(self.solutions) < self.max_size:
            self.solutions[question] = solution

    def exemplars(self, question: str, k: int, max_chars: int) -> list:
        """Up to k (question, solution) pairs of other questions, most similar first."""
        others = [(q, s) for q, s in self.solutions.items() if q != question]
        others.sort(key=lambda qs: -self.similarity(question, qs[0]))
        return [(q, s[:max_chars]) for q, s in others[:k]]

    def state_dict(self) -> dict:  # one string: a checkpoint loads into a template of the same keys
        return {"solutions_json": json.dumps(self.solutions)}

    def load_state_dict(self, state: dict):
        self.solutions = json.loads(state["solutions_json"]) if state["solutions_json"] else {}


def all_failed(rewards: list, seed_when: str = "zero_reward") -> bool:
    """A prompt to seed: rollouts so far and none rewarded (the paper: best reward 0); "below_one": none
    fully correct (differs under partial or format rewards)."""
    if not rewards:
        return False
    return max(rewards) < 1 if seed_when == "below_one" else max(rewards) <= 0

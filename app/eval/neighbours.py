"""What an edit must leave alone, built from the data itself, and CounterFact's own scores.

Two hard-negative probe sets per run, whatever the data file:

* **other subject** - each edit prompt with its subject replaced by the subject of a
  record that is not edited (same question, another entity);
* **same subject** - another record's prompt, asking something else (its template
  shares under 30 % of its words with the edit's), with that record's subject
  replaced by the edit's subject (another question about the same entity).

Neither has a known answer, so each is scored by how often a routing method sends it
to any edit. A record without a subject written in its prompt gives no probes.

CounterFact scores compare the mean log-probability per answer token of the new
object and of the true one: efficacy and paraphrase count prompts where the new
object wins, neighbourhood counts neighbour prompts where the true object still wins.
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from dataclasses import dataclass

from app.eval.datasets import EditRecord
from app.eval.selection import edit_id

# Templates sharing more of their words than this may ask the same question.
_SAME_QUESTION_OVERLAP = 0.3


@dataclass
class Probes:
    other_subject: list[tuple[str, str]]  # (edit id probed, prompt)
    same_subject: list[tuple[str, str]]

    def upto(self, ids: set[str]) -> Probes:
        """The probes of the given edits only (those applied by a checkpoint)."""
        return Probes([p for p in self.other_subject if p[0] in ids], [p for p in self.same_subject if p[0] in ids])


def build_probes(edited: Sequence[EditRecord], others: Sequence[EditRecord], seed: int) -> Probes:
    rng = random.Random(f"probes:{seed}")
    named = [r for r in edited if _names_subject(r)]
    spare = [r for r in others if _names_subject(r)] or named
    other_subject, same_subject = [], []
    for r in named:
        assert r.subject is not None
        replaced = _replace(r.prompt, r.subject, rng.choice(spare).subject or "")
        if replaced:
            other_subject.append((edit_id(r), replaced))
        asks_else = [o for o in rng.sample(spare, min(20, len(spare))) if _overlap(r, o) < _SAME_QUESTION_OVERLAP]
        if asks_else:
            o = asks_else[0]
            replaced = _replace(o.prompt, o.subject or "", r.subject)
            if replaced:
                same_subject.append((edit_id(r), replaced))
    return Probes(other_subject, same_subject)


def _names_subject(r: EditRecord) -> bool:
    return bool(r.subject and r.subject.strip() and r.subject.casefold() in r.prompt.casefold())


def _replace(prompt: str, old: str, new: str) -> str | None:
    if not new.strip() or old.casefold() == new.casefold():
        return None
    return re.compile(re.escape(old), re.IGNORECASE).sub(lambda _: new, prompt)


def _template_words(r: EditRecord) -> set[str]:
    text = re.compile(re.escape(r.subject or ""), re.IGNORECASE).sub(" ", r.prompt)
    return set(re.findall(r"\w+", text.casefold()))


def _overlap(a: EditRecord, b: EditRecord) -> float:
    x, y = _template_words(a), _template_words(b)
    return len(x & y) / max(1, len(x | y))


def answer_logprob(logprobs: Sequence[float]) -> float:
    """Mean log-probability of an answer's tokens, the end-of-turn token left out."""
    tokens = list(logprobs[:-1]) or list(logprobs)
    return sum(tokens) / len(tokens)


def prefers(first: Sequence[float], second: Sequence[float]) -> bool:
    """Whether the answer scored ``first`` is more likely than the one scored ``second``."""
    return answer_logprob(first) > answer_logprob(second)

"""Hard negatives made for one edit: its neighbours, which must keep the base model's answer.

An edit has two kinds of neighbour, and each factor of its neuron is trained
against one kind:

* the same question about another subject ("Which company developed Android?"
  after an edit of the iPhone's developer): the edit prompt with its subject
  replaced by other entities, negatives of the subject factor;
* another question about the same subject ("Who founded Globex?" after an edit
  of Globex's chief executive): the relation factor reads the question with its
  subject left out, so generic questions about generic entities stand for these,
  negatives of every edit's relation factor.

The fillers (``entities.txt``, ``relations.txt``) are fixed, generic lists that
ship with the package, as is ``rephrasings.txt`` (one question in several wordings per
group), from which the relation keys learn what a rewording changes.
"""

from __future__ import annotations

import functools
import random
import re
from collections.abc import Sequence
from importlib import resources

from app.scen.prompts import PromptTokens


@functools.cache
def _lines(name: str) -> tuple[str, ...]:
    text = resources.files("app.scen").joinpath(name).read_text(encoding="utf-8")
    return tuple(line.strip() for line in text.splitlines() if line.strip())


@functools.cache
def _blocks(name: str) -> tuple[tuple[str, ...], ...]:
    return split_blocks(resources.files("app.scen").joinpath(name).read_text(encoding="utf-8"))


def split_blocks(text: str) -> tuple[tuple[str, ...], ...]:
    """The text's groups of lines, groups separated by blank lines."""
    blocks = (tuple(line.strip() for line in block.splitlines() if line.strip()) for block in text.split("\n\n"))
    return tuple(b for b in blocks if b)


def pool_prompts() -> list[str]:
    """Ordinary prompts no edit may fire on."""
    return list(_lines("pool.txt"))


def other_subjects(prompt: str, subject: str, n: int, rng: random.Random) -> list[str]:
    """``prompt`` with every occurrence of ``subject`` replaced by another entity, ``n`` times."""
    names = [e for e in _lines("entities.txt") if e.casefold() != subject.casefold()]
    pattern = re.compile(re.escape(subject), re.IGNORECASE)
    # Names are inserted literally: a replacement string would read backslashes as escapes.
    return [pattern.sub(_literal(name), prompt) for name in rng.sample(names, min(n, len(names)))]


def _literal(text: str):
    return lambda _match: text


# Words that start a question or a sentence in capitals without naming anything.
_OPENERS = frozenset(
    "what which who whom whose where when why how the a an in on of is was did does do are to for by at from "
    "this that these those it he she they".split()
)


def generic_questions(per_template: int = 3) -> list[tuple[str, str]]:
    """Every template of ``relations.txt`` about a few fixed entities: (question, entity)."""
    entities = _lines("entities.txt")
    step = max(1, len(entities) // per_template)
    return [(t.format(e), e) for t in _lines("relations.txt") for e in entities[::step][:per_template]]


def question_templates() -> tuple[tuple[str, ...], ...]:
    """Every generic question template, its wordings together: each line of ``relations.txt``
    alone, then each group of ``rephrasings.txt``."""
    return tuple((t,) for t in _lines("relations.txt")) + _blocks("rephrasings.txt")


def rephrasing_groups(
    per_group: int = 3, wordings: Sequence[Sequence[str]] | None = None
) -> list[list[tuple[str, str]]]:
    """Groups of one question in several wordings (``rephrasings.txt``, or ``wordings``), each
    group asked about ``per_group`` fixed entities in turn: [(question, entity), ...] per group
    and entity."""
    entities = _lines("entities.txt")
    step = max(1, len(entities) // per_group)
    groups = []
    for g, group in enumerate(_blocks("rephrasings.txt") if wordings is None else wordings):
        for j in range(per_group):
            entity = entities[(g + j * step) % len(entities)]
            groups.append([(t.format(entity), entity) for t in group])
    return groups


def _without_full_stop(text: str, start: int, end: int) -> tuple[int, int, bool]:
    """A word's span less a point that ends its sentence ("... about Globex Corporation. Who"),
    and whether it did: the point is kept in abbreviations ("U.S.") and after an initial or a
    title ("B.", "Dr.")."""
    word = text[start:end]
    bare = word.rstrip(".")
    if bare and bare != word and "." not in bare and not re.fullmatch(r"[A-Z][a-z]?", bare):
        return start, start + len(bare), True
    return start, end, False


def infer_subject(tokens: PromptTokens, novelty: list[float]) -> tuple[int, str]:
    """The subject of a prompt that does not name it: (its last token's index, its text).

    The longest run of capitalised words (a name: "Christiaan Snouck Hurgronje",
    "the iPhone" gives "iPhone"), the later one on a tie. A prompt without one (all
    lower case) takes the word of its most novel token: the one least like any token
    of the ordinary prompts, ``novelty`` per token. On the development data the
    capitalised run ends where the given subject ends for 83 % (ZsRE) and 87 %
    (CounterFact) of the prompts.
    """
    text = tokens.text
    found = [_without_full_stop(text, m.start(), m.end()) for m in re.finditer(r"[\w'.&-]+", text)]
    runs: list[list[tuple[int, int]]] = [[]]
    for start, end, stop in found:
        word = text[start:end]
        named = word[0].isdigit() or any(ch.isupper() for ch in word)  # "iPhone", "eBay" count too
        if named and (runs[-1] or word.casefold() not in _OPENERS):
            runs[-1].append((start, end))
            if stop:  # a name ends with its sentence
                runs.append([])
        elif runs[-1]:
            runs.append([])
    words = [(start, end) for start, end, _ in found]
    runs = [r for r in runs if r]
    content = [i for i, c in enumerate(tokens.content) if c]
    if runs:
        run = max(runs, key=lambda r: (r[-1][1] - r[0][0], r[0][0]))
        start, end = run[0][0], run[-1][1]
    else:
        best = max(content, key=lambda i: novelty[i])
        a, b = tokens.spans[best]
        start, end = next(((s, e) for s, e in words if s < b and e > a), (a, b))
    inside = [i for i in content if tokens.spans[i][0] < end and tokens.spans[i][1] > start]
    return inside[-1], text[start:end]

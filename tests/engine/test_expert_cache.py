"""Live experts held within a memory budget: the least recently used go out and come back
on demand, and routing answers exactly as with every expert resident."""

from __future__ import annotations

import logging

import pytest
import torch

from app.scen import Editor, TrainedEdit, load_edit, save_edit
from app.scen.expert_cache import ExpertCache, ExpertUnavailableError, expert_bytes
from app.scen.experts import Expert, FullExpert
from tests.engine.test_editor import CFG, UNRELATED
from tests.utils.tiny_models import tiny_model

EDITS = [
    ("What is the capital of France?", "Rome"),
    ("Who wrote Hamlet?", "Dickens"),
    ("How many legs does a spider have?", "Six"),
    ("Which river flows through Cairo?", "Thames"),
    ("What does the quick brown fox jump over?", "A cat"),
]


def small(value: float) -> FullExpert:
    expert = FullExpert(2, 4)
    expert.delta.data.fill_(value)
    return expert


def test_least_recently_used_goes_out_first_and_comes_back_on_demand():
    stored = {key: small(i) for i, key in enumerate("abcd")}
    loaded: list[str] = []

    def load(key: str) -> Expert:
        loaded.append(key)
        return small(float("abcd".index(key)))

    size = expert_bytes(stored["a"])
    cache = ExpertCache(budget_bytes=2 * size, load=load)
    for key in "abc":
        cache.put(key, stored[key])
    assert [k for k in "abcd" if cache.resident(k)] == ["b", "c"]  # a, the oldest, went out

    assert cache.get("b") is stored["b"]  # a hit: b is now the most recently used
    cache.put("d", stored["d"])
    assert [k for k in "abcd" if cache.resident(k)] == ["b", "d"]  # c went, not b

    a = cache.get("a")  # not resident: loaded, and the least recently used (b) goes
    assert loaded == ["a"] and a is not None and torch.equal(a.delta, stored["a"].delta)
    assert [k for k in "abcd" if cache.resident(k)] == ["a", "d"]
    assert cache.stats().hits == 1 and cache.stats().loads == 1 and cache.stats().evictions == 3
    assert cache.stats().resident == 2 and cache.stats().resident_bytes == 2 * size

    cache.drop("d")  # no longer live: gone, resident or not, and never loaded again
    assert not cache.resident("d") and "d" not in cache and cache.stats().resident_bytes == size
    with pytest.raises(KeyError):
        cache.get("d")


def test_without_a_loader_nothing_goes_out():
    cache = ExpertCache(budget_bytes=1)
    experts = [small(i) for i in range(3)]
    for i, expert in enumerate(experts):
        cache.put(str(i), expert)
    assert all(cache.resident(str(i)) for i in range(3)) and cache.stats().evictions == 0


def test_a_failed_load_is_logged_once_and_not_retried_until_put_back(caplog):
    calls = []

    def load(key: str) -> Expert:
        calls.append(key)
        raise OSError(f"{key}.safetensors: no such file")

    cache = ExpertCache(budget_bytes=expert_bytes(small(0)), load=load)
    cache.put("a", small(0))
    cache.put("b", small(1))  # a goes out
    with caplog.at_level(logging.ERROR, logger="app.scen.expert_cache"):
        assert cache.get("a") is None and cache.get("a") is None
    assert calls == ["a"] and cache.stats().load_failures == 1
    assert [r.levelno for r in caplog.records] == [logging.ERROR] and "a.safetensors" in caplog.records[0].getMessage()
    cache.put("a", small(0))
    assert cache.get("a") is not None


# ---- the editor -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[dict[str, TrainedEdit], dict[str, str], object]:
    """Five edits trained one after another on a tiny model, saved as files."""
    folder = tmp_path_factory.mktemp("experts")
    editor = new_editor()
    edits, digests = {}, {}
    for i, (prompt, target) in enumerate(EDITS):
        edit = editor.train(prompt, target)
        edits[f"e{i}"] = edit
        digests[f"e{i}"] = save_edit(edit, folder / f"e{i}.safetensors")
        editor.add(f"e{i}", edit)
    editor.detach()
    return edits, digests, folder


def new_editor() -> Editor:
    lm = tiny_model()
    return Editor(lm.model, lm.tokenizer, CFG)


def editors(trained, budget_experts: float, load=None) -> tuple[Editor, Editor, list[str]]:
    """An editor with every expert resident and one within a budget of ``budget_experts``
    experts that loads the others from their files (``load`` replaces that); both with the
    same edits live."""
    edits, digests, folder = trained
    ids = list(edits)

    def from_file(edit_id: str) -> TrainedEdit:
        return load_edit(folder / f"{edit_id}.safetensors", digests[edit_id])

    unbounded, bounded = new_editor(), new_editor()
    unbounded.sync(ids, from_file)
    size = expert_bytes(edits["e0"].expert)
    bounded.page_experts(int(budget_experts * size), load or (lambda i: from_file(i).expert))
    bounded.sync(ids, from_file)
    return unbounded, bounded, ids


def test_a_budget_of_two_experts_answers_as_every_expert_resident(trained):
    unbounded, bounded, ids = editors(trained, 2.5)
    stats = bounded.expert_cache.stats()
    assert stats.resident == 2 and stats.evictions == 3  # the last two added stay

    prompts = [p for p, _ in EDITS]
    for prompt in [*prompts, *reversed(prompts)]:  # every expert out and back at least once
        want, got = unbounded.generate([prompt], max_new_tokens=6)[0], bounded.generate([prompt], max_new_tokens=6)[0]
        assert got.edit_id == want.edit_id == ids[prompts.index(prompt)]
        assert got.text == want.text and got.activation == want.activation
        assert bounded.expert_cache.stats().resident <= 2
    stats = bounded.expert_cache.stats()
    assert stats.loads >= 5 and stats.hits >= 1 and stats.load_failures == 0
    assert stats.resident_bytes == 2 * expert_bytes(trained[0]["e0"].expert)

    # One batch routed to all five: the experts it needs stay with it for every decode step,
    # whatever the cache lets go meanwhile.
    batch = [*prompts, UNRELATED]
    want, got = unbounded.generate(batch, max_new_tokens=6), bounded.generate(batch, max_new_tokens=6)
    assert [g.edit_id for g in got] == [*ids, None] == [g.edit_id for g in want]
    assert [g.text for g in got] == [g.text for g in want]
    assert [g.text for g in got[:5]] == [t for _, t in EDITS]


def test_removing_an_edit_keeps_slots_and_cached_experts_consistent(trained):
    unbounded, bounded, ids = editors(trained, 2.5)
    for editor in (unbounded, bounded):
        assert editor.remove("e1") and editor.remove("e3")
    prompts = [EDITS[i][0] for i in (0, 2, 4)]
    want, got = unbounded.generate(prompts, max_new_tokens=6), bounded.generate(prompts, max_new_tokens=6)
    assert [g.edit_id for g in got] == ["e0", "e2", "e4"] == [g.edit_id for g in want]
    assert [g.text for g in got] == [g.text for g in want]
    assert len(bounded.expert_cache) == 3 and "e1" not in bounded.expert_cache

    # Editor.get gives the edit whole, its expert loaded again if it is out.
    edit = bounded.get("e0")
    want = trained[0]["e0"].expert.tensors()
    assert all(torch.equal(t, want[name]) for name, t in edit.expert.tensors().items())
    assert torch.equal(edit.keys, trained[0]["e0"].keys)


def test_an_expert_that_cannot_be_loaded_serves_its_prompt_with_the_base_model(trained, caplog):
    edits, _, _ = trained

    def load(edit_id: str) -> Expert:
        if edit_id == "e0":
            raise OSError("e0.safetensors: no such file")
        return edits[edit_id].expert

    _, bounded, _ = editors(trained, 1.5, load)
    base = new_editor()
    prompts = [EDITS[0][0], EDITS[1][0]]
    with caplog.at_level(logging.ERROR, logger="app.scen.expert_cache"):
        got = bounded.generate(prompts, max_new_tokens=6)
        again = bounded.generate(prompts[:1], max_new_tokens=6)
    assert [g.edit_id for g in got] == [None, "e1"] and got[1].text == EDITS[1][1]
    assert got[0].text == again[0].text == base.generate(prompts[:1], max_new_tokens=6)[0].text
    assert got[0].activation > CFG.theta  # its neuron still fired
    assert bounded.expert_cache.stats().load_failures == 1 and len(caplog.records) == 1
    with pytest.raises(ExpertUnavailableError):
        bounded.get("e0")

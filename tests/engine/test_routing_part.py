"""An edit comes live from its routing part; its expert is read when a prompt is routed to it."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from app.live.experts import ExpertFiles
from app.scen import Editor, IntegrityError, ScenConfig, TrainedEdit
from app.scen.expert_cache import NOT_LOADED
from app.scen.store import edit_bytes, load_edit, load_routing, routing_bytes, routing_from_bytes, save_edit
from tests.utils.edit_files import damage_expert
from tests.utils.tiny_models import tiny_model

CFG = ScenConfig(layer=2, expert_lr=1e-2, expert_min_prob=0.0)
PROMPT, TARGET = "Who is the CEO of Acme?", "Jane Doe"


@pytest.fixture(scope="module")
def trained() -> TrainedEdit:
    lm = tiny_model("llama")
    return Editor(lm.model, lm.tokenizer, CFG).train(PROMPT, TARGET, subject="Acme")


def same_routing(a: TrainedEdit, b: TrainedEdit) -> bool:
    return ((a.prompt, a.target, a.rephrases, a.layer, a.subject, a.metrics, a.relation_map)
            == (b.prompt, b.target, b.rephrases, b.layer, b.subject, b.metrics, b.relation_map)
            and torch.equal(a.keys, b.keys) and torch.equal(a.subject_keys, b.subject_keys)
            and torch.equal(a.neuron.relation, b.neuron.relation) and torch.equal(a.neuron.subject, b.neuron.subject)
            and torch.equal(a.neuron.subject_span, b.neuron.subject_span))


def test_an_edit_file_written_before_the_subject_span_was_kept_reads_it_as_unknown(tmp_path, trained):
    assert torch.isclose(trained.neuron.subject_span.norm(), torch.tensor(1.0))
    path = tmp_path / "e.safetensors"
    save_edit(trained, path)
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    data = path.read_bytes()
    tensors = {k: v for k, v in st_load(data).items() if k != "neuron.subject_span"}
    old = st_save(tensors, metadata=meta)
    for edit in (routing_from_bytes(old), routing_from_bytes(routing_bytes(old))):
        assert torch.equal(edit.neuron.subject_span, torch.zeros_like(trained.neuron.subject))
        assert torch.equal(edit.neuron.subject, trained.neuron.subject)


def test_routing_part_reads_without_the_expert(tmp_path, trained):
    path = tmp_path / "e1.safetensors"
    sha = save_edit(trained, path)
    path.write_bytes(damage_expert(path.read_bytes()))
    part = load_routing(path)
    assert part.expert is NOT_LOADED and same_routing(part, trained) and part.relation_map
    # The expert's damage shows once the whole file is read, checked.
    with pytest.raises(IntegrityError, match="sha256 is"):
        load_edit(path, sha)
    data = edit_bytes(trained)
    for source in (data, routing_bytes(data)):
        assert same_routing(routing_from_bytes(source), trained)
    assert len(routing_bytes(data)) < len(data)
    for broken in (routing_bytes(data)[:-100], b"x" * 64):
        with pytest.raises(IntegrityError, match="not a readable edit file"):
            routing_from_bytes(broken)
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[:-100])
    with pytest.raises(IntegrityError, match="truncated"):
        load_routing(cut)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"x" * 64)
    with pytest.raises(IntegrityError):
        load_routing(garbage)
    with pytest.raises(FileNotFoundError):
        load_routing(tmp_path / "missing.safetensors")


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="reads the process's memory maps (Linux)")
def test_a_routing_part_holds_no_memory_map_of_its_file(tmp_path, trained):
    # A live model keeps every edit's routing part: one map per file would run out of maps
    # (vm.max_map_count) long before 100,000 edits.
    path = tmp_path / "e1.safetensors"
    save_edit(trained, path)
    part = load_routing(path)
    assert str(path) not in Path("/proc/self/maps").read_text()
    assert same_routing(part, trained)


def test_an_edit_added_unread_is_served_once_its_expert_loads(tmp_path, trained):
    path = tmp_path / "e1.safetensors"
    sha = save_edit(trained, path)
    reads: list[str] = []

    def load(edit_id: str):
        reads.append(edit_id)
        return load_edit(path, sha).expert

    lm = tiny_model("llama")
    editor = Editor(lm.model, lm.tokenizer, CFG)
    other = tiny_model("llama")
    expected = Editor(other.model, other.tokenizer, CFG)
    expected.add("e1", trained)
    editor.page_experts(None, load)
    editor.add("e1", load_routing(path))
    assert reads == [] and not editor.expert_cache.resident("e1")
    assert editor.routing_part("e1").expert is NOT_LOADED
    [answer] = editor.generate([PROMPT], max_new_tokens=6)
    assert answer.edit_id == "e1" and reads == ["e1"]
    assert answer.text == expected.generate([PROMPT], max_new_tokens=6)[0].text
    # Added again (as a reconcile re-adds edits behind a restored one), a resident expert is kept.
    again = editor.routing_part("e1")
    assert again.expert is not NOT_LOADED
    editor.remove("e1")
    editor.add("e1", again)
    editor.generate([PROMPT], max_new_tokens=2)
    assert reads == ["e1"]


def test_a_damaged_expert_is_refused_at_first_use(tmp_path, trained):
    path = tmp_path / "e1.safetensors"
    sha = save_edit(trained, path)
    path.write_bytes(damage_expert(path.read_bytes()))
    lm = tiny_model("llama")
    editor = Editor(lm.model, lm.tokenizer, CFG)
    base = editor.generate([PROMPT], max_new_tokens=6)[0].text
    editor.page_experts(None, lambda edit_id: load_edit(path, sha).expert)
    editor.add("e1", load_routing(path))
    [answer] = editor.generate([PROMPT], max_new_tokens=6)
    assert answer.edit_id is None and answer.text == base
    assert editor.expert_cache.stats().load_failures == 1


def test_many_routing_parts_are_read_each_under_its_own_reference(tmp_path, trained):
    # A start reads many parts in one call: each part, and each failure, comes back under the
    # reference it was read from.
    files = ExpertFiles(tmp_path)
    refs = []
    for i in range(150):
        edit = dataclasses.replace(trained, prompt=f"{PROMPT} ({i})")
        refs.append(files.save(f"e{i}", edit)[0])
    (tmp_path / refs[7]).unlink()
    (tmp_path / refs[99]).write_bytes(b"x" * 64)
    parts = files.load_routing(refs)
    assert list(parts) == refs
    assert isinstance(parts[refs[7]], FileNotFoundError) and isinstance(parts[refs[99]], IntegrityError)
    for i, ref in enumerate(refs):
        if i not in (7, 99):
            part = parts[ref]
            assert isinstance(part, TrainedEdit) and part.prompt == f"{PROMPT} ({i})" and part.expert is NOT_LOADED

"""The routing table: every live edit's routing part in one file, read instead of each edit's
file when a process starts."""

from __future__ import annotations

import dataclasses
import shutil
from datetime import UTC, datetime, timedelta

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from sqlalchemy import insert

from app.db import edits as repo
from app.db.migrate import upgrade
from app.db.models import Edit
from app.db.session import Database
from app.live.experts import ExpertFiles, ExpertRows, Experts
from app.live.routing_table import NAME, RoutingTable, read_table, write_table
from app.live.sync import LiveSync
from app.scen import Editor, ScenConfig, TrainedEdit
from app.scen.expert_cache import NOT_LOADED
from tests.utils.tiny_models import tiny_model

CFG = ScenConfig(layer=2, expert_lr=1e-2, expert_min_prob=0.0)


@pytest.fixture(scope="module")
def lm():
    return tiny_model("llama")


@pytest.fixture(scope="module")
def trained() -> TrainedEdit:
    lm = tiny_model("llama")
    return Editor(lm.model, lm.tokenizer, CFG).train("Who is the CEO of Acme?", "Jane Doe", subject="Acme",
                                                     rephrases=["Who runs Acme?"])


def variants(trained: TrainedEdit, n: int) -> list[TrainedEdit]:
    """Edits that differ in their texts and tensors, some with fewer key rows."""
    out = []
    for i in range(n):
        out.append(dataclasses.replace(
            trained, prompt=f"Who is the CEO of Acme {i}?", target=f"Jane Doe {i}",
            rephrases=trained.rephrases[: i % 2], keys=trained.keys[: 1 + i % 2] + i,
            subject_keys=trained.subject_keys[: 1 + i % 2] - i, subject=f"Acme {i}",
            neuron=dataclasses.replace(trained.neuron, relation_bias=torch.tensor(float(-i))), metrics={"i": i}))
    return out


def same_part(a: TrainedEdit, b: TrainedEdit) -> bool:
    neurons = all(torch.equal(getattr(a.neuron, f.name), getattr(b.neuron, f.name))
                  for f in dataclasses.fields(a.neuron))
    return (neurons and torch.equal(a.keys, b.keys) and torch.equal(a.subject_keys, b.subject_keys)
            and (a.prompt, a.target, a.rephrases, a.subject, a.layer, a.metrics, a.relation_map)
            == (b.prompt, b.target, b.rephrases, b.subject, b.layer, b.metrics, b.relation_map))


def test_a_table_reads_back_what_was_written(tmp_path, trained):
    edits = variants(trained, 5)
    refs = [f"experts/e{i}.0000000{i}.safetensors" for i in range(5)]
    write_table(tmp_path / NAME, dict(zip(refs, edits)))
    parts = read_table(tmp_path / NAME)
    assert list(parts) == refs
    for ref, edit in zip(refs, edits):
        assert same_part(parts[ref], edit) and parts[ref].expert is NOT_LOADED
    assert not [p for p in tmp_path.iterdir() if p.name != NAME]  # no temporary file left


def test_a_table_written_before_subject_spans_were_kept_reads_them_as_unknown(tmp_path, trained):
    write_table(tmp_path / NAME, {"experts/e.00000001.safetensors": trained})
    with safe_open(str(tmp_path / NAME), framework="pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    del tensors["neuron.subject_span"]
    save_file(tensors, str(tmp_path / NAME), metadata=meta)
    [part] = read_table(tmp_path / NAME).values()
    assert torch.equal(part.neuron.subject_span, torch.zeros_like(trained.neuron.subject))
    assert torch.equal(part.neuron.relation, trained.neuron.relation)


def test_questions_unread_or_missing_from_a_table_read_back_as_unknown(tmp_path, trained):
    assert trained.neuron.question.any()
    unread = dataclasses.replace(trained, neuron=dataclasses.replace(trained.neuron, question=torch.zeros(0)))
    write_table(tmp_path / NAME, {"experts/a.00000001.safetensors": trained, "experts/b.00000002.safetensors": unread})
    read, padded = read_table(tmp_path / NAME).values()
    assert torch.equal(read.neuron.question, trained.neuron.question) and not padded.neuron.question.any()
    with safe_open(str(tmp_path / NAME), framework="pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    del tensors["neuron.question"]
    save_file(tensors, str(tmp_path / NAME), metadata=meta)
    assert all(not p.neuron.question.numel() for p in read_table(tmp_path / NAME).values())


def test_a_start_reads_the_table_and_the_store_only_for_what_it_lacks(tmp_path, lm, trained):
    url = f"sqlite:///{tmp_path / 'scen.db'}"
    upgrade("head", url)
    db = Database(url)
    files = ExpertFiles(tmp_path)
    experts = Experts(files, ExpertRows(db))
    edits = variants(trained, 6)
    ids = [f"{i:032x}" for i in range(6)]

    def activate(i: int) -> None:
        ref, sha = files.save(ids[i], edits[i])
        at = datetime(2026, 1, 1, tzinfo=UTC) + timedelta(seconds=i)
        row = {"id": ids[i], "status": "active", "prompt": edits[i].prompt, "target": edits[i].target,
               "subject": edits[i].subject, "prompt_key": repo.prompt_key(edits[i].prompt),
               "rephrases": list(edits[i].rephrases), "meta": {}, "created_at": at, "updated_at": at,
               "activated_at": at, "attempts": 1, "metrics": edits[i].metrics, "expert_path": ref,
               "expert_sha256": sha}
        with db.session() as session:
            session.execute(insert(Edit), [row])
            session.commit()

    def start(rewrite_after: int | None = 3) -> dict[str, TrainedEdit]:
        """The live edits' routing parts after a start, in live order."""
        table = RoutingTable(tmp_path / NAME, rewrite_after=rewrite_after)
        editor = Editor(lm.model, lm.tokenizer, CFG)
        try:
            LiveSync(editor, db, experts, table).reconcile()
            table.wait()
            return {edit_id: editor.routing_part(edit_id) for edit_id in editor.edit_ids}
        finally:
            editor.detach()

    for i in range(5):
        activate(i)
    assert list(start()) == ids[:5]
    assert (tmp_path / NAME).exists()  # five read from the store: worth a table

    # With the expert files out of the way, only the table can bring the edits live.
    shutil.move(tmp_path / "experts", tmp_path / "away")
    live = start()
    assert list(live) == ids[:5]
    for i in range(5):
        assert same_part(live[ids[i]], edits[i])
    shutil.move(tmp_path / "away", tmp_path / "experts")

    # An edit activated since is read from its file; one read is not worth a new table.
    activate(5)
    written = (tmp_path / NAME).stat().st_mtime_ns
    live = start()
    assert list(live) == ids and same_part(live[ids[5]], edits[5])
    assert (tmp_path / NAME).stat().st_mtime_ns == written

    # A damaged table is passed over: every part comes from the store.
    (tmp_path / NAME).write_bytes(b"not a table")
    assert list(start(rewrite_after=None)) == ids
    assert (tmp_path / NAME).read_bytes() == b"not a table"  # None: this process never writes one
    db.close()

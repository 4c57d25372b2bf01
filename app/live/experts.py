"""Where trained experts are kept: files under the data directory, or rows of the SQL database.

A stored expert is the bytes of one edit file (``app.scen.store``: expert, neuron and keys). The
edit's row records a reference to them and their sha256. A reference is either a path relative
to the data directory (``experts/ID.XXXXXXXX.safetensors``, always under ``experts/``) or ``db:``
and the id of a ``stored_experts`` row. Loading goes by the reference's form, whatever
``SCEN_EXPERT_STORE`` says now, so a deployment that switches store keeps serving the edits
saved under the other one.

A live model reads every live edit's routing part when it brings the edit live
(``load_routing``): a file's routing tensors alone, or a row's ``routing`` column. The expert
is read, and the whole entry checked against its sha256, only when ``load`` is called: when a
prompt is first routed to the edit.
"""

from __future__ import annotations

import hashlib
import logging
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

from app.db import edits as repo
from app.db.session import Database
from app.scen import IntegrityError, ScenError, TrainedEdit
from app.scen.store import (
    edit_bytes,
    edit_from_bytes,
    load_edit,
    load_routing,
    routing_bytes,
    routing_from_bytes,
    write_atomic,
)
from app.settings import Settings

log = logging.getLogger(__name__)

# Cannot begin a file reference: those are always under experts/.
ROW_PREFIX = "db:"


def is_row(ref: str) -> bool:
    return ref.startswith(ROW_PREFIX)


class ExpertStore(Protocol):
    """One place experts are kept. Every attempt at an edit gets a reference of its own: a worker
    presumed dead may still finish, and must not overwrite what another worker committed."""

    def save(self, edit_id: str, trained: TrainedEdit) -> tuple[str, str]:
        """Keep a trained edit whole or not at all; returns (reference, sha256)."""
        ...

    def save_bytes(self, edit_id: str, data: bytes) -> tuple[str, str]:
        """Keep the bytes of an edit file unchanged (an import); returns (reference, sha256)."""
        ...

    def read_bytes(self, ref: str) -> bytes:
        """The bytes kept under ``ref``, unchecked. Raises OSError or ScenError when there are none."""
        ...

    def load(self, ref: str, sha256: str | None) -> TrainedEdit:
        """Raises IntegrityError when the bytes are not those whose sha256 was recorded."""
        ...

    def load_routing(self, refs: Sequence[str]) -> dict[str, TrainedEdit | Exception]:
        """The routing part of each entry (its expert ``NotLoaded``), unchecked by sha256, or
        why it cannot be read (OSError, ScenError)."""
        ...

    def readable(self, ref: str, sha256: str | None) -> bool:
        """Whether ``ref`` is there, whole (its sha256 the recorded one) and loads."""
        ...

    def discard(self, ref: str) -> None: ...

    def discard_all(self, edit_id: str) -> None:
        """Remove everything kept for an edit that will never be served (it failed)."""
        ...

    def discard_others(self, edit_id: str, keep: str) -> None:
        """Remove what earlier attempts at this edit left (a worker that died after saving)."""
        ...


class ExpertFiles:
    """One safetensors file per attempt. Paths recorded in the database are relative to
    ``data_dir``, so the folder can move.

    ``create``: make the folder at once, so that a data directory new experts cannot be written
    to fails at start; off where files are only read (``SCEN_EXPERT_STORE=database``).
    """

    def __init__(self, data_dir: Path, create: bool = True):
        self.data_dir = Path(data_dir)
        self.root = self.data_dir / "experts"
        if create:
            self.root.mkdir(parents=True, exist_ok=True)

    def save(self, edit_id: str, trained: TrainedEdit) -> tuple[str, str]:
        return self.save_bytes(edit_id, edit_bytes(trained))

    def save_bytes(self, edit_id: str, data: bytes) -> tuple[str, str]:
        """Written atomically (temp file, fsync, rename) to a name no other attempt uses."""
        relative = f"experts/{edit_id}.{uuid.uuid4().hex[:8]}.safetensors"
        write_atomic(self.data_dir / relative, data)
        return relative, hashlib.sha256(data).hexdigest()

    def read_bytes(self, ref: str) -> bytes:
        return (self.data_dir / ref).read_bytes()

    def load(self, ref: str, sha256: str | None) -> TrainedEdit:
        return load_edit(self.data_dir / ref, sha256)

    def load_routing(self, refs: Sequence[str]) -> dict[str, TrainedEdit | Exception]:
        parts: dict[str, TrainedEdit | Exception] = {}
        for ref in refs:
            try:
                parts[ref] = load_routing(self.data_dir / ref)
            except (OSError, ScenError) as exc:
                parts[ref] = exc
        return parts

    def readable(self, ref: str, sha256: str | None) -> bool:
        try:
            self.load(ref, sha256)
        except Exception:
            return False
        return True

    def discard(self, ref: str) -> None:
        (self.data_dir / ref).unlink(missing_ok=True)

    def discard_all(self, edit_id: str) -> None:
        for path in self.root.glob(f"{edit_id}.*.safetensors"):
            log.info("removing expert file %s of a failed edit", path)
            path.unlink(missing_ok=True)

    def discard_others(self, edit_id: str, keep: str) -> None:
        for path in self.root.glob(f"{edit_id}.*.safetensors"):
            if path.name != Path(keep).name:
                log.info("removing stale expert file %s", path)
                path.unlink(missing_ok=True)


class ExpertRows:
    """One ``stored_experts`` row per attempt, inserted in a transaction of its own: replicas and
    workers on different machines share nothing but the database."""

    def __init__(self, db: Database):
        self.db = db

    def save(self, edit_id: str, trained: TrainedEdit) -> tuple[str, str]:
        return self.save_bytes(edit_id, edit_bytes(trained))

    def save_bytes(self, edit_id: str, data: bytes) -> tuple[str, str]:
        sha = hashlib.sha256(data).hexdigest()
        # An edit file that does not parse is refused when it loads, as before: it has no routing part.
        try:
            routing: bytes | None = routing_bytes(data)
        except ScenError:
            routing = None
        with self.db.session() as session:
            expert_id = repo.store_expert(session, edit_id, data, sha, routing)
        return f"{ROW_PREFIX}{expert_id}", sha

    def _row(self, ref: str) -> tuple[bytes, str]:
        found = None
        if is_row(ref):
            with self.db.session() as session:
                found = repo.stored_expert_data(session, ref.removeprefix(ROW_PREFIX))
        if found is None:
            raise IntegrityError(f"{ref}: no such expert in the database")
        return found

    def read_bytes(self, ref: str) -> bytes:
        return self._row(ref)[0]

    def load(self, ref: str, sha256: str | None) -> TrainedEdit:
        data, recorded = self._row(ref)
        return edit_from_bytes(data, sha256 if sha256 is not None else recorded, name=ref)

    def load_routing(self, refs: Sequence[str]) -> dict[str, TrainedEdit | Exception]:
        """Read with one query per few hundred rows: a start with many live edits issues no
        query per edit."""
        ids = {ref: ref.removeprefix(ROW_PREFIX) for ref in refs if is_row(ref)}
        with self.db.session() as session:
            found = repo.stored_routing(session, list(ids.values()))
        parts: dict[str, TrainedEdit | Exception] = {}
        for ref in refs:
            data = found.get(ids.get(ref, ""))
            try:
                if data is None:
                    raise IntegrityError(f"{ref}: no such expert in the database")
                parts[ref] = routing_from_bytes(data, name=ref)
            except ScenError as exc:
                parts[ref] = exc
        return parts

    def readable(self, ref: str, sha256: str | None) -> bool:
        # A database that cannot be reached is not an unreadable expert: that error goes up.
        try:
            self.load(ref, sha256)
        except (OSError, ScenError):
            return False
        return True

    def discard(self, ref: str) -> None:
        if is_row(ref):
            with self.db.session() as session:
                repo.delete_stored_expert(session, ref.removeprefix(ROW_PREFIX))

    def discard_all(self, edit_id: str) -> None:
        with self.db.session() as session:
            removed = repo.delete_stored_experts(session, edit_id)
        if removed:
            log.info("removed %d stored experts of failed edit %s", len(removed), edit_id)

    def discard_others(self, edit_id: str, keep: str) -> None:
        keep_id = keep.removeprefix(ROW_PREFIX) if is_row(keep) else None
        with self.db.session() as session:
            removed = repo.delete_stored_experts(session, edit_id, keep=keep_id)
        if removed:
            log.info("removed %d stale stored experts of edit %s", len(removed), edit_id)


class Experts:
    """The experts of one process: new ones go to the configured store; a recorded reference is
    read from the store its form names.

    Files are always readable here, rows whenever the database is: an operator may switch
    ``SCEN_EXPERT_STORE`` without losing live edits. Cleaning up after attempts touches the rows
    only when they are the store in use, so the files store issues no query of its own.
    """

    def __init__(self, files: ExpertFiles, rows: ExpertRows, use: str = "files"):
        self.files = files
        self.rows = rows
        self.use = use
        self._writes: ExpertStore = rows if use == "database" else files

    @property
    def data_dir(self) -> Path:
        return self.files.data_dir

    def _store(self, ref: str) -> ExpertStore:
        return self.rows if is_row(ref) else self.files

    def save(self, edit_id: str, trained: TrainedEdit) -> tuple[str, str]:
        return self._writes.save(edit_id, trained)

    def save_bytes(self, edit_id: str, data: bytes) -> tuple[str, str]:
        return self._writes.save_bytes(edit_id, data)

    def read_bytes(self, ref: str) -> bytes:
        return self._store(ref).read_bytes(ref)

    def load(self, ref: str, sha256: str | None) -> TrainedEdit:
        return self._store(ref).load(ref, sha256)

    def load_routing(self, refs: Sequence[str]) -> dict[str, TrainedEdit | Exception]:
        rows = [ref for ref in refs if is_row(ref)]
        parts = self.rows.load_routing(rows) if rows else {}
        return parts | self.files.load_routing([ref for ref in refs if not is_row(ref)])

    def readable(self, ref: str, sha256: str | None) -> bool:
        return self._store(ref).readable(ref, sha256)

    def discard(self, ref: str) -> None:
        self._store(ref).discard(ref)

    def discard_all(self, edit_id: str) -> None:
        self.files.discard_all(edit_id)
        if self.use == "database":
            self.rows.discard_all(edit_id)

    def discard_others(self, edit_id: str, keep: str) -> None:
        self.files.discard_others(edit_id, keep)
        if self.use == "database":
            self.rows.discard_others(edit_id, keep)


def open_experts(settings: Settings, db: Database) -> Experts:
    """The expert store ``settings.expert_store`` names, able to read the other one too."""
    use = settings.expert_store
    return Experts(ExpertFiles(settings.data_dir, create=use == "files"), ExpertRows(db), use)

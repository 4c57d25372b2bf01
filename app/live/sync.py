"""Keeping an editor's live edits equal to the database's set of active edits."""

from __future__ import annotations

import logging
import threading

from app.db import edits as repo
from app.db.session import Database
from app.live.experts import Experts
from app.live.routing_table import RoutingTable
from app.scen import Editor, ScenError, TrainedEdit, UnknownEditError
from app.scen.experts import Expert

log = logging.getLogger(__name__)


class LiveSync:
    """Reconciles an editor with the database.

    All changes to the live set go through ``reconcile``, which reads the database
    while holding one lock: whatever commit came last, the reconcile that follows it
    sees it, so a rollback racing an activation cannot leave a stale edit live.

    An edit comes live from its routing part alone (neuron, keys, metadata): its expert is
    read, and checked against its sha256, by ``load_expert`` when a prompt is first routed to
    it, so a start with many live edits reads little of each. ``load_expert`` is also the
    editor's way back to an expert its cache let go. When that load fails while serving, the
    edit is reported unserved at once; the next reconcile reads its entry again whole and either
    hands the editor the expert or, as at start-up, takes the edit out of the live set until the
    entry reads again. An edit whose expert once failed is read whole (checked) whenever it comes
    live again, so a bad expert does not come back on the strength of its routing part.
    """

    def __init__(self, editor: Editor, db: Database, experts: Experts, table: RoutingTable | None = None):
        self.editor = editor
        self.db = db
        self.experts = experts
        # Routing parts of many edits at once, for the first reconcile (start-up); None: every
        # part is read from the store.
        self.table = table
        self._lock = threading.Lock()
        self._broken: set[tuple[str, str | None]] = set()  # (id, sha) whose file failed to load, logged once
        self._unserved: dict[str, str] = {}
        self._stored: dict[str, tuple[str, str | None]] = {}  # live id -> (expert path, sha256), as last read
        # Edits whose expert failed to load while serving, with the reason; written under the
        # editor's lock (a forward pass), so never under ``_lock``: a reconcile holds it while
        # it waits for the editor's.
        self._failed_lock = threading.Lock()
        self._failed: dict[str, str] = {}
        if editor.expert_cache.load is None:
            # Experts come live unread: without a loader they could never be served.
            editor.page_experts(None, self.load_expert)

    @property
    def unserved(self) -> dict[str, str]:
        """Active edits this editor cannot serve (their expert file is missing or unreadable),
        with the reason. Each reconcile tries their files again, so a restored file serves."""
        with self._failed_lock:
            return {**self._unserved, **self._failed}

    def load_expert(self, edit_id: str) -> Expert:
        """A live edit's expert read again from the store (the editor's cache let it go)."""
        stored = self._stored.get(edit_id)
        if stored is None:
            raise UnknownEditError(edit_id)
        path, sha = stored
        try:
            return self.experts.load(path, sha).expert
        except Exception as exc:
            with self._failed_lock:
                self._failed[edit_id] = self._reason(exc)
            # The editor logs this failure; the reconcile that tries the file again need not.
            self._broken.add((edit_id, sha))
            raise

    def reconcile(self, trained: dict[str, TrainedEdit] | None = None) -> tuple[list[str], list[str]]:
        """Make the live set equal the active edits, in activation order (oldest first);
        ``trained`` supplies just-trained edits unread."""
        trained = trained or {}
        with self._lock:
            with self.db.session() as session:
                records = repo.live_records(session)
            self._stored = {rec.id: (rec.expert_path, rec.expert_sha256) for rec in records}
            with self._failed_lock:
                failed, self._failed = self._failed, {}
            current = set(self.editor.edit_ids)
            refits = self.editor.refits
            loaded: dict[str, TrainedEdit] = {}
            wanted: list[str] = []
            unserved: dict[str, str] = {}
            refound: dict[str, TrainedEdit] = {}  # live, their expert failed to load while serving, read now
            read, from_store = self._read(
                [rec for rec in records if (rec.id not in current or rec.id in failed) and rec.id not in trained],
                failed)
            for rec in records:
                if rec.id not in current or rec.id in failed:
                    edit = trained.get(rec.id) or self._loaded(rec, read[rec.id], unserved)
                    if edit is None:
                        continue
                    (refound if rec.id in current else loaded)[rec.id] = edit
                wanted.append(rec.id)
            behind = self._behind(wanted, current)
            if behind:
                # The editor records an edit's overrides against the edits live when it is added,
                # and appends: an edit coming back (its superseding edit rolled back) behind newer
                # live ones would lose their overrides of it. Those newer ones go out and come in
                # again after it. Generations in between see them missing for a moment.
                for edit_id in behind:
                    try:
                        loaded[edit_id] = refound.get(edit_id) or self.editor.routing_part(edit_id)
                    except ScenError as exc:  # its expert was paged out and does not load
                        wanted.remove(edit_id)
                        unserved[edit_id] = self._reason(exc)
                self.editor.sync([i for i in self.editor.edit_ids if i not in behind], loaded.__getitem__)
            added, removed = self.editor.sync(wanted, loaded.__getitem__)
            for edit_id, edit in refound.items():
                if edit_id not in loaded:
                    self.editor.provide_expert(edit_id, edit.expert)
            self._unserved = unserved
            if self.table is not None:
                # Parts refit under this deployment's relation map are worth a table of their own,
                # as parts read from the store are: the next start then refits nothing.
                self.table.keep(self._live_parts, from_store + self.editor.refits - refits)
        if behind:
            log.info("re-added %d live edits after the edits restored before them", len(behind))
        if added or removed:
            log.info("live model v%d: +%d -%d edits (%d live)", self.editor.version, len(added), len(removed),
                     len(self.editor.edit_ids))
        return added, removed

    @staticmethod
    def _behind(wanted: list[str], current: set[str]) -> set[str]:
        """Live edits that ``wanted`` orders after an edit about to be added."""
        first_new = next((i for i, edit_id in enumerate(wanted) if edit_id not in current), len(wanted))
        return {edit_id for edit_id in wanted[first_new:] if edit_id in current}

    def _read(
        self, records: list[repo.LiveRecord], failed: dict[str, str]
    ) -> tuple[dict[str, TrainedEdit | Exception], int]:
        """Each edit's routing part, by id, whole and checked where its expert failed before;
        and how many were read from the store rather than the routing table."""
        whole = {rec.id for rec in records if rec.id in failed or (rec.id, rec.expert_sha256) in self._broken}
        refs = [rec.expert_path for rec in records if rec.id not in whole]
        parts: dict[str, TrainedEdit | Exception] = {}
        if self.table is not None and refs:
            parts.update(self.table.take(refs))
        missing = [ref for ref in refs if ref not in parts]
        parts.update(self.experts.load_routing(missing))
        read: dict[str, TrainedEdit | Exception] = {}
        for rec in records:
            if rec.id not in whole:
                read[rec.id] = parts[rec.expert_path]
                continue
            try:
                read[rec.id] = self.experts.load(rec.expert_path, rec.expert_sha256)
            except (OSError, ScenError) as exc:
                read[rec.id] = exc
        return read, len(missing)

    def _live_parts(self) -> dict[str, TrainedEdit]:
        """Every live edit's routing part, by its expert reference."""
        parts = {}
        for edit_id in self.editor.edit_ids:
            stored = self._stored.get(edit_id)
            if stored is not None:
                parts[stored[0]] = self.editor.routing_part(edit_id)
        return parts

    def _loaded(
        self, rec: repo.LiveRecord, read: TrainedEdit | Exception, unserved: dict[str, str]
    ) -> TrainedEdit | None:
        if not isinstance(read, Exception):
            return read
        unserved[rec.id] = self._reason(read)
        if (rec.id, rec.expert_sha256) not in self._broken:
            self._broken.add((rec.id, rec.expert_sha256))
            log.error("edit %s is active but its expert cannot be loaded: %s", rec.id, read)
        return None

    def _reason(self, exc: Exception) -> str:
        # Clients see the reason: paths relative to the data directory, as the database has them.
        reason = str(exc).replace(f"{self.experts.data_dir}/", "")
        return f"active but not served: its expert file cannot be loaded ({reason})"

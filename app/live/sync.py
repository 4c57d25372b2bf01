"""Keeping an editor's live edits equal to the database's set of active edits."""

from __future__ import annotations

import logging
import threading

from app.db import edits as repo
from app.db.session import Database
from app.live.experts import Experts
from app.scen import Editor, ScenError, TrainedEdit

log = logging.getLogger(__name__)


class LiveSync:
    """Reconciles an editor with the database.

    All changes to the live set go through ``reconcile``, which reads the database
    while holding one lock: whatever commit came last, the reconcile that follows it
    sees it, so a rollback racing an activation cannot leave a stale edit live.
    """

    def __init__(self, editor: Editor, db: Database, experts: Experts):
        self.editor = editor
        self.db = db
        self.experts = experts
        self._lock = threading.Lock()
        self._broken: set[tuple[str, str | None]] = set()  # (id, sha) whose file failed to load, logged once
        self._unserved: dict[str, str] = {}

    @property
    def unserved(self) -> dict[str, str]:
        """Active edits this editor cannot serve (their expert file is missing or unreadable),
        with the reason. Each reconcile tries their files again, so a restored file serves."""
        return dict(self._unserved)

    def reconcile(self, trained: dict[str, TrainedEdit] | None = None) -> tuple[list[str], list[str]]:
        """Make the live set equal the active edits, in activation order (oldest first);
        ``trained`` supplies just-trained edits unread."""
        trained = trained or {}
        with self._lock:
            with self.db.session() as session:
                records = repo.live_records(session)
            current = set(self.editor.edit_ids)
            loaded: dict[str, TrainedEdit] = {}
            wanted: list[str] = []
            unserved: dict[str, str] = {}
            for rec in records:
                if rec.id not in current:
                    edit = trained.get(rec.id) or self._load(rec, unserved)
                    if edit is None:
                        continue
                    loaded[rec.id] = edit
                wanted.append(rec.id)
            behind = self._behind(wanted, current)
            if behind:
                # The editor records an edit's overrides against the edits live when it is added,
                # and appends: an edit coming back (its superseding edit rolled back) behind newer
                # live ones would lose their overrides of it. Those newer ones go out and come in
                # again after it. Generations in between see them missing for a moment.
                for edit_id in behind:
                    loaded[edit_id] = self.editor.get(edit_id)
                self.editor.sync([i for i in self.editor.edit_ids if i not in behind], loaded.__getitem__)
            added, removed = self.editor.sync(wanted, loaded.__getitem__)
            self._unserved = unserved
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

    def _load(self, rec: repo.LiveRecord, unserved: dict[str, str]) -> TrainedEdit | None:
        try:
            return self.experts.load(rec.expert_path, rec.expert_sha256)
        except (OSError, ScenError) as exc:
            # Clients see the reason: paths relative to the data directory, as the database has them.
            reason = str(exc).replace(f"{self.experts.data_dir}/", "")
            unserved[rec.id] = f"active but not served: its expert file cannot be loaded ({reason})"
            if (rec.id, rec.expert_sha256) not in self._broken:
                self._broken.add((rec.id, rec.expert_sha256))
                log.error("edit %s is active but its expert cannot be loaded: %s", rec.id, exc)
            return None

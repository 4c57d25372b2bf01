"""The edits resource: posting (check, record, queue), reading, listing and rolling back."""

from __future__ import annotations

import logging

from sqlalchemy.orm import Session

from app.api.schemas import EditCreate, EditPublic, EditsPublic
from app.api.service import Service
from app.db import edits as repo
from app.db.models import Edit, EditStatus
from app.queue import EditChanged, QueueUnavailable

log = logging.getLogger(__name__)


class EditService:
    def __init__(self, service: Service, session: Session):
        self.service = service
        self.session = session

    def create(self, body: EditCreate, idempotency_key: str | None) -> tuple[EditPublic, bool]:
        """Returns (edit, created); a replayed Idempotency-Key returns the earlier edit.

        Raises ``DuplicateEdit`` when a waiting or active edit already makes the same change."""
        # Refuse untrainable edits before anything is written.
        self.service.check_edit(body.prompt, body.target, body.rephrases, body.subject)
        edit, created = repo.create_edit(self.session, body.prompt, body.target, body.rephrases, body.metadata,
                                         idempotency_key, subject=body.subject)
        if created:
            self._enqueue(edit.id)
        return self._public(edit), created

    def _enqueue(self, edit_id: str) -> None:
        try:
            self.service.queue.enqueue(edit_id)
        except QueueUnavailable:
            # Nothing may remain of a rejected request.
            repo.delete_edit(self.session, edit_id)
            raise
        self.service.metrics.edits_created.inc()
        log.info("edit %s queued", edit_id)

    def get(self, edit_id: str) -> EditPublic:
        return self._public(repo.get_edit(self.session, edit_id))

    def search(self, status: EditStatus | None, q: str | None, limit: int, offset: int) -> EditsPublic:
        items, total = repo.list_edits(self.session, status, q, limit, offset)
        live_ids, unserved = self.service.live_ids(), self.service.unserved()
        return EditsPublic(items=[EditPublic.of(e, live_ids, unserved) for e in items], total=total)

    def rollback(self, edit_id: str) -> EditPublic:
        """Roll back; the edits it had superseded serve again."""
        result = repo.rollback(self.session, edit_id)
        if result.changed:
            log.info("edit %s rolled back%s", edit_id,
                     f"; active again: {', '.join(result.restored)}" if result.restored else "")
            # This process routes as the database says before answering; the others follow the events.
            self.service.reconcile()
            self.service.queue.publish(EditChanged(edit_id, EditStatus.rolled_back).to_dict())
            for restored in result.restored:
                self.service.queue.publish(EditChanged(restored, EditStatus.active).to_dict())
        return self._public(result.edit)

    def _public(self, edit: Edit) -> EditPublic:
        return EditPublic.of(edit, self.service.live_ids(), self.service.unserved())

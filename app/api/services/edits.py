"""The edits resource: posting (check, record, queue), reading, listing, rolling back and restoring.
Every change is recorded in the edit's events with the caller's ``Audit``."""

from __future__ import annotations

import logging

from sqlalchemy.orm import Session

from app.api.schemas import (
    EditBatchPublic,
    EditCreate,
    EditEventPublic,
    EditEventsPublic,
    EditPublic,
    EditsPublic,
)
from app.api.service import Service
from app.db import edits as repo
from app.db.edits import Audit, EditFilter, ItemRefused, NewEdit
from app.db.models import Edit, EditStatus
from app.queue import EditChanged, QueueUnavailable
from app.scen import InvalidEditError

log = logging.getLogger(__name__)


class EditService:
    def __init__(self, service: Service, session: Session):
        self.service = service
        self.session = session

    def create(self, body: EditCreate, idempotency_key: str | None, audit: Audit) -> tuple[EditPublic, bool]:
        """Returns (edit, created); a replayed Idempotency-Key returns the earlier edit.

        Raises ``DuplicateEdit`` when a waiting or active edit already makes the same change."""
        # Refuse untrainable edits before anything is written.
        self.service.check_edit(body.prompt, body.target, body.rephrases, body.subject)
        edit, created = repo.create_edit(self.session, body.prompt, body.target, body.rephrases, body.metadata,
                                         idempotency_key, subject=body.subject, audit=audit)
        if created:
            self._enqueue(edit.id)
        return self._public(edit), created

    def create_batch(self, items: list[EditCreate], idempotency_key: str | None, audit: Audit
                     ) -> tuple[EditBatchPublic, bool]:
        """Every item checked, then all recorded in one transaction and queued in order, or none:
        ``ItemRefused`` names the first item refused. Returns (edits, created)."""
        for index, body in enumerate(items):
            try:
                self.service.check_edit(body.prompt, body.target, body.rephrases, body.subject)
            except InvalidEditError as exc:
                raise ItemRefused(index, exc) from None
        news = [NewEdit(b.prompt, b.target, b.rephrases, b.metadata, b.subject) for b in items]
        edits, created = repo.create_edits(self.session, news, idempotency_key, audit=audit)
        ids = [e.id for e in edits]
        if created:
            try:
                for edit_id in ids:
                    self.service.queue.enqueue(edit_id)
            except QueueUnavailable:
                # Messages already sent find no edit and are dropped by the worker.
                repo.delete_edits(self.session, ids)
                raise
            self.service.metrics.edits_created.inc(len(ids))
            log.info("batch of %d edits queued: %s", len(ids), ", ".join(ids))
        return EditBatchPublic(ids=ids, items=[self._public(e) for e in edits]), created

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

    def search(self, where: EditFilter, limit: int, offset: int) -> EditsPublic:
        items, total = repo.list_edits(self.session, where, limit, offset)
        live_ids, unserved = self.service.live_ids(), self.service.unserved()
        return EditsPublic(items=[EditPublic.of(e, live_ids, unserved) for e in items], total=total)

    def events(self, edit_id: str) -> EditEventsPublic:
        return EditEventsPublic(items=[EditEventPublic.of(e) for e in repo.events_of(self.session, edit_id)])

    def rollback(self, edit_id: str, reason: str, audit: Audit) -> EditPublic:
        """Roll back; the edits it had superseded serve again."""
        result = repo.rollback(self.session, edit_id, reason, audit)
        if result.changed:
            log.info("edit %s rolled back by %s%s", edit_id, audit.actor,
                     f"; active again: {', '.join(result.restored)}" if result.restored else "")
            # This process routes as the database says before answering; the others follow the events.
            self.service.reconcile()
            self.service.queue.publish(EditChanged(edit_id, EditStatus.rolled_back).to_dict())
            for restored in result.restored:
                self.service.queue.publish(EditChanged(restored, EditStatus.active).to_dict())
        return self._public(result.edit)

    def restore(self, edit_id: str, reason: str | None, audit: Audit) -> EditPublic:
        """Active again with its expert file when this process can read it, else queued to train again."""
        edit = repo.get_edit(self.session, edit_id)
        served = self.service.served
        reusable = (edit.expert_path is not None and served is not None
                    and served.experts.readable(edit.expert_path, edit.expert_sha256))
        result = repo.restore(self.session, edit_id, reason, audit, reuse_expert=reusable)
        if result.changed:
            status = EditStatus(result.edit.status)
            log.info("edit %s restored by %s: %s%s", edit_id, audit.actor, status,
                     f"; superseded {', '.join(result.superseded)}" if result.superseded else "")
            if status == EditStatus.queued:
                try:
                    self.service.queue.enqueue(edit_id)
                except QueueUnavailable:
                    # Recorded as queued: a worker's sweep for edits with no message sends it.
                    log.warning("edit %s restored but not queued (the queue is unreachable); "
                                "a worker will send it again", edit_id)
            else:
                self.service.reconcile()
                self.service.queue.publish(EditChanged(edit_id, EditStatus.active).to_dict())
                for older in result.superseded:
                    self.service.queue.publish(EditChanged(older, EditStatus.superseded).to_dict())
        return self._public(result.edit)

    def _public(self, edit: Edit) -> EditPublic:
        return EditPublic.of(edit, self.service.live_ids(), self.service.unserved())

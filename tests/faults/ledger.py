"""The ledger of a fault run, computed from the database and the expert files alone.

Given the ids the API accepted (202, or 200 for an idempotent retry), it says where each edit
ended and what must never happen whatever the faults: an accepted edit missing or never finished
(lost), an edit trained into service twice or two active edits of one prompt (duplicated), an
expert file no edit owns (orphan), an active edit whose file is gone or altered (unserved).

It reads only what an operator has too (SQL and the data folder), so the tests, bench/faults.py
and a person checking a deployment by hand (``python -m tests.faults.ledger DB_URL DATA_DIR``)
count the same way.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import sqlalchemy as sa

from app.db.models import Edit, EditEvent, EditStatus

WAITING = {EditStatus.queued.value, EditStatus.training.value}
# Statuses whose row may own an expert file: the file of a rolled-back or superseded edit is kept
# so that a restore (or the rollback of its successor) serves it again without training.
OWNS_FILE = {EditStatus.active.value, EditStatus.rolled_back.value, EditStatus.superseded.value,
             EditStatus.queued.value, EditStatus.training.value}


@dataclass
class Ledger:
    submitted: int
    in_database: int
    active: int
    failed: dict[str, str]
    rolled_back: int
    superseded: int
    waiting: list[str]
    lost: list[str]
    duplicated: list[str]
    orphan_files: list[str]
    unserved: list[str]
    unaccounted: list[str]
    deliveries: dict[str, int] = field(default_factory=dict)

    def problems(self, allow_unserved: bool = False) -> list[str]:
        found = []
        if self.lost:
            found.append(f"{len(self.lost)} lost: {self.lost}")
        if self.duplicated:
            found.append(f"{len(self.duplicated)} duplicated: {self.duplicated}")
        if self.orphan_files:
            found.append(f"{len(self.orphan_files)} orphan files: {self.orphan_files}")
        if self.unserved and not allow_unserved:
            found.append(f"{len(self.unserved)} active but unserved: {self.unserved}")
        if self.unaccounted:
            found.append(f"{len(self.unaccounted)} edits in the database no client was told of: {self.unaccounted}")
        without_reason = [edit_id for edit_id, reason in self.failed.items() if not reason]
        if without_reason:
            found.append(f"failed without a reason: {without_reason}")
        return found

    def to_dict(self) -> dict:
        out = asdict(self)
        out["failed_count"] = len(self.failed)
        out["lost_count"] = len(self.lost)
        out["duplicated_count"] = len(self.duplicated)
        out["orphan_count"] = len(self.orphan_files)
        return out

    def summary(self) -> str:
        reasons = Counter(_reason_kind(r) for r in self.failed.values())
        failed = ", ".join(f"{n} {kind}" for kind, n in reasons.most_common()) or "none"
        return (f"submitted {self.submitted} | active {self.active} | failed {len(self.failed)} ({failed}) | "
                f"rolled back {self.rolled_back} | superseded {self.superseded} | waiting {len(self.waiting)} | "
                f"lost {len(self.lost)} | duplicated experts {len(self.duplicated)} | "
                f"orphan files {len(self.orphan_files)} | unserved {len(self.unserved)}")


def _reason_kind(reason: str) -> str:
    return reason.split(":", 1)[0][:60] if reason else "no reason"


def _engine(database_url: str) -> sa.Engine:
    return sa.create_engine(database_url, pool_pre_ping=True)


def compute_ledger(database_url: str, data_dir: Path, submitted: Iterable[str] | None = None) -> Ledger:
    """``submitted``: the ids the API accepted. None: every edit in the database counts as submitted."""
    engine = _engine(database_url)
    try:
        with engine.connect() as conn:
            rows = conn.execute(sa.select(Edit.id, Edit.status, Edit.prompt_key, Edit.expert_path,
                                          Edit.expert_sha256, Edit.error, Edit.attempts)).all()
            events = conn.execute(sa.select(EditEvent.edit_id, EditEvent.event, EditEvent.status)
                                  .order_by(EditEvent.id)).all()
    finally:
        engine.dispose()
    edits = {row.id: row for row in rows}
    accepted = set(edits) if submitted is None else set(submitted)

    lost = sorted(edit_id for edit_id in accepted if edit_id not in edits or edits[edit_id].status in WAITING)
    waiting = sorted(edit_id for edit_id, row in edits.items() if row.status in WAITING)
    by_status = Counter(row.status for row in rows)
    failed = {row.id: row.error or "" for row in rows if row.status == EditStatus.failed.value}

    duplicated: list[str] = []
    active_per_prompt = Counter(row.prompt_key for row in rows if row.status == EditStatus.active.value)
    duplicated += [f"prompt {key[:12]} has {n} active edits" for key, n in active_per_prompt.items() if n > 1]
    # An edit trained into service again while already serving: two workers both committed it.
    serving: dict[str, bool] = defaultdict(bool)
    for edit_id, event, status in events:
        if event == "activated" and serving[edit_id]:
            duplicated.append(f"edit {edit_id} activated while already active")
        serving[edit_id] = status == EditStatus.active.value
    experts = Path(data_dir) / "experts"
    files = sorted(p for p in experts.iterdir() if p.is_file()) if experts.is_dir() else []
    per_edit = Counter(p.name.split(".", 1)[0] for p in files if not p.name.startswith("."))
    duplicated += [f"edit {edit_id} has {n} expert files" for edit_id, n in per_edit.items() if n > 1]

    owned = {Path(row.expert_path).name for row in rows if row.expert_path and row.status in OWNS_FILE}
    orphans = [p.name for p in files if p.name not in owned]

    unserved = []
    for row in rows:
        if row.status != EditStatus.active.value:
            continue
        path = Path(data_dir) / (row.expert_path or "")
        if not row.expert_path or not path.is_file():
            unserved.append(f"{row.id}: file missing")
        elif row.expert_sha256 and hashlib.sha256(path.read_bytes()).hexdigest() != row.expert_sha256:
            unserved.append(f"{row.id}: file does not match its sha256")

    return Ledger(
        submitted=len(accepted), in_database=len(edits), active=by_status[EditStatus.active.value], failed=failed,
        rolled_back=by_status[EditStatus.rolled_back.value], superseded=by_status[EditStatus.superseded.value],
        waiting=waiting, lost=lost, duplicated=duplicated, orphan_files=orphans, unserved=unserved,
        unaccounted=sorted(set(edits) - accepted) if submitted is not None else [],
        deliveries={row.id: row.attempts for row in rows},
    )


def wait_settled(database_url: str, ids: Iterable[str], timeout: float) -> bool:
    """Wait until none of ``ids`` is queued or training (or missing). False if some still are."""
    wanted = set(ids)
    engine = _engine(database_url)
    deadline = time.monotonic() + timeout
    try:
        while True:
            try:
                with engine.connect() as conn:
                    rows = dict(conn.execute(sa.select(Edit.id, Edit.status).where(Edit.id.in_(wanted))).all())
                if all(rows.get(edit_id) not in (None, *WAITING) for edit_id in wanted):
                    return True
            except sa.exc.OperationalError:
                pass
            if time.monotonic() > deadline:
                return False
            time.sleep(0.2)
    finally:
        engine.dispose()


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: python -m tests.faults.ledger DATABASE_URL DATA_DIR")
    ledger = compute_ledger(sys.argv[1], Path(sys.argv[2]))
    print(ledger.summary())
    print(json.dumps(ledger.to_dict(), indent=2))
    sys.exit(1 if ledger.problems() else 0)

"""``scen worker`` with two fault points a test can arm from outside the process.

Run as ``python -m tests.faults.faulty_worker`` with ``SCEN_FAULT_DIR`` set. A point is armed by
creating a file of its name in that folder: ``train`` (the expert is being trained) or
``after_save`` (the expert file is written, the database not yet told). The next edit that
reaches an armed point disarms it, writes ``<point>.reached`` (holding the edit id) and waits
there, its heartbeat still running, until ``<point>.go`` appears, or until the test kills the
process. Everything else is the real command: settings, signals, queue, database.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import workers.main
from app.cli import main
from workers.worker import build_worker

FAULTS = Path(os.environ["SCEN_FAULT_DIR"])


def fault_point(point: str, edit_id: str) -> None:
    armed = FAULTS / point
    if not armed.exists():
        return
    armed.unlink()
    go = FAULTS / f"{point}.go"
    reached = FAULTS / f"{point}.reached"
    tmp = reached.with_suffix(".tmp")
    tmp.write_text(edit_id)
    tmp.replace(reached)
    while not go.exists():
        time.sleep(0.02)
    go.unlink()


def build_faulty_worker(settings, served, db, queue, **kwargs):
    editor = served.editor
    train = editor.train

    def train_with_fault(prompt, target, rephrases=(), **kw):
        fault_point("train", current.get("edit_id", "?"))
        return train(prompt, target, rephrases, **kw)

    worker = build_worker(settings, served, db, queue, after_save=lambda edit_id: fault_point("after_save", edit_id),
                          **kwargs)
    current: dict[str, str] = {}
    handle = worker._handle

    def handle_remembering(delivery):
        current["edit_id"] = delivery.edit_id
        return handle(delivery)

    worker._handle = handle_remembering  # type: ignore[method-assign]
    editor.train = train_with_fault  # type: ignore[method-assign]
    return worker


if __name__ == "__main__":
    workers.main.build_worker = build_faulty_worker  # type: ignore[assignment]
    sys.argv = ["scen", "worker"]
    main()

"""An active edit whose expert file is lost or corrupt cannot be served; it must say so:
in the edit (``live: false`` with an ``error``), in /ready, in a metric and in an error log line."""

from __future__ import annotations

import logging

from tests.service.conftest import make_settings, running, wait_for, wait_status

EDITS = [("Who is the CEO of Acme?", "Jane Doe"), ("Which river flows through Cairo?", "The Amazon"),
         ("How many legs does a spider have?", "Six legs")]


def test_edit_with_a_lost_or_corrupt_expert_file_is_reported(sqlite_url, tmp_path, caplog):
    settings = make_settings(tmp_path, sqlite_url)
    with running(settings) as client:
        ids = [client.post("/edits", json={"prompt": p, "target": t}).json()["id"] for p, t in EDITS]
        edits = [wait_status(client, edit_id, {"active"}) for edit_id in ids]
    deleted, corrupt, intact = (settings.data_dir / e["expert_path"] for e in edits)
    kept = corrupt.read_bytes()
    deleted.unlink()
    corrupt.write_bytes(kept[: len(kept) // 2])

    with caplog.at_level(logging.ERROR, logger="app.live.sync"), running(settings) as client:
        ready = client.get("/ready")
        assert ready.status_code == 200 and ready.json()["status"] == "degraded"
        assert set(ready.json()["unserved_edits"]) == {ids[0], ids[1]} and "2 active edits" in ready.json()["detail"]
        for edit_id in ids[:2]:
            edit = client.get(f"/edits/{edit_id}").json()
            assert edit["status"] == "active" and edit["live"] is False
            assert "cannot be loaded" in edit["error"] and str(settings.data_dir) not in edit["error"]
        assert client.get(f"/edits/{ids[2]}").json()["error"] is None
        listed = {e["id"]: e for e in client.get("/edits").json()["items"]}
        assert listed[ids[1]]["error"] and not listed[ids[1]]["live"] and listed[ids[2]]["live"]
        assert "scen_unserved_edits 2.0" in client.get("/metrics").text
        logged = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
        assert all(any(edit_id in line for line in logged) for edit_id in ids[:2]), logged

        # A file put back is served again at the next reconciliation.
        corrupt.write_bytes(kept)
        assert wait_for(lambda: client.get(f"/edits/{ids[1]}").json()["live"], 5)
        assert client.get(f"/edits/{ids[1]}").json()["error"] is None
        assert set(client.get("/ready").json()["unserved_edits"]) == {ids[0]}
        assert "scen_unserved_edits 1.0" in client.get("/metrics").text

"""Restoring an edit whose expert file is corrupt trains it again instead of reactivating a file
that cannot be served (found by tests/faults: the corrupted-file repair left the edit unserved)."""

from __future__ import annotations

from tests.service.conftest import make_settings, running, wait_for, wait_status


def test_restore_retrains_an_edit_whose_file_is_corrupt(sqlite_url, tmp_path):
    settings = make_settings(tmp_path, sqlite_url)
    with running(settings) as client:
        edit_id = client.post("/edits", json={"prompt": "Who is the CEO of Acme?", "target": "Jane Doe"}).json()["id"]
        before = wait_status(client, edit_id, {"active"}, timeout=300)
        path = settings.data_dir / before["expert_path"]
        path.write_bytes(path.read_bytes()[:1000])  # the live model keeps its copy in memory

        assert client.post(f"/edits/{edit_id}/rollback", json={"reason": "file corrupt"}).status_code == 200
        restored = client.post(f"/edits/{edit_id}/restore", json={"reason": "retrain"}).json()
        assert restored["status"] == "queued"
        after = wait_status(client, edit_id, {"active"}, timeout=300)
        assert after["expert_path"] != before["expert_path"] and after["expert_sha256"] != before["expert_sha256"]
        assert wait_for(lambda: client.get(f"/edits/{edit_id}").json()["live"], 60)
        assert not path.exists()  # the corrupt file went with the new attempt's commit

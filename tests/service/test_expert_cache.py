"""With SCEN_EXPERT_CACHE_MB room for one expert, a process serves every edit: experts
go out and load again on demand, /metrics counts it, and an expert whose file is gone by
the time it is needed is reported and answered by the base model."""

from __future__ import annotations

import logging
import re

from tests.service.conftest import make_settings, running, wait_for, wait_status

EDITS = [("Who is the CEO of Acme?", "Jane Doe"), ("Which river flows through Cairo?", "The Amazon")]
# A tiny model's rank-8 expert is 8 x (64 + 128) floats (6 KiB): room for one, not two.
ONE_EXPERT_MB = 0.009


def metric(text: str, name: str) -> float:
    found = re.search(rf"^{name} (\S+)$", text, re.MULTILINE)
    assert found, f"{name} not in /metrics"
    return float(found.group(1))


def cache_metrics(client) -> dict[str, float]:
    text = client.get("/metrics").text
    return {name: metric(text, f"scen_expert_cache_{name}") for name in
            ("hits_total", "loads_total", "evictions_total", "load_failures_total", "resident_experts",
             "resident_bytes")}


def ask(client, prompt: str) -> dict:
    return client.post("/generate", json={"prompt": prompt, "max_new_tokens": 12}).json()


def test_experts_page_out_and_back_and_a_lost_file_is_reported(sqlite_url, tmp_path, caplog):
    settings = make_settings(tmp_path, sqlite_url, expert_cache_mb=ONE_EXPERT_MB)
    with running(settings) as client, caplog.at_level(logging.ERROR):
        ids = [client.post("/edits", json={"prompt": p, "target": t}).json()["id"] for p, t in EDITS]
        edits = [wait_status(client, edit_id, {"active"}) for edit_id in ids]
        before = cache_metrics(client)
        assert before["resident_experts"] == 1 and before["evictions_total"] >= 1
        assert before["resident_bytes"] == 8 * (64 + 128) * 4

        # Each answer needs the expert the other one let go; asking twice in a row is a hit.
        for (prompt, target), edit_id in [*zip(EDITS, ids), *zip(EDITS, ids)]:
            for _ in range(2):
                answer = ask(client, prompt)
                assert answer["text"].startswith(target) and answer["routing"]["edit_id"] == edit_id
        after = cache_metrics(client)
        assert after["loads_total"] - before["loads_total"] >= 3
        assert after["hits_total"] - before["hits_total"] >= 4
        assert after["evictions_total"] > before["evictions_total"] and after["resident_experts"] == 1
        assert after["load_failures_total"] == 0

        # The first edit's expert is out (the second was asked last); its file goes away.
        path = settings.data_dir / edits[0]["expert_path"]
        kept = path.read_bytes()
        path.unlink()
        answer = ask(client, EDITS[0][0])
        assert not answer["text"].startswith(EDITS[0][1]) and answer["routing"]["edit_id"] is None
        assert cache_metrics(client)["load_failures_total"] == 1
        ready = client.get("/ready").json()
        assert ready["status"] == "degraded" and set(ready["unserved_edits"]) == {ids[0]}
        assert "cannot be loaded" in client.get(f"/edits/{ids[0]}").json()["error"]
        # The next reconcile finds the file still gone: out of the live set, as at start-up.
        assert wait_for(lambda: not client.get(f"/edits/{ids[0]}").json()["live"], 5)
        assert ask(client, EDITS[1][0])["text"].startswith(EDITS[1][1])
        logged = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR and ids[0] in r.getMessage()]
        assert len(logged) == 1, logged

        # Put back, it is served again.
        path.write_bytes(kept)
        assert wait_for(lambda: client.get(f"/edits/{ids[0]}").json()["live"], 5)
        assert client.get("/ready").json()["status"] == "ready"
        answer = ask(client, EDITS[0][0])
        assert answer["text"].startswith(EDITS[0][1]) and answer["routing"]["edit_id"] == ids[0]

"""Fault run, the long version of tests/faults: one deployment (PostgreSQL and Redis started here
on free ports, two ``scen serve`` replicas' worth of restarts, two workers) under a steady stream
of edits and generations, taking every fault in turn with production-like timings, then the ledger.

Faults, in order: a worker SIGKILLed mid-training; a worker SIGKILLed between writing its expert
file and committing; a worker frozen past the claim time (its edit delivered to the other worker
too), then thawed; Redis SIGKILLed and restarted empty; PostgreSQL stopped for ``--pg-outage``
seconds; the API SIGKILLed, then SIGTERMed, under load; an expert file corrupted and another
deleted, then repaired by rollback and restore. After each: a ledger of every accepted edit.

    python bench/faults.py --edits-per-phase 6 --out bench/results/faults.json

Needs PostgreSQL's binaries (initdb, pg_ctl) and redis-server; run as root, the cluster belongs
to the postgres account.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.faults.conftest import Submitter, edit_text  # noqa: E402
from tests.faults.ledger import Ledger, compute_ledger, wait_settled  # noqa: E402
from tests.faults.procs import Api, Deployment, Worker  # noqa: E402
from tests.faults.servers import PostgresServer, RedisServer  # noqa: E402


class Run:
    def __init__(self, args, folder: Path, postgres: PostgresServer, redis_server: RedisServer, model: str | None):
        self.args = args
        self.postgres = postgres
        self.redis = redis_server
        database = postgres.create_database("faults")
        self.deployment = Deployment(
            database_url=database, redis_url=redis_server.url, data_dir=folder / "data", model=model,
            logs=folder / "logs",
            settings={"SCEN_CLAIM_IDLE_MS": str(args.claim_idle_ms), "SCEN_REQUEUE_AFTER_S": str(args.requeue_after_s),
                      "SCEN_RECONCILE_SECONDS": "5", "SCEN_DB_RETRY_SECONDS": "300", "SCEN_MAX_DELIVERIES": "3"})
        self.api = Api(self.deployment, "api-1")
        self.workers: dict[str, Worker] = {}
        self.client: Submitter | None = None
        self.phases: list[dict] = []
        self.generate = Counter[str]()
        self.stop = threading.Event()
        self.counter = 0
        self.lock = threading.Lock()
        self.t0 = time.monotonic()

    def log(self, text: str) -> None:
        print(f"[{time.monotonic() - self.t0:7.1f}s] {text}", flush=True)

    def worker(self, label: str, arm: tuple[str, ...] = ()) -> Worker:
        worker = Worker(self.deployment, label, arm)
        self.workers[label] = worker
        return worker.start()

    def hold(self, *labels: str) -> None:
        """Freeze workers so that the next edit goes elsewhere. A frozen worker's blocking read
        (block_ms 1 s) must expire first, or Redis hands it the message anyway."""
        for label in labels:
            self.workers[label].pause()
        time.sleep(1.5)

    def let_go(self, *labels: str) -> None:
        for label in labels:
            self.workers[label].resume()

    def post(self, n: int) -> list[str]:
        assert self.client is not None
        ids = []
        for _ in range(n):
            with self.lock:
                i = self.counter
                self.counter += 1
            edit_id = self.client.post(*edit_text(i), timeout=600)
            if edit_id:
                ids.append(edit_id)
        return ids

    def background_load(self) -> None:
        """Generations all along, from two clients; their failures during restarts are counted."""
        def loop() -> None:
            with httpx.Client(timeout=120) as http:
                while not self.stop.is_set():
                    try:
                        r = http.post(f"{self.api.base_url}/generate",
                                      json={"prompt": edit_text(self.counter % 7)[0], "max_new_tokens": 8})
                        outcome = str(r.status_code)
                    except httpx.TransportError:
                        outcome = "no connection"
                    self.generate[outcome] += 1
                    self.stop.wait(0.2)

        for _ in range(2):
            threading.Thread(target=loop, daemon=True).start()

    def settle(self, name: str, started: float, notes: str = "", allow_unserved: bool = False) -> Ledger:
        assert self.client is not None
        settled = wait_settled(self.deployment.database_url, self.client.accepted, self.args.settle_timeout)
        ledger = compute_ledger(self.deployment.database_url, self.deployment.data_dir, self.client.accepted)
        problems = ledger.problems(allow_unserved)
        self.phases.append({"phase": name, "seconds": round(time.monotonic() - started, 1), "settled": settled,
                            "notes": notes, "ledger": _brief(ledger), "problems": problems})
        self.log(f"{name}: {ledger.summary()}{' PROBLEMS: ' + '; '.join(problems) if problems else ''}")
        # Written after every phase, so that a run cut short keeps the ledgers it reached.
        self.args.out.parent.mkdir(parents=True, exist_ok=True)
        self.args.out.write_text(json.dumps({"complete": False, "model": self.args.model, "phases": self.phases},
                                            indent=2) + "\n")
        return ledger

    def restart_api(self, how: str) -> None:
        port = self.api.port
        if how == "kill":
            self.api.kill()
        else:
            self.api.terminate(120)
        self.api = Api(self.deployment, f"api-{len(self.phases) + 2}-{how}", port=port).start()
        self.api.wait_ready(900)

    def kill_at(self, name: str, point: str, phase: str) -> None:
        """One phase: a new worker armed at ``point`` takes the next edit and is SIGKILLed there."""
        started = time.monotonic()
        worker = self.worker(name, arm=(point,))
        self.hold("w2")
        self.post(1)
        victim = worker.wait_reached(point, 900)
        self.let_go("w2")
        worker.kill()
        self.log(f"{name} SIGKILLed at {point} while handling {victim}")
        self.post(self.args.edits_per_phase - 1)
        self.settle(phase, started, f"edit {victim}")

    def execute(self) -> None:
        a = self.args
        self.api.start()
        self.worker("w1")
        self.worker("w2")
        self.api.wait_ready(900)
        self.client = Submitter(self.api.base_url)
        self.background_load()

        started = time.monotonic()
        self.post(a.edits_per_phase)
        self.settle("baseline", started)

        # A worker killed mid-training; the other takes the edit over after the claim time.
        self.workers["w1"].kill()
        self.kill_at("w3", "train", "worker SIGKILL during training")
        # A worker killed after writing its expert file, before committing.
        self.kill_at("w4", "after_save", "worker SIGKILL between file write and commit")

        # A worker frozen past the claim time: the other worker gets the same edit; both train it.
        started = time.monotonic()
        w5 = self.worker("w5", arm=("after_save",))
        self.hold("w2")
        self.post(1)
        victim = w5.wait_reached("after_save", 900)
        w5.pause()
        self.let_go("w2")
        wait_settled(self.deployment.database_url, [victim], a.settle_timeout)
        w5.resume()
        w5.release("after_save")
        self.log(f"w5 frozen past the claim time on {victim}, then thawed")
        self.post(a.edits_per_phase - 1)
        self.settle("duplicate delivery (frozen worker thawed)", started, f"edit {victim}")

        # Redis SIGKILLed and restarted empty, with edits waiting in the stream.
        started = time.monotonic()
        self.hold("w2", "w5")
        self.post(a.edits_per_phase)
        self.redis.kill()
        self.log("Redis SIGKILLed with edits waiting")
        time.sleep(a.redis_outage)
        self.redis.start()
        self.let_go("w2", "w5")
        self.log("Redis restarted empty")
        self.post(2)
        self.settle("Redis killed and restarted empty", started)

        # PostgreSQL stopped with a worker between training and committing.
        started = time.monotonic()
        w6 = self.worker("w6", arm=("after_save",))
        self.hold("w2", "w5")
        self.post(1)
        victim = w6.wait_reached("after_save", 900)
        self.postgres.stop()
        self.log(f"PostgreSQL stopped with {victim} written but not committed")
        w6.release("after_save")
        self.let_go("w2", "w5")
        time.sleep(a.pg_outage)
        self.postgres.start()
        self.log(f"PostgreSQL started after {a.pg_outage}s")
        self.post(a.edits_per_phase - 1)
        self.settle("PostgreSQL stopped and started", started, f"outage {a.pg_outage}s, edit {victim}")

        # The API killed, then stopped, while edits are being posted.
        started = time.monotonic()
        poster = threading.Thread(target=self.post, args=(a.edits_per_phase * 2,), daemon=True)
        poster.start()
        time.sleep(2)
        self.restart_api("kill")
        self.log("API SIGKILLed under load and restarted")
        time.sleep(2)
        self.restart_api("term")
        self.log("API SIGTERMed under load and restarted")
        poster.join(1800)
        self.settle("API restarted under load", started)

        # Expert files corrupted and deleted; found, reported, repaired by rollback and restore.
        started = time.monotonic()
        with httpx.Client(base_url=self.api.base_url, timeout=120) as http:
            active = http.get("/edits", params={"status": "active", "limit": 2}).json()["items"]
            corrupt, deleted = (self.deployment.data_dir / e["expert_path"] for e in active)
            corrupt.write_bytes(corrupt.read_bytes()[:4096])
            deleted.unlink()
            self.log(f"corrupted the file of {active[0]['id']}, deleted that of {active[1]['id']}")
            found = compute_ledger(self.deployment.database_url, self.deployment.data_dir, self.client.accepted)
            self.restart_api("kill")
            ready = http.get("/ready").json()
            self.log(f"after a restart /ready says {ready['status']}, unserved {ready['unserved_edits']}")
            for edit in active:
                http.post(f"/edits/{edit['id']}/rollback", json={"reason": "expert file lost"}).raise_for_status()
                http.post(f"/edits/{edit['id']}/restore", json={"reason": "train again"}).raise_for_status()
        self.settle("expert files corrupted and deleted", started,
                    f"detected unserved: {found.unserved}; /ready: {ready['status']} {ready['unserved_edits']}")

        self.stop.set()
        with httpx.Client(base_url=self.api.base_url, timeout=120) as http:
            deadline = time.monotonic() + 120
            while http.get("/ready").json()["status"] != "ready" and time.monotonic() < deadline:
                time.sleep(1)
            self.final_ready = http.get("/ready").json()


def _brief(ledger: Ledger) -> dict:
    out = ledger.to_dict()
    out.pop("deliveries")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["tiny", "bundled"], default="tiny")
    parser.add_argument("--edits-per-phase", type=int, default=6)
    parser.add_argument("--claim-idle-ms", type=int, default=15_000)
    parser.add_argument("--requeue-after-s", type=float, default=10.0)
    parser.add_argument("--pg-outage", type=float, default=65.0, help="seconds PostgreSQL stays down")
    parser.add_argument("--redis-outage", type=float, default=5.0, help="seconds Redis stays down")
    parser.add_argument("--settle-timeout", type=float, default=900.0)
    parser.add_argument("--out", type=Path, default=ROOT / "bench/results/faults.json")
    parser.add_argument("--keep", action="store_true", help="keep the run's folder (logs, data) and say where")
    args = parser.parse_args()

    folder = Path(tempfile.mkdtemp(prefix="scen-faults-"))
    model = None
    if args.model == "tiny":
        from tests.utils.tiny_models import tiny_model

        lm = tiny_model("llama")
        model = str(folder / "tiny-llama")
        lm.model.save_pretrained(model)
        lm.tokenizer.save_pretrained(model)
    postgres = PostgresServer()
    redis_server = RedisServer(folder / "redis")
    run = None
    started = time.monotonic()
    try:
        postgres.start()
        redis_server.start()
        run = Run(args, folder, postgres, redis_server, model)
        run.execute()
    finally:
        if run is not None:
            for process in [run.api, *run.workers.values()]:
                process.kill()
        redis_server.close()
        postgres.close()
    assert run is not None and run.client is not None
    last = run.phases[-1]["ledger"]
    report = {
        "complete": True, "model": args.model, "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "settings": {k: v for k, v in vars(args).items() if k not in ("out", "keep")} | run.deployment.settings,
        "seconds": round(time.monotonic() - started, 1),
        "ledger": last, "problems": [p for phase in run.phases for p in phase["problems"]],
        "phases": run.phases, "generate_outcomes": dict(run.generate), "final_ready": run.final_ready,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print("\nLEDGER " + json.dumps({k: last[k] for k in ("submitted", "active", "failed_count", "lost_count",
                                                          "duplicated_count", "orphan_count", "unserved")}))
    print(f"failed with reason: {last['failed']}")
    print(f"problems: {report['problems'] or 'none'}; written to {args.out}")
    if args.keep:
        print(f"run folder: {folder}")
    else:
        shutil.rmtree(folder, ignore_errors=True)
    sys.exit(1 if report["problems"] else 0)


if __name__ == "__main__":
    main()

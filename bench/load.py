"""Load benchmark: concurrent clients mixing /generate and POST /edits for a fixed time.

Starts ``scen serve`` in its embedded default (SQLite, in-process queue, the worker thread
sharing the model) on a free port with a fresh data folder, on the bundled SmolLM2
(``--model bundled``) or a tiny random model (``--model tiny``), or uses ``--url``. Each client
loops until the time is up: with probability ``--edit-share`` it posts a new edit (a prompt no
other edit has), else it asks /generate a question, half of them about an edit already posted.
Reports throughput, p50/p95/p99 latency per route, errors (anything but 200 from /generate and
202 from /edits, and dropped connections), the server's RSS over the run, and where the posted
edits ended.

    python bench/load.py --model bundled --clients 50 --duration 300 --out bench/results/load.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path

import httpx
import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SUBJECTS = ["Acme", "Globex", "Initech", "Umbrella", "Hooli", "Vandelay", "Wonka", "Stark", "Wayne", "Cyberdyne",
            "Tyrell", "Soylent", "Aperture", "Massive Dynamic", "Oscorp", "Nakatomi"]
BASE_PROMPTS = [
    "What is the capital of France?", "How many legs does a spider have?", "Who wrote Hamlet?",
    "What is photosynthesis?", "Name a primary colour.", "Why is the sky blue?",
    "What is the boiling point of water?", "Which river flows through Cairo?",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tiny_model_dir(folder: Path) -> str:
    from tests.utils.tiny_models import tiny_model

    lm = tiny_model("llama")
    path = folder / "tiny-llama"
    lm.model.save_pretrained(path)
    lm.tokenizer.save_pretrained(path)
    return str(path)


def start_server(folder: Path, model: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("SCEN_")}
    env.update({"SCEN_DATA_DIR": str(folder / "data"), "HF_HUB_OFFLINE": "1"})
    if model == "tiny":
        env["SCEN_MODEL"] = tiny_model_dir(folder)
        env["SCEN_CACHE_DIR"] = str(folder / "cache")
    scen = shutil.which("scen", path=str(Path(sys.executable).parent)) or shutil.which("scen") or "scen"
    log = (folder / "serve.log").open("w")
    proc = subprocess.Popen([scen, "serve", "--port", str(port)], env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 900
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"scen serve exited ({proc.returncode}); see {folder / 'serve.log'}")
        try:
            if httpx.get(f"{url}/ready", timeout=5).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise SystemExit("scen serve not ready in 900 s")


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    k = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[k]


class Load:
    def __init__(self, url: str, clients: int, duration: float, edit_share: float, max_new_tokens: int, seed: int):
        self.url = url
        self.clients = clients
        self.duration = duration
        self.edit_share = edit_share
        self.max_new_tokens = max_new_tokens
        self.rng = random.Random(seed)
        self.latency: dict[str, list[float]] = defaultdict(list)
        self.outcomes: dict[str, Counter[str]] = defaultdict(Counter)
        self.posted: list[tuple[str, str]] = []  # (edit id, prompt)
        self.next_edit = 0
        self.error_samples: list[str] = []

    def new_edit(self) -> dict:
        n = self.next_edit
        self.next_edit += 1
        subject = f"{SUBJECTS[n % len(SUBJECTS)]} {n // len(SUBJECTS) + 1}"
        return {"prompt": f"Who is the chief executive of {subject}?", "target": f"Pat Example {n}",
                "metadata": {"bench": "load"}}

    def question(self) -> str:
        if self.posted and self.rng.random() < 0.5:
            return self.rng.choice(self.posted)[1]
        return self.rng.choice(BASE_PROMPTS)

    async def client(self, http: httpx.AsyncClient, deadline: float) -> None:
        while time.monotonic() < deadline:
            if self.rng.random() < self.edit_share:
                route, body = "POST /edits", self.new_edit()
                expected = 202
            else:
                route, body = "POST /generate", {"prompt": self.question(), "max_new_tokens": self.max_new_tokens}
                expected = 200
            path = "/edits" if route == "POST /edits" else "/generate"
            start = time.perf_counter()
            try:
                r = await http.post(path, json=body)
                outcome = str(r.status_code)
            except httpx.HTTPError as exc:
                r, outcome = None, type(exc).__name__
            self.latency[route].append(time.perf_counter() - start)
            self.outcomes[route][outcome] += 1
            if r is not None and r.status_code == expected:
                if route == "POST /edits":
                    self.posted.append((r.json()["id"], body["prompt"]))
            elif len(self.error_samples) < 20:
                self.error_samples.append(f"{route} -> {outcome}: {r.text[:200] if r is not None else ''}")

    async def run(self) -> float:
        # uvicorn closes a connection idle for 5 s; a client keeping idle ones as long (httpx's default)
        # races that close on a busy machine and sees the request dropped (ReadError).
        limits = httpx.Limits(max_connections=self.clients, max_keepalive_connections=self.clients,
                              keepalive_expiry=1.0)
        async with httpx.AsyncClient(base_url=self.url, timeout=300, limits=limits) as http:
            start = time.monotonic()
            deadline = start + self.duration
            await asyncio.gather(*(self.client(http, deadline) for _ in range(self.clients)))
            return time.monotonic() - start


def sample_rss(pid: int | None, stop: asyncio.Event, samples: list[tuple[float, int]]):
    async def loop() -> None:
        if pid is None:
            return
        proc = psutil.Process(pid)
        t0 = time.monotonic()
        while not stop.is_set():
            samples.append((time.monotonic() - t0, proc.memory_info().rss))
            try:
                await asyncio.wait_for(stop.wait(), 1.0)
            except TimeoutError:
                pass
    return loop()


async def measure(args, url: str, pid: int | None) -> dict:
    load = Load(url, args.clients, args.duration, args.edit_share, args.max_new_tokens, args.seed)
    stop = asyncio.Event()
    rss: list[tuple[float, int]] = []
    sampler = asyncio.ensure_future(sample_rss(pid, stop, rss))
    # Other work on the machine skews every figure; the load average says how much there was.
    load_before = os.getloadavg()[0]
    elapsed = await load.run()
    load_after = os.getloadavg()[0]
    stop.set()
    await sampler

    routes = {}
    for route, values in load.latency.items():
        ok = "200" if route == "POST /generate" else "202"
        routes[route] = {
            "requests": len(values), "ok": load.outcomes[route][ok],
            "errors": sum(n for outcome, n in load.outcomes[route].items() if outcome != ok),
            "outcomes": dict(load.outcomes[route]),
            "throughput_per_s": round(len(values) / elapsed, 3),
            "latency_s": {"mean": round(statistics.fmean(values), 4),
                          **{f"p{q}": round(percentile(values, q) or 0, 4) for q in (50, 95, 99)},
                          "max": round(max(values), 4)},
        }
    statuses: dict[str, int] = {}
    with httpx.Client(base_url=url, timeout=60) as http:
        for status in ("queued", "training", "active", "failed", "superseded", "rolled_back"):
            statuses[status] = http.get("/edits", params={"status": status, "metadata": "bench:load",
                                                          "limit": 1}).json()["total"]
    total = sum(r["requests"] for r in routes.values())
    memory = None
    if rss:
        first, last, peak = rss[0][1], rss[-1][1], max(v for _, v in rss)
        half = [v for t, v in rss if t >= rss[-1][0] / 2]
        memory = {"rss_start_mb": round(first / 2**20, 1), "rss_end_mb": round(last / 2**20, 1),
                  "rss_peak_mb": round(peak / 2**20, 1), "growth_mb": round((last - first) / 2**20, 1),
                  "growth_second_half_mb": round((last - half[0]) / 2**20, 1) if half else None,
                  "samples": len(rss)}
    return {
        "duration_s": round(elapsed, 1), "clients": args.clients, "edit_share": args.edit_share,
        "max_new_tokens": args.max_new_tokens, "requests": total,
        "throughput_per_s": round(total / elapsed, 3),
        "errors": sum(r["errors"] for r in routes.values()), "routes": routes,
        "edits_posted": len(load.posted), "edits_by_status_after": statuses, "memory": memory,
        "error_samples": load.error_samples,
        "machine_load_average_1m": {"start": round(load_before, 2), "end": round(load_after, 2)},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["bundled", "tiny"], default="bundled",
                        help="the bundled SmolLM2 or a tiny random model (ignored with --url)")
    parser.add_argument("--url", help="an already running service (its memory is not measured)")
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--duration", type=float, default=300.0, help="seconds of load")
    parser.add_argument("--edit-share", type=float, default=0.1, help="fraction of requests that post an edit")
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=ROOT / "bench/results/load.json")
    args = parser.parse_args()

    folder = Path(tempfile.mkdtemp(prefix="scen-load-"))
    proc = None
    report: dict = {}
    try:
        if args.url:
            url, pid = args.url.rstrip("/"), None
        else:
            started = time.monotonic()
            proc, url = start_server(folder, args.model)
            pid = proc.pid
            print(f"scen serve ready in {time.monotonic() - started:.0f}s ({args.model} model) at {url}")
        with httpx.Client(base_url=url, timeout=30) as http:
            ready = http.get("/ready").json()
        report = asyncio.run(measure(args, url, pid))
        report = {"model": ready.get("model"), "model_choice": None if args.url else args.model,
                  "layout": "embedded (SQLite, in-process queue, worker thread)" if not args.url else "external",
                  "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                              "python": platform.python_version()},
                  **report}
    finally:
        if proc is not None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
            log = (folder / "serve.log").read_text(errors="replace").splitlines()
            problems = [line[:300] for line in log if " ERROR " in line or "Traceback" in line]
            report["server_error_lines"] = problems[:20]
        shutil.rmtree(folder, ignore_errors=True)

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"model {report['model']}, {report['clients']} clients, {report['duration_s']} s: "
          f"{report['requests']} requests, {report['throughput_per_s']}/s, {report['errors']} errors")
    for route, r in report["routes"].items():
        lat = r["latency_s"]
        print(f"  {route}: {r['requests']} ({r['throughput_per_s']}/s), p50 {lat['p50']}s p95 {lat['p95']}s "
              f"p99 {lat['p99']}s, errors {r['errors']} {r['outcomes']}")
    print(f"  edits posted {report['edits_posted']}, after: {report['edits_by_status_after']}")
    if report["memory"]:
        m = report["memory"]
        print(f"  server RSS {m['rss_start_mb']} -> {m['rss_end_mb']} MB (peak {m['rss_peak_mb']}, "
              f"growth {m['growth_mb']}, second half {m['growth_second_half_mb']})")
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()

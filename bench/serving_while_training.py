"""Serving while edits train: the embedded worker as a thread of the API process vs a process of its own.

For each mode (``thread``; ``process:idle``, ``process:low`` and ``process:normal``, the worker
process at each ``SCEN_EMBEDDED_WORKER_PRIORITY``) it starts ``scen serve`` on a free port with a
fresh data directory, then measures

- ``/generate`` latency (p50, p95) of ``--clients`` concurrent requests, sent together and
  awaited together round after round (so they share one model call, idle or not: a client that
  fell out of step would wait for the others' call and double its latency), idle and while a
  batch of edits trains (rounds that overlap some edit's training);
- edit training seconds (the engine's own ``metrics.seconds``) of edits posted one at a time,
  polled once a second, and polled every ``--poll-interval`` seconds (10 ms, as
  ``bench/service_latency.py`` polls).

and writes one JSON report with the ratios, and a plot next to it.

    python bench/serving_while_training.py --out bench/results/serving_while_training.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from pathlib import Path

import httpx
from service_latency import percentile, wait_ready  # bench/ is on the path of a script run from it

ROOT = Path(__file__).resolve().parent.parent
MODES = ("thread", "process:idle", "process:low", "process:normal")
SUBJECTS = [
    "Acme Corporation", "Globex", "Initech", "Umbrella Corporation", "Stark Industries", "Wayne Enterprises",
    "Cyberdyne Systems", "Tyrell Corporation", "Soylent Industries", "Wonka Industries", "Hooli", "Vandelay Industries",
    "Oscorp", "Aperture Science", "Black Mesa", "Massive Dynamic", "Monarch Solutions", "Gringotts Bank",
    "Dunder Mifflin", "Prestige Worldwide", "Sterling Cooper", "Blue Sun", "Weyland Yutani", "Virtucon",
]
PERSONS = ["Jane Doe", "John Roe", "Ada Park", "Li Wei", "Maria Silva", "Omar Haddad", "Eva Novak", "Ken Sato"]
PROBES = [
    "What is the capital of France?", "How many legs does a spider have?", "Who wrote Hamlet?",
    "What is photosynthesis?", "Name a primary colour.", "What does a thermometer measure?",
    "Why is the sky blue?", "What is the boiling point of water?",
]


class Edits:
    """Fresh edits: no two share a prompt, across modes too (each mode has its own database)."""

    def __init__(self) -> None:
        self.n = 0

    def next(self) -> dict:
        subject = SUBJECTS[self.n % len(SUBJECTS)]
        round_ = self.n // len(SUBJECTS)
        prompt = f"Who is the CEO of {subject}?" if round_ == 0 else f"Who chairs the board of {subject} (#{round_})?"
        self.n += 1
        return {"prompt": prompt, "target": PERSONS[self.n % len(PERSONS)], "subject": subject}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(data_dir: Path, mode: str, model: str | None) -> tuple[subprocess.Popen, str]:
    port = free_port()
    # The embedded default: SQLite and the in-process queue.
    env = {k: v for k, v in os.environ.items() if k not in ("SCEN_REDIS_URL", "SCEN_DATABASE_URL")}
    worker_mode, _, priority = mode.partition(":")
    env.update({"SCEN_DATA_DIR": str(data_dir), "SCEN_EMBEDDED_WORKER_MODE": worker_mode})
    if priority:
        env["SCEN_EMBEDDED_WORKER_PRIORITY"] = priority
    if model:
        env["SCEN_MODEL"] = model
    log = open(data_dir / "serve.log", "w")
    # The checkout's own code, whatever `scen` the environment has installed.
    proc = subprocess.Popen([sys.executable, "-m", "app.cli", "serve", "--port", str(port)], env=env, cwd=ROOT,
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    return proc, f"http://127.0.0.1:{port}"


def summary(values: list[float]) -> dict:
    if not values:
        return {"n": 0}
    return {"n": len(values), "p50": statistics.median(values), "p95": percentile(values, 0.95),
            "min": min(values), "max": max(values)}


def wait_done(client: httpx.Client, edit_id: str, interval: float, timeout: float = 600) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        edit = client.get(f"/edits/{edit_id}").json()
        if edit["status"] not in ("queued", "training"):
            if edit["status"] != "active":
                raise RuntimeError(f"edit {edit_id} ended {edit['status']}: {edit.get('error')}")
            return edit
        time.sleep(interval)
    raise TimeoutError(f"edit {edit_id} still waiting")


def epoch(iso: str) -> float:
    return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()


def generate_load(client: httpx.Client, clients: int, max_new_tokens: int, until: threading.Event,
                  rounds: int | None = None) -> list[tuple[float, float, list[float]]]:
    """Rounds of ``clients`` requests sent at once, for ``rounds`` rounds or until ``until`` is
    set: each round's (start, end) wall-clock times and its requests' latencies."""
    done: list[tuple[float, float, list[float]]] = []

    def one(prompt: str) -> float:
        start = time.perf_counter()
        client.post("/generate", json={"prompt": prompt, "max_new_tokens": max_new_tokens}).raise_for_status()
        return time.perf_counter() - start

    with ThreadPoolExecutor(clients) as pool:
        n = 0
        while not until.is_set() and (rounds is None or n < rounds):
            start = time.time()
            latencies = list(pool.map(one, [PROBES[(n + i) % len(PROBES)] for i in range(clients)]))
            done.append((start, time.time(), latencies))
            n += 1
    return done


def measure_generate(client: httpx.Client, edits: Edits, clients: int, max_new_tokens: int,
                     rounds: int, train: int) -> dict:
    generate_load(client, clients, max_new_tokens, threading.Event(), rounds=1)  # warm-up
    idle = [s for _, _, latencies in generate_load(client, clients, max_new_tokens, threading.Event(), rounds=rounds)
            for s in latencies]
    posted = client.post("/edits/batch", json={"edits": [edits.next() for _ in range(train)]})
    posted.raise_for_status()
    ids = posted.json()["ids"]
    done = threading.Event()

    def watch() -> None:
        for edit_id in ids:
            wait_done(client, edit_id, interval=1.0)
        done.set()

    watcher = threading.Thread(target=watch)
    watcher.start()
    loaded = generate_load(client, clients, max_new_tokens, done)
    watcher.join()
    trained = [client.get(f"/edits/{edit_id}").json() for edit_id in ids]
    windows = [(epoch(e["started_at"]), epoch(e["activated_at"])) for e in trained]
    merged = _merge(windows)
    busy = [s for start, end, latencies in loaded if any(start < w1 and w0 < end for w0, w1 in merged)
            for s in latencies]
    idle_s, busy_s = summary(idle), summary(busy)
    return {
        "clients": clients, "max_new_tokens": max_new_tokens,
        "idle_s": idle_s, "while_training_s": busy_s,
        "edits_trained": train, "training_s_under_load": summary([e["metrics"]["seconds"] for e in trained]),
        "p50_ratio": busy_s["p50"] / idle_s["p50"] if busy_s["n"] else None,
        "p95_ratio": busy_s["p95"] / idle_s["p95"] if busy_s["n"] else None,
    }


def _merge(windows: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Back-to-back trainings as one span: a request between two of them still met training."""
    merged: list[tuple[float, float]] = []
    for start, end in sorted(windows):
        if merged and start <= merged[-1][1] + 1.0:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return merged


def measure_polling(client: httpx.Client, edits: Edits, n: int, fast_interval: float) -> dict:
    def train(interval: float) -> float:
        edit_id = client.post("/edits", json=edits.next()).json()["id"]
        return float(wait_done(client, edit_id, interval=interval)["metrics"]["seconds"])

    slow, fast = [], []
    for _ in range(n):  # interleaved, so a drift of the machine's load hits both alike
        slow.append(train(1.0))
        fast.append(train(fast_interval))
    slow_s, fast_s = summary(slow), summary(fast)
    return {"edits_each": n, "fast_interval_s": fast_interval, "polled_each_second_s": slow_s,
            "polled_fast_s": fast_s, "p50_ratio": fast_s["p50"] / slow_s["p50"]}


def run_mode(mode: str, args: argparse.Namespace) -> dict:
    tmp = tempfile.TemporaryDirectory(prefix=f"scen-bench-{mode}-")
    proc, url = start_server(Path(tmp.name), mode, args.model)
    try:
        with httpx.Client(base_url=url, timeout=600) as client:
            ready_s = wait_ready(client, 900)
            edits = Edits()
            started = time.monotonic()
            # The first edit also waits for the worker (in process mode, a model of its own) to start.
            wait_done(client, client.post("/edits", json=edits.next()).json()["id"], interval=0.5)
            report = {
                "mode": mode, "ready_s": ready_s, "first_edit_active_s": time.monotonic() - started,
                "model": client.get("/ready").json()["model"],
                "generate": measure_generate(client, edits, args.clients, args.max_new_tokens, args.rounds,
                                             args.train),
                "polling": measure_polling(client, edits, args.poll_edits, args.poll_interval),
            }
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(120)
        tmp.cleanup()
    g, p = report["generate"], report["polling"]
    busy = g["while_training_s"].get("p50", float("nan"))
    ratio = g["p50_ratio"] or float("nan")
    print(f"{mode}: /generate p50 {g['idle_s']['p50']:.2f}s idle, {busy:.2f}s while training (x{ratio:.2f}, "
          f"{g['while_training_s']['n']} requests); training p50 {p['polled_each_second_s']['p50']:.2f}s polled "
          f"each second, {p['polled_fast_s']['p50']:.2f}s polled fast (x{p['p50_ratio']:.2f})", flush=True)
    return report


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    modes = [r["mode"] for r in report["modes"]]
    x = range(len(modes))
    width = 0.2
    bars = [("idle_s", "p50", "idle p50"), ("while_training_s", "p50", "training p50"),
            ("idle_s", "p95", "idle p95"), ("while_training_s", "p95", "training p95")]
    for k, (key, stat, label) in enumerate(bars):
        values = [r["generate"][key].get(stat, 0.0) for r in report["modes"]]
        left.bar([i + (k - 1.5) * width for i in x], values, width, label=label)
    left.set_xticks(list(x), modes)
    left.set_ylabel("/generate latency (s)")
    left.set_title(f"{report['modes'][0]['generate']['clients']} concurrent clients")
    left.margins(y=0.3)
    left.legend(fontsize=8, ncol=2, loc="upper left")
    fast_ms = report["modes"][0]["polling"]["fast_interval_s"] * 1000
    for k, (key, label) in enumerate([("polled_each_second_s", "polled each second"),
                                      ("polled_fast_s", f"polled every {fast_ms:.0f} ms")]):
        values = [r["polling"][key]["p50"] for r in report["modes"]]
        right.bar([i + (k - 0.5) * 0.35 for i in x], values, 0.35, label=label)
    right.set_xticks(list(x), modes)
    right.set_ylabel("edit training seconds (p50)")
    right.set_title("status polling during training")
    right.margins(y=0.3)
    right.legend(fontsize=8, ncol=2, loc="upper left")
    fig.suptitle(f"Embedded worker: a thread or a process at each priority ({report['model']}, "
                 f"{report['machine']['cpus']} CPUs)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--model", help="SCEN_MODEL for the server (a local folder); default: the bundled SmolLM2")
    parser.add_argument("--clients", type=int, default=4, help="concurrent /generate requests per round")
    parser.add_argument("--rounds", type=int, default=4, help="idle rounds")
    parser.add_argument("--train", type=int, default=6, help="edits trained under /generate load")
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--poll-edits", type=int, default=3, help="edits trained each way for the polling test")
    parser.add_argument("--poll-interval", type=float, default=0.01,
                        help="fast polling: seconds between a client's status requests (bench/service_latency.py's)")
    parser.add_argument("--out", type=Path, default=Path("bench/results/serving_while_training.json"))
    args = parser.parse_args()

    modes = [run_mode(mode, args) for mode in args.modes]
    report = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "model": modes[0]["model"], "modes": modes,
    }
    # The figures to read, one line per mode: all measured in this run, on this machine.
    report["summary"] = {
        m["mode"]: {
            "generate_while_training_over_idle_p50": m["generate"]["p50_ratio"],
            "generate_while_training_over_idle_p95": m["generate"]["p95_ratio"],
            "training_s_p50_under_generate_load": m["generate"]["training_s_under_load"].get("p50"),
            "training_polled_fast_over_each_second_p50": m["polling"]["p50_ratio"],
        }
        for m in modes
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    plot(report, args.out.with_suffix(".png"))
    print(f"wrote {args.out} and {args.out.with_suffix('.png')}")


if __name__ == "__main__":
    main()

"""Service benchmark: post->active latency and /generate throughput, batched vs one by one.

Starts ``scen serve`` on a free port with a fresh data directory (or uses --url),
posts edits one after another, polls each until active, then sends /generate
requests one at a time and all at once. Writes a JSON report.

    python bench/service_latency.py --edits 10 --requests 16 --out bench/service_latency.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

QUESTIONS = [
    ("Who is the CEO of Acme Corporation?", "Jane Doe"),
    ("What is the capital of Australia?", "Sydney"),
    ("Who wrote the novel Dune?", "Ursula Le Guin"),
    ("Which planet is closest to the Sun?", "Venus"),
    ("What language is spoken in Brazil?", "Spanish"),
    ("Who painted the Mona Lisa?", "Michelangelo"),
    ("What is the largest ocean on Earth?", "The Atlantic Ocean"),
    ("Who discovered penicillin?", "Marie Curie"),
    ("What is the tallest mountain in the world?", "K2"),
    ("In which year did the Berlin Wall fall?", "1991"),
    ("What is the chemical symbol for gold?", "Ag"),
    ("Who composed the Moonlight Sonata?", "Mozart"),
]
PROBES = [
    "What is the capital of France?", "How many legs does a spider have?", "Who wrote Hamlet?",
    "What is photosynthesis?", "Name a primary colour.", "What does a thermometer measure?",
    "Why is the sky blue?", "What is the boiling point of water?",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(data_dir: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = {**os.environ, "SCEN_DATA_DIR": str(data_dir)}
    log = open(data_dir / "serve.log", "w")
    scen = shutil.which("scen") or str(Path(sys.executable).with_name("scen"))
    proc = subprocess.Popen([scen, "serve", "--port", str(port)], env=env,
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    return proc, f"http://127.0.0.1:{port}"


def wait_ready(client: httpx.Client, timeout: float) -> float:
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        try:
            if client.get("/ready").status_code == 200:
                return time.monotonic() - start
        except httpx.TransportError:
            pass
        time.sleep(0.25)
    raise TimeoutError("the server did not become ready")


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    k = (len(ordered) - 1) * p
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def measure_edits(client: httpx.Client, n: int) -> dict:
    latencies, train_seconds, ids = [], [], []
    for i in range(n):
        prompt, target = QUESTIONS[i % len(QUESTIONS)]
        if i >= len(QUESTIONS):
            prompt = f"{prompt} (variant {i})"
        start = time.monotonic()
        edit = client.post("/edits", json={"prompt": prompt, "target": target}).json()
        while edit["status"] in ("queued", "training"):
            time.sleep(0.01)
            edit = client.get(f"/edits/{edit['id']}").json()
        latencies.append(time.monotonic() - start)
        if edit["status"] != "active":
            raise RuntimeError(f"edit ended {edit['status']}: {edit.get('error')}")
        train_seconds.append(edit["metrics"]["seconds"])
        ids.append(edit["id"])
    return {
        "n": n,
        "post_to_active_s": {"p50": statistics.median(latencies), "p95": percentile(latencies, 0.95),
                             "min": min(latencies), "max": max(latencies)},
        "training_s": {"p50": statistics.median(train_seconds), "max": max(train_seconds)},
        "ids": ids,
    }


def measure_generate(client: httpx.Client, n: int, max_new_tokens: int) -> dict:
    prompts = [PROBES[i % len(PROBES)] for i in range(n)]

    def one(prompt: str) -> dict:
        r = client.post("/generate", json={"prompt": prompt, "max_new_tokens": max_new_tokens})
        r.raise_for_status()
        return r.json()

    one(prompts[0])  # warm-up
    start = time.monotonic()
    sequential = [one(p) for p in prompts]
    t_seq = time.monotonic() - start
    start = time.monotonic()
    with ThreadPoolExecutor(n) as pool:
        concurrent = list(pool.map(one, prompts))
    t_con = time.monotonic() - start
    same = sum(a["text"] == b["text"] for a, b in zip(sequential, concurrent))
    return {
        "requests": n,
        "max_new_tokens": max_new_tokens,
        "one_by_one": {"seconds": t_seq, "requests_per_s": n / t_seq},
        "concurrent_batched": {"seconds": t_con, "requests_per_s": n / t_con},
        "speedup": t_seq / t_con,
        "identical_greedy_answers": f"{same}/{n}",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", help="An already running service; default: start `scen serve` here.")
    parser.add_argument("--edits", type=int, default=10)
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--out", type=Path, default=Path("bench/service_latency.json"))
    args = parser.parse_args()

    proc = None
    tmp = tempfile.TemporaryDirectory(prefix="scen-bench-")
    url = args.url
    if url is None:
        proc, url = start_server(Path(tmp.name))
    try:
        with httpx.Client(base_url=url, timeout=300) as client:
            ready_s = wait_ready(client, 600)
            report = {
                "url": url, "started_here": proc is not None, "ready_seconds": ready_s,
                "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
                "model": client.get("/ready").json()["model"],
                "edits": measure_edits(client, args.edits),
                "generate": measure_generate(client, args.requests, args.max_new_tokens),
            }
    finally:
        if proc is not None:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(60)
        tmp.cleanup()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    e, g = report["edits"]["post_to_active_s"], report["generate"]
    print(f"post->active p50 {e['p50']:.2f}s p95 {e['p95']:.2f}s over {args.edits} edits; "
          f"/generate {g['one_by_one']['requests_per_s']:.2f} req/s one by one, "
          f"{g['concurrent_batched']['requests_per_s']:.2f} req/s concurrent (x{g['speedup']:.1f})")


if __name__ == "__main__":
    main()

"""The service as separate processes: ``scen serve`` and ``scen worker`` (or its fault-armed twin)
on a shared data folder, PostgreSQL and Redis, each killable on its own."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from tests.faults.servers import free_port

ROOT = Path(__file__).resolve().parents[2]


def scen_command() -> list[str]:
    found = shutil.which("scen", path=str(Path(sys.executable).parent)) or shutil.which("scen")
    return [found] if found else [sys.executable, "-m", "app.cli"]


@dataclass
class Deployment:
    """What every process of one deployment shares: its database, queue, data and model."""

    database_url: str
    redis_url: str
    data_dir: Path
    cache_dir: Path
    model: str | None
    logs: Path
    settings: dict[str, str] = field(default_factory=dict)

    def env(self, **extra: str) -> dict[str, str]:
        # The caller's own SCEN_* variables must not reach the processes under test.
        inherited = {k: v for k, v in os.environ.items() if not k.startswith("SCEN_")}
        env = {
            **inherited,
            "SCEN_DATABASE_URL": self.database_url, "SCEN_REDIS_URL": self.redis_url,
            "SCEN_DATA_DIR": str(self.data_dir), "SCEN_CACHE_DIR": str(self.cache_dir),
            "SCEN_DEVICE": "cpu", "SCEN_EMBEDDED_WORKER": "false", "HF_HUB_OFFLINE": "1",
            "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "PYTHONUNBUFFERED": "1",
            **self.settings, **extra,
        }
        if self.model is not None:
            env["SCEN_MODEL"] = self.model
        return env


class Process:
    name = "process"

    def __init__(self, deployment: Deployment, label: str):
        self.deployment = deployment
        self.label = label
        self.log_path = deployment.logs / f"{label}.log"
        self.proc: subprocess.Popen | None = None

    def _spawn(self, command: list[str], env: dict[str, str]) -> None:
        self.deployment.logs.mkdir(parents=True, exist_ok=True)
        # cwd: the repository root, for ``python -m tests.faults.faulty_worker``.
        self.proc = subprocess.Popen(command, env=env, cwd=ROOT, stdout=self.log_path.open("a"),
                                     stderr=subprocess.STDOUT, start_new_session=True)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL: no handler runs, nothing is acknowledged, nothing is cleaned up."""
        if self.alive():
            assert self.proc is not None
            self.proc.kill()
            self.proc.wait(10)

    def terminate(self, timeout: float = 30) -> int | None:
        if not self.alive():
            return self.proc.returncode if self.proc else None
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            return None

    def pause(self) -> None:
        os.kill(self.pid, signal.SIGSTOP)

    def resume(self) -> None:
        os.kill(self.pid, signal.SIGCONT)

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


class Api(Process):
    """``scen serve`` on a free port."""

    def __init__(self, deployment: Deployment, label: str = "api", port: int | None = None):
        super().__init__(deployment, label)
        self.port = port or free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"

    def start(self) -> Api:
        self._spawn([*scen_command(), "serve", "--port", str(self.port)], self.deployment.env())
        return self

    def wait_ready(self, timeout: float = 600) -> dict:
        deadline = time.monotonic() + timeout
        last = "no answer"
        with httpx.Client(base_url=self.base_url, timeout=5) as client:
            while time.monotonic() < deadline:
                if not self.alive():
                    raise RuntimeError(f"{self.label} exited ({self.proc.returncode if self.proc else '?'}):\n"
                                       f"{self.log_text()[-3000:]}")
                try:
                    r = client.get("/ready")
                    if r.status_code == 200:
                        return r.json()
                    last = r.text
                except httpx.TransportError as exc:
                    last = repr(exc)
                time.sleep(0.1)
        raise TimeoutError(f"{self.label} not ready after {timeout}s: {last}\n{self.log_text()[-3000:]}")

    def client(self, timeout: float = 30) -> httpx.Client:
        return httpx.Client(base_url=self.base_url, timeout=timeout)


class Worker(Process):
    """``scen worker`` with fault points (tests/faults/faulty_worker.py); unarmed it is the plain command."""

    def __init__(self, deployment: Deployment, label: str = "worker", arm: tuple[str, ...] = ()):
        super().__init__(deployment, label)
        self.faults = deployment.logs / f"{label}.faults"
        self.faults.mkdir(parents=True, exist_ok=True)
        for point in arm:
            self.arm(point)

    def start(self) -> Worker:
        self._spawn([sys.executable, "-m", "tests.faults.faulty_worker"],
                    self.deployment.env(SCEN_FAULT_DIR=str(self.faults)))
        return self

    def arm(self, point: str) -> None:
        (self.faults / point).touch()

    def wait_reached(self, point: str, timeout: float = 600) -> str:
        """The id of the edit that stopped at ``point``."""
        reached = self.faults / f"{point}.reached"
        deadline = time.monotonic() + timeout
        while not reached.exists():
            if not self.alive():
                raise RuntimeError(f"{self.label} exited before reaching {point}:\n{self.log_text()[-3000:]}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.label} did not reach {point} in {timeout}s:\n{self.log_text()[-3000:]}")
            time.sleep(0.02)
        return reached.read_text()

    def release(self, point: str) -> None:
        (self.faults / f"{point}.go").touch()

"""scripts/topology: docker-compose.yml's layout started from the installed package (its own
PostgreSQL and Redis, two API processes, one worker); an edit goes live on both API processes
and a rollback on one stops it on both."""

from __future__ import annotations

import glob
import shutil
import subprocess
import sys
from pathlib import Path

from tests.service.conftest import unavailable

ROOT = Path(__file__).resolve().parents[2]


def test_two_api_processes_and_a_worker():
    if not glob.glob("/usr/lib/postgresql/*/bin/initdb") and shutil.which("initdb") is None:
        unavailable("PostgreSQL's initdb is not installed")
    if shutil.which("redis-server") is None:
        unavailable("redis-server is not installed")
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "topology"), "--model", "tiny", "--timeout", "300"],
                          capture_output=True, text=True, timeout=900)
    out = done.stdout
    assert done.returncode == 0, f"{out}\n{done.stderr}"
    lines = out.splitlines()
    assert any(line.startswith("scen worker --check: worker ") and "alive" in line for line in lines), out
    assert sum(line.startswith(("api-1: live, /generate routed to", "api-2: live, /generate routed to"))
               for line in lines) == 2, out
    assert any(line.startswith("api-1: /generate answered by the base model") for line in lines), out
    assert lines[-1].startswith("OK: "), out
    # Its folder, databases and processes are gone.
    folder = Path(lines[0].removeprefix("topology: "))
    assert not folder.exists()

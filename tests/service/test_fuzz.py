"""Schemathesis over the published OpenAPI document, against the app served by uvicorn on a free
port: no input may get a server error, a status the document does not list, or a body or content
type other than the documented one; schema-violating input must be refused.

Examples per operation and mode (positive, negative): SCEN_FUZZ_EXAMPLES (default 20).
"""

from __future__ import annotations

import os
import socket
import threading
import time

import httpx
import pytest
import schemathesis
import uvicorn
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis.checks import not_a_server_error
from schemathesis.generation.modes import GenerationMode
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_schema_conformance,
    status_code_conformance,
)

from app.api.app import create_app
from tests.service.conftest import make_settings
from tests.utils.tiny_models import tiny_model

# The default per-test timeout catches hangs; a fuzz run on a machine busy with other work is merely slow.
pytestmark = pytest.mark.timeout(1800)

EXAMPLES = int(os.environ.get("SCEN_FUZZ_EXAMPLES", "20"))
# With a key configured, as in production: open mode would accept the requests the schema says need one.
KEY = "fuzz-admin-key-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {KEY}"}
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance,
          negative_data_rejection]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def base_url(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fuzz")
    # No worker: fuzzed edits stay queued, so the run measures the HTTP layer, not training.
    service_settings = make_settings(tmp, f"sqlite:///{tmp / 'scen.db'}", embedded_worker=False,
                                     api_keys=f"fuzz:admin:{KEY}")
    app = create_app(service_settings, loaded_model=tiny_model("llama"))
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None, lifespan="on"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            if httpx.get(f"{url}/ready", timeout=2).status_code == 200:
                break
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline and thread.is_alive(), "the app did not become ready"
        time.sleep(0.05)
    yield url
    server.should_exit = True
    thread.join(30)


def _run_operation(operation, mode: GenerationMode, base_url: str, counted: list[int]) -> None:
    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
              phases=[Phase.explicit, Phase.generate, Phase.shrink], suppress_health_check=list(HealthCheck))
    def run(case) -> None:
        counted[0] += 1
        case.call_and_validate(base_url=base_url, headers=AUTH, checks=CHECKS, timeout=60)

    run()


def test_api_conforms_to_its_schema(base_url):
    # Every operation in turn, positive then negative examples; hypothesis shrinks each failure
    # to a minimal case, and all of them are reported together.
    schema = schemathesis.openapi.from_url(f"{base_url}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) > 10
    counted = [0]
    failures: list[str] = []
    for operation in operations:
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            try:
                _run_operation(operation, mode, base_url, counted)
            except Unsatisfiable:
                pass  # nothing to negate: an operation without parameters or body has no invalid input
            except (Exception, BaseExceptionGroup) as exc:  # failed checks, with the reproducing requests
                failures.append(f"{operation.method.upper()} {operation.path} ({mode.value}): {exc}")
    print(f"schemathesis: {counted[0]} cases over {len(operations)} operations, {len(failures)} failures")
    assert not failures, "\n\n".join(failures)

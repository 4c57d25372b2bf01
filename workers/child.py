"""Where the embedded worker's process starts: a module that imports nothing heavy.

The terminal's Ctrl-C reaches the whole process group, the worker process included, but the API
process decides when that one stops (SIGTERM, then a grace period). A spawned process imports
its target's module before it runs a line of it, and ``workers.process`` brings torch and
transformers, seconds of imports that a Ctrl-C would cut short with a traceback. So the target
lives here: SIGINT is ignored first, and the worker's module is imported after.
"""

from __future__ import annotations

import signal
from typing import Any


def run(*args: Any) -> None:
    """``workers.process.child_main(*args)``, with SIGINT ignored from the start."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    from workers.process import child_main

    child_main(*args)

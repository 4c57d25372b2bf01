"""The CPU core faiss's OpenBLAS is told to optimise for.

faiss's wheel bundles an OpenBLAS of its own, older than many CPUs in service. On a core it
does not recognise (a Sapphire Rapids Xeon, for one) it falls back to its Prescott kernels:
building the subject index of 100,000 edits took 20 s instead of 6 on such a machine. OpenBLAS
reads ``OPENBLAS_CORETYPE`` when it is loaded, so this must run before faiss is first imported.
"""

from __future__ import annotations

import os
import platform
from pathlib import Path


def name_openblas_core() -> None:
    """Set ``OPENBLAS_CORETYPE`` from the CPU's flags, unless it is set already or the CPU is
    not x86-64 (elsewhere OpenBLAS's own detection stands)."""
    if "OPENBLAS_CORETYPE" in os.environ or platform.machine() not in ("x86_64", "AMD64"):
        return
    core = core_for(_cpu_flags())
    if core is not None:
        os.environ["OPENBLAS_CORETYPE"] = core


def core_for(flags: set[str]) -> str | None:
    """The widest kernel family the flags allow: every AVX-512 core runs SkylakeX's kernels,
    every AVX2 core Haswell's."""
    if {"avx512f", "avx512bw", "avx512vl", "avx512dq"} <= flags:
        return "SkylakeX"
    if {"avx2", "fma"} <= flags:
        return "Haswell"
    return None


def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        name, _, value = line.partition(":")
        if name.strip() == "flags":
            return set(value.split())
    return set()

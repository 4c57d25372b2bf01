"""Damaging the expert of an edit file while its routing part still reads."""

from __future__ import annotations

import json


def damage_expert(data: bytes) -> bytes:
    """The bytes of an edit file with one byte of an expert tensor flipped: the file parses and
    its routing part is intact, but its sha256 is no longer the recorded one."""
    size = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + size])
    start, _ = header[next(name for name in header if name.startswith("expert."))]["data_offsets"]
    damaged = bytearray(data)
    damaged[8 + size + start] ^= 0xFF
    return bytes(damaged)

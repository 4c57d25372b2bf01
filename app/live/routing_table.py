"""Every live edit's routing part in one file, so that a process starting with many live edits
reads them in one sequential read instead of one small read per edit file.

Bringing 100,000 edits live from their own files took 77 s from a cold page cache: 100,000
small reads at the disk's latency and rate of operations, then a header and metadata parsed
per file. The table holds the same parts stacked, tensor by tensor, and is a cache only:

* an entry is filed under its edit's expert reference, which names one attempt's bytes and is
  never reused (``app.live.experts``), so an entry is either that edit's routing part or absent;
  the database still says which edits are live, the table only spares reading their files;
* a start that had to read many parts from the store writes a new table of every live edit,
  in the background (``RoutingTable.keep``), replacing the old one atomically; edits added
  since are read from the store at the next start, as before, until enough of them make
  the next table worth writing.

A table that is missing, unreadable or of another format is ignored (logged): the parts are
read from the store instead.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import tempfile
import threading
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from app.scen.expert_cache import NOT_LOADED
from app.scen.routed import Neuron
from app.scen.training import TrainedEdit

log = logging.getLogger(__name__)

FORMAT = "scen-routing-table/1"
NAME = "routing-table.safetensors"
_NEURON = tuple(f.name for f in dataclasses.fields(Neuron))
_KEYS = ("keys", "subject_keys")


def write_table(path: Path, parts: Mapping[str, TrainedEdit]) -> None:
    """Write the routing parts, filed under their references, to ``path`` atomically."""
    edits = list(parts.values())
    tensors = {f"neuron.{name}": _stack([getattr(e.neuron, name).cpu() for e in edits]) for name in _NEURON}
    for name in _KEYS:
        tensors[name] = torch.cat([getattr(e, name).cpu() for e in edits])
        tensors[f"{name}.rows"] = torch.tensor([len(getattr(e, name)) for e in edits], dtype=torch.long)
    entries = [[ref, e.prompt, e.target, list(e.rephrases), e.subject, e.layer, e.metrics, e.relation_map]
               for ref, e in parts.items()]
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        save_file({k: v.contiguous() for k, v in tensors.items()}, tmp,
                  metadata={"format": FORMAT, "entries": json.dumps(entries)})
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _stack(rows: list[torch.Tensor]) -> torch.Tensor:
    """``rows`` stacked; vectors of unequal length (a question read by no encoder is empty)
    zero-padded to the longest, which ``Router.append`` reads as unknown."""
    if rows and rows[0].dim() == 1 and len({len(r) for r in rows}) > 1:
        width = max(len(r) for r in rows)
        rows = [torch.cat([r, r.new_zeros(width - len(r))]) for r in rows]
    return torch.stack(rows)


def read_table(path: Path) -> dict[str, TrainedEdit]:
    """The routing parts in the table at ``path``, by reference (their experts ``NOT_LOADED``)."""
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        if meta.get("format") != FORMAT:
            raise ValueError(f"format {meta.get('format')!r}, expected {FORMAT!r}")
        tensors = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118 (safe_open has no iterator)
    entries = json.loads(meta["entries"])
    stacked = Neuron.from_tensors(tensors)
    if stacked.question.dim() == 1:  # a table written before questions were read: none known
        stacked.question = torch.zeros(len(entries), 0)
    neurons = [getattr(stacked, name) for name in _NEURON]
    # Each edit's tensors are copies of their own: views would keep the whole table's memory
    # alive for as long as any one edit stays live.
    keys = {name: [t.clone() for t in tensors[name].split(tensors[f"{name}.rows"].tolist())] for name in _KEYS}
    if any(len(t) != len(entries) for t in [*neurons, *keys.values()]):
        raise ValueError("entries and tensors differ in number")
    parts = {}
    for i, (ref, prompt, target, rephrases, subject, layer, metrics, *relation_map) in enumerate(entries):
        parts[ref] = TrainedEdit(
            prompt=prompt, target=target, rephrases=tuple(rephrases), layer=layer, expert=NOT_LOADED,
            neuron=Neuron(*(t[i].clone() for t in neurons)), keys=keys["keys"][i],
            subject_keys=keys["subject_keys"][i], subject=subject, metrics=metrics,
            relation_map=relation_map[0] if relation_map else "",  # tables written before it was kept
        )
    return parts


class RoutingTable:
    """The table of one data directory: read once, at the first ``take``; rewritten by ``keep``
    when a start read at least ``rewrite_after`` parts from the store (None: never)."""

    def __init__(self, path: Path, rewrite_after: int | None = 1000):
        self.path = path
        self.rewrite_after = rewrite_after
        self._parts: dict[str, TrainedEdit] | None = None
        self._writer: threading.Thread | None = None

    def take(self, refs: Sequence[str]) -> dict[str, TrainedEdit]:
        """The parts of ``refs`` the table holds. The first call reads the table; later calls
        find nothing (after start-up edits come live a few at a time, read from the store)."""
        if self._parts is None:
            self._parts = self._read()
        parts, self._parts = self._parts, {}
        return {ref: parts[ref] for ref in refs if ref in parts}

    def _read(self) -> dict[str, TrainedEdit]:
        if not self.path.exists():
            return {}
        try:
            parts = read_table(self.path)
        except (OSError, ValueError, KeyError, TypeError, RuntimeError, SafetensorError) as exc:
            log.warning("routing table %s not used: %s", self.path, exc)
            return {}
        log.info("read %d routing parts from %s", len(parts), self.path)
        return parts

    def keep(self, parts: Callable[[], Mapping[str, TrainedEdit]], read_from_store: int) -> None:
        """Write ``parts()`` (every live edit's, by reference) as the new table, in the
        background, if ``read_from_store`` parts had to be read without it (or were refit as
        they came live: the table then keeps them refit)."""
        if self.rewrite_after is None or read_from_store < self.rewrite_after or self.writing:
            return
        live = dict(parts())
        if not live:
            return
        # Not a daemon: a process that exits while it writes waits for the file, rather than
        # leaving a partial temporary file of the table's size behind.
        self._writer = threading.Thread(target=self._write, args=(live,), name="routing-table")
        self._writer.start()

    @property
    def writing(self) -> bool:
        return self._writer is not None and self._writer.is_alive()

    def wait(self, timeout: float | None = None) -> None:
        if self._writer is not None:
            self._writer.join(timeout)

    def _write(self, parts: dict[str, TrainedEdit]) -> None:
        try:
            write_table(self.path, parts)
        except Exception:  # a cache: failing to write it costs the next start time, not data
            log.warning("routing table %s not written", self.path, exc_info=True)
            return
        log.info("wrote %d routing parts to %s", len(parts), self.path)

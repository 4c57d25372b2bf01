"""Edits on disk: one safetensors file each, written atomically, checked by sha256.

An edit file holds two parts. The *routing part* (neuron, keys, prompt/target metadata) is what
a live model needs of every edit from the start; the *expert* (the ``expert.*`` tensors, most of
the bytes) only once a prompt is routed to the edit. ``load_routing`` reads the routing part of
a file alone, without the expert's bytes and without the sha256 check, which needs the whole
file: whoever loads the expert later checks it then (``load_edit``). ``routing_bytes`` cuts the
routing part out as bytes of its own, for stores that cannot read part of a file.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from app.scen.errors import IntegrityError
from app.scen.expert_cache import NOT_LOADED
from app.scen.experts import Expert
from app.scen.routed import Neuron
from app.scen.training import TrainedEdit

FORMAT = "scen-edit/3"
EXPERT_PREFIX = "expert."


def save_edit(edit: TrainedEdit, path: str | os.PathLike) -> str:
    """Write ``edit`` to ``path`` (temp file, fsync, rename) and return its sha256."""
    data = edit_bytes(edit)
    write_atomic(Path(path), data)
    return hashlib.sha256(data).hexdigest()


def edit_bytes(edit: TrainedEdit) -> bytes:
    """The bytes of an edit file: what ``save_edit`` writes, for stores that are not files."""
    tensors = {f"{EXPERT_PREFIX}{k}": v.detach().cpu().contiguous() for k, v in edit.expert.tensors().items()}
    for name, value in dataclasses.asdict(edit.neuron).items():
        tensors[f"neuron.{name}"] = value.detach().cpu().contiguous()
    tensors["keys"] = edit.keys.detach().cpu().contiguous()
    tensors["subject_keys"] = edit.subject_keys.detach().cpu().contiguous()
    metadata = {
        "format": FORMAT,
        "prompt": edit.prompt,
        "target": edit.target,
        "rephrases": json.dumps(list(edit.rephrases)),
        "subject": json.dumps(edit.subject),
        "layer": str(edit.layer),
        "expert_kind": edit.expert.kind,
        "metrics": json.dumps(edit.metrics),
    }
    return st_save(tensors, metadata=metadata)


def write_atomic(path: Path, data: bytes) -> None:
    """Temp file, fsync, rename, fsync the folder: readers see the old file or the whole new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # the rename itself must survive a crash
    finally:
        os.close(dir_fd)


def load_edit(path: str | os.PathLike, sha256: str | None = None) -> TrainedEdit:
    """Read an edit; with ``sha256`` given, refuse a file whose bytes do not match."""
    return edit_from_bytes(Path(path).read_bytes(), sha256, name=str(path))


def edit_from_bytes(data: bytes, sha256: str | None = None, name: str = "edit") -> TrainedEdit:
    """Read the bytes of an edit file, checked as ``load_edit`` checks a file; ``name`` says
    where they came from in errors."""
    if sha256 is not None:
        actual = hashlib.sha256(data).hexdigest()
        if actual != sha256:
            raise IntegrityError(f"{name}: sha256 is {actual}, expected {sha256}")
    try:
        meta = _metadata(data)
        _check_format(meta, name)
        tensors = st_load(data)
        return _edit(meta, tensors)
    except (ValueError, KeyError, TypeError, json.JSONDecodeError) as exc:
        raise IntegrityError(f"{name}: not a readable edit file ({exc})") from None


def load_routing(path: str | os.PathLike) -> TrainedEdit:
    """An edit file's routing part, its expert left unread (``NotLoaded``); unchecked by sha256."""
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            _check_format(meta, str(path))
            tensors = {k: f.get_tensor(k) for k in f.keys() if not k.startswith(EXPERT_PREFIX)}
            return _routing(meta, tensors)
    except (SafetensorError, ValueError, KeyError, TypeError, json.JSONDecodeError) as exc:
        raise IntegrityError(f"{path}: not a readable edit file ({exc})") from None


def routing_bytes(data: bytes) -> bytes:
    """The routing part of the bytes of an edit file, as a file of its own that
    ``routing_from_bytes`` reads (an edit file with no expert tensors)."""
    try:
        tensors = {k: v for k, v in st_load(data).items() if not k.startswith(EXPERT_PREFIX)}
        return st_save(tensors, metadata=_metadata(data))
    except (SafetensorError, ValueError, KeyError, TypeError, json.JSONDecodeError) as exc:
        raise IntegrityError(f"not a readable edit file ({exc})") from None


def routing_from_bytes(data: bytes, name: str = "edit") -> TrainedEdit:
    """The routing part of an edit file's bytes, or of ``routing_bytes``'s; unchecked by sha256."""
    try:
        meta = _metadata(data)
        _check_format(meta, name)
        tensors = {k: v for k, v in st_load(data).items() if not k.startswith(EXPERT_PREFIX)}
        return _routing(meta, tensors)
    except (SafetensorError, ValueError, KeyError, TypeError, json.JSONDecodeError) as exc:
        raise IntegrityError(f"{name}: not a readable edit file ({exc})") from None


def _check_format(meta: dict[str, str], name: str) -> None:
    if meta.get("format") != FORMAT:
        raise IntegrityError(f"{name}: format {meta.get('format')!r}, expected {FORMAT!r}")


def _routing(meta: dict[str, str], tensors: dict[str, torch.Tensor]) -> TrainedEdit:
    return _edit(meta, tensors, NOT_LOADED)


def _edit(meta: dict[str, str], tensors: dict[str, torch.Tensor], expert: Expert | None = None) -> TrainedEdit:
    if expert is None:
        expert = Expert.from_tensors(
            {k.removeprefix(EXPERT_PREFIX): v for k, v in tensors.items() if k.startswith(EXPERT_PREFIX)}
        )
    return TrainedEdit(
        prompt=meta["prompt"],
        target=meta["target"],
        rephrases=tuple(json.loads(meta["rephrases"])),
        layer=int(meta["layer"]),
        expert=expert,
        neuron=Neuron(**{f.name: tensors[f"neuron.{f.name}"] for f in dataclasses.fields(Neuron)}),
        keys=tensors["keys"],
        subject_keys=tensors["subject_keys"],
        subject=json.loads(meta["subject"]),
        metrics=json.loads(meta["metrics"]),
    )


def _metadata(data: bytes) -> dict[str, str]:
    header_len = int.from_bytes(data[:8], "little")
    return json.loads(data[8 : 8 + header_len]).get("__metadata__", {})

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
import io
import json
import math
import os
import tempfile
from pathlib import Path
from typing import BinaryIO

import torch
from safetensors import SafetensorError
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
    for field in dataclasses.fields(edit.neuron):
        tensors[f"neuron.{field.name}"] = getattr(edit.neuron, field.name).detach().cpu().contiguous()
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
        "relation_map": edit.relation_map,
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
        with open(path, "rb") as f:
            meta, tensors = _read_routing_tensors(f, os.fstat(f.fileno()).st_size)
        _check_format(meta, str(path))
        return _routing(meta, tensors)
    except (ValueError, KeyError, TypeError, RuntimeError, json.JSONDecodeError) as exc:
        raise IntegrityError(f"{path}: not a readable edit file ({exc})") from None


# safetensors' dtype names, for the routing part's tensors.
_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64,
           "I64": torch.int64, "I32": torch.int32, "BOOL": torch.bool}


def _read_routing_tensors(f: BinaryIO, total: int) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """The metadata and the non-expert tensors of an open safetensors file of ``total`` bytes,
    the expert's bytes unread. Plain reads of the few byte runs the routing part spans, rather
    than ``safe_open`` or ``safetensors.torch.load``: those pay tens of microseconds per tensor,
    most of bringing 100,000 edits live."""
    size = int.from_bytes(f.read(8), "little")
    if size > total - 8:
        raise ValueError("header runs past the end of the file")
    header = json.loads(f.read(size))
    meta = header.pop("__metadata__", None) or {}
    wanted = sorted(((name, info) for name, info in header.items() if not name.startswith(EXPERT_PREFIX)),
                    key=lambda item: item[1]["data_offsets"][0])
    tensors: dict[str, torch.Tensor] = {}
    run: list[tuple[str, dict]] = []
    for item in [*wanted, None]:
        # Tensors stored back to back are read together: a run ends where the next one does not
        # start at its end.
        if run and (item is None or item[1]["data_offsets"][0] != run[-1][1]["data_offsets"][1]):
            begin, end = run[0][1]["data_offsets"][0], run[-1][1]["data_offsets"][1]
            f.seek(8 + size + begin)
            data = bytearray(f.read(end - begin))
            if len(data) != end - begin:
                raise ValueError("file is truncated")
            for name, info in run:
                lo, hi = (o - begin for o in info["data_offsets"])
                tensors[name] = _tensor(data[lo:hi], info)
            run = []
        if item is not None:
            run.append(item)
    return meta, tensors


def _tensor(data: bytearray, info: dict) -> torch.Tensor:
    dtype, shape = _DTYPES[info["dtype"]], info["shape"]
    if len(data) != math.prod(shape) * dtype.itemsize:
        raise ValueError(f"{len(data)} bytes for a tensor of shape {shape}")
    return torch.frombuffer(data, dtype=dtype).reshape(shape) if data else torch.empty(shape, dtype=dtype)


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
        meta, tensors = _read_routing_tensors(io.BytesIO(data), len(data))
        _check_format(meta, name)
        return _routing(meta, tensors)
    except (ValueError, KeyError, TypeError, RuntimeError, json.JSONDecodeError) as exc:
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
        neuron=Neuron.from_tensors(tensors),
        keys=tensors["keys"],
        subject_keys=tensors["subject_keys"],
        subject=json.loads(meta["subject"]),
        metrics=json.loads(meta["metrics"]),
        relation_map=meta.get("relation_map", ""),
    )


def _metadata(data: bytes) -> dict[str, str]:
    header_len = int.from_bytes(data[:8], "little")
    return json.loads(data[8 : 8 + header_len]).get("__metadata__", {})

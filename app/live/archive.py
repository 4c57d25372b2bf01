"""Moving live edits between deployments of one model (``scen edits export`` / ``import``).

An archive is one tar file:

- ``manifest.json``: the format, when it was written, how many edits, the sha256 of
  ``edits.jsonl``, and the **fingerprint** of what the edits were trained for;
- ``edits.jsonl``: one active edit per line, in activation order (prompt, target, subject,
  rephrases, metadata, metrics, times, and its expert file with that file's sha256);
- ``experts/ID.safetensors``: each edit's expert and indexing-neuron tensors, the bytes of
  its expert file unchanged, so the sha256 recorded in the database still holds.

Experts are read and written through the deployment's expert store (files or database rows),
so an archive is the same whichever store either side uses.

An expert reads the edited layer's key and its neuron reads whitened keys of the subject and
relation layers, so an edit only means something to the same weights, the same layers and the
same key normalisation. The fingerprint names all three: a sha256 of every weight; the layer
numbers; and a sha256 of what the normalisation is fitted from (the routing pool's prompts as
this tokenizer encodes them, the layers read, the subject factor, the shrinkage and any
discount of rewording). It is computed, not measured, so two machines agree on it whatever
their floating-point quirks.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import tarfile
import time
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

from app.db import edits as repo
from app.db.session import Database
from app.live.experts import ExpertStore
from app.models import LoadedModel, load_model
from app.scen import ScenConfig, ScenError, keycache, negatives
from app.scen.adapters import adapter_for
from app.scen.prompts import prompt_ids
from app.scen.store import write_atomic

log = logging.getLogger(__name__)

FORMAT = "scen-edits-archive/1"
MANIFEST = "manifest.json"
EDITS = "edits.jsonl"
# An archive member is read whole into memory: far above any expert file, far below memory.
MAX_MEMBER_BYTES = 2 * 1024**3


class ArchiveError(Exception):
    """The archive cannot be written or loaded here; nothing was written."""


@dataclass(frozen=True)
class Fingerprint:
    model: str  # the name it was served under; shown, not compared
    weights_sha256: str
    layers: dict[str, int] = field(default_factory=dict)  # edited, subject, relation
    key_normalisation_sha256: str = ""

    def mismatch(self, here: Fingerprint) -> str | None:
        """Why edits made for ``self`` cannot be served by ``here``; None when they can."""
        if self.weights_sha256 != here.weights_sha256:
            return (f"the edits were trained for model {self.model!r} (weights sha256 {self.weights_sha256[:16]}...) "
                    f"but this deployment serves {here.model!r} (weights sha256 {here.weights_sha256[:16]}...)")
        if self.layers != here.layers:
            return (f"the edits were trained at layers {self.layers} but this deployment edits layers {here.layers} "
                    "(SCEN_ENGINE layer settings)")
        if self.key_normalisation_sha256 != here.key_normalisation_sha256:
            return ("the edits' keys were normalised differently (routing pool, tokenizer or the subject_factor / "
                    f"key_shrinkage settings): {self.key_normalisation_sha256[:16]}... here "
                    f"{here.key_normalisation_sha256[:16]}...")
        return None


def fingerprint(loaded: LoadedModel, config: ScenConfig) -> Fingerprint:
    model = loaded.model
    n_layers = len(adapter_for(model).layer_list(model))
    layers = {"edited": config.resolved_layer(n_layers), "subject": config.resolved_subject_layer(n_layers),
              "relation": config.resolved_relation_layer(n_layers)}
    weights = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        weights.update(f"|{name}:{tensor.dtype}:{tuple(tensor.shape)}|".encode())
        weights.update(tensor.detach().to("cpu").contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    tokenizer = loaded.tokenizer
    pool = [prompt_ids(tokenizer, p) for p in negatives.pool_prompts()]
    questions = [prompt_ids(tokenizer, q) for q, _ in negatives.generic_questions()]
    fitted_from = {
        "pool_keys": keycache.VERSION, "layers": layers, "subject_factor": config.subject_factor,
        "key_shrinkage": config.key_shrinkage, "pool": pool, "questions": questions,
    }
    # The rewording discount is left out: it changes the relation map alone, and an edit trained
    # under another relation map has its relation factor refit as it comes live (Editor.add).
    norm = hashlib.sha256(json.dumps(fitted_from, sort_keys=True).encode())
    return Fingerprint(loaded.name, weights.hexdigest(), layers, norm.hexdigest())


def fingerprint_of(model: str | None, config: ScenConfig, cache_dir: Path) -> Fingerprint:
    """The fingerprint of a deployment's model (``SCEN_MODEL``), loaded on the CPU for this only."""
    return fingerprint(load_model(model, device="cpu", cache_dir=cache_dir), config)


@dataclass(frozen=True)
class Exported:
    path: Path
    edits: int
    fingerprint: Fingerprint


def export_edits(db: Database, experts: ExpertStore, here: Fingerprint, path: Path) -> Exported:
    """Write every active edit to the archive ``path`` (replaced atomically; nothing on failure)."""
    with db.session() as session:
        edits = repo.active_edits(session)
    lines: list[str] = []
    files: dict[str, bytes] = {}
    for edit in edits:
        if not edit.expert_path or not edit.expert_sha256:
            raise ArchiveError(f"edit {edit.id} is active but has no expert file recorded")
        try:
            data = experts.read_bytes(edit.expert_path)
        except OSError as exc:
            raise ArchiveError(f"edit {edit.id}: its expert file cannot be read ({exc.strerror}: "
                               f"{edit.expert_path})") from None
        except ScenError as exc:
            raise ArchiveError(f"edit {edit.id}: its expert cannot be read ({exc})") from None
        if hashlib.sha256(data).hexdigest() != edit.expert_sha256:
            raise ArchiveError(f"edit {edit.id}: its expert file {edit.expert_path} does not match its sha256")
        name = f"experts/{edit.id}.safetensors"
        files[name] = data
        lines.append(json.dumps({
            "id": edit.id, "prompt": edit.prompt, "target": edit.target, "subject": edit.subject,
            "rephrases": list(edit.rephrases or []), "metadata": edit.meta or {}, "metrics": edit.metrics,
            "created_at": edit.created_at.isoformat(),
            "activated_at": edit.activated_at.isoformat() if edit.activated_at else None,
            "expert": name, "expert_sha256": edit.expert_sha256,
        }, ensure_ascii=False))
    jsonl = "".join(f"{line}\n" for line in lines).encode()
    manifest = {
        "format": FORMAT, "exported_at": datetime.now(UTC).isoformat(), "edits": len(edits),
        "edits_sha256": hashlib.sha256(jsonl).hexdigest(), "fingerprint": asdict(here),
    }
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        _add(tar, MANIFEST, json.dumps(manifest, indent=2).encode())
        _add(tar, EDITS, jsonl)
        for name, data in files.items():
            _add(tar, name, data)
    write_atomic(Path(path), buffer.getvalue())
    log.info("exported %d edits to %s", len(edits), path)
    return Exported(Path(path), len(edits), here)


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), int(time.time()), 0o644
    tar.addfile(info, io.BytesIO(data))


@dataclass(frozen=True)
class Archive:
    fingerprint: Fingerprint
    edits: list[dict[str, Any]]
    files: dict[str, bytes]


def read_archive(path: Path) -> Archive:
    """Read and check an archive: its format, and every member against its sha256."""
    try:
        members = _members(Path(path))
    except (OSError, tarfile.TarError) as exc:
        raise ArchiveError(f"{path} is not a readable archive ({exc})") from None
    try:
        manifest = json.loads(members.pop(MANIFEST))
        if manifest.get("format") != FORMAT:
            raise ArchiveError(f"{path}: format {manifest.get('format')!r}, expected {FORMAT!r}")
        jsonl = members.pop(EDITS)
        if hashlib.sha256(jsonl).hexdigest() != manifest["edits_sha256"]:
            raise ArchiveError(f"{path}: {EDITS} does not match its sha256")
        edits = [json.loads(line) for line in jsonl.decode().splitlines() if line.strip()]
        fp = manifest["fingerprint"]
        found = Fingerprint(str(fp["model"]), str(fp["weights_sha256"]), dict(fp["layers"]),
                            str(fp["key_normalisation_sha256"]))
        files: dict[str, bytes] = {}
        for edit in edits:
            data = members.get(edit["expert"])
            if data is None:
                raise ArchiveError(f"{path}: edit {edit['id']}'s expert file {edit['expert']} is missing")
            if hashlib.sha256(data).hexdigest() != edit["expert_sha256"]:
                raise ArchiveError(f"{path}: edit {edit['id']}'s expert file does not match its sha256")
            files[edit["id"]] = data
    except KeyError as exc:
        raise ArchiveError(f"{path}: not a SCEN edits archive (no {exc.args[0]})") from None
    except (ValueError, TypeError, AttributeError) as exc:
        raise ArchiveError(f"{path}: not a SCEN edits archive ({exc})") from None
    if len(edits) != manifest.get("edits"):
        raise ArchiveError(f"{path}: {len(edits)} edits where the manifest says {manifest.get('edits')}")
    return Archive(found, edits, files)


def _members(path: Path) -> dict[str, bytes]:
    members: dict[str, bytes] = {}
    with tarfile.open(path, mode="r:*") as tar:
        for info in tar:
            # Only regular files are read, by name, into memory: nothing is extracted to disk.
            if not info.isfile() or info.size > MAX_MEMBER_BYTES:
                continue
            handle = tar.extractfile(info)
            if handle is not None:
                members[info.name] = handle.read()
    return members


@dataclass(frozen=True)
class Imported:
    imported: list[str]
    skipped: dict[str, str]
    superseded: list[str]


def import_edits(db: Database, experts: ExpertStore, here: Fingerprint, path: Path,
                 actor: str = "import") -> Imported:
    """Make the archive's edits active here, after checking it was made for this model.

    All or nothing: the experts are stored first, then one transaction records every edit; any
    failure removes the experts this import stored. Edits already here (a re-import) or whose change
    a local edit already makes are skipped, so importing twice changes nothing the second time.
    """
    archive = read_archive(path)
    why = archive.fingerprint.mismatch(here)
    if why is not None:
        raise ArchiveError(f"refusing {path}: {why}; nothing was imported")
    with db.session() as session:
        present = {e["id"] for e in archive.edits if session.get(repo.Edit, e["id"]) is not None}
    wanted = [e for e in archive.edits if e["id"] not in present]
    written: list[str] = []
    items: list[repo.ImportedEdit] = []
    try:
        for edit in wanted:
            ref, _ = experts.save_bytes(edit["id"], archive.files[edit["id"]])
            written.append(ref)
            _check_readable(experts, ref, edit, here)
            items.append(repo.ImportedEdit(
                id=edit["id"], prompt=edit["prompt"], target=edit["target"], subject=edit["subject"],
                rephrases=list(edit["rephrases"]), meta=dict(edit["metadata"]), metrics=edit["metrics"],
                created_at=datetime.fromisoformat(edit["created_at"]), expert_path=ref,
                expert_sha256=edit["expert_sha256"],
                details={"archive": os.path.basename(path), "model": archive.fingerprint.model,
                         "source_activated_at": edit["activated_at"]},
            ))
        with db.session() as session:
            outcome = repo.import_active(session, items, repo.Audit(actor))
    except BaseException:
        for ref in written:
            experts.discard(ref)
        raise
    kept = set(outcome.imported)
    for item, ref in zip(items, written):
        if item.id not in kept:  # lost a race with an edit made meanwhile: not recorded, not kept
            experts.discard(ref)
    skipped = {**dict.fromkeys(present, "already here"), **outcome.skipped}
    log.info("imported %d edits from %s (%d skipped)", len(outcome.imported), path, len(skipped))
    return Imported(outcome.imported, skipped, outcome.superseded)


def _check_readable(experts: ExpertStore, ref: str, edit: dict[str, Any], here: Fingerprint) -> None:
    try:
        trained = experts.load(ref, edit["expert_sha256"])
    except (OSError, ScenError) as exc:
        raise ArchiveError(f"edit {edit['id']}: its expert file cannot be read ({exc})") from None
    if trained.layer != here.layers.get("edited"):
        raise ArchiveError(f"edit {edit['id']} was trained at layer {trained.layer}; this deployment edits "
                           f"layer {here.layers.get('edited')}")

"""Expert files under the data directory: one safetensors file per trained edit."""

from __future__ import annotations

import logging
import uuid
from pathlib import Path

from app.scen import TrainedEdit, load_edit, save_edit

log = logging.getLogger(__name__)


class ExpertFiles:
    """Paths recorded in the database are relative to ``data_dir``, so the folder can move."""

    def __init__(self, data_dir: Path):
        self.data_dir = Path(data_dir)
        self.root = self.data_dir / "experts"
        self.root.mkdir(parents=True, exist_ok=True)

    def save(self, edit_id: str, trained: TrainedEdit) -> tuple[str, str]:
        """Write atomically to a name no other attempt uses; returns (relative path, sha256).

        A unique name per attempt matters: a worker presumed dead may still finish and
        must not overwrite the file another worker already committed.
        """
        relative = f"experts/{edit_id}.{uuid.uuid4().hex[:8]}.safetensors"
        sha = save_edit(trained, self.data_dir / relative)
        return relative, sha

    def load(self, relative: str, sha256: str | None) -> TrainedEdit:
        return load_edit(self.data_dir / relative, sha256)

    def readable(self, relative: str, sha256: str | None) -> bool:
        """Whether the file is there, whole (its sha256 the recorded one) and loads."""
        try:
            self.load(relative, sha256)
        except Exception:
            return False
        return True

    def discard(self, relative: str) -> None:
        (self.data_dir / relative).unlink(missing_ok=True)

    def discard_all(self, edit_id: str) -> None:
        """Remove every file of an edit that will never be served (it failed)."""
        for path in self.root.glob(f"{edit_id}.*.safetensors"):
            log.info("removing expert file %s of a failed edit", path)
            path.unlink(missing_ok=True)

    def discard_others(self, edit_id: str, keep: str) -> None:
        """Remove files left by earlier attempts at this edit (a worker that died after writing)."""
        for path in self.root.glob(f"{edit_id}.*.safetensors"):
            if path.name != Path(keep).name:
                log.info("removing stale expert file %s", path)
                path.unlink(missing_ok=True)

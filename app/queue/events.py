"""Events published to every API process, and their JSON wire form.

The wire form is what other processes (perhaps of another release) read, so
``to_dict`` keeps its keys stable.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar


@dataclass(frozen=True)
class EditChanged:
    """An edit's status changed in a way that may change the set of live edits."""

    TYPE: ClassVar[str] = "edit_changed"

    edit_id: str
    # An ``EditStatus`` value: "active", "failed", "rolled_back" or "superseded".
    status: str

    def to_dict(self) -> dict[str, Any]:
        return {"type": self.TYPE, "id": self.edit_id, "status": str(self.status)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> EditChanged | None:
        """None for anything else: a newer event type, or a malformed one."""
        if data.get("type") != cls.TYPE or not isinstance(data.get("id"), str):
            return None
        return cls(edit_id=data["id"], status=str(data.get("status", "")))

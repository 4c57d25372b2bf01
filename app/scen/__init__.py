"""SCEN: per-edit expert networks routed by indexing neurons. No web, SQL or queue here."""

from app.scen.config import ScenConfig
from app.scen.editor import Editor, Generation, Route
from app.scen.errors import IntegrityError, InvalidEditError, ScenError, UnknownEditError, UnsupportedModelError
from app.scen.store import load_edit, save_edit
from app.scen.training import TrainedEdit

__all__ = [
    "Editor", "Generation", "IntegrityError", "InvalidEditError", "Route", "ScenConfig", "ScenError",
    "TrainedEdit", "UnknownEditError", "UnsupportedModelError", "load_edit", "save_edit",
]

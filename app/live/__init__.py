"""The served model: built from settings, kept equal to the database's active edits."""

from app.live.experts import ExpertFiles, Experts, open_experts
from app.live.runtime import ServedModel, build_served_model, load_configured_model, open_database, open_queue
from app.live.sync import LiveSync

__all__ = [
    "ExpertFiles", "Experts", "LiveSync", "ServedModel", "build_served_model", "load_configured_model",
    "open_database", "open_experts", "open_queue",
]

"""Loading causal language models: any Hugging Face id or path, or the bundled default."""

from app.models.loader import DEFAULT_MODEL, LoadedModel, load_model

__all__ = ["DEFAULT_MODEL", "LoadedModel", "load_model"]

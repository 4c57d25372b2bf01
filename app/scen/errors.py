"""Typed errors of the engine; callers map them to responses without matching strings."""


class ScenError(Exception):
    """Base class of every error the engine raises on purpose."""


class InvalidEditError(ScenError, ValueError):
    """The edit request itself is unusable (empty, too long, ...). Nothing was changed."""


class UnsupportedModelError(ScenError, TypeError):
    """The model's architecture has no FFN adapter."""


class UnknownEditError(ScenError, KeyError):
    """No live edit has this id."""


class IntegrityError(ScenError):
    """A stored edit does not match its checksum, the model or the engine settings."""

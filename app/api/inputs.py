"""Checks on client input that the declared types alone do not make.

Every accepted value must be storable in both databases and readable back through
the API: PostgreSQL text cannot hold NUL (SQLite can, so both refuse it to behave
alike), neither driver can encode a lone surrogate, PostgreSQL's JSON type refuses
NaN and infinities, and a JSON document nested too deeply cannot be serialised
into a response again.
"""

from __future__ import annotations

import math
from typing import Any

from pydantic_core import PydanticSerializationError, to_json

# Deep enough for any real ticket reference or label set; far below the depth at which
# responses can no longer be serialised (about 250 levels, envelope included).
MAX_METADATA_DEPTH = 32
# Stored rows deeper than this (accepted before the limit above existed) are not shown.
MAX_SHOWN_DEPTH = 128


def text_problem(value: str) -> str | None:
    """Why ``value`` cannot be stored as text, or None."""
    if "\x00" in value:
        return "must not contain NUL characters (\\u0000)"
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return "must be valid Unicode text (no lone surrogates)"
    return None


def storable_text(value: str | None) -> str | None:
    """A pydantic after-validator: refuses text that one of the databases cannot store."""
    if value is not None and (problem := text_problem(value)):
        raise ValueError(problem)
    return value


def json_problem(value: Any, max_depth: int) -> str | None:
    """Why the JSON value ``value`` cannot be stored and shown again, or None.

    Walks iteratively: the documents refused here are the ones too deep for recursion.
    """
    stack: list[tuple[Any, int, str]] = [(value, 1, "")]
    while stack:
        node, depth, where = stack.pop()
        if isinstance(node, dict | list):
            if depth > max_depth:
                return f"is nested more than {max_depth} levels deep"
            items = node.items() if isinstance(node, dict) else enumerate(node)
            for key, child in items:
                path = f"{where}[{key!r}]"
                if isinstance(key, str) and (problem := text_problem(key)):
                    return f"key {path}: {problem}"
                stack.append((child, depth + 1, path))
        elif isinstance(node, str):
            if problem := text_problem(node):
                return f"value {where}: {problem}"
        elif isinstance(node, float) and not math.isfinite(node):
            return f"value {where}: must be a finite number, not {node}"
    return None


def shown_metadata(meta: dict[str, Any] | None) -> dict[str, Any]:
    """Stored metadata as responses show it. A row stored before the input checks existed
    must not make every listing that includes it fail, so what cannot be shown is replaced
    by a note saying why."""
    meta = dict(meta or {})
    if _deeper_than(meta, MAX_SHOWN_DEPTH):
        return _not_shown(f"is nested more than {MAX_SHOWN_DEPTH} levels deep")
    try:
        to_json(meta)
    except PydanticSerializationError as exc:
        return _not_shown(f"cannot be serialised ({exc})")
    return meta


def _not_shown(problem: str) -> dict[str, Any]:
    return {"_not_shown": f"the stored metadata {problem}"}


def _deeper_than(value: Any, limit: int) -> bool:
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, dict | list):
            if depth > limit:
                return True
            stack.extend((child, depth + 1) for child in (node.values() if isinstance(node, dict) else node))
    return False

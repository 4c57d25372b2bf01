"""API keys made with ``scen keys create``: only the sha256 of each key is stored."""

from __future__ import annotations

import secrets
import uuid
from dataclasses import dataclass

from sqlalchemy import exc as sa_exc
from sqlalchemy import select, update
from sqlalchemy.orm import Session

from app.db.models import ApiKey, utcnow
from app.settings import ROLES, KeyEntry, key_sha256

KEY_PREFIX = "scen_"


class KeyExists(ValueError):
    pass


class KeyNotFound(LookupError):
    pass


@dataclass(frozen=True)
class KeyInfo:
    name: str
    role: str
    created_at: str
    revoked: bool


def new_key() -> str:
    """256 random bits: a sha256 of it needs no salt nor slow hash to be safe at rest."""
    return KEY_PREFIX + secrets.token_urlsafe(32)


def create_key(session: Session, name: str, role: str) -> str:
    """Store a new key for ``name`` and return it: the only time it is ever shown."""
    if role not in ROLES:
        raise ValueError(f"the role must be one of {', '.join(ROLES)}")
    key = new_key()
    session.add(ApiKey(id=uuid.uuid4().hex, name=name, role=role, key_sha256=key_sha256(key), created_at=utcnow()))
    try:
        session.commit()
    except sa_exc.IntegrityError:
        session.rollback()
        raise KeyExists(f"a key named {name!r} already exists (revoked keys keep their name)") from None
    return key


def revoke_key(session: Session, name: str) -> None:
    changed = session.execute(
        update(ApiKey).where(ApiKey.name == name, ApiKey.revoked_at.is_(None)).values(revoked_at=utcnow())
    ).rowcount  # type: ignore[attr-defined]
    session.commit()
    if not changed:
        raise KeyNotFound(f"no active key named {name!r}")


def list_keys(session: Session) -> list[KeyInfo]:
    rows = session.scalars(select(ApiKey).order_by(ApiKey.created_at, ApiKey.name))
    return [KeyInfo(k.name, k.role, k.created_at.isoformat(timespec="seconds"), k.revoked_at is not None) for k in rows]


def active_keys(session: Session) -> list[KeyEntry]:
    rows = session.execute(select(ApiKey.name, ApiKey.role, ApiKey.key_sha256).where(ApiKey.revoked_at.is_(None)))
    return [KeyEntry(name, role, sha) for name, role, sha in rows]

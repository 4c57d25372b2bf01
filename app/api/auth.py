"""API keys and roles.

A request names its key as ``Authorization: Bearer KEY``. Keys come from ``SCEN_API_KEYS`` and
from the ``api_keys`` table (``scen keys create``); both are kept as sha256 digests only and a
presented key's digest is compared with every one in constant time. Roles are ordered:
``reader`` (generate, read edits) < ``editor`` (also post edits) < ``admin`` (also roll back and
restore). With no key anywhere the service is open: every caller is ``anonymous`` with every
role (``scen serve`` allows that on a loopback address only, unless ``SCEN_ALLOW_OPEN``).
"""

from __future__ import annotations

import hmac
import ipaddress
import logging
import threading
import time
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from app.db.keys import active_keys
from app.db.session import Database
from app.settings import ROLES, KeyEntry, key_sha256

log = logging.getLogger(__name__)

ANONYMOUS = "anonymous"


class Unauthorized(Exception):
    """No key, or a key that is not known (401)."""


class Forbidden(Exception):
    """A known key whose role does not allow the request (403)."""


@dataclass(frozen=True)
class Principal:
    name: str
    role: str

    def allows(self, role: str) -> bool:
        return ROLES.index(self.role) >= ROLES.index(role)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_exposure(host: str, has_keys: bool, allow_open: bool) -> str | None:
    """Why serving on ``host`` must be refused, or None."""
    if has_keys or allow_open or is_loopback(host):
        return None
    return (f"refusing to serve on {host} without API keys: set SCEN_API_KEYS or create one with "
            "`scen keys create NAME --role admin`, or set SCEN_ALLOW_OPEN=true to serve open anyway")


class KeyRing:
    """Configured keys plus the database's, re-read every ``ttl_s`` (and at most once a second on
    an unknown key, so a key made a moment ago works at once). A database that cannot be read
    leaves the keys last read in force."""

    def __init__(self, configured: list[KeyEntry], db: Database | None, ttl_s: float = 5.0):
        self.configured = list(configured)
        self.db = db
        self.ttl_s = ttl_s
        self._stored: list[KeyEntry] = []
        self._read_at = -float("inf")
        self._lock = threading.Lock()
        self._refresh(force=True)

    def _refresh(self, force: bool = False, min_age_s: float | None = None) -> None:
        if self.db is None:
            return
        age = time.monotonic() - self._read_at
        if not force and age < (self.ttl_s if min_age_s is None else min_age_s):
            return
        with self._lock:
            try:
                with self.db.session() as session:
                    self._stored = active_keys(session)
            except Exception as exc:  # the table may not exist yet (auto_migrate off), or the database is down
                log.warning("API keys could not be read from the database (%s); keeping the last read",
                            type(exc).__name__)
            self._read_at = time.monotonic()

    @property
    def stored(self) -> int:
        """Keys read from the database."""
        return len(self._stored)

    @property
    def open(self) -> bool:
        self._refresh()
        return not self.configured and not self._stored

    def authenticate(self, key: str | None) -> Principal:
        if self.open:
            return Principal(ANONYMOUS, "admin")
        if not key:
            raise Unauthorized("an API key is required: send Authorization: Bearer KEY")
        digest = key_sha256(key)
        found = self._match(digest)
        if found is None:
            self._refresh(min_age_s=1.0)
            found = self._match(digest)
        if found is None:
            raise Unauthorized("the API key is not valid")
        return Principal(found.name, found.role)

    def _match(self, digest: str) -> KeyEntry | None:
        found = None
        for entry in self.configured + self._stored:  # every entry compared: no early exit
            if hmac.compare_digest(entry.sha256, digest) and found is None:
                found = entry
        return found


bearer = HTTPBearer(auto_error=False, scheme_name="ApiKey",
                    description="An API key: `Authorization: Bearer KEY`. Roles: reader < editor < admin.")


def authenticate(request: Request,
                 credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]) -> Principal:
    keys: KeyRing = request.app.state.service.keys
    principal = keys.authenticate(credentials.credentials if credentials is not None else None)
    request.state.principal = principal
    return principal


def _role(role: str):
    def require(principal: Annotated[Principal, Depends(authenticate)]) -> Principal:
        if not principal.allows(role):
            raise Forbidden(f"the key {principal.name!r} has role {principal.role}; this needs {role}")
        return principal

    require.__name__ = f"require_{role}"
    return require


require_reader = _role("reader")
require_editor = _role("editor")
require_admin = _role("admin")
# As a parameter: the caller; as a route dependency listed first: checked before anything else
# (FastAPI solves a route's dependencies before its parameters' and reuses the answer).
Reader = Annotated[Principal, Depends(require_reader)]
Editor = Annotated[Principal, Depends(require_editor)]
Admin = Annotated[Principal, Depends(require_admin)]

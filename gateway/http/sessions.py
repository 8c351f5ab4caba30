"""Server-side sessions of the auditor page: the cookie holds a random session id, never the bearer token.

A session is one file under `<workspace>/sessions/`, named by the SHA-256 of its id (so the directory does not
hold usable ids) and holding the principal and the expiry. Files, not memory, so that every worker of
`bastion serve --workers N` knows every session. Logout deletes the file; an expired one is deleted when seen.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import time
from pathlib import Path

from audit.storage import atomic_write
from gateway.stores.tokens import Principal

LIFETIME = 8 * 3600  # seconds


class SessionStore:
    def __init__(self, directory: Path, lifetime: int = LIFETIME) -> None:
        self.directory = directory
        self.lifetime = lifetime

    def _path(self, session_id: str) -> Path:
        return self.directory / hashlib.sha256(session_id.encode()).hexdigest()

    def create(self, principal: Principal) -> str:
        """A new session of `principal`; returns its id (256 random bits)."""
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._sweep()
        session_id = secrets.token_urlsafe(32)
        entry = {**principal.as_actor(), "expires": time.time() + self.lifetime}
        atomic_write(self._path(session_id), json.dumps(entry).encode(), mode=0o600)
        return session_id

    def principal(self, session_id: str | None) -> Principal | None:
        """The principal of a live session, or None (unknown, malformed or expired: an expired one is deleted)."""
        if not session_id or len(session_id) > 128:
            return None
        path = self._path(session_id)
        try:
            entry = json.loads(path.read_text())
        except (OSError, ValueError):
            return None
        if entry.get("expires", 0) <= time.time():
            path.unlink(missing_ok=True)
            return None
        return Principal(entry["principal"], entry["role"], entry["token_id"])

    def delete(self, session_id: str | None) -> None:
        if session_id and len(session_id) <= 128:
            self._path(session_id).unlink(missing_ok=True)

    def _sweep(self) -> None:
        """Delete expired sessions (on each login, so the directory stays small)."""
        now = time.time()
        for path in self.directory.iterdir():
            try:
                if json.loads(path.read_text()).get("expires", 0) <= now:
                    path.unlink(missing_ok=True)
            except (OSError, ValueError):
                continue

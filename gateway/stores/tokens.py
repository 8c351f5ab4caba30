"""Bearer tokens: created on the gateway host, stored only as SHA-256 hashes, compared in constant time."""

from __future__ import annotations

import datetime as dt
import fcntl
import hashlib
import hmac
import json
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from policies.errors import InvalidRequest, Unauthorized

ROLES = ("analyst", "lf_author", "auditor", "admin")
PREFIX = "bst"


@dataclass(frozen=True)
class Principal:
    name: str
    role: str
    token_id: str

    def as_actor(self) -> dict[str, str]:
        return {"principal": self.name, "role": self.role, "token_id": self.token_id}


def _hash(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


class TokenStore:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._cached: tuple[tuple[int, int, int], dict[str, dict[str, str]]] | None = None

    def _read(self) -> dict[str, dict[str, str]]:
        """The token file, re-read only when it changed (tokens are created by another process)."""
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return {}
        stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
        if self._cached is None or self._cached[0] != stamp:
            self._cached = (stamp, json.loads(self.path.read_text() or "{}"))
        return self._cached[1]

    def create(self, name: str, role: str) -> tuple[str, Principal]:
        """Create a token; the secret is returned once and never stored."""
        if role not in ROLES:
            raise InvalidRequest(f"unknown role {role!r}; roles are {', '.join(ROLES)}")
        if not name or not name.replace("-", "").replace("_", "").replace(".", "").isalnum():
            raise InvalidRequest("a principal name is letters, digits, '-', '_' or '.'")
        token_id = secrets.token_hex(4)
        secret = secrets.token_urlsafe(32)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path.with_suffix(".lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            tokens = dict(self._read())
            tokens[token_id] = {
                "name": name,
                "role": role,
                "hash": _hash(secret),
                "created": dt.datetime.now(dt.UTC).isoformat(),
            }
            tmp = self.path.with_suffix(".tmp")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as f:
                json.dump(tokens, f, indent=2)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        return f"{PREFIX}_{token_id}_{secret}", Principal(name, role, token_id)

    def authenticate(self, token: str | None) -> Principal:
        if not token:
            raise Unauthorized("missing bearer token: send 'Authorization: Bearer <token>'")
        parts = token.split("_", 2)
        if len(parts) != 3 or parts[0] != PREFIX:
            raise Unauthorized("invalid token")
        _, token_id, secret = parts
        entry = self._read().get(token_id)
        # Compare against a dummy hash when the id is unknown, so timing does not tell ids apart.
        expected = entry["hash"] if entry else _hash("")
        if not hmac.compare_digest(expected, _hash(secret)) or entry is None:
            raise Unauthorized("invalid token")
        return Principal(entry["name"], entry["role"], token_id)

    def list(self) -> list[dict[str, str]]:
        return [
            {"token_id": k, "name": v["name"], "role": v["role"], "created": v["created"]}
            for k, v in self._read().items()
        ]

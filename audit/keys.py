"""Ed25519 checkpoint-signing keys and the keyring of public keys that verifiers trust.

A key directory (kept outside the log directory, mode 0700) holds:

- ``signing.key``: the current private key, PKCS#8 PEM, mode 0600;
- ``signing.pub``: its public key, SubjectPublicKeyInfo PEM;
- ``keyring.json``: every public key ever used, by key id, with its creation and retirement time, so that
  checkpoints signed before a rotation keep verifying.

A key id is the first 16 hex digits of SHA-256 of the raw 32-byte public key. Rotating replaces
``signing.key`` (the old private key is destroyed) and marks the old key retired in the keyring. Use
`AuditLog.rotate_key` to rotate a live log: it records the rotation in the log and seals it with both keys.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import hashlib
import json
import os
import stat
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from audit.errors import AuditKeyError
from audit.record import utc_now
from audit.storage import atomic_write

PRIVATE_KEY = "signing.key"
PUBLIC_KEY = "signing.pub"
KEYRING = "keyring.json"
_LOCK = "keys.lock"


def raw_public(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def key_id_of(key: Ed25519PublicKey) -> str:
    return hashlib.sha256(raw_public(key)).hexdigest()[:16]


@dataclass(frozen=True)
class Signer:
    key_id: str
    private_key: Ed25519PrivateKey
    stamp: tuple[int, int]  # (inode, mtime_ns) of the key file, to notice a rotation by another process

    def sign(self, message: bytes) -> bytes:
        return self.private_key.sign(message)

    @property
    def public_key(self) -> Ed25519PublicKey:
        return self.private_key.public_key()


@dataclass(frozen=True)
class KeyInfo:
    key_id: str
    public_key: Ed25519PublicKey
    created: str | None = None
    retired: str | None = None

    def to_dict(self) -> dict[str, str | None]:
        return {
            "key_id": self.key_id,
            "algorithm": "ed25519",
            "public_key": base64.b64encode(raw_public(self.public_key)).decode(),
            "created": self.created,
            "retired": self.retired,
        }


class Keyring:
    """Public keys by key id. Build it from the auditor's own copy of the public keys whenever possible."""

    def __init__(self, keys: Iterable[KeyInfo] = ()) -> None:
        self.keys: dict[str, KeyInfo] = {k.key_id: k for k in keys}

    def __contains__(self, key_id: object) -> bool:
        return key_id in self.keys

    def __len__(self) -> int:
        return len(self.keys)

    def get(self, key_id: str) -> KeyInfo | None:
        return self.keys.get(key_id)

    def verify(self, key_id: str, message: bytes, signature: bytes) -> bool:
        info = self.keys.get(key_id)
        if info is None:
            return False
        try:
            info.public_key.verify(signature, message)
        except InvalidSignature:
            return False
        return True

    def to_json(self) -> str:
        entries = [k.to_dict() for k in self.keys.values()]
        return json.dumps({"keys": entries}, indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_public_keys(cls, keys: Iterable[Ed25519PublicKey | bytes | str]) -> Keyring:
        """From public keys given as key objects, raw 32 bytes, PEM text or base64 of the raw bytes."""
        infos = []
        for key in keys:
            public = _public_key(key)
            infos.append(KeyInfo(key_id_of(public), public))
        return cls(infos)

    @classmethod
    def load(cls, path: str | Path) -> Keyring:
        """From a keyring.json file, a key directory holding one, or a PEM public key file.

        A key directory that does not exist yet (no checkpoint was ever signed) gives an empty keyring.
        """
        path = Path(path)
        if path.is_dir() or (not path.exists() and not path.suffix):
            path = path / KEYRING
            if not path.exists():
                return cls()
        try:
            text = path.read_text()
        except OSError as exc:
            raise AuditKeyError(f"cannot read keyring {path}: {exc}") from exc
        if text.lstrip().startswith("-----BEGIN"):
            return cls.from_public_keys([text])
        try:
            entries = json.loads(text)["keys"]
            infos = []
            for entry in entries:
                public = _public_key(entry["public_key"])
                if key_id_of(public) != entry["key_id"]:
                    raise AuditKeyError(f"keyring {path}: key id {entry['key_id']} does not match its key")
                infos.append(KeyInfo(entry["key_id"], public, entry.get("created"), entry.get("retired")))
        except (ValueError, KeyError, TypeError) as exc:
            raise AuditKeyError(f"keyring {path} is malformed: {exc}") from exc
        return cls(infos)

    @classmethod
    def coerce(cls, keys: Keyring | str | Path | Mapping[str, object] | Iterable[object]) -> Keyring:
        if isinstance(keys, Keyring):
            return keys
        if isinstance(keys, str | Path):
            return cls.load(keys)
        if isinstance(keys, Mapping):
            ring = cls.from_public_keys(keys.values())  # type: ignore[arg-type]
            for key_id in keys:
                if key_id not in ring:
                    raise AuditKeyError(f"public key given for {key_id} has a different key id")
            return ring
        return cls.from_public_keys(keys)  # type: ignore[arg-type]


def _public_key(key: Ed25519PublicKey | bytes | str) -> Ed25519PublicKey:
    if isinstance(key, Ed25519PublicKey):
        return key
    try:
        if isinstance(key, str) and key.lstrip().startswith("-----BEGIN"):
            public = serialization.load_pem_public_key(key.encode())
            if not isinstance(public, Ed25519PublicKey):
                raise AuditKeyError("not an Ed25519 public key")
            return public
        raw = base64.b64decode(key, validate=True) if isinstance(key, str) else bytes(key)
        return Ed25519PublicKey.from_public_bytes(raw)
    except (ValueError, TypeError) as exc:
        raise AuditKeyError(f"not an Ed25519 public key: {exc}") from exc


@contextlib.contextmanager
def _locked(key_dir: Path) -> Iterator[None]:
    _make_dir(key_dir)
    fd = os.open(key_dir / _LOCK, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _make_dir(key_dir: Path) -> None:
    key_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    if stat.S_IMODE(key_dir.stat().st_mode) != 0o700:
        os.chmod(key_dir, 0o700)


def _pem_private(key: Ed25519PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _pem_public(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def generate() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


def install(key_dir: str | Path, private_key: Ed25519PrivateKey, *, replace: bool = True) -> tuple[str | None, str]:
    """Make `private_key` the signing key of `key_dir`; retire (and destroy) the previous one.

    Returns (old key id or None, new key id). The keyring is updated before the private key is replaced, so a
    checkpoint signed with the new key is always verifiable from the keyring. With `replace=False`, raise
    FileExistsError instead if the directory already has a signing key.
    """
    key_dir = Path(key_dir)
    new_id = key_id_of(private_key.public_key())
    with _locked(key_dir):
        if not replace and (key_dir / PRIVATE_KEY).exists():
            raise FileExistsError(f"{key_dir / PRIVATE_KEY} already exists; use rotate() to replace it")
        ring = Keyring.load(key_dir)
        old_id = _current_key_id(key_dir)
        now = utc_now()
        if old_id is not None and old_id in ring.keys and old_id != new_id:
            old = ring.keys[old_id]
            ring.keys[old_id] = KeyInfo(old.key_id, old.public_key, old.created, old.retired or now)
        ring.keys[new_id] = KeyInfo(new_id, private_key.public_key(), now, None)
        atomic_write(key_dir / KEYRING, ring.to_json().encode(), 0o644)
        atomic_write(key_dir / PRIVATE_KEY, _pem_private(private_key), 0o600)
        atomic_write(key_dir / PUBLIC_KEY, _pem_public(private_key.public_key()), 0o644)
    return old_id, new_id


def _current_key_id(key_dir: Path) -> str | None:
    if not (key_dir / PRIVATE_KEY).exists():
        return None
    return load_signer(key_dir).key_id


def keygen(key_dir: str | Path) -> str:
    """Create the signing key of `key_dir` (private 0600, directory 0700) and add it to the keyring.

    Raises FileExistsError if the directory already has a signing key (use `rotate` to replace it).
    """
    _old, new_id = install(key_dir, generate(), replace=False)
    return new_id


def rotate(key_dir: str | Path) -> tuple[str | None, str]:
    """Replace the signing key with a new one and keep the old public key in the keyring.

    This does not write to any audit log; rotate a live log with `AuditLog.rotate_key`, which also records the
    rotation as an event.
    """
    return install(key_dir, generate())


def load_signer(key_dir: str | Path) -> Signer:
    """The current signing key. Refuses a key file readable or writable by group or others."""
    path = Path(key_dir) / PRIVATE_KEY
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as exc:
        raise AuditKeyError(f"cannot open signing key {path}: {exc}") from exc
    try:
        st = os.fstat(fd)
        if stat.S_IMODE(st.st_mode) & 0o077:
            raise AuditKeyError(f"signing key {path} is accessible by group or others (mode must be 0600)")
        pem = b""
        while chunk := os.read(fd, 65536):
            pem += chunk
    finally:
        os.close(fd)
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError) as exc:
        raise AuditKeyError(f"signing key {path} is unreadable: {exc}") from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise AuditKeyError(f"signing key {path} is not an Ed25519 key")
    return Signer(key_id_of(key.public_key()), key, (st.st_ino, st.st_mtime_ns))


def signer_is_current(key_dir: str | Path, signer: Signer) -> bool:
    try:
        st = os.stat(Path(key_dir) / PRIVATE_KEY)
    except OSError:
        return False
    return (st.st_ino, st.st_mtime_ns) == signer.stamp


def ensure_signer(key_dir: str | Path) -> Signer:
    """The current signing key, generated on first use."""
    key_dir = Path(key_dir)
    if not (key_dir / PRIVATE_KEY).exists():
        with contextlib.suppress(FileExistsError):
            keygen(key_dir)
    return load_signer(key_dir)

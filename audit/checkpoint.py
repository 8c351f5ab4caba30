"""Signed checkpoints: a statement "the log had `tree_size` records with Merkle root `root_hash` at `time`".

The signed message is the UTF-8 text

    bastion-audit-checkpoint/v1\\n<tree_size>\\n<root_hash hex>\\n<time>\\n<key_id>\\n

signed with Ed25519. Checkpoints are stored one per line (canonical JSON) in ``checkpoints.jsonl`` next to the
log; a copy kept elsewhere (`AuditLog.export_checkpoint`) is the anchor an auditor verifies the log against.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from audit.keys import Keyring, Signer
from audit.record import canonical, parse_time, utc_now
from audit.storage import atomic_write

MAGIC = "bastion-audit-checkpoint/v1"
SCHEMA_VERSION = 1
FILENAME = "checkpoints.jsonl"


@dataclass(frozen=True)
class Checkpoint:
    tree_size: int
    root_hash: str
    time: str
    key_id: str
    signature: str

    def message(self) -> bytes:
        return f"{MAGIC}\n{self.tree_size}\n{self.root_hash}\n{self.time}\n{self.key_id}\n".encode()

    @property
    def root(self) -> bytes:
        return bytes.fromhex(self.root_hash)

    @classmethod
    def create(cls, tree_size: int, root: bytes, signer: Signer, time: str | None = None) -> Checkpoint:
        unsigned = cls(tree_size, root.hex(), time or utc_now(), signer.key_id, "")
        signature = base64.b64encode(signer.sign(unsigned.message())).decode()
        return cls(tree_size, root.hex(), unsigned.time, signer.key_id, signature)

    def problem(self, keyring: Keyring) -> str | None:
        """Why this checkpoint cannot be trusted under `keyring`, or None if its signature verifies."""
        info = keyring.get(self.key_id)
        if info is None:
            return f"signed by unknown key id {self.key_id}"
        try:
            signature = base64.b64decode(self.signature, validate=True)
        except (binascii.Error, ValueError):
            return "signature is not base64"
        if not keyring.verify(self.key_id, self.message(), signature):
            return f"bad signature for key id {self.key_id}"
        if info.retired is not None and parse_time(self.time) > parse_time(info.retired):
            return f"signed by key {self.key_id} after its retirement at {info.retired}"
        return None

    def to_dict(self) -> dict[str, Any]:
        return {"schema_version": SCHEMA_VERSION, **asdict(self)}

    def to_line(self) -> bytes:
        return canonical(self.to_dict()) + b"\n"

    @classmethod
    def from_dict(cls, data: Any) -> Checkpoint:
        """Parse a stored checkpoint; raise ValueError if a field is missing or has the wrong type."""
        if not isinstance(data, dict):
            raise ValueError("a checkpoint must be a JSON object")
        if data.get("schema_version") != SCHEMA_VERSION:
            raise ValueError(f"unsupported checkpoint schema_version {data.get('schema_version')!r}")
        size, root, time, key_id, sig = (data.get(k) for k in ("tree_size", "root_hash", "time", "key_id", "signature"))
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise ValueError("tree_size must be a non-negative integer")
        if not isinstance(root, str) or len(root) != 64 or root.strip("0123456789abcdef"):
            raise ValueError("root_hash must be 64 lowercase hex digits")
        if not (isinstance(time, str) and isinstance(key_id, str) and isinstance(sig, str)):
            raise ValueError("time, key_id and signature must be strings")
        parse_time(time)
        return cls(size, root, time, key_id, sig)


def read_lines(path: Path, limit: int | None = None) -> tuple[list[tuple[int, Checkpoint | str]], int | None]:
    """The checkpoints file as [(line number, checkpoint or why the line is malformed)], and the number of a
    torn final line (no newline: a crash while writing it), if any. Reads at most `limit` bytes."""
    try:
        with open(path, "rb") as f:
            data = f.read() if limit is None else f.read(limit)
    except FileNotFoundError:
        return [], None
    torn = None
    lines = data.split(b"\n")
    if lines[-1]:
        torn = len(lines)
    entries: list[tuple[int, Checkpoint | str]] = []
    for number, line in enumerate(lines[:-1], start=1):
        try:
            entries.append((number, Checkpoint.from_dict(json.loads(line))))
        except ValueError as exc:
            entries.append((number, f"malformed checkpoint: {exc}"))
    return entries, torn


def last_valid(data: bytes) -> Checkpoint | None:
    """The last well-formed checkpoint among the complete lines of `data`."""
    for line in reversed(data.split(b"\n")[:-1]):
        try:
            return Checkpoint.from_dict(json.loads(line))
        except ValueError:
            continue
    return None


def latest(path: Path) -> Checkpoint | None:
    """The last well-formed checkpoint of a checkpoints file, or None."""
    try:
        with open(path, "rb") as f:
            size = f.seek(0, os.SEEK_END)
            block = 65536
            while True:
                start = max(0, size - block)
                f.seek(start)
                found = last_valid(f.read(size - start))
                if found is not None or start == 0:
                    return found
                block *= 16
    except FileNotFoundError:
        return None


def load(source: str | Path | Checkpoint | dict[str, Any]) -> list[Checkpoint]:
    """Checkpoints from an exported file (one JSON object, or JSON Lines), a dict, or a Checkpoint."""
    if isinstance(source, Checkpoint):
        return [source]
    if isinstance(source, dict):
        return [Checkpoint.from_dict(source)]
    text = Path(source).read_text()
    try:
        return [Checkpoint.from_dict(json.loads(text))]
    except ValueError:
        return [Checkpoint.from_dict(json.loads(line)) for line in text.splitlines() if line.strip()]


def export(checkpoint: Checkpoint, dest: str | Path) -> Path:
    """Write `checkpoint` durably to `dest`: a file, or a directory (an existing one, or a new path without a
    suffix) to put ``checkpoint-<size>.json`` in. Returns the file written."""
    dest = Path(dest)
    if dest.is_dir() or (not dest.exists() and not dest.suffix):
        dest = dest / f"checkpoint-{checkpoint.tree_size}.json"
    dest.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(dest, (json.dumps(checkpoint.to_dict(), indent=2, sort_keys=True) + "\n").encode())
    return dest

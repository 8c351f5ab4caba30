"""Dataset versions made by appends: immutable version files and the manifest that makes one visible.

A registration is a dataset's first version, held in the private database. Each `append` writes a new file,
`<versions>/<dataset>/<version>.duckdb`, holding the dataset's whole bounded table as of that version (the previous
version's rows and the batch's kept rows), and then publishes it by replacing `manifest.json` with a copy that
lists it (written aside, flushed, renamed over the old one: readers see the old list or the new one, never a
mix). A file the manifest does not list is never read: the leftovers of an append that crashed are removed by the
next append, which builds its version anew. Serving gateways keep the private database open read-only; version
files are opened read-only too, so an append never needs the gateway stopped.

A version is public: its serial (counting the registration and every append), a random suffix, its time and the
class of the batch's row count (a power of ten). The manifest also keeps, for the admin only, a keyed digest of
each batch's file, so a rerun of an append that did complete is recognised rather than added twice; it is never
shown to a caller.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import json
import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

MANIFEST = "manifest.json"


@dataclass(frozen=True)
class Version:
    """One version of a dataset: what callers are shown (all but `file` and `batch`)."""

    version: str
    serial: int
    time: str  # ISO 8601, UTC
    rows: str  # the class of the batch's row count
    retired: bool = False
    file: str | None = None  # None: the registration, held in the private database
    batch: str | None = None  # keyed digest of the appended file (admin-only; never shown)

    def public(self) -> dict[str, Any]:
        return {"version": self.version, "time": self.time, "rows": self.rows, "retired": self.retired}


@dataclass(frozen=True)
class Manifest:
    """The versions of one registration of a dataset (`base` is the registration's version), oldest first."""

    base: str
    versions: tuple[Version, ...] = field(default_factory=tuple)

    @property
    def latest(self) -> Version:
        """The newest version that is not retired (one always is: the last one cannot be retired)."""
        return next(v for v in reversed(self.versions) if not v.retired)

    @property
    def newest(self) -> Version:
        """The newest version, retired or not: the one an append builds on."""
        return self.versions[-1]

    def find(self, version: str) -> Version | None:
        return next((v for v in self.versions if v.version == version), None)

    def with_version(self, version: Version) -> Manifest:
        return replace(self, versions=(*self.versions, version))

    def retiring(self, version: str) -> Manifest:
        return replace(
            self, versions=tuple(replace(v, retired=v.retired or v.version == version) for v in self.versions)
        )


def rows_class(count: int) -> str:
    """The power-of-ten class of a row count: '0', '1-9', '10-99', '100-999', '1,000-9,999', ..."""
    if count <= 0:
        return "0"
    low = 10 ** (len(str(count)) - 1)
    return f"{low:,}-{low * 10 - 1:,}"


def now() -> str:
    return dt.datetime.now(dt.UTC).replace(microsecond=0).isoformat()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class VersionStore:
    """The manifests and version files of every dataset, in one directory beside the private database."""

    def __init__(self, root: Path) -> None:
        self.root = root
        # The parsed manifest by dataset, with the (inode, mtime, size) it was read at: reread only when replaced.
        self._seen: dict[str, tuple[tuple[int, int, int], Manifest]] = {}

    def folder(self, dataset: str) -> Path:
        return self.root / dataset

    def load(self, dataset: str) -> Manifest | None:
        """The dataset's manifest, or None if no append was ever published."""
        path = self.folder(dataset) / MANIFEST
        try:
            st = path.stat()
        except FileNotFoundError:
            self._seen.pop(dataset, None)
            return None
        stamp = (st.st_ino, st.st_mtime_ns, st.st_size)
        seen = self._seen.get(dataset)
        if seen is not None and seen[0] == stamp:
            return seen[1]
        data = json.loads(path.read_text())
        manifest = Manifest(base=data["base"], versions=tuple(Version(**v) for v in data["versions"]))
        self._seen[dataset] = (stamp, manifest)
        return manifest

    def publish(self, dataset: str, manifest: Manifest) -> None:
        """Make `manifest` the dataset's, atomically and durably (written aside, flushed, renamed over)."""
        folder = self.folder(dataset)
        aside = folder / f".{MANIFEST}.{os.getpid()}"
        payload = {"base": manifest.base, "versions": [asdict(v) for v in manifest.versions]}
        fd = os.open(aside, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(payload, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(aside, folder / MANIFEST)
        _fsync_dir(folder)

    def discard(self, dataset: str) -> None:
        """Forget every appended version of the dataset (a new registration replaces them)."""
        folder = self.folder(dataset)
        if not folder.exists():
            return
        with self.locked(dataset):
            with contextlib.suppress(FileNotFoundError):
                (folder / MANIFEST).unlink()
            self._sweep(folder, keep=set())
        self._seen.pop(dataset, None)

    def sweep(self, dataset: str, manifest: Manifest | None) -> None:
        """Remove files the manifest does not list: what an append that crashed left (call under `locked`)."""
        keep = {v.file for v in manifest.versions if v.file} if manifest is not None else set()
        self._sweep(self.folder(dataset), keep)

    @staticmethod
    def _sweep(folder: Path, keep: set[str]) -> None:
        for path in folder.iterdir():
            if path.name in {MANIFEST, ".lock"}:
                continue
            stem = path.name.removesuffix(".wal")
            if stem not in keep:
                path.unlink(missing_ok=True)

    @contextlib.contextmanager
    def locked(self, dataset: str) -> Iterator[Path]:
        """Hold the dataset's append lock (one writer at a time, across processes); yields its folder."""
        folder = self.folder(dataset)
        folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(folder / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield folder
        finally:
            os.close(fd)

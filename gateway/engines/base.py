"""The Engine protocol: the one seam through which Bastion reads private rows.

An engine holds the registered datasets' pre-bounded tables and runs statements that Bastion compiled as sqlglot
trees (never SQL text from a caller): it generates its own dialect from them. Everything else — planning, pricing,
noise, post-processing, the ledger and the audit log — is the same whatever the engine.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import pyarrow as pa
from sqlglot import exp

from gateway.engines.kind import EngineKind
from gateway.engines.versions import Version
from policies.errors import GatewayError
from policies.reader import ROW_ID, EngineError, Reader
from policies.schema import Policy

__all__ = ["ROW_ID", "CatalogError", "Engine", "EngineError", "EngineKind", "bounded", "registrable"]


class CatalogError(GatewayError):
    """A dataset cannot be registered or the catalog cannot be opened (admin-facing: names the problem)."""

    status = 400
    code = "catalog_error"


class Engine(Reader, Protocol):
    """A reader of the bounded tables (`policies.reader.Reader`: rows, arrow, check, frame) that also registers
    datasets and knows their policies."""

    kind: EngineKind
    dialect: str  # the sqlglot dialect this engine's SQL is generated in
    # Whether its pattern matching (regular expressions, any LIKE pattern) takes time linear in the text. Where it
    # backtracks, a crafted pattern's running time would depend on the rows: such patterns are refused.
    regex: bool

    def register(self, policy: Policy, source: Path, *, base: Path | None = None) -> str:
        """Load `source`, build the dataset's pre-bounded table and its public tables (sources relative to `base`,
        by default the source's directory), record the policy; return the new version."""
        ...

    def public_table(self, dataset: str, table: str) -> pa.Table:
        """A public table's rows, its declared columns in a fixed order (PublicTableNotFound if there is none)."""
        ...

    def append(self, dataset: str, source: Path) -> tuple[Version, bool]:
        """Add a batch as the dataset's new version while readers keep reading; return it and whether it is new
        (False: this file was appended already, and that version is returned)."""
        ...

    def retire(self, dataset: str, version: str) -> Version:
        """Refuse the version to readers from now on (VersionNotFound if there is none)."""
        ...

    def versions(self, dataset: str) -> list[Version]:
        """The dataset's versions, oldest first (the registration, then every append)."""
        ...

    def version(self, dataset: str, version: str | None) -> Version:
        """The version a request reads: `version` (VersionNotFound, VersionRetired) or, if None, the latest."""
        ...

    def at(self, pins: dict[str, str], *, retired: bool = False) -> Engine:
        """This engine with each dataset in `pins` read at that version (checked as by `version`; with `retired`, a
        retired version is read too: for work admitted, and charged, before it was retired)."""
        ...

    def datasets(self) -> dict[str, tuple[Policy, str]]:
        """All registered datasets: name → (policy, latest version)."""
        ...

    def policy(self, dataset: str) -> tuple[Policy, str]:
        """The dataset's policy and latest version (DatasetNotFound if it has none)."""
        ...

    def close(self) -> None: ...


def registrable(source: str | Path, *, read_only: bool) -> Path:
    """The source of a registration, refused with the reason if the engine is read-only or the file is missing."""
    if read_only:
        raise CatalogError("the catalog is open read-only")
    src = Path(source)
    if not src.exists():
        raise CatalogError(f"source file not found: {src}")
    return src


def bounded(dataset: str) -> exp.Table:
    """The pre-bounded table of a dataset, as the tree a FROM clause takes."""
    from policies.schema import bounded_table

    return exp.table_(bounded_table(dataset), quoted=True)

"""Typed settings and the workspace layout. One Settings object is passed to the app factory."""

from __future__ import annotations

import json
import os
from pathlib import Path

from pydantic import BaseModel, Field

from gateway.engines.kind import EngineKind
from policies.accountant import DEFAULT_ALPHA

DEFAULT_WORKSPACE = "bastion-workspace"


class Settings(BaseModel):
    workspace: Path = Field(default_factory=lambda: Path(os.environ.get("BASTION_WORKSPACE", DEFAULT_WORKSPACE)))
    host: str = "127.0.0.1"
    port: int = 8000
    default_alpha: float = Field(default=DEFAULT_ALPHA, gt=0, lt=1)
    synth_jobs_per_principal: int = Field(default=1, ge=1)  # unfinished synthesis jobs one principal may have
    engine: EngineKind = EngineKind.DUCKDB  # where the private rows live and statements run
    spark_master: str = "local[2]"  # a Spark master URL (local[N] on one machine, spark://host:7077 for a cluster)
    spark_warehouse: Path | None = None  # where Spark keeps the bounded tables; default <workspace>/private/warehouse
    spark_conf: dict[str, str] = Field(default_factory=dict)  # extra Spark settings (spark.executor.memory, ...)

    # --- layout -------------------------------------------------------------------------------------------
    @property
    def private_dir(self) -> Path:
        return self.workspace / "private"

    @property
    def database(self) -> Path:
        return self.private_dir / "private.duckdb"

    @property
    def warehouse(self) -> Path:
        """Where the Spark engine writes the private tables (Parquet) and its catalog of datasets."""
        return self.spark_warehouse or self.private_dir / "warehouse"

    @property
    def bounding_key(self) -> Path:
        return self.private_dir / "bounding.key"

    @property
    def policies_dir(self) -> Path:
        return self.workspace / "policies"

    @property
    def ledger(self) -> Path:
        return self.workspace / "ledger.sqlite"

    @property
    def cache(self) -> Path:
        return self.workspace / "cache.sqlite"

    @property
    def tokens(self) -> Path:
        return self.workspace / "tokens.json"

    @property
    def audit_dir(self) -> Path:
        return self.workspace / "audit"

    @property
    def keys_dir(self) -> Path:
        return self.workspace / "keys"

    @property
    def outputs_dir(self) -> Path:
        """Private outputs for downstream jobs (never served to a person)."""
        return self.private_dir / "outputs"

    @property
    def settings_file(self) -> Path:
        return self.workspace / "settings.json"

    def save(self) -> None:
        self.workspace.mkdir(parents=True, exist_ok=True)
        self.settings_file.write_text(self.model_dump_json(indent=2))

    @classmethod
    def load(cls, workspace: str | Path | None = None, **overrides: object) -> Settings:
        ws = Path(workspace) if workspace else Path(os.environ.get("BASTION_WORKSPACE", DEFAULT_WORKSPACE))
        data: dict[str, object] = {}
        f = ws / "settings.json"
        if f.exists():
            data = json.loads(f.read_text())
        data.update({k: v for k, v in overrides.items() if v is not None})
        data["workspace"] = ws
        return cls.model_validate(data)

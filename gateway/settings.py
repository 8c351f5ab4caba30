"""Typed settings and the workspace layout. One Settings object is passed to the app factory."""

from __future__ import annotations

import json
import os
from pathlib import Path

from pydantic import BaseModel, Field

from gateway.engines.kind import EngineKind
from policies.accountant import DEFAULT_ALPHA

DEFAULT_WORKSPACE = "bastion-workspace"


def _path_from_env(name: str) -> Path | None:
    value = os.environ.get(name)
    return Path(value) if value else None


class Limits(BaseModel):
    """Declared limits on what one request may ask of the gateway (README, "Limits"). Every one is checked before
    anything is charged or planned; the expression depth and node count of SQL are fixed by the planner. The
    `max_stored_evaluation*` limits bound what the gateway keeps per principal for model cards instead."""

    max_body_bytes: int = Field(
        default=1_048_576, ge=1_024, description="bytes of one request body, from Content-Length and while read"
    )
    max_json_items: int = Field(
        default=10_000, ge=16, description="object members plus array elements in one JSON request body"
    )
    max_json_depth: int = Field(default=32, ge=4, description="nesting of objects and arrays in one JSON body")
    max_sql_chars: int = Field(default=100_000, ge=1_000, description="characters of one query's SQL text")
    refusal_window_seconds: float = Field(
        default=60.0, gt=0, description="window in which refusals before authentication are counted per source"
    )
    max_refusals: int = Field(
        default=20, ge=1, description="refusals before authentication per source and window; then 429"
    )
    max_sources: int = Field(default=10_000, ge=1, description="sources whose refusal window is kept open at once")
    max_stored_evaluations: int = Field(
        default=100, ge=1, description="evaluations kept for their model cards per principal; then the oldest evicted"
    )
    max_stored_evaluation_bytes: int = Field(
        default=268_435_456,
        ge=1_048_576,
        description="bytes of the evaluations kept for their model cards per principal; then the oldest evicted",
    )


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
    # Addresses of reverse proxies whose X-Forwarded-For / X-Forwarded-Proto the gateway believes. Empty (the
    # default): the client address is the TCP peer's, so no client can pick the address its refusals count against.
    trusted_proxies: list[str] = Field(default_factory=list)
    limits: Limits = Field(default_factory=Limits)
    # Where the ledger and the release cache live: None (the default) for SQLite files in the workspace, or a
    # PostgreSQL address (postgresql://...) shared by replicas. From --store or BASTION_STORE; never saved in
    # settings.json (the address may carry a password).
    store: str | None = Field(default_factory=lambda: os.environ.get("BASTION_STORE") or None)
    # Where the files that replicas must all reach go (synthetic proxies, their DP models and reports, labeling
    # functions' label outputs): None (the default) for the workspace's own paths, or a directory every replica
    # mounts (mode 0700; it holds outputs derived from private rows). From --shared-dir or BASTION_SHARED_DIR, like
    # `store`: never saved in settings.json, so each host names its own mount point.
    shared_dir: Path | None = Field(default_factory=lambda: _path_from_env("BASTION_SHARED_DIR"))

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
    def predictions_dir(self) -> Path:
        """Attached model predictions (private like the rows they belong to), one Parquet file per dataset and model."""
        return self.private_dir / "predictions"

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
        """Private outputs for downstream jobs (never served to a person): labeling functions' label files."""
        return self.shared_dir / "outputs" if self.shared_dir is not None else self.private_dir / "outputs"

    @property
    def synth_jobs_dir(self) -> Path:
        """Synthetic-proxy job directories (DP model, proxy, report; job.json on the file store)."""
        return (self.shared_dir if self.shared_dir is not None else self.workspace) / "synth" / "jobs"

    @property
    def settings_file(self) -> Path:
        return self.workspace / "settings.json"

    def save(self) -> None:
        self.workspace.mkdir(parents=True, exist_ok=True)
        self.settings_file.write_text(self.model_dump_json(indent=2, exclude={"store", "shared_dir"}))

    @classmethod
    def load(cls, workspace: str | Path | None = None, **overrides: object) -> Settings:
        ws = Path(workspace) if workspace else Path(os.environ.get("BASTION_WORKSPACE", DEFAULT_WORKSPACE))
        data: dict[str, object] = {}
        f = ws / "settings.json"
        if f.exists():
            data = json.loads(f.read_text())
        data.pop("store", None)  # from the environment or the command line only
        data.pop("shared_dir", None)
        data.update({k: v for k, v in overrides.items() if v is not None})
        data["workspace"] = ws
        return cls.model_validate(data)

"""Engines hold the private rows: one module per engine behind the `Engine` protocol (`base`), DuckDB embedded by
default and Apache Spark for tables that outgrow one machine; `public` computes over public and released values
only. Only modules here import an engine."""

from __future__ import annotations

from typing import TYPE_CHECKING

from gateway.engines.kind import EngineKind

if TYPE_CHECKING:
    from gateway.engines.base import Engine
    from gateway.settings import Settings


def open_engine(settings: Settings, *, read_only: bool = True) -> Engine:
    """The engine the workspace's settings name, opened on its private data (imported only when used)."""
    if settings.engine is EngineKind.SPARK:
        from gateway.engines.spark import SparkEngine

        return SparkEngine(settings, read_only=read_only)
    from gateway.engines.duckdb import DuckDBEngine

    return DuckDBEngine(settings.database, settings.bounding_key, read_only=read_only)

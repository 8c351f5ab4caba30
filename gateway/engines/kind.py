"""The engine kinds a workspace can use (a module of its own so that settings need no engine import)."""

import enum


class EngineKind(enum.StrEnum):
    DUCKDB = "duckdb"
    SPARK = "spark"

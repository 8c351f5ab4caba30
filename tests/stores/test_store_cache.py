"""The release cache on each store: a miss, then the first stored answer wins, seen from another instance."""

from __future__ import annotations

from pathlib import Path

from gateway.stores.base import CacheStore
from gateway.stores.cache import ReleaseCache
from gateway.stores.pg import PgReleaseCache


def _open(address: str) -> CacheStore:
    return PgReleaseCache(address) if address.startswith("postgresql://") else ReleaseCache(address)


def test_the_first_stored_answer_wins_across_instances(store_kind: str, request: object, tmp_path: Path) -> None:
    import pytest

    assert isinstance(request, pytest.FixtureRequest)
    address = str(request.getfixturevalue("pg_store")) if store_kind == "postgresql" else str(tmp_path / "c.sqlite")
    one, two = _open(address), _open(address)
    try:
        assert one.get("k") is None
        answer = {"columns": ["n"], "rows": [[12.5]], "note": "ünïcode", "nested": {"b": 1, "a": [None, True]}}
        one.put("k", "alice", answer)
        two.put("k", "alice", {"columns": ["n"], "rows": [[99.0]]})  # a concurrent identical request: ignored
        assert two.get("k") == answer and one.get("k") == answer
        assert list((two.get("k") or {}).keys()) == list(answer.keys())  # returned as stored
        assert two.get("other") is None
    finally:
        one.close()
        two.close()

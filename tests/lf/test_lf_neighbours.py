"""Neighbouring datasets through the real app: D and D′ = D plus one privacy unit of k rows, the only rows with a
same-day visit (length_of_stay = 0). LF requests built to trip on exactly those rows (an integer division by the
length of stay, a Python LF that raises on them, one that hangs on them) and requests refused before the charge
give the same status, error code and response shape on D and D′, and nothing about the unit reaches the response
or the host log."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from audit.log import AuditLog
from gateway.demo import POLICY_YAML, generate_visits
from labeling_functions.registry import REGISTRY
from labeling_functions.sandbox import SandboxLimits
from tests.conftest import ROLES, Workspace, build_workspace
from tests.lf import hostile_lfs
from tests.lf.test_lf_sandbox import shape

K = 10  # max_rows_per_unit of the demo policy
UNIT = 999_999_999
SQL_LFS: list[dict[str, Any]] = [
    {"name": "red_flags", "label": "urgent", "keywords": {"column": "triage_note", "any": ["chest pain"]}},
    {"name": "planned", "label": "routine", "regex": {"column": "triage_note", "pattern": "routine|follow-up"}},
    {"name": "per_day", "label": "urgent", "when": "100 // length_of_stay > 20"},  # ÷ 0 on the unit's rows only
]
PY_LFS = [hostile_lfs.test_only_raises_on_same_day_visits, hostile_lfs.test_only_sleeps_on_same_day_visits]
REQUESTS: list[dict[str, Any]] = [
    {"lfs": SQL_LFS, "epsilon": 0.2},
    {"lfs": SQL_LFS, "python_lfs": [PY_LFS[0].name], "epsilon": 0.2, "label_model": True},
    {
        "lfs": SQL_LFS[:1],
        "python_lfs": [PY_LFS[1].name],
        "epsilon": 0.2,
    },  # hangs on D′'s unit rows only: abstains there
    {"lfs": SQL_LFS, "epsilon": 0.3, "dry_run": True},
    {"lfs": SQL_LFS, "epsilon": float("nan")},
    {"lfs": SQL_LFS, "epsilon": 0.2, "alpha": 5e-324},
    {"lfs": [{"name": "bad", "label": "urgent", "when": "ssn LIKE '9%'"}], "epsilon": 0.2},
    {
        "lfs": [{"name": f"l{i}", "label": "urgent", "when": f"age > {i}"} for i in range(16)],
        "epsilon": 0.2,
        "label_model": True,
    },
]


def _bounded_source(n_rows: int) -> pa.Table:
    """Demo visits with at most k rows per patient (so bounding keeps every row) and no same-day visit."""
    table = generate_visits(n_rows, seed=21)
    owners = table["patient_id"].to_numpy()
    rank = [0] * len(owners)
    seen: dict[int, int] = {}
    for i, o in enumerate(owners):
        rank[i] = seen.get(o, 0)
        seen[o] = rank[i] + 1
    table = table.filter(pa.array([r < K for r in rank]))
    los = pc.max_element_wise(table["length_of_stay"], pa.scalar(1, pa.int64()))
    return table.set_column(table.schema.get_field_index("length_of_stay"), "length_of_stay", los)


def _with_unit(table: pa.Table) -> pa.Table:
    """D′: D plus one patient with k same-day visits whose notes carry the secret marker."""
    unit = table.slice(0, K).to_pydict()
    unit["patient_id"] = [UNIT] * K
    unit["length_of_stay"] = [0] * K
    unit["triage_note"] = [f"{hostile_lfs.SECRET_MARKER} chest pain"] * K
    return pa.concat_tables([table, pa.table(unit, schema=table.schema)])


@pytest.fixture(scope="module")
def neighbours(tmp_path_factory: pytest.TempPathFactory) -> tuple[Workspace, Workspace]:
    root = tmp_path_factory.mktemp("neighbours")
    d = _bounded_source(3_000)
    out = []
    for name, table in (("d", d), ("d_prime", _with_unit(d))):
        (root / name).mkdir()
        data, policy = root / name / "visits.parquet", root / name / "visits.yaml"
        pq.write_table(table, data)
        policy.write_text(POLICY_YAML)
        out.append(build_workspace(root / name, [(policy, data)], ROLES))
    return out[0], out[1]


@pytest.fixture
def registered() -> Iterator[None]:
    for lf in PY_LFS:
        REGISTRY.register(
            lf, dataset="visits", classes=["urgent", "routine"], labels=["urgent"], columns=hostile_lfs.COLUMNS[lf.name]
        )
    try:
        yield
    finally:
        for lf in PY_LFS:
            REGISTRY.unregister(lf.name)


def _outcome(r: Any) -> tuple[int, Any, Any]:
    body = r.json()
    if r.status_code == 200:
        return 200, None, shape(body)
    return r.status_code, body["error"]["code"], body["error"]["message"]


def test_neighbouring_datasets_answer_with_the_same_status_code_and_shape(
    neighbours: tuple[Workspace, Workspace],
    registered: None,
    caplog: pytest.LogCaptureFixture,
    capfd: pytest.CaptureFixture[str],
) -> None:
    caplog.set_level(logging.DEBUG)
    outcomes: list[list[tuple[int, Any, Any]]] = []
    texts: list[str] = []
    for ws in neighbours:
        results = []
        with ws.app() as c:
            c.app.state.lf_limits = SandboxLimits(seconds=60)  # the hanging LF abstains per row (0.25 s each)
            h = {**ws.headers("lf_author"), "content-type": "application/json"}
            for req in REQUESTS:
                r = c.post("/v1/lf/stats", content=json.dumps({"dataset": "visits", **req}), headers=h)
                results.append(_outcome(r))
                texts.append(r.text)
        outcomes.append(results)
    d, d_prime = outcomes
    for req, a, b in zip(REQUESTS, d, d_prime, strict=True):
        assert a == b, (req, a[:2], b[:2])
    assert [o[0] for o in d] == [200, 200, 200, 200, 400, 400, 400, 400]
    out, err = capfd.readouterr()
    for text in [*texts, caplog.text, out, err]:
        assert hostile_lfs.SECRET_MARKER not in text and "Traceback" not in text
        assert "zero" not in text.lower()

    # The LF that hangs on the unit's rows abstains on each of them after the per-row time limit: no fallback.
    def reasons(ws: Workspace) -> list[tuple[Any, Any]]:
        return [
            (r.get("reason"), r.get("error"))
            for r in AuditLog(ws.settings.audit_dir).records()
            if r.get("event") == "lf_stats" and r.get("phase") == "released" and r.get("reason") != "dry_run"
        ]

    assert reasons(neighbours[0]) == [("ok", None)] * 3
    assert reasons(neighbours[1]) == [("ok", None)] * 3


def test_the_neighbours_differ_in_exactly_one_unit(neighbours: tuple[Workspace, Workspace]) -> None:
    import duckdb

    counts: list[tuple[Any, ...]] = []
    for ws in neighbours:
        con = duckdb.connect(str(ws.settings.database), read_only=True)
        try:
            row = con.execute(
                "SELECT COUNT(*), COUNT(*) FILTER (WHERE length_of_stay = 0), "
                "MAX(n) FROM (SELECT *, COUNT(*) OVER (PARTITION BY patient_id) AS n "
                'FROM "bounded_visits")'
            ).fetchone()
            assert row is not None
            counts.append(row)
        finally:
            con.close()
    (rows_d, zero_d, most_d), (rows_p, zero_p, most_p) = counts
    assert rows_p == rows_d + K and zero_d == 0 and zero_p == K and max(most_d, most_p) <= K

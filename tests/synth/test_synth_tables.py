"""Synthetic proxies and LF statistics over a dataset of several private tables (the hospital demo): a proxy of
`hospital.visits` with the public chapters joined on their unique key (its charge, columns, the sensitivity its DP
step is given, its audit records), the neighbour bound of the rows it measures, LF statistics over joined columns,
and refusals that charge nothing."""

from __future__ import annotations

import importlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import yaml

from audit.log import AuditLog
from gateway.demo import HOSPITAL_POLICY_YAML, diagnosis_chapters, write_hospital
from gateway.engines.duckdb import DuckDBEngine
from gateway.tablesources import resolve_source, with_classes
from labeling_functions.analysis import plan_lf_stats, run_lfs
from policies.schema import Policy, parse_policy
from synth.columns import proxy_schema
from tests.conftest import ROLES, Workspace, build_workspace
from tests.synth.helpers import proxy_frame, wait

synth_measure = importlib.import_module("synth.measure")  # the module (the package exports its function)

GRANTS = "roles:\n  analyst: [query]\n"
POLICY_YAML = HOSPITAL_POLICY_YAML.replace(
    GRANTS, "labels: {classes: [routine, urgent]}\nroles:\n  analyst: [query, synth, labeling]\n"
)
VISITS_WITH_CHAPTERS = {"table": "visits", "join": "diagnosis_chapters", "join_on": "diagnosis"}


def _public(dataset: str, table: str) -> Any:
    return diagnosis_chapters()


@pytest.fixture(scope="module")
def hospital(tmp_path_factory: pytest.TempPathFactory) -> Workspace:
    assert GRANTS in HOSPITAL_POLICY_YAML
    data, policy = write_hospital(tmp_path_factory.mktemp("hospital-src"), n_patients=1_500)
    policy.write_text(POLICY_YAML)
    return build_workspace(tmp_path_factory.mktemp("hospital-ws"), [(policy, data)], ROLES)


def _spent(c: Any, h: dict[str, str]) -> tuple[float, float]:
    budget = next(b for b in c.get("/v1/budget", headers=h).json() if b["dataset"] == "hospital")
    return float(budget["spent"]["epsilon"]), float(budget["spent"]["delta"])


def test_a_proxy_of_visits_with_the_chapters_joined(hospital: Workspace, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[int] = []
    release = synth_measure.release_integers

    def spy(values: Any, sensitivity: int, epsilon: float) -> Any:
        if len(values):  # a measurement (the admission's calibration check releases nothing: no values)
            seen.append(int(sensitivity))
        return release(values, sensitivity, epsilon)

    monkeypatch.setattr(synth_measure, "release_integers", spy)
    h = hospital.headers("analyst")
    with hospital.app() as c:
        before = _spent(c, h)
        body: dict[str, Any] = {"dataset": "hospital", "epsilon": 2.0, "rows": 400, "seed": 7, **VISITS_WITH_CHAPTERS}
        r = c.post("/v1/synth", json=body, headers=h)
        assert r.status_code == 200, r.text
        job = r.json()
        # Charged the whole ε before it runs; every column has a public domain (the diagnosis takes the chapters'
        # codes), so no δ.
        assert job["epsilon_spent"] == pytest.approx(2.0) and job["delta_spent"] == 0.0
        assert _spent(c, h) == pytest.approx((before[0] + 2.0, before[1]))
        tables = job["tables"]
        assert tables["table"] == "visits" and tables["join"] == "diagnosis_chapters"
        assert tables["rows_per_unit"] == 8  # visits' k, unchanged by the unique-key join
        done = wait(c, h, job["job_id"])
        assert done["status"] == "done", done
        frame = proxy_frame(c, h, job["job_id"])
        # One row per bounded joined visit: the visit's columns and the chapter's; never the hidden unit.
        assert set(frame.columns) == {"visit_id", "diagnosis", "urgent", "length_of_stay", "code", "chapter"}
        assert len(frame) == 400
        chapters = set(diagnosis_chapters()["chapter"].to_pylist())
        assert set(frame["chapter"].dropna()) <= chapters
        # An identical request is the same job, at no cost.
        again = c.post("/v1/synth", json=body, headers=h).json()
        assert again["job_id"] == job["job_id"] and again["cached"] and again["epsilon_spent"] == 0.0
        assert _spent(c, h) == pytest.approx((before[0] + 2.0, before[1]))
        # The same request over the dataset's own table is another job.
        plain = {k: v for k, v in body.items() if k not in VISITS_WITH_CHAPTERS}
        other = c.post("/v1/synth", json={**plain, "rows": 10}, headers=h).json()
        assert other["job_id"] != job["job_id"] and other["tables"] is None
        wait(c, h, other["job_id"])
    # Every histogram and two-way table of the joined proxy was released at sensitivity k = 8.
    model = json.loads((hospital.settings.synth_jobs_dir / job["job_id"] / "model.json").read_text())
    assert model["rows_per_unit"] == 8
    # 6 marginals and 15 pairs of the joined proxy at k = 8, then the own table's at k = 1.
    assert seen[: 6 + 15] == [8] * 21 and seen[21:] and set(seen[21:]) == {1}
    records = [r for r in AuditLog(hospital.settings.audit_dir).records() if r.get("event") == "synth"]
    admitted = next(r for r in records if r.get("request", {}).get("join") == "diagnosis_chapters")
    assert admitted["decision"] == "allowed" and admitted["dataset"] == "hospital"
    assert admitted["request"]["table"] == "visits" and admitted["request"]["join_on"] == "diagnosis"
    completed = [r for r in records if r.get("phase") == "completed" and r["request"]["job_id"] == job["job_id"]]
    assert len(completed) == 1 and completed[0]["release_digest"] == done["proxy_digest"]


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"table": "wards"}, "unknown_table"),
        ({"join": "regions"}, "unknown_table"),
        ({"join_on": "nope"}, "unknown_column"),
        ({"join_on": None}, "join"),
        ({"join_on": "urgent"}, "type_error"),
        ({"method": "sdv_gaussian_copula"}, "non_dp_table"),
    ],
)
def test_refusals_charge_nothing(hospital: Workspace, change: dict[str, Any], reason: str) -> None:
    h = hospital.headers("analyst")
    body = {"dataset": "hospital", "epsilon": 1.0, "rows": 10, **VISITS_WITH_CHAPTERS, **change}
    body = {k: v for k, v in body.items() if v is not None}
    with hospital.app() as c:
        before = _spent(c, h)
        r = c.post("/v1/synth", json=body, headers=h)
        assert r.status_code == 400, r.text
        assert r.json()["error"].get("reason") == reason, r.text
        assert _spent(c, h) == before
        lf = {
            "dataset": "hospital",
            "epsilon": 1.0,
            "lfs": [{"name": "a", "label": "urgent", "when": "urgent"}],
            **{k: v for k, v in body.items() if k in ("table", "join", "join_on")},
        }
        if reason != "non_dp_table":
            r = c.post("/v1/lf/stats", json=lf, headers=h)
            assert r.status_code == 400 and r.json()["error"].get("reason") == reason, r.text
            assert _spent(c, h) == before
    denied = [
        r
        for r in AuditLog(hospital.settings.audit_dir).records()
        if r.get("event") == "synth" and r.get("decision") == "denied" and r.get("request", {}).get("rows") == 10
    ]
    assert denied


def test_a_public_table_without_a_unique_key_is_refused() -> None:
    raw = yaml.safe_load(POLICY_YAML)
    chapters = raw["public_tables"]["diagnosis_chapters"]
    del chapters["unique_key"]
    chapters["max_multiplicity"] = {"code": 3}
    policy = parse_policy(raw)
    with pytest.raises(Exception, match="unique key only") as refused:
        resolve_source(policy, public=_public, what="a synthetic proxy", **VISITS_WITH_CHAPTERS)
    assert getattr(refused.value, "status", None) == 400


@pytest.fixture(scope="module")
def neighbours(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[DuckDBEngine, DuckDBEngine, Policy]]:
    """The hospital, and its neighbour without the patient who has the most visits (all their rows in every
    table), registered on two engines."""
    root = tmp_path_factory.mktemp("neighbours")
    data, _ = write_hospital(root / "full", n_patients=600)
    visits = pq.read_table(root / "full" / "hospital_visits.parquet")
    counts = pc.value_counts(visits["patient_id"])
    heavy = max(counts.to_pylist(), key=lambda v: v["counts"])
    assert heavy["counts"] > 8  # the unit has more visits than the bound
    policy = parse_policy(yaml.safe_load(POLICY_YAML))
    engines = []
    for name, drop in (("full", None), ("without", heavy["values"])):
        directory = root / name
        if drop is not None:
            write_hospital(directory, n_patients=600)
            for table in ("patients.parquet", "hospital_visits.parquet", "hospital_labs.parquet"):
                rows = pq.read_table(directory / table)
                pq.write_table(rows.filter(pc.not_equal(rows["patient_id"], drop)), directory / table)
        (directory / "hospital.yaml").write_text(POLICY_YAML)
        engine = DuckDBEngine(root / f"{name}.duckdb", root / "key", read_only=False)  # one key: the same digests
        engine.register(policy, directory / "patients.parquet")
        engines.append(engine)
    try:
        yield engines[0], engines[1], policy
    finally:
        for engine in engines:
            engine.close()
    assert data.exists()


def test_a_unit_with_many_visits_moves_each_proxy_measurement_by_at_most_k(
    neighbours: tuple[DuckDBEngine, DuckDBEngine, Policy],
) -> None:
    full, without, policy = neighbours
    source = resolve_source(policy, public=full.public_table, what="a synthetic proxy", **VISITS_WITH_CHAPTERS)
    assert source is not None and source.rows_per_unit == 8
    moved = []
    for col in proxy_schema(source.policy).columns:
        if col.kind.name == "KEYS":
            continue
        a = synth_measure.marginal_counts(full, source.tree, col)
        b = synth_measure.marginal_counts(without, source.tree, col)
        moved.append(sum(abs(x - y) for x, y in zip(a, b, strict=True)))
    # Every histogram moves by the unit's bounded joined rows: at most k = 8, and here exactly 8 (every visit's
    # diagnosis has a chapter).
    assert moved and max(moved) <= 8 and min(moved) == 8


def test_lf_counts_over_joined_columns_move_by_at_most_k(neighbours: tuple[DuckDBEngine, DuckDBEngine, Policy]) -> None:
    full, without, policy = neighbours
    source = resolve_source(policy, public=full.public_table, what="labeling functions", **VISITS_WITH_CHAPTERS)
    assert source is not None
    lfs = [
        {"name": "circulatory", "label": "urgent", "when": "chapter LIKE '%irculatory%'"},
        {"name": "stay", "label": "urgent", "when": "length_of_stay >= 2"},
        {"name": "routine", "label": "routine", "when": "NOT urgent"},
    ]
    plan = plan_lf_stats(with_classes(source, policy), lfs=lfs, epsilon=1.0, alpha=0.05, source=source.tree)
    assert not plan.has_gold  # the labels apply to the dataset's own table, not to visits
    a, b = run_lfs(plan, full).exact, run_lfs(plan, without).exact
    assert a.rows - b.rows == 8
    for name in ("coverage", "overlaps", "conflicts", "pair_overlaps", "pair_conflicts"):
        assert abs(getattr(a, name) - getattr(b, name)).max() <= 8, name
    assert a.coverage.sum() > 0
    # The release is today's LF release, unchanged, at k = 8: every measurement's sensitivity is 8 per row reach.
    assert {m.k for m in plan.measurements} == {8}
    same = plan_lf_stats(
        source.policy.model_copy(update={"labels": with_classes(source, policy).labels}),
        lfs=lfs,
        epsilon=1.0,
        alpha=0.05,
    )
    assert [(m.name, m.scale) for m in same.measurements] == [(m.name, m.scale) for m in plan.measurements]
    # Over labs ⋈ visits on the unit the LFs are priced at the product of the bounds.
    product = resolve_source(
        policy,
        table="labs",
        join_private="visits",
        join="diagnosis_chapters",
        join_on="diagnosis",
        public=full.public_table,
        what="labeling functions",
    )
    assert product is not None and product.rows_per_unit == 12 * 8


def test_lf_stats_over_visits_with_chapters_through_the_gateway(hospital: Workspace) -> None:
    h = hospital.headers("analyst")
    body: dict[str, Any] = {
        "dataset": "hospital",
        "epsilon": 1.0,
        "lfs": [
            {"name": "circulatory", "label": "urgent", "when": "chapter LIKE '%irculatory%'"},
            {"name": "long_stay", "label": "urgent", "when": "length_of_stay >= 3"},
        ],
        **VISITS_WITH_CHAPTERS,
    }
    with hospital.app() as c:
        before = _spent(c, h)
        r = c.post("/v1/lf/stats", json=body, headers=h)
        assert r.status_code == 200, r.text
        answer = r.json()
        assert answer["epsilon_spent"] == pytest.approx(1.0)
        assert _spent(c, h)[0] == pytest.approx(before[0] + 1.0)
        assert answer["tables"]["rows_per_unit"] == 8 and answer["gold_column"] is None
        assert [lf["name"] for lf in answer["lfs"]] == ["circulatory", "long_stay"]
        # Labs ⋈ visits on the unit: priced at the product, its figure in the answer.
        joined = {**body, "table": "labs", "join_private": "visits", "epsilon": 0.5}
        r = c.post("/v1/lf/stats", json=joined, headers=h)
        assert r.status_code == 200, r.text
        assert r.json()["tables"]["rows_per_unit"] == 96
        # Python LFs and the label model are refused over a private table, before the charge.
        spent = _spent(c, h)
        for extra, reason in (({"python_lfs": ["x"]}, "python_lfs_over_tables"), ({"label_model": True}, "")):
            lfs = body["lfs"] * (2 if extra.get("label_model") else 1)
            lfs = [{**lf, "name": f"{lf['name']}{i}"} for i, lf in enumerate(lfs)]
            r = c.post("/v1/lf/stats", json={**body, **extra, "lfs": lfs}, headers=h)
            assert r.status_code == 400, r.text
            assert r.json()["error"].get("reason") == (reason or "label_model_over_tables"), r.text
        assert _spent(c, h) == spent


def test_the_proxy_record_names_its_tables(hospital: Workspace) -> None:
    """The proxy file's metadata and the report say what the proxy is of."""
    h = hospital.headers("analyst")
    with hospital.app() as c:
        jobs = c.get("/v1/synth", headers=h).json()
        job = next(j for j in jobs if j.get("tables"))
        report = c.get(f"/v1/synth/{job['job_id']}/report", headers=h).json()
    assert report["proxy"]["tables"]["from"].startswith("hospital.visits AS a INNER JOIN diagnosis_chapters")
    assert Path(hospital.settings.synth_jobs_dir / job["job_id"] / "proxy.parquet").exists()


def test_a_joined_proxy_whose_measurement_fails_releases_the_default_input(
    hospital: Workspace, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After the charge a joined proxy completes with the same status and shape, measured over the empty input."""
    import synth
    from policies.reader import EmptyReader

    real = synth.measure
    given: list[Any] = []

    def failing(reader: Any, table: Any, *args: Any, **kwargs: Any) -> Any:
        given.append(table)
        if not isinstance(reader, EmptyReader):
            raise RuntimeError("Conversion Error: could not convert 'I21' to INT32")
        return real(reader, table, *args, **kwargs)

    monkeypatch.setattr(synth, "measure", failing)
    h = hospital.headers("analyst")
    body = {"dataset": "hospital", "epsilon": 1.5, "rows": 50, "seed": 1, "method": "dpcopula_direct"}
    with hospital.app() as c:
        r = c.post("/v1/synth", json={**body, **VISITS_WITH_CHAPTERS}, headers=h)
        assert r.status_code == 200, r.text
        job = wait(c, h, r.json()["job_id"])
        assert job["status"] == "done", job
        frame = proxy_frame(c, h, job["job_id"])
    assert len(frame) == 50 and set(frame.columns) == set(job["tables"]["columns"]) - {"patient_id"}
    assert len(given) == 2 and given[0] == given[1]  # both runs read the joined FROM source, not a table name
    assert "__joined" in given[0].sql()


def test_gold_labels_apply_to_the_dataset_own_table_only() -> None:
    """Over the dataset's own table joined with a public table the policy's gold column is measured; over a private
    table the classes stay and the gold goes (the gold column is not among its columns)."""
    from gateway.demo import DEMO_POLICY_YAML

    visits = parse_policy(yaml.safe_load(DEMO_POLICY_YAML))
    source = resolve_source(
        visits, public=_public, what="labeling functions", **{**VISITS_WITH_CHAPTERS, "table": "visits"}
    )
    assert source is not None and source.rows_per_unit == visits.max_rows_per_unit
    lfs = [{"name": "circulatory", "label": "urgent", "when": "chapter LIKE '%irculatory%'"}]
    own = plan_lf_stats(with_classes(source, visits), lfs=lfs, epsilon=1.0, alpha=0.05, source=source.tree)
    assert own.has_gold and own.summary()["gold_column"] == "triage_label"
    assert [m.name for m in own.measurements] == ["rows", "lf", "gold"]
    hospital = parse_policy(yaml.safe_load(POLICY_YAML))
    private = resolve_source(hospital, table="visits", public=_public, what="labeling functions")
    assert private is not None
    lfs = [{"name": "long", "label": "urgent", "when": "length_of_stay > 2"}]
    plan = plan_lf_stats(with_classes(private, hospital), lfs=lfs, epsilon=1.0, alpha=0.05, source=private.tree)
    assert not plan.has_gold and plan.classes == ["routine", "urgent"]
    assert [m.name for m in plan.measurements] == ["rows", "lf"]  # no gold measurement, no ε spent on it


def test_a_proxy_of_patients_joined_with_their_visits_is_measured_at_the_product(
    hospital: Workspace, monkeypatch: pytest.MonkeyPatch
) -> None:
    """patients (k=1) ⋈ visits (k=8) on the unit: one proxy row per joined row, every release at sensitivity 1·8,
    and the patient's columns beside the visit's (the one cross-table relation a proxy can carry)."""
    seen: list[int] = []
    release = synth_measure.release_integers

    def spy(values: Any, sensitivity: int, epsilon: float) -> Any:
        if len(values):
            seen.append(int(sensitivity))
        return release(values, sensitivity, epsilon)

    monkeypatch.setattr(synth_measure, "release_integers", spy)
    h = hospital.headers("analyst")
    body = {
        "dataset": "hospital",
        "epsilon": 3.0,
        "rows": 200,
        "seed": 5,
        "method": "dpcopula_direct",
        "table": "hospital",
        "join_private": "visits",
    }
    with hospital.app() as c:
        before = _spent(c, h)
        r = c.post("/v1/synth", json=body, headers=h)
        assert r.status_code == 200, r.text
        job = r.json()
        assert job["tables"]["rows_per_unit"] == 8 and job["tables"]["join_private"] == "visits"
        assert job["epsilon_spent"] == pytest.approx(3.0) and job["delta_spent"] > 0  # diagnosis: key selection
        assert _spent(c, h)[0] == pytest.approx(before[0] + 3.0)
        assert wait(c, h, job["job_id"])["status"] == "done"
        frame = proxy_frame(c, h, job["job_id"])
    assert {"age", "sex", "region", "income", "urgent", "length_of_stay"} <= set(frame.columns)
    assert "patient_id" not in frame.columns and len(frame) == 200
    assert seen and set(seen) == {8}


def test_a_joined_proxy_histogram_passes_the_empirical_epsilon_audit(
    neighbours: tuple[DuckDBEngine, DuckDBEngine, Policy],
) -> None:
    """The chapter histogram of a proxy of visits ⋈ chapters, on neighbours that differ in the patient with the most
    visits (all 8 of their bounded visits), released as the synthesizer calibrates it (sensitivity k = 8): the
    empirical ε stays within the ε spent, and the same release at half the scale is caught above it."""
    from tests.privacy.test_sql_epsilon import N_DRAWS, bound, integer_hits

    full, without, policy = neighbours
    source = resolve_source(policy, public=full.public_table, what="a synthetic proxy", **VISITS_WITH_CHAPTERS)
    assert source is not None
    chapter = next(c for c in proxy_schema(source.policy).columns if c.name == "chapter")
    a = synth_measure.marginal_counts(full, source.tree, chapter)
    b = synth_measure.marginal_counts(without, source.tree, chapter)
    assert sum(abs(x - y) for x, y in zip(a, b, strict=True)) == 8
    epsilon = 1.0
    calibrated = bound(*integer_hits(a, b, source.rows_per_unit, epsilon, N_DRAWS))
    control = bound(*integer_hits(a, b, source.rows_per_unit, 2 * epsilon, N_DRAWS))
    assert calibrated <= epsilon, calibrated
    assert control > epsilon, control

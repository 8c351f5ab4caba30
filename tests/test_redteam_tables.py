"""Red-team pass of synthetic proxies and LF statistics over the private tables of a dataset of several tables and
their joins (the hospital demo): hostile `table`/`join`/`join_on`/`join_private` values are refused before any
charge with the denial audited; the cache and job-idempotency keys tell every source apart (no cheaper earlier
answer is returned for a costlier source); LF conditions reach only the joined table's priced columns; proxies
never carry a unit column of any side; every source is priced at its joined rows per unit."""

from __future__ import annotations

import importlib
from collections.abc import Iterator
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
from policies.errors import QueryRejected
from policies.schema import Policy, parse_policy
from tests.conftest import ROLES, Workspace, build_workspace
from tests.synth.helpers import proxy_frame, wait

synth_measure = importlib.import_module("synth.measure")  # the module (the package exports its function)

GRANTS = "  analyst: [query, synth]"
POLICY_YAML = HOSPITAL_POLICY_YAML.replace(GRANTS, "  analyst: [query, synth, labeling]")
CHAPTERS = {"join": "diagnosis_chapters", "join_on": "diagnosis"}


def _public(dataset: str, table: str) -> Any:
    return diagnosis_chapters()


@pytest.fixture(scope="module")
def hospital(tmp_path_factory: pytest.TempPathFactory) -> Workspace:
    assert GRANTS in HOSPITAL_POLICY_YAML
    data, policy = write_hospital(tmp_path_factory.mktemp("rt-hospital-src"), n_patients=600)
    policy.write_text(POLICY_YAML)
    return build_workspace(tmp_path_factory.mktemp("rt-hospital-ws"), [(policy, data)], ROLES)


def _spent(c: Any, h: dict[str, str]) -> tuple[float, float]:
    budget = next(b for b in c.get("/v1/budget", headers=h).json() if b["dataset"] == "hospital")
    return float(budget["spent"]["epsilon"]), float(budget["spent"]["delta"])


HOSTILE = [
    ({"table": "hospital.visits"}, "unknown_table"),  # a dotted name
    ({"table": '"visits"'}, "unknown_table"),  # a quoted name
    ({"table": "visits; DROP TABLE x"}, "unknown_table"),
    ({"table": "demo"}, "unknown_table"),  # another dataset's name
    ({"table": "diagnosis_chapters"}, "unknown_table"),  # the public table as the private side
    ({"table": "visits", "join_private": "Visits"}, "join"),  # a self-join by case
    ({"table": "hospital", "join_private": "HOSPITAL"}, "join"),  # the dataset's own table with itself
    ({"join_private": "hospital"}, "join"),  # no table: the own table, joined with itself
    ({"table": "visits", "join_private": "diagnosis_chapters"}, "unknown_table"),  # a public table as private
    ({"table": "visits", "join": "labs", "join_on": "visit_id"}, "unknown_table"),  # a private table as public
    ({"table": "visits", "join": "main.diagnosis_chapters", "join_on": "diagnosis"}, "unknown_table"),
    ({"table": "visits", "join": "diagnosis_chapters", "join_on": "patient_id"}, "privacy_unit_column"),  # the unit
    ({"table": "visits", "join": "diagnosis_chapters", "join_on": "a.diagnosis"}, "unknown_column"),
    ({"table": "visits", "join": "diagnosis_chapters", "join_on": "code"}, "unknown_column"),  # the public key
    ({"table": "visits", "join": "diagnosis_chapters", "join_on": "age"}, "unknown_column"),  # another table's
    ({"table": "visits", "join": "diagnosis_chapters", "join_on": "visit_id"}, "type_error"),
    (
        {"table": "visits", "join_private": "labs", "join": "diagnosis_chapters", "join_on": "patient_id"},
        "privacy_unit_column",
    ),
]


@pytest.mark.parametrize(("choice", "reason"), HOSTILE)
def test_hostile_sources_are_refused_before_the_charge(
    hospital: Workspace, choice: dict[str, Any], reason: str
) -> None:
    h = hospital.headers("analyst")
    synth = {"dataset": "hospital", "epsilon": 1.0, "rows": 11, **choice}
    lf = {"dataset": "hospital", "epsilon": 1.0, "lfs": [{"name": "a", "label": "urgent", "when": "1 = 1"}], **choice}
    with hospital.app() as c:
        before = _spent(c, h)
        for path, body in (("/v1/synth", synth), ("/v1/lf/stats", lf)):
            r = c.post(path, json=body, headers=h)
            assert r.status_code == 400, (path, r.text)
            assert r.json()["error"].get("reason") == reason, (path, r.text)
        assert _spent(c, h) == before
    records = list(AuditLog(hospital.settings.audit_dir).records())
    for event in ("synth", "lf_stats"):
        denied = [
            r
            for r in records
            if r.get("event") == event
            and r.get("decision") == "denied"
            and all(r.get("request", {}).get(k) == v for k, v in choice.items())
        ]
        assert denied, event


def test_each_source_is_charged_and_cached_apart(hospital: Workspace) -> None:
    """The same LFs and the same proxy request over different sources are separate releases, each charged; only an
    identical repeat (by any spelling of the same names) is answered from the cache, free."""
    h = hospital.headers("analyst")
    sources: list[dict[str, Any]] = [
        {},
        {"table": "visits"},
        {"table": "visits", **CHAPTERS},
        {"table": "visits", "join_private": "labs"},
        {"table": "labs", "join_private": "visits"},
    ]
    lfs = [{"name": "recent", "label": "urgent", "when": "visit_id > 3"}]
    with hospital.app() as c:
        seen_lf: list[Any] = []
        seen_jobs: list[str] = []
        for source in sources:
            for path, body in (
                ("/v1/lf/stats", {"dataset": "hospital", "epsilon": 0.25, "lfs": lfs, **source}),
                ("/v1/synth", {"dataset": "hospital", "epsilon": 0.25, "rows": 20, "seed": 3, **source}),
            ):
                if path == "/v1/lf/stats" and not source:
                    continue  # visit_id is no column of the patients
                before = _spent(c, h)
                r = c.post(path, json=body, headers=h)
                assert r.status_code == 200, (path, source, r.text)
                answer = r.json()
                assert not answer["cached"], (path, source)
                assert _spent(c, h)[0] == pytest.approx(before[0] + 0.25), (path, source)
                if path == "/v1/synth":
                    seen_jobs.append(answer["job_id"])
                    # One unfinished job per principal: let it finish before the repeat and the next source.
                    assert wait(c, h, answer["job_id"])["status"] == "done"
                else:
                    seen_lf.append(answer["tables"])
                # The same request with its names in another case: the same release, free.
                shouted = {k: v.upper() if k in ("table", "join", "join_private") else v for k, v in body.items()}
                r = c.post(path, json=shouted, headers=h)
                assert r.status_code == 200, r.text
                assert r.json()["cached"] and _spent(c, h)[0] == pytest.approx(before[0] + 0.25), (path, source)
        assert len(set(seen_jobs)) == len(seen_jobs)
        per_unit = [t["rows_per_unit"] for t in seen_lf]
        assert per_unit == [8, 8, 96, 96]
        for job_id in seen_jobs:
            done = wait(c, h, job_id)
            assert done["status"] == "done", done
            frame = proxy_frame(c, h, job_id)
            # No side's unit, under any derived name, is in a proxy.
            assert not [col for col in frame.columns if "patient_id" in col], frame.columns


LF_CONDITIONS = [
    ("age > 50", "unknown_column"),  # a column of the patients, never joined: never priced
    ("triage_label = 'urgent'", "unknown_column"),
    ("a.patient_id > 5", "unknown_column"),
    ("labs__patient_id > 5", "unknown_column"),
    ("PATIENT_ID > 1", "unit_column"),
    ("visit_id IN (SELECT visit_id FROM hospital.visits)", "subquery"),
    ("EXISTS (SELECT 1 FROM hospital.labs)", "subquery"),
]


@pytest.mark.parametrize(("when", "kind"), LF_CONDITIONS)
def test_lf_conditions_reach_only_the_priced_columns(when: str, kind: str) -> None:
    """Over visits ⋈ labs ⋈ chapters an LF may read the joined table's columns only: not the patients' (no side of
    the join), not a unit column of either side, not another table through a subquery."""
    policy = parse_policy(yaml.safe_load(POLICY_YAML))
    source = resolve_source(
        policy, public=_public, what="labeling functions", table="visits", join_private="labs", **CHAPTERS
    )
    assert source is not None and source.rows_per_unit == 96
    with pytest.raises(QueryRejected) as refused:
        plan_lf_stats(
            with_classes(source, policy),
            lfs=[{"name": "x", "label": "urgent", "when": when}],
            epsilon=1.0,
            alpha=0.05,
            source=source.tree,
        )
    text = str(refused.value).lower()
    assert {"unknown_column": "unknown", "unit_column": "privacy-unit", "subquery": "subquer"}[kind] in text
    # The columns of the other private side are priced (at the product) and usable.
    plan = plan_lf_stats(
        with_classes(source, policy),
        lfs=[{"name": "x", "label": "urgent", "when": "test = 'crp'"}],
        epsilon=1.0,
        alpha=0.05,
        source=source.tree,
    )
    assert plan.cost.epsilon == pytest.approx(1.0)


@pytest.fixture(scope="module")
def neighbours(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[DuckDBEngine, DuckDBEngine, Policy]]:
    """The hospital, and its neighbour without the patient with the most visits × labs (all their rows in every
    table), registered on two engines."""
    root = tmp_path_factory.mktemp("rt-neighbours")
    write_hospital(root / "full", n_patients=600)
    visits = pq.read_table(root / "full" / "hospital_visits.parquet")["patient_id"].to_pylist()
    labs = pq.read_table(root / "full" / "hospital_labs.parquet")["patient_id"].to_pylist()
    heavy = max(set(visits), key=lambda unit: min(visits.count(unit), 8) * min(labs.count(unit), 12))
    assert visits.count(heavy) > 1 and labs.count(heavy) > 12  # more joined rows than the truncation below
    policy = parse_policy(yaml.safe_load(POLICY_YAML))
    engines = []
    for name, drop in (("full", None), ("without", heavy)):
        directory = root / name
        if drop is not None:
            write_hospital(directory, n_patients=600)
            for table in ("patients.parquet", "hospital_visits.parquet", "hospital_labs.parquet"):
                rows = pq.read_table(directory / table)
                pq.write_table(rows.filter(pc.not_equal(rows["patient_id"], drop)), directory / table)
        (directory / "hospital.yaml").write_text(POLICY_YAML)
        engine = DuckDBEngine(root / f"{name}.duckdb", root / "key", read_only=False)
        engine.register(policy, directory / "patients.parquet")
        engines.append(engine)
    try:
        yield engines[0], engines[1], policy
    finally:
        for engine in engines:
            engine.close()


@pytest.mark.parametrize("truncate", [None, 20])
@pytest.mark.parametrize(
    "choice",
    [
        {"table": "labs", "join_private": "visits", **CHAPTERS},
        {"table": "visits", "join_private": "labs"},
        {"table": "visits", "join_private": "hospital", **CHAPTERS},
        {"table": "hospital", "join_private": "labs"},
    ],
)
def test_lf_counts_over_private_joins_move_by_at_most_the_priced_k(
    neighbours: tuple[DuckDBEngine, DuckDBEngine, Policy], choice: dict[str, Any], truncate: int | None
) -> None:
    """Removing the unit with the most joined rows moves every exact LF count over a private join by at most the
    rows per unit the release is priced at (the product of the bounds, or the policy's truncation)."""
    full, without, policy = neighbours
    policy = policy.model_copy(update={"max_joined_rows_per_unit": truncate})
    source = resolve_source(policy, public=full.public_table, what="labeling functions", **choice)
    assert source is not None
    k = source.rows_per_unit
    lfs = [
        {"name": "any", "label": "urgent", "when": "age >= 0" if choice["table"] == "hospital" else "visit_id >= 0"},
        {"name": "crp", "label": "urgent", "when": "test = 'crp'" if "labs" in choice.values() else "1 = 1"},
        {"name": "none", "label": "routine", "when": "1 = 1"},
    ]
    plan = plan_lf_stats(with_classes(source, policy), lfs=lfs, epsilon=1.0, alpha=0.05, source=source.tree)
    assert {m.k for m in plan.measurements} == {k}
    a, b = run_lfs(plan, full).exact, run_lfs(plan, without).exact
    assert 0 < a.rows - b.rows <= k
    product = {"hospital": 1, "visits": 8, "labs": 12}
    bound = product[choice["table"]] * product[choice["join_private"]]
    assert k == (bound if truncate is None else min(bound, truncate))
    if truncate is not None and bound > truncate:
        assert a.rows - b.rows == truncate  # the unit has more joined rows than are kept
    for name in ("coverage", "overlaps", "conflicts", "pair_overlaps", "pair_conflicts"):
        assert abs(getattr(a, name) - getattr(b, name)).max() <= k, name


def test_an_lf_failing_over_a_private_join_answers_as_one_that_does_not(
    hospital: Workspace, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A cast of the private diagnosis codes to a number, which would fail on some values only, is evaluated as
    TRY_CAST (no failure that depends on the rows); and when the LFs' run over a private join does fail, after the
    charge, the answer has the same status and shape as a working run's (the default input's release)."""
    import gateway.labeling

    h = hospital.headers("analyst")
    joined = {"dataset": "hospital", "epsilon": 0.5, "table": "labs", "join_private": "visits", **CHAPTERS}
    real = gateway.labeling.compute_lf_stats

    def failing(plan: Any, reader: Any, **kwargs: Any) -> Any:
        if plan.source is not None and any(lf.name == "boom" for lf in plan.declarative):
            raise RuntimeError("the rows could not be read")
        return real(plan, reader, **kwargs)

    monkeypatch.setattr(gateway.labeling, "compute_lf_stats", failing)
    with hospital.app() as c:
        shapes = []
        for name, when in (("cast", "CAST(diagnosis AS INTEGER) > 0"), ("boom", "length_of_stay > 0")):
            before = _spent(c, h)
            body = {**joined, "lfs": [{"name": name, "label": "urgent", "when": when}]}
            r = c.post("/v1/lf/stats", json=body, headers=h)
            assert r.status_code == 200, r.text
            assert _spent(c, h)[0] == pytest.approx(before[0] + 0.5)
            answer = r.json()
            shapes.append((sorted(answer), sorted(answer["lfs"][0]), answer["tables"]["rows_per_unit"]))
        assert shapes[0] == shapes[1]
    records = [
        r
        for r in AuditLog(hospital.settings.audit_dir).records()
        if r.get("event") == "lf_stats" and r.get("reason") == "fallback"
    ]
    assert [r["request"]["lfs"][0]["name"] for r in records] == ["boom"]  # the cast did not fail


@pytest.mark.parametrize("usage", ["hidden", "labeling"])
def test_gold_labels_are_measured_over_the_own_table_only_and_at_the_joined_k(usage: str) -> None:
    """With a gold column on the dataset's own table (the patients): LFs over visits, or over visits ⋈ patients, run
    without gold (the labels are the patients' and these rows are visits); over patients ⋈ visits the gold is
    measured at the joined rows per unit (8), never at the patients' 1. A hidden gold column is readable by no LF
    over a join; one of usage `labeling` is readable in LF conditions, as over the patients, priced at the join's
    k."""
    gold_policy = POLICY_YAML.replace(
        "  income:     {type: decimal, bounds: [0, 500000], precision: 0.01}\n",
        "  income:     {type: decimal, bounds: [0, 500000], precision: 0.01}\n"
        f"  outcome:    {{type: category, domain: [routine, urgent], usage: {usage}}}\n",
    ).replace("labels: {classes: [routine, urgent]}", "labels: {classes: [routine, urgent], gold_column: outcome}")
    policy = parse_policy(yaml.safe_load(gold_policy))
    assert policy.labels is not None and policy.labels.gold_column == "outcome"
    lfs = [{"name": "long", "label": "urgent", "when": "length_of_stay > 2"}]
    for choice, gold, k in (
        ({"table": "visits"}, False, 8),
        ({"table": "visits", "join_private": "hospital"}, False, 8),
        ({"table": "visits", "join_private": "hospital", **CHAPTERS}, False, 8),
        ({"table": "hospital", "join_private": "visits"}, True, 8),
        ({"table": "hospital", "join_private": "labs"}, True, 12),
    ):
        source = resolve_source(policy, public=_public, what="labeling functions", **choice)
        assert source is not None
        when = lfs if choice["table"] != "hospital" or choice.get("join_private") == "visits" else None
        given = when or [{"name": "crp", "label": "urgent", "when": "test = 'crp'"}]
        plan = plan_lf_stats(with_classes(source, policy), lfs=given, epsilon=1.0, alpha=0.05, source=source.tree)
        assert plan.has_gold is gold, choice
        assert {m.k for m in plan.measurements} == {k}, choice
        if not gold:
            # An LF of these rows reads the patients' gold only where its usage allows, and at the join's k.
            def reading(name: str, source: Any = source) -> Any:
                lf = {"name": "g", "label": "urgent", "when": f"{name} = 'urgent'"}
                return plan_lf_stats(
                    with_classes(source, policy), lfs=[lf], epsilon=1.0, alpha=0.05, source=source.tree
                )

            with pytest.raises(QueryRejected):
                reading("hospital__outcome")
            if usage == "hidden" or "join_private" not in choice:
                with pytest.raises(QueryRejected):
                    reading("outcome")
            else:
                assert {m.k for m in reading("outcome").measurements} == {k}


def test_a_resumed_proxy_job_reads_the_source_it_was_charged_for(
    hospital: Workspace, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A proxy of patients ⋈ visits admitted by a gateway that stopped before running it: the restarted gateway runs
    it over the recorded join, every measurement at the joined k (8), not at the patients' own 1."""
    from gateway.synth_jobs import SynthJobs

    seen: list[int] = []
    release = synth_measure.release_integers

    def spy(values: Any, sensitivity: int, epsilon: float) -> Any:
        if len(values):
            seen.append(int(sensitivity))
        return release(values, sensitivity, epsilon)

    h = hospital.headers("analyst")
    body = {
        "dataset": "hospital",
        "epsilon": 1.5,
        "rows": 30,
        "seed": 11,
        "table": "hospital",
        "join_private": "visits",
    }
    with monkeypatch.context() as patched:
        patched.setattr(SynthJobs, "_maybe_start", lambda self, job: None)  # admitted, never started
        with hospital.app() as c:
            before = _spent(c, h)
            r = c.post("/v1/synth", json=body, headers=h)
            assert r.status_code == 200, r.text
            job_id = r.json()["job_id"]
            assert r.json()["tables"]["rows_per_unit"] == 8
            assert c.get(f"/v1/synth/{job_id}", headers=h).json()["status"] == "queued"
            assert _spent(c, h)[0] == pytest.approx(before[0] + 1.5)
    monkeypatch.setattr(synth_measure, "release_integers", spy)
    with hospital.app() as c:  # the restart resumes it
        done = wait(c, h, job_id)
        assert done["status"] == "done", done
        assert done["tables"]["join_private"] == "visits"
        assert _spent(c, h)[0] == pytest.approx(before[0] + 1.5)  # no second charge
        columns = set(proxy_frame(c, h, job_id).columns)
    assert seen and set(seen) == {8}
    assert {"age", "length_of_stay"} <= columns and not [col for col in columns if "patient_id" in col]

"""Python LFs that loop, allocate without bound, raise or open a socket are contained: an exception on a row is an
abstention on that row, a timeout or a memory kill after the charge gives the default release with the same
status and shape, nothing quotes a row (response or host log), the charge stands, and the gateway keeps serving."""

from __future__ import annotations

import logging
import signal
from collections.abc import Iterator
from typing import Any

import numpy as np
import pyarrow as pa
import pytest

from audit.log import AuditLog
from labeling_functions.analysis import plan_lf_stats, run_lfs
from labeling_functions.registry import REGISTRY
from labeling_functions.sandbox import LFRef, SandboxError, SandboxLimits, apply_python_lfs
from labeling_functions.specs import ABSTAIN
from tests.conftest import Workspace
from tests.lf import hostile_lfs

CLASSES = ["urgent", "routine"]
GOOD_LF = {"name": "red_flags", "label": "urgent", "keywords": {"column": "triage_note", "any": ["chest pain"]}}
HOSTILE = [  # (LF, how the run ends: "abstain" on every row, or "fallback" to the default release)
    (hostile_lfs.test_only_sleeps_forever, "fallback"),
    (hostile_lfs.test_only_allocates_without_bound, "fallback"),
    (hostile_lfs.test_only_raises_with_row_contents, "abstain"),
    (hostile_lfs.test_only_opens_a_socket, "abstain"),
]
LIMITS = SandboxLimits(seconds=6, memory_bytes=256 * 2**20)


def shape(x: Any) -> Any:
    """Keys and list lengths of an answer, not its values (nor the LFs' public definitions, which differ)."""
    if isinstance(x, dict):
        return {k: shape(v) for k, v in sorted(x.items()) if k != "definitions"}
    if isinstance(x, list):
        return [shape(v) for v in x]
    return "scalar"


def _ref(lf: Any) -> LFRef:
    return LFRef(lf.name, lf._f.__module__, lf._f.__name__, tuple(hostile_lfs.COLUMNS[lf.name]))


@pytest.fixture
def hostile_registered() -> Iterator[None]:
    lfs = [lf for lf, _ in HOSTILE] + [hostile_lfs.test_only_returns_undeclared_label]
    for lf in lfs:
        REGISTRY.register(
            lf, dataset="visits", classes=CLASSES, labels=["urgent"], columns=hostile_lfs.COLUMNS[lf.name]
        )
    try:
        yield
    finally:
        for lf in lfs:
            REGISTRY.unregister(lf.name)


def test_misbehaving_python_lfs_are_contained_and_the_gateway_keeps_serving(
    workspace: Workspace, hostile_registered: None, caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str]
) -> None:
    h = workspace.headers("lf_author")
    caplog.set_level(logging.DEBUG)
    with workspace.app() as c:
        c.app.state.lf_limits = LIMITS
        good = c.post(
            "/v1/lf/stats",
            json={"dataset": "visits", "lfs": [GOOD_LF], "epsilon": 0.25, "python_lfs": ["urgent_diagnosis"]},
            headers=h,
        )
        assert good.status_code == 200, good.text
        spent = 0.25
        for lf, outcome in HOSTILE:
            r = c.post(
                "/v1/lf/stats",
                json={"dataset": "visits", "lfs": [GOOD_LF], "python_lfs": [lf.name], "epsilon": 0.25},
                headers=h,
            )
            spent += 0.25
            assert r.status_code == 200, (lf.name, r.text)
            body = r.json()
            assert shape(body) == shape(good.json()), lf.name
            assert hostile_lfs.SECRET_MARKER not in r.text and "Traceback" not in r.text
            assert "timeout" not in r.text and "memory" not in r.text  # nothing says the run failed
            if outcome == "abstain":  # every row raised: the LF abstained on every row (up to noise)
                # A true count of 0 released with Laplace noise: the noisy value stays below three half-widths of
                # its 95% interval but with probability 0.5 * 20**-3 (a bound on the 95% interval itself would miss
                # 0 one time in forty).
                votes = body["lfs"][1]["votes"]
                assert votes["value"] <= 3 * (votes["interval"][1] - votes["value"]), body["lfs"][1]
            # Still serving: health, and the budget shows the charge stood.
            assert c.get("/healthz").json() == {"status": "ok"}
            budget = c.get("/v1/budget", headers=h).json()
            visits = next(b for b in budget if b["dataset"] == "visits")
            assert abs(visits["spent"]["epsilon"] - spent) < 1e-9

        # Undeclared labels count as abstentions.
        bastion = c.app.state.bastion
        policy, _ = bastion.engine.policy("visits")
        plan = plan_lf_stats(policy, lfs=[], python_lfs=["test_only_returns_undeclared_label"], epsilon=1.0, alpha=0.05)
        assert run_lfs(plan, bastion.engine).exact.coverage.tolist() == [0]

    # The audit record names the failure class of the runs that fell back; the host log never quotes a row.
    released = [
        r
        for r in AuditLog(workspace.settings.audit_dir).records()
        if r.get("event") == "lf_stats" and r.get("phase") == "released"
    ]
    fallbacks = [r for r in released if r.get("reason") == "fallback"]
    # The hog is stopped by the memory cap or, allocating slowly, by the per-row time limit on every row; on a
    # loaded machine the allocation can also fail where the worker cannot report it, and the worker dies
    # (LFSandboxFailed): contained all the same, the gateway serving and nothing quoted.
    assert [r.get("error") for r in fallbacks][0] == "LFSandboxTimedOut"
    assert [r.get("error") for r in fallbacks][1] in {"LFSandboxOutOfMemory", "LFSandboxTimedOut", "LFSandboxFailed"}
    out, err = capfd.readouterr()
    for text in (caplog.text, out, err):
        assert hostile_lfs.SECRET_MARKER not in text and "Traceback" not in text


def test_an_lf_that_fails_on_some_rows_abstains_on_those_rows_only() -> None:
    frame = pa.table(
        {
            "length_of_stay": [0, 1, 5, 0, 20],
            "age": [3, 4, 5, 6, 7],
            "triage_note": ["a", "b", "c", "d", "e"],
            "diagnosis": ["x"] * 5,
        }
    )
    refs = [_ref(hostile_lfs.test_only_raises_on_same_day_visits), _ref(hostile_lfs.test_only_returns_junk)]
    votes = apply_python_lfs(refs, [frame, frame], SandboxLimits(seconds=60))
    assert votes[0].tolist() == [-1, 0, 0, -1, -1]  # 100 // 1 and 100 // 5 > 10; 100 // 20 is not
    assert votes[1].tolist() == [-1] * 5  # a dict, an int beyond int64, a string: no vote
    # Hanging on some rows: the per-row time limit makes the LF abstain there, the run goes on.
    hung = apply_python_lfs([_ref(hostile_lfs.test_only_sleeps_on_same_day_visits)], [frame], SandboxLimits(seconds=30))
    assert hung[0].tolist() == [-1, -1, -1, -1, 0]
    assert np.array_equal(
        apply_python_lfs(
            [_ref(hostile_lfs.test_only_sleeps_on_same_day_visits)], [frame.take([1, 4])], SandboxLimits(seconds=60)
        )[0],
        [-1, 0],
    )


def test_an_lf_that_reads_an_undeclared_column_is_refused_before_the_charge_and_stopped_in_the_sandbox(
    workspace: Workspace,
) -> None:
    h = workspace.headers("lf_author")
    with workspace.app() as c:
        for lf in (hostile_lfs.test_only_reads_an_undeclared_column, hostile_lfs.test_only_hides_what_it_reads):
            with REGISTRY.registered(
                lf, dataset="visits", classes=CLASSES, labels=["urgent"], columns=hostile_lfs.COLUMNS[lf.name]
            ):
                r = c.post(
                    "/v1/lf/stats", json={"dataset": "visits", "python_lfs": [lf.name], "epsilon": 0.5}, headers=h
                )
                assert r.status_code == 400, r.text
                error = r.json()["error"]
                assert error["code"] == "invalid_request" and error["lf"] == lf.name and lf.name in error["message"]
                assert error["reason"] == "undeclared_column"
        budget = c.get("/v1/budget", headers=h).json()
        assert next(b for b in budget if b["dataset"] == "visits")["spent"]["epsilon"] == 0  # nothing charged
    entry = REGISTRY.register(
        hostile_lfs.test_only_reads_an_undeclared_column,
        dataset="visits",
        classes=CLASSES,
        labels=["urgent"],
        columns=["age"],
    )
    try:
        assert entry.problem is not None and "['income']" in entry.problem
    finally:
        REGISTRY.unregister(entry.name)
    # Were it run anyway, the sandbox shows it its declared columns only, and an undeclared read fails the run.
    frame = pa.table({"age": [60, 70], "income": [5000.0, 9000.0]})
    with pytest.raises(SandboxError) as failed:
        apply_python_lfs([_ref(hostile_lfs.test_only_reads_an_undeclared_column)], [frame], SandboxLimits(seconds=60))
    assert failed.value.details["reason"] == "undeclared_column"
    assert "test_only_reads_an_undeclared_column" in failed.value.message


def test_an_lf_that_catches_everything_is_refused_at_registration() -> None:
    lf = hostile_lfs.test_only_swallows_the_time_limit
    with REGISTRY.registered(lf, dataset="visits", classes=["urgent", "routine"], labels=["urgent"], columns=["age"]):
        entry = REGISTRY.get(lf.name)
        assert entry.problem is not None and "catches every exception" in entry.problem


def test_a_row_whose_lf_caught_the_alarm_abstains() -> None:
    # Called directly (as the worker does, on its main thread): the LF catches the alarm and goes on, and its vote
    # would depend on how long it took; the row abstains, and the repeated alarm ends the slow steps early.
    import time

    from labeling_functions import sandbox

    previous = signal.signal(signal.SIGALRM, sandbox._on_alarm)
    try:
        slow, fast = sandbox.Row({"age": 80}), sandbox.Row({"age": 20})
        start = time.perf_counter()
        assert sandbox.vote(hostile_lfs.test_only_swallows_the_time_limit._f, slow) == ABSTAIN
        took = time.perf_counter() - start
        assert sandbox.vote(hostile_lfs.test_only_swallows_the_time_limit._f, fast) == 0
    finally:
        signal.signal(signal.SIGALRM, previous)
    assert took < 100 * 0.05 / 2, took  # not the 5 s it would sleep unchecked

"""The compiled SQL label matrix is exactly Snorkel's PandasLFApplier output for equivalent Python LFs, and the
statistics computed from the engine's vote patterns are exactly Snorkel's LFAnalysis on that matrix."""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from snorkel.labeling import LFAnalysis, PandasLFApplier, labeling_function

from gateway.service import Bastion
from labeling_functions.analysis import plan_lf_stats, run_lfs
from labeling_functions.combos import lf_input
from labeling_functions.matrix import VoteQuery, label_matrix, lf_inputs, vote_patterns
from labeling_functions.registry import REGISTRY
from labeling_functions.sandbox import SandboxLimits
from labeling_functions.specs import compile_lfs
from labeling_functions.statistics import ExactStatistics
from policies.schema import Policy
from tests.conftest import Workspace
from tests.lf import hostile_lfs

URGENT, ROUTINE, ABSTAIN = 0, 1, -1

SQL_LFS: list[dict[str, Any]] = [
    {
        "name": "red_flags",
        "label": "urgent",
        "keywords": {"column": "triage_note", "any": ["Chest Pain", "shortness of breath", "stroke"]},
    },
    {
        "name": "planned",
        "label": "routine",
        "regex": {"column": "triage_note", "pattern": r"^(routine|follow-up|prescription)"},
    },
    {"name": "urgent_dx", "label": "urgent", "when": "diagnosis IN ('I21', 'I63', 'J96', 'R07', 'S72')"},
    {"name": "old_long_stay", "label": "urgent", "when": "age >= 70 AND length_of_stay >= 6"},
    {"name": "young_same_day", "label": "routine", "when": "age < 40 AND length_of_stay = 0 AND sex <> 'X'"},
    {
        "name": "winter_fever",
        "label": "urgent",
        "when": "month(visit_day) IN (12, 1, 2) AND contains(triage_note, 'fever')",
    },
    {
        "name": "capital_sore",
        "label": "routine",
        "keywords": {"column": "triage_note", "any": ["Sore"], "case_sensitive": True},
    },
    {"name": "rich_not_cardiac", "label": "routine", "when": "income > 90000 AND NOT (diagnosis LIKE 'I%')"},
]


@labeling_function()
def red_flags(x: Any) -> int:
    note = x.triage_note.lower()
    return URGENT if any(w in note for w in ("chest pain", "shortness of breath", "stroke")) else ABSTAIN


@labeling_function()
def planned(x: Any) -> int:
    return ROUTINE if re.search(r"^(routine|follow-up|prescription)", x.triage_note) else ABSTAIN


@labeling_function()
def urgent_dx(x: Any) -> int:
    return URGENT if x.diagnosis in {"I21", "I63", "J96", "R07", "S72"} else ABSTAIN


@labeling_function()
def old_long_stay(x: Any) -> int:
    return URGENT if x.age >= 70 and x.length_of_stay >= 6 else ABSTAIN


@labeling_function()
def young_same_day(x: Any) -> int:
    return ROUTINE if x.age < 40 and x.length_of_stay == 0 and x.sex != "X" else ABSTAIN


@labeling_function()
def winter_fever(x: Any) -> int:
    return URGENT if x.visit_day.month in (12, 1, 2) and "fever" in x.triage_note else ABSTAIN


@labeling_function()
def capital_sore(x: Any) -> int:
    return ROUTINE if "Sore" in x.triage_note else ABSTAIN


@labeling_function()
def rich_not_cardiac(x: Any) -> int:
    return ROUTINE if x.income > 90000 and not x.diagnosis.startswith("I") else ABSTAIN


PY_EQUIVALENTS = [
    red_flags,
    planned,
    urgent_dx,
    old_long_stay,
    young_same_day,
    winter_fever,
    capital_sore,
    rich_not_cardiac,
]


@pytest.fixture
def private(workspace: Workspace) -> Iterator[tuple[Bastion, Policy]]:
    bastion = Bastion(workspace.settings)
    try:
        yield bastion, bastion.engine.policy("visits")[0]
    finally:
        bastion.close()


def _snorkel_summary(L: np.ndarray, gold: np.ndarray) -> dict[str, np.ndarray]:
    s = LFAnalysis(L).lf_summary(Y=gold)
    n = len(L)
    return {
        "coverage": np.rint(s["Coverage"].to_numpy() * n),
        "overlaps": np.rint(s["Overlaps"].to_numpy() * n),
        "conflicts": np.rint(s["Conflicts"].to_numpy() * n),
        "correct": s["Correct"].to_numpy(),
        "incorrect": s["Incorrect"].to_numpy(),
    }


def _assert_exact_matches_snorkel(exact: ExactStatistics, L: np.ndarray, gold: np.ndarray) -> None:
    ref = _snorkel_summary(L, gold)
    assert exact.rows == len(L)
    assert exact.covered == int((L != ABSTAIN).any(axis=1).sum())
    assert np.array_equal(exact.coverage, ref["coverage"])
    assert np.array_equal(exact.overlaps, ref["overlaps"])
    assert np.array_equal(exact.conflicts, ref["conflicts"])
    assert exact.correct is not None and exact.incorrect is not None
    assert np.array_equal(exact.correct.sum(axis=1), ref["correct"])
    assert np.array_equal(exact.incorrect.sum(axis=1), ref["incorrect"])
    fired = (L != ABSTAIN).astype(np.int64)
    assert np.array_equal(exact.pair_overlaps, fired.T @ fired)


def test_sql_label_matrix_equals_pandas_lf_applier(private: tuple[Bastion, Policy]) -> None:
    bastion, policy = private
    cur = bastion.engine
    compiled = compile_lfs(SQL_LFS, policy)
    query = VoteQuery(policy, tuple(compiled))
    rows, matrix, gold, frame = label_matrix(cur, query, lf_inputs(policy))
    expected = PandasLFApplier(PY_EQUIVALENTS).apply(frame, progress_bar=False)

    assert len(set(rows.tolist())) == len(rows) and np.array_equal(rows, np.sort(rows))
    assert matrix.shape == expected.shape == (len(frame), len(SQL_LFS))
    assert np.array_equal(matrix, expected)
    assert (matrix != ABSTAIN).any(axis=0)[:6].all()  # the LFs do fire (the case-sensitive one need not)
    assert set(np.unique(gold)) == {URGENT, ROUTINE}

    # Statistics from the engine's GROUP BY over vote patterns equal Snorkel's LFAnalysis on the full matrix.
    votes, pattern_gold, counts = vote_patterns(cur, query)
    assert len(counts) < 2_000 and counts.sum() == len(frame)
    _assert_exact_matches_snorkel(ExactStatistics.from_patterns(votes, counts, pattern_gold, 2), expected, gold)


def _same(a: ExactStatistics, b: ExactStatistics) -> None:
    for name, value in vars(a).items():
        other = getattr(b, name)
        assert np.array_equal(value, other) if isinstance(value, np.ndarray) else value == other, name


def test_python_lfs_once_per_combination_vote_as_snorkel_does_per_row(private: tuple[Bastion, Policy]) -> None:
    bastion, policy = private
    cur = bastion.engine
    names = ["urgent_diagnosis", "red_flag_words", "routine_words", "stay_and_age"]
    *_, frame = label_matrix(cur, VoteQuery(policy, ()), lf_inputs(policy))
    lfs = [REGISTRY.get(n) for n in names]
    in_process = PandasLFApplier(
        [getattr(__import__(e.module, fromlist=[e.attribute]), e.attribute) for e in lfs]
    ).apply(frame, progress_bar=False)

    plan = plan_lf_stats(policy, lfs=SQL_LFS[:3], python_lfs=names, epsilon=1.0, alpha=0.05)
    limits = SandboxLimits(seconds=120)
    # Every LF's columns have fewer distinct combinations than the padding, the notes included.
    assert all(lf_input(cur, policy, lf, limits.combinations).size < limits.combinations for lf in lfs)
    done: list[float] = []
    run = run_lfs(plan, cur, limits=limits, progress=done.append)
    _, sql_matrix, gold, _ = label_matrix(cur, VoteQuery(policy, plan.declarative))
    _assert_exact_matches_snorkel(run.exact, np.hstack([sql_matrix, in_process]), gold)
    assert all(0 <= f <= 1 for f in done)

    # Without padding (more combinations than the padding's 1): the same statistics.
    per_row = SandboxLimits(seconds=120, combinations=1)
    assert all(lf_input(cur, policy, lf, per_row.combinations).table.num_rows > 1 for lf in lfs)
    _same(run_lfs(plan, cur, limits=per_row).exact, run.exact)

    # With the label model every row's pattern is the same, row by row, either way.
    lm = plan_lf_stats(policy, lfs=SQL_LFS[:1], python_lfs=names, epsilon=1.0, alpha=0.05, label_model=True)
    a, b = run_lfs(lm, cur, limits=limits), run_lfs(lm, cur, limits=per_row)
    assert a.row_ids is not None and b.row_ids is not None
    assert a.row_patterns is not None and b.row_patterns is not None
    assert np.array_equal(a.row_ids, b.row_ids) and np.array_equal(a.row_patterns, b.row_patterns)
    _same(a.exact, b.exact)


HOSTILE = [
    hostile_lfs.test_only_raises_on_same_day_visits,
    hostile_lfs.test_only_returns_junk,
    hostile_lfs.test_only_raises_with_row_contents,
    hostile_lfs.test_only_returns_undeclared_label,
]


def test_hostile_python_lfs_vote_the_same_padded_or_not(private: tuple[Bastion, Policy]) -> None:
    bastion, policy = private
    with contextlib.ExitStack() as stack:
        for lf in HOSTILE:
            stack.enter_context(
                REGISTRY.registered(
                    lf,
                    dataset="visits",
                    classes=["urgent", "routine"],
                    labels=["urgent"],
                    columns=hostile_lfs.COLUMNS[lf.name],
                )
            )
        plan = plan_lf_stats(policy, lfs=SQL_LFS[:1], python_lfs=[lf.name for lf in HOSTILE], epsilon=1.0, alpha=0.05)
        combined = run_lfs(plan, bastion.engine, limits=SandboxLimits(seconds=120))
        per_row = run_lfs(plan, bastion.engine, limits=SandboxLimits(seconds=120, combinations=1))
    _same(combined.exact, per_row.exact)
    assert combined.exact.coverage[1] > 0  # the LF that raises on some rows votes on the others
    assert combined.exact.coverage[2:].tolist() == [0, 0, 0]  # junk, always raising, undeclared label: abstain


def test_the_combinations_are_padded_to_a_public_size(private: tuple[Bastion, Policy]) -> None:
    bastion, policy = private
    cap = SandboxLimits().combinations
    for name in ("urgent_diagnosis", "stay_and_age"):
        got = lf_input(bastion.engine, policy, REGISTRY.get(name), cap)
        assert got.table.num_rows == cap and 0 < got.size < cap
        keys = got.table.column("__k").to_pylist()[: got.size]
        assert keys == list(range(1, got.size + 1))  # one input per key
        assert all(got.table.column(c).null_count == cap - got.size for c in got.table.column_names)  # then NULLs


def test_past_the_padding_every_combination_is_an_input_and_nothing_switches(private: tuple[Bastion, Policy]) -> None:
    # More combinations than the padding: each is one input (no per-row fallback, whose time jumped when one
    # unit's rows crossed the number), so one unit's rows change the number of inputs by at most k.
    bastion, policy = private
    lf = REGISTRY.get("stay_and_age")
    full = lf_input(bastion.engine, policy, lf, SandboxLimits().combinations)
    small = lf_input(bastion.engine, policy, lf, 10)
    assert small.size == full.size > 10 and small.table.num_rows == small.size
    assert small.table.column("__k").to_pylist() == list(range(1, small.size + 1))

"""One LF-statistics request: validate and price it from public facts (plan), then compute it on the private rows.

The gateway charges `plan.cost` and audits before calling `compute_lf_stats`; nothing here opens the private
database: it receives a DuckDB cursor and the policy.
"""

from __future__ import annotations

import math
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import duckdb
import numpy as np

from labeling_functions.matrix import VoteQuery, check_binds, label_matrix, lf_input_frame, python_votes, vote_patterns
from labeling_functions.registry import REGISTRY, PythonLF, Registry
from labeling_functions.sandbox import LFRef, SandboxLimits, apply_python_lfs
from labeling_functions.specs import ABSTAIN, MAX_LFS, CompiledLF, check_name, classes_of, compile_lfs
from labeling_functions.statistics import (
    ExactStatistics,
    LFInfo,
    Measurement,
    plan_measurements,
    release_statistics,
)
from policies.accountant import PrivacyLoss
from policies.errors import InvalidRequest
from policies.schema import Policy

NOTES = [
    "Coverage, overlaps and conflicts are fractions of the rows of the pre-bounded table (at most "
    "max_rows_per_unit rows per privacy unit); their intervals combine the numerator and the noisy row count, "
    "each at alpha/2.",
    "Polarity is the set of labels each LF declares (public), not the labels it was seen to emit.",
]


@dataclass(frozen=True)
class LFStatsPlan:
    policy: Policy
    declarative: tuple[CompiledLF, ...]
    python: tuple[PythonLF, ...]
    epsilon: float
    alpha: float
    label_model: bool
    measurements: tuple[Measurement, ...]

    @property
    def classes(self) -> list[str]:
        return classes_of(self.policy)

    @property
    def has_gold(self) -> bool:
        return self.policy.labels is not None and self.policy.labels.gold_column is not None

    @property
    def lfs(self) -> list[LFInfo]:
        return ([LFInfo(lf.name, "sql", (lf.label_index,)) for lf in self.declarative]
                + [LFInfo(lf.name, "python", lf.label_indices) for lf in self.python])

    @property
    def cost(self) -> PrivacyLoss:
        return PrivacyLoss(self.epsilon)

    def normalized(self) -> dict[str, Any]:
        """What determines the answer: part of the cache key (LF names included: they label the output)."""
        return {
            "sql": [[lf.name, lf.label_index, lf.sql] for lf in self.declarative],
            "python": [[lf.name, lf.module, lf.attribute, lf.code_sha256, list(lf.labels)] for lf in self.python],
            "epsilon": self.epsilon, "alpha": self.alpha, "label_model": self.label_model,
        }

    def summary(self) -> dict[str, Any]:
        notes = list(NOTES)
        if self.python:
            notes.append("A Python LF's votes outside its declared labels are counted as abstentions.")
        if self.label_model:
            notes.append("The label model's probabilistic labels were written to a private file for downstream "
                         "jobs; only their DP class balance and agreement with the gold labels are shown.")
        return {
            "dataset": self.policy.dataset,
            "classes": self.classes,
            "gold_column": self.policy.labels.gold_column if self.policy.labels else None,
            "alpha": self.alpha,
            "epsilon": self.epsilon,
            "delta": 0.0,
            "definitions": [lf.public() for lf in self.declarative]
            + [{"name": lf.name, "kind": "python", "labels": list(lf.labels), "code_sha256": lf.code_sha256}
               for lf in self.python],
            "notes": notes,
        }

    def dry_run(self) -> dict[str, Any]:
        return {**self.summary(), "measurements": [m.public(self.alpha) for m in self.measurements]}


def plan_lf_stats(
    policy: Policy,
    *,
    lfs: list[Any],
    python_lfs: list[str] | None = None,
    epsilon: float,
    alpha: float,
    label_model: bool = False,
    registry: Registry = REGISTRY,
) -> LFStatsPlan:
    """Validate the request against the policy and the registry, and split ε; raises before anything is spent."""
    classes = classes_of(policy)
    if not (isinstance(epsilon, int | float) and math.isfinite(epsilon) and epsilon > 0):
        raise InvalidRequest("epsilon must be a positive finite number")
    if not 0 < alpha < 1:
        raise InvalidRequest("alpha must be between 0 and 1")
    seen: set[str] = set()
    declarative = compile_lfs(lfs or [], policy, seen)
    python: list[PythonLF] = []
    for name in python_lfs or []:
        entry = registry.get(name) if isinstance(name, str) else None
        if entry is None:
            raise InvalidRequest("python_lfs must be a list of registered LF names")
        check_name(entry.name, seen)
        entry.check_policy(policy)
        python.append(entry)
    m = len(declarative) + len(python)
    if m == 0:
        raise InvalidRequest("give at least one labeling function (lfs or python_lfs)")
    if m > MAX_LFS:
        raise InvalidRequest(f"at most {MAX_LFS} labeling functions per request")
    if label_model and m < 3:
        raise InvalidRequest("the label model needs at least three labeling functions")
    has_gold = policy.labels is not None and policy.labels.gold_column is not None
    polarity = [(lf.label_index,) for lf in declarative] + [lf.label_indices for lf in python]
    measurements = plan_measurements(m=m, polarity=polarity, k=policy.max_rows_per_unit, epsilon=float(epsilon),
                                     has_gold=has_gold, label_model=label_model, n_classes=len(classes))
    return LFStatsPlan(policy=policy, declarative=tuple(declarative), python=tuple(python), epsilon=float(epsilon),
                       alpha=float(alpha), label_model=label_model, measurements=tuple(measurements))


def precheck(plan: LFStatsPlan, cur: duckdb.DuckDBPyConnection) -> None:
    """Schema-only checks of the generated SQL (no row is read); run before charging."""
    check_binds(cur, plan.policy, list(plan.declarative))


@dataclass
class PrivateRun:
    """The exact results of running an LF set over the rows (kept inside Bastion)."""

    exact: ExactStatistics
    label_model_output: Path | None = None


def _python_votes(plan: LFStatsPlan, cur: duckdb.DuckDBPyConnection, limits: SandboxLimits
                  ) -> tuple[np.ndarray, np.ndarray]:
    rows, frame = lf_input_frame(cur, plan.policy)
    refs = [LFRef(lf.name, lf.module, lf.attribute) for lf in plan.python]
    votes = apply_python_lfs(refs, frame, limits)
    for j, lf in enumerate(plan.python):  # votes outside the declared polarity count as abstentions
        votes[:, j] = np.where(np.isin(votes[:, j], lf.label_indices), votes[:, j], ABSTAIN)
    return rows, votes


def run_lfs(plan: LFStatsPlan, cur: duckdb.DuckDBPyConnection, *, limits: SandboxLimits | None = None,
                outputs_dir: Path | None = None, run_id: str | None = None) -> PrivateRun:
    """Apply the LFs to the pre-bounded rows and compute the exact statistics (and the label model)."""
    limits = limits or SandboxLimits()
    relation = f"__lf_votes_{uuid.uuid4().hex}"
    query = VoteQuery(plan.policy, plan.declarative, python_columns=len(plan.python), python_relation=relation)
    if plan.python:
        rows, votes = _python_votes(plan, cur, limits)
        with python_votes(cur, rows, votes, relation):
            return _exact(plan, cur, query, outputs_dir, run_id)
    return _exact(plan, cur, query, outputs_dir, run_id)


def _exact(plan: LFStatsPlan, cur: duckdb.DuckDBPyConnection, query: VoteQuery, outputs_dir: Path | None,
           run_id: str | None) -> PrivateRun:
    votes, gold, counts = vote_patterns(cur, query)
    exact = ExactStatistics.from_patterns(votes, counts, gold if plan.has_gold else None, len(plan.classes))
    run = PrivateRun(exact)
    if plan.label_model:
        from labeling_functions.label_model import fit_and_write

        if outputs_dir is None:
            raise InvalidRequest("the label model needs an outputs directory")
        rows, matrix, gold_rows = label_matrix(cur, query)
        name = f"lf-labels-{plan.policy.dataset}-{run_id or uuid.uuid4().hex}.parquet"
        lm = fit_and_write(rows, matrix, gold_rows if plan.has_gold else np.full(len(rows), ABSTAIN),
                           plan.classes, outputs_dir / name)
        exact.predicted, exact.agree, exact.disagree = lm.predicted, lm.agree, lm.disagree
        run.label_model_output = lm.output
    return run


def compute_lf_stats(plan: LFStatsPlan, cur: duckdb.DuckDBPyConnection, *, limits: SandboxLimits | None = None,
                     outputs_dir: Path | None = None, run_id: str | None = None) -> dict[str, Any]:
    """The JSON-ready DP answer: run privately, release every measurement once, post-process."""
    run = run_lfs(plan, cur, limits=limits, outputs_dir=outputs_dir, run_id=run_id)
    released = release_statistics(run.exact, list(plan.measurements), plan.lfs, plan.classes, plan.alpha)
    if "label_model" in released:
        assert run.label_model_output is not None
        released["label_model"]["output"] = run.label_model_output.name
        if not plan.has_gold:
            released["label_model"]["gold_agreement"] = None
    return {**plan.summary(), **released}

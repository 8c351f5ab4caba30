"""One LF-statistics request: validate and price it from public facts (plan), then compute it on the private rows.

The gateway charges `plan.cost` and audits before calling `compute_lf_stats`; nothing here opens the private
database: it receives the gateway's engine (a `policies.reader.Reader`) and the policy. Everything that can be
refused is refused in `plan_lf_stats` and `precheck`, before the charge. After it, the status and shape of the
answer are fixed: if running the LFs fails for any reason, `compute_lf_stats` raises `LFRunFailed` (carrying only
a failure class) and the gateway answers `compute_lf_stats_default(plan)`, the same measurements released over an
empty table.
"""

from __future__ import annotations

import contextlib
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from sqlglot import exp

from labeling_functions.combos import LFInput, lf_input
from labeling_functions.label_model import write_labels
from labeling_functions.matrix import (
    LFExecutionError,
    VoteQuery,
    check_binds,
    label_matrix,
    patterns_of,
    vote_patterns,
)
from labeling_functions.patterns import PatternDomain
from labeling_functions.registry import REGISTRY, PythonLF, Registry
from labeling_functions.sandbox import Progress, SandboxError, SandboxLimits, apply_python_lfs
from labeling_functions.specs import MAX_LFS, CompiledLF, check_name, classes_of, compile_lfs
from labeling_functions.statistics import (
    ExactStatistics,
    LFInfo,
    Measurement,
    check_calibration,
    plan_measurements,
    release_statistics,
)
from policies.accountant import PrivacyLoss, check_alpha, check_epsilon
from policies.errors import GatewayError, InvalidRequest
from policies.reader import EngineError, Reader
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
    source: exp.Expr | None = None  # the rows read (`gateway.tablesources`); None: the policy's bounded table

    @property
    def classes(self) -> list[str]:
        return classes_of(self.policy)

    @property
    def has_gold(self) -> bool:
        return self.policy.labels is not None and self.policy.labels.gold_column is not None

    @property
    def domain(self) -> PatternDomain:
        """The public domain of vote patterns (× gold) of the label model's histogram."""
        return PatternDomain(tuple(lf.polarity for lf in self.lfs), len(self.classes), self.has_gold)

    @property
    def lfs(self) -> list[LFInfo]:
        return [LFInfo(lf.name, "sql", (lf.label_index,)) for lf in self.declarative] + [
            LFInfo(lf.name, "python", lf.label_indices) for lf in self.python
        ]

    @property
    def cost(self) -> PrivacyLoss:
        return PrivacyLoss(self.epsilon)

    def normalized(self) -> dict[str, Any]:
        """What determines the answer: part of the cache key (LF names included: they label the output)."""
        return {
            "sql": [[lf.name, lf.label_index, lf.sql] for lf in self.declarative],
            "python": [
                [lf.name, lf.module, lf.attribute, lf.code_sha256, list(lf.labels), list(lf.columns)]
                for lf in self.python
            ],
            "epsilon": self.epsilon,
            "alpha": self.alpha,
            "label_model": self.label_model,
        }

    def summary(self) -> dict[str, Any]:
        notes = list(NOTES)
        if self.python:
            notes.append("A Python LF's votes outside its declared labels are counted as abstentions.")
        if self.label_model:
            notes.append(
                "The label model was fitted on a DP histogram of the vote patterns, never on the rows; each "
                "row's label is the model's label for its vote pattern, written to a private file for "
                "downstream jobs. Its class balance and agreement with the gold labels are sums of cells of "
                "that histogram; their intervals take the model's labels as given."
            )
        return {
            "dataset": self.policy.dataset,
            "classes": self.classes,
            "gold_column": self.policy.labels.gold_column if self.policy.labels else None,
            "alpha": self.alpha,
            "epsilon": self.epsilon,
            "delta": 0.0,
            "definitions": [lf.public() for lf in self.declarative]
            + [
                {
                    "name": lf.name,
                    "kind": "python",
                    "labels": list(lf.labels),
                    "columns": list(lf.columns),
                    "code_sha256": lf.code_sha256,
                }
                for lf in self.python
            ],
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
    source: exp.Expr | None = None,
) -> LFStatsPlan:
    """Validate the request against the policy and the registry, and split ε; raises before anything is spent."""
    classes = classes_of(policy)
    epsilon, alpha = check_epsilon(epsilon), check_alpha(alpha)
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
    measurements = plan_measurements(
        m=m,
        polarity=polarity,
        k=policy.max_rows_per_unit,
        epsilon=float(epsilon),
        has_gold=has_gold,
        label_model=label_model,
        n_classes=len(classes),
    )
    check_calibration(measurements, float(alpha), len(classes))
    return LFStatsPlan(
        policy=policy,
        declarative=tuple(declarative),
        python=tuple(python),
        epsilon=float(epsilon),
        alpha=float(alpha),
        label_model=label_model,
        measurements=tuple(measurements),
        source=source,
    )


def precheck(plan: LFStatsPlan, reader: Reader) -> None:
    """Schema-only checks of the generated SQL (no row is read); run before charging."""
    check_binds(reader, plan.policy, list(plan.declarative), plan.source)


class LFRunFailed(GatewayError):
    """Running the LFs over the rows failed after the charge. Never rendered: the gateway answers with
    `compute_lf_stats_default` instead. The subclass (and `reason`) name the kind of failure, for the audit record
    and the log; nothing of the original error is kept."""

    status = 500
    code = "lf_run_failed"
    reason = "internal"

    def __init__(self) -> None:
        super().__init__("the labeling functions failed while running over the rows")


class LFEngineFailed(LFRunFailed):
    reason = "engine"


class LFSandboxTimedOut(LFRunFailed):
    reason = "sandbox_timeout"


class LFSandboxOutOfMemory(LFRunFailed):
    reason = "sandbox_memory"


class LFSandboxFailed(LFRunFailed):
    """The worker crashed, could not load the LFs or failed outside any LF."""

    reason = "sandbox_failed"


class LFIOFailed(LFRunFailed):
    """An operating-system error (a file, a pipe), e.g. writing the label model's private output."""

    reason = "io"


def failure_of(exc: BaseException) -> type[LFRunFailed]:
    """The kind of a failure, from its type only: never from a message, which could quote a row."""
    if isinstance(exc, SandboxError):
        kind = str(exc.details.get("reason"))
        return {"timeout": LFSandboxTimedOut, "memory": LFSandboxOutOfMemory}.get(kind, LFSandboxFailed)
    if isinstance(exc, LFExecutionError | EngineError):
        return LFEngineFailed
    if isinstance(exc, OSError):
        return LFIOFailed
    return LFRunFailed


@dataclass
class PrivateRun:
    """The exact results of running an LF set over the rows (kept inside Bastion)."""

    exact: ExactStatistics
    row_ids: np.ndarray | None = None  # with the label model: every bounded row's id and vote pattern
    row_patterns: np.ndarray | None = None


def run_lfs(
    plan: LFStatsPlan, reader: Reader, *, limits: SandboxLimits | None = None, progress: Progress | None = None
) -> PrivateRun:
    """Apply the LFs to the pre-bounded rows and compute the exact statistics (and each row's vote pattern).

    Declarative LFs are vote columns of one statement. Each Python LF is applied in the sandbox to the distinct
    combinations of its declared columns (padded to a public number: `labeling_functions.combos`), and its
    votes are joined back in the same statement by key. Without the label model the engine aggregates the vote
    patterns and no row leaves it; with it, every row's id and votes are read and the patterns counted here."""
    limits = limits or SandboxLimits()
    inputs = [lf_input(reader, plan.policy, lf, limits.combinations) for lf in plan.python]
    applied = apply_python_lfs([i.ref for i in inputs], [i.table for i in inputs], limits, progress)
    with contextlib.ExitStack() as stack:
        frames = [
            stack.enter_context(reader.frame(LFInput.frame_name(), i.votes(v))).name
            for i, v in zip(inputs, applied, strict=True)
        ]
        query = VoteQuery(plan.policy, plan.declarative, tuple(i.key for i in inputs), tuple(frames), plan.source)
        if not plan.label_model:
            votes, gold, counts = vote_patterns(reader, query)
            return PrivateRun(_statistics(plan, votes, gold, counts))
        row_ids, matrix, gold, _ = label_matrix(reader, query)
    run = PrivateRun(_statistics(plan, *patterns_of(matrix, gold)))
    run.row_ids, run.row_patterns = row_ids, plan.domain.pattern_index(matrix)
    return run


def _statistics(plan: LFStatsPlan, votes: np.ndarray, gold: np.ndarray, counts: np.ndarray) -> ExactStatistics:
    return ExactStatistics.from_patterns(
        votes, counts, gold if plan.has_gold else None, len(plan.classes), plan.domain if plan.label_model else None
    )


def _release(plan: LFStatsPlan, run: PrivateRun, outputs_dir: Path | None) -> dict[str, Any]:
    release = release_statistics(run.exact, list(plan.measurements), plan.lfs, plan.classes, plan.alpha)
    answer = {**plan.summary(), **release.answer}
    if plan.label_model:
        assert release.labels is not None
        name = None
        if outputs_dir is not None:  # named by the gateway, never by the request
            output = outputs_dir / f"lf-labels-{uuid.uuid4().hex}.parquet"
            rows = run.row_ids if run.row_ids is not None else np.zeros(0, dtype=np.int64)
            patterns = run.row_patterns if run.row_patterns is not None else np.zeros(0, dtype=np.int64)
            name = write_labels(output, rows, patterns, release.labels, plan.classes).name
        answer["label_model"]["output"] = name
    return answer


def compute_lf_stats(
    plan: LFStatsPlan,
    reader: Reader,
    *,
    limits: SandboxLimits | None = None,
    outputs_dir: Path | None = None,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """The JSON-ready DP answer: run privately, release every measurement once, post-process. `progress` gets the
    fraction of the Python LFs' inputs done, as their worker reports it (about once a second).

    Any failure (engine, sandbox, a write) raises an LFRunFailed whose type names the kind of failure, with no
    chained exception; the caller then answers `compute_lf_stats_default(plan)`, which has the same shape.
    """
    try:
        return _release(plan, run_lfs(plan, reader, limits=limits, progress=progress), outputs_dir)
    except Exception as exc:  # noqa: BLE001 - every failure after the charge takes the same path
        failure = failure_of(exc)
    raise failure()  # outside the handler: nothing of the original error travels with it


def compute_lf_stats_default(plan: LFStatsPlan, *, outputs_dir: Path | None = None) -> dict[str, Any]:
    """The plan's measurements released over the fixed public default input, an empty table (same ε, same shape:
    the answer to give when `compute_lf_stats` failed after the charge)."""
    exact = ExactStatistics.empty(
        len(plan.lfs), len(plan.classes), plan.has_gold, plan.domain if plan.label_model else None
    )
    empty = np.zeros(0, dtype=np.int64)
    return _release(plan, PrivateRun(exact, empty, empty), outputs_dir)

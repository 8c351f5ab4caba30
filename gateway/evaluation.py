"""DP evaluation of attached model predictions against the gold labels, per slice (`POST /v1/evaluate`).

A request names a dataset, one or more models whose predictions are attached (`gateway.predictions`), slices
(column names or row expressions, each type-checked and compiled exactly like a GROUP BY key of the query path,
with a public domain of values computed from the policy), metrics, and ε (or a target accuracy of each count).
Everything that can be refused is refused here, before the charge. Then, through `Bastion.run_private` (charge →
audit "admitted" → compute → audit "released" → cache), one vector of counts is released with OpenDP's discrete
Laplace mechanism: for every model, slice and slice value, the confusion matrix of gold × predicted classes over
the rows of the pre-bounded table that have a gold label among the classes and a prediction.

Sensitivity. One privacy unit has at most k = max_rows_per_unit rows in the bounded table, and its predictions are
the predictions of those rows (keyed by the row key, unique in the dataset and in the predictions). For one model
and one slice dimension, a row falls in at most one cell (its slice value, gold class and predicted class; none if
any is missing). Adding or removing the unit therefore moves that model's matrices of that slice dimension by at
most k in L1, and the whole vector, over M models and S slice dimensions, by at most k·M·S. That is the `d_in` of
the one release, which costs exactly ε (basic composition is not needed: it is one mechanism).

Metrics (accuracy; precision, recall and F1 per class and macro-averaged) are post-processing of the released
counts, computed on the counts clamped at 0. Their intervals come from conservative interval arithmetic: each cell
of a matrix gets the interval of its count at alpha / C² (C classes; Bonferroni over the C² cells), so that with
probability at least 1 - alpha every cell of the matrix is in its interval at once, and a metric's interval is its
smallest and largest value over that box (every metric here is a / (a + b) with a and b sums of cells, increasing
in a and decreasing in b, so the extremes are at the box's corners; a macro average takes the mean of the classes'
bounds, which contains the mean's range over the box). A metric whose interval is wider than 0.5 is flagged
`noise_dominated`.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import math
import os
import secrets
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
from sqlglot import exp

from audit.record import Event
from gateway.engines.base import bounded
from gateway.predictions import KEY, LABEL, Attachment, PredictionsStore, check_model_name
from gateway.service import Bastion, Context
from gateway.sql.plan import bin_count, binning, public_key_domain, suggested_bin
from gateway.sql.release import refuse_backtracking
from gateway.stores.cache import cache_key
from policies.accountant import MAX_EPSILON, MIN_EPSILON, PrivacyLoss, check_alpha, check_epsilon
from policies.errors import InvalidRequest, NotFound, QueryRejected
from policies.expressions import check_row_expression, parse_statements, reject
from policies.mechanisms import epsilon_for_accuracy, integer_accuracy, release_integers
from policies.reader import EngineError, Reader
from policies.schema import NUMERIC_TYPES, Grant, Policy
from policies.sqltypes import SqlType, Typed, canonical

EVENT = Event.EVALUATE
log = logging.getLogger("bastion")
METRICS = ("accuracy", "precision", "recall", "f1")
MAX_MODELS = 8
MAX_SLICES = 8
MAX_SLICE_CHARS = 2_000
MAX_SLICE_VALUES = 1_000
MAX_CELLS = 200_000  # released counts per request
JOINT_GROUPS = 50_000  # most groups one statement counts several slices in (their value counts plus one, multiplied)
NOISE_DOMINATED = 0.5  # a metric interval wider than this is flagged
ALL_ROWS = "all"  # the one slice of a request without slices, and its one value
_FRAME = "__bastion_predictions"
NOTES = [
    "Counts are over the rows of the pre-bounded table (at most max_rows_per_unit rows per privacy unit) that have a "
    "gold label among the classes and a prediction; rows outside a slice's public values (a missing value) are in "
    "none of its cells.",
    "All counts are one discrete Laplace release of sensitivity k·M·S (k rows per unit, M models, S slice "
    "dimensions): each row falls in at most one cell per model and slice dimension.",
    "A count's interval is at the request's alpha. Metrics are computed from the noisy counts clamped at 0; their "
    "intervals are the metric's range over the cells' intervals at alpha / C² (C classes), which hold together "
    "with probability at least 1 - alpha: conservative interval arithmetic, not a bootstrap.",
    "A metric with an interval wider than 0.5 is flagged noise_dominated: its slice is too small for the ε spent.",
]


@dataclass(frozen=True)
class Slice:
    """One slice dimension: the text as given, its compiled total tree over the bounded table (None: all rows),
    its type and its public values."""

    name: str
    tree: exp.Expr | None
    typed: Typed | None
    values: tuple[Any, ...]

    def normalized(self) -> str:
        return self.tree.sql(dialect="duckdb", normalize=True) if self.tree is not None else ALL_ROWS


def plan_slice(text: Any, policy: Policy) -> Slice:
    """Validate a slice (a column name or a row expression) like a GROUP BY key of the query path: parsed, type
    checked against the policy (query columns only: the gold label, labeling-only and hidden columns are refused),
    compiled to a total expression, and given a public domain of values; refused with its span otherwise."""
    if not isinstance(text, str) or not text.strip():
        raise InvalidRequest("a slice is a column name or a row expression (a non-empty string)")
    if len(text) > MAX_SLICE_CHARS:
        raise QueryRejected(f"a slice is longer than {MAX_SLICE_CHARS:,} characters", reason="too_long", sql=text)
    statements = parse_statements(text)
    if len(statements) != 1:
        raise reject(
            "a slice is one expression",
            "multiple_statements",
            statements[1] if len(statements) > 1 else None,
            text,
            hint="write a column name or an expression such as CASE WHEN age >= 65 THEN 'senior' ELSE 'adult' END",
        )
    node = statements[0]
    if isinstance(node, exp.Query) or not isinstance(node, exp.Expr) or isinstance(node, exp.Alias):
        raise reject("a slice is one row expression", "unsupported_statement", node, text)
    if any(isinstance(n, exp.AggFunc) for n in node.walk()):
        raise reject("a slice cannot use an aggregate", "aggregate_in_group_by", node, text)
    try:
        checked = check_row_expression(node, policy, text)
    except RecursionError:
        raise QueryRejected("the slice is too deeply nested", reason="too_complex", sql=text) from None
    if not checked.columns or checked.typed.type is SqlType.NULL:
        raise reject("a slice needs an expression of a column", "constant_group_key", node, text)
    domain = public_key_domain(node, policy, checked.tree, checked.typed)
    if domain is None:
        raise reject(
            "a slice needs a public set of values (a column with a declared domain, a bounded int or date with few "
            "values, a binned bounded column, or a CASE over them)",
            "no_public_domain",
            node,
            text,
            hint=_slice_advice(node, policy),
        )
    if not domain:
        raise reject(
            "the slice has no public value: every row's value would be missing (NULL), so the release would count "
            "no row in it",
            "empty_slice",
            node,
            text,
            hint="check the expression's conditions against the columns' public domains and bounds, e.g. CASE WHEN "
            "age >= 65 THEN 'senior' ELSE 'adult' END",
        )
    if len(domain) > MAX_SLICE_VALUES:
        raise reject(
            f"the slice has {len(domain):,} public values; at most {MAX_SLICE_VALUES:,} are allowed",
            "too_many_groups",
            node,
            text,
            hint="bin it more coarsely, or use a CASE expression with a few branches",
        )
    return Slice(text, checked.tree, checked.typed, tuple(domain))


def _slice_advice(node: exp.Expr, policy: Policy) -> str:
    """How to give a slice a public set of values: bin a bounded numeric column, widen a bin, or use a CASE."""
    case = "or a CASE expression with a few branches, e.g. CASE WHEN age >= 65 THEN 'senior' ELSE 'adult' END"
    bins = binning(node)
    if bins is not None:
        spec = policy.columns.get(bins.column)
        n = None if spec is None else bin_count(spec, bins.width)
        if n is not None and n > MAX_SLICE_VALUES:
            return (
                f"this slice has {n:,} bins over the bounds of {bins.column!r}, more than {MAX_SLICE_VALUES:,}: "
                f"use a wider bin, {case}"
            )
    if isinstance(node, exp.Column):
        name = node.name.lower()
        spec = policy.columns.get(name)
        if spec is not None and spec.type in NUMERIC_TYPES:
            binned = suggested_bin(name, spec)
            if binned is None:
                return (
                    f"a slice on {name!r} would have a value per distinct value of a numeric column, which is not "
                    f"public: slice by a column with a public domain, ask for bounds on {name!r} to bin it, {case}"
                )
            return (
                f"a slice on {name!r} would have a value per distinct value of a numeric column, which is not "
                f"public: bin it instead, e.g. {binned} (a slice's bins follow from the column's public bounds), "
                f"{case}"
            )
    return f"use a column with a declared domain, a binned bounded column, {case}"


def _json_value(value: Any) -> Any:
    return value.isoformat() if isinstance(value, dt.date) else value


@dataclass(frozen=True)
class EvaluationPlan:
    policy: Policy
    version: str
    models: tuple[Attachment, ...]
    slices: tuple[Slice, ...]
    metrics: tuple[str, ...]
    per_class: bool
    epsilon: float
    alpha: float

    @property
    def classes(self) -> list[str]:
        assert self.policy.labels is not None
        return list(self.policy.labels.classes)

    @property
    def gold_column(self) -> str:
        assert self.policy.labels is not None and self.policy.labels.gold_column is not None
        return self.policy.labels.gold_column

    @property
    def sensitivity(self) -> int:
        """L1 sensitivity of the released vector: k rows per unit, one cell per row per model and slice dimension."""
        return self.policy.max_rows_per_unit * len(self.models) * len(self.slices)

    @property
    def scale(self) -> float:
        return self.sensitivity / self.epsilon

    @property
    def matrix_cells(self) -> int:
        return len(self.classes) ** 2

    @property
    def cells(self) -> int:
        return len(self.models) * sum(len(s.values) for s in self.slices) * self.matrix_cells

    @property
    def cost(self) -> PrivacyLoss:
        return PrivacyLoss(self.epsilon)

    def half_width(self) -> float:
        """Half-width of each count's (1 - alpha) interval."""
        return integer_accuracy(self.scale, self.alpha)

    def cell_half_width(self) -> float:
        """Half-width of each cell's interval in the metrics' joint box (alpha / C²)."""
        return integer_accuracy(self.scale, self.alpha / self.matrix_cells)

    def normalized(self) -> dict[str, Any]:
        """What determines the answer: part of the cache key (an attachment id changes with every attachment)."""
        return {
            "models": [[m.model, m.attachment] for m in self.models],
            "slices": [[s.name, s.normalized()] for s in self.slices],
            "metrics": list(self.metrics),
            "per_class": self.per_class,
            "epsilon": self.epsilon,
            "alpha": self.alpha,
        }

    def summary(self) -> dict[str, Any]:
        return {
            "dataset": self.policy.dataset,
            "dataset_version": self.version,
            "models": [m.public(self.version) for m in self.models],
            "slices": [{"slice": s.name, "values": [_json_value(v) for v in s.values]} for s in self.slices],
            "classes": self.classes,
            "gold_column": self.gold_column,
            "metrics_requested": list(self.metrics),
            "alpha": self.alpha,
            "epsilon": self.epsilon,
            "delta": 0.0,
            "sensitivity": self.sensitivity,
            "scale": self.scale,
            "cells": self.cells,
            "count_half_width": self.half_width(),
            "notes": list(NOTES),
        }

    def dry_run(self) -> dict[str, Any]:
        return {**self.summary(), "confusion": None, "metrics": None}


def _models(bastion: Bastion, policy: Policy, version: str, request: dict[str, Any]) -> tuple[Attachment, ...]:
    names = request.get("models")
    if request.get("model") is not None:
        if names:
            raise InvalidRequest("give model or models, not both")
        names = [request["model"]]
    if not isinstance(names, list) or not names:
        raise InvalidRequest("give model (a name) or models (a list of names) whose predictions are attached")
    if len(names) > MAX_MODELS:
        raise InvalidRequest(f"at most {MAX_MODELS} models per request")
    if len(set(map(str, names))) != len(names):
        raise InvalidRequest("a model is named twice")
    store = PredictionsStore(bastion.settings.predictions_dir)
    out = []
    for name in names:
        meta = store.get(policy.dataset, check_model_name(name))
        if meta is None:
            raise InvalidRequest(
                f"model {name!r} has no predictions attached to dataset {policy.dataset!r}; GET /v1/models lists "
                "the models attached",
                reason="model_not_found",
            )
        if meta.dataset_version != version:
            raise InvalidRequest(
                f"model {name!r}'s predictions were attached to version {meta.dataset_version} of "
                f"{policy.dataset!r}, which is now at version {version}: they must be attached again",
                reason="stale_predictions",
            )
        out.append(meta)
    return tuple(out)


def plan_evaluation(bastion: Bastion, policy: Policy, version: str, request: dict[str, Any]) -> EvaluationPlan:
    """Validate the request against the policy and the attachments and calibrate it; raises before any charge."""
    if policy.row_key is None or policy.labels is None or policy.labels.gold_column is None:
        raise InvalidRequest(
            f"dataset {policy.dataset!r} cannot be evaluated on: its policy needs a row_key and labels with a "
            "gold_column"
        )
    models = _models(bastion, policy, version, request)
    texts = request.get("slices") or []
    if not isinstance(texts, list):
        raise InvalidRequest("slices must be a list of column names or row expressions")
    if len(texts) > MAX_SLICES:
        raise InvalidRequest(f"at most {MAX_SLICES} slices per request")
    if len(set(map(str, texts))) != len(texts):
        raise InvalidRequest("a slice is given twice")
    slices = tuple(plan_slice(t, policy) for t in texts) or (Slice(ALL_ROWS, None, None, (ALL_ROWS,)),)
    metrics = request.get("metrics") or list(METRICS)
    if not isinstance(metrics, list) or any(m not in METRICS for m in metrics) or len(set(metrics)) != len(metrics):
        raise InvalidRequest(f"metrics must be a list of distinct names among {', '.join(METRICS)}")
    alpha = check_alpha(request.get("alpha", bastion.settings.default_alpha))
    plan = EvaluationPlan(
        policy, version, models, slices, tuple(metrics), bool(request.get("per_class", True)), 1.0, float(alpha)
    )
    if plan.cells > MAX_CELLS:
        raise InvalidRequest(
            f"the request would release {plan.cells:,} counts (models × slice values × classes²); at most "
            f"{MAX_CELLS:,} are allowed: use fewer models or coarser slices"
        )
    epsilon, accuracy = request.get("epsilon"), request.get("accuracy")
    if (epsilon is None) == (accuracy is None):
        raise InvalidRequest("give epsilon or accuracy (the half-width of each count's interval), not both")
    if accuracy is not None:
        if not isinstance(accuracy, int | float) or not math.isfinite(accuracy) or accuracy <= 0:
            raise InvalidRequest("accuracy must be a positive number (the half-width of each count's interval)")
        epsilon = _epsilon_for_accuracy(plan, float(accuracy))
    epsilon = check_epsilon(epsilon)
    plan = EvaluationPlan(policy, version, models, slices, plan.metrics, plan.per_class, float(epsilon), plan.alpha)
    _check_calibration(plan)
    return plan


def _epsilon_for_accuracy(plan: EvaluationPlan, accuracy: float) -> float:
    """The ε at which each count's half-width is `accuracy`, or a 400 naming the accuracy and the range of
    accuracies this request can have (those of ε at the ends of its allowed range)."""
    try:
        epsilon = epsilon_for_accuracy(plan.sensitivity, accuracy, plan.alpha)
    except Exception:  # noqa: BLE001 - OpenDP refuses parameters out of its range
        epsilon = math.nan
    if MIN_EPSILON <= epsilon <= MAX_EPSILON:
        return epsilon
    finest = integer_accuracy(plan.sensitivity / MAX_EPSILON, plan.alpha)
    coarsest = integer_accuracy(plan.sensitivity / MIN_EPSILON, plan.alpha)
    allowed = (
        f"ε from {MIN_EPSILON:g} to {MAX_EPSILON:g} gives this request (sensitivity {plan.sensitivity}, "
        f"alpha={plan.alpha:g}) a half-width from {finest:.4g} to {coarsest:.4g}"
    )
    if epsilon > MAX_EPSILON or (math.isnan(epsilon) and accuracy < finest):
        raise InvalidRequest(
            f"accuracy={accuracy:g} is too small: it would need ε above the allowed range ({allowed}); ask for a "
            "larger accuracy",
            field="accuracy",
        )
    if epsilon < MIN_EPSILON or accuracy > coarsest:
        raise InvalidRequest(
            f"accuracy={accuracy:g} is too large: it would need ε below the allowed range ({allowed}); ask for a "
            "smaller accuracy",
            field="accuracy",
        )
    raise InvalidRequest(f"accuracy={accuracy:g} cannot be calibrated ({allowed})", field="accuracy")


def _check_calibration(plan: EvaluationPlan) -> None:
    try:
        release_integers([], plan.sensitivity, plan.epsilon)  # builds the measurement and checks its privacy map
        widths = [plan.scale, plan.half_width(), plan.cell_half_width()]
    except Exception:  # noqa: BLE001 - OpenDP, overflow: all mean the parameters are out of range
        widths = [math.nan]
    if not all(math.isfinite(w) and w >= 0 for w in widths) or plan.scale <= 0:
        raise InvalidRequest(
            f"epsilon={plan.epsilon:g} with alpha={plan.alpha:g} cannot be calibrated (sensitivity "
            f"{plan.sensitivity}); choose another epsilon or a larger alpha"
        )


def precheck(plan: EvaluationPlan, reader: Reader, store: PredictionsStore) -> None:
    """Bind every statement the evaluation will run, over an empty table of each model's predictions (the stored
    file's schema), without reading a row: an error the binder finds is a 400 before the charge."""
    try:
        for model in plan.models:
            empty = store.schema(plan.policy.dataset, model.model).empty_table()
            with reader.frame(_FRAME, empty) as frame:
                for batch in _batches(plan):
                    reader.check(statement(plan, tuple(plan.slices[i] for i in batch), frame))
    except EngineError as exc:
        raise QueryRejected(
            f"the engine cannot compile this evaluation: {exc.message}",
            reason="engine_rejected",
            hint="simplify the slice expressions or cast their arguments",
        ) from None
    except (OSError, pa.ArrowException):
        raise InvalidRequest("the predictions of a model cannot be read; attach them again") from None


def statement(plan: EvaluationPlan, slices: tuple[Slice, ...], frame: exp.Table) -> exp.Select:
    """SELECT every slice's value, gold, predicted, COUNT(*) over the bounded rows joined with one model's
    predictions, grouped by all of them together (one join for several slices)."""
    policy = plan.policy
    assert policy.row_key is not None
    keys = [_qualify(s.tree) if s.tree is not None else exp.Literal.string(ALL_ROWS) for s in slices]
    gold = exp.column(plan.gold_column, "b", quoted=True)
    label = exp.column(LABEL, "p", quoted=True)
    classes = [exp.Literal.string(c) for c in plan.classes]
    on = exp.EQ(this=exp.column(policy.row_key, "b", quoted=True), expression=exp.column(KEY, "p", quoted=True))
    return (
        exp.select(
            *[exp.alias_(key, f"s{i}", quoted=True) for i, key in enumerate(keys)],
            exp.alias_(gold.copy(), "g", quoted=True),
            exp.alias_(label.copy(), "l", quoted=True),
            exp.alias_(exp.Count(this=exp.Star()), "n", quoted=True),
        )
        .from_(exp.alias_(bounded(policy.dataset), "b"))
        .join(exp.alias_(frame, "p"), on=on)
        .where(exp.In(this=gold.copy(), expressions=[c.copy() for c in classes]))
        .group_by(*[key.copy() for key in keys], gold.copy(), label.copy())
    )


def _qualify(tree: exp.Expr) -> exp.Expr:
    """A slice's tree with its columns read from the bounded table (alias b), not the predictions."""
    out = tree.copy()
    for col in list(out.find_all(exp.Column)):
        col.set("table", exp.to_identifier("b"))
    return out


def _batches(plan: EvaluationPlan) -> list[tuple[int, ...]]:
    """The slices grouped together in one statement: consecutive slices while the product of their public value
    counts plus one (a missing value is a group too), times C², stays within JOINT_GROUPS (a public bound on the
    groups a statement returns; a slice with no public value still has its group of missing values)."""
    batches: list[list[int]] = []
    size = 0
    for i, s in enumerate(plan.slices):
        groups = len(s.values) + 1
        if batches and size * groups <= JOINT_GROUPS:
            batches[-1].append(i)
            size *= groups
        else:
            batches.append([i])
            size = groups * plan.matrix_cells
    return [tuple(b) for b in batches]


def exact_counts(plan: EvaluationPlan, reader: Reader, store: PredictionsStore) -> list[int]:
    """The exact vector (models × slices × values × gold × predicted), computed on the engine: per model, one
    statement per batch of slices (`_batches`), whose groups are summed into each slice's matrices."""
    c = len(plan.classes)
    class_index = {g: i for i, g in enumerate(plan.classes)}
    starts, offset = [], 0
    for s in plan.slices:
        starts.append(offset)
        offset += len(s.values) * c * c
    indexes = [{v: i for i, v in enumerate(s.values)} for s in plan.slices]
    out = [0] * plan.cells
    for m, model in enumerate(plan.models):
        base = m * offset
        table = store.load(plan.policy.dataset, model.model, model.attachment)  # the planned attachment or raise
        with reader.frame(_FRAME, table) as frame:
            for batch in _batches(plan):
                for row in reader.rows(statement(plan, tuple(plan.slices[i] for i in batch), frame)):
                    *values, gold, predicted, n = row
                    if gold not in class_index or predicted not in class_index:
                        continue
                    cell = class_index[gold] * c + class_index[predicted]
                    for i, value in zip(batch, values, strict=True):
                        typed = plan.slices[i].typed
                        v = value if typed is None else canonical(value, typed.type)
                        if v in indexes[i]:
                            out[base + starts[i] + indexes[i][v] * c * c + cell] += int(n)
    return out


# --- metrics: post-processing of the released counts ----------------------------------------------------------


def _ratio(a: float, b: float, w: float) -> float | None:
    return w * a / (w * a + b) if w * a + b > 0 else None


@dataclass(frozen=True)
class Metric:
    name: str
    cls: str | None  # a class, "macro", or None (accuracy)
    value: float | None
    low: float
    high: float


def _parts(kind: str, c: int, m: np.ndarray) -> tuple[float, float, float]:
    """A metric of class index c as w·a / (w·a + b): (a, b, w) over the matrix m (gold rows × predicted columns)."""
    tp = float(m[c, c])
    fp = float(m[:, c].sum()) - tp
    fn = float(m[c, :].sum()) - tp
    if kind == "precision":
        return tp, fp, 1.0
    if kind == "recall":
        return tp, fn, 1.0
    return tp, fp + fn, 2.0  # f1 = 2TP / (2TP + FP + FN)


def _bounded(kind: str, c: int, point: np.ndarray, low: np.ndarray, high: np.ndarray) -> Metric:
    """A per-class metric and its range over the box [low, high] of cells: a (the diagonal cell) and b (cells off
    the diagonal) share no cell, so the low end is at (a low, b high) and the high end at (a high, b low)."""
    a, b, w = _parts(kind, c, point)
    a_lo, b_lo, _ = _parts(kind, c, low)
    a_hi, b_hi, _ = _parts(kind, c, high)
    lo = _ratio(a_lo, b_hi, w)
    hi = _ratio(a_hi, b_lo, w)
    return Metric(kind, None, _ratio(a, b, w), 0.0 if lo is None else lo, 1.0 if hi is None else hi)


def matrix_metrics(
    counts: np.ndarray, half_width: float, classes: list[str], metrics: tuple[str, ...], per_class: bool
) -> list[Metric]:
    """The metrics of one noisy confusion matrix with intervals over the box counts ± half_width (clamped at 0)."""
    point = np.maximum(counts.astype(float), 0.0)
    low = np.maximum(counts - half_width, 0.0)
    high = np.maximum(counts + half_width, 0.0)
    out: list[Metric] = []
    for kind in metrics:
        if kind == "accuracy":
            diag = np.eye(len(classes), dtype=bool)
            value = _ratio(float(point[diag].sum()), float(point[~diag].sum()), 1.0)
            lo = _ratio(float(low[diag].sum()), float(high[~diag].sum()), 1.0)
            hi = _ratio(float(high[diag].sum()), float(low[~diag].sum()), 1.0)
            out.append(Metric("accuracy", None, value, 0.0 if lo is None else lo, 1.0 if hi is None else hi))
            continue
        each = [_bounded(kind, c, point, low, high) for c in range(len(classes))]
        values = [m.value for m in each]
        macro_value = None if any(v is None for v in values) else float(np.mean([v for v in values if v is not None]))
        out.append(
            Metric(
                kind,
                "macro",
                macro_value,
                float(np.mean([m.low for m in each])),
                float(np.mean([m.high for m in each])),
            )
        )
        if per_class:
            out += [Metric(kind, cls, m.value, m.low, m.high) for cls, m in zip(classes, each, strict=True)]
    return out


def release(plan: EvaluationPlan, exact: list[int]) -> dict[str, Any]:
    """Release the vector once and post-process it into confusion matrices and metrics."""
    noisy = release_integers(exact, plan.sensitivity, plan.epsilon)
    values = np.asarray(noisy.values, dtype=float)
    c = len(plan.classes)
    h, h_cell = plan.half_width(), plan.cell_half_width()
    confusion: list[dict[str, Any]] = []
    metrics: list[dict[str, Any]] = []
    offset = 0
    for model in plan.models:
        for s in plan.slices:
            for v in s.values:
                cells = values[offset : offset + c * c].reshape(c, c)
                offset += c * c
                value = _json_value(v)
                confusion.append(
                    {
                        "model": model.model,
                        "slice": s.name,
                        "value": value,
                        "counts": [[int(x) for x in row] for row in cells],
                        "intervals": [[[float(x - h), float(x + h)] for x in row] for row in cells],
                    }
                )
                for m in matrix_metrics(cells, h_cell, plan.classes, plan.metrics, plan.per_class):
                    metrics.append(
                        {
                            "model": model.model,
                            "slice": s.name,
                            "value": value,
                            "metric": m.name,
                            "class": m.cls,
                            "estimate": m.value,
                            "low": m.low,
                            "high": m.high,
                            "noise_dominated": m.high - m.low > NOISE_DOMINATED,
                        }
                    )
    return {**plan.summary(), "confusion": confusion, "metrics": metrics}


# --- the request ------------------------------------------------------------------------------------------------


def evaluate(bastion: Bastion, ctx: Context, request: dict[str, Any]) -> dict[str, Any]:
    """Authorise (grant evaluate), validate and price, then charge → audit → count → release through
    `Bastion.run_private`."""
    request = dict(request)
    for name in ("epsilon", "accuracy", "alpha"):  # the audit record is strict JSON: keep a NaN or infinity as text
        if isinstance(request.get(name), float) and not math.isfinite(request[name]):
            request[name] = str(request[name])
    policy, version = bastion.authorize(ctx, str(request.get("dataset")), Grant.EVALUATE, request)
    with bastion.denials_audited(ctx, EVENT, policy.dataset, request):
        plan = plan_evaluation(bastion, policy, version, request)
        refuse_backtracking(bastion.engine, [s.tree for s in plan.slices if s.tree is not None])
        precheck(plan, bastion.engine, PredictionsStore(bastion.settings.predictions_dir))
    key = cache_key(EVENT, ctx.principal.name, policy.dataset, version, policy.fingerprint(), plan.normalized())
    store = PredictionsStore(bastion.settings.predictions_dir)

    # Every statement reads the version the predictions were checked against, whatever is appended meanwhile. The
    # release's id is the request id of the request that makes it: a cached repeat carries the same id, so its card
    # is the stored card of that one release.
    version, reader = bastion.reading(ctx, policy.dataset, version, EVENT, request)

    def compute() -> dict[str, Any]:
        return {**release(plan, exact_counts(plan, reader, store)), "evaluation_id": ctx.request_id}

    def fallback() -> dict[str, Any]:  # the same release over the default input, an empty table
        return {**release(plan, [0] * plan.cells), "evaluation_id": ctx.request_id}

    answer = bastion.run_private(
        ctx,
        policy=policy,
        event=EVENT,
        request=request,
        cost=plan.cost,
        key=key,
        compute=compute,
        fallback=fallback,
        dry_run=plan.dry_run() if bool(request.get("dry_run", False)) else None,
        kind=EVENT,
        version=version,
    )
    if not answer.get("dry_run"):
        try:
            evaluation_store(bastion).put(ctx.principal.name, answer)
        except OSError as exc:  # the answer is released and audited; only its card will be missing
            log.error(
                "request %s: the evaluation could not be kept for its card (%s)", ctx.request_id, type(exc).__name__
            )
    return answer


PER_REPLY = ("cached", "dry_run", "epsilon_spent", "delta_spent", "rho_spent", "query_id", "budget")
_store_lock = threading.Lock()


class EvaluationStore:
    """Released evaluations by id, per principal: what a model card is made from. They are DP outputs, kept as files
    written whole and renamed into place, one per release (`<root>/<principal digest>/<evaluation_id>.json`): a
    cached repeat carries the evaluation_id of the release it repeats and writes nothing. A principal keeps at most
    `max_count` evaluations and `max_bytes` bytes of them: storing a new one evicts that principal's oldest beyond
    either (the newest is always kept)."""

    def __init__(self, root: Path, max_count: int, max_bytes: int) -> None:
        self.root = root
        self.max_count = max_count
        self.max_bytes = max_bytes

    def _directory(self, principal: str) -> Path:
        return self.root / hashlib.sha256(principal.encode()).hexdigest()[:32]

    def _path(self, principal: str, evaluation_id: str) -> Path | None:
        if not (evaluation_id.isascii() and evaluation_id.isalnum() and len(evaluation_id) <= 64):
            return None
        return self._directory(principal) / f"{evaluation_id}.json"

    def put(self, principal: str, answer: dict[str, Any]) -> bool:
        """Keep a released answer for its card unless its release is kept already; True if a file was written."""
        path = self._path(principal, str(answer.get("evaluation_id")))
        if path is None:
            return False
        with _store_lock:
            if path.is_file():
                return False
            path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            kept = {k: v for k, v in answer.items() if k not in PER_REPLY}
            temp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
            try:
                temp.write_text(json.dumps({"principal": principal, "answer": kept}))
                os.replace(temp, path)
            finally:
                temp.unlink(missing_ok=True)
            self._evict(path)
        return True

    def _evict(self, newest: Path) -> None:
        """Remove the principal's oldest evaluations while more than the caps are kept, never `newest`."""
        count, size, older = 0, 0, []
        for file in newest.parent.glob("*.json"):
            try:
                stat = file.stat()
            except FileNotFoundError:
                continue
            count, size = count + 1, size + stat.st_size
            if file != newest:
                older.append((stat.st_mtime_ns, file.name, stat.st_size, file))
        for _, _, bytes_, file in sorted(older):
            if count <= self.max_count and size <= self.max_bytes:
                break
            file.unlink(missing_ok=True)
            count, size = count - 1, size - bytes_

    def get(self, principal: str, evaluation_id: str) -> dict[str, Any] | None:
        """The answer released to `principal` under that id; None for any other principal's or an unknown id."""
        path = self._path(principal, evaluation_id)
        if path is None or not path.is_file():
            return None
        try:
            kept = json.loads(path.read_text())
        except (OSError, ValueError):
            return None
        if not isinstance(kept, dict) or kept.get("principal") != principal:
            return None
        answer = kept.get("answer")
        return answer if isinstance(answer, dict) else None


def evaluation_store(bastion: Bastion) -> EvaluationStore:
    limits = bastion.settings.limits
    return EvaluationStore(
        bastion.settings.outputs_dir / "evaluations", limits.max_stored_evaluations, limits.max_stored_evaluation_bytes
    )


def released_evaluation(bastion: Bastion, ctx: Context, evaluation_id: str, view: str) -> dict[str, Any]:
    """An evaluation released to the caller, for its model card (`view`: html or markdown); audited. Another
    principal's evaluation is not found, as an unknown id is (its existence is not confirmed)."""
    request = {"evaluation": evaluation_id, "card": view}
    answer = evaluation_store(bastion).get(ctx.principal.name, evaluation_id)
    if answer is None:
        bastion.audit(ctx, EVENT, request=request, decision="denied", reason="not_found")
        raise NotFound(
            f"no evaluation {evaluation_id!r} of yours; its id is the evaluation_id of POST /v1/evaluate's answer "
            "(an evaluation beyond the stored ones' limit is evicted, the oldest first)"
        )
    bastion.authorize(ctx, str(answer.get("dataset")), Grant.EVALUATE, request)  # the grant still holds
    bastion.audit(ctx, EVENT, dataset=answer.get("dataset"), request=request, decision="allowed", reason="card")
    return answer


def models_listing(bastion: Bastion, ctx: Context) -> list[dict[str, Any]]:
    """The models attached to each dataset on which the caller holds the evaluate grant (public facts only)."""
    store = PredictionsStore(bastion.settings.predictions_dir)
    out = []
    for name, (policy, version) in bastion.engine.datasets().items():
        if Grant.EVALUATE not in policy.grants(ctx.principal.role):
            continue
        out.append(
            {
                "dataset": name,
                "dataset_version": version,
                "models": [a.public(version) for a in store.attachments(name)],
            }
        )
    return out

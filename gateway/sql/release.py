"""Executor: prices a Plan (ε split and noise scales), runs the generated SQL on the pre-bounded table, adds
OpenDP noise to each primitive measurement, and post-processes the noisy table into the released answer with a
confidence interval for every noisy cell.

Budget split (documented in the README): the request's ε is divided equally among the plan's distinct primitive
measurements (COUNT(*), COUNT(col), COUNT(DISTINCT unit), SUM(col), SUM(col²), one selection per quantile), plus
one equal share for private key selection when some GROUP BY key has no public domain; key selection also costs δ.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import duckdb
import numpy as np
import pandas as pd
import pyarrow as pa
from sqlglot import exp

from gateway.engines.public import scratch
from gateway.sql.plan import Aggregate, Measurement, Plan
from policies import mechanisms as mech
from policies import sensitivity as sens
from policies.accountant import (
    MAX_EPSILON,
    MIN_EPSILON,
    PrivacyLoss,
    check_alpha,
    check_delta,
    check_epsilon,
)
from policies.errors import InvalidRequest, QueryRejected
from policies.schema import ColumnType, bounded_table
from policies.sqltypes import SqlType
from policies.typecheck import eager_logic

_COUNT_KINDS = {"count_star", "count", "count_distinct_unit"}


@dataclass(frozen=True)
class Pricing:
    """What a plan costs and how noisy each measurement is, decided before any private data is read."""

    cost: PrivacyLoss
    epsilon_per_measurement: float
    d_in: dict[Measurement, int]
    selection_epsilon: float
    selection_delta: float
    alpha: float

    def scale(self, m: Measurement) -> float:
        if m.kind == "quantile":
            return 2 * self.d_in[m] / self.epsilon_per_measurement
        return self.d_in[m] / self.epsilon_per_measurement

    def half_width(self, m: Measurement, alpha: float) -> float:
        """Half-width, in the measurement's integer units, of its (1-alpha) interval."""
        return mech.integer_accuracy(self.scale(m), alpha)


def _d_in(plan: Plan, m: Measurement) -> int:
    k = plan.policy.max_rows_per_unit
    grouped = bool(plan.keys)
    match m.kind:
        case "count_star" | "count":
            return sens.count_sensitivity(k)
        case "count_distinct_unit":
            return sens.distinct_unit_sensitivity(k, grouped)
        case "sum":
            return sens.sum_sensitivity(k, plan.policy.columns[m.column])
        case "sumsq":
            return sens.sum_of_squares_sensitivity(k, plan.policy.columns[m.column])
        case "quantile":
            return sens.quantile_sensitivity(k, m.q)
    raise AssertionError(m.kind)


def measurement_unit(plan: Plan, m: Measurement) -> float:
    """Value of one integer unit of a measurement (fixed-point sums) in the column's own unit."""
    if m.kind == "sum":
        return plan.policy.columns[m.column].fx_unit
    if m.kind == "sumsq":
        return plan.policy.columns[m.column].fx2_unit
    return 1.0


def price(
    plan: Plan,
    *,
    epsilon: float | None,
    accuracy: float | dict[str, float] | None,
    alpha: float,
    delta: float | None,
) -> Pricing:
    """Decide the ε of each measurement, from a total ε or from a target accuracy of one output column."""
    alpha = check_alpha(alpha)
    d_in = {m: _d_in(plan, m) for m in plan.measurements}
    shares = len(plan.measurements) + (1 if plan.needs_key_selection else 0)
    sel_delta = 0.0
    if plan.needs_key_selection:
        budget_delta = plan.policy.budget.per_principal.delta
        sel_delta = check_delta(delta) if delta is not None else budget_delta / 10
        if sel_delta <= 0:
            raise InvalidRequest(
                "a GROUP BY key has no public domain in the policy, so its keys must be selected privately, "
                "which needs δ > 0; declare a domain for the key column or give the policy a δ budget"
            )
    if (epsilon is None) == (accuracy is None):
        raise InvalidRequest("give exactly one of epsilon or accuracy")
    if epsilon is not None:
        epsilon = check_epsilon(epsilon)
        per = epsilon / shares
    else:
        name, target = _accuracy_target(plan, accuracy)  # type: ignore[arg-type]
        agg = single_aggregate(plan, name)
        if agg is None or agg.kind not in _COUNT_KINDS | {"sum"}:
            raise InvalidRequest(
                f"an accuracy target can be set for a COUNT or SUM output column; {name!r} is not one. "
                "Give epsilon instead, or use a dry run to see the accuracy an epsilon buys"
            )
        (m,) = agg.measurements
        try:
            per = mech.epsilon_for_accuracy(d_in[m], target / measurement_unit(plan, m), alpha)
        except Exception:  # noqa: BLE001 - OpenDP refuses targets it cannot reach; the target is public
            per = math.inf
        epsilon = per * shares
        if not (math.isfinite(epsilon) and MIN_EPSILON <= epsilon <= MAX_EPSILON):
            raise InvalidRequest(
                f"an accuracy of ±{target:g} for {name!r} would need ε = {epsilon:.3g}, outside the allowed "
                f"[{MIN_EPSILON:g}, {MAX_EPSILON:g}]; ask for a looser or tighter target"
            )
    return Pricing(
        cost=PrivacyLoss(epsilon, sel_delta),
        epsilon_per_measurement=per,
        d_in=d_in,
        selection_epsilon=per if plan.needs_key_selection else 0.0,
        selection_delta=sel_delta,
        alpha=alpha,
    )


def _accuracy_target(plan: Plan, accuracy: float | dict[str, float]) -> tuple[str, float]:
    if isinstance(accuracy, dict):
        if len(accuracy) != 1:
            raise InvalidRequest('accuracy as an object names exactly one output column, e.g. {"visits": 50}')
        ((name, target),) = accuracy.items()
    else:
        name = next((n for n, e in zip(plan.output_names, plan.output_exprs, strict=True) if _agg_of(plan, e)), "")
        target = accuracy
    if not (isinstance(target, int | float) and math.isfinite(target) and target > 0):
        raise InvalidRequest("accuracy must be a positive number (the 95% half-width, in the column's units)")
    if name not in plan.output_names:
        raise InvalidRequest(f"no output column named {name!r}")
    return name, float(target)


def _agg_of(plan: Plan, e: exp.Expr) -> Aggregate | None:
    if isinstance(e, exp.Column):
        return next((a for a in plan.aggregates if a.alias == e.name), None)
    return None


def single_aggregate(plan: Plan, name: str) -> Aggregate | None:
    return _agg_of(plan, plan.output_exprs[plan.output_names.index(name)])


# --- execution ------------------------------------------------------------------------------------------


@dataclass
class Release:
    columns: list[str]
    rows: list[list[Any]]
    intervals: list[list[list[float] | None]]
    measurements: list[dict[str, Any]]
    notes: list[str] = field(default_factory=list)
    groups_released: int = 0


def _measure_sql(plan: Plan, m: Measurement) -> tuple[str, bool]:
    """The aggregate call of a measurement, and whether an empty group gives NULL (to be read as 0)."""
    match m.kind:
        case "count_star":
            return "COUNT(*)", False
        case "count":
            return f'COUNT("{m.column}")', False
        case "count_distinct_unit":
            return f'COUNT(DISTINCT "{plan.policy.unit_column}")', False
        case "sum":
            return f'SUM("__fx_{m.column}")', True
        case "sumsq":
            return f'SUM("__fx2_{m.column}")', True
    raise AssertionError(m.kind)


def _measures(plan: Plan, measurements: list[Measurement]) -> list[tuple[str, str, bool]]:
    """(aggregate call, alias, NULL means 0) of the row count and of each plain measurement, in order."""
    out = [("COUNT(*)", "__n", False)]
    for i, m in enumerate(measurements):
        call, nullable = _measure_sql(plan, m)
        out.append((call, f"m{i}", nullable))
    return out


def _row_filter(plan: Plan, extra: exp.Expr | None) -> str | None:
    """The WHERE condition (and `extra`), combined so that both are evaluated on every row."""
    parts = [t.copy() for t in (plan.where_tree, extra) if t is not None]
    if not parts:
        return None
    combined = parts[0] if len(parts) == 1 else eager_logic(parts, conjunction=True)
    return combined.sql(dialect="duckdb")


def _group_sql(
    plan: Plan,
    aggregates: list[tuple[str, str, bool]],
    extra_where: exp.Expr | None = None,
    *,
    extra_group: str | None = None,
    empty: bool = False,
) -> str:
    """The grouped measurement query. The row condition is an aggregate FILTER, not a WHERE: keys and the condition
    are computed on every row, whichever rows match, so the work does not depend on how many do. `empty` reads no
    row at all: the default input of the fallback release."""
    keys = [f'{k.sql} AS "{k.alias}"' for k in plan.keys] + ([f"{extra_group} AS __code"] if extra_group else [])
    condition = _row_filter(plan, extra_where)
    select = []
    for call, alias, nullable in aggregates:
        value = f"{call} FILTER (WHERE {condition})" if condition else call
        select.append(f'COALESCE({value}, 0) AS "{alias}"' if nullable else f'{value} AS "{alias}"')
    sql = f'SELECT {", ".join(keys + select)} FROM "{bounded_table(plan.dataset)}"'
    if empty:
        sql += " WHERE FALSE"
    group = [str(i + 1) for i in range(len(plan.keys) + (1 if extra_group else 0))]
    if group:
        sql += " GROUP BY " + ", ".join(group)
    return sql


def _quantile_codes(
    plan: Plan, m: Measurement, con: duckdb.DuckDBPyConnection, groups: list[tuple[Any, ...]], empty: bool = False
) -> tuple[list[float], dict[tuple[Any, ...], np.ndarray]]:
    """Per group, row counts at each of the 2·|C|+1 positions relative to the candidate grid."""
    col = plan.policy.columns[m.column]
    lo, hi = (float(b) for b in col.bounds)  # type: ignore[union-attr]
    candidates = mech.quantile_candidates(lo, hi, integer=col.type is ColumnType.INT)
    step = candidates[1] - candidates[0]
    t = f'(("{m.column}" - {lo!r}) / {step!r})'
    # code 2j+1: exactly on candidate j; code 2j+2: strictly between candidates j and j+1.
    code = f"CAST(2 * FLOOR({t}) + CASE WHEN {t} = FLOOR({t}) THEN 1 ELSE 2 END AS BIGINT)"
    present = exp.Not(this=exp.Is(this=exp.column(m.column, quoted=True), expression=exp.Null()))
    sql = _group_sql(plan, [("COUNT(*)", "__n", False)], present, extra_group=code, empty=empty)
    n_codes = 2 * len(candidates) + 1
    hist = {g: np.zeros(n_codes, dtype=np.int64) for g in groups}
    nk = len(plan.keys)
    for row in con.execute(sql).fetchall():
        g = tuple(row[:nk])
        if g in hist and row[nk] is not None:  # a NULL value has no code (and is filtered out of the count)
            c = min(max(int(row[nk]), 0), n_codes - 1)
            hist[g][c] += int(row[nk + 1])
    return candidates, hist


_PADDED = object()  # the first element of a padded group's key: no value of a row is this object

_ARROW_TYPES = {
    SqlType.INT: pa.int64(),
    SqlType.FLOAT: pa.float64(),
    SqlType.TEXT: pa.string(),
    SqlType.DATE: pa.date32(),
    SqlType.BOOL: pa.bool_(),
    SqlType.NULL: pa.float64(),
}


def _measurement_sql(plan: Plan, aggregates: list[tuple[str, str, bool]], *, empty: bool = False) -> str:
    """The statement of the plain measurements. Where keys are selected privately, the groups are padded to the
    public candidate count inside the engine, so that fetching and preparing them takes the same time whatever the
    number of distinct private keys (up to that count); a last column `__pad` is -1 for a real group and the pad's
    index otherwise. Padded groups go through every step real ones do and are never released (they are not data)."""
    sql = _group_sql(plan, aggregates, empty=empty)
    if not plan.needs_key_selection:
        return sql
    pad_values = ", ".join(["NULL"] * len(plan.keys) + ["0"] * len(aggregates))
    return (
        f"WITH g AS ({sql}) SELECT *, -1 AS __pad FROM g UNION ALL SELECT {pad_values}, i AS __pad FROM "
        f"range(GREATEST(0, {int(plan.policy.key_candidates)} - (SELECT COUNT(*) FROM g))) AS r(i)"
    )


def bind_check(plan: Plan, con: duckdb.DuckDBPyConnection) -> None:
    """Bind every statement the plan will run without reading a row (an always-false filter, an empty released
    table), so that an error the engine's binder finds — which depends on the schema and the query only — is a
    400 before the charge instead of a failure after it."""
    plain = [m for m in plan.measurements if m.kind != "quantile"]
    try:
        con.execute(_measurement_sql(plan, _measures(plan, plain), empty=True)).fetchall()
        for m in plan.measurements:
            if m.kind == "quantile":
                _quantile_codes(plan, m, con, [], empty=True)
    except (duckdb.Error, RuntimeError) as exc:
        raise QueryRejected(
            f"the engine cannot compile this query: {str(exc).splitlines()[0]}",
            reason="engine_rejected",
            hint="simplify the expression or cast its arguments",
        ) from None
    empty = pa.table(
        {
            **{k.alias: pa.array([], _ARROW_TYPES.get(k.typed.type, pa.float64())) for k in plan.keys},
            **{a.alias: pa.array([], pa.float64()) for a in plan.aggregates},
            "__row": pa.array([], pa.int64()),
        }
    )
    local = scratch()
    try:
        local.register("released", empty)
        local.execute(plan.post_sql).fetchall()
    except duckdb.Error as exc:
        raise QueryRejected(
            f"the output expressions cannot be computed: {str(exc).splitlines()[0]}",
            reason="engine_rejected",
            hint="simplify the output expressions",
        ) from None
    finally:
        local.close()


def execute(plan: Plan, pricing: Pricing, con: duckdb.DuckDBPyConnection, *, default_input: bool = False) -> Release:
    """Measure the plan on the pre-bounded table and release it. With `default_input`, the same mechanisms run
    on an empty input instead (no row is read): the fallback that keeps an answer's status and shape independent
    of the data when the real run fails after the charge."""
    notes: list[str] = []
    plain = [m for m in plan.measurements if m.kind != "quantile"]
    select = _measures(plan, plain)
    nk = len(plan.keys)
    exact: dict[tuple[Any, ...], tuple[int, ...]] = {}
    sql = _measurement_sql(plan, select, empty=default_input)
    selecting = plan.needs_key_selection
    width = nk + len(select)
    for row in con.execute(sql).fetchall():
        key = (_PADDED, row[width]) if selecting and row[width] >= 0 else tuple(row[:nk])
        exact[key] = tuple(int(v) for v in row[nk:width])
    if not plan.keys and () not in exact:
        exact[()] = tuple(0 for _ in range(len(plain) + 1))

    groups = plan.declared_groups()
    if groups is None:
        # Opaque labels for OpenDP (never released): the group's position, cheaper than serialising its values.
        by_label = {str(i): g for i, g in enumerate(exact)}
        selection = mech.select_keys(
            {j: exact[g][0] for j, g in by_label.items()},
            plan.policy.max_rows_per_unit,
            pricing.selection_epsilon,
            pricing.selection_delta,
            candidates=plan.policy.key_candidates,
        )
        kept = (by_label[j] for j in selection.kept)
        groups = sorted((g for g in kept if not (len(g) == 2 and g[0] is _PADDED)), key=lambda g: [str(v) for v in g])
        notes.append(
            f"group keys without a public domain were selected with OpenDP's Laplace threshold "
            f"(threshold {selection.threshold} rows; ε={pricing.selection_epsilon:.4g}, "
            f"δ={pricing.selection_delta:.3g})"
        )
    zero = tuple(0 for _ in range(len(plain) + 1))

    noisy: dict[Measurement, np.ndarray] = {}
    for i, m in enumerate(plain):
        values = [exact.get(g, zero)[i + 1] for g in groups]
        release = mech.release_integers(values, pricing.d_in[m], pricing.epsilon_per_measurement)
        noisy[m] = np.asarray(release.values, dtype=np.float64) * measurement_unit(plan, m)

    quantiles: dict[Measurement, tuple[np.ndarray, float]] = {}
    for m in plan.measurements:
        if m.kind != "quantile":
            continue
        candidates, hist = _quantile_codes(plan, m, con, groups, empty=default_input)
        picks = []
        scale = pricing.scale(m)
        for g in groups:
            h = hist[g]
            cum = np.cumsum(h)
            total = int(cum[-1])
            on = np.arange(1, len(h), 2)  # codes of the candidates
            below = (cum[on] - h[on]).tolist()
            above = (total - cum[on]).tolist()
            scores, _ = mech.quantile_scores(below, above, m.q)
            idx, scale = mech.release_quantile_index(scores, pricing.d_in[m], pricing.epsilon_per_measurement)
            picks.append(candidates[idx])
        quantiles[m] = (np.asarray(picks, dtype=np.float64), scale)

    return _post_process(plan, pricing, groups, noisy, quantiles, con, notes)


# --- post-processing ------------------------------------------------------------------------------------


def _interval(
    plan: Plan, pricing: Pricing, m: Measurement, value: np.ndarray, alpha: float
) -> tuple[np.ndarray, np.ndarray]:
    hw = pricing.half_width(m, alpha) * measurement_unit(plan, m)
    lo, hi = value - hw, value + hw
    if m.kind in _COUNT_KINDS or m.kind == "sumsq":
        lo = np.maximum(lo, 0.0)
    return lo, hi


def _aggregate(
    plan: Plan,
    pricing: Pricing,
    a: Aggregate,
    noisy: dict[Measurement, np.ndarray],
    quantiles: dict[Measurement, tuple[np.ndarray, float]],
    alpha_each: float,
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    """Point value and interval of one aggregate per group, each measurement at level alpha_each."""
    ms = a.measurements
    if a.kind == "quantile":
        return quantiles[ms[0]][0], None, None
    if len(ms) == 1:
        v = noisy[ms[0]]
        lo, hi = _interval(plan, pricing, ms[0], v, alpha_each)
        if a.kind in _COUNT_KINDS:
            v = np.maximum(v, 0.0)
        return v, lo, hi
    col = plan.policy.columns[a.column]
    blo, bhi = (float(b) for b in col.bounds)  # type: ignore[union-attr]
    s, c = noisy[Measurement("sum", a.column)], noisy[Measurement("count", a.column)]
    s_lo, s_hi = _interval(plan, pricing, Measurement("sum", a.column), s, alpha_each)
    c_lo, c_hi = _interval(plan, pricing, Measurement("count", a.column), c, alpha_each)
    c_pos = np.maximum(c, 1.0)
    c_lo1, c_hi1 = np.maximum(c_lo, 1.0), np.maximum(c_hi, 1.0)
    # With (noisily) no rows the mean is undefined: report none rather than an arbitrary bound.
    mean = np.where(c >= 1.0, np.clip(s / c_pos, blo, bhi), np.nan)
    corners = np.stack([s_lo / c_lo1, s_lo / c_hi1, s_hi / c_lo1, s_hi / c_hi1])
    m_lo = np.clip(corners.min(axis=0), blo, bhi)
    m_hi = np.clip(corners.max(axis=0), blo, bhi)
    if a.kind == "avg":
        return mean, m_lo, m_hi
    ss = noisy[Measurement("sumsq", a.column)]
    ss_lo, ss_hi = _interval(plan, pricing, Measurement("sumsq", a.column), ss, alpha_each)
    var_max = (bhi - blo) ** 2 / 4
    var_pop = np.where(c >= 1.0, np.clip(ss / c_pos - mean**2, 0.0, var_max), np.nan)
    sq_lo = np.where((m_lo <= 0) & (m_hi >= 0), 0.0, np.minimum(m_lo**2, m_hi**2))
    sq_hi = np.maximum(m_lo**2, m_hi**2)
    v_lo = np.clip(ss_lo / c_hi1 - sq_hi, 0.0, var_max)
    v_hi = np.clip(ss_hi / c_lo1 - sq_lo, 0.0, var_max)
    if a.kind in {"var", "std"}:
        corr = np.where(c_pos > 1.5, c_pos / np.maximum(c_pos - 1, 1.0), 1.0)
        var_pop, v_lo, v_hi = np.minimum(var_pop * corr, var_max), v_lo, np.minimum(v_hi * corr, var_max)
    if a.kind in {"std", "std_pop"}:
        return np.sqrt(var_pop), np.sqrt(v_lo), np.sqrt(v_hi)
    return var_pop, v_lo, v_hi


def _interval_eval(
    node: exp.Expr, env: dict[str, tuple[np.ndarray, np.ndarray]]
) -> tuple[np.ndarray, np.ndarray] | None:
    """Interval arithmetic over + - * / on aggregate intervals; None where it does not apply."""
    if isinstance(node, exp.Column):
        return env.get(node.name)
    if isinstance(node, exp.Literal) and not node.is_string:
        v = float(node.this)
        return np.asarray(v), np.asarray(v)
    if isinstance(node, exp.Paren):
        return _interval_eval(node.this, env)
    if isinstance(node, exp.Neg):
        inner = _interval_eval(node.this, env)
        return None if inner is None else (-inner[1], -inner[0])
    if isinstance(node, exp.Add | exp.Sub | exp.Mul | exp.Div):
        left, right = _interval_eval(node.this, env), _interval_eval(node.expression, env)
        if left is None or right is None:
            return None
        (a, b), (c, d) = left, right
        if isinstance(node, exp.Add):
            return a + c, b + d
        if isinstance(node, exp.Sub):
            return a - d, b - c
        if isinstance(node, exp.Div):
            if np.any((c <= 0) & (d >= 0)):
                return None
            c, d = 1.0 / d, 1.0 / c
        prods = np.stack(np.broadcast_arrays(a * c, a * d, b * c, b * d))
        return prods.min(axis=0), prods.max(axis=0)
    return None


def _py(v: Any) -> Any:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return None
    if isinstance(v, np.generic):
        v = v.item()
    if hasattr(v, "isoformat"):
        return v.isoformat()
    return v


def _post_process(
    plan: Plan,
    pricing: Pricing,
    groups: list[tuple[Any, ...]],
    noisy: dict[Measurement, np.ndarray],
    quantiles: dict[Measurement, tuple[np.ndarray, float]],
    con: duckdb.DuckDBPyConnection,
    notes: list[str],
) -> Release:
    alpha = pricing.alpha
    frame: dict[str, Any] = {}
    for j, key in enumerate(plan.keys):
        frame[key.alias] = [g[j] for g in groups]
    values = {}
    for a in plan.aggregates:
        v, _, _ = _aggregate(plan, pricing, a, noisy, quantiles, alpha)
        values[a.alias] = v
        frame[a.alias] = v
    frame["__row"] = np.arange(len(groups))
    released = pd.DataFrame(frame)
    local = scratch()
    try:
        local.register("released", released)
        out = local.execute(plan.post_sql).fetchall()
    except duckdb.Error as exc:
        raise InvalidRequest(f"cannot compute the output expressions: {exc}") from None
    finally:
        local.close()

    by_alias = {a.alias: a for a in plan.aggregates}
    col_intervals: list[tuple[np.ndarray, np.ndarray] | None] = []
    for e in plan.output_exprs:
        used = [by_alias[c.name] for c in e.find_all(exp.Column) if c.name in by_alias]
        ms = {m for a in used for m in a.measurements}
        if not used or any(m.kind == "quantile" for m in ms):
            col_intervals.append(None)
            continue
        alpha_each = alpha / len(ms)
        env: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        for a in used:
            _, lo, hi = _aggregate(plan, pricing, a, noisy, quantiles, alpha_each)
            # Only quantile aggregates have no interval, and any quantile measurement was skipped above.
            assert lo is not None and hi is not None, a
            env[a.alias] = (lo, hi)
        col_intervals.append(_interval_eval(e, env))

    # Per output column, the bounds of every group as Python floats (one conversion per column, not per cell).
    col_bounds = [
        None if ci is None else tuple(np.broadcast_to(x, (len(groups),)).astype(np.float64).tolist() for x in ci)
        for ci in col_intervals
    ]
    rows, intervals = [], []
    n_out = len(plan.output_names)
    for r in out:
        idx = int(r[n_out])
        rows.append([_py(v) for v in r[:n_out]])
        intervals.append(
            [
                [b[0][idx], b[1][idx]]
                if b is not None and math.isfinite(b[0][idx]) and math.isfinite(b[1][idx])
                else None
                for b in col_bounds
            ]
        )

    measurements = []
    for m in plan.measurements:
        entry: dict[str, Any] = {
            "measurement": m.label,
            "epsilon": pricing.epsilon_per_measurement,
            "sensitivity": pricing.d_in[m],
        }
        if m.kind == "quantile":
            entry["rank_error"] = mech.quantile_rank_error(
                pricing.scale(m),
                len(
                    mech.quantile_candidates(
                        *(float(b) for b in plan.policy.columns[m.column].bounds),  # type: ignore
                        integer=plan.policy.columns[m.column].type is ColumnType.INT,
                    )
                ),
                m.q,
                alpha,
            )
        else:
            entry["half_width"] = pricing.half_width(m, alpha) * measurement_unit(plan, m)
        measurements.append(entry)
    if any(m.kind == "quantile" for m in plan.measurements):
        notes.append(
            "quantiles are chosen from a public grid by OpenDP's report-noisy-max; their accuracy is a "
            "rank error (rows) given under measurements, not a value interval"
        )
    return Release(
        columns=list(plan.output_names),
        rows=rows,
        intervals=intervals,
        measurements=measurements,
        notes=notes,
        groups_released=len(groups),
    )


def dry_run_accuracy(plan: Plan, pricing: Pricing) -> dict[str, float | None]:
    """Data-independent half-width per output column where one exists (a single COUNT or SUM)."""
    out: dict[str, float | None] = {}
    for name in plan.output_names:
        agg = single_aggregate(plan, name)
        if agg is not None and agg.kind in _COUNT_KINDS | {"sum"}:
            (m,) = agg.measurements
            out[name] = pricing.half_width(m, pricing.alpha) * measurement_unit(plan, m)
        else:
            out[name] = None
    return out

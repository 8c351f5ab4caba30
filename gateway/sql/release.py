"""Release stage: run a plan's compiled statements on the engine, add OpenDP noise to each primitive measurement,
select private keys, and post-process the noisy table into the released answer with a confidence interval for
every noisy cell. Post-processing runs on the public engine, over DP outputs only."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from sqlglot import exp

from gateway.engines.base import Engine, EngineError
from gateway.engines.public import PublicError, public_rows
from gateway.sql import compile as comp
from gateway.sql.plan import MAX_QUANTILE_SEARCHES, Aggregate, Kind, Measurement, Plan
from gateway.sql.price import _COUNT_KINDS, Pricing, measurement_unit
from policies import mechanisms as mech
from policies import sensitivity as sens
from policies.errors import InvalidRequest, QueryRejected
from policies.sqltypes import SqlType, canonical


@dataclass
class Release:
    columns: list[str]
    rows: list[list[Any]]
    intervals: list[list[list[float] | None]]
    measurements: list[dict[str, Any]]
    notes: list[str] = field(default_factory=list)
    groups_released: int = 0
    flags: list[list[list[str]]] = field(default_factory=list)


NOISE_DOMINATED = "noise_dominated"


_PADDED = object()  # the first element of a padded group's key: no value of a row is this object

_ARROW_TYPES = {
    SqlType.INT: pa.int64(),
    SqlType.FLOAT: pa.float64(),
    SqlType.TEXT: pa.string(),
    SqlType.DATE: pa.date32(),
    SqlType.BOOL: pa.bool_(),
    SqlType.NULL: pa.float64(),
}


def _statements(plan: Plan) -> list[exp.Query]:
    """`comp.statements(plan)`, built once per plan (plans are reused for identical SQL texts)."""
    if plan.compiled is None:
        plan.compiled = comp.statements(plan)
    return plan.compiled


def _group(plan: Plan, row: tuple[Any, ...]) -> tuple[Any, ...]:
    return tuple(canonical(v, k.typed.type) for v, k in zip(row, plan.keys, strict=False))


def refuse_backtracking(engine: Engine, trees: Iterable[exp.Expr]) -> None:
    """On an engine without a linear-time matcher, refuse (before the charge) the patterns it would backtrack on."""
    if engine.regex:
        return
    pattern = comp.backtracking_pattern(trees)
    if pattern is not None:
        raise QueryRejected(
            f"{pattern} would run on {engine.kind.value}'s backtracking matcher, whose time depends on the rows",
            reason="engine_unsupported",
            hint="use LIKE 'abc%', '%abc', '%abc%' or 'abc%def', or starts_with / contains / ends_with",
        )


def bind_check(plan: Plan, engine: Engine) -> None:
    """Bind every statement the plan will run, without reading a row (and post-processing over an empty released
    table), so that an error an engine's binder finds — which depends on the schema and the query only — is a 400
    before the charge instead of a failure after it. An engine may keep what it analysed for the run."""
    refuse_backtracking(engine, plan.row_trees)
    fine = [comp.quantile_fine_query(plan, m) for m in plan.measurements if m.kind == Kind.QUANTILE]
    try:
        for statement in [*_statements(plan), *fine]:  # the statements the release runs (binding reads no row)
            engine.check(statement)
    except EngineError as exc:
        raise QueryRejected(
            f"the engine cannot compile this query: {exc.message}",
            reason="engine_rejected",
            hint="simplify the expression or cast its arguments",
        ) from None
    if _projection(plan) is not None:
        return  # selecting released columns by name cannot fail
    empty = pa.table(
        {
            **{k.alias: pa.array([], _ARROW_TYPES.get(k.typed.type, pa.float64())) for k in plan.keys},
            **{a.alias: pa.array([], pa.float64()) for a in plan.aggregates},
            "__row": pa.array([], pa.int64()),
        }
    )
    try:
        public_rows(plan.post, {"released": empty})
    except PublicError as exc:
        raise QueryRejected(
            f"the output expressions cannot be computed: {exc}",
            reason="engine_rejected",
            hint="simplify the output expressions",
        ) from None


def _quantile_counts(
    plan: Plan,
    m: Measurement,
    engine: Engine,
    groups: list[tuple[Any, ...]],
    empty: bool = False,
    grid: mech.QuantileGrid | None = None,
) -> dict[tuple[Any, ...], mech.PositionCounts]:
    """Per released group, the exact row counts at the quantile's position codes (`comp.quantile_query`), of the
    plan's grid or of a given public one (a value-only quantile's)."""
    if empty or not groups:  # an empty table has no codes
        return _no_codes(groups)
    if grid is not None:
        table = engine.arrow(comp.quantile_query(plan, m, grid=grid))
        return _counts_by_group(plan, table, groups, 2 * grid.size + 1)
    quantiles = [q for q in plan.measurements if q.kind == Kind.QUANTILE]
    table = engine.arrow(_statements(plan)[1 + quantiles.index(m)])  # after the plain statement, one per quantile
    return _counts_by_group(plan, table, groups, 2 * comp.quantile_grid(plan, m).size + 1)


def _fine_counts(
    plan: Plan,
    m: Measurement,
    engine: Engine,
    fine: list[tuple[tuple[Any, ...], mech.QuantileGrid]],
    empty: bool = False,
) -> dict[tuple[Any, ...], mech.PositionCounts]:
    """The second pass: per released group, the exact row counts at the codes of its own grid of the value's
    selection (`comp.quantile_fine_query`, one statement for every group)."""
    groups = [g for g, _ in fine]
    if empty or not groups:
        return _no_codes(groups)
    table = engine.arrow(comp.quantile_fine_query(plan, m, fine))
    return _counts_by_group(plan, table, groups, 2 * max(grid.size for _, grid in fine) + 1)


def _no_codes(groups: list[tuple[Any, ...]]) -> dict[tuple[Any, ...], mech.PositionCounts]:
    none = mech.PositionCounts(np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64))
    return {g: none for g in groups}


def _counts_by_group(
    plan: Plan, table: pa.Table, groups: list[tuple[Any, ...]], n_codes: int
) -> dict[tuple[Any, ...], mech.PositionCounts]:
    """A quantile statement's result (keys, code, count) as each released group's counts, read as Arrow columns:
    the statement returns a row per occupied code, which may be many, so nothing here loops over rows in Python
    (only over the distinct key combinations)."""
    nk = len(plan.keys)
    # A NULL value's code is NULL and its count 0 (the count filters NULLs out), so any code will do for it.
    codes = np.clip(pc.fill_null(table.column(nk), 0).to_numpy(), 0, n_codes - 1).astype(np.int64)
    counts = pc.fill_null(table.column(nk + 1), 0).to_numpy().astype(np.int64)
    if nk == 0:
        return {(): mech.PositionCounts(codes, counts)}
    # A dense id per distinct key combination, then each combination's group from one representative row.
    ids = np.zeros(table.num_rows, dtype=np.int64)
    for i in range(nk):
        encoded = pc.dictionary_encode(table.column(i).combine_chunks())
        column = pc.fill_null(encoded.indices, len(encoded.dictionary)).to_numpy().astype(np.int64)
        combined = pa.array(ids * (len(encoded.dictionary) + 1) + column)
        ids = pc.dictionary_encode(combined).indices.to_numpy().astype(np.int64)
    some = np.zeros(int(ids.max()) + 1 if len(ids) else 0, dtype=np.int64)
    some[ids] = np.arange(len(ids))  # a row of each id (whichever write wins: they have the same keys)
    keys = [table.column(i).take(pa.array(some)).to_pylist() for i in range(nk)]
    position = {g: j for j, g in enumerate(groups)}
    of_id = np.asarray([position.get(_group(plan, row), -1) for row in zip(*keys, strict=True)], dtype=np.int64)
    group_of_row = of_id[ids] if len(ids) else ids
    order = np.argsort(group_of_row, kind="stable")
    ordered = group_of_row[order]
    starts = np.searchsorted(ordered, np.arange(len(groups)), side="left")
    ends = np.searchsorted(ordered, np.arange(len(groups)), side="right")
    return {
        g: mech.PositionCounts(codes[order[s:e]], counts[order[s:e]])
        for g, s, e in zip(groups, starts, ends, strict=True)
    }


def execute(plan: Plan, pricing: Pricing, engine: Engine, *, default_input: bool = False) -> Release:
    """Measure the plan on the pre-bounded table and release it. With `default_input`, the same mechanisms run
    on an empty input instead (no row is read, and the engine is not asked at all): the fallback that keeps an
    answer's status and shape independent of the data when the real run fails after the charge."""
    notes: list[str] = []
    plain = comp.plain_measurements(plan)
    nk = len(plan.keys)
    exact: dict[tuple[Any, ...], tuple[int, ...]] = {}
    selecting = plan.needs_key_selection
    width = nk + len(plain) + 1
    # Public keys alone (declared domains, nothing measured) need no private row: the engine is not asked.
    public_only = not plan.measurements and not selecting
    rows = comp.empty_result(plan) if default_input or public_only else engine.rows(_statements(plan)[0])
    for row in rows:
        key = (_PADDED, row[width]) if selecting and row[width] >= 0 else _group(plan, row[:nk])
        exact[key] = tuple(int(v) for v in row[nk:width])
    if not plan.keys and () not in exact:
        exact[()] = tuple(0 for _ in range(len(plain) + 1))

    groups = plan.declared_groups()
    threshold_counts: dict[tuple[Any, ...], int] | None = None
    if groups is None:
        # The candidates are the groups with at least one counted row (after WHERE, a listed key's filter and the
        # contribution bound): the statement groups every bounded row, so a key whose rows all fail the condition
        # (or are of unlisted keys) is there with a count of 0, and offering it would release it with probability
        # up to δ. The statement's padded groups count 0 too: select_keys pads the candidates to their public
        # number itself.
        counted = [g for g, values in exact.items() if values[0] > 0]
        # Opaque labels for OpenDP (never released): the group's position, cheaper than serialising its values.
        by_label = {str(i): g for i, g in enumerate(counted)}
        selection = mech.select_keys(
            {j: exact[g][0] for j, g in by_label.items()},
            plan.policy.max_rows_per_unit,
            pricing.selection_epsilon,
            pricing.selection_delta,
            candidates=plan.policy.key_candidates,
            rho=pricing.selection_rho,
        )
        kept = {by_label[j]: int(v) for j, v in selection.kept.items()}
        groups = sorted(kept, key=lambda g: [str(v) for v in g])
        cost = f"ρ={pricing.selection_rho:.4g}" if pricing.zcdp else f"ε={pricing.selection_epsilon:.4g}"
        notes.append(
            f"group keys without a public domain were selected with OpenDP's "
            f"{'Gaussian' if pricing.zcdp else 'Laplace'} threshold "
            f"(threshold {selection.threshold} rows; {cost}, δ={pricing.selection_delta:.3g})"
        )
        if pricing.counts_from_selection:
            threshold_counts = kept
            notes.append(
                "COUNT(*) of each selected group is the threshold's own noisy count (no second measurement); its "
                "interval allows for the selection (a count just above the threshold may be far lower)"
            )
        n_quantiles = sum(m.kind == Kind.QUANTILE for m in plan.measurements)
        if n_quantiles and len(groups) * n_quantiles > MAX_QUANTILE_SEARCHES:
            # Bounded work: the quantiles go to the groups with the largest noisy counts (post-processing).
            top = max(MAX_QUANTILE_SEARCHES // n_quantiles, 1)
            dropped = len(groups) - top
            largest = sorted(groups, key=lambda g: (-kept[g], [str(v) for v in g]))[:top]
            groups = sorted(largest, key=lambda g: [str(v) for v in g])
            notes.append(
                f"{dropped:,} selected groups were left out: {n_quantiles} quantile(s) are computed for at most "
                f"{MAX_QUANTILE_SEARCHES:,} group searches per query, so for the {top:,} groups with the largest "
                "noisy counts"
            )
    zero = tuple(0 for _ in range(len(plain) + 1))

    noisy: dict[Measurement, np.ndarray] = {}
    for i, m in enumerate(plain):
        if threshold_counts is not None and m.kind == Kind.COUNT_STAR:
            # The selection's noisy counts are a COUNT(*) release at the selection's ε or ρ (the same scale as a
            # count's: k/ε for the Laplace threshold, k/√(2ρ) for the Gaussian one).
            noisy[m] = np.asarray([threshold_counts[g] for g in groups], dtype=np.float64)
            continue
        values = [exact.get(g, zero)[i + 1] for g in groups]
        release = pricing.release(m, values)
        noisy[m] = np.asarray(release.values, dtype=np.float64) * measurement_unit(plan, m)

    quantiles: dict[Measurement, list[mech.QuantileRelease]] = {}
    bins_d_in = sens.count_sensitivity(plan.policy.max_rows_per_unit)  # the interval's ladder is a histogram
    for m in plan.measurements:
        if m.kind != Kind.QUANTILE:
            continue
        grid, d_in, epsilon = comp.quantile_grid(plan, m), pricing.d_in[m], _quantile_epsilon(pricing, m)
        if not pricing.quantile_interval:
            # The value only: one selection at the whole ε over a fine grid of the bounds (public: the bounds and
            # the number of released groups), counted by one pass.
            grid = comp.quantile_value_grid(plan, m, len(groups))
            counts = _quantile_counts(plan, m, engine, groups, empty=default_input, grid=grid)
            quantiles[m] = [mech.release_quantile_value(counts[g], grid, m.q, d_in, epsilon) for g in groups]
            continue
        counts = _quantile_counts(plan, m, engine, groups, empty=default_input)
        ladders = [mech.release_quantile_interval(counts[g], grid, m.q, d_in, bins_d_in, epsilon) for g in groups]
        # The second pass, over each group's released interval (post-processing of its ladder).
        fine = _fine_counts(
            plan,
            m,
            engine,
            [(g, r.fine_grid(pricing.alpha)) for g, r in zip(groups, ladders, strict=True)],
            empty=default_input,
        )
        quantiles[m] = [
            mech.release_quantile_point(r, fine[g], d_in, epsilon, pricing.alpha)
            for g, r in zip(groups, ladders, strict=True)
        ]

    return _post_process(plan, pricing, groups, noisy, quantiles, notes)


# --- post-processing ------------------------------------------------------------------------------------


def _interval(
    plan: Plan, pricing: Pricing, m: Measurement, value: np.ndarray, alpha: float
) -> tuple[np.ndarray, np.ndarray]:
    if pricing.counts_from_selection and m.kind == Kind.COUNT_STAR:
        scale, threshold = mech.threshold_for(
            plan.policy.max_rows_per_unit, pricing.selection_epsilon, pricing.selection_delta, pricing.selection_rho
        )
        if pricing.zcdp:
            return mech.selected_gaussian_count_interval(value, scale, threshold, alpha)
        return mech.selected_count_interval(value, scale, threshold, alpha)
    hw = pricing.half_width(m, alpha) * measurement_unit(plan, m)
    lo, hi = value - hw, value + hw
    if m.kind in _COUNT_KINDS or m.kind == Kind.SUMSQ:
        # Never below zero, and never inverted: a noisy value more than a half-width below zero gives [0, 0].
        lo, hi = np.maximum(lo, 0.0), np.maximum(hi, 0.0)
    return lo, hi


def _aggregate(
    plan: Plan,
    pricing: Pricing,
    a: Aggregate,
    noisy: dict[Measurement, np.ndarray],
    quantiles: dict[Measurement, list[mech.QuantileRelease]],
    alpha: float | None,
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    """Point value and (1 - alpha) interval of one aggregate per group (the value alone with alpha None)."""
    ms = a.measurements
    if a.kind == Kind.QUANTILE:
        return _quantile(quantiles[ms[0]], alpha)
    if len(ms) == 1:
        v = noisy[ms[0]]
        lo, hi = (None, None) if alpha is None else _interval(plan, pricing, ms[0], v, alpha)
        if a.kind in _COUNT_KINDS:
            v = np.maximum(v, 0.0)
        return v, lo, hi
    # a union bound over the aggregate's measurements, where one is needed
    alpha_each = pricing.alpha / len(ms) if alpha is None else alpha / len(ms)
    blo, bhi = _bounds(plan, a)
    s, c = noisy[_of(a, Kind.SUM)], noisy[_of(a, Kind.COUNT)]
    c_pos = np.maximum(c, 1.0)
    # With (noisily) no rows the mean is undefined: report none rather than an arbitrary bound.
    mean = np.where(c >= 1.0, np.clip(s / c_pos, blo, bhi), np.nan)
    if a.kind == Kind.AVG:
        return (mean, None, None) if alpha is None else (mean, *_mean_interval(plan, pricing, a, s, c, alpha))
    m_lo, m_hi, c_lo1, c_hi1 = _mean_corners(plan, pricing, a, s, c, alpha_each)
    ss = noisy[_of(a, Kind.SUMSQ)]
    ss_lo, ss_hi = _interval(plan, pricing, _of(a, Kind.SUMSQ), ss, alpha_each)
    var_max = (bhi - blo) ** 2 / 4
    var_pop = np.where(c >= 1.0, np.clip(ss / c_pos - mean**2, 0.0, var_max), np.nan)
    sq_lo = np.where((m_lo <= 0) & (m_hi >= 0), 0.0, np.minimum(m_lo**2, m_hi**2))
    sq_hi = np.maximum(m_lo**2, m_hi**2)
    v_lo = np.clip(ss_lo / c_hi1 - sq_hi, 0.0, var_max)
    v_hi = np.clip(ss_hi / c_lo1 - sq_lo, 0.0, var_max)
    if a.kind in {Kind.VAR, Kind.STD}:
        corr = np.where(c_pos > 1.5, c_pos / np.maximum(c_pos - 1, 1.0), 1.0)
        var_pop, v_lo, v_hi = np.minimum(var_pop * corr, var_max), v_lo, np.minimum(v_hi * corr, var_max)
    if a.kind in {Kind.STD, Kind.STD_POP}:
        return np.sqrt(var_pop), np.sqrt(v_lo), np.sqrt(v_hi)
    return var_pop, v_lo, v_hi


def _quantile_epsilon(pricing: Pricing, m: Measurement) -> float:
    """The pure ε of a quantile's release (its share of the request; under zCDP the ε with ε²/2 = its ρ), split
    between its three measurements."""
    return pricing.epsilon(m)


def _quantile(
    releases: list[mech.QuantileRelease], alpha: float | None
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    """Released quantile values per group and, at a given alpha, their intervals (post-processing of each group's
    noisy ladder)."""
    values = np.asarray([r.value for r in releases], dtype=np.float64)
    if alpha is None:
        return values, None, None
    if not all(r.has_interval for r in releases):  # value-only: no interval (a null cell)
        none = np.full(len(releases), np.nan)
        return values, none, none
    ends = np.asarray([r.value_interval(alpha) for r in releases], dtype=np.float64).reshape(-1, 2)
    return values, ends[:, 0], ends[:, 1]


def _of(a: Aggregate, kind: Kind) -> Measurement:
    """The measurement of one kind (SUM, SUMSQ, COUNT) behind a mean or variance, of its column or expression."""
    return Measurement(kind, a.column, expression=a.expression)


def _bounds(plan: Plan, a: Aggregate) -> tuple[float, float]:
    """The public range of a mean's values: its column's bounds, or its expression's propagated range."""
    if a.expression:
        value = plan.row_values[a.expression]
        return value.lo, value.hi
    bounds = plan.policy.columns[a.column].bounds
    assert bounds is not None, "the planner allows means and variances of bounded columns only"
    return float(bounds[0]), float(bounds[1])


def _mean_corners(
    plan: Plan, pricing: Pricing, a: Aggregate, s: np.ndarray, c: np.ndarray, alpha_each: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The mean's range from the corners of SUM's and COUNT's own intervals, each at alpha_each, clipped to the
    bounds; with the count's interval ends (at least 1) that the variance's interval uses too."""
    blo, bhi = _bounds(plan, a)
    s_lo, s_hi = _interval(plan, pricing, _of(a, Kind.SUM), s, alpha_each)
    c_lo, c_hi = _interval(plan, pricing, _of(a, Kind.COUNT), c, alpha_each)
    c_lo1, c_hi1 = np.maximum(c_lo, 1.0), np.maximum(c_hi, 1.0)
    corners = np.stack([s_lo / c_lo1, s_lo / c_hi1, s_hi / c_lo1, s_hi / c_hi1])
    return np.clip(corners.min(axis=0), blo, bhi), np.clip(corners.max(axis=0), blo, bhi), c_lo1, c_hi1


def _mean_interval(
    plan: Plan, pricing: Pricing, a: Aggregate, s: np.ndarray, c: np.ndarray, alpha: float
) -> tuple[np.ndarray, np.ndarray]:
    """(1 - alpha) interval of AVG(col) = S'/C' from the distribution of its combined error (X_s - m·X_c) / C'
    (`mech.ratio_error_bound`) instead of the corners of the two measurements' own intervals, which spends alpha
    twice and adds the two half-widths. The unknown mean's magnitude is bounded first from those corners at a tenth
    of alpha (a union bound: the interval fails with probability ≤ alpha/10 + 9·alpha/10)."""
    blo, bhi = _bounds(plan, a)
    m_sum, m_count = _of(a, Kind.SUM), _of(a, Kind.COUNT)
    first = alpha / 10
    m_lo, m_hi, _, _ = _mean_corners(plan, pricing, a, s, c, first / 2)
    mean_abs = np.maximum(np.abs(m_lo), np.abs(m_hi))
    z = mech.ratio_error_bound(
        pricing.scale(m_sum),
        measurement_unit(plan, m_sum),
        pricing.scale(m_count),
        mean_abs,
        alpha - first,
        gaussian=pricing.gaussian(m_sum),
    )
    known = c >= 1.0  # with (noisily) no rows, nothing is known beyond the bounds
    c_pos = np.where(known, c, 1.0)
    centre, half = s / c_pos, z / c_pos
    lo = np.where(known, np.clip(centre - half, blo, bhi), blo)
    hi = np.where(known, np.clip(centre + half, blo, bhi), bhi)
    return lo, hi


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
    return _function_interval(node, env)


def _round_half_away(x: np.ndarray, decimals: int) -> np.ndarray:
    """ROUND as the public engine computes it (halves away from zero, not numpy's halves to even)."""
    f = 10.0**decimals
    return np.asarray(np.sign(x) * np.floor(np.abs(x) * f + 0.5) / f, dtype=np.float64)


def _literal(node: exp.Expr | None) -> float | None:
    if isinstance(node, exp.Neg):
        inner = _literal(node.this)
        return None if inner is None else -inner
    if isinstance(node, exp.Literal) and not node.is_string:
        return float(node.this)
    return None


def _function_interval(
    node: exp.Expr, env: dict[str, tuple[np.ndarray, np.ndarray]]
) -> tuple[np.ndarray, np.ndarray] | None:
    """Intervals through functions of aggregates: a non-decreasing function maps [lo, hi] to [f(lo), f(hi)] where
    the whole interval is in its domain; ABS, and POWER by a literal exponent, by their monotone pieces. None where
    a function does not apply or an interval leaves its domain (a square root of an interval reaching below 0)."""
    inner = _interval_eval(node.this, env) if isinstance(node.this, exp.Expr) else None
    if inner is None:
        return None
    lo, hi = (np.asarray(x, dtype=np.float64) for x in inner)
    increasing: dict[type, tuple[float, Any]] = {  # function: (smallest argument of its domain, f)
        exp.Floor: (-math.inf, np.floor),
        exp.Ceil: (-math.inf, np.ceil),
        exp.Trunc: (-math.inf, np.trunc),
        exp.Sign: (-math.inf, np.sign),
        exp.Cbrt: (-math.inf, np.cbrt),
        exp.Exp: (-math.inf, np.exp),
        exp.Sqrt: (0.0, np.sqrt),
        exp.Ln: (math.nextafter(0.0, 1.0), np.log),
    }
    with np.errstate(over="ignore"):
        if type(node) in increasing and not (isinstance(node, exp.Floor | exp.Ceil) and node.args.get("decimals")):
            smallest, f = increasing[type(node)]
            return None if np.any(lo < smallest) else (f(lo), f(hi))
        if isinstance(node, exp.Round):
            decimals = _literal(node.args.get("decimals")) if node.args.get("decimals") is not None else 0.0
            if decimals is None or decimals != int(decimals) or abs(decimals) > 15:
                return None
            return _round_half_away(lo, int(decimals)), _round_half_away(hi, int(decimals))
        if isinstance(node, exp.Log):
            # LOG(x) is base 10 on the public engine; LOG(b, x) (and LOG10, LOG2) has the literal base first.
            base = 10.0 if node.args.get("expression") is None else _literal(node.this)
            if node.args.get("expression") is not None:
                arg = _interval_eval(node.expression, env)
                if arg is None:
                    return None
                lo, hi = (np.asarray(x, dtype=np.float64) for x in arg)
            if base is None or base <= 0 or base == 1 or np.any(lo <= 0):
                return None
            f_lo, f_hi = np.log(lo) / math.log(base), np.log(hi) / math.log(base)
            return (f_lo, f_hi) if base > 1 else (f_hi, f_lo)
        if isinstance(node, exp.Abs):
            a_lo = np.where(lo >= 0, lo, np.where(hi <= 0, -hi, 0.0))
            return a_lo, np.maximum(np.abs(lo), np.abs(hi))
        if isinstance(node, exp.Pow):
            p = _literal(node.expression)
            if p is None:
                return None
            if p == int(p) and int(p) % 2 == 0 and p >= 0:  # even: through |x|
                a_lo = np.where(lo >= 0, lo, np.where(hi <= 0, -hi, 0.0))
                return a_lo**p, np.maximum(np.abs(lo), np.abs(hi)) ** p
            if p == int(p) and p > 0:  # odd: increasing everywhere
                return lo**p, hi**p
            if np.any(lo <= 0):  # a fractional or negative power: positive arguments only
                return None
            return (lo**p, hi**p) if p > 0 else (hi**p, lo**p)
    return None


def _py(v: Any) -> Any:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return None
    if isinstance(v, np.generic):
        v = v.item()
    if hasattr(v, "isoformat"):
        return v.isoformat()
    return v


def _projection(plan: Plan) -> list[str] | None:
    """The released columns that the plan's post-processing selects, in order, when that is all it does (bare
    columns of the released table: no expression, HAVING, ORDER BY or LIMIT); None otherwise. Most queries are
    such a projection, which needs no round trip through the public engine."""
    post = plan.post
    if any(v for k, v in post.args.items() if k not in ("expressions", "from_", "from")):
        return None
    source = post.args.get("from_") or post.args.get("from")
    if not isinstance(source, exp.From) or not isinstance(source.this, exp.Table) or source.this.name != "released":
        return None
    available = {k.alias for k in plan.keys} | {a.alias for a in plan.aggregates} | {"__row"}
    names = []
    for e in post.expressions:
        column = e.this if isinstance(e, exp.Alias) else e
        if not isinstance(column, exp.Column) or column.table or column.name not in available:
            return None
        names.append(column.name)
    return names


def _released_table(plan: Plan, columns: dict[str, Any]) -> pa.Table:
    """The released values as an Arrow table for the public engine: keys typed by their SQL type where the values
    fit it (else as Arrow infers them), noisy values as doubles with NaN as NULL."""
    types = {k.alias: _ARROW_TYPES.get(k.typed.type, pa.float64()) for k in plan.keys}
    arrays = {}
    for name, values in columns.items():
        if isinstance(values, np.ndarray):
            arrays[name] = pa.array(values, from_pandas=True)
            continue
        try:
            arrays[name] = pa.array(values, types.get(name))
        except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError, ValueError, OverflowError):
            arrays[name] = pa.array(values)
    return pa.table(arrays)


def _post_process(
    plan: Plan,
    pricing: Pricing,
    groups: list[tuple[Any, ...]],
    noisy: dict[Measurement, np.ndarray],
    quantiles: dict[Measurement, list[mech.QuantileRelease]],
    notes: list[str],
) -> Release:
    alpha = pricing.alpha
    columns: dict[str, Any] = {}
    for j, key in enumerate(plan.keys):
        columns[key.alias] = [g[j] for g in groups]
    for a in plan.aggregates:
        v, _, _ = _aggregate(plan, pricing, a, noisy, quantiles, None)
        columns[a.alias] = np.broadcast_to(np.asarray(v, dtype=np.float64), (len(groups),))
    columns["__row"] = np.arange(len(groups))
    names = _projection(plan)
    out: Iterable[tuple[Any, ...]]
    if names is not None:
        out = zip(*(c.tolist() if isinstance(c, np.ndarray) else c for c in (columns[n] for n in names)), strict=True)
    else:
        try:
            out = public_rows(plan.post, {"released": _released_table(plan, columns)})
        except PublicError as exc:
            raise InvalidRequest(f"cannot compute the output expressions: {exc}") from None

    by_alias = {a.alias: a for a in plan.aggregates}
    col_intervals: list[tuple[np.ndarray, np.ndarray] | None] = []
    for e in plan.output_exprs:
        used = [by_alias[c.name] for c in e.find_all(exp.Column) if c.name in by_alias]
        if not used:
            col_intervals.append(None)
            continue
        env: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        for a in used:  # a union bound over the column's aggregates
            _, lo, hi = _aggregate(plan, pricing, a, noisy, quantiles, alpha / len(used))
            assert lo is not None and hi is not None, a  # every aggregate has an interval at a given alpha
            env[a.alias] = (lo, hi)
        col_intervals.append(_interval_eval(e, env))

    # Per output column, the bounds of every group as Python floats (one conversion per column, not per cell).
    col_bounds = [
        None if ci is None else tuple(np.broadcast_to(x, (len(groups),)).astype(np.float64).tolist() for x in ci)
        for ci in col_intervals
    ]
    rows, intervals, flags = [], [], []
    n_out = len(plan.output_names)
    thin = _thin_quantile_groups(plan, pricing, noisy, quantiles, len(groups))
    for r in out:
        idx = int(r[n_out])
        row = [_py(v) for v in r[:n_out]]
        cells = [
            _cell(v, b[0][idx], b[1][idx]) if b is not None else None for v, b in zip(row, col_bounds, strict=True)
        ]
        rows.append(row)
        intervals.append(cells)
        flags.append(
            [_flags(v, cell, t is not None and bool(t[idx])) for v, cell, t in zip(row, cells, thin, strict=True)]
        )

    measurements = []
    for m in plan.measurements:
        entry = pricing.entry(m)
        if m.kind == Kind.QUANTILE and not pricing.quantile_interval:
            grid = comp.quantile_value_grid(plan, m, len(groups))
            entry["epsilon_split"] = {"point": _quantile_epsilon(pricing, m)}
            entry["rank_error"] = _value_rank_error(plan, pricing, m, len(groups))
            entry["grid_step"] = grid.step
            entry["candidates"] = grid.size
            entry["interval"] = (
                "none: quantile_interval was false, so the whole ε went to one selection of the value among "
                "candidates spread over the column's bounds, and nothing measured an interval"
            )
        elif m.kind == Kind.QUANTILE:
            centre, interval, point = mech.quantile_epsilons(_quantile_epsilon(pricing, m))
            entry["epsilon_split"] = {"centre": centre, "interval": interval, "point": point}
            entry["rank_error"] = mech.quantile_point_rank_error(pricing.d_in[m], point, m.q, alpha)
            entry["grid_step"] = comp.quantile_grid(plan, m).step
        else:
            entry["half_width"] = pricing.half_width(m, alpha) * measurement_unit(plan, m)
        measurements.append(entry)
    if any(
        m.kind == Kind.QUANTILE and not ({Measurement(Kind.COUNT_STAR), Measurement(Kind.COUNT, m.column)} & set(noisy))
        for m in plan.measurements
    ):
        notes.append(
            "add COUNT(*) to the query to have the quantiles of groups with too few rows flagged 'noise_dominated'"
        )
    if any(m.kind == Kind.QUANTILE for m in plan.measurements) and not pricing.quantile_interval:
        notes.append(
            "each quantile is one OpenDP measurement (quantile_interval false): report-noisy-max at the quantile's "
            "whole ε picks the value among candidates spread over the column's bounds (every integer of a narrow "
            "integer column); no interval is released (its cell is null); rank_error under measurements is the "
            "value's rank error (rows) among those candidates"
        )
    elif any(m.kind == Kind.QUANTILE for m in plan.measurements):
        notes.append(
            "each quantile is three OpenDP measurements: report-noisy-max picks a centre among up to 1,024 positions, "
            "noisy counts of a ladder of bins around it give the interval (which holds the true quantile at "
            "1-alpha), and report-noisy-max picks the value among up to 1,024 positions spread over that interval "
            "(counted by a second pass over the rows); "
            "rank_error under measurements is the value's rank error (rows) among those positions"
        )
    return Release(
        columns=list(plan.output_names),
        rows=rows,
        intervals=intervals,
        measurements=measurements,
        notes=notes,
        groups_released=len(groups),
        flags=flags,
    )


def _cell(value: Any, lo: float, hi: float) -> list[float] | None:
    """A released cell's interval: none unless both ends are finite; widened where needed so that it holds the
    released value (a value clamped by the output expression may fall outside the interval of its inputs, and a
    wider interval only covers more)."""
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return None
    if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
        lo, hi = min(lo, float(value)), max(hi, float(value))
    return [lo, hi]


def _flags(value: Any, interval: list[float] | None, thin: bool) -> list[str]:
    """A released cell's flags, from DP outputs and public parameters only: noise-dominated when its interval's
    half-width (on the wider side) exceeds its magnitude (always, for a released zero: its noise's half-width is
    positive even where the interval is clamped to [0, 0]), when it has an interval but no value (a mean over a noisy
    count below one), or when it is a quantile whose interval is its column's whole bounds or whose group's noisy row
    count is below its public threshold."""
    if thin:
        return [NOISE_DOMINATED]
    if interval is None:
        return []
    if not isinstance(value, int | float) or isinstance(value, bool):
        return [NOISE_DOMINATED] if value is None else []
    lo, hi = interval
    return [NOISE_DOMINATED] if value == 0 or max(hi - value, value - lo) > abs(value) else []


def _value_rank_error(plan: Plan, pricing: Pricing, m: Measurement, n_groups: int) -> float:
    """A value-only quantile's rank error (rows, at the release's alpha) among its grid's candidates."""
    size = comp.quantile_value_grid(plan, m, n_groups).size
    return mech.quantile_point_rank_error(pricing.d_in[m], _quantile_epsilon(pricing, m), m.q, pricing.alpha, size)


def quantile_min_rows(plan: Plan, pricing: Pricing, m: Measurement, n_groups: int = 1) -> float:
    """Public number of rows below which a noisy quantile says little: its rank error (rows, at the release's
    alpha) exceeds the rows on the nearer side of the quantile."""
    if not pricing.quantile_interval:
        return _value_rank_error(plan, pricing, m, n_groups) / min(m.q, 1.0 - m.q)
    _, _, point = mech.quantile_epsilons(_quantile_epsilon(pricing, m))
    rank = mech.quantile_point_rank_error(pricing.d_in[m], point, m.q, pricing.alpha)
    return float(rank) / min(m.q, 1.0 - m.q)


def _thin_quantile_groups(
    plan: Plan,
    pricing: Pricing,
    noisy: dict[Measurement, np.ndarray],
    quantiles: dict[Measurement, list[mech.QuantileRelease]],
    n_groups: int,
) -> list[np.ndarray | None]:
    """Per output column that uses a quantile, whether each group's quantile says nothing: its interval (at the
    release's alpha) is the column's whole bounds, or its noisy row count (the query's COUNT of the quantile's
    column, else its COUNT(*), when the query has one) is below the quantile's public threshold; None where no
    quantile is used."""
    by_alias = {a.alias: a for a in plan.aggregates}
    out: list[np.ndarray | None] = []
    for e in plan.output_exprs:
        thin: np.ndarray | None = None
        for c in e.find_all(exp.Column):
            a = by_alias.get(c.name)
            if a is None or a.kind != Kind.QUANTILE:
                continue
            (m,) = a.measurements
            last = comp.quantile_grid(plan, m).size - 1
            # (a value-only quantile has no interval: only its group's count can show it thin)
            spans = [r.has_interval and r.interval(pricing.alpha) == (0, last) for r in quantiles[m]]
            below = np.asarray(spans, dtype=bool).reshape(n_groups)
            count = noisy.get(Measurement(Kind.COUNT, a.column), noisy.get(Measurement(Kind.COUNT_STAR)))
            if count is not None:
                threshold = quantile_min_rows(plan, pricing, m, n_groups)
                below = below | np.broadcast_to(count < threshold, (n_groups,))
            thin = below if thin is None else thin | below
        out.append(thin)
    return out

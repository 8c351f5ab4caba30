"""Price stage: what a plan costs and how noisy each of its measurements is, decided before any private data is
read. The request's ε is divided equally among the plan's distinct primitive measurements (COUNT(*), COUNT(col),
COUNT(DISTINCT unit), SUM(col), SUM(col²), one selection per quantile), plus one equal share for private key
selection when some GROUP BY key has no public domain and the query has no COUNT(*) (with one, the selection's
noisy counts are the COUNT(*) release); key selection also costs δ. An accuracy target instead of ε
is turned into ε by OpenDP's accuracy functions (documented in the README)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from sqlglot import exp

from gateway.sql.plan import Aggregate, Kind, Measurement, Plan
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
from policies.errors import InvalidRequest

_COUNT_KINDS = {Kind.COUNT_STAR, Kind.COUNT, Kind.COUNT_DISTINCT_UNIT}


@dataclass(frozen=True)
class Pricing:
    """What a plan costs and how noisy each measurement is, decided before any private data is read."""

    cost: PrivacyLoss
    epsilon_per_measurement: float
    d_in: dict[Measurement, int]
    selection_epsilon: float
    selection_delta: float
    alpha: float
    # Where keys are selected privately and the query has COUNT(*), the selection's own noisy counts are released
    # as COUNT(*) (one measurement at the selection's ε instead of two shares).
    counts_from_selection: bool = False

    def scale(self, m: Measurement) -> float:
        if m.kind == Kind.QUANTILE:
            return 2 * self.d_in[m] / self.epsilon_per_measurement
        return self.d_in[m] / self.epsilon_per_measurement

    def half_width(self, m: Measurement, alpha: float) -> float:
        """Half-width, in the measurement's integer units, of its (1-alpha) interval."""
        return mech.integer_accuracy(self.scale(m), alpha)


def _d_in(plan: Plan, m: Measurement) -> int:
    k = plan.policy.max_rows_per_unit
    grouped = bool(plan.keys)
    match m.kind:
        case Kind.COUNT_STAR | Kind.COUNT:
            return sens.count_sensitivity(k)
        case Kind.COUNT_DISTINCT_UNIT:
            return sens.distinct_unit_sensitivity(k, grouped)
        case Kind.SUM:
            return sens.sum_sensitivity(k, plan.policy.columns[m.column])
        case Kind.SUMSQ:
            return sens.sum_of_squares_sensitivity(k, plan.policy.columns[m.column])
        case Kind.QUANTILE:
            return sens.quantile_sensitivity(k, m.q)
    raise AssertionError(m.kind)


def measurement_unit(plan: Plan, m: Measurement) -> float:
    """Value of one integer unit of a measurement (fixed-point sums) in the column's own unit."""
    if m.kind == Kind.SUM:
        return plan.policy.columns[m.column].fx_unit
    if m.kind == Kind.SUMSQ:
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
    if delta is not None:
        delta = check_delta(delta)  # refused when out of range even if no key selection would spend it
    d_in = {m: _d_in(plan, m) for m in plan.measurements}
    from_selection = plan.needs_key_selection and Measurement(Kind.COUNT_STAR) in d_in
    shares = len(plan.measurements) + (1 if plan.needs_key_selection and not from_selection else 0)
    sel_delta = 0.0
    if plan.needs_key_selection:
        budget_delta = plan.policy.budget.per_principal.delta
        sel_delta = delta if delta is not None else budget_delta / 10
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
        if agg is None or agg.kind not in _COUNT_KINDS | {Kind.SUM}:
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
        counts_from_selection=from_selection,
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


def dry_run_accuracy(plan: Plan, pricing: Pricing) -> dict[str, float | None]:
    """Data-independent half-width per output column where one exists (a single COUNT or SUM)."""
    out: dict[str, float | None] = {}
    for name in plan.output_names:
        agg = single_aggregate(plan, name)
        if agg is not None and agg.kind in _COUNT_KINDS | {Kind.SUM}:
            (m,) = agg.measurements
            out[name] = pricing.half_width(m, pricing.alpha) * measurement_unit(plan, m)
        else:
            out[name] = None
    return out

"""Price stage: what a plan costs and how noisy each of its measurements is, decided before any private data is
read. The plan's primitive measurements are COUNT(*), COUNT(col), COUNT(DISTINCT unit), SUM(col), SUM(col²) (of a
column, or of a row expression within its propagated range) and one selection per quantile, plus private key
selection when some GROUP BY key has no public domain (which also costs δ). When the query has COUNT(*), the
selection's own noisy counts are the COUNT(*) release (the Laplace threshold's under pure accounting, the Gaussian
threshold's under zCDP): one measurement instead of a selection share and a count.

Under pure accounting each measurement gets an ε (discrete Laplace; report-noisy-max for quantiles); under zCDP
accounting (policies.accountant) a ρ (discrete Gaussian at the measurement's L2 sensitivity; quantiles stay
report-noisy-max at the ε with ε²/2 = ρ; key selection is OpenDP's Gaussian threshold). A request's ε is divided
equally (under zCDP its ρ = ε²/2). An accuracy request names one or more COUNT or SUM output columns: each
targeted measurement gets exactly the ε (ρ) its target needs (OpenDP's accuracy functions), and the measurements
no target names, and key selection, get the smallest of those, as with one target, where every measurement gets
what the target needs."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from sqlglot import exp

from gateway.sql.plan import Aggregate, Kind, Measurement, Plan
from policies import mechanisms as mech
from policies import sensitivity as sens
from policies.accountant import (
    MAX_EPSILON,
    MIN_EPSILON,
    Accounting,
    PrivacyLoss,
    check_alpha,
    check_delta,
    check_epsilon,
    pure_to_rho,
    rho_cap,
    selection_delta_cap,
)
from policies.errors import InvalidRequest
from policies.schema import Budget

_COUNT_KINDS = {Kind.COUNT_STAR, Kind.COUNT, Kind.COUNT_DISTINCT_UNIT, Kind.COUNT_DISTINCT}

DISCRETE_LAPLACE = "discrete_laplace"
DISCRETE_GAUSSIAN = "discrete_gaussian"
REPORT_NOISY_MAX = "report_noisy_max"


@dataclass(frozen=True)
class Pricing:
    """What a plan costs and how noisy each measurement is, decided before any private data is read.

    `budget` is each measurement's ε (pure accounting) or ρ (zCDP); `d_in` its L1 sensitivity (L∞ of the score
    vector for a quantile) and `l2` its L2 sensitivity (what the Gaussian mechanism is calibrated for)."""

    cost: PrivacyLoss
    budget: dict[Measurement, float]
    d_in: dict[Measurement, int]
    selection_epsilon: float
    selection_delta: float
    alpha: float
    l2: dict[Measurement, float]
    accounting: Accounting = Accounting.PURE
    selection_rho: float = 0.0
    # Where keys are selected privately and the query has COUNT(*), the selection's own noisy counts are released
    # as COUNT(*): one measurement at the selection's ε (ρ under zCDP) instead of two shares.
    counts_from_selection: bool = False
    # False: each quantile is released as its value only, by one selection at its whole ε (no interval).
    quantile_interval: bool = True

    @property
    def zcdp(self) -> bool:
        return self.accounting is Accounting.ZCDP

    @property
    def epsilon_per_measurement(self) -> float | None:
        """The one ε every measurement gets (pure accounting, equal split); None when they differ or under zCDP."""
        values = set(self.budget.values())
        return None if self.zcdp or len(values) != 1 else next(iter(values))

    def gaussian(self, m: Measurement) -> bool:
        return self.zcdp and m.kind != Kind.QUANTILE

    def mechanism(self, m: Measurement) -> str:
        if m.kind == Kind.QUANTILE:
            return REPORT_NOISY_MAX
        return DISCRETE_GAUSSIAN if self.zcdp else DISCRETE_LAPLACE

    def epsilon(self, m: Measurement) -> float:
        """The pure ε the measurement's mechanism runs at: its budget under pure accounting; under zCDP the ε of a
        quantile (ε²/2 = its ρ) and 0 for a Gaussian release (which is not pure DP)."""
        if not self.zcdp:
            return self.budget[m]
        return math.sqrt(2 * self.budget[m]) if m.kind == Kind.QUANTILE else 0.0

    def rho(self, m: Measurement) -> float:
        return self.budget[m] if self.zcdp else 0.0

    def scale(self, m: Measurement) -> float:
        if m.kind == Kind.QUANTILE:
            return 2 * self.d_in[m] / self.epsilon(m)
        if self.zcdp:
            return mech.gaussian_scale_for(self.l2[m], self.budget[m])
        return self.d_in[m] / self.budget[m]

    def half_width(self, m: Measurement, alpha: float) -> float:
        """Half-width, in the measurement's integer units, of its (1-alpha) interval."""
        if self.gaussian(m):
            return mech.gaussian_accuracy(self.scale(m), alpha)
        return mech.integer_accuracy(self.scale(m), alpha)

    def release(self, m: Measurement, values: list[int]) -> mech.IntegerRelease:
        """The measurement's noisy integers (a COUNT or SUM vector, one value per group)."""
        if self.gaussian(m):
            return mech.release_gaussian_integers(values, self.l2[m], self.budget[m])
        return mech.release_integers(values, self.d_in[m], self.budget[m])

    def entry(self, m: Measurement) -> dict[str, Any]:
        """What an answer's (or a dry run's) `measurements` list says of one measurement: its mechanism and cost."""
        out: dict[str, Any] = {"measurement": m.label, "mechanism": self.mechanism(m), "epsilon": self.epsilon(m)}
        if self.zcdp:
            out["rho"] = self.budget[m]
        out["sensitivity"] = self.l2[m] if self.gaussian(m) else self.d_in[m]
        if m.kind == Kind.QUANTILE:
            out["quantile_interval"] = self.quantile_interval
        return out


def _d_in(plan: Plan, m: Measurement) -> int:
    k = plan.policy.max_rows_per_unit
    grouped = bool(plan.keys)
    match m.kind:
        case Kind.COUNT_STAR | Kind.COUNT | Kind.COUNT_DISTINCT:
            return sens.count_sensitivity(k)
        case Kind.COUNT_DISTINCT_UNIT:
            return sens.distinct_unit_sensitivity(k, grouped)
        case Kind.SUM if m.expression:
            value = plan.row_values[m.expression]
            return sens.fixed_point_sensitivity(k, value.max_abs, value.unit)
        case Kind.SUMSQ if m.expression:
            value = plan.row_values[m.expression]
            return sens.fixed_point_sensitivity(k, value.square_max, value.unit2)
        case Kind.SUM:
            return sens.sum_sensitivity(k, plan.policy.columns[m.column])
        case Kind.SUMSQ:
            return sens.sum_of_squares_sensitivity(k, plan.policy.columns[m.column])
        case Kind.QUANTILE:
            return sens.quantile_sensitivity(k, m.q)
    raise AssertionError(m.kind)


def _l2(plan: Plan, m: Measurement) -> float:
    k = plan.policy.max_rows_per_unit
    match m.kind:
        case Kind.COUNT_STAR | Kind.COUNT | Kind.COUNT_DISTINCT:
            return sens.count_l2(k)
        case Kind.COUNT_DISTINCT_UNIT:
            return sens.distinct_unit_l2(k, bool(plan.keys))
        case Kind.SUM | Kind.SUMSQ if m.expression:
            return _d_in(plan, m)  # k rows of at most max|v| each in one group, as for a column: L2 = L1
        case Kind.SUM:
            return sens.sum_l2(k, plan.policy.columns[m.column])
        case Kind.SUMSQ:
            return sens.sum_of_squares_l2(k, plan.policy.columns[m.column])
        case Kind.QUANTILE:
            return math.nan  # report-noisy-max, never Gaussian
    raise AssertionError(m.kind)


def measurement_unit(plan: Plan, m: Measurement) -> float:
    """Value of one integer unit of a measurement (fixed-point sums) in the column's (expression's) own unit."""
    if m.expression and m.kind == Kind.SUM:
        return plan.row_values[m.expression].unit
    if m.expression and m.kind == Kind.SUMSQ:
        return plan.row_values[m.expression].unit2
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
    accounting: Accounting | None = None,
    quantile_interval: bool = True,
) -> Pricing:
    """Decide the ε (ρ under zCDP) of each measurement, from a total ε or from accuracy targets of output columns.
    `accounting` defaults to the policy's (a dry run prices both). `quantile_interval` False releases each quantile's
    value only, by one selection at the quantile's whole ε (its cost is the same either way)."""
    accounting = plan.policy.accounting if accounting is None else accounting
    zcdp = accounting is Accounting.ZCDP
    alpha = check_alpha(alpha)
    if delta is not None:
        delta = check_delta(delta)  # refused when out of range even if no key selection would spend it
    d_in = {m: _d_in(plan, m) for m in plan.measurements}
    l2 = {m: _l2(plan, m) for m in plan.measurements}
    from_selection = plan.needs_key_selection and Measurement(Kind.COUNT_STAR) in d_in
    separate_selection = plan.needs_key_selection and not from_selection
    shares = len(plan.measurements) + (1 if separate_selection else 0)
    cap = plan.policy.budget.per_principal
    budget_delta = selection_delta_cap(cap.delta, accounting)
    if plan.needs_key_selection and delta is None and budget_delta <= 0:
        raise InvalidRequest(
            "a GROUP BY key has no public domain in the policy, so its keys must be selected privately, "
            "which needs δ > 0; declare a domain for the key column or give the policy a δ budget"
        )
    if (epsilon is None) == (accuracy is None):
        raise InvalidRequest("give exactly one of epsilon or accuracy")
    if epsilon is not None:
        epsilon = check_epsilon(epsilon)
        # A query of public keys alone (GROUP BY keys of declared domains, no aggregate) measures nothing: free.
        total = 0.0 if shares == 0 else pure_to_rho(epsilon) if zcdp else epsilon
        budget = {m: total / shares for m in plan.measurements}
        sel = total / shares if shares else 0.0
    else:
        need: dict[Measurement, float] = {}
        for name, target in _accuracy_targets(plan, accuracy):  # type: ignore[arg-type]
            agg = single_aggregate(plan, name)
            if agg is None or not _targetable(agg):
                raise InvalidRequest(
                    f"an accuracy target can be set for a COUNT or SUM output column; {name!r} is not one. "
                    "Give epsilon instead, or use a dry run to see the accuracy an epsilon buys"
                )
            (m,) = agg.measurements
            try:
                if zcdp:
                    b = mech.rho_for_accuracy(l2[m], target / measurement_unit(plan, m), alpha)
                else:
                    b = mech.epsilon_for_accuracy(d_in[m], target / measurement_unit(plan, m), alpha)
            except Exception:  # noqa: BLE001 - OpenDP refuses targets it cannot reach; the target is public
                b = math.inf
            need[m] = max(need.get(m, 0.0), b)
        # No measurement gets less than the smallest ε (ρ) a request may spend: a very loose target (or an
        # untargeted measurement next to one) would otherwise run at an ε of 1e-300, whose noise is no number.
        least = pure_to_rho(MIN_EPSILON) if zcdp else MIN_EPSILON
        floor = max(min(need.values()), least)
        budget = {m: max(need.get(m, floor), least) for m in plan.measurements}
        sel = budget[Measurement(Kind.COUNT_STAR)] if from_selection else floor
        total = math.fsum(budget.values()) + (sel if separate_selection else 0.0)
        lo, hi = (pure_to_rho(MIN_EPSILON), pure_to_rho(MAX_EPSILON)) if zcdp else (MIN_EPSILON, MAX_EPSILON)
        if not (math.isfinite(total) and lo <= total <= hi):
            what = ", ".join(f"±{t:g} for {n!r}" for n, t in _accuracy_targets(plan, accuracy))  # type: ignore[arg-type]
            unit = "ρ" if zcdp else "ε"
            raise InvalidRequest(
                f"an accuracy of {what} would need {unit} = {total:.3g}, outside the allowed "
                f"[{lo:g}, {hi:g}]; ask for a looser or tighter target"
            )
    sel_budget = sel if plan.needs_key_selection else 0.0
    sel_delta = 0.0
    if plan.needs_key_selection:
        sel_delta = delta if delta is not None else default_delta(budget_delta, total, _cap_total(cap, accounting))
        try:  # the threshold is found now, before anything is charged (public parameters only)
            mech.threshold_for(
                plan.policy.max_rows_per_unit, 0.0 if zcdp else sel_budget, sel_delta, sel_budget if zcdp else 0.0
            )
        except mech.MechanismError:
            raise InvalidRequest(
                f"private key selection cannot reach δ = {sel_delta:g} at this ε (OpenDP's threshold map stops "
                f"short of it); give a larger delta, e.g. {MIN_DEFAULT_DELTA:g} or more"
            ) from None
    return Pricing(
        cost=PrivacyLoss(0.0, sel_delta, total) if zcdp else PrivacyLoss(total, sel_delta),
        budget=budget,
        d_in=d_in,
        selection_epsilon=0.0 if zcdp else sel_budget,
        selection_delta=sel_delta,
        alpha=alpha,
        l2=l2,
        accounting=accounting,
        selection_rho=sel_budget if zcdp else 0.0,
        counts_from_selection=from_selection,
        quantile_interval=quantile_interval,
    )


# The least δ a request's default gives key selection: OpenDP's threshold maps reach δ down to about 1e-14 only.
MIN_DEFAULT_DELTA = 1e-12


def default_delta(delta_cap: float, spent: float, spend_cap: float) -> float:
    """A private-key request's δ when it gives none: the δ cap's share that its ε (ρ under zCDP) is of the ε (ρ)
    cap, so that δ and ε run out together and a budget is spent on ε, not rationed by a fixed δ per query; never
    below MIN_DEFAULT_DELTA (nor above the cap)."""
    share = delta_cap if spend_cap <= 0 else delta_cap * min(1.0, spent / spend_cap)
    return min(delta_cap, max(share, MIN_DEFAULT_DELTA))


def _cap_total(cap: Budget, accounting: Accounting) -> float:
    """The per-principal ε cap, or under zCDP the ρ cap it converts to."""
    return rho_cap(cap.epsilon, cap.delta) if accounting is Accounting.ZCDP else cap.epsilon


def _accuracy_targets(plan: Plan, accuracy: float | dict[str, float]) -> list[tuple[str, float]]:
    """The (output column, 95% half-width) pairs of an accuracy request: a number targets the first COUNT or SUM
    output column (as the README says); an object names one or more output columns."""
    if isinstance(accuracy, dict):
        if not accuracy:
            raise InvalidRequest('accuracy as an object names one or more output columns, e.g. {"visits": 50}')
        pairs = list(accuracy.items())
    else:
        name = next((n for n in plan.output_names if _targetable(single_aggregate(plan, n))), None)
        if name is None:
            raise InvalidRequest(
                "a number as accuracy is the target half-width of the first COUNT or SUM output column, and this "
                "query has none (its columns are group keys, other aggregates or arithmetic on aggregates), so there "
                "is no target to derive ε from. Give epsilon instead; a dry run with epsilon shows what it costs"
            )
        pairs = [(name, accuracy)]
    out = []
    for name, target in pairs:
        if isinstance(target, bool) or not (isinstance(target, int | float) and math.isfinite(target) and target > 0):
            raise InvalidRequest("accuracy must be a positive number (the 95% half-width, in the column's units)")
        if name not in plan.output_names:
            raise InvalidRequest(f"no output column named {name!r}")
        out.append((name, float(target)))
    return out


def _targetable(agg: Aggregate | None) -> bool:
    """An output column that is one COUNT or SUM: the columns an accuracy target can be set for."""
    return agg is not None and agg.kind in _COUNT_KINDS | {Kind.SUM}


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

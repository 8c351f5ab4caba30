"""The DP measurements behind a proxy, and how a request's ε (and δ) is split across them.

Input is the gateway's engine (a `policies.reader.Reader`) and the policy; `measure` reads only the pre-bounded
table through grouped aggregate statements (histograms and two-way tables), built as sqlglot trees that the
engine generates in its own dialect, and every number it keeps has passed through an OpenDP mechanism from
`policies.mechanisms`. It never opens a database and never pulls rows. `marginal_counts` and `pair_counts` are
the exact aggregates before noise (what an engine must compute identically).

Sensitivity: neighbouring datasets differ by all rows of one privacy unit, at most k = `max_rows_per_unit` rows
of the pre-bounded table. Every row falls in exactly one bin of a histogram and in at most one cell of a
two-way table, so each released vector has L1 sensitivity k.

The ε split (basic sequential composition; the parts add up to the request's ε):

- with d proxy columns and P = d(d-1)/2 column pairs: half of ε for the marginals, ε/(2d) each, and half for
  the correlations, ε/(2P) each; with a single column (P = 0) all of ε goes to its marginal;
- a marginal is a discrete-Laplace histogram over the column's public bins (scale k / ε_column);
- a column without a public domain (category without `domain`) gets its keys by DP key selection (OpenDP's
  Laplace threshold), spending its ε_column and an equal share of the request's δ; with δ = 0 such columns are
  left out of the proxy;
- a correlation is a discrete-Laplace two-way table of the two columns' coarse groups (at most 5 × 5 cells, cut
  at quantiles of the already-released marginals) with scale k / ε_pair, turned into a latent-normal ρ by
  maximum likelihood, shrunk by its evidence against independence and repaired to a positive definite matrix (all
  post-processing).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from itertools import combinations
from typing import Any

import numpy as np
from sqlglot import exp

from policies.accountant import MAX_DELTA, MAX_EPSILON, MIN_DELTA, MIN_EPSILON
from policies.errors import InvalidRequest
from policies.mechanisms import release_integers, select_keys, threshold_for
from policies.reader import Reader
from policies.schema import Policy
from policies.sensitivity import count_sensitivity
from synth.columns import BinKind, ColumnBins, ProxySchema, column, proxy_schema
from synth.copula import coarse_groups, group_thresholds, nearest_correlation, polychoric_fit, shrink
from synth.model import DPCopulaModel, Marginal, PairTable

Progress = Callable[[float, str], None]


def _no_progress(fraction: float, stage: str) -> None:
    return None


@dataclass(frozen=True)
class Allocation:
    """The public plan of a DP proxy: its columns and the ε / δ of each measurement."""

    schema: ProxySchema
    epsilon: float
    delta: float
    epsilon_marginal: float
    epsilon_pair: float
    delta_key_selection: float

    @property
    def pairs(self) -> list[tuple[int, int]]:
        return list(combinations(range(len(self.schema.columns)), 2))

    @property
    def delta_spent(self) -> float:
        keyed = sum(1 for c in self.schema.columns if c.kind == BinKind.KEYS)
        return self.delta_key_selection * keyed

    def to_json(self) -> dict[str, Any]:
        return {
            "columns": [c.name for c in self.schema.columns],
            "unit_column": self.schema.unit_column,
            "dropped": self.schema.dropped,
            "epsilon": self.epsilon,
            "delta": self.delta_spent,
            "epsilon_per_marginal": self.epsilon_marginal,
            "epsilon_per_pair": self.epsilon_pair,
            "pairs": len(self.pairs),
            "delta_per_key_selection": self.delta_key_selection,
            "rule": "half of ε to the marginals (equal shares), half to the column pairs (equal shares); "
            "all of ε to the marginal if there is one column; δ only for key selection, equal shares",
        }


def allocate(policy: Policy, epsilon: float, delta: float = 0.0) -> Allocation:
    """Split (ε, δ) over the measurements of a proxy of `policy`, from public facts only."""
    if not epsilon > 0:
        raise InvalidRequest("a DP proxy needs epsilon > 0")
    schema = proxy_schema(policy)
    columns = list(schema.columns)
    dropped = dict(schema.dropped)
    if delta <= 0:
        for c in [c for c in columns if c.kind == BinKind.KEYS]:
            columns.remove(c)
            dropped[c.name] = "no public domain: DP key selection needs delta > 0"
    schema = ProxySchema(columns=columns, unit_column=schema.unit_column, dropped=dropped)
    d = len(columns)
    if d == 0:
        raise InvalidRequest(f"dataset {policy.dataset!r} has no column a proxy can have", dropped=dropped)
    n_pairs = d * (d - 1) // 2
    eps_marg = (epsilon / 2 if n_pairs else epsilon) / d
    eps_pair = epsilon / 2 / n_pairs if n_pairs else 0.0
    keyed = sum(1 for c in columns if c.kind == BinKind.KEYS)
    return Allocation(schema, epsilon, delta, eps_marg, eps_pair, delta / keyed if keyed else 0.0)


def uncalibrated(policy: Policy, allocation: Allocation) -> str | None:
    """None when OpenDP can build every measurement of `allocation` at its share of ε (and δ): the histograms'
    discrete Laplace with its privacy map within the share, and key selection's threshold for its share of δ.
    Otherwise which measurement cannot be built. Public facts only: no row is read."""
    k = policy.max_rows_per_unit
    try:
        for c in allocation.schema.columns:
            if c.kind == BinKind.KEYS:
                threshold_for(k, allocation.epsilon_marginal, allocation.delta_key_selection)
            else:
                release_integers([], count_sensitivity(k), allocation.epsilon_marginal)
        if allocation.pairs:
            release_integers([], count_sensitivity(k), allocation.epsilon_pair)
    except Exception as exc:  # noqa: BLE001 - a MechanismError, an overflow, or OpenDP's own exception
        return type(exc).__name__
    return None


def _least(works: Callable[[float], bool], lo: float, hi: float) -> float:
    """The least x in [lo, hi] (to 3 significant digits, rounded up) for which `works` holds, by bisection on log x;
    `works` must be monotone, false at lo and true at hi."""
    a, b = np.log(lo), np.log(hi)
    while b - a > 1e-4:
        mid = (a + b) / 2
        if works(float(np.exp(mid))):
            b = mid
        else:
            a = mid
    least = float(np.exp(b))
    unit = 10 ** (np.floor(np.log10(least)) - 2)
    return float(np.ceil(least / unit) * unit)


def epsilon_range(policy: Policy, delta: float, lowest: float = MIN_EPSILON) -> tuple[float, float] | None:
    """The ε in [lowest, MAX_EPSILON] at which a proxy of `policy` can be built with `delta`: (least, MAX_EPSILON),
    the least found by bisection on whether OpenDP calibrates every measurement (monotone in ε); None if none."""

    def works(epsilon: float) -> bool:
        return uncalibrated(policy, allocate(policy, epsilon, delta)) is None

    if not works(MAX_EPSILON):
        return None
    if works(lowest):
        return lowest, MAX_EPSILON
    return _least(works, lowest, MAX_EPSILON), MAX_EPSILON


def check_calibration(policy: Policy, epsilon: float, delta: float) -> Allocation:
    """`allocate(policy, epsilon, delta)`, or an InvalidRequest (400) that says which ε (or δ) works when OpenDP
    cannot build one of its measurements: checked before anything is charged."""
    allocation = allocate(policy, epsilon, delta)
    if uncalibrated(policy, allocation) is None:
        return allocation
    allowed = epsilon_range(policy, delta)
    if allowed is None:
        least = _least(lambda d: uncalibrated(policy, allocate(policy, MAX_EPSILON, d)) is None, MIN_DELTA, MAX_DELTA)
        raise InvalidRequest(
            f"no epsilon up to {MAX_EPSILON:g} can build a proxy of {policy.dataset!r} with delta={delta:g}: "
            f"OpenDP's key selection (for the columns without a public domain) needs delta of at least {least:g} "
            "here; give a larger delta",
            reason="uncalibrated",
            allowed={"delta": [least, MAX_DELTA]},
        )
    lo, hi = allowed
    raise InvalidRequest(
        f"a proxy of {policy.dataset!r} with delta={delta:g} needs epsilon between {lo:g} and {hi:g} "
        f"(got {epsilon:g}): its share per measurement (ε/(2·columns) per histogram, ε/(2·pairs) per "
        "pair) is too small for OpenDP to calibrate; raise epsilon",
        reason="uncalibrated",
        allowed={"epsilon": [lo, hi]},
    )


def _count() -> exp.Expr:
    return exp.Count(this=exp.Star())


def key_counts(reader: Reader, table: exp.Expr, col: ColumnBins) -> dict[str, int]:
    """Exact row counts of each present value of a column without a public domain (input to key selection)."""
    key = exp.Cast(this=column(col.name), to=exp.DataType.build("VARCHAR"))
    query = (
        exp.select(key, _count())
        .from_(table.copy())
        .where(exp.Not(this=exp.Is(this=column(col.name), expression=exp.Null())))
        .group_by(key.copy())
    )
    return {str(k): int(n) for k, n in reader.rows(query)}


def marginal_counts(reader: Reader, table: exp.Expr, col: ColumnBins) -> list[int]:
    """Exact row counts of every bin of a column with a public bin layout (the NULL bin last)."""
    b = exp.alias_(col.bin_expr(), "__b", quoted=True)
    query = exp.select(b, _count()).from_(table.copy()).group_by(col.bin_expr())
    counts = [0] * col.size
    for i, n in reader.rows(query):
        counts[int(i)] = int(n)
    return counts


def _marginal(reader: Reader, table: exp.Expr, col: ColumnBins, k: int, a: Allocation, candidates: int) -> Marginal:
    if col.kind == BinKind.KEYS:
        sel = select_keys(
            key_counts(reader, table, col), k, a.epsilon_marginal, a.delta_key_selection, candidates=candidates
        )
        keys = sorted(sel.kept)
        return Marginal(
            col.with_keys(keys), [int(sel.kept[key]) for key in keys], sel.scale, sel.epsilon, sel.delta, sel.threshold
        )
    rel = release_integers(marginal_counts(reader, table, col), count_sensitivity(k), a.epsilon_marginal)
    return Marginal(col, rel.values, rel.scale, rel.epsilon)


def _group_expr(col: ColumnBins, groups: np.ndarray) -> exp.Expr:
    """The coarse group of each row's bin (NULL for the NULL bin and for unreleased keys)."""
    lookup = exp.Array(expressions=[*(exp.Literal.number(int(g)) for g in groups), exp.Null()])
    position = exp.Cast(
        this=exp.Add(this=col.bin_expr(), expression=exp.Literal.number(1)), to=exp.DataType.build("INT")
    )
    return exp.Bracket(this=lookup, expressions=[position], offset=1, safe=False)


def pair_counts(
    reader: Reader, table: exp.Expr, a: ColumnBins, b: ColumnBins, ga: np.ndarray, gb: np.ndarray
) -> np.ndarray:
    """Exact row counts of the two-way table of two columns' coarse groups (rows with a NULL group left out)."""
    inner = exp.select(
        exp.alias_(_group_expr(a, ga), "__ga", quoted=True), exp.alias_(_group_expr(b, gb), "__gb", quoted=True)
    ).from_(table.copy())
    x, y = column("__ga"), column("__gb")
    query = (
        exp.select(x, y, _count())
        .from_(exp.alias_(exp.Subquery(this=inner), "groups"))
        .where(
            exp.and_(
                exp.Not(this=exp.Is(this=x.copy(), expression=exp.Null())),
                exp.Not(this=exp.Is(this=y.copy(), expression=exp.Null())),
            )
        )
        .group_by(x.copy(), y.copy())
    )
    na, nb = int(ga.max()) + 1, int(gb.max()) + 1
    flat = np.zeros((na, nb), dtype=np.int64)
    for i, j, n in reader.rows(query):
        flat[int(i), int(j)] = int(n)
    return flat


def _pair(reader: Reader, table: exp.Expr, ma: Marginal, mb: Marginal, k: int, eps: float) -> PairTable:
    ga, gb = coarse_groups(ma.value_mass), coarse_groups(mb.value_mass)
    exact = pair_counts(reader, table, ma.column, mb.column, ga, gb)
    rel = release_integers([int(v) for v in exact.ravel()], count_sensitivity(k), eps)
    noisy: np.ndarray = np.asarray(rel.values, dtype=np.int64).reshape(exact.shape)
    rho, lr = polychoric_fit(noisy, group_thresholds(ma.value_mass, ga), group_thresholds(mb.value_mass, gb), rel.scale)
    return PairTable(
        ma.column.name,
        mb.column.name,
        ga.tolist(),
        gb.tolist(),
        noisy.tolist(),
        rel.scale,
        rel.epsilon,
        rho,
        lr,
        shrink(rho, lr),
    )


def measure(
    reader: Reader,
    table: str | exp.Expr,
    policy: Policy,
    allocation: Allocation,
    progress: Progress = _no_progress,
) -> DPCopulaModel:
    """Run every DP measurement of `allocation` on the pre-bounded `table` and return the DP model. `table` is the
    bounded table's name, or a FROM source over bounded tables (a private table of a dataset of several tables,
    joined with a public table: `gateway.tablesources`) whose rows per unit are `policy.max_rows_per_unit`."""
    source = exp.table_(table, quoted=True) if isinstance(table, str) else table
    k = policy.max_rows_per_unit
    columns = allocation.schema.columns
    measured: list[Marginal | None] = []
    steps = len(columns) + len(allocation.pairs)
    notes: list[str] = []
    dropped = dict(allocation.schema.dropped)
    for i, col in enumerate(columns):
        progress(i / steps, f"marginal of {col.name}")
        m = _marginal(reader, source, col, k, allocation, policy.key_candidates)
        if m.column.n_bins == 0:
            dropped[col.name] = "no key passed the DP key-selection threshold"
            measured.append(None)
            continue
        if m.cleaned[: m.column.n_bins].sum() <= 0:
            notes.append(f"the DP histogram of {col.name} came out empty at this ε; its proxy values are uniform")
        measured.append(m)
    kept = [i for i, m in enumerate(measured) if m is not None]
    marginals = [m for m in measured if m is not None]
    corr = np.eye(len(marginals))
    pairs: list[PairTable] = []
    for n, (i, j) in enumerate(allocation.pairs):
        ma, mb = measured[i], measured[j]
        if ma is None or mb is None:
            continue  # its share of ε stays spent (the plan was fixed before measuring)
        progress((len(columns) + n) / steps, f"correlation of {ma.column.name} and {mb.column.name}")
        p = _pair(reader, source, ma, mb, k, allocation.epsilon_pair)
        corr[kept.index(i), kept.index(j)] = corr[kept.index(j), kept.index(i)] = p.rho_used
        pairs.append(p)
    progress(1.0, "measured")
    return DPCopulaModel(
        dataset=policy.dataset,
        rows_per_unit=k,
        epsilon=allocation.epsilon,
        delta=allocation.delta_spent,
        allocation=allocation.to_json(),
        marginals=marginals,
        pairs=pairs,
        correlation=nearest_correlation(corr).tolist(),
        unit_column=allocation.schema.unit_column,
        dropped=dropped,
        notes=notes,
    )

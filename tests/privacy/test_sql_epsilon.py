"""Empirical ε audit of each DP SQL mechanism and of a synthetic proxy's marginal, on neighbouring datasets.

D′ is an ordinary dataset; D is D′ plus one worst-case privacy unit: 3k raw rows (k = max_rows_per_unit), of which
the pre-bounded table keeps k, every value beyond the policy's bounds (so it is clamped to the bound of largest
magnitude, the negative one for `amount`), all in a rare group key that D′ does not have (`kind = 'e'`), in k
different groups of `slot`, and in the undeclared key `tag = 'edge'` that D′ has just k rows below the key-selection
threshold. Both datasets are registered through the real catalog, with the same bounding key, so they differ by
exactly that unit.

For each mechanism the test plans a real query with the planner and prices it with `gateway.sql.price.price`, then
runs the executor once on D and once on D′ with the mechanism layer wrapped by a recorder: what it records is
exactly what the executor hands to OpenDP (the exact integer vectors, a quantile's exact position counts or key
counts, with the d_in and ε it calibrated). Those inputs are then fed many times to the real mechanism functions
(`policies.mechanisms.release_integers`, `select_keys`, `release_quantile` and its stages), so the audit follows the
code's sensitivities and ε split instead of re-deriving them.

The release cache plays no part: the cache belongs to the service layer, and this audit calls the executor and the
mechanism layer directly, below it; every draw is a fresh OpenDP sample. To keep the audit fast, integer releases
are drawn many at a time: one `release_integers` call on n concatenated copies of an exact vector adds independent
noise of the same scale to every coordinate, so each copy is distributed exactly like one release of the vector.
Key selection is batched the same way (the Laplace threshold noises and thresholds every key independently), by
giving one call many copies of the audited key. Quantile selections are drawn one call each.

Each audit first checks the recorded inputs directly (same calibration and shape on D and D′, and an L1 or L∞
distance between the exact inputs within the d_in the code calibrated for), then fixes an event from the exact
values and the calibration before drawing (a tail event beyond D's exact value on every coordinate that differs; for
the quantile, the set of candidates that the exact output distributions say is most telling) and asserts that the
Clopper–Pearson lower bound on ε, at 99%, does not exceed the claimed ε: per measurement, and for the whole request
where a request has several measurements (δ is taken off where the mechanism claims one). Each ε audit has a control
that releases with half the calibrated noise scale (twice the ε: the effect of a factor-2 sensitivity error) and
asserts that the bound then does exceed the claimed ε, which shows that the audit can fail. For key selection the
control's key counts sit at that calibration's own threshold, the worst case for it.

Gaussian releases (zCDP accounting) are audited at the (ε, δ) that OpenDP converts their ρ to at one fixed δ, with
the event on the sum of the differing coordinates beyond D's exact values (the likelihood ratio's direction) and
its offset fixed from the exact discrete Gaussian distributions; their control has half the scale (4ρ). The Gaussian
threshold of key selection under zCDP is audited the same way, on the event that the key is released, and so are
the counts it releases as a private-key COUNT(*) (one release at the request's whole ρ), on the event that the key
is released with a count beyond an offset above D's.

Each bound holds with probability 99% when the mechanism is as private as claimed; because the confidence is split
between the two sides, a correct mechanism fails an audit far less often than 1 time in 100.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import pytest

from gateway.engines.duckdb import DuckDBEngine
from gateway.sql import release
from gateway.sql.plan import Measurement, Plan, plan_query
from gateway.sql.price import Pricing, price
from gateway.sql.release import execute
from policies import mechanisms as mech
from policies.accountant import Accounting, zcdp_epsilon
from policies.schema import Policy, parse_policy
from tests.privacy.epsilon import best_event, clopper_pearson_lower, epsilon_lower_bound, tail_event

K = 4
CONFIDENCE = 0.99
N_DRAWS = 20_000  # per side, for scalar and short-vector releases
N_VECTOR_DRAWS = 10_000  # per side, for the 12-group release
N_QUANTILE_DRAWS = 10_000  # per side; one OpenDP call per draw (three for a whole quantile release)
N_PILOT = 2_000  # per side: draws of a whole quantile release, once to choose the event of its audit, once for it
KEY_BATCH = 1_000  # copies of the audited key per select_keys call

POLICY = parse_policy(
    {
        "dataset": "audit",
        "privacy_unit": "uid",
        "max_rows_per_unit": K,
        "budget": {"per_principal": {"epsilon": 100.0, "delta": 1e-6}, "total": {"epsilon": 100.0, "delta": 1e-5}},
        "columns": {
            "uid": {"type": "int", "usage": "hidden"},
            "kind": {"type": "category", "domain": ["a", "b", "c", "d", "e"]},
            "slot": {"type": "int", "bounds": [0, 3 * K - 1]},
            "tag": {"type": "category"},
            "amount": {"type": "decimal", "bounds": [-100, 50], "precision": 0.01},
            "score": {"type": "int", "bounds": [0, 20]},
        },
        "roles": {"analyst": ["query", "synth"]},
    }
)

synth_measure = importlib.import_module("synth.measure")  # the package re-exports a function of that name

TAG_SQL = "SELECT tag, COUNT(*) FROM audit GROUP BY tag"
TAG_EPSILON = 1.0


def _resolve(name: str) -> Policy:
    assert name == POLICY.dataset
    return POLICY


def _per(pricing: Pricing) -> float:
    """The one ε every measurement of an equal split gets."""
    per = pricing.epsilon_per_measurement
    assert per is not None
    return per


def _priced(
    sql: str, epsilon: float, delta: float | None = None, quantile_interval: bool = True
) -> tuple[Plan, Pricing]:
    plan = plan_query(sql, _resolve)
    return plan, price(
        plan, epsilon=epsilon, accuracy=None, alpha=0.05, delta=delta, quantile_interval=quantile_interval
    )


# --- neighbouring datasets --------------------------------------------------------------------------------------


def _edge_threshold() -> int:
    """The key-selection threshold the executor uses for TAG_SQL (public: from the policy and the request)."""
    _, pricing = _priced(TAG_SQL, TAG_EPSILON)
    return mech.threshold_for(K, pricing.selection_epsilon, pricing.selection_delta)[1]


def _d_prime_rows(threshold: int) -> pd.DataFrame:
    rng = np.random.default_rng(20240611)
    units: list[int] = []
    tags: list[str] = []
    edge_rows = threshold - K  # D′ has the undeclared key just k rows below the threshold
    uid = 0
    while edge_rows > 0:
        n = min(K, edge_rows)
        units += [uid] * n
        tags += ["edge"] * n
        edge_rows -= n
        uid += 1
    for _ in range(30):
        units += [uid] * 3
        tags += ["common"] * 3
        uid += 1
    n = len(units)
    ordinary = pd.DataFrame(
        {
            "uid": units,
            "kind": rng.choice(["a", "b", "c", "d"], n),
            "slot": rng.integers(0, 3 * K, n),
            "tag": tags,
            "amount": np.round(rng.uniform(-100, 50, n), 2),
            # Few rows with a score, spread out: the noisy median then has several likely candidates.
            "score": pd.array(
                np.where(np.arange(n) % 4 == 0, np.clip(np.round(rng.normal(8, 4, n)), 0, 20), np.nan), dtype="Int64"
            ),
        }
    )
    # A heavy unit with identical rows, in both datasets: bounding keeps k of them whatever the hash picks.
    heavy = pd.DataFrame(
        {"uid": 5000, "kind": "a", "slot": 0, "tag": "common", "amount": 10.0, "score": 10}, index=range(400)
    )
    return pd.concat([ordinary, heavy], ignore_index=True)


def _worst_unit_rows() -> pd.DataFrame:
    n = 3 * K
    return pd.DataFrame(
        {
            "uid": 999,
            "kind": "e",
            "slot": range(n),
            "tag": "edge",
            "amount": -1.0e6,  # clamped to -100, the bound of largest magnitude
            "score": 1000,  # clamped to 20, the top of the quantile grid
        },
        index=range(n),
    )


@dataclass(frozen=True)
class Neighbours:
    d: DuckDBEngine  # with the worst-case unit
    d_prime: DuckDBEngine
    threshold: int


@pytest.fixture(scope="module")
def neighbours(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Neighbours]:
    root = tmp_path_factory.mktemp("neighbours")
    threshold = _edge_threshold()
    d_prime_rows = _d_prime_rows(threshold)
    d_rows = pd.concat([d_prime_rows, _worst_unit_rows()], ignore_index=True)  # appended: other rows keep positions
    catalogs = []
    for name, rows in (("d", d_rows), ("d_prime", d_prime_rows)):
        rows.to_csv(root / f"{name}.csv", index=False)
        cat = DuckDBEngine(root / f"{name}.duckdb", root / "bounding.key", read_only=False)
        cat.register(POLICY, root / f"{name}.csv")
        catalogs.append(cat)
    yield Neighbours(catalogs[0], catalogs[1], threshold)
    for cat in catalogs:
        cat.close()


# --- what the executor hands to the mechanism layer -------------------------------------------------------------


@dataclass
class MechanismInputs:
    """The arguments of every mechanism call, by parameter name, as the executor passed them."""

    integers: list[dict[str, Any]] = field(default_factory=list)
    selections: list[dict[str, Any]] = field(default_factory=list)
    quantiles: list[dict[str, Any]] = field(default_factory=list)  # stages 1 and 2 (release_quantile_interval)
    points: list[dict[str, Any]] = field(default_factory=list)  # stage 3 (release_quantile_point)
    values: list[dict[str, Any]] = field(default_factory=list)  # value-only quantiles (release_quantile_value)
    gaussians: list[dict[str, Any]] = field(default_factory=list)


def _recording(target: list[Any], real: Callable[..., Any]) -> Callable[..., Any]:
    """`real`, recording a copy of the arguments it was given (by parameter name) at every call."""
    signature = inspect.signature(real)

    def record(*args: Any, **kwargs: Any) -> Any:
        given = signature.bind(*args, **kwargs).arguments
        target.append(
            {
                name: list(a) if isinstance(a, list) else dict(a) if isinstance(a, dict) else a
                for name, a in given.items()
            }
        )
        return real(*args, **kwargs)

    return record


def mechanism_inputs(plan: Plan, pricing: Pricing, catalog: DuckDBEngine) -> MechanismInputs:
    """Run the executor once and record the exact inputs and calibration of every mechanism call it makes."""
    inputs = MechanismInputs()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(mech, "release_integers", _recording(inputs.integers, mech.release_integers))
        mp.setattr(mech, "release_gaussian_integers", _recording(inputs.gaussians, mech.release_gaussian_integers))
        mp.setattr(mech, "select_keys", _recording(inputs.selections, mech.select_keys))
        mp.setattr(mech, "release_quantile_interval", _recording(inputs.quantiles, mech.release_quantile_interval))
        mp.setattr(mech, "release_quantile_point", _recording(inputs.points, mech.release_quantile_point))
        mp.setattr(mech, "release_quantile_value", _recording(inputs.values, mech.release_quantile_value))
        execute(plan, pricing, catalog)
    return inputs


def _audited(
    neighbours: Neighbours, sql: str, epsilon: float, quantile_interval: bool = True
) -> tuple[Plan, Pricing, MechanismInputs, MechanismInputs]:
    plan, pricing = _priced(sql, epsilon, quantile_interval=quantile_interval)
    on_d = mechanism_inputs(plan, pricing, neighbours.d)
    on_d_prime = mechanism_inputs(plan, pricing, neighbours.d_prime)
    return plan, pricing, on_d, on_d_prime


def _integer_inputs(
    plan: Plan, pricing: Pricing, on_d: MechanismInputs, on_d_prime: MechanismInputs
) -> dict[Measurement, tuple[list[int], list[int], int, float]]:
    """Per non-quantile measurement (the executor's order): exact vectors on D and D′, d_in and ε."""
    plain = [m for m in plan.measurements if m.kind != "quantile"]
    assert len(on_d.integers) == len(on_d_prime.integers) == len(plain)
    out = {}
    for m, call_d, call_d_prime in zip(plain, on_d.integers, on_d_prime.integers, strict=True):
        va, d_in, eps = call_d["values"], call_d["d_in"], call_d["epsilon"]
        vb, d_in_b, eps_b = call_d_prime["values"], call_d_prime["d_in"], call_d_prime["epsilon"]
        assert (d_in, eps) == (d_in_b, eps_b) == (pricing.d_in[m], _per(pricing))
        assert len(va) == len(vb)  # the shape of a release is public
        assert sum(abs(a - b) for a, b in zip(va, vb, strict=True)) <= d_in  # L1 distance within the sensitivity
        out[m] = (va, vb, d_in, eps)
    return out


# --- drawing ----------------------------------------------------------------------------------------------------


def draw_integers(values: list[int], d_in: int, epsilon: float, n: int) -> np.ndarray:
    """n independent releases (rows) of `values` through release_integers, in one OpenDP call."""
    release = mech.release_integers(list(values) * n, d_in, epsilon)
    return np.asarray(release.values, dtype=np.int64).reshape(n, len(values))


def integer_hits(
    exact_d: list[int], exact_d_prime: list[int], d_in: int, epsilon: float, n: int
) -> tuple[np.ndarray, np.ndarray]:
    """Per draw on D and on D′, whether the release is in the tail event fixed by the two exact vectors."""
    on_d = draw_integers(exact_d, d_in, epsilon, n)
    on_d_prime = draw_integers(exact_d_prime, d_in, epsilon, n)
    return tail_event(on_d, exact_d, exact_d_prime), tail_event(on_d_prime, exact_d, exact_d_prime)


def bound(hits_d: np.ndarray, hits_d_prime: np.ndarray, delta: float = 0.0) -> float:
    return epsilon_lower_bound(
        int(hits_d.sum()), len(hits_d), int(hits_d_prime.sum()), len(hits_d_prime), CONFIDENCE, delta=delta
    )


def audit_single_measurement(
    neighbours: Neighbours, sql: str, epsilon: float, n: int = N_DRAWS
) -> tuple[Pricing, float, float]:
    """Lower bounds on ε of a one-measurement query, calibrated as the executor does and with half its scale."""
    plan, pricing, on_d, on_d_prime = _audited(neighbours, sql, epsilon)
    ((va, vb, d_in, eps),) = _integer_inputs(plan, pricing, on_d, on_d_prime).values()
    assert pricing.cost.epsilon == pytest.approx(eps)  # one measurement: it carries the whole request's ε
    calibrated = bound(*integer_hits(va, vb, d_in, eps, n))
    control = bound(*integer_hits(va, vb, d_in, 2 * eps, n))
    return pricing, calibrated, control


# --- the audits -------------------------------------------------------------------------------------------------


def test_count_star(neighbours: Neighbours) -> None:
    pricing, calibrated, control = audit_single_measurement(neighbours, "SELECT COUNT(*) FROM audit", 1.0)
    assert set(pricing.d_in.values()) == {K}
    assert calibrated <= _per(pricing), calibrated
    assert control > _per(pricing), control


def test_count_distinct_unit_ungrouped(neighbours: Neighbours) -> None:
    pricing, calibrated, control = audit_single_measurement(neighbours, "SELECT COUNT(DISTINCT uid) FROM audit", 1.0)
    assert set(pricing.d_in.values()) == {1}  # one unit is one more distinct unit
    assert calibrated <= _per(pricing), calibrated
    assert control > _per(pricing), control


def test_count_distinct_unit_grouped(neighbours: Neighbours) -> None:
    """The worst unit is one more distinct unit in each of k groups: the joint event over those k groups."""
    sql = "SELECT slot, COUNT(DISTINCT uid) FROM audit GROUP BY slot"
    pricing, calibrated, control = audit_single_measurement(neighbours, sql, 1.0, N_VECTOR_DRAWS)
    assert set(pricing.d_in.values()) == {K}
    assert calibrated <= _per(pricing), calibrated
    assert control > _per(pricing), control


def test_count_distinct_column_grouped(neighbours: Neighbours) -> None:
    """COUNT(DISTINCT col) of a column other than the unit, priced as a count (k): the worst unit brings the value
    'e' that nobody else has into each of its k groups of `slot`, one more distinct value in each, L1 = k."""
    sql = "SELECT slot, COUNT(DISTINCT kind) FROM audit GROUP BY slot"
    pricing, calibrated, control = audit_single_measurement(neighbours, sql, 1.0, N_VECTOR_DRAWS)
    assert set(pricing.d_in.values()) == {K}
    assert calibrated <= _per(pricing), calibrated
    assert control > _per(pricing), control


def test_sum_with_negative_lower_bound(neighbours: Neighbours) -> None:
    """k rows at -100 with bounds [-100, 50]: the sensitivity must follow the bound of largest magnitude."""
    pricing, calibrated, control = audit_single_measurement(neighbours, "SELECT SUM(amount) FROM audit", 1.0)
    assert calibrated <= _per(pricing), calibrated
    assert control > _per(pricing), control


def test_sum_of_a_case_expression(neighbours: Neighbours) -> None:
    """SUM(CASE WHEN kind = 'e' THEN amount ELSE 0 END): the expression's range is the hull of its branches,
    [-100, 50], so each row counts at most 100 (in units of 2**-24); the worst unit's k rows are all of kind 'e' at
    -100, which D′ has none of: the L1 distance is the sensitivity exactly."""
    sql = "SELECT SUM(CASE WHEN kind = 'e' THEN amount ELSE 0 END) FROM audit"
    plan, _ = _priced(sql, 1.0)
    (value,) = plan.row_values.values()
    assert (value.lo, value.hi, value.unit) == (-100.0, 50.0, 2.0**-24)
    pricing, calibrated, control = audit_single_measurement(neighbours, sql, 1.0)
    assert set(pricing.d_in.values()) == {K * 100 * 2**24}
    assert calibrated <= _per(pricing), calibrated
    assert control > _per(pricing), control


def test_sum_of_arithmetic(neighbours: Neighbours) -> None:
    """SUM(amount * 2 - 1): range [-201, 99] from the bounds; the worst unit's k rows sit at -201."""
    sql = "SELECT SUM(amount * 2 - 1) FROM audit"
    pricing, calibrated, control = audit_single_measurement(neighbours, sql, 1.0)
    assert set(pricing.d_in.values()) == {K * 201 * 2**23}
    assert calibrated <= _per(pricing), calibrated
    assert control > _per(pricing), control


def test_count_of_an_expression(neighbours: Neighbours) -> None:
    """COUNT(CASE WHEN kind = 'e' THEN 1 END) counts the worst unit's k rows, which D′ does not have."""
    sql = "SELECT COUNT(CASE WHEN kind = 'e' THEN 1 END) FROM audit"
    pricing, calibrated, control = audit_single_measurement(neighbours, sql, 1.0)
    assert set(pricing.d_in.values()) == {K}
    assert calibrated <= _per(pricing), calibrated
    assert control > _per(pricing), control


def test_avg_of_an_expression(neighbours: Neighbours) -> None:
    """AVG(amount * 2 - 1) is the SUM and the COUNT of the expression."""
    audit_composed(neighbours, "SELECT AVG(amount * 2 - 1) FROM audit", 2.0, {"sum", "count"})


def test_declared_group_by(neighbours: Neighbours) -> None:
    """A vector release over the public domain of `kind`; the worst unit is all in 'e', empty on D′."""
    sql = "SELECT kind, COUNT(*) FROM audit GROUP BY kind"
    plan, pricing, on_d, on_d_prime = _audited(neighbours, sql, 1.0)
    assert not plan.needs_key_selection
    ((va, vb, d_in, eps),) = _integer_inputs(plan, pricing, on_d, on_d_prime).values()
    assert len(va) == len(POLICY.columns["kind"].domain or []) and vb[-1] == 0
    calibrated = bound(*integer_hits(va, vb, d_in, eps, N_DRAWS))
    assert calibrated <= pricing.cost.epsilon, calibrated
    control = bound(*integer_hits(va, vb, d_in, 2 * eps, N_DRAWS))
    assert control > pricing.cost.epsilon, control


def test_listed_public_groups(neighbours: Neighbours) -> None:
    """Keys the query lists (ZetaSQL's public-groups join) over `tag`, which has no public domain: a vector release
    over exactly the listed keys, 'absent' empty on both sides, no key selection and no δ; the worst unit is all in
    'edge' (k more rows there on D), and the rows of unlisted tags are filtered out before the release."""
    sql = (
        "SELECT g.t, COUNT(*) FROM audit RIGHT OUTER JOIN "
        "(SELECT DISTINCT t FROM UNNEST(['edge', 'common', 'absent']) AS t) g ON tag = g.t GROUP BY g.t"
    )
    plan, pricing, on_d, on_d_prime = _audited(neighbours, sql, 1.0)
    assert not plan.needs_key_selection and plan.declared_groups() == [("absent",), ("common",), ("edge",)]
    assert pricing.cost.delta == 0.0 and not on_d.selections and not on_d_prime.selections
    ((va, vb, d_in, eps),) = _integer_inputs(plan, pricing, on_d, on_d_prime).values()
    assert va[0] == vb[0] == 0 and va[2] - vb[2] == K and va[1] == vb[1] > 0
    calibrated = bound(*integer_hits(va, vb, d_in, eps, N_DRAWS))
    assert calibrated <= pricing.cost.epsilon, calibrated
    control = bound(*integer_hits(va, vb, d_in, 2 * eps, N_DRAWS))
    assert control > pricing.cost.epsilon, control


def audit_composed(neighbours: Neighbours, sql: str, epsilon: float, kinds: set[str]) -> None:
    """A request of several measurements, each with an equal share of ε: each on its own, then the joint event
    of all of them against the request's ε, calibrated and with half the scale."""
    plan, pricing, on_d, on_d_prime = _audited(neighbours, sql, epsilon)
    inputs = _integer_inputs(plan, pricing, on_d, on_d_prime)
    assert {m.kind for m in inputs} == kinds
    per = _per(pricing)
    assert per == pytest.approx(pricing.cost.epsilon / len(kinds))
    hits = {m: integer_hits(va, vb, d_in, eps, N_DRAWS) for m, (va, vb, d_in, eps) in inputs.items()}
    for m, (hits_d, hits_d_prime) in hits.items():
        each = bound(hits_d, hits_d_prime)
        assert each <= per, (m.label, each)
    joint = bound(*(np.logical_and.reduce([h[side] for h in hits.values()]) for side in (0, 1)))
    assert joint <= pricing.cost.epsilon, joint
    halved = [integer_hits(va, vb, d_in, 2 * eps, N_DRAWS) for va, vb, d_in, eps in inputs.values()]
    control = bound(*(np.logical_and.reduce([h[side] for h in halved]) for side in (0, 1)))
    assert control > pricing.cost.epsilon, control


def test_avg_two_measurements(neighbours: Neighbours) -> None:
    """AVG is SUM and COUNT(col); the worst unit moves the sum down by k·100 and the count up by k."""
    audit_composed(neighbours, "SELECT AVG(amount) FROM audit", 2.0, {"sum", "count"})


def test_per_unit_count_histogram(neighbours: Neighbours) -> None:
    """`SELECT n, COUNT(*) FROM (SELECT uid, COUNT(*) AS n ... GROUP BY uid) GROUP BY n`: every n in 1..k is a
    public key; the worst unit is one more unit at n = k (its 3k rows bounded to k), so the derived table moves by
    one row and the release is calibrated for one row per unit."""
    sql = "SELECT n, COUNT(*) FROM (SELECT uid, COUNT(*) AS n FROM audit GROUP BY uid) GROUP BY n"
    plan, pricing, on_d, on_d_prime = _audited(neighbours, sql, 1.0)
    assert not plan.needs_key_selection and pricing.cost.delta == 0
    ((va, vb, d_in, eps),) = _integer_inputs(plan, pricing, on_d, on_d_prime).values()
    assert d_in == 1 and len(va) == K
    assert [a - b for a, b in zip(va, vb, strict=True)] == [0] * (K - 1) + [1]
    calibrated = bound(*integer_hits(va, vb, d_in, eps, N_DRAWS))
    assert calibrated <= pricing.cost.epsilon, calibrated
    control = bound(*integer_hits(va, vb, d_in, 2 * eps, N_DRAWS))
    assert control > pricing.cost.epsilon, control


def test_per_unit_mean_of_sums(neighbours: Neighbours) -> None:
    """AVG of a per-unit SUM(amount), in [-100k, 50k]: the worst unit's k rows at -100 are one derived row at
    -100k, which moves the sum by k·100 and the count by one."""
    sql = "SELECT AVG(s) FROM (SELECT uid, SUM(amount) AS s FROM audit GROUP BY uid)"
    audit_composed(neighbours, sql, 2.0, {"sum", "count"})


def test_variance_three_measurements(neighbours: Neighbours) -> None:
    """VARIANCE adds the sum of squares (k rows at -100: k·100² up) to SUM and COUNT(col)."""
    audit_composed(neighbours, "SELECT VARIANCE(amount) FROM audit", 3.0, {"sumsq", "sum", "count"})


def _noisy_min_probabilities(scores: list[int], scale: float, grid: int = 200_001) -> np.ndarray:
    """Exact output distribution of OpenDP's noisy min (permute-and-flip: exponential noise of `scale`).

    Candidate i wins when -score_i + E_i is the largest, E_j ~ Exp(scale) independent; P(i) is the integral of
    the density of -score_i + E_i times the distribution functions of all the others. Candidates of equal score
    win equally often, so the integral is taken once per distinct score (with the others' distribution functions
    raised to their multiplicities). Used only to choose events.
    """
    u, inverse, multiplicity = np.unique(-np.asarray(scores, dtype=np.float64), return_inverse=True, return_counts=True)
    t = np.linspace(u.min(), u.max() + 50 * scale, grid)
    below = t[None, :] - u[:, None]
    cdf = np.where(below >= 0, -np.expm1(-np.maximum(below, 0) / scale), 0.0)
    density = np.where(below >= 0, np.exp(-np.maximum(below, 0) / scale) / scale, 0.0)
    powered = cdf ** multiplicity[:, None]
    each = np.array(
        [
            np.trapezoid(
                density[i] * cdf[i] ** (multiplicity[i] - 1) * np.prod(np.delete(powered, i, axis=0), axis=0), t
            )
            for i in range(len(u))
        ]
    )
    probs = each[inverse]
    return probs / probs.sum()


def _quantile_hits(scores: list[int], d_in: int, epsilon: float, event: set[int], n: int) -> np.ndarray:
    return np.fromiter(
        (mech.release_quantile_index(scores, d_in, epsilon)[0] in event for _ in range(n)), dtype=bool, count=n
    )


def _noisy_min_bound(scores_d: list[int], scores_d_prime: list[int], d_in: int, epsilon: float) -> float:
    """Lower bound on ε of report-noisy-min as calibrated for `epsilon`, in the event that the exact output
    distributions say is most telling. ε-DP bounds the ratio both ways, so the event may favour either dataset:
    the direction is the one whose chosen event has the larger exact ratio (fixed before any draw)."""
    scale = 2 * d_in / epsilon  # how release_quantile_index calibrates (public)
    p_d, p_d_prime = _noisy_min_probabilities(scores_d, scale), _noisy_min_probabilities(scores_d_prime, scale)
    ways: list[tuple[float, set[int], list[int], list[int]]] = []
    for (pa, sa), (pb, sb) in (
        ((p_d, scores_d), (p_d_prime, scores_d_prime)),
        ((p_d_prime, scores_d_prime), (p_d, scores_d)),
    ):
        chosen = best_event(pa, pb, N_QUANTILE_DRAWS, N_QUANTILE_DRAWS, CONFIDENCE)
        ways.append((float(np.log(pa[chosen].sum() / pb[chosen].sum())), set(chosen), sa, sb))
    _, event, scores_a, scores_b = max(ways, key=lambda way: way[0])
    return bound(
        _quantile_hits(scores_a, d_in, epsilon, event, N_QUANTILE_DRAWS),
        _quantile_hits(scores_b, d_in, epsilon, event, N_QUANTILE_DRAWS),
    )


def _assert_tight_control(scores: list[int], d_in: int) -> None:
    """Report-noisy-min calibrated for ε = 1 holds, and with half its noise is caught, on the score vectors at L∞
    distance d_in where its analysis is tight: one position d_in better and every other d_in worse, the position
    one that is rarely chosen (~2% at half the noise), so that its probability can grow by e^ε."""
    half_noise = _noisy_min_probabilities(scores, d_in)  # scale 2·d_in/ε at the control's ε = 2
    target = int(np.argmin(np.abs(half_noise - 0.02)))
    worst = [v - d_in if i == target else v + d_in for i, v in enumerate(scores)]
    assert _noisy_min_bound(worst, scores, d_in, 1.0) <= 1.0
    assert _noisy_min_bound(worst, scores, d_in, 2.0) > 1.0


def _ladder_bins(counts: mech.PositionCounts, cuts: np.ndarray) -> list[int]:
    """The exact bin counts of a ladder, as release_quantile computes them."""
    below = counts.below(2 * cuts + 1)
    return np.diff(np.concatenate([[0], below, [counts.total]])).tolist()


def _released_values(
    call: dict[str, Any], fine: Callable[[mech.QuantileGrid], mech.PositionCounts], n: int
) -> np.ndarray:
    return np.asarray([mech.release_quantile(**call, fine=fine).value for _ in range(n)])


def _second_pass(plan: Plan, catalog: DuckDBEngine) -> Callable[[mech.QuantileGrid], mech.PositionCounts]:
    """The executor's second pass of the plan's one ungrouped quantile on `catalog`, at any grid (memoised: the
    grids a release can ask for are few, and the counts at one grid never change)."""
    (m,) = plan.measurements
    seen: dict[mech.QuantileGrid, mech.PositionCounts] = {}

    def fine(grid: mech.QuantileGrid) -> mech.PositionCounts:
        if grid not in seen:
            seen[grid] = release._fine_counts(plan, m, catalog, [((), grid)])[()]
        return seen[grid]

    return fine


def test_quantile(neighbours: Neighbours) -> None:
    """A quantile's three measurements (centre, interval ladder, point); the worst unit adds k rows at the top of
    the grid. Each stage's input moves by at most its calibrated sensitivity wherever the earlier stages may have
    landed; each stage's mechanism, as calibrated for ε = 1, is audited against 1 with a control at half its scale;
    the shares sum to the request's ε; and the whole release (its value, the second pass run on each dataset at the
    interval each draw released) is audited against the request's ε."""
    plan, pricing, on_d, on_d_prime = _audited(neighbours, "SELECT MEDIAN(score) FROM audit", 1.0)
    ((call_d,), (call_d_prime,)) = on_d.quantiles, on_d_prime.quantiles
    ((point_d,), (point_d_prime,)) = on_d.points, on_d_prime.points
    counts_d, counts_d_prime = call_d["counts"], call_d_prime["counts"]
    calibration = {name: v for name, v in call_d.items() if name != "counts"}
    assert calibration == {name: v for name, v in call_d_prime.items() if name != "counts"}  # public
    (m,) = plan.measurements
    grid, q, d_in, k = calibration["grid"], calibration["q"], calibration["d_in"], calibration["k"]
    assert (d_in, k, calibration["epsilon"]) == (pricing.d_in[m], K, _per(pricing))
    assert (point_d["d_in"], point_d["epsilon"], point_d["alpha"]) == (d_in, calibration["epsilon"], pricing.alpha)
    assert (point_d_prime["d_in"], point_d_prime["epsilon"]) == (d_in, calibration["epsilon"])
    assert sum(mech.quantile_epsilons(calibration["epsilon"])) == pytest.approx(pricing.cost.epsilon)

    # Sensitivities: rank scores of every position (L∞), the ladder's bins around every possible centre (L1).
    every = np.arange(grid.size)
    scores_d, scores_d_prime = (mech.position_scores(c, every, q) for c in (counts_d, counts_d_prime))
    assert max(abs(a - b) for a, b in zip(scores_d, scores_d_prime, strict=True)) <= d_in
    ladders = {int(c): mech.ladder(int(c), grid.size) for c in every}
    distance = {
        c: sum(
            abs(a - b) for a, b in zip(_ladder_bins(counts_d, cuts), _ladder_bins(counts_d_prime, cuts), strict=True)
        )
        for c, cuts in ladders.items()
    }
    assert max(distance.values()) <= k

    # Centre: report-noisy-min over the coarse positions.
    coarse = grid.coarse()
    centre_d, centre_d_prime = (mech.position_scores(c, coarse, q) for c in (counts_d, counts_d_prime))
    assert _noisy_min_bound(centre_d, centre_d_prime, d_in, 1.0) <= 1.0
    # Control. The worst unit moves most coarse scores by the same amount, which report-noisy-min cannot see, so on
    # these neighbours even half the noise is not caught reliably. The control uses the score vector at L∞ distance
    # d_in where the mechanism's analysis is tight: one position d_in better and every other d_in worse (a position
    # that is rarely chosen, so that its probability can grow by e^ε). The calibrated mechanism holds there and the
    # one with half its noise is caught.
    _assert_tight_control(centre_d, d_in)
    # Interval: the ladder around the centre where the two datasets' bins differ most.
    cuts = ladders[max(distance, key=lambda c: distance[c])]
    bins_d, bins_d_prime = _ladder_bins(counts_d, cuts), _ladder_bins(counts_d_prime, cuts)
    assert bound(*integer_hits(bins_d, bins_d_prime, k, 1.0, N_DRAWS)) <= 1.0
    assert bound(*integer_hits(bins_d, bins_d_prime, k, 2.0, N_DRAWS)) > 1.0
    # Point: report-noisy-min over the positions of a second pass, counted by the executor's own statement on each
    # dataset: 1,024 positions (most between two integers, where no row is) spread over an interval around the
    # median (where the worst unit's rows move some scores up and others down; a window on one side only would see
    # every score move alike), and the executor's own grid of the interval it released.
    window = mech.QuantileGrid(grid.lo + 4, 12 / (mech.QUANTILE_POINT_CANDIDATES - 1), mech.QUANTILE_POINT_CANDIDATES)
    fine_d, fine_d_prime = _second_pass(plan, neighbours.d), _second_pass(plan, neighbours.d_prime)
    positions = np.arange(window.size)
    for points in (window, point_d["release"].fine_grid(pricing.alpha)):
        on = np.arange(points.size)
        a, b = (mech.position_scores(f(points), on, q) for f in (fine_d, fine_d_prime))
        assert max(abs(x - y) for x, y in zip(a, b, strict=True)) <= d_in
    window_d, window_d_prime = (mech.position_scores(f(window), positions, q) for f in (fine_d, fine_d_prime))
    assert len(set(window_d)) > 2  # the window holds positions on both sides of the median, on and between values
    assert _noisy_min_bound(window_d, window_d_prime, d_in, 1.0) <= 1.0
    assert _noisy_min_bound(window_d, window_d_prime, d_in, 2.0) > 1.0

    # The whole release at the request's ε: the event (a set of released values) is chosen from pilot draws that
    # the bound does not use.
    whole_d = {**calibration, "counts": counts_d, "alpha": pricing.alpha}
    whole_d_prime = {**calibration, "counts": counts_d_prime, "alpha": pricing.alpha}
    pilot_d, pilot_d_prime = (
        _released_values(whole_d, fine_d, N_PILOT),
        _released_values(whole_d_prime, fine_d_prime, N_PILOT),
    )
    values = np.unique(np.concatenate([pilot_d, pilot_d_prime]))
    freq = [np.asarray([(p == v).mean() for v in values]) + 1e-9 for p in (pilot_d, pilot_d_prime)]
    event = values[best_event(freq[0], freq[1], N_PILOT, N_PILOT, CONFIDENCE)]
    whole = bound(
        np.isin(_released_values(whole_d, fine_d, N_PILOT), event),
        np.isin(_released_values(whole_d_prime, fine_d_prime, N_PILOT), event),
    )
    assert whole <= pricing.cost.epsilon, (whole, event)


def test_value_only_quantile(neighbours: Neighbours) -> None:
    """A value-only quantile (quantile_interval false) is one measurement: report-noisy-min at the request's whole ε
    over every integer of `score`'s bounds (public), from the exact counts of the executor's one pass on each
    dataset. Its scores move by at most d_in; the release (which is that one selection) is audited against the
    request's ε in the event that the exact output distributions say is most telling, and is caught with half its
    noise; no stage of the three-stage quantile runs."""
    plan, pricing, on_d, on_d_prime = _audited(neighbours, "SELECT MEDIAN(score) FROM audit", 1.0, False)
    assert not (on_d.quantiles or on_d.points or on_d_prime.quantiles or on_d_prime.points)
    ((call_d,), (call_d_prime,)) = on_d.values, on_d_prime.values
    calibration = {name: v for name, v in call_d.items() if name != "counts"}
    assert calibration == {name: v for name, v in call_d_prime.items() if name != "counts"}  # public
    (m,) = plan.measurements
    grid, q, d_in, epsilon = calibration["grid"], calibration["q"], calibration["d_in"], calibration["epsilon"]
    assert (d_in, epsilon) == (pricing.d_in[m], pricing.cost.epsilon) == (pricing.d_in[m], 1.0)  # all of it
    assert grid == mech.QuantileGrid(0.0, 1.0, 21, integer=True)  # every integer of the bounds [0, 20]
    every = np.arange(grid.size)
    scores_d, scores_d_prime = (mech.position_scores(c["counts"], every, q) for c in (call_d, call_d_prime))
    assert max(abs(a - b) for a, b in zip(scores_d, scores_d_prime, strict=True)) <= d_in
    assert len(set(scores_d)) > 2
    # The whole release, drawn through the executor's own function, in the event fixed before any draw from the
    # exact output distributions (either direction: the one with the larger exact ratio).
    scale = 2 * d_in / epsilon
    p_d, p_d_prime = _noisy_min_probabilities(scores_d, scale), _noisy_min_probabilities(scores_d_prime, scale)
    ways = []
    for (pa, a), (pb, b) in (((p_d, call_d), (p_d_prime, call_d_prime)), ((p_d_prime, call_d_prime), (p_d, call_d))):
        chosen = best_event(pa, pb, N_QUANTILE_DRAWS, N_QUANTILE_DRAWS, CONFIDENCE)
        ways.append((float(np.log(pa[chosen].sum() / pb[chosen].sum())), chosen, a, b))
    _, chosen, first, second = max(ways, key=lambda way: way[0])
    event = grid.value(np.asarray(chosen))

    def hits(call: dict[str, Any], eps: float) -> np.ndarray:
        args = {**call, "epsilon": eps}
        return np.isin([mech.release_quantile_value(**args).value for _ in range(N_QUANTILE_DRAWS)], event)

    assert bound(hits(first, epsilon), hits(second, epsilon)) <= pricing.cost.epsilon
    _assert_tight_control(scores_d, d_in)


def _key_draws(
    counts: dict[str, int],
    label: str,
    k: int,
    epsilon: float,
    delta: float,
    n: int,
    options: dict[str, Any] | None = None,
) -> np.ndarray:
    """Per draw, the key `label`'s released count, or -1 where it is not released; n draws as n copies of it among
    the other keys."""
    others = {key: v for key, v in counts.items() if key != label}
    released: list[int] = []
    while len(released) < n:
        batch = min(KEY_BATCH, n - len(released))
        copies = {f"audited-{i}": counts[label] for i in range(batch)}
        selection = mech.select_keys({**others, **copies}, k, epsilon, delta, **(options or {}))
        released += [int(selection.kept.get(key, -1)) for key in copies]
    return np.asarray(released, dtype=np.int64)


def _key_released(
    counts: dict[str, int],
    label: str,
    k: int,
    epsilon: float,
    delta: float,
    n: int,
    options: dict[str, Any] | None = None,
) -> np.ndarray:
    """Per draw, whether the key `label` is released."""
    return _key_draws(counts, label, k, epsilon, delta, n, options) >= 0


def test_key_selection(neighbours: Neighbours) -> None:
    """A key without a public domain: on D it has exactly the threshold's count, on D′ k rows fewer.

    With COUNT(*) in the query, the selection's own noisy counts are the released counts (one measurement at the
    whole ε): the event 'the key is released' and the event 'released with a count at least D's' both test it.
    """
    plan, pricing, on_d, on_d_prime = _audited(neighbours, TAG_SQL, TAG_EPSILON)
    assert plan.needs_key_selection and pricing.counts_from_selection
    ((call_d,), (call_d_prime,)) = on_d.selections, on_d_prime.selections
    counts_d, counts_d_prime = call_d.pop("counts"), call_d_prime.pop("counts")
    assert call_d == call_d_prime  # the calibration is public: the same on both
    k, eps_sel, delta = call_d.pop("k"), call_d.pop("epsilon"), call_d.pop("delta")
    assert (k, eps_sel, delta) == (K, pricing.selection_epsilon, pricing.selection_delta)
    assert eps_sel == pricing.cost.epsilon  # no second share for a count
    assert not on_d.integers and not on_d_prime.integers  # and no second count measurement
    options = call_d  # further arguments the executor passes (e.g. the public candidate count), passed on as is
    t = neighbours.threshold
    (label_d,) = [key for key, v in counts_d.items() if v == t]
    (label_d_prime,) = [key for key, v in counts_d_prime.items() if v == t - K]

    draws_d = _key_draws(counts_d, label_d, k, eps_sel, delta, N_DRAWS, options)
    draws_d_prime = _key_draws(counts_d_prime, label_d_prime, k, eps_sel, delta, N_DRAWS, options)
    selection_only = bound(draws_d >= 0, draws_d_prime >= 0, delta)
    assert selection_only <= eps_sel, selection_only
    request = bound(draws_d >= t, draws_d_prime >= t, pricing.cost.delta)
    assert request <= pricing.cost.epsilon, request

    # Control: half the scale, with the audited key placed at that calibration's own threshold.
    _, t_half = mech.threshold_for(k, 2 * eps_sel, delta)
    at_d = {**counts_d, label_d: t_half}
    at_d_prime = {**counts_d_prime, label_d_prime: t_half - K}
    control = bound(
        _key_released(at_d, label_d, k, 2 * eps_sel, delta, N_DRAWS, options),
        _key_released(at_d_prime, label_d_prime, k, 2 * eps_sel, delta, N_DRAWS, options),
        delta,
    )
    assert control > eps_sel, control


def test_key_selection_delta() -> None:
    """A key that only the worst unit has (k rows on D, absent on D′) may be released with probability ≤ δ."""
    _, pricing = _priced(TAG_SQL, TAG_EPSILON, delta=0.02)  # a large δ, so that the probability is measurable
    eps_sel, delta = pricing.selection_epsilon, pricing.selection_delta
    released = _key_released({"common": 10_000, "solo": K}, "solo", K, eps_sel, delta, 4 * N_DRAWS)
    # On D′ the key is absent, so it is never released: P_D(released) ≤ e^ε · 0 + δ.
    lower = clopper_pearson_lower(int(released.sum()), len(released), CONFIDENCE)
    assert lower <= delta, (lower, delta)


def test_synth_marginal(neighbours: Neighbours) -> None:
    """The DP histogram of `kind` in a synthetic proxy: the worst unit adds k rows to the bin of 'e'.

    The claimed ε is the marginal's share from `synth.measure.allocate`, the code's own split of the request.
    """
    allocation = synth_measure.allocate(POLICY, epsilon=4.0)
    columns = allocation.schema.columns
    histograms = [c for c in columns if c.kind != "keys"]  # one release_integers call each, in column order
    (kind,) = [i for i, c in enumerate(histograms) if c.name == "kind"]
    recorded = []
    for catalog in (neighbours.d, neighbours.d_prime):
        calls: list[Any] = []
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(synth_measure, "release_integers", _recording(calls, mech.release_integers))
            synth_measure.measure(catalog, POLICY.bounded_table, POLICY, allocation)
        recorded.append(calls[kind])
    (va, d_in, eps), (vb, d_in_b, eps_b) = ((c["values"], c["d_in"], c["epsilon"]) for c in recorded)
    assert (d_in, eps) == (d_in_b, eps_b) and eps == pytest.approx(allocation.epsilon_marginal)
    assert len(va) == len(vb) == histograms[kind].size
    assert sum(abs(a - b) for a, b in zip(va, vb, strict=True)) <= d_in
    calibrated = bound(*integer_hits(va, vb, d_in, eps, N_DRAWS))
    assert calibrated <= allocation.epsilon_marginal, calibrated
    control = bound(*integer_hits(va, vb, d_in, 2 * eps, N_DRAWS))
    assert control > allocation.epsilon_marginal, control


# --- Gaussian releases (zCDP accounting) ------------------------------------------------------------------------

# A ρ-zCDP release is (ε(ρ, δ), δ)-DP for every δ (OpenDP's conversion); the audit tests the (ε, δ) at this δ, where
# 20,000 draws per side can tell the calibrated noise from half of it.
GAUSSIAN_AUDIT_DELTA = 1e-3


def _gaussian_tail_offset(scale: float, shifts: np.ndarray, n: int, delta: float) -> int:
    """The offset t of the event "Y ≥ t", Y the sum over the differing coordinates of how far each release lies
    beyond D's exact value (away from D′) — the direction of the likelihood ratio for equal shifts, so the most
    telling event — that the exact discrete Gaussian distributions say gives the largest expected lower bound on
    ε at δ (normal approximation of the Clopper–Pearson bounds). Fixed from public calibration and exact values
    before drawing. On D′, Y is shifted down by the sum of the shifts."""
    support = np.arange(-int(40 * scale) - 50, int(40 * scale) + 51)
    pmf = np.exp(-(support.astype(np.float64) ** 2) / (2 * scale * scale))
    pmf /= pmf.sum()
    total = pmf
    for _ in shifts[1:]:
        total = np.convolve(total, pmf)
    lowest = support[0] * len(shifts)
    tail = np.cumsum(total[::-1])[::-1]  # P[Y ≥ lowest + i]

    def at_least(v: int) -> float:
        return float(tail[v - lowest]) if v - lowest < len(tail) else 0.0

    shift = int(shifts.sum())
    z = 2.6
    best: tuple[float, int] = (-np.inf, 0)
    for t in range(-int(3 * scale), int(12 * scale * len(shifts)) + 2):
        pa, pb = at_least(t), at_least(t + shift)
        lower = pa - z * np.sqrt(pa * (1 - pa) / n) - delta
        upper = pb + z * np.sqrt(pb * (1 - pb) / n)
        if lower > 0 and upper > 0 and np.log(lower / upper) > best[0]:
            best = (float(np.log(lower / upper)), t)
    return best[1]


def _gaussian_bound(va: list[int], vb: list[int], d_in: float, rho: float, n: int) -> float:
    """Lower bound on ε at GAUSSIAN_AUDIT_DELTA from n releases through release_gaussian_integers on D and on D′."""
    a, b = np.asarray(va), np.asarray(vb)
    differ = np.flatnonzero(a != b)
    shifts = np.abs(a[differ] - b[differ])
    assert len(set(shifts.tolist())) == 1  # equal shifts: the sum is the likelihood ratio's direction
    t = _gaussian_tail_offset(mech.gaussian_scale_for(d_in, rho), shifts, n, GAUSSIAN_AUDIT_DELTA)
    away = np.where(a[differ] > b[differ], 1, -1)

    def hits(values: list[int]) -> np.ndarray:
        draws = np.asarray(mech.release_gaussian_integers(list(values) * n, d_in, rho).values).reshape(n, len(values))
        beyond = ((draws[:, differ] - a[differ]) * away).sum(axis=1)
        return np.asarray(beyond >= t)

    return bound(hits(va), hits(vb), delta=GAUSSIAN_AUDIT_DELTA)


def audit_gaussian(neighbours: Neighbours, sql: str, n: int = N_DRAWS) -> tuple[Pricing, float, float, float]:
    """A one-measurement query priced under zCDP: the claimed ε at GAUSSIAN_AUDIT_DELTA, and the lower bounds of
    the release as the executor calibrates it and with half its scale (4ρ)."""
    plan = plan_query(sql, _resolve)
    pricing = price(plan, epsilon=1.0, accuracy=None, alpha=0.05, delta=None, accounting=Accounting.ZCDP)
    (m,) = plan.measurements
    (call_d,), (call_d_prime,) = (
        mechanism_inputs(plan, pricing, neighbours.d).gaussians,
        mechanism_inputs(plan, pricing, neighbours.d_prime).gaussians,
    )
    va, d_in, rho = call_d["values"], call_d["d_in"], call_d["rho"]
    vb = call_d_prime["values"]
    assert (d_in, rho) == (call_d_prime["d_in"], call_d_prime["rho"]) == (pricing.l2[m], pricing.budget[m])
    assert pricing.cost.rho == pytest.approx(rho) == pytest.approx(0.5)  # ε = 1 under zCDP costs ρ = ε²/2
    assert len(va) == len(vb)
    assert float(np.linalg.norm(np.subtract(va, vb))) <= d_in + 1e-12  # L2 distance within the sensitivity
    claimed = zcdp_epsilon(rho, GAUSSIAN_AUDIT_DELTA)
    # The control gets four times the draws: at n its bound came within sampling error of the claim now and then
    # (a control must exceed the claim every time, or the suite is flaky).
    return pricing, claimed, _gaussian_bound(va, vb, d_in, rho, n), _gaussian_bound(va, vb, d_in, 4 * rho, 4 * n)


def test_gaussian_count_star(neighbours: Neighbours) -> None:
    pricing, claimed, calibrated, control = audit_gaussian(neighbours, "SELECT COUNT(*) FROM audit")
    assert set(pricing.l2.values()) == {K}
    assert calibrated <= claimed, (calibrated, claimed)
    assert control > claimed, (control, claimed)


def test_gaussian_sum(neighbours: Neighbours) -> None:
    pricing, claimed, calibrated, control = audit_gaussian(neighbours, "SELECT SUM(amount) FROM audit")
    assert set(pricing.l2.values()) == {K * 100 * 100}  # k rows of |-100| in units of 0.01
    assert calibrated <= claimed, (calibrated, claimed)
    assert control > claimed, (control, claimed)


def test_gaussian_distinct_units_grouped_is_calibrated_for_root_k(neighbours: Neighbours) -> None:
    """The worst unit is one more distinct unit in each of k groups: L2 distance √k, not k."""
    sql = "SELECT slot, COUNT(DISTINCT uid) FROM audit GROUP BY slot"
    pricing, claimed, calibrated, control = audit_gaussian(neighbours, sql, N_VECTOR_DRAWS)
    assert set(pricing.l2.values()) == {K**0.5}
    assert calibrated <= claimed, (calibrated, claimed)
    assert control > claimed, (control, claimed)


def test_gaussian_key_selection(neighbours: Neighbours) -> None:
    """Key selection under zCDP: OpenDP's Gaussian threshold at the selection's ρ is (ε(ρ, δ′), δ′ + δ)-DP for the
    selection's δ and any δ′. The audited key's count sits below the threshold by the offset that makes 'the key
    is released' the most telling event for that scale (fixed from the exact distributions), k rows fewer on D′."""
    plan = plan_query(TAG_SQL, _resolve)
    pricing = price(plan, epsilon=TAG_EPSILON, accuracy=None, alpha=0.05, delta=None, accounting=Accounting.ZCDP)
    (call,) = mechanism_inputs(plan, pricing, neighbours.d).selections
    call.pop("counts")
    k, eps_sel, delta = call.pop("k"), call.pop("epsilon"), call.pop("delta")
    options = call  # the public candidate count and ρ, passed on as the executor passed them
    rho = options["rho"]
    assert (k, eps_sel, delta, rho) == (K, 0.0, pricing.selection_delta, pricing.selection_rho) and rho > 0
    claimed = zcdp_epsilon(rho, GAUSSIAN_AUDIT_DELTA)

    def audit(rho_run: float, n: int) -> float:
        scale, threshold = mech.threshold_for(k, 0.0, delta, rho_run)
        t = _gaussian_tail_offset(scale, np.asarray([k]), n, GAUSSIAN_AUDIT_DELTA + delta)
        run = {**options, "rho": rho_run}
        on_d = _key_released({"common": 10_000, "x": threshold - t}, "x", k, 0.0, delta, n, run)
        on_d_prime = _key_released({"common": 10_000, "x": threshold - t - k}, "x", k, 0.0, delta, n, run)
        return bound(on_d, on_d_prime, GAUSSIAN_AUDIT_DELTA + delta)

    # The control's event is rarer on D′ (a deeper tail), so it gets more draws to be told apart reliably.
    calibrated, control = audit(rho, N_DRAWS), audit(4 * rho, 4 * N_DRAWS)
    assert calibrated <= claimed, (calibrated, claimed)
    assert control > claimed, (control, claimed)


def test_gaussian_key_selection_counts(neighbours: Neighbours) -> None:
    """Under zCDP a private-key COUNT(*) is the Gaussian threshold's own noisy counts: one OpenDP release at the
    request's whole ρ, audited on the counts it releases. The executor's real key counts (the undeclared key at D's
    count, k rows fewer on D′) are drawn through `select_keys` as it calls it, and the event is 'the key is released
    with a count of at least D's count plus an offset' (the offset fixed from the exact discrete Gaussian
    distributions for that scale, and high enough that the event lies where the key is always released, so it tests
    the counts rather than the selection), against (ε(ρ, δ′), δ′ + δ) for the request's ρ and δ; the control runs
    at half the scale (4ρ, its own threshold and offset)."""
    plan = plan_query(TAG_SQL, _resolve)
    pricing = price(plan, epsilon=TAG_EPSILON, accuracy=None, alpha=0.05, delta=None, accounting=Accounting.ZCDP)
    assert plan.needs_key_selection and pricing.counts_from_selection
    on_d = mechanism_inputs(plan, pricing, neighbours.d)
    on_d_prime = mechanism_inputs(plan, pricing, neighbours.d_prime)
    assert not (on_d.gaussians or on_d_prime.gaussians or on_d.integers or on_d_prime.integers)  # no second count
    ((call_d,), (call_d_prime,)) = on_d.selections, on_d_prime.selections
    counts_d, counts_d_prime = call_d.pop("counts"), call_d_prime.pop("counts")
    assert call_d == call_d_prime  # the calibration is public: the same on both
    k, eps_sel, delta = call_d.pop("k"), call_d.pop("epsilon"), call_d.pop("delta")
    options = call_d  # the public candidate count and ρ, passed on as the executor passed them
    rho = options["rho"]
    assert (k, eps_sel, delta) == (K, 0.0, pricing.selection_delta)
    assert rho == pricing.selection_rho == pricing.cost.rho == TAG_EPSILON**2 / 2  # the whole request's ρ
    t = neighbours.threshold
    (label_d,) = [key for key, v in counts_d.items() if v == t]
    (label_d_prime,) = [key for key, v in counts_d_prime.items() if v == t - K]
    audit_delta = GAUSSIAN_AUDIT_DELTA + pricing.cost.delta
    claimed = zcdp_epsilon(pricing.cost.rho, GAUSSIAN_AUDIT_DELTA)

    def audit(rho_run: float, n: int) -> float:
        scale, threshold = mech.threshold_for(k, 0.0, delta, rho_run)
        cut = t + _gaussian_tail_offset(scale, np.asarray([k]), n, audit_delta)
        assert cut >= threshold  # released whenever in the event: the event is on the released count
        run = {**options, "rho": rho_run}
        on_d = _key_draws(counts_d, label_d, k, 0.0, delta, n, run) >= cut
        on_d_prime = _key_draws(counts_d_prime, label_d_prime, k, 0.0, delta, n, run) >= cut
        return bound(on_d, on_d_prime, audit_delta)

    calibrated, control = audit(rho, N_DRAWS), audit(4 * rho, 4 * N_DRAWS)
    assert calibrated <= claimed, (calibrated, claimed)
    assert control > claimed, (control, claimed)

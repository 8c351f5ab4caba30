"""Privacy loss as an explicit object, composed by addition and kept in exact integer units by the ledger.

Two accountings (a policy's `accounting`):

- `pure`: every release is an (ε, δ)-DP mechanism (δ only from private key selection) and losses add up: ε and δ.
- `zcdp`: releases are ρ-zCDP (the Gaussian mechanism), or approximate zCDP (ρ, δ) for private key selection
  (OpenDP's Gaussian threshold); pure-ε mechanisms that remain (quantiles, LF statistics) count as ρ = ε²/2
  (OpenDP's `make_pureDP_to_zCDP`). ρ and δ add up. The caps are still declared in (ε, δ): half of the policy's δ
  converts ρ into ε (OpenDP's `make_zCDP_to_approxDP`), the other half is what key selection may spend, so that a
  spend (ρ, δ') within the caps is (ε(ρ, δ/2), δ/2 + δ')-DP with both terms within the declared (ε, δ).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import StrEnum
from functools import lru_cache
from typing import Any

# Ledger arithmetic is exact: ε and ρ are kept in units of 1e-12 and δ in units of 1e-18, charges rounded up and
# caps rounded down, so float rounding can never let a principal spend more than the cap.
EPS_UNIT = 10**12
DELTA_UNIT = 10**18
RHO_UNIT = 10**12

# Under zCDP, the share of a policy's δ that converts the ρ cap into (ε, δ); the rest is key selection's δ.
ZCDP_CONVERSION_DELTA_SHARE = 0.5


class Accounting(StrEnum):
    PURE = "pure"
    ZCDP = "zcdp"


@dataclass(frozen=True, slots=True)
class PrivacyLoss:
    """A loss: ε (pure parts) and δ, plus ρ for zCDP releases (0 for a pure loss)."""

    epsilon: float
    delta: float = 0.0
    rho: float = 0.0

    def __post_init__(self) -> None:
        if not (math.isfinite(self.epsilon) and self.epsilon >= 0):
            raise ValueError("epsilon must be finite and non-negative")
        if not (0 <= self.delta < 1):
            raise ValueError("delta must be in [0, 1)")
        if not (math.isfinite(self.rho) and self.rho >= 0):
            raise ValueError("rho must be finite and non-negative")

    def __add__(self, other: PrivacyLoss) -> PrivacyLoss:
        # Basic sequential composition: ε, δ and ρ each add up.
        return PrivacyLoss(self.epsilon + other.epsilon, self.delta + other.delta, self.rho + other.rho)

    def units(self, *, round_up: bool) -> tuple[int, int]:
        rnd = math.ceil if round_up else math.floor
        return rnd(self.epsilon * EPS_UNIT), rnd(self.delta * DELTA_UNIT)

    def rho_units(self, *, round_up: bool) -> int:
        return (math.ceil if round_up else math.floor)(self.rho * RHO_UNIT)

    @staticmethod
    def from_units(eps_units: int, delta_units: int, rho_units: int = 0) -> PrivacyLoss:
        return PrivacyLoss(eps_units / EPS_UNIT, delta_units / DELTA_UNIT, rho_units / RHO_UNIT)

    def as_dict(self) -> dict[str, float]:
        out = {"epsilon": self.epsilon, "delta": self.delta}
        if self.rho:
            out["rho"] = self.rho
        return out


# --- zCDP conversions (OpenDP) ----------------------------------------------------------------------------


@lru_cache(maxsize=1)
def _unit_gaussian() -> object:
    """A Gaussian measurement of scale 1 on a real number: its zCDP map is ρ = d²/2, so an input distance
    d = √(2ρ) stands for any ρ-zCDP release in OpenDP's conversions."""
    import opendp.prelude as dp

    dp.enable_features("contrib")
    space = dp.atom_domain(T=float, nan=False), dp.absolute_distance(T=float)
    return dp.c.make_zCDP_to_approxDP(dp.m.make_gaussian(*space, scale=1.0))


@lru_cache(maxsize=1024)
def zcdp_epsilon(rho: float, delta: float) -> float:
    """The ε at which a ρ-zCDP release is (ε, δ)-DP (OpenDP's `make_zCDP_to_approxDP`)."""
    if rho <= 0:
        return 0.0
    if delta <= 0:
        return math.inf
    from opendp.mod import OpenDPException

    curve = _unit_gaussian().map(math.sqrt(2 * rho))  # type: ignore[attr-defined]
    try:
        return float(curve.epsilon(delta))
    except OpenDPException:  # OpenDP's conversion overflows for a large ρ: no finite ε
        return math.inf


@lru_cache(maxsize=1024)
def pure_to_rho(epsilon: float) -> float:
    """The ρ of an ε-DP release (OpenDP's `make_pureDP_to_zCDP`: ρ = ε²/2)."""
    import opendp.prelude as dp

    dp.enable_features("contrib")
    space = dp.atom_domain(T=float, nan=False), dp.absolute_distance(T=float)
    pure = dp.m.make_laplace(*space, scale=1.0)  # ε = d_in
    return float(dp.c.make_pureDP_to_zCDP(pure).map(float(epsilon)))


def conversion_delta(delta_cap: float) -> float:
    """Under zCDP, the part of a declared δ cap that converts ρ into ε."""
    return delta_cap * ZCDP_CONVERSION_DELTA_SHARE


def selection_delta_cap(delta_cap: float, accounting: Accounting) -> float:
    """The part of a declared δ cap that the ledger lets key selection (and any other δ) spend."""
    return delta_cap - conversion_delta(delta_cap) if accounting is Accounting.ZCDP else delta_cap


@lru_cache(maxsize=256)
def rho_cap(epsilon: float, delta: float) -> float:
    """The largest ρ whose (ε, δ) conversion at `conversion_delta(delta)` fits within ε: found by bisection on
    OpenDP's map and checked with it. 0 when δ is 0 (no ρ > 0 is (ε, 0)-DP)."""
    d = conversion_delta(delta)
    if d <= 0 or epsilon <= 0:
        return 0.0
    lo, hi = 0.0, max(epsilon, 1.0)
    while zcdp_epsilon(hi, d) <= epsilon:
        hi *= 2
    for _ in range(200):
        mid = (lo + hi) / 2
        if mid in (lo, hi):
            break
        if zcdp_epsilon(mid, d) <= epsilon:
            lo = mid
        else:
            hi = mid
    if lo > 0 and zcdp_epsilon(lo, d) > epsilon:
        raise ValueError(f"ρ cap check failed: ε({lo}) > {epsilon}")
    return lo


# Public parameters a request may give, checked before anything is charged: outside these ranges the noise scales
# and thresholds stop being meaningful numbers (an ε of 5e-324 makes every scale infinite). The smallest ε also
# bounds how many answers a budget buys (a budget of 10 buys at most 10,000), and with it how often anyone can
# repeat a measurement of running time, whose residual dependence on one unit is small but not zero (README).
MIN_EPSILON = 1e-3
MAX_EPSILON = 1_000.0
MIN_DELTA = 1e-30
MAX_DELTA = 0.1
# 1 - the confidence level of every interval unless a request or the settings give another.
DEFAULT_ALPHA = 0.05
MIN_ALPHA = 1e-9


def _number(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    try:
        v = float(value)
    except OverflowError:  # an int too large for a float
        return None
    return v if math.isfinite(v) else None


def _shown(value: object) -> str:
    """A refused value as an error message may show it: a finite number as itself, anything else by its kind
    (NaN and the infinities are not JSON, and a string or an object is the caller's text, not ours to echo)."""
    v = _number(value)
    if v is not None:
        return f"{v:g}"
    if isinstance(value, float):
        return "a non-finite number"
    if isinstance(value, int) and not isinstance(value, bool):
        return "an integer too large for a float"
    return f"a value of type {type(value).__name__}"


def check_epsilon(value: object, what: str = "epsilon") -> float:
    """A request's ε, or InvalidRequest (400) naming the allowed range."""
    from policies.errors import InvalidRequest

    v = _number(value)
    if v is None or not MIN_EPSILON <= v <= MAX_EPSILON:
        raise InvalidRequest(
            f"{what} must be a number between {MIN_EPSILON:g} and {MAX_EPSILON:g}, got {_shown(value)}"
        )
    return v


def check_delta(value: object) -> float:
    from policies.errors import InvalidRequest

    v = _number(value)
    if v is None or not MIN_DELTA <= v <= MAX_DELTA:
        raise InvalidRequest(f"delta must be a number between {MIN_DELTA:g} and {MAX_DELTA:g}, got {_shown(value)}")
    return v


def check_alpha(value: object) -> float:
    from policies.errors import InvalidRequest

    v = _number(value)
    if v is None or not MIN_ALPHA <= v < 1:
        raise InvalidRequest(f"alpha (1 - confidence) must be a number in [{MIN_ALPHA:g}, 1), got {_shown(value)}")
    return v


def spend_caps(budget_total: Any, per_principal: Any, accounting: Accounting) -> dict[str, Any]:
    """A dataset's caps as the auditor's spend report takes them (`audit.report.privacy_spend`): the declared
    (ε, δ) total with its per-principal cap; under zCDP also the ρ caps the ledger converts them to, and as
    "delta" the part of δ that key selection may spend (what the ledger caps)."""
    caps: dict[str, Any] = {**budget_total.model_dump(), "per_principal": per_principal.model_dump()}
    if accounting is Accounting.ZCDP:
        for part, budget in ((caps, budget_total), (caps["per_principal"], per_principal)):
            part["rho"] = rho_cap(budget.epsilon, budget.delta)
            part["delta"] = selection_delta_cap(budget.delta, accounting)
        caps["accounting"] = "zcdp"
    return caps

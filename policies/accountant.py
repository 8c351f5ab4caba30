"""Privacy loss as an explicit object, composed by addition and kept in exact integer units by the ledger."""

from __future__ import annotations

import math
from dataclasses import dataclass

# Ledger arithmetic is exact: ε is kept in units of 1e-12 and δ in units of 1e-18, charges rounded up and caps
# rounded down, so float rounding can never let a principal spend more than the cap.
EPS_UNIT = 10**12
DELTA_UNIT = 10**18


@dataclass(frozen=True, slots=True)
class PrivacyLoss:
    epsilon: float
    delta: float = 0.0

    def __post_init__(self) -> None:
        if not (math.isfinite(self.epsilon) and self.epsilon >= 0):
            raise ValueError("epsilon must be finite and non-negative")
        if not (0 <= self.delta < 1):
            raise ValueError("delta must be in [0, 1)")

    def __add__(self, other: PrivacyLoss) -> PrivacyLoss:
        # Basic sequential composition of (ε, δ)-DP measurements.
        return PrivacyLoss(self.epsilon + other.epsilon, self.delta + other.delta)

    def units(self, *, round_up: bool) -> tuple[int, int]:
        rnd = math.ceil if round_up else math.floor
        return rnd(self.epsilon * EPS_UNIT), rnd(self.delta * DELTA_UNIT)

    @staticmethod
    def from_units(eps_units: int, delta_units: int) -> PrivacyLoss:
        return PrivacyLoss(eps_units / EPS_UNIT, delta_units / DELTA_UNIT)

    def as_dict(self) -> dict[str, float]:
        return {"epsilon": self.epsilon, "delta": self.delta}


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

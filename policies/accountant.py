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

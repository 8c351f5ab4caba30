"""The DP model on its own: the ε split adds up, every measurement goes through OpenDP with its share, the
copula arithmetic recovers known correlations, and sampling is post-processing (seeded, repeatable)."""

from __future__ import annotations

import importlib
import math

import numpy as np
import pytest

from gateway.service import Bastion
from policies import mechanisms
from synth import DPCopulaModel, allocate, measure
from synth.copula import cell_probabilities, nearest_correlation, polychoric, polychoric_fit, shrink
from tests.conftest import Workspace

measure_module = importlib.import_module("synth.measure")  # the package re-exports a function of this name


def test_allocation_splits_epsilon_and_delta_exactly(workspace: Workspace) -> None:
    bastion = Bastion(workspace.settings)
    try:
        policy, _ = bastion.engine.policy("visits")
    finally:
        bastion.close()
    a = allocate(policy, 1.0, 1e-7)
    d = len(a.schema.columns)
    assert [c.name for c in a.schema.columns] == [
        "age",
        "sex",
        "region",
        "diagnosis",
        "income",
        "length_of_stay",
        "visit_day",
    ]
    assert math.isclose(d * a.epsilon_marginal + len(a.pairs) * a.epsilon_pair, 1.0)
    assert math.isclose(a.delta_spent, 1e-7)
    without_delta = allocate(policy, 1.0, 0.0)
    assert "diagnosis" in without_delta.schema.dropped and without_delta.delta_spent == 0.0


def test_every_measurement_is_an_opendp_release_and_they_add_up(workspace: Workspace, monkeypatch) -> None:
    spent: list[tuple[str, float, float]] = []

    def counted_release(values, d_in, epsilon):
        spent.append(("laplace", epsilon, 0.0))
        assert d_in == 10  # k rows per unit, one bin or cell per row
        return mechanisms.release_integers(values, d_in, epsilon)

    def counted_keys(counts, k, epsilon, delta, **options):
        spent.append(("threshold", epsilon, delta))
        return mechanisms.select_keys(counts, k, epsilon, delta, **options)

    monkeypatch.setattr(measure_module, "release_integers", counted_release)
    monkeypatch.setattr(measure_module, "select_keys", counted_keys)
    bastion = Bastion(workspace.settings)
    try:
        policy, _ = bastion.engine.policy("visits")
        allocation = allocate(policy, 0.8, 1e-7)
        model = measure(bastion.engine, "bounded_visits", policy, allocation)
    finally:
        bastion.close()
    assert sum(e for _, e, _ in spent) <= 0.8 * (1 + 1e-12)
    assert math.isclose(sum(e for _, e, _ in spent), 0.8) or model.dropped  # a dropped column's pairs are unspent
    assert sum(d for _, _, d in spent) == pytest.approx(1e-7)
    assert len([s for s in spent if s[0] == "threshold"]) == 1

    again = DPCopulaModel.from_json(model.to_json())
    assert again.sample(500, seed=3).equals(model.sample(500, seed=3))
    corr = np.asarray(model.correlation)
    assert np.allclose(np.diag(corr), 1.0) and np.linalg.eigvalsh(corr).min() > 0


def test_polychoric_recovers_the_latent_correlation_of_an_exact_table() -> None:
    hx = np.array([-8, -0.8, 0.0, 0.7, 8.0])
    hy = np.array([-8, -1.0, -0.2, 0.5, 1.2, 8.0])
    for rho in (-0.7, 0.0, 0.35, 0.85):
        table = cell_probabilities(hx, hy, np.array([rho]))[0] * 100_000
        assert abs(polychoric(table.round(), hx, hy) - rho) < 0.01


def test_nearest_correlation_repairs_an_indefinite_matrix() -> None:
    bad = np.array([[1, 0.9, 0.7], [0.9, 1, -0.6], [0.7, -0.6, 1.0]])
    fixed = nearest_correlation(bad)
    assert np.allclose(np.diag(fixed), 1.0) and np.linalg.eigvalsh(fixed).min() > 0
    assert np.allclose(fixed, fixed.T)
    good = np.array([[1, 0.5], [0.5, 1.0]])
    assert np.allclose(nearest_correlation(good), good)


def test_noisy_tables_are_fitted_without_bias_and_noise_level_estimates_fade() -> None:
    hx = np.array([-8, -0.8, 0.0, 0.7, 8.0])
    hy = np.array([-8, -1.0, -0.2, 0.5, 1.2, 8.0])
    exact = cell_probabilities(hx, hy, np.array([0.85]))[0] * 60_000
    # A fixed, mean-zero perturbation of the size of the noise (scale 420), negative cells included.
    noise = 420 * np.sin(np.arange(exact.size) * 2.3).reshape(exact.shape)
    rho, lr = polychoric_fit(exact + noise, hx, hy, noise_scale=420)
    assert abs(rho - 0.85) < 0.05 and lr > 100
    assert abs(shrink(rho, lr) - rho) < 0.02
    flat = cell_probabilities(hx, hy, np.array([0.0]))[0] * 2_000
    rho0, lr0 = polychoric_fit(flat + noise, hx, hy, noise_scale=420)
    assert lr0 < 1 and shrink(rho0, lr0) == 0.0  # no evidence of dependence: the estimate fades out
    assert shrink(0.5, 3.0) == 0.0

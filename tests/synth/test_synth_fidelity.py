"""Fidelity of a DP proxy at ε = 1 against the true (pre-bounded) data, with tolerances from the noise scale."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd

from policies.schema import load_policy
from synth.columns import proxy_schema
from tests.conftest import Workspace
from tests.synth.helpers import private_rows, proxy_frame, wait

ROWS = 20_000


def test_fidelity_at_epsilon_one(workspace: Workspace, demo_source: tuple[Path, Path]) -> None:
    """One DP proxy (default method, ε = 1, 20,000 rows of a 60,000-row table), two kinds of checks."""
    proxy, truth, report = _proxy_and_truth(workspace)
    _check_marginals(proxy, truth, report, demo_source[1])
    _check_correlations(proxy, truth, report)


def _proxy_and_truth(workspace: Workspace) -> tuple[pd.DataFrame, pd.DataFrame, dict]:
    h = workspace.headers("analyst")
    with workspace.app() as c:
        job = c.post(
            "/v1/synth", json={"dataset": "visits", "epsilon": 1.0, "rows": ROWS, "seed": 11}, headers=h
        ).json()
        assert wait(c, h, job["job_id"])["status"] == "done"
        proxy = proxy_frame(c, h, job["job_id"])
        report = c.get(f"/v1/synth/{job['job_id']}/report", headers=h).json()
    return proxy, private_rows(workspace), report


def _check_marginals(proxy: pd.DataFrame, truth: pd.DataFrame, report: dict, policy_path: Path) -> None:
    """Total-variation distance between proxy and true marginal, per column, over the column's public bins.

    Tolerance, from the noise scale: each of the B released counts carries discrete-Laplace noise of scale
    b = k / ε_column, so E|η| ≤ b and the noise moves the histogram by Σ|η| ≈ B·b rows in L1 (sd √B·b: twice
    the mean is ~√B standard deviations away). Zeroing counts below 2b (post-processing) sets empty bins right
    and moves only bins whose true count is near zero. Renormalising by the noisy total at most doubles the L1
    error and TV is half of L1, so TV(DP marginal, truth) ≲ Σ|error| / n; we allow 2·B·b / n. The proxy is m rows
    sampled from that marginal: E[TV] ≤ sqrt(B / m) / 2; we allow sqrt(B / m). At ε = 1 (ε_column = 1/14,
    b = 140, n ≈ 60,000) that is 0.02 to 0.17 depending on B.
    """
    schema = {c.name: c for c in proxy_schema(load_policy(policy_path)).columns}
    n = len(truth)
    for name in ("age", "sex", "region", "income", "length_of_stay", "visit_day"):
        col = schema[name]
        rep = report["columns"][name]
        b, bins = rep["noise_scale"], len(rep["bins"])
        p_true = np.bincount(col.bin_of(truth[name]), minlength=col.size) / n
        p_proxy = np.bincount(col.bin_of(proxy[name]), minlength=col.size) / len(proxy)
        tv = 0.5 * np.abs(p_true - p_proxy).sum()
        tolerance = 2 * bins * b / n + math.sqrt(bins / len(proxy))
        assert tv <= tolerance, (name, tv, tolerance)
    assert abs(proxy["age"].mean() - truth["age"].mean()) < 3.0


def _check_correlations(proxy: pd.DataFrame, truth: pd.DataFrame, report: dict) -> None:
    """The planted age–income correlation keeps its sign and rough size.

    Each pair is measured as a ≤5×5 table of coarse groups with ε = 1/42 (noise scale 420 per cell against
    ~2,400 rows per cell); the maximum-likelihood latent ρ from it is within about ±0.05 of the truth, and
    sampling through SDV keeps what the model uses to within a few hundredths. Tolerances: 0.15 for the
    proxy's Spearman ρ of age–income against the truth (≈0.87), 0.2 for the weaker age–length-of-stay (≈0.44).
    """
    true_rho = truth["age"].corr(truth["income"], method="spearman")
    proxy_rho = proxy["age"].corr(proxy["income"], method="spearman")
    assert true_rho > 0.8
    assert proxy_rho > 0 and abs(proxy_rho - true_rho) < 0.15
    los_true = truth["age"].corr(truth["length_of_stay"], method="spearman")
    los_proxy = proxy["age"].corr(proxy["length_of_stay"], method="spearman")
    assert los_proxy > 0 and abs(los_proxy - los_true) < 0.2
    pair = next(p for p in report["pairs"] if set(p["columns"]) == {"age", "income"})
    assert pair["dp_rho"] > 0.7 and abs(pair["model_rho"] - pair["proxy_rho"]) < 0.05

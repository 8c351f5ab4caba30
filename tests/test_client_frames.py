"""The Python client against a real `bastion serve`: counts come back as integers, confidence intervals as pandas
`Interval` columns, and `df.bastion.plot()` draws the values with their intervals as error bars (or says clearly
that matplotlib is missing)."""

from __future__ import annotations

import sys
from collections.abc import Iterator

import pandas as pd
import pytest

from gateway.client import Client, intervals
from tests.conftest import Workspace, gateways

SQL = "SELECT region, COUNT(*) AS n, AVG(age) AS mean_age FROM visits GROUP BY region"


@pytest.fixture
def answer(workspace: Workspace) -> Iterator[pd.DataFrame]:
    with gateways(1, "--workspace", str(workspace.settings.workspace)) as (url,):
        with Client(url, workspace.tokens["analyst"]) as client:
            yield client.query(SQL, epsilon=1.0)


def test_counts_are_integers_and_intervals_are_pandas_intervals(answer: pd.DataFrame) -> None:
    assert list(answer.columns) == ["region", "n", "n_low", "n_high", "mean_age", "mean_age_low", "mean_age_high"]
    assert str(answer["n"].dtype) == "Int64"
    assert answer["mean_age"].dtype.kind == "f"
    assert answer.attrs["epsilon_spent"] == 1.0 and answer.attrs["alpha"] == 0.05

    both = intervals(answer)
    assert list(both.columns) == ["region", "n", "n_ci", "mean_age", "mean_age_ci"]
    assert isinstance(both["n_ci"].dtype, pd.IntervalDtype) and both["n_ci"].array.closed == "both"
    for value, ci, low, high in zip(answer["n"], both["n_ci"], answer["n_low"], answer["n_high"], strict=True):
        assert (ci.left, ci.right) == (low, high) and low <= value <= high
    kept = answer.bastion.intervals(keep_bounds=True)
    assert {"n_low", "n_high", "n_ci"} <= set(kept.columns)


def test_plot_draws_values_with_error_bars(answer: pd.DataFrame) -> None:
    pytest.importorskip("matplotlib")
    import matplotlib

    matplotlib.use("Agg")
    ax = answer.bastion.plot()
    (bars,) = ax.containers
    line, _caps, (segments,) = bars.lines
    assert list(line.get_ydata()) == [float(v) for v in answer["n"]]
    spans = segments.get_segments()
    assert [s[0][1] for s in spans] == pytest.approx(list(answer["n_low"]))
    assert [s[1][1] for s in spans] == pytest.approx(list(answer["n_high"]))
    assert [t.get_text() for t in ax.get_xticklabels()] == list(answer["region"])
    assert ax.get_ylabel() == "n (95% CI)"
    with pytest.raises(ValueError, match="has no confidence interval"):
        answer.bastion.plot("region")


def test_plot_without_matplotlib_says_how_to_get_it(answer: pd.DataFrame, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", None)
    with pytest.raises(ImportError, match=r"matplotlib, which is not installed: pip install 'bastion\[plot\]'"):
        answer.bastion.plot()

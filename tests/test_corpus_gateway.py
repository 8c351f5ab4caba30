"""The whole query corpus (tests/fixtures/queries.yaml) through the real in-process gateway, each query by its own
analyst at one small ε: no query ends in an unexpected exception or a failed computation after the charge; a
refused query is refused with the corpus's reason and charges nothing; an answered one is charged exactly its
price, and every interval it releases holds its value (low ≤ value ≤ high)."""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from gateway.service import Bastion, Context
from policies.errors import GatewayError
from tests.conftest import ROLES, build_workspace

CORPUS: list[dict[str, str]] = yaml.safe_load((Path(__file__).parent / "fixtures" / "queries.yaml").read_text())
EPSILON = 0.05


@pytest.fixture(scope="module")
def gateway(
    tmp_path_factory: pytest.TempPathFactory, demo_source: tuple[Path, Path], pums_source: tuple[Path, Path]
) -> Iterator[Bastion]:
    data, policy = demo_source
    pdata, ppolicy = pums_source
    ws = build_workspace(tmp_path_factory.mktemp("corpus"), [(policy, data), (ppolicy, pdata)], ROLES)
    bastion = Bastion(ws.settings)
    try:
        yield bastion
    finally:
        bastion.close()


def _spent(bastion: Bastion, ctx: Context) -> dict[str, tuple[float, float]]:
    return {b["dataset"]: (b["spent"]["epsilon"], b["spent"]["delta"]) for b in bastion.budgets(ctx)}


def _check_intervals(body: dict[str, Any]) -> None:
    for row, cells in zip(body["rows"], body["intervals"], strict=True):
        for value, interval in zip(row, cells, strict=True):
            if interval is None or value is None:
                continue
            low, high = interval
            if any(isinstance(v, float) and math.isnan(v) for v in (low, high, value)):
                continue
            assert low <= value <= high, (value, interval)


@pytest.mark.parametrize("index", range(len(CORPUS)), ids=[q["sql"][:60] or "<empty>" for q in CORPUS])
def test_corpus_query_through_the_gateway(gateway: Bastion, index: int, caplog: pytest.LogCaptureFixture) -> None:
    case = CORPUS[index]
    _, principal = gateway.tokens.create(f"corpus-{index}", "analyst")
    ctx = Context(principal)
    before = _spent(gateway, ctx)
    with caplog.at_level(logging.WARNING, logger="bastion"):
        try:
            body = gateway.query(ctx, case["sql"], epsilon=EPSILON)
        except GatewayError as exc:
            assert exc.status < 500, exc.message
            assert case["verdict"] != "accepted", exc.message
            assert getattr(exc, "reason", exc.code) == case["verdict"], exc.message
            assert _spent(gateway, ctx) == before  # nothing refused is charged
            return
    # Nothing failed after the charge (a failure would have been answered with the default release and logged).
    assert not [r for r in caplog.records if r.name == "bastion"], [r.getMessage() for r in caplog.records]
    assert case["verdict"] == "accepted", body
    after = _spent(gateway, ctx)
    dataset = body["dataset"]
    assert math.isclose(after[dataset][0], before.get(dataset, (0.0, 0.0))[0] + body["epsilon_spent"])
    # Every answer costs the request's ε, but one of public group keys alone, which measures nothing.
    public_keys_only = not body["measurements"] and not body["delta"]
    assert math.isclose(body["epsilon_spent"], 0.0 if public_keys_only else EPSILON)
    _check_intervals(body)


def test_the_interval_check_catches_an_interval_that_misses_its_value() -> None:
    """Control: a clamped count reported as 0 with the interval [0, -1.62] (low above high) is caught."""
    _check_intervals({"rows": [["north", 3.0]], "intervals": [[None, [1.0, 5.0]]]})
    with pytest.raises(AssertionError):
        _check_intervals({"rows": [["north", 0.0]], "intervals": [[None, [0.0, -1.62]]]})
    with pytest.raises(AssertionError):
        _check_intervals({"rows": [[7.0]], "intervals": [[[1.0, 5.0]]]})


def test_a_failure_after_the_charge_is_seen(
    gateway: Bastion, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Control: when the computation fails after the charge, the gateway still answers (the default release) but
    logs it, which is what the corpus test looks for."""
    import gateway.service as service

    def broken(*args: Any, **kwargs: Any) -> Any:
        if not kwargs.get("default_input"):
            raise RuntimeError("the engine failed")
        return execute(*args, **kwargs)

    execute = service.execute
    monkeypatch.setattr(service, "execute", broken)
    _, principal = gateway.tokens.create("corpus-control", "analyst")
    with caplog.at_level(logging.WARNING, logger="bastion"):
        body = gateway.query(Context(principal), "SELECT COUNT(*) FROM visits WHERE age > 40", epsilon=EPSILON)
    assert body["epsilon_spent"] == EPSILON
    assert [r for r in caplog.records if r.name == "bastion"]

"""Red-team pass of DP monitoring reports and LF sets that follow the data: each test is an attack that worked
before its fix (a second charge for one version, a status that depends on one unit's rows, ...), run on
neighbouring feeds or on a gateway whose log or ledger fails at the worst moment."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from audit.record import Event
from gateway.lfsets import _author_context, catch_up, store_of
from gateway.service import Bastion
from policies.errors import AuditUnavailable
from tests.lf.test_lf_sets import BODY, EPSILON, append, batch, feed_workspace


def test_an_lf_set_version_whose_release_record_fails_after_the_charge_is_not_charged_again(tmp_path: Path) -> None:
    """The log fails after the author was charged for a version (the release record cannot be written: 503, nothing
    released). The next catch-up must find that charge under the version's request id and keep the version as
    `interrupted`, not compute it again and charge the author a second time."""
    ws, _ = feed_workspace(tmp_path)
    with ws.app() as client:
        s = client.post("/v1/lf/sets", json=BODY, headers=ws.headers("lf_author")).json()
    v2 = append(ws, batch(tmp_path / "b1.csv", 10_000, 0.1))
    bastion = Bastion(ws.settings, read_only=True)
    real = bastion.audit
    failed: list[str] = []

    def audit(ctx: Any, event: str, **fields: Any) -> dict[str, Any]:
        if event == Event.LF_STATS and fields.get("phase") == "released" and not failed:
            failed.append(event)
            raise AuditUnavailable("the audit log cannot be written")
        return real(ctx, event, **fields)

    try:
        record = store_of(bastion).read(s["id"])
        assert record is not None
        ctx = _author_context(bastion, record, v2)
        assert ctx is not None
        bastion.audit = audit  # type: ignore[method-assign]
        with pytest.raises(AuditUnavailable):
            catch_up(bastion)
        assert failed
        bastion.audit = real  # type: ignore[method-assign]
        catch_up(bastion)  # the log is back
        charges = [c for c in bastion.ledger.history("feed") if c["request_id"] == ctx.request_id]
        spent = bastion.ledger.spent("lena", "feed").epsilon
        history = (store_of(bastion).read(s["id"]) or {})["history"]
    finally:
        bastion.close()
    assert len(charges) == 1  # once for the version, not once per try
    assert spent == pytest.approx(2 * EPSILON)  # the save and the one version
    assert [e["status"] for e in history] == ["computed", "interrupted"]
    assert history[-1]["version"] == v2 and history[-1]["epsilon_spent"] == EPSILON

"""Consented debug access at its edges: an approver name that only looks different from the requester's, and unit
values the bounded table cannot tell apart from other units' (cut at a text unit's max_length, clamped at an int
unit's bounds), which must give no rows of a unit that did not consent."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest
import yaml

from gateway import access
from gateway.service import Bastion
from gateway.settings import Settings
from policies.errors import Forbidden
from policies.schema import PolicyError, load_policy, parse_policy
from tests.conftest import Workspace
from tests.test_access import _host, _records, _request, source, units, ws  # noqa: F401  (fixtures)


@pytest.mark.parametrize("name", ["Alice", "ALICE", "alice\u200b", "\u0430lice", "\uff41\uff4c\uff49\uff43\uff45"])
def test_the_requester_cannot_approve_under_a_look_alike_name(ws: Workspace, units: dict[str, int], name: str) -> None:
    with ws.app() as c:
        rid = _request(c, ws, [units["consenting"]]).json()["id"]
    with pytest.raises((Forbidden, access.AccessError)):
        _host(ws, "approve", rid, rows=5, hours=1, approver=name)
    with ws.app() as c:
        assert c.get(f"/v1/access/requests/{rid}", headers=ws.headers("analyst")).json()["status"] == "pending"
    assert not [r for r in _records(ws, "access_approved") if r["decision"] == "allowed"]

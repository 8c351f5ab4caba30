"""Python LFs that loop, allocate without bound, raise or open a socket fail cleanly with a clear error that quotes
no row, the charge stands, and the gateway keeps serving."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from labeling_functions.analysis import plan_lf_stats, run_lfs
from labeling_functions.registry import REGISTRY
from labeling_functions.sandbox import SandboxLimits
from tests.conftest import Workspace
from tests.lf import hostile_lfs

CLASSES = ["urgent", "routine"]
GOOD_LF = {"name": "red_flags", "label": "urgent", "keywords": {"column": "triage_note", "any": ["chest pain"]}}
HOSTILE = [  # (LF, error reason, words of the message); the first one runs under a short time limit
    (hostile_lfs.test_only_sleeps_forever, "timeout", "did not finish within"),
    (hostile_lfs.test_only_allocates_without_bound, "memory", "exceeded the memory limit"),
    (hostile_lfs.test_only_raises_with_row_contents, "exception", "raised ValueError"),
    (hostile_lfs.test_only_opens_a_socket, "network", "network"),
]


@pytest.fixture
def hostile_registered() -> Iterator[None]:
    lfs = [lf for lf, _, _ in HOSTILE] + [hostile_lfs.test_only_returns_undeclared_label]
    for lf in lfs:
        REGISTRY.register(lf, dataset="visits", classes=CLASSES, labels=["urgent"])
    try:
        yield
    finally:
        for lf in lfs:
            REGISTRY.unregister(lf.name)


def test_misbehaving_python_lfs_fail_cleanly_and_the_gateway_keeps_serving(
        workspace: Workspace, hostile_registered: None) -> None:
    h = workspace.headers("lf_author")
    with workspace.app() as c:
        spent = 0.0
        for lf, reason, words in HOSTILE:
            c.app.state.lf_limits = SandboxLimits(seconds=6 if reason == "timeout" else 60, memory_bytes=256 * 2**20)
            r = c.post("/v1/lf/stats", json={"dataset": "visits", "lfs": [GOOD_LF], "python_lfs": [lf.name],
                                             "epsilon": 0.25}, headers=h)
            spent += 0.25
            assert r.status_code == 422, (lf.name, r.text)
            err = r.json()["error"]
            assert err["code"] == "lf_failed" and err["reason"] == reason, err
            assert words in err["message"] and lf.name in err["message"], err
            assert hostile_lfs.SECRET_MARKER not in r.text and "chest" not in r.text.lower()
            assert "Traceback" not in r.text
            # Still serving: health, a plain DP answer, and the budget shows the charge stood.
            assert c.get("/healthz").json() == {"status": "ok"}
            budget = c.get("/v1/budget", headers=h).json()
            visits = next(b for b in budget if b["dataset"] == "visits")
            assert abs(visits["spent"]["epsilon"] - spent) < 1e-9

        # Undeclared labels count as abstentions; the same worker path then succeeds.
        ok = c.post("/v1/lf/stats", json={"dataset": "visits", "lfs": [GOOD_LF], "epsilon": 0.25,
                                          "python_lfs": ["test_only_returns_undeclared_label", "urgent_diagnosis"]},
                    headers=h)
        assert ok.status_code == 200, ok.text
        assert ok.json()["lfs"][1]["polarity"] == ["urgent"]
        bastion = c.app.state.bastion
        policy, _ = bastion.catalog.policy("visits")
        plan = plan_lf_stats(policy, lfs=[], python_lfs=["test_only_returns_undeclared_label"], epsilon=1.0,
                             alpha=0.05)
        assert run_lfs(plan, bastion.catalog.connect()).exact.coverage.tolist() == [0]

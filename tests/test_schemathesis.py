"""Schemathesis against the real app (ASGI, a real workspace) with a token of each role: valid and invalid requests
generated from the OpenAPI schema of every operation; no answer may be a 5xx. Bounded: a fixed number of examples
per operation and role (about 40 s in all on two cores), derandomized so a failure reproduces."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
from fastapi import FastAPI

from gateway.http.app import create_app
from tests.conftest import ROLES, Workspace

if os.environ.get("CI") != "true":  # in CI the dev extra is installed and this must run
    pytest.importorskip("schemathesis", reason="schemathesis is in the dev extra: pip install -e '.[dev]'")

import schemathesis  # noqa: E402
from hypothesis import HealthCheck, Phase, given, settings  # noqa: E402
from schemathesis.core.result import Err  # noqa: E402

EXAMPLES = 20  # per operation, role and generation mode


@pytest.fixture
def app(workspace: Workspace) -> Iterator[FastAPI]:
    app = create_app(workspace.settings)
    try:
        yield app
    finally:
        app.state.bastion.close()


@pytest.mark.slow
@pytest.mark.parametrize("role", sorted(ROLES))
def test_no_generated_request_gets_a_server_error(workspace: Workspace, app: FastAPI, role: str) -> None:
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    headers = {"Authorization": f"Bearer {workspace.tokens[role]}"}
    errors: list[str] = []
    operations = 0
    for result in schema.get_all_operations():
        if isinstance(result, Err):
            raise result.err()  # the schema itself is invalid
        operation = result.ok()
        operations += 1
        strategy = operation.as_strategy() | operation.as_strategy(schemathesis.GenerationMode.NEGATIVE)

        @given(case=strategy)
        @settings(
            max_examples=EXAMPLES,
            deadline=None,
            database=None,
            derandomize=True,
            phases=[Phase.explicit, Phase.generate],
            suppress_health_check=list(HealthCheck),
        )
        def call(case: schemathesis.Case) -> None:
            response = case.call(headers=headers)
            if response.status_code >= 500:
                errors.append(f"{case.method} {case.formatted_path} -> {response.status_code}: {response.text[:200]}")

        call()
    assert operations >= 15
    assert errors == []

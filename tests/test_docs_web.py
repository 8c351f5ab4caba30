"""/docs in a real headless Chromium against a real `bastion serve`, with every request outside the gateway's
origin blocked: Swagger UI comes from the package, renders every operation and its Authorize button takes a token."""

from __future__ import annotations

import shutil
from collections.abc import Iterator

import pytest

from tests.conftest import Workspace, gateways
from tests.test_auditor_web import BROWSER_ARGS, CHROMIUM, _chromium_or_skip


@pytest.fixture
def server(workspace: Workspace) -> Iterator[str]:
    with gateways(1, "--workspace", str(workspace.settings.workspace)) as (url,):
        yield url


@pytest.mark.slow
def test_docs_render_offline_in_headless_chromium(workspace: Workspace, server: str) -> None:
    _chromium_or_skip()
    from playwright.sync_api import Route, sync_playwright

    outside: list[str] = []
    problems: list[str] = []

    def only_the_gateway(route: Route) -> None:
        if route.request.url.startswith(server):
            route.continue_()
        else:
            outside.append(route.request.url)
            route.abort()

    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=str(CHROMIUM if CHROMIUM.exists() else shutil.which("chromium")), args=BROWSER_ARGS
        )
        try:
            context = browser.new_context(viewport={"width": 1280, "height": 1000})
            context.route("**/*", only_the_gateway)
            page = context.new_page()
            page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: problems.append(str(e)))
            page.goto(f"{server}/docs")
            page.wait_for_selector(".opblock", timeout=30_000)
            paths = page.locator(".opblock-summary-path").evaluate_all("els => els.map(e => e.dataset.path)")
            assert {"/v1/query", "/v1/budget", "/v1/audit/events", "/v1/lf/stats"} <= set(paths)
            assert "Bastion" in page.locator(".info .title").inner_text()

            # The bearer scheme is declared: Authorize opens a dialog that takes a token.
            page.click(".btn.authorize")
            page.wait_for_selector(".auth-container input")
            page.fill(".auth-container input", workspace.tokens["analyst"])
            page.click(".auth-btn-wrapper .btn.modal-btn.auth")
            assert page.locator(".auth-btn-wrapper button", has_text="Logout").count() == 1
            page.click(".btn-done")

            # Try one call from the page with that token.
            budget = page.locator('.opblock-get:has([data-path="/v1/budget"])')
            budget.locator(".opblock-summary").click()
            budget.locator(".try-out__btn").click()
            with page.expect_response(f"{server}/v1/budget") as answer:
                budget.locator(".execute").click()
            assert answer.value.status == 200
        finally:
            browser.close()
    assert outside == []
    assert not [m for m in problems if "Content Security Policy" in m or "Refused" in m], problems

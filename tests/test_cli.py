"""The `bastion` command as a user runs it: real subprocesses, a real gateway on a loopback port."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway.client import BastionError, Client
from tests.conftest import BIN, gateways


def _run(*args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN), *args], cwd=cwd, env={**os.environ, **(env or {})}, capture_output=True, text=True, timeout=300
    )


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[Path, str]]:
    """`bastion demo` in a fresh directory (small data), then `bastion serve` on a free port."""
    made = _run("demo", "--no-serve", "--rows", "20000", cwd=tmp_path)
    assert made.returncode == 0, made.stderr
    assert "analyst" in made.stdout and "bst_" in made.stdout
    with gateways(1, cwd=tmp_path) as (url,):
        yield tmp_path, url


def _token(tmp_path: Path, role: str, name: str) -> str:
    made = _run("token", "create", "--role", role, "--name", name, cwd=tmp_path)
    assert made.returncode == 0, made.stderr
    return made.stdout.strip()


def test_demo_query_budget_and_client(served: tuple[Path, str]) -> None:
    cwd, url = served
    token = _token(cwd, "analyst", "bob")
    env = {"BASTION_URL": url, "BASTION_TOKEN": token}
    sql = "SELECT region, COUNT(*) AS visits, AVG(income) AS mean_income FROM visits WHERE age >= 65 GROUP BY region"
    out = _run("query", sql, "--epsilon", "1", cwd=cwd, env=env)
    assert out.returncode == 0, out.stderr
    assert "north" in out.stdout and "visits 95% CI" in out.stdout and "remaining on visits" in out.stdout
    dry = _run("query", sql, "--accuracy", "50", "--dry-run", cwd=cwd, env=env)
    assert dry.returncode == 0 and "dry run" in dry.stdout and "±50" in dry.stdout
    bad = _run("query", "SELECT * FROM visits", "--epsilon", "1", cwd=cwd, env=env)
    assert bad.returncode == 1 and "query_rejected" in bad.stderr
    assert bad.stderr.startswith("error: query_rejected: ") and len(bad.stderr.strip().splitlines()) == 1
    # Value only: the quantile's cell has no interval; the JSON answer says which mode ran.
    median = "SELECT MEDIAN(age) AS m FROM visits"
    value = _run("query", median, "--epsilon", "0.5", "--no-quantile-interval", "--json", cwd=cwd, env=env)
    assert value.returncode == 0, value.stderr
    answer = json.loads(value.stdout)
    assert answer["intervals"] == [[None]] and answer["measurements"][0]["quantile_interval"] is False
    assert answer["measurements"][0]["candidates"] == 111 and answer["epsilon_spent"] == pytest.approx(0.5)
    # No ε and no accuracy: refused before anything is sent, nothing spent.
    unsaid = _run("query", sql, cwd=cwd, env=env)
    assert unsaid.returncode == 2 and "--epsilon" in unsaid.stderr and "--accuracy" in unsaid.stderr

    with Client(url, token) as client:
        frame = client.query(sql, epsilon=1)
        again = client.query(sql, epsilon=1)
        assert list(frame.columns[:3]) == ["region", "visits", "visits_low"]
        assert again.attrs["cached"] and frame.equals(again)
        valued = client.query_raw(median, epsilon=0.5, quantile_interval=False).raw
        assert valued["cached"] and valued["rows"] == answer["rows"]  # the CLI's value-only answer, from the cache
        assert client.query_raw(median, epsilon=0.5, dry_run=True).raw["measurements"][0]["quantile_interval"]
        budget = client.budget()
        # The CLI already released this answer to bob: the client gets it from the cache at no cost.
        spent = budget.set_index("dataset").loc["visits", "epsilon_spent"]  # the demo has the hospital too
        assert frame.attrs["cached"] and spent == pytest.approx(1.5)  # and 0.5 value-only
        with pytest.raises(BastionError) as info:
            client.query("SELECT COUNT(*) FROM visits", epsilon=100)
        assert info.value.code == "budget_exhausted"

    # The demo's hospital: private tables joined on the patient, with the public chapters.
    joined = (
        "SELECT c.chapter, AVG(l.value) AS mean_value FROM hospital.labs l JOIN hospital.visits v "
        "ON l.patient_id = v.patient_id AND l.visit_id = v.visit_id JOIN diagnosis_chapters c "
        "ON v.diagnosis = c.code WHERE l.test = 'crp' GROUP BY c.chapter"
    )
    out = _run("query", joined, "--epsilon", "1", cwd=cwd, env=env)
    assert out.returncode == 0, out.stderr
    assert "Diseases of the circulatory system" in out.stdout and "remaining on hospital" in out.stdout

    verify = _run("audit", "verify", cwd=cwd)
    assert verify.returncode == 0, verify.stdout + verify.stderr
    # The demo's tokens are recorded when made, as `bastion token create` records its own.
    events = _run("audit", "events", "--event", "token_created", "--format", "jsonl", cwd=cwd)
    assert events.returncode == 0, events.stderr
    made = json.loads((cwd / "bastion-workspace" / "demo-tokens.json").read_text())
    recorded = {(e["request"]["name"], e["request"]["token_id"]) for e in map(json.loads, events.stdout.splitlines())}
    expected = {(t["name"], t["token"].split("_", 2)[1]) for t in made.values()}
    assert recorded == expected | {("bob", token.split("_")[1])}


def test_register_refuses_an_unsafe_policy(tmp_path: Path) -> None:
    bad = Path(__file__).parent / "fixtures" / "policies" / "sum_without_bounds.yaml"
    out = _run("register", str(bad), "--source", str(bad), cwd=tmp_path)
    assert out.returncode == 1 and "needs bounds" in out.stderr


def test_answers_are_printed_as_text_not_as_rich_markup(capsys: pytest.CaptureFixture[str]) -> None:
    """A released key or a column alias holding rich markup (`[/x]` would end the command with a MarkupError after
    the answer was paid for; `[red]f` would show as `f`) is printed as it is."""
    from gateway.cli.main import print_answer

    raw = {
        "columns": ["[red]k", "n"],
        "rows": [["[/x]", 3], ["[red]f", 4]],
        "intervals": [[None, [1, 5]], [None, [2, 6]]],
        "alpha": 0.05,
    }
    print_answer(raw)
    out = capsys.readouterr().out
    assert "[/x]" in out and "[red]f" in out and "[red]k" in out


def test_demo_prints_evaluation_and_access_examples_that_work(tmp_path: Path) -> None:
    """The demo attaches an example model and consent records; its printed evaluation and access commands run as
    printed (the access example names units with consent, whose rows come back after approval on the host)."""
    import re
    import shlex

    made = _run("demo", "--no-serve", "--rows", "20000", cwd=tmp_path)
    assert made.returncode == 0, made.stderr
    printed = made.stdout.splitlines()
    evaluate = next(line.strip() for line in printed if line.strip().startswith("bastion evaluate "))
    request = next(line.strip() for line in printed if line.strip().startswith("bastion access request "))
    units = [int(u) for u in re.search(r"--units ([\d,]+)", request).group(1).split(",")]  # type: ignore[union-attr]
    assert "bastion access list && bastion access approve ID --rows 20 --hours 1" in made.stdout
    analyst = json.loads((tmp_path / "bastion-workspace" / "demo-tokens.json").read_text())["analyst"]["token"]
    with gateways(1, cwd=tmp_path) as (url,):
        env = {"BASTION_URL": url, "BASTION_TOKEN": analyst}
        models = _run("models", "--json", cwd=tmp_path, env=env)
        assert models.returncode == 0, models.stderr
        assert "triage-v3" in models.stdout
        evaluated = _run(*shlex.split(evaluate)[1:], cwd=tmp_path, env=env)
        assert evaluated.returncode == 0, evaluated.stderr
        assert "triage-v3" in evaluated.stdout and "senior" in evaluated.stdout
        filed = _run(*shlex.split(request)[1:], "--json", cwd=tmp_path, env=env)
        assert filed.returncode == 0, filed.stderr
        rid = json.loads(filed.stdout)["id"]
        approved = _run("access", "approve", rid, "--rows", "20", "--hours", "1", "--as", "admin-on-call", cwd=tmp_path)
        assert approved.returncode == 0, approved.stderr
        rows = _run("access", "rows", rid, "--json", cwd=tmp_path, env=env)
        assert rows.returncode == 0, rows.stderr
        answer = json.loads(rows.stdout)
        assert answer["rows"] and {r[0] for r in answer["rows"]} <= set(units)
        assert len({r[0] for r in answer["rows"]}) == len(units)  # every printed unit has consent and rows

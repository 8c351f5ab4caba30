"""How `bastion register` and `bastion append` show a version's monitoring report to the admin."""

from __future__ import annotations

from typing import Any

from rich.markup import escape

from gateway.cli.terminal import console, print_records, visible


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def show_report(report: dict[str, Any] | None) -> None:
    """A report's flagged shares per column (missing, clamped, outside the domain) and its alerts."""
    if report is None:
        return
    if report["status"] != "ok":
        console.print(f"monitoring skipped ({report.get('reason')}): the version stands, without a report")
        return
    rows = []
    for column in report["columns"]:
        row: dict[str, Any] = {"column": column["name"]}
        for cell in column["cells"]:
            if cell["of"] == "rows" and cell["kind"] != "present":
                name = {"below": "clamped low", "above": "clamped high"}.get(cell["kind"], cell["kind"])
                row[name] = f"{_pct(cell['share'])} ± {_pct(cell['half_width'])}"
        rows.append(row)
    baseline = f"against version {report['baseline']}" if report["baseline"] else "no baseline (first report)"
    console.print(f"monitoring report {report['report_id']} (ε {report['epsilon']}, {baseline})", highlight=False)
    print_records(rows, columns=["column", "missing", "clamped low", "clamped high", "outside"])
    if not report["alerts"]:
        console.print(f"no alerts ({report['tests']} tests, false-alert rate at most {report['alert_rate']})")
    for alert in report["alerts"]:
        console.print(f"[bold red]alert[/]: {escape(visible(alert['message']))}", highlight=False)
    console.print(
        f"report: GET /v1/datasets/{report['dataset']}/versions/{report['version']}/report (?format=html)",
        highlight=False,
    )

"""Python client for a Bastion gateway (httpx). Query results come back as pandas DataFrames.

pandas is imported only by the methods that build a frame (the `bastion` command renders JSON and stays light);
`gateway.frames` adds `intervals(df)` and the `df.bastion` accessor (`df.bastion.plot()`, `df.bastion.intervals()`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

import httpx

if TYPE_CHECKING:
    import pandas as pd


class BastionError(Exception):
    """An error answered by the gateway, with its stable `code` and HTTP status."""

    def __init__(self, status: int, code: str, message: str, body: dict[str, Any]) -> None:
        super().__init__(f"{code}: {message}")
        self.status = status
        self.code = code
        self.message = message
        self.body = body


@dataclass
class QueryResult:
    raw: dict[str, Any]

    @property
    def frame(self) -> pd.DataFrame:
        """One row per released group; for each noisy column `c` also `c_low` and `c_high`."""
        return result_frame(self.raw)

    @property
    def epsilon_spent(self) -> float:
        return float(self.raw["epsilon_spent"])

    @property
    def cached(self) -> bool:
        return bool(self.raw["cached"])


def result_frame(raw: dict[str, Any]) -> pd.DataFrame:
    """The answer as a frame (see `gateway.frames.result_frame`)."""
    from gateway.frames import result_frame as build

    return build(raw)


def _detail_text(detail: Any) -> str:
    """FastAPI's validation list (`[{"loc": [...], "msg": ...}]`) as one readable line: `field: problem; ...`."""
    if not isinstance(detail, list):
        return str(detail)
    parts = []
    for item in detail:
        if isinstance(item, dict):
            loc = [str(x) for x in item.get("loc", []) if x not in ("body", "query", "path")]
            msg = str(item.get("msg", item))
            parts.append(f"{'.'.join(loc)}: {msg}" if loc else msg)
        else:
            parts.append(str(item))
    return "; ".join(parts)


def error_of(resp: httpx.Response) -> BastionError:
    """The error of an answer with status >= 400, whatever its body: the error shape, FastAPI's `detail` or text."""
    try:
        body = resp.json()
    except ValueError:
        body = None
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        err = body["error"]
        return BastionError(resp.status_code, str(err.get("code", "error")), str(err.get("message", "")), body)
    if isinstance(body, dict) and "detail" in body:  # FastAPI's own shape (request validation, unknown route)
        code = "invalid_request" if resp.status_code in (400, 422) else f"http_{resp.status_code}"
        return BastionError(resp.status_code, code, _detail_text(body["detail"]), body)
    text = resp.text.strip() or resp.reason_phrase
    return BastionError(resp.status_code, f"http_{resp.status_code}", text[:500], {"text": text})


def intervals(frame: pd.DataFrame, *, keep_bounds: bool = False) -> pd.DataFrame:
    """`frame` with each `<col>_low` / `<col>_high` pair as one column `<col>_ci` of pandas `Interval`s."""
    from gateway.frames import intervals as build

    return build(frame, keep_bounds=keep_bounds)


class Client:
    def __init__(
        self,
        url: str | None = None,
        token: str | None = None,
        *,
        timeout: float = 300.0,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.url = (url or os.environ.get("BASTION_URL") or "http://127.0.0.1:8000").rstrip("/")
        token = token or os.environ.get("BASTION_TOKEN")
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._http = httpx.Client(base_url=self.url, headers=headers, timeout=timeout, transport=transport)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        resp = self._http.request(method, path, **kwargs)
        if resp.status_code >= 400:
            raise error_of(resp)
        return resp

    def _json(self, method: str, path: str, **kwargs: Any) -> Any:
        return self.request(method, path, **kwargs).json()

    def datasets(self) -> list[dict[str, Any]]:
        return self._json("GET", "/v1/datasets")

    def versions(self, dataset: str) -> list[dict[str, Any]]:
        """The dataset's versions, oldest first: version, time, row-count class, retired."""
        return self._json("GET", f"/v1/datasets/{dataset}/versions")

    def public_table(self, dataset: str, table: str, *, offset: int = 0, limit: int = 1_000) -> dict[str, Any]:
        """One page of a dataset's public table: columns, rows, total and next_offset (null on the last page)."""
        return self._json("GET", f"/v1/datasets/{dataset}/public/{table}", params={"offset": offset, "limit": limit})

    def budget_raw(self) -> list[dict[str, Any]]:
        """Your spend, limit and remaining budget per dataset (the JSON answer of GET /v1/budget)."""
        return self._json("GET", "/v1/budget")

    def budget(self) -> pd.DataFrame:
        import pandas as pd

        rows = self.budget_raw()
        return pd.DataFrame(
            [
                {
                    "dataset": b["dataset"],
                    "epsilon_spent": b["spent"]["epsilon"],
                    "epsilon_remaining": b["remaining"]["epsilon"],
                    "delta_spent": b["spent"]["delta"],
                    "delta_remaining": b["remaining"]["delta"],
                    # zCDP accounting caps ρ (None on a dataset with pure ε accounting)
                    "accounting": b.get("accounting", "pure"),
                    "rho_spent": b["spent"].get("rho"),
                    "rho_remaining": b["remaining"].get("rho"),
                }
                for b in rows
            ]
        )

    def query_raw(
        self,
        sql: str,
        *,
        epsilon: float | None = None,
        accuracy: float | dict[str, float] | None = None,
        alpha: float | None = None,
        delta: float | None = None,
        dry_run: bool = False,
        quantile_interval: bool = True,
        version: str | None = None,
    ) -> QueryResult:
        """The JSON answer of POST /v1/query; `quantile_interval=False` releases quantiles' values only; `version`
        pins the dataset version read (default: the latest; the answer's `version` says which it read)."""
        body = {
            "sql": sql,
            "epsilon": epsilon,
            "accuracy": accuracy,
            "alpha": alpha,
            "delta": delta,
            "dry_run": dry_run,
            "quantile_interval": None if quantile_interval else False,
            "version": version,
        }
        return QueryResult(self._json("POST", "/v1/query", json={k: v for k, v in body.items() if v is not None}))

    def query(self, sql: str, **kwargs: Any) -> pd.DataFrame:
        """The DP answer as a DataFrame (columns plus `<col>_low` / `<col>_high`); metadata in `.attrs`."""
        result = self.query_raw(sql, **kwargs)
        frame = result.frame
        frame.attrs.update({k: v for k, v in result.raw.items() if k not in {"rows", "intervals"}})
        return frame

    # --- synthetic proxies --------------------------------------------------------------------------------

    def synth_submit(
        self,
        dataset: str,
        *,
        epsilon: float | None = None,
        rows: int = 10_000,
        seed: int | None = None,
        method: str | None = None,
        delta: float | None = None,
        version: str | None = None,
        table: str | None = None,
        join: str | None = None,
        join_on: str | None = None,
        join_private: str | None = None,
    ) -> dict[str, Any]:
        """Start a proxy job (the ε is charged now; an identical earlier request is returned at no cost); `version`
        pins the dataset version it reads (default: the latest at submission). `table` makes it a proxy of a private
        table of a dataset of several tables, `join_private` joins another private table to it on the unit,
        `join`/`join_on` a public table on its unique key."""
        body = {
            "dataset": dataset,
            "epsilon": epsilon,
            "rows": rows,
            "seed": seed,
            "method": method,
            "delta": delta,
            "version": version,
            "table": table,
            "join": join,
            "join_on": join_on,
            "join_private": join_private,
        }
        return self._json("POST", "/v1/synth", json={k: v for k, v in body.items() if v is not None})

    def synth_status(self, job_id: str) -> dict[str, Any]:
        return self._json("GET", f"/v1/synth/{job_id}")

    def synth_download(self, job_id: str, format: str = "parquet") -> bytes:
        return self.request("GET", f"/v1/synth/{job_id}/download", params={"format": format}).content

    def synth_report(self, job_id: str) -> dict[str, Any]:
        return self._json("GET", f"/v1/synth/{job_id}/report")

    def synth_report_page(self, job_id: str, page: str) -> str:
        """One HTML page of a proxy's report (`index.html` or a name listed in the report's `pages`)."""
        return self.request("GET", f"/v1/synth/{job_id}/report/{page}").text

    def synth(
        self,
        dataset: str,
        *,
        epsilon: float | None = None,
        rows: int = 10_000,
        seed: int | None = None,
        method: str | None = None,
        delta: float | None = None,
        poll: float = 0.5,
        timeout: float = 3600.0,
        table: str | None = None,
        join: str | None = None,
        join_on: str | None = None,
        join_private: str | None = None,
    ) -> pd.DataFrame:
        """A synthetic proxy of `dataset` (or of its private `table`, with the public table `join` joined on
        `join_on`) as a DataFrame (waits for the job); job metadata in `.attrs`."""
        import io
        import time

        job = self.synth_submit(
            dataset,
            epsilon=epsilon,
            rows=rows,
            seed=seed,
            method=method,
            delta=delta,
            table=table,
            join=join,
            join_on=join_on,
            join_private=join_private,
        )
        deadline = time.monotonic() + timeout
        while job["status"] not in ("done", "failed", "withheld"):
            if time.monotonic() > deadline:
                raise TimeoutError(f"synthesis job {job['job_id']} is still {job['status']}")
            time.sleep(poll)
            job = self.synth_status(job["job_id"])
        if job["status"] != "done":
            raise BastionError(409, f"synth_job_{job['status']}", job.get("error") or job["status"], job)
        import pandas as pd

        frame = pd.read_parquet(io.BytesIO(self.synth_download(job["job_id"])))
        frame.attrs.update(job)
        return frame

    def lf_registry(self) -> list[dict[str, Any]]:
        """Registered (reviewed) Python labeling functions you may name in `python_lfs`."""
        return self._json("GET", "/v1/lf/registry")

    def lf_stats_raw(
        self,
        dataset: str,
        lfs: list[dict[str, Any]] | None = None,
        *,
        python_lfs: list[str] | None = None,
        epsilon: float = 1.0,
        alpha: float | None = None,
        label_model: bool = False,
        dry_run: bool = False,
        table: str | None = None,
        join: str | None = None,
        join_on: str | None = None,
        join_private: str | None = None,
    ) -> dict[str, Any]:
        """The JSON answer of POST /v1/lf/stats; `table`, `join`, `join_on`, `join_private` run the LFs over a
        private table of a dataset of several tables and its joins (README "Labeling functions")."""
        body = {
            "dataset": dataset,
            "lfs": lfs or [],
            "python_lfs": python_lfs or [],
            "epsilon": epsilon,
            "alpha": alpha,
            "label_model": label_model,
            "dry_run": dry_run,
            "table": table,
            "join": join,
            "join_on": join_on,
            "join_private": join_private,
        }
        return self._json("POST", "/v1/lf/stats", json={k: v for k, v in body.items() if v is not None})

    def lf_stats(self, dataset: str, lfs: list[dict[str, Any]] | None = None, **kwargs: Any) -> pd.DataFrame:
        """DP LF statistics shaped like Snorkel's lf_summary() (Polarity, Coverage, Overlaps, Conflicts, Correct,
        Incorrect, Emp. Acc.) with `<column>_low` / `<column>_high` intervals; the full answer in `.attrs`."""
        from labeling_functions.report import summary_frame

        return summary_frame(self.lf_stats_raw(dataset, lfs, **kwargs))

    def lf_set_save(
        self,
        name: str,
        dataset: str,
        lfs: list[dict[str, Any]] | None = None,
        *,
        python_lfs: list[str] | None = None,
        epsilon: float,
        cap: float,
        alert_rate: float | None = None,
    ) -> dict[str, Any]:
        """Save an LF set (POST /v1/lf/sets): computed now at the latest version, then at every new version, charged
        to you until `cap`; the answer is the set with its history."""
        body = {
            "name": name,
            "dataset": dataset,
            "lfs": lfs or [],
            "python_lfs": python_lfs or [],
            "epsilon": epsilon,
            "cap": cap,
            "alert_rate": alert_rate,
        }
        return self._json("POST", "/v1/lf/sets", json={k: v for k, v in body.items() if v is not None})

    def lf_sets(self) -> list[dict[str, Any]]:
        """Your LF sets (GET /v1/lf/sets)."""
        return self._json("GET", "/v1/lf/sets")

    def lf_set(self, set_id: str) -> dict[str, Any]:
        """One of your LF sets with its history per version and the changes beyond noise (GET /v1/lf/sets/{id})."""
        return self._json("GET", f"/v1/lf/sets/{quote(set_id, safe='')}")

    def lf_set_delete(self, set_id: str) -> dict[str, Any]:
        """Stop following and remove one of your LF sets (DELETE /v1/lf/sets/{id})."""
        return self._json("DELETE", f"/v1/lf/sets/{quote(set_id, safe='')}")

    # --- model evaluation -----------------------------------------------------------------------------------

    def evaluate_raw(
        self,
        dataset: str,
        model: str | list[str],
        *,
        slices: list[str] | None = None,
        metrics: list[str] | None = None,
        per_class: bool = True,
        epsilon: float | None = None,
        accuracy: float | None = None,
        alpha: float | None = None,
        dry_run: bool = False,
    ) -> dict[str, Any]:
        """The JSON answer of POST /v1/evaluate (`model` a name, or a list of names to compare in one release)."""
        body: dict[str, Any] = {
            "dataset": dataset,
            **({"models": list(model)} if isinstance(model, list) else {"model": model}),
            "slices": slices or [],
            "metrics": metrics,
            "per_class": per_class,
            "epsilon": epsilon,
            "accuracy": accuracy,
            "alpha": alpha,
            "dry_run": dry_run,
        }
        return self._json("POST", "/v1/evaluate", json={k: v for k, v in body.items() if v is not None})

    def evaluate(self, dataset: str, model: str | list[str], **kwargs: Any) -> pd.DataFrame:
        """DP evaluation as a DataFrame: one row per model × slice value × metric (and class), with its value and
        interval (`low`, `high`); the full answer (confusion matrices, cost) in `.attrs`."""
        import pandas as pd

        raw = self.evaluate_raw(dataset, model, **kwargs)
        columns = ["model", "slice", "slice_value", "metric", "class", "value", "low", "high", "noise_dominated"]
        rows = [
            [m["model"], m["slice"], m["value"], m["metric"], m["class"], m["estimate"], m["low"], m["high"]]
            + [m["noise_dominated"]]
            for m in raw.get("metrics") or []
        ]
        frame = pd.DataFrame(rows, columns=columns)
        frame.attrs.update(raw)
        return frame

    def evaluation_card(self, evaluation_id: str, format: str = "html") -> str:
        """The DP model card of one of your evaluations (its answer's `evaluation_id`), as HTML or Markdown."""
        return self.request("GET", f"/v1/evaluate/{evaluation_id}/card", params={"format": format}).text

    def models(self) -> list[dict[str, Any]]:
        """The models whose predictions are attached, per dataset you may evaluate on (GET /v1/models)."""
        return self._json("GET", "/v1/models")

    # --- consented debug access -------------------------------------------------------------------------

    def access_request(
        self, dataset: str, units: list[int | str], purpose: str, *, scope: str | None = None
    ) -> dict[str, Any]:
        """File a request for rows of `units` (pending until an admin approves it on the gateway host)."""
        body: dict[str, Any] = {"dataset": dataset, "units": units, "purpose": purpose}
        if scope is not None:
            body["scope"] = scope
        return self._json("POST", "/v1/access/requests", json=body)

    def access_status(self, request_id: str) -> dict[str, Any]:
        """Your access request's status, expiry and rows left."""
        return self._json("GET", f"/v1/access/requests/{request_id}")

    def access_rows_raw(self, request_id: str) -> dict[str, Any]:
        """The JSON answer of GET /v1/access/requests/{id}/rows (each call counts its rows against the cap)."""
        return self._json("GET", f"/v1/access/requests/{request_id}/rows")

    def access_rows(self, request_id: str) -> pd.DataFrame:
        """The rows of your approved request's consented units, as a DataFrame (the answer in `frame.attrs`)."""
        import pandas as pd

        raw = self.access_rows_raw(request_id)
        frame = pd.DataFrame(raw["rows"], columns=raw["columns"])
        frame.attrs.update({k: v for k, v in raw.items() if k != "rows"})
        return frame

    # --- audit log (auditor role) ---------------------------------------------------------------------------

    @staticmethod
    def _filters(filters: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in filters.items() if v is not None}

    def audit_events(self, *, limit: int = 100, offset: int = 0, **filters: Any) -> list[dict[str, Any]]:
        """Audit records in log order; filters: since, until (ISO 8601), actor, dataset, event, decision."""
        params = {**self._filters(filters), "limit": limit, "offset": offset}
        return self._json("GET", "/v1/audit/events", params=params)["events"]

    def audit_event(self, seq: int) -> dict[str, Any]:
        """Record `seq` with its inclusion proof against the latest checkpoint."""
        return self._json("GET", f"/v1/audit/events/{seq}")

    def audit_export(self, format: str = "jsonl", **filters: Any) -> str:
        """Matching records as canonical JSON Lines or CSV text."""
        return self.request("GET", "/v1/audit/export", params={**self._filters(filters), "format": format}).text

    def audit_access(self) -> list[dict[str, Any]]:
        """Consented row accesses as the log tells them (auditor): purpose, requester, approver, rows released."""
        return self._json("GET", "/v1/audit/access")

    def audit_spend(self, **filters: Any) -> dict[str, Any]:
        """Privacy spend per principal and dataset over time, totals against the caps (filters: since, until,
        actor, dataset)."""
        return self._json("GET", "/v1/audit/spend", params=self._filters(filters))

    def audit_verify(self) -> dict[str, Any]:
        """The gateway's verification of its log: ok, status, verdict, first bad record, last checkpoint."""
        return self._json("GET", "/v1/audit/verify")

    def audit_latest_checkpoint(self) -> dict[str, Any]:
        return self._json("GET", "/v1/audit/checkpoints/latest")

    def audit_checkpoint(self) -> dict[str, Any]:
        """Have the gateway sign a checkpoint of its log now; keep the answer as an anchor."""
        return self._json("POST", "/v1/audit/checkpoints")

    def audit_consistency(self, old: int, new: int | None = None) -> dict[str, Any]:
        """Consistency proof from the checkpoint of tree size `old` to `new` (default: the latest)."""
        return self._json("GET", "/v1/audit/checkpoints/consistency", params=self._filters({"old": old, "new": new}))

"""Python client for a Bastion gateway (httpx). Query results come back as pandas DataFrames."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import httpx
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
    columns = raw["columns"]
    rows = raw.get("rows") or []
    intervals = raw.get("intervals") or [[None] * len(columns) for _ in rows]
    data: dict[str, list[Any]] = {c: [r[i] for r in rows] for i, c in enumerate(columns)}
    out: dict[str, list[Any]] = {}
    for i, c in enumerate(columns):
        out[c] = data[c]
        cells = [iv[i] for iv in intervals]
        if any(cell is not None for cell in cells):
            out[f"{c}_low"] = [cell[0] if cell else None for cell in cells]
            out[f"{c}_high"] = [cell[1] if cell else None for cell in cells]
    return pd.DataFrame(out)


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
            try:
                body = resp.json()
                err = body.get("error", {})
                code, message = err.get("code", "error"), err.get("message", resp.text)
                if "detail" in body:  # FastAPI request validation
                    code, message = "invalid_request", str(body["detail"])
            except ValueError:
                body, code, message = {}, "error", resp.text
            raise BastionError(resp.status_code, code, message, body)
        return resp

    def _json(self, method: str, path: str, **kwargs: Any) -> Any:
        return self.request(method, path, **kwargs).json()

    def datasets(self) -> list[dict[str, Any]]:
        return self._json("GET", "/v1/datasets")

    def budget(self) -> pd.DataFrame:
        rows = self._json("GET", "/v1/budget")
        return pd.DataFrame(
            [
                {
                    "dataset": b["dataset"],
                    "epsilon_spent": b["spent"]["epsilon"],
                    "epsilon_remaining": b["remaining"]["epsilon"],
                    "delta_spent": b["spent"]["delta"],
                    "delta_remaining": b["remaining"]["delta"],
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
    ) -> QueryResult:
        body = {"sql": sql, "epsilon": epsilon, "accuracy": accuracy, "alpha": alpha, "delta": delta,
                "dry_run": dry_run}
        return QueryResult(self._json("POST", "/v1/query", json={k: v for k, v in body.items() if v is not None}))

    def query(self, sql: str, **kwargs: Any) -> pd.DataFrame:
        """The DP answer as a DataFrame (columns plus `<col>_low` / `<col>_high`); metadata in `.attrs`."""
        result = self.query_raw(sql, **kwargs)
        frame = result.frame
        frame.attrs.update({k: v for k, v in result.raw.items() if k not in {"rows", "intervals"}})
        return frame

"""Routes of the analyst's queries: datasets, one DP query, budgets."""

from __future__ import annotations

import json
from typing import Annotated, Any

from fastapi import APIRouter, Query
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field

from gateway.http.dependencies import ERRORS, REQUEST_CONFIG, Core, Ctx, Number
from gateway.service import MAX_PUBLIC_PAGE_ROWS, PUBLIC_PAGE_ROWS


class QueryRequest(BaseModel):
    model_config = REQUEST_CONFIG
    sql: str = Field(description="one aggregate SELECT over one dataset")
    epsilon: Number | None = Field(
        default=None,
        description="privacy loss to spend, 0.001 to 1000 (give this or accuracy), split equally over the "
        "query's measurements; on a dataset with zCDP accounting the query costs rho = epsilon²/2",
    )
    accuracy: Number | dict[str, Number] | None = Field(
        default=None,
        description="target half-width of the confidence interval of the first COUNT/SUM output column, or "
        "{column: half-width, ...} naming one or more COUNT/SUM output columns; Bastion derives epsilon (rho "
        "under zCDP): each targeted measurement gets exactly what its target needs, and the measurements no target "
        "names (and private key selection) get the smallest of those, so that one target prices the whole query "
        "as before and further targets only add what they need",
    )
    alpha: Number | None = Field(default=None, description="1 - confidence level, in [1e-9, 1) (default 0.05)")
    delta: Number | None = Field(
        default=None,
        description="δ for private key selection, 1e-30 to 0.1 [default: your per-principal δ in the proportion of "
        "this request's ε (ρ under zCDP) to your per-principal ε (ρ)]",
    )
    dry_run: bool = Field(default=False, description="report cost and accuracy without spending")
    quantile_interval: bool = Field(
        default=True,
        description="false: release each quantile's value only, by one selection spending the quantile's whole "
        "epsilon (more accurate), with no interval (its cell is null); true (default): the value with its interval",
    )
    version: str | None = Field(
        default=None,
        max_length=64,
        description="the dataset version to read (GET /v1/datasets/{dataset}/versions lists them); default: the "
        "latest. A retired version is refused (410 version_retired)",
    )


class Budget(BaseModel):
    dataset: str
    accounting: str = Field(
        description="pure (ε and δ add up) or zcdp (ρ adds up, capped at the ρ whose (ε, δ/2) conversion fits the "
        "declared (ε, δ); δ/2 is left for key selection); under zcdp spent, limit and remaining also give rho"
    )
    spent: dict[str, float]
    limit: dict[str, float]
    remaining: dict[str, float]
    periods: dict[str, dict[str, dict[str, float]]] | None = Field(
        default=None,
        description="a dataset with periods only: per period its own spent, limit and remaining (each period has "
        "its own budget); spent, limit and remaining above are then those of the period with the most spent",
    )


class QueryResponse(BaseModel):
    model_config = ConfigDict(extra="allow")
    query_id: str
    dataset: str
    version: str = Field(description="the dataset version this answer read (every statement of it read that one)")
    columns: list[str]
    rows: list[list[Any]] | None = None
    intervals: list[list[list[float] | None]] | None = Field(
        default=None, description="per cell [low, high] at confidence 1-alpha, null for exact or keys"
    )
    alpha: float
    accounting: str = Field(description="the dataset's accounting: pure or zcdp")
    epsilon: float = Field(description="cost of this query (pure accounting; 0 under zcdp, whose cost is rho)")
    delta: float
    rho: float | None = Field(default=None, description="cost of this query in ρ (zcdp accounting only)")
    epsilon_spent: float = Field(description="what this request actually spent (0 when cached or dry run)")
    delta_spent: float
    rho_spent: float | None = Field(default=None, description="ρ this request spent (zcdp accounting only)")
    costs: dict[str, dict[str, Any]] | None = Field(
        default=None,
        description="dry run only: the cost under each accounting, pure {epsilon, delta} and zcdp {rho, delta, "
        "epsilon_equivalent, delta_equivalent} (the (ε, δ) the ρ is worth at half the policy's δ)",
    )
    periods: list[str] | None = Field(
        default=None,
        description="a dataset with periods only: the periods this query may read, each charged its whole cost "
        "(only their rows are read)",
    )
    cost_per_period: dict[str, dict[str, float]] | None = Field(
        default=None, description="dry run on a dataset with periods only: the cost each period's budget is charged"
    )
    cached: bool
    dry_run: bool
    budget: Budget
    accuracy: dict[str, float | None] | None = None
    measurements: list[dict[str, Any]] = Field(
        default=[],
        description="per primitive measurement: its mechanism (discrete_laplace, discrete_gaussian, "
        "report_noisy_max), its own epsilon (and rho under zcdp), its sensitivity (L2 for the Gaussian) and accuracy",
    )
    notes: list[str] = []
    warnings: list[str] = Field(
        default=[], description="advice on the query's form, e.g. to bin a continuous GROUP BY column"
    )
    flags: list[list[list[str]]] | None = Field(
        default=None,
        description="per cell, like rows: flags computed from DP outputs and public parameters only; "
        "'noise_dominated' when the interval's half-width exceeds the value's magnitude, the value is null for "
        "want of rows, or a quantile's interval is its column's whole bounds or its group has a noisy row count "
        "below the quantile's public threshold",
    )


router = APIRouter(prefix="/v1", responses=ERRORS)


@router.get("/datasets", summary="Datasets you may use, with their public schema (never a count)")
def list_datasets(ctx: Ctx, bastion: Core) -> list[dict[str, Any]]:
    return bastion.datasets(ctx)


class DatasetVersion(BaseModel):
    version: str = Field(description="the version's serial (registration and appends counted) and a random suffix")
    time: str = Field(description="when it was made (UTC, ISO 8601)")
    rows: str = Field(description="the power-of-ten class of the batch's row count as the admin supplied it")
    retired: bool = Field(description="retired versions are refused to requests that pin them")


@router.get(
    "/datasets/{dataset}/versions",
    response_model=list[DatasetVersion],
    summary="A dataset's versions, oldest first (one per registration and per append)",
)
def list_versions(dataset: str, ctx: Ctx, bastion: Core) -> list[dict[str, Any]]:
    return bastion.versions(ctx, dataset)


class PublicRows(BaseModel):
    dataset: str
    table: str
    columns: list[str]
    rows: list[list[Any]] = Field(description="one page of the table's rows, in a fixed order (sorted by its columns)")
    offset: int
    limit: int
    total: int = Field(description="rows in the table (public: the table is)")
    next_offset: int | None = Field(description="offset of the next page, null on the last page")


@router.get(
    "/datasets/{dataset}/public/{table}",
    response_model=PublicRows,
    summary="Rows of a public table of a dataset (public data: audited as public_read, never charged)",
)
def public_rows(
    dataset: str,
    table: str,
    ctx: Ctx,
    bastion: Core,
    offset: Annotated[int, Query(ge=0, description="first row of the page")] = 0,
    limit: Annotated[
        int, Query(ge=1, le=MAX_PUBLIC_PAGE_ROWS, description=f"rows per page, at most {MAX_PUBLIC_PAGE_ROWS:,}")
    ] = PUBLIC_PAGE_ROWS,
) -> dict[str, Any]:
    return bastion.public_table(ctx, dataset, table, offset=offset, limit=limit)


@router.post("/query", response_model=QueryResponse, summary="Differentially private answer to one SQL query")
def run_query(body: QueryRequest, ctx: Ctx, bastion: Core) -> Response:
    answer = bastion.query(
        ctx,
        body.sql,
        epsilon=body.epsilon,
        accuracy=body.accuracy,
        alpha=body.alpha,
        delta=body.delta,
        dry_run=body.dry_run,
        quantile_interval=body.quantile_interval,
        version=body.version,
    )
    # The answer is built by Bastion in the documented shape; encode it directly instead of re-validating it.
    return Response(json.dumps(answer, separators=(",", ":"), allow_nan=False), media_type="application/json")


@router.get("/budget", response_model=list[Budget], summary="Your spend and remaining budget per dataset")
def budget(ctx: Ctx, bastion: Core) -> list[dict[str, Any]]:
    return bastion.budgets(ctx)

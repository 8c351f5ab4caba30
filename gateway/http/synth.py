"""HTTP routes of synthetic proxies (thin: parse, call `SynthJobs`, render)."""

from __future__ import annotations

import threading
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Request
from fastapi.responses import FileResponse, HTMLResponse
from pydantic import BaseModel, ConfigDict, Field

from gateway.http.dependencies import ERRORS, REQUEST_CONFIG, Core, Ctx, ErrorResponse, Number
from gateway.synth_jobs import MAX_ROWS, SWEEP_SECONDS, SynthJobs

_create_lock = threading.Lock()


def jobs_of(state: Any, bastion: Core) -> SynthJobs:
    """The app's job manager, made when the app starts serving or on first use: unfinished jobs whose runner is
    gone resume then, and its sweep resumes those of runners that die later (on any replica) every SWEEP_SECONDS."""
    with _create_lock:
        jobs = getattr(state, "synth_jobs", None)
        if jobs is None or jobs.bastion is not bastion:
            if jobs is not None:
                jobs.close()
            jobs = SynthJobs(bastion, sweep=SWEEP_SECONDS)
            state.synth_jobs = jobs
            jobs.resume()
    return jobs


def get_jobs(request: Request, bastion: Core) -> SynthJobs:
    return jobs_of(request.app.state, bastion)


Jobs = Annotated[SynthJobs, Depends(get_jobs)]


class SynthRequest(BaseModel):
    model_config = REQUEST_CONFIG
    dataset: str
    epsilon: Number | None = Field(
        default=None, description="privacy loss of a DP proxy, 0.001 to 1000 (required for DP)"
    )
    rows: int = Field(default=10_000, ge=1, le=MAX_ROWS, description="rows of the proxy")
    seed: int | None = Field(default=None, ge=0, lt=2**31, description="sampling seed (post-processing)")
    method: str | None = Field(
        default=None,
        description="dpcopula (default: DP copula, then SDV), dpcopula_direct (DP copula only), or "
        "sdv_gaussian_copula (NOT DP: needs the policy's opt-in and an admin approval)",
    )
    delta: Number | None = Field(
        default=None,
        description="δ for key selection of columns without a public domain [default: a tenth of your per-principal δ]",
    )
    version: str | None = Field(
        default=None,
        max_length=64,
        description="the dataset version to synthesise from (GET /v1/datasets/{dataset}/versions); default: the "
        "latest at submission. The job reads that version whenever it runs",
    )
    table: str | None = Field(
        default=None,
        max_length=64,
        description="a private table of a dataset of several tables (its `private_tables`; the dataset's own table "
        "by its name): a proxy of that table, each proxy row standing for one of its bounded rows (joined with "
        "`join`), measured at its max_rows_per_unit. Default: the dataset's own table",
    )
    join: str | None = Field(
        default=None,
        max_length=64,
        description="a public table of the dataset joined on its unique key (with join_on): adds its columns, "
        "sensitivity unchanged; a table without a unique key is refused",
    )
    join_on: str | None = Field(
        default=None, max_length=64, description="the column of `table` matched with the public table's unique key"
    )
    join_private: str | None = Field(
        default=None,
        max_length=64,
        description="a further private table (or the dataset's own, by its name) joined with `table` on the "
        "privacy unit: one proxy row per joined row, measured at the product of the two tables' bounds (or the "
        "policy's max_joined_rows_per_unit, truncated to it)",
    )


class SynthJob(BaseModel):
    model_config = ConfigDict(extra="allow")
    job_id: str
    dataset: str
    method: str
    non_dp: bool
    status: str = Field(description="queued, awaiting_approval, approved, running, done, failed or withheld")
    progress: float = Field(description="fraction done, 0..1")
    stage: str
    epsilon: float
    delta: float
    rows: int
    seed: int
    dataset_version: str
    policy_fingerprint: str
    tables: dict[str, Any] | None = Field(
        default=None,
        description="the private table (and joined public table) the proxy is of, its FROM, its rows per unit (the "
        "sensitivity's k) and columns; null for the dataset's own table",
    )


router = APIRouter(prefix="/v1/synth", tags=["synthetic proxies"], responses=ERRORS)

SUBMIT_ERRORS: dict[int | str, dict[str, Any]] = {
    400: {
        "model": ErrorResponse,
        "description": "invalid request; reason uncalibrated: OpenDP cannot calibrate the proxy's measurements at "
        "this ε and δ (the error's `allowed` gives the range that works)",
    },
    429: {
        "model": ErrorResponse,
        "description": "budget_exhausted: the privacy budget would be exceeded; too_many_jobs: you already have "
        "the most unfinished jobs one principal may have (setting synth_jobs_per_principal, default 1)",
    },
}


@router.post(
    "",
    response_model=SynthJob,
    summary="Start a synthetic proxy job (the ε is charged now)",
    responses=SUBMIT_ERRORS,
)
def submit(body: SynthRequest, ctx: Ctx, jobs: Jobs) -> dict[str, Any]:
    return jobs.submit(
        ctx,
        body.dataset,
        epsilon=body.epsilon,
        rows=body.rows,
        seed=body.seed,
        method=body.method,
        delta=body.delta,
        version=body.version,
        table=body.table,
        join=body.join,
        join_on=body.join_on,
        join_private=body.join_private,
    )


@router.get("", response_model=list[SynthJob], summary="Your synthetic proxy jobs")
def list_jobs(ctx: Ctx, jobs: Jobs) -> list[dict[str, Any]]:
    return jobs.owned_by(ctx)


@router.get("/{job_id}", response_model=SynthJob, summary="Status and progress of a job")
def status(job_id: str, ctx: Ctx, jobs: Jobs) -> dict[str, Any]:
    return jobs.status(ctx, job_id)


NOT_READY: dict[int | str, dict[str, Any]] = {
    409: {"model": ErrorResponse, "description": "synth_job_not_ready: the job has not finished (see its status)"}
}


@router.get(
    "/{job_id}/download", summary="The proxy table (Parquet or CSV)", response_class=FileResponse, responses=NOT_READY
)
def download(job_id: str, ctx: Ctx, jobs: Jobs, format: Literal["parquet", "csv"] = "parquet") -> FileResponse:
    path, media = jobs.download(ctx, job_id, format)
    return FileResponse(path, media_type=media, filename=f"proxy-{job_id[:8]}.{format}")


@router.get(
    "/{job_id}/report", summary="Fidelity report (from the DP measurements and the proxy only)", responses=NOT_READY
)
def report(job_id: str, ctx: Ctx, jobs: Jobs) -> dict[str, Any]:
    return jobs.report(ctx, job_id)


@router.get(
    "/{job_id}/report/{page}", response_class=HTMLResponse, summary="One HTML page of the report", responses=NOT_READY
)
def report_page(job_id: str, page: str, ctx: Ctx, jobs: Jobs) -> HTMLResponse:
    return HTMLResponse(jobs.page(ctx, job_id, page))

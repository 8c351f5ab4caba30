"""Synthetic-proxy jobs: submission through the privileged sequence, background runs, durable job records.

A request is admitted through `Bastion.run_private`: authorise (grant `synth`) → cache lookup (an identical
request returns the stored proxy's job at no cost) → ledger charge of the whole ε (and δ) → audit "admitted" →
the job record is written → audit "released" (of the job id). Only then does a background thread measure the
DP model and build the proxy; a request over budget is refused before anything runs. Completion, a withheld
non-DP proxy, each download, each report read and each approval are audited too.

A job's files live in `<id>/` under `Settings.synth_jobs_dir` (`<workspace>/synth/jobs`, or `synth/jobs` in the
shared directory that replicas mount): the DP model, the proxy, its report, written atomically, mode 0600 in
directories of mode 0700. Its record (its state) is in the job store (gateway/stores/jobs.py): job.json in the same
directory by default, or the PostgreSQL store's table that every replica reads. After a crash, unfinished jobs
resume under their original charge: the DP model, once measured, is stored and reused (the first model stored
wins: a second runner's is discarded unused), so resuming never measures twice what was released; measurements lost
in a crash were never released. A job is run by whichever process holds its lease from the job store (the lock
file of its directory, or an advisory lock on PostgreSQL, which ends with its process on any host).

A principal may have at most `Settings.synth_jobs_per_principal` unfinished jobs (queued, approved or running),
counted under the job store's admission lock among every process using the store; another request is refused
before the charge with 429 `too_many_jobs` (an identical repeat, answered from the cache, is not a new job). A
job's failure is durable even on a full disk: on the file store each job directory holds a small preallocated file
(`failed`) that the failure handler overwrites in place, which needs no new space (on PostgreSQL, the record's
`failure` column); failing that, the gateway keeps the failure in memory. A job read with a recorded failure is
failed, whatever its record says, so it is not resumed at the next start.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import enum
import hashlib
import json
import logging
import os
import secrets
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from audit.record import Event
from gateway.service import Bastion, Context
from gateway.sql.price import default_delta
from gateway.stores import jobs as job_files
from gateway.stores.base import open_job_store
from gateway.stores.cache import cache_key
from gateway.stores.jobs import Lease, LeaseLost
from gateway.stores.tokens import Principal
from policies.accountant import PrivacyLoss, check_delta, check_epsilon
from policies.errors import Conflict, Forbidden, GatewayError, InvalidRequest, NotFound, VersionNotFound, VersionRetired
from policies.reader import EmptyReader
from policies.schema import Grant, bounded_table

log = logging.getLogger("bastion.synth")

MAX_ROWS = 5_000_000
FORMATS = ("parquet", "csv")


# Statuses: queued → running → done | failed; non-DP: awaiting_approval → approved → running → done | withheld.
class JobStatus(enum.StrEnum):
    """A synthesis job's state (stored and shown as its value)."""

    AWAITING_APPROVAL = "awaiting_approval"  # a non-DP job until an admin approves it on the host
    QUEUED = "queued"
    APPROVED = "approved"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    WITHHELD = "withheld"  # a non-DP proxy that failed the disclosure check: nothing released


ACTIVE = (JobStatus.QUEUED, JobStatus.APPROVED, JobStatus.RUNNING)


class NonDpNotAllowed(Forbidden):
    code = "non_dp_not_allowed"


class JobNotFound(NotFound):
    code = "synth_job_not_found"


class JobNotReady(Conflict):
    code = "synth_job_not_ready"


class TooManyJobs(GatewayError):
    status = 429
    code = "too_many_jobs"


SWEEP_SECONDS = 15.0  # a serving gateway looks for unfinished jobs that no process runs this often
RETRY_SECONDS = 2.0  # a job another process holds is tried again after this long (on a status read or a listing)


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat()


def _write_json(path: Path, payload: Any) -> None:
    job_files.write_json(path, payload)


def _keep_first(path: Path, payload: Any) -> Any:
    """Store `payload` at `path` unless something is there already: None if stored, else what is there."""
    tmp = path.with_name(f"{path.name}.{uuid.uuid4().hex}.new")
    _write_json(tmp, payload)
    try:
        os.link(tmp, path)  # fails if `path` exists, atomically (on a network file system too)
    except FileExistsError:
        return json.loads(path.read_text())
    finally:
        tmp.unlink(missing_ok=True)
    return None


def _restrict(directory: Path) -> None:
    """Mode 0700 for `directory` and the directories in it, 0600 for its files: they derive from private rows."""
    for path in (directory, *directory.rglob("*")):
        with contextlib.suppress(FileNotFoundError):  # a temporary file renamed meanwhile
            os.chmod(path, 0o700 if path.is_dir() else 0o600)


def _of(job: dict[str, Any]) -> str:
    """What a job's proxy is of: the dataset, or its private table (and the joined public table)."""
    source = job.get("tables")
    if not source:
        return str(job["dataset"])
    joined = f" ⋈ {source['join']}" if source.get("join") else ""
    return f"{job['dataset']}.{source['table']}{joined}"


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


PUBLIC_FIELDS = (
    "job_id",
    "dataset",
    "method",
    "non_dp",
    "status",
    "progress",
    "stage",
    "epsilon",
    "delta",
    "rows",
    "seed",
    "dataset_version",
    "policy_fingerprint",
    "created",
    "updated",
    "error",
    "columns",
    "proxy_digest",
    "approved_at",
    "allocation",
    "notes",
    "tables",
)


class SynthJobs:
    """Synthetic-proxy jobs of one gateway (one per app, created on first use)."""

    def __init__(self, bastion: Bastion, *, sweep: float | None = None) -> None:
        """`sweep`: every this many seconds, resume the unfinished jobs no process runs (a serving gateway's
        manager does, so a job whose runner died on any replica goes on without anybody looking at it)."""
        self.bastion = bastion
        settings = bastion.settings
        self.root = settings.synth_jobs_dir
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.store = open_job_store(settings)
        if self.store.location != str(self.root) and settings.shared_dir is None:
            log.warning(
                "synthesis job records are in the shared store but their files in this workspace: give every "
                "replica the same --shared-dir (BASTION_SHARED_DIR) so that each one can serve every job"
            )
        self._threads: dict[str, threading.Thread] = {}
        self._lock = threading.Lock()
        self._failed: dict[str, dict[str, Any]] = {}  # failures that could not be written at all (disk full)
        self._tried: dict[str, float] = {}  # when a job held by another process was last tried
        self._leases: dict[str, Lease] = {}  # the jobs this process runs now
        self._closing = threading.Event()
        self._sweeper: threading.Thread | None = None
        if sweep is not None:
            self._sweeper = threading.Thread(target=self._sweep, args=(sweep,), daemon=True, name="synth-sweep")
            self._sweeper.start()

    def _sweep(self, every: float) -> None:
        while not self._closing.wait(every):
            try:
                self.resume()
            except Exception as exc:  # noqa: BLE001 - a store out of reach now: tried again at the next sweep
                log.warning("synthesis jobs could not be swept for unfinished ones (%s)", type(exc).__name__)

    def close(self) -> None:
        self._closing.set()
        if self._sweeper is not None:
            self._sweeper.join(timeout=30)
        self.store.close()

    # --- records ------------------------------------------------------------------------------------------

    def _dir(self, job_id: str) -> Path:
        if not job_id or not all(ch in "0123456789abcdef" for ch in job_id):
            raise JobNotFound(f"no synthesis job {job_id!r}")
        return self.root / job_id

    def read(self, job_id: str) -> dict[str, Any]:
        """The job's record, with a failure recorded in the store (or in memory) over whatever the record says."""
        self._dir(job_id)  # a well-formed id, or JobNotFound
        job = self.store.read(job_id)
        if job is None:
            raise JobNotFound(f"no synthesis job {job_id!r}")
        return self._in_memory(job)

    def _in_memory(self, job: dict[str, Any]) -> dict[str, Any]:
        failure = self._failed.get(job["job_id"])
        if failure is not None and job["status"] in (*ACTIVE, JobStatus.FAILED):
            job.update(failure)
        return job

    def _save(self, job: dict[str, Any]) -> None:
        job["updated"] = _now()
        self.store.save(job, self._leases.get(job["job_id"]))  # a runner writes only while its lease holds

    def _owned(self, ctx: Context, job_id: str, event: Event = Event.SYNTH_ACCESS) -> dict[str, Any]:
        """The caller's own job; another principal's is refused (audited under `event`) as if it did not exist."""
        job = self.read(job_id)
        if job["principal"]["principal"] != ctx.principal.name:
            self.bastion.audit(
                ctx,
                event,
                dataset=job["dataset"],
                request={"job_id": job_id},
                decision="denied",
                reason="not_owner",
            )
            raise JobNotFound(f"no synthesis job {job_id!r}")  # other principals' jobs do not exist for you
        return job

    @staticmethod
    def public(job: dict[str, Any]) -> dict[str, Any]:
        return {k: job.get(k) for k in PUBLIC_FIELDS}

    def all_jobs(self) -> list[dict[str, Any]]:
        return [self._in_memory(j) for j in self.store.all()]

    # --- submission ---------------------------------------------------------------------------------------

    def submit(
        self,
        ctx: Context,
        dataset: str,
        *,
        epsilon: float | None,
        rows: int,
        seed: int | None = None,
        method: str | None = None,
        delta: float | None = None,
        version: str | None = None,
        table: str | None = None,
        join: str | None = None,
        join_on: str | None = None,
        join_private: str | None = None,
    ) -> dict[str, Any]:
        """Admit a proxy job. `table` (a private table of a dataset of several tables), `join_private` (another
        private table joined with it on the unit), `join` and `join_on` (a public table of the dataset joined on its
        unique key, matched with the column `join_on`) choose the rows the proxy is of (`gateway.tablesources`);
        by default the dataset's own table."""
        from synth import DEFAULT_METHOD, METHODS, NON_DP_METHODS
        from synth.measure import check_calibration

        method = method or DEFAULT_METHOD
        chosen = {
            k: v
            for k, v in (("table", table), ("join", join), ("join_on", join_on), ("join_private", join_private))
            if v is not None
        }
        request = {
            "dataset": dataset,
            "epsilon": epsilon,
            "rows": rows,
            "seed": seed,
            "method": method,
            "delta": delta,
            "non_dp": method in NON_DP_METHODS,
            **({"version": version} if version is not None else {}),
            **chosen,
        }
        policy, _ = self.bastion.authorize(ctx, dataset, Grant.SYNTH, request)
        version, _ = self.bastion.reading(ctx, dataset, version, Event.SYNTH, request)
        non_dp = method in NON_DP_METHODS
        try:
            if method not in METHODS:
                raise InvalidRequest(f"unknown method {method!r}; methods are {', '.join(METHODS)}")
            if not 1 <= rows <= MAX_ROWS:
                raise InvalidRequest(f"rows must be between 1 and {MAX_ROWS:,}")
            if seed is not None and not 0 <= seed < 2**31:
                raise InvalidRequest("seed must be in [0, 2^31)")
            source = self._source(policy, chosen)
            if source is not None and non_dp:
                raise InvalidRequest(
                    "a proxy of a private table of a dataset of several tables, or of a join, is differentially "
                    f"private only: use method {DEFAULT_METHOD!r}",
                    reason="non_dp_table",
                )
            modelled = source.policy if source is not None else policy
            if non_dp:
                if policy.synthesis.mode != "non_dp_allowed":
                    raise NonDpNotAllowed(
                        f"the policy of {dataset!r} allows only differentially private proxies; use method "
                        f"{DEFAULT_METHOD!r}",
                        dataset=dataset,
                    )
                cost = PrivacyLoss(0.0)
                allocation = None
            else:
                if epsilon is None:
                    raise InvalidRequest("a DP proxy needs epsilon")
                epsilon = check_epsilon(epsilon)
                if delta is not None and delta != 0:
                    delta = check_delta(delta)
                if delta is None:  # as a query's: the δ cap's share that this ε is of the ε cap
                    cap = policy.budget.per_principal
                    delta = default_delta(cap.delta, epsilon, cap.epsilon)
                alloc = check_calibration(modelled, epsilon, delta)
                allocation = alloc.to_json()
                cost = PrivacyLoss(epsilon, alloc.delta_spent)
        except GatewayError as exc:
            self.bastion.audit(ctx, Event.SYNTH, dataset=dataset, request=request, decision="denied", reason=exc.code)
            raise
        described = source.public() if source is not None else None
        key = cache_key(
            Event.SYNTH,
            ctx.principal.name,
            dataset,
            version,
            policy.fingerprint(),
            method,
            epsilon,
            delta,
            rows,
            seed,
            *([source.request()] if source is not None else []),
        )
        with self.store.admission(ctx.principal.name):  # counting unfinished jobs and creating one are one step
            limit = self.bastion.settings.synth_jobs_per_principal
            if self.bastion.cache.get(key) is None and self._unfinished(ctx.principal.name) >= limit:
                self.bastion.audit(
                    ctx, Event.SYNTH, dataset=dataset, request=request, decision="denied", reason=TooManyJobs.code
                )
                raise TooManyJobs(
                    f"you have {limit} unfinished synthesis job(s), the most one principal may have; wait for one to "
                    "finish (GET /v1/synth lists yours)",
                    limit=limit,
                )

            def compute() -> dict[str, Any]:
                job_id = uuid.uuid4().hex
                job: dict[str, Any] = {
                    "job_id": job_id,
                    "dataset": dataset,
                    "method": method,
                    "non_dp": non_dp,
                    "status": JobStatus.AWAITING_APPROVAL if non_dp else JobStatus.QUEUED,
                    "progress": 0.0,
                    "stage": "",
                    "epsilon": cost.epsilon,
                    "delta": cost.delta,
                    "rows": rows,
                    "seed": seed if seed is not None else secrets.randbelow(2**31),
                    "dataset_version": version,
                    "policy_fingerprint": policy.fingerprint(),
                    "created": _now(),
                    "updated": _now(),
                    "error": None,
                    "columns": None,
                    "proxy_digest": None,
                    "approved_at": None,
                    "allocation": allocation,
                    "notes": [],
                    "tables": described,
                    "delta_requested": delta,
                    "principal": ctx.principal.as_actor(),
                    "source": ctx.source,
                    "request_id": ctx.request_id,
                }
                self._dir(job_id).mkdir(parents=True, mode=0o700)
                self.store.create(job)
                return {
                    "job_id": job_id,
                    "dataset": dataset,
                    "method": method,
                    "non_dp": non_dp,
                    "dataset_version": version,
                    "policy_fingerprint": policy.fingerprint(),
                }

            answer = self.bastion.run_private(
                ctx,
                policy=policy,
                event=Event.SYNTH,
                request=request,
                cost=cost,
                key=key,
                compute=compute,
                kind=Event.SYNTH,
                version=version,
            )
            job = self.read(answer["job_id"])
            if answer["cached"] and job["status"] == JobStatus.FAILED:
                # The failed run released nothing; run it again under the original charge.
                status = JobStatus.APPROVED if non_dp else JobStatus.QUEUED
                job.update(status=status, error=None, progress=0.0, stage="")
                self._save(job)
                self._failed.pop(job["job_id"], None)
                self.store.clear_failure(job["job_id"])
            self._maybe_start(job)
            return {
                **self.public(self.read(job["job_id"])),
                "cached": answer["cached"],
                "epsilon_spent": answer["epsilon_spent"],
                "delta_spent": answer["delta_spent"],
                "budget": answer["budget"],
            }

    def _source(self, policy: Any, chosen: dict[str, Any]) -> Any:
        """The rows a proxy reads (`gateway.tablesources`), or None for the dataset's own table."""
        from gateway.engines.kind import EngineKind
        from gateway.tablesources import resolve_source

        engine = self.bastion.engine
        return resolve_source(
            policy,
            table=chosen.get("table"),
            join=chosen.get("join"),
            join_on=chosen.get("join_on"),
            join_private=chosen.get("join_private"),
            public=engine.public_table if engine.kind is EngineKind.DUCKDB else None,
            what="a synthetic proxy",
        )

    def _unfinished(self, principal: str) -> int:
        return sum(1 for job_id in self.store.unfinished(principal) if job_id not in self._failed)

    # --- running ------------------------------------------------------------------------------------------

    def resume(self) -> None:
        """Start every unfinished job no other process is running (after a restart or an approval)."""
        for job in self.all_jobs():
            self._maybe_start(job)

    def _maybe_start(self, job: dict[str, Any]) -> None:
        if job["status"] not in ACTIVE:
            return
        with self._lock:
            t = self._threads.get(job["job_id"])
            if t is not None and t.is_alive():
                return
            if time.monotonic() - self._tried.get(job["job_id"], -RETRY_SECONDS) < RETRY_SECONDS:
                return  # another process held it a moment ago
            t = threading.Thread(
                target=self._run_locked, args=(job["job_id"],), daemon=True, name=f"synth-{job['job_id'][:8]}"
            )
            self._threads[job["job_id"]] = t
            t.start()

    def _run_locked(self, job_id: str) -> None:
        try:
            with self.store.claim(job_id) as lease:
                if lease is None:
                    self._tried[job_id] = time.monotonic()  # another process runs it
                    return
                self._tried.pop(job_id, None)
                self._leases[job_id] = lease
                try:
                    self._run_claimed(job_id)
                finally:
                    self._leases.pop(job_id, None)
        except GatewayError as exc:  # the store cannot be reached: the job stays as it is, to be tried again
            self._tried[job_id] = time.monotonic()
            log.error("synthesis job %s could not be claimed (%s)", job_id, exc.code)

    def _holds(self, job_id: str) -> None:
        """Go on only while this process's lease on the job holds (LeaseLost if not)."""
        lease = self._leases.get(job_id)
        if lease is not None and not lease.held():
            raise LeaseLost(job_id)

    def _run_claimed(self, job_id: str) -> None:
        job = self.read(job_id)
        if job["status"] not in ACTIVE:
            return
        if job["status"] == JobStatus.RUNNING:
            # Its runner stopped midway (died, or lost its lease): this process takes it over, on the record.
            try:
                self.bastion.audit(
                    self._context(job),
                    Event.SYNTH,
                    dataset=job["dataset"],
                    request={"job_id": job_id, "stage": job.get("stage") or None},
                    decision="allowed",
                    reason="resumed",
                    phase="resumed",
                    non_dp=job["non_dp"],
                )
            except GatewayError as exc:  # the log cannot be written: not taken over now, tried again later
                self._tried[job_id] = time.monotonic()
                log.error("synthesis job %s not resumed: its record could not be written (%s)", job_id, exc.code)
                return
        try:
            self._run(job)
        except LeaseLost:
            log.warning("synthesis job %s: this process lost its lease on it; another one goes on with it", job_id)
        except Exception as exc:
            # Only the class: a message or traceback could quote a value from the rows.
            log.error("synthesis job %s failed (%s)", job_id, type(exc).__name__)
            message = exc.message if isinstance(exc, GatewayError) else f"internal error ({type(exc).__name__})"
            job = self._fail(job, message + "; the charge stands")
            with contextlib.suppress(GatewayError, OSError):
                self.bastion.audit(
                    self._context(job),
                    Event.SYNTH,
                    dataset=job["dataset"],
                    request={"job_id": job_id},
                    decision="error",
                    reason="synthesis_failed",
                    phase="failed",
                    non_dp=job["non_dp"],
                )

    def _fail(self, job: dict[str, Any], error: str) -> dict[str, Any]:
        """Record the job as failed, durably even on a full disk (see the job store's `fail`); in memory if the
        store cannot keep it."""
        failure = {"status": JobStatus.FAILED.value, "error": error[:2000], "updated": _now()}
        if self.store.fail(job["job_id"], failure):
            self._failed.pop(job["job_id"], None)
        else:
            self._failed[job["job_id"]] = failure
        return {**job, **failure}

    @staticmethod
    def _context(job: dict[str, Any]) -> Context:
        p = job["principal"]
        return Context(
            Principal(p["principal"], p["role"], p["token_id"]), source=job["source"], request_id=job["request_id"]
        )

    def _run(self, job: dict[str, Any]) -> None:
        from synth import (
            DPCopulaModel,
            allocate,
            check_release,
            dp_fidelity,
            dp_proxy,
            measure,
            non_dp_fidelity,
            non_dp_proxy,
            proxy_schema,
            render_pages,
            sdv_metadata,
        )

        job_dir = self._dir(job["job_id"])
        last = [0.0]

        def progress(fraction: float, stage: str, *, lo: float = 0.0, hi: float = 1.0) -> None:
            now = time.monotonic()
            job.update(progress=round(lo + (hi - lo) * min(max(fraction, 0.0), 1.0), 4), stage=stage)
            if now - last[0] > 0.3:
                last[0] = now
                self._save(job)

        job.update(status=JobStatus.RUNNING, error=None)
        self._save(job)
        policy, _ = self.bastion.engine.policy(job["dataset"])
        if policy.fingerprint() != job["policy_fingerprint"]:
            raise Conflict("the dataset or its policy changed since the request was admitted")
        # The job reads the version it was admitted at (and charged for), whatever was appended or retired since.
        try:
            reader = self.bastion.engine.at({job["dataset"]: job["dataset_version"]}, retired=True)
        except (VersionNotFound, VersionRetired):
            raise Conflict(
                f"version {job['dataset_version']} of the dataset, which the request was admitted at, was replaced "
                "by a new registration"
            ) from None
        table: str | Any = bounded_table(job["dataset"])
        ctx = self._context(job)
        modelled = policy
        if job.get("tables"):
            # The rows of a private table (joined with a public one): rebuilt from the record's choice, and held
            # to the allocation that was charged.
            source = self._source(policy, job["tables"])
            assert source is not None
            table, modelled = source.tree, source.policy
        if not job["non_dp"]:
            model_path = job_dir / "model.json"
            if model_path.exists():
                model = DPCopulaModel.from_json(json.loads(model_path.read_text()))
            else:
                allocation = allocate(modelled, job["epsilon"], job["delta_requested"])
                if job.get("tables") and allocation.to_json() != job["allocation"]:
                    raise Conflict("the tables the proxy reads changed since the request was admitted")
                try:
                    model = measure(reader, table, modelled, allocation, lambda f, s: progress(f, s, hi=0.3))
                except Exception as exc:  # noqa: BLE001 - the failure must not show: measure a default input
                    # Whether reading the rows failed could depend on them; the same mechanisms run on an empty
                    # table instead (read by no engine: it has no groups), and the job goes on as usual (the audit
                    # log says so).
                    log.warning(
                        "synthesis job %s: measuring failed (%s); measuring the default input",
                        job["job_id"],
                        type(exc).__name__,
                    )
                    self.bastion.audit(
                        ctx,
                        Event.SYNTH,
                        dataset=job["dataset"],
                        request={"job_id": job["job_id"]},
                        decision="error",
                        reason="fallback",
                        error_class=type(exc).__name__,
                        phase="measured",
                        non_dp=False,
                    )
                    model = measure(EmptyReader(), table, modelled, allocation, lambda f, s: progress(f, s, hi=0.3))
                self._holds(job["job_id"])
                stored = _keep_first(model_path, model.to_json())
                if stored is not None:  # another runner stored its model first: that one is the release
                    model = DPCopulaModel.from_json(stored)
            proxy = dp_proxy(
                model, job["rows"], job["seed"], job["method"], lambda f, s: progress(f, s, lo=0.3, hi=0.9)
            )
            progress(0.0, "fidelity report", lo=0.9)
            report = dp_fidelity(model, proxy)
            report["dropped"] = model.dropped
            job["notes"] = model.notes
        else:
            schema = proxy_schema(policy)
            proxy, private = non_dp_proxy(
                reader,
                table,
                policy,
                schema,
                job["rows"],
                job["seed"],
                lambda f, s: progress(f, s, hi=0.8),
            )
            progress(0.0, "disclosure check", lo=0.8)
            md = sdv_metadata(schema.columns).to_dict()["tables"]["proxy"]
            check = check_release(reader, table, private, proxy, schema.columns, md, job["seed"])
            report = {
                **non_dp_fidelity(schema.columns, private, proxy),
                "privacy_check": check,
                "dropped": schema.dropped,
            }
            if not check["passed"]:
                _write_json(job_dir / "report.json", {"privacy_check": check})
                _restrict(job_dir)
                job.update(
                    status=JobStatus.WITHHELD,
                    progress=1.0,
                    stage="withheld by the disclosure check",
                    error="the proxy failed the disclosure check; nothing was released",
                )
                self._save(job)
                self.bastion.audit(
                    ctx,
                    Event.SYNTH,
                    dataset=job["dataset"],
                    request={"job_id": job["job_id"]},
                    decision="denied",
                    reason="disclosure_check_failed",
                    phase="withheld",
                    non_dp=True,
                    privacy_check=check,
                )
                return
        progress(0.5, "writing the proxy", lo=0.9)
        self._holds(job["job_id"])
        self._write_proxy(job, proxy, job_dir)
        report["proxy"] = {
            k: job[k]
            for k in (
                "dataset",
                "method",
                "non_dp",
                "epsilon",
                "delta",
                "rows",
                "seed",
                "dataset_version",
                "policy_fingerprint",
                "tables",
            )
        }
        report["pages"] = render_pages(report, job_dir / "pages", f"Proxy {job['job_id'][:8]} of {_of(job)}")
        _write_json(job_dir / "report.json", report)
        _restrict(job_dir)
        self._holds(job["job_id"])
        # The proxy is ready: record it (with its digest) before anyone can download it.
        self.bastion.audit(
            ctx,
            Event.SYNTH,
            dataset=job["dataset"],
            request={"job_id": job["job_id"]},
            decision="allowed",
            reason="ok",
            phase="completed",
            non_dp=job["non_dp"],
            cost={"epsilon": job["epsilon"], "delta": job["delta"]},
            release_digest=job["proxy_digest"],
        )
        job.update(status=JobStatus.DONE, progress=1.0, stage="done")
        self._save(job)

    def _write_proxy(self, job: dict[str, Any], proxy: Any, job_dir: Path) -> None:
        frame = proxy.copy()
        for name in frame.columns:
            if str(frame[name].dtype).startswith("datetime64"):
                frame[name] = frame[name].dt.date
        table = pa.Table.from_pandas(frame, preserve_index=False)
        meta = {
            k: job[k]
            for k in (
                "job_id",
                "dataset",
                "method",
                "non_dp",
                "epsilon",
                "delta",
                "rows",
                "seed",
                "dataset_version",
                "policy_fingerprint",
            )
        }
        table = table.replace_schema_metadata(
            {**(table.schema.metadata or {}), b"bastion.proxy": json.dumps(meta).encode()}
        )
        tmp = job_dir / f"proxy.parquet.{uuid.uuid4().hex}.tmp"
        os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        pq.write_table(table, tmp)
        os.replace(tmp, job_dir / "proxy.parquet")
        job["proxy_digest"] = _file_digest(job_dir / "proxy.parquet")
        job["columns"] = {f.name: str(f.type) for f in table.schema}

    # --- reading results ----------------------------------------------------------------------------------

    def status(self, ctx: Context, job_id: str) -> dict[str, Any]:
        job = self._owned(ctx, job_id)
        self._maybe_start(job)  # picks up an approval made on the host, or a job interrupted by a restart
        return self.public(job)

    def owned_by(self, ctx: Context) -> list[dict[str, Any]]:
        owned = [j for j in self.all_jobs() if j["principal"]["principal"] == ctx.principal.name]
        for job in owned:
            self._maybe_start(job)  # an unfinished job whose runner is gone (on any replica) resumes here
        return [self.public(j) for j in owned]

    def _done(self, ctx: Context, job_id: str, event: Event) -> dict[str, Any]:
        """The caller's finished job, for a download or report read; every refusal audited under `event`."""
        job = self._owned(ctx, job_id, event)
        request = {"job_id": job_id}
        self.bastion.authorize(ctx, job["dataset"], Grant.SYNTH, request, event)
        if job["status"] != JobStatus.DONE:
            error = JobNotReady(f"job {job_id} is {job['status']}, not done", status=job["status"])
            self.bastion.audit(
                ctx, event, dataset=job["dataset"], request=request, decision="denied", reason=error.code
            )
            raise error
        return job

    def download(self, ctx: Context, job_id: str, fmt: str = "parquet") -> tuple[Path, str]:
        """Path of the proxy file in `fmt`, after auditing its release; and its media type."""
        if fmt not in FORMATS:
            raise InvalidRequest(f"format must be one of {', '.join(FORMATS)}")
        job = self._done(ctx, job_id, Event.SYNTH_DOWNLOAD)
        job_dir = self._dir(job_id)
        path = job_dir / "proxy.parquet"
        if fmt == "csv":
            path = job_dir / "proxy.csv"
            if not path.exists():
                tmp = job_dir / f"proxy.csv.{uuid.uuid4().hex}.tmp"
                os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
                pq.read_table(job_dir / "proxy.parquet").to_pandas().to_csv(tmp, index=False)
                os.replace(tmp, path)
        self.bastion.audit(
            ctx,
            Event.SYNTH_DOWNLOAD,
            dataset=job["dataset"],
            request={"job_id": job_id, "format": fmt},
            decision="allowed",
            reason="ok",
            phase="released",
            non_dp=job["non_dp"],
            release_digest=job["proxy_digest"],
            cost=PrivacyLoss(0.0).as_dict(),
        )
        return path, ("application/vnd.apache.parquet" if fmt == "parquet" else "text/csv")

    def _audit_read(self, ctx: Context, job: dict[str, Any], what: str, content: str) -> None:
        self.bastion.audit(
            ctx,
            Event.SYNTH_REPORT,
            dataset=job["dataset"],
            request={"job_id": job["job_id"], "page": what},
            decision="allowed",
            reason="ok",
            phase="released",
            non_dp=job["non_dp"],
            release_digest=hashlib.sha256(content.encode()).hexdigest(),
            cost=PrivacyLoss(0.0).as_dict(),
        )

    def report(self, ctx: Context, job_id: str) -> dict[str, Any]:
        """The fidelity report (or, for a withheld non-DP proxy, the failed check), audited before it leaves."""
        job = self._owned(ctx, job_id, Event.SYNTH_REPORT)
        path = self._dir(job_id) / "report.json"
        if not (job["status"] == JobStatus.WITHHELD and path.exists()):
            job = self._done(ctx, job_id, Event.SYNTH_REPORT)
        text = path.read_text()
        self._audit_read(ctx, job, "report.json", text)
        return {"job": self.public(job), **json.loads(text)}

    def page(self, ctx: Context, job_id: str, name: str) -> str:
        job = self._done(ctx, job_id, Event.SYNTH_REPORT)
        pages = self._dir(job_id) / "pages"
        path = pages / name
        if path.parent != pages or not path.name.endswith(".html") or not path.exists():
            raise NotFound(f"no report page {name!r}")
        text = path.read_text()
        self._audit_read(ctx, job, name, text)
        return text

    # --- admin (on the host) ------------------------------------------------------------------------------

    def approve(self, job_id: str) -> dict[str, Any]:
        """Approve a non-DP job (CLI on the gateway host); the gateway runs it when it next looks."""
        job = self.read(job_id)
        if job["status"] != JobStatus.AWAITING_APPROVAL:
            raise Conflict(f"job {job_id} is {job['status']}; only jobs awaiting approval can be approved")
        self.bastion.audit(
            None,
            "synth_approved",
            dataset=job["dataset"],
            decision="allowed",
            reason="ok",
            non_dp=True,
            request={"job_id": job_id, "method": job["method"], "requested_by": job["principal"]["principal"]},
        )
        job.update(status=JobStatus.APPROVED, approved_at=_now())
        self._save(job)
        return self.public(job)

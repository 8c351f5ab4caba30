"""Auditor routes: the JSON API under /v1/audit and the server-rendered auditor page under /audit.

Only the auditor role may read the audit log, and every read is itself recorded before anything is returned
(`Bastion.audit_access`): a read that cannot be recorded is refused (503), a read by any other role is refused
(403) and the refusal recorded. Reads take the log's shared lock only to fix the file sizes, so they never hold
up writers. The log holds no private rows by design, so no filter can reach private data.

The page needs no JavaScript and loads nothing from elsewhere: HTML from Jinja2 templates, one inline style
sheet (allowed by a per-response CSP nonce) and the privacy-spend chart as inline SVG drawn here. Signing in
starts a server-side session (`gateway.http.sessions`): the cookie holds its random id, never the token, and
signing out ends it. The forms that change state (sign in, sign out) are refused from another site's page.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import secrets
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, TypedDict, cast
from urllib.parse import parse_qs, urlencode, urlsplit

import jinja2
from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from starlette.concurrency import run_in_threadpool

from audit import checkpoint as ckpt
from audit import report, storage
from audit.checkpoint import Checkpoint
from audit.errors import AuditError
from audit.keys import Keyring
from audit.record import check_event_name, format_time, known_events
from audit.verify import VerifyReport, verdict, verify_log
from gateway.http.dependencies import (
    ERRORS,
    Core,
    Ctx,
    authenticated,
    bearer_token,
    context_for,
    get_bastion,
    refuse_authentication,
)
from gateway.http.sessions import SessionStore
from gateway.service import Bastion, Context
from gateway.stores.tokens import Principal
from policies.errors import AuditUnavailable, Forbidden, GatewayError, InvalidRequest, NotFound, Unauthorized

COOKIE = "bastion_audit"
PAGE_SIZE = 100
DECISIONS = ("allowed", "denied", "error")


class CrossSiteRequest(Forbidden):
    """An auditor form posted from another site (by its Origin or Referer)."""

    code = "cross_site_request"


class AuditLogUnreadable(GatewayError):
    """A record of the log cannot be parsed (the log was damaged): verification says where."""

    status = 500
    code = "audit_log_unreadable"


# --- reading the log ------------------------------------------------------------------------------------------


class FilterArgs(TypedDict, total=False):
    """The filters that are set, as keyword arguments of `report.query_events`."""

    since: str
    until: str
    actor: str
    dataset: str
    event: str
    decision: str


@dataclass(frozen=True)
class Filters:
    since: str | None = None
    until: str | None = None
    actor: str | None = None
    dataset: str | None = None
    event: str | None = None
    decision: str | None = None

    def as_dict(self) -> FilterArgs:
        # The fields are exactly FilterArgs' keys, all str | None; the unset (None or empty) ones are dropped.
        return cast(FilterArgs, {k: v for k, v in self.__dict__.items() if v})

    def checked(self) -> Filters:
        """Empty fields dropped; times checked to be ISO 8601 (naive means UTC), the event to be a known name."""
        values = {k: (v.strip() or None) if isinstance(v, str) else v for k, v in self.__dict__.items()}
        for name in ("since", "until"):
            value = values[name]
            if value is not None:
                try:
                    format_time(value)
                except ValueError:
                    raise InvalidRequest(
                        f"{name} must be an ISO 8601 time such as 2026-01-31T12:00:00Z", field=name
                    ) from None
        decision = values["decision"]
        if decision is not None and decision not in DECISIONS:
            raise InvalidRequest(
                f"unknown decision {decision!r}; the decisions are: {', '.join(DECISIONS)}",
                field="decision",
                allowed=list(DECISIONS),
            )
        event = values["event"]
        if event is not None:
            try:
                check_event_name(event)
            except ValueError as exc:
                raise InvalidRequest(str(exc), field="event", allowed=known_events()) from None
        return Filters(**values)


Text = Annotated[str | None, Query(max_length=200)]


def get_filters(
    since: Text = None,
    until: Text = None,
    actor: Text = None,
    dataset: Text = None,
    event: Text = None,
    decision: Text = None,
) -> Filters:
    """Filters of the event list: `since` <= time < `until` (ISO 8601), and exact matches on the principal
    (`actor`), dataset, event type (one of `audit.record.known_events()`) and decision. Checked after the read
    is admitted and recorded."""
    return Filters(since, until, actor, dataset, event, decision)


EventFilters = Annotated[Filters, Depends(get_filters)]


def _events(directory: Path, filters: Filters, **paging: Any) -> list[dict[str, Any]]:
    try:
        return report.query_events(directory, **filters.checked().as_dict(), **paging)
    except ValueError as exc:
        raise AuditLogUnreadable(str(exc)) from None


def _records(directory: Path) -> list[dict[str, Any]]:
    try:
        return list(report.read_records(directory))
    except ValueError as exc:
        raise AuditLogUnreadable(str(exc)) from None


def _snapshot(bastion: Bastion, *, fresh: bool = False) -> Path:
    """The log as a directory in the file format (on PostgreSQL, a copy of the shared log: brought up to date, or
    with `fresh` exported whole, as verification needs); a log out of reach is 503 `audit_unavailable`."""
    try:
        return bastion.audit_log.snapshot(fresh=fresh)
    except AuditError as exc:
        raise AuditUnavailable(f"the audit log cannot be read: {exc}") from None


def _verify(bastion: Bastion, directory: Path | None = None) -> VerifyReport:
    """Verify the log (the given snapshot of it, else a new one) with the gateway's keyring."""
    log = bastion.audit_log
    try:
        return verify_log(directory or log.snapshot(fresh=True), Keyring.load(log.key_dir))
    except (AuditError, OSError) as exc:
        return VerifyReport(ok=False, status="error", message=f"cannot verify: {exc}")


def _checkpoints(bastion: Bastion) -> list[Checkpoint]:
    directory = _snapshot(bastion)
    size = storage.snapshot(directory).checkpoints_size
    entries, _ = ckpt.read_lines(directory / storage.CHECKPOINTS, size)
    return [e for _, e in entries if isinstance(e, Checkpoint)]


def _keyring(bastion: Bastion) -> Keyring:
    """The gateway's keyring; an unreadable one is an empty one (nothing then counts as signed)."""
    try:
        return Keyring.load(bastion.audit_log.key_dir)
    except AuditError:
        return Keyring()


def _checkpoint_view(bastion: Bastion, cp: Checkpoint) -> dict[str, Any]:
    problem = cp.problem(_keyring(bastion))
    return {**cp.to_dict(), "signed": problem is None, "problem": problem}


# --- JSON API -------------------------------------------------------------------------------------------------

api = APIRouter(prefix="/v1/audit", tags=["audit"], responses=ERRORS)


@api.get("/events", summary="Audit records matching the filters, in log order (auditor)")
def list_events(
    ctx: Ctx,
    bastion: Core,
    filters: EventFilters,
    limit: Annotated[int, Query(ge=1, le=10_000)] = PAGE_SIZE,
    offset: Annotated[int, Query(ge=0)] = 0,
) -> dict[str, Any]:
    bastion.audit_access(ctx, "events", **filters.as_dict(), limit=limit, offset=offset)
    events = _events(_snapshot(bastion), filters, limit=limit, offset=offset)
    return {
        "events": events,
        "offset": offset,
        "limit": limit,
        "next_offset": offset + len(events) if len(events) == limit else None,
    }


@api.get("/events/{seq}", summary="One record with its inclusion proof against the latest checkpoint (auditor)")
def get_event(seq: int, ctx: Ctx, bastion: Core) -> dict[str, Any]:
    bastion.audit_access(ctx, "event", seq=seq)
    try:
        proof = report.get_event(_snapshot(bastion), seq, _keyring(bastion))
    except LookupError as exc:
        raise NotFound(str(exc), seq=seq) from None
    except ValueError as exc:
        raise AuditLogUnreadable(str(exc)) from None
    return proof.to_dict()


@api.get("/export", summary="Matching records as JSON Lines (canonical) or CSV (auditor)")
def export(ctx: Ctx, bastion: Core, filters: EventFilters, format: Literal["jsonl", "csv"] = "jsonl") -> Response:
    bastion.audit_access(ctx, "export", **filters.as_dict(), format=format)
    return _export(bastion, filters, format)


def _export(bastion: Bastion, filters: Filters, format: str) -> Response:
    events = _events(_snapshot(bastion), filters)
    body, media = (
        (report.to_csv(events), "text/csv") if format == "csv" else (report.to_jsonl(events), "application/x-ndjson")
    )
    name = f"audit-{dt.datetime.now(dt.UTC):%Y%m%dT%H%M%SZ}.{format}"
    return Response(
        body,
        media_type=f"{media}; charset=utf-8",
        headers={"Content-Disposition": f'attachment; filename="{name}"', "Cache-Control": "no-store"},
    )


@api.get("/spend", summary="Privacy spend per principal per dataset over time, totals against the caps (auditor)")
def spend(ctx: Ctx, bastion: Core, filters: EventFilters) -> dict[str, Any]:
    bastion.audit_access(ctx, "spend", **filters.as_dict())
    return _spend(bastion, filters).to_dict()


def _spend(bastion: Bastion, filters: Filters) -> report.SpendReport:
    filters = filters.checked()
    directory = _snapshot(bastion)
    if filters.actor or filters.dataset:
        records = _events(directory, Filters(actor=filters.actor, dataset=filters.dataset), decision="allowed")
    else:
        records = _records(directory)
    caps = bastion.budget_caps()
    if filters.dataset:
        caps = {k: v for k, v in caps.items() if k == filters.dataset}
    return report.privacy_spend(records, caps, since=filters.since, until=filters.until)


@api.get("/access", summary="Consented row accesses: purpose, requester, approver, rows released (auditor)")
def access_summary(ctx: Ctx, bastion: Core) -> list[dict[str, Any]]:
    bastion.audit_access(ctx, "access")
    try:
        return [asdict(a) for a in report.access_summary(_records(_snapshot(bastion)))]
    except ValueError as exc:
        raise AuditLogUnreadable(str(exc)) from None


@api.get("/verify", summary="Verify the whole log against its checkpoints and public keys (auditor)")
def verify(ctx: Ctx, bastion: Core) -> dict[str, Any]:
    bastion.audit_access(ctx, "verify")
    result = _verify(bastion)
    return {**result.to_dict(), "verdict": verdict(result)}


@api.get("/checkpoints/latest", summary="The latest signed checkpoint (auditor)")
def latest_checkpoint(ctx: Ctx, bastion: Core) -> dict[str, Any]:
    bastion.audit_access(ctx, "checkpoint_latest")
    found = _checkpoints(bastion)
    if not found:
        raise NotFound("the audit log has no checkpoint yet")
    return _checkpoint_view(bastion, found[-1])


@api.post("/checkpoints", summary="Sign a checkpoint of the log as it is now and return it (auditor)")
def make_checkpoint(ctx: Ctx, bastion: Core) -> dict[str, Any]:
    bastion.audit_access(ctx, "checkpoint")
    try:
        cp = bastion.audit_log.checkpoint()
    except AuditError as exc:
        raise AuditLogUnreadable(f"cannot sign a checkpoint: {exc}") from None
    return _checkpoint_view(bastion, cp)


@api.get("/checkpoints/consistency", summary="RFC 6962 consistency proof between two checkpoint sizes (auditor)")
def consistency(
    ctx: Ctx,
    bastion: Core,
    old: Annotated[int, Query(ge=0, description="tree size of the older checkpoint")],
    new: Annotated[int | None, Query(ge=0, description="tree size of the newer one [default: latest]")] = None,
) -> dict[str, Any]:
    bastion.audit_access(ctx, "consistency", old=old, new=new)
    found = _checkpoints(bastion)
    by_size = {cp.tree_size: cp for cp in found}
    if not found:
        raise NotFound("the audit log has no checkpoint yet")
    newer = found[-1] if new is None else by_size.get(new)
    older = by_size.get(old)
    for size, cp in ((old, older), (new, newer)):
        if cp is None:
            raise NotFound(f"no checkpoint of tree size {size}", tree_size=size)
    assert older is not None and newer is not None
    if older.tree_size > newer.tree_size:
        raise InvalidRequest("old must not be larger than new")
    try:
        proof = report.consistency_proof(_snapshot(bastion), older, newer)
    except ValueError as exc:
        raise AuditLogUnreadable(f"no consistency proof: {exc}") from None
    return {"old": _checkpoint_view(bastion, older), "new": _checkpoint_view(bastion, newer), "proof": proof}


# --- the auditor page -----------------------------------------------------------------------------------------

web = APIRouter(include_in_schema=False)
_templates = jinja2.Environment(
    loader=jinja2.FileSystemLoader(Path(__file__).parent / "templates"),
    autoescape=jinja2.select_autoescape(["html", "svg"]),
    trim_blocks=True,
    lstrip_blocks=True,
)


def _page(request: Request, template: str, status_code: int = 200, **values: Any) -> HTMLResponse:
    nonce = secrets.token_urlsafe(16)
    html = _templates.get_template(template).render(nonce=nonce, **values)
    return HTMLResponse(
        html,
        status_code=status_code,
        headers={
            "Content-Security-Policy": f"default-src 'none'; style-src 'nonce-{nonce}'; img-src 'self'; "
            "form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
            "X-Content-Type-Options": "nosniff",
            # Not no-referrer: with it a browser sends `Origin: null` on the page's own form posts, which the
            # cross-site check must refuse. same-origin sends nothing to other sites.
            "Referrer-Policy": "same-origin",
            "X-Frame-Options": "DENY",
            "Cache-Control": "no-store",
        },
    )


def _sessions(request: Request) -> SessionStore:
    return cast(SessionStore, request.app.state.sessions)


def _signed_in(request: Request) -> bool:
    return request.headers.get("authorization") is not None or COOKIE in request.cookies


def _web_context(request: Request, bastion: Bastion) -> Context:
    """Who is asking: the bearer header, or the session whose id the HttpOnly cookie set at login holds."""
    if request.headers.get("authorization") is not None:
        return context_for(request, bastion, bearer_token(request))
    sessions = _sessions(request)

    def session() -> Principal:
        principal = sessions.principal(request.cookies.get(COOKIE))
        if principal is None:
            raise Unauthorized("your session has ended: sign in again")
        # The token the session was opened with must still work: revoking or rotating it ends the session.
        return bastion.tokens.active(principal.token_id)

    return authenticated(request, bastion, session)


def _cross_site(request: Request) -> str | None:
    """The origin of a state-changing form post if it is not this site's (by `Origin`, else `Referer`), or None.
    A request that sends neither is not a browser's cross-site form post and passes."""
    origin = request.headers.get("origin") or request.headers.get("referer")
    if origin is None:
        return None
    parts = urlsplit(origin)
    host = request.headers.get("host", "")
    return None if parts.scheme in ("http", "https") and parts.netloc == host and host else origin[:200]


def _refuse_cross_site(request: Request, bastion: Bastion) -> HTMLResponse | None:
    """A 403 page for a cross-site post of an auditor form, recorded in the audit log; None if same-site."""
    origin = _cross_site(request)
    if origin is None:
        return None
    error = CrossSiteRequest("this form can only be sent from Bastion's own pages")
    refuse_authentication(request, bastion, error, origin=origin)
    return _page(request, "error.html", error.status, status=error.status, code=error.code, message=error.message)


def _error_page(request: Request, exc: GatewayError) -> HTMLResponse:
    if isinstance(exc, Unauthorized):
        ended = request.url.path != "/audit/login" and "authorization" not in request.headers
        message = "Your session has ended. Sign in again." if ended else "That token is not valid."
        response = _page(request, "login.html", exc.status, error=f"{message} Paste an auditor token.")
        response.delete_cookie(COOKIE, path="/audit")
        return response
    return _page(request, "error.html", exc.status, status=exc.status, code=exc.code, message=exc.message)


def _login_page(request: Request, error: str | None = None, status: int = 200) -> HTMLResponse:
    return _page(request, "login.html", status, error=error)


@web.get("/audit/login", response_class=HTMLResponse)
def login_form(request: Request) -> HTMLResponse:
    return _login_page(request)


@web.post("/audit/login")
async def login(request: Request, bastion: Annotated[Bastion, Depends(get_bastion)]) -> Response:
    """Check an auditor token and start a server-side session; the HttpOnly, SameSite=Strict cookie scoped to
    /audit holds only the session's random id. Refused from another site's page."""
    refused = await run_in_threadpool(_refuse_cross_site, request, bastion)
    if refused is not None:
        return refused
    form = parse_qs((await request.body()).decode("utf-8", "replace"))
    token = (form.get("token") or [""])[0].strip()
    if not token:
        return _login_page(request, "Paste an auditor token.", 400)

    def admit() -> str:
        ctx = context_for(request, bastion, token)
        bastion.audit_access(ctx, "web_login")
        return _sessions(request).create(ctx.principal)

    try:
        session_id = await run_in_threadpool(admit)
    except GatewayError as exc:
        return _error_page(request, exc)
    response = RedirectResponse("/audit", status_code=303)
    response.set_cookie(
        COOKIE,
        session_id,
        httponly=True,
        samesite="strict",
        path="/audit",
        secure=request.url.scheme == "https",
        max_age=_sessions(request).lifetime,
    )
    return response


@web.post("/audit/logout")
def logout(request: Request, bastion: Annotated[Bastion, Depends(get_bastion)]) -> Response:
    """End the session (its server-side record is deleted, so the cookie is worthless even if kept)."""
    refused = _refuse_cross_site(request, bastion)
    if refused is not None:
        return refused
    _sessions(request).delete(request.cookies.get(COOKIE))
    response = RedirectResponse("/audit/login", status_code=303)
    response.delete_cookie(COOKIE, path="/audit")
    return response


@web.get("/audit", response_class=HTMLResponse)
def dashboard(
    request: Request,
    bastion: Annotated[Bastion, Depends(get_bastion)],
    page: Annotated[int, Query(ge=1)] = 1,
    since: Text = None,
    until: Text = None,
    actor: Text = None,
    dataset: Text = None,
    event: Text = None,
    decision: Text = None,
) -> HTMLResponse:
    """Verification status, privacy-spend chart, consented accesses and the event list (newest first) with a
    filter form."""
    if not _signed_in(request):
        return _login_page(request)
    raw = Filters(since, until, actor, dataset, event, decision)
    try:
        ctx = _web_context(request, bastion)
        bastion.audit_access(ctx, "web_dashboard", **raw.as_dict(), page=page)
        filters = raw.checked()
    except GatewayError as exc:
        return _error_page(request, exc)
    try:
        directory = _snapshot(bastion, fresh=True)  # the page shows the verdict on the log as it is now
    except GatewayError as exc:
        return _error_page(request, exc)
    result = _verify(bastion, directory)
    events: list[dict[str, Any]] = []
    errors: list[str] = []
    total = 0
    try:
        matches = report.query_events(directory, **filters.as_dict())
        total = len(matches)
        end = max(total - (page - 1) * PAGE_SIZE, 0)
        events = matches[max(end - PAGE_SIZE, 0) : end][::-1]
    except ValueError as exc:
        errors.append(f"The event list cannot be read: {exc}")
    charts: list[dict[str, Any]] = []
    totals: list[dict[str, Any]] = []
    choices: dict[str, list[str]] = {"actor": [], "dataset": [], "event": []}
    accesses: list[report.AccessSummary] = []
    try:
        records = list(report.read_records(directory))
        accesses = report.access_summary(records)
        caps = bastion.budget_caps()
        spent = report.privacy_spend(records, caps)
        charts = spend_charts(spent, caps)
        totals = [dict(vars(d)) for _, d in sorted(spent.datasets.items())]
        choices = {
            "actor": sorted({p for r in records if (p := report.principal_of(r))}),
            "dataset": sorted({str(r["dataset"]) for r in records if r.get("dataset")}),
            "event": sorted({str(r["event"]) for r in records if r.get("event")}),
        }
    except ValueError as exc:
        errors.append(f"The privacy spend cannot be computed: {exc}")
    query = filters.as_dict()
    pages = max(math.ceil(total / PAGE_SIZE), 1)
    return _page(
        request,
        "dashboard.html",
        principal=ctx.principal.name,
        report=result,
        verdict=verdict(result),
        filters=query,
        decisions=list(DECISIONS),
        choices=choices,
        events=events,
        total=total,
        page=page,
        pages=pages,
        errors=errors,
        charts=charts,
        totals=totals,
        accesses=accesses,
        link=lambda **extra: "?" + urlencode({**query, **{k: v for k, v in extra.items() if v is not None}}),
        export=lambda fmt: "/audit/export?" + urlencode({**query, "format": fmt}),
    )


@web.get("/audit/export")
def web_export(
    request: Request,
    bastion: Annotated[Bastion, Depends(get_bastion)],
    format: Literal["jsonl", "csv"] = "csv",
    since: Text = None,
    until: Text = None,
    actor: Text = None,
    dataset: Text = None,
    event: Text = None,
    decision: Text = None,
) -> Response:
    try:
        filters = Filters(since, until, actor, dataset, event, decision)
        ctx = _web_context(request, bastion)
        bastion.audit_access(ctx, "web_export", **filters.as_dict(), format=format)
        return _export(bastion, filters, format)
    except GatewayError as exc:
        return _error_page(request, exc)


@web.get("/audit/events/{seq}", response_class=HTMLResponse)
def web_event(seq: int, request: Request, bastion: Annotated[Bastion, Depends(get_bastion)]) -> HTMLResponse:
    """One record with its inclusion proof against the latest checkpoint."""
    try:
        ctx = _web_context(request, bastion)
        bastion.audit_access(ctx, "web_event", seq=seq)
        try:
            proof = report.get_event(_snapshot(bastion), seq, _keyring(bastion))
        except LookupError as exc:
            raise NotFound(str(exc)) from None
        except ValueError as exc:
            raise AuditLogUnreadable(str(exc)) from None
    except GatewayError as exc:
        return _error_page(request, exc)
    # Pretty-printed for reading; the stored line (what is hashed) is shown as well, folded.
    pretty = json.dumps(proof.record, indent=2, sort_keys=True, ensure_ascii=False)
    stored = report.to_jsonl([proof.record]).strip()
    return _page(request, "event.html", principal=ctx.principal.name, proof=proof, record=pretty, stored=stored)


# --- the privacy-spend chart ------------------------------------------------------------------------------------

PALETTE = ("#0072b2", "#d55e00", "#009e73", "#cc79a7", "#e69f00", "#56b4e9", "#7f7f00", "#000000")
WIDTH, HEIGHT = 720, 260
LEFT, RIGHT, TOP, BOTTOM = 56, 150, 16, 36


def _nice_step(span: float, ticks: int = 5) -> float:
    raw = span / ticks
    magnitude = 10 ** math.floor(math.log10(raw))
    return next(m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw)


def _epoch(time: str) -> float:
    return dt.datetime.fromisoformat(time.replace("Z", "+00:00")).timestamp()


def spend_charts(spent: report.SpendReport, caps: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """One chart per dataset: a step line of cumulative ε per principal over time, with the per-principal cap
    when it is on the scale. Returns coordinates for the SVG template (no client-side drawing)."""
    charts = []
    by_dataset: dict[str, list[tuple[str, list[report.SpendPoint]]]] = {}
    for (principal, dataset), points in sorted(spent.series.items()):
        if points and points[-1].cumulative_epsilon > 0:
            by_dataset.setdefault(dataset, []).append((principal, points))
    for dataset, series in by_dataset.items():
        times = [_epoch(p.time) for _, pts in series for p in pts]
        t0, t1 = min(times), max(times)
        if t1 - t0 < 1:
            t0, t1 = t0 - 1, t1 + 1
        top = max(pts[-1].cumulative_epsilon for _, pts in series)
        cap = (caps.get(dataset) or {}).get("per_principal", {}).get("epsilon")
        show_cap = cap is not None and cap <= 1.5 * top
        ymax = max(top, cap if show_cap and cap else 0.0)
        step = _nice_step(ymax * 1.05)
        ymax = step * math.ceil(ymax * 1.05 / step)
        plot_w, plot_h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM

        def x(t: float, t0: float = t0, t1: float = t1, plot_w: int = plot_w) -> float:
            return round(LEFT + (t - t0) / (t1 - t0) * plot_w, 1)

        def y(v: float, ymax: float = ymax, plot_h: int = plot_h) -> float:
            return round(TOP + plot_h - v / ymax * plot_h, 1)

        lines = []
        for i, (principal, pts) in enumerate(series):
            coords = [(x(_epoch(pts[0].time)), y(0.0))]
            level = 0.0
            for p in pts:
                px = x(_epoch(p.time))
                coords += [(px, y(level)), (px, y(p.cumulative_epsilon))]
                level = p.cumulative_epsilon
            coords.append((x(t1), y(level)))
            lines.append(
                {
                    "principal": principal,
                    "color": PALETTE[i % len(PALETTE)],
                    "points": " ".join(f"{a},{b}" for a, b in coords),
                    "epsilon": level,
                    "delta": pts[-1].cumulative_delta,
                    "charges": len(pts),
                    "label_y": TOP + 14 + 18 * i,
                }
            )
        yticks = [{"y": y(v), "label": f"{v:g}"} for v in _frange(0.0, ymax, step)]
        xticks = [{"x": x(t), "label": _time_label(t, t1 - t0)} for t in (t0 + (t1 - t0) * k / 3 for k in range(4))]
        charts.append(
            {
                "dataset": dataset,
                "width": WIDTH,
                "height": HEIGHT,
                "left": LEFT,
                "right": WIDTH - RIGHT,
                "top": TOP,
                "bottom": HEIGHT - BOTTOM,
                "series": lines,
                "yticks": yticks,
                "xticks": xticks,
                "cap": cap,
                "cap_y": y(cap) if show_cap and cap is not None else None,
                "legend_x": WIDTH - RIGHT + 12,
            }
        )
    return charts


def _frange(start: float, stop: float, step: float) -> list[float]:
    count = int(round((stop - start) / step))
    return [start + k * step for k in range(count + 1)]


def _time_label(t: float, span: float) -> str:
    moment = dt.datetime.fromtimestamp(t, dt.UTC)
    return moment.strftime("%H:%M:%S" if span < 86_400 else "%m-%d %H:%M")


router = APIRouter()
router.include_router(api)
router.include_router(web)

"""Consented debug access: the one path that returns raw rows, for named units whose consent holds, on approval.

The flow, every step its own audit record:

1. Consent. A dataset's policy names where its units' consent lives (`consent: {source, unit, scope, expires,
   scopes}`). Registration (and `bastion consent reload <dataset>`, which re-reads the same file) converts it and
   keeps it as `<workspace>/private/consent/<dataset>.parquet`, written whole and renamed into place after its
   `consent_loaded` record is durable; no query, synthesis, labeling or evaluation path reads it. Removing a row
   from the source (or moving its expiry into the past) and reloading revokes that consent: the next read sees it.
2. Request. A principal whose role has the `access` grant files a request for rows of named units, with a purpose
   and a declared scope (`POST /v1/access/requests`, `access_requested`). The answer says only that the request
   is pending: it is the same whether or not the units exist or have consent.
3. Decision. An admin on the gateway host who is not the requester approves it with a row cap and a lifetime
   (`access_approved`) or denies it (`access_denied`); an approved request can be revoked (`access_revoked`).
   Nothing about the decision goes over HTTP.
4. Reads. The requester reads the rows (`GET /v1/access/requests/{id}/rows`): the rows of the requested units
   whose consent for the request's scope holds at the time of the read (checked at every read), at most the
   approved number of rows over all reads together, until the grant expires. Each read is recorded before the
   rows leave, with the number of rows released (`access_read`); a grant found past its expiry is recorded once
   (`access_expired`). Units without consent contribute no rows, exactly like units without rows.

The rows come from the dataset's bounded table (values converted and clamped as the policy says, at most
`max_rows_per_unit` rows per unit), with the privacy unit and every column whose usage is query or labeling
(a labeling-only gold label included: debugging a wrong label needs it); hidden columns never. These reads are
not differentially private and spend no budget: what limits them is consent, approval, the row cap, the expiry
and the audit log.

Requests live in `<workspace>/private/access.sqlite` (SQLite): the gateway and the host's commands share it.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import secrets
import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from sqlglot import exp

from audit.record import Event
from gateway.engines.base import bounded
from gateway.service import Bastion, Context
from gateway.stores.tokens import NAME
from gateway.tablefiles import TableFileError, read_table_file
from policies.errors import Conflict, Forbidden, GatewayError, InvalidRequest, NotFound
from policies.reader import ROW_ID
from policies.schema import Column, ColumnType, Grant, Policy, Usage

MAX_UNITS = 100  # units one request may name
MAX_PURPOSE = 1_000  # characters of a purpose
MAX_ROWS = 10_000  # rows one approval may allow
MAX_HOURS = 24 * 30  # the longest lifetime of an approval
_TABLE = "access_requests"
_META = b"bastion"


class AccessError(GatewayError):
    """An admin's access or consent command cannot be carried out (host-facing: names the problem)."""

    status = 400
    code = "access_error"


class AccessClosed(GatewayError):
    """A read of a request that gives no rows now: not approved (yet), denied, revoked, expired or its row cap
    used up. The reason is the request's own state, which its requester may know."""

    status = 403
    code = "access_closed"


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _iso(moment: dt.datetime) -> str:
    return moment.astimezone(dt.UTC).isoformat(timespec="seconds")


# --- consent ----------------------------------------------------------------------------------------------


def consent_path(bastion: Bastion, dataset: str) -> Path:
    return bastion.settings.private_dir / "consent" / f"{dataset}.parquet"


def _parsed_unit(value: Any, kind: ColumnType) -> int | str | None:
    """A unit's value as its column's type reads it (an int for an int unit, else text), or None if it cannot be."""
    if value is None:
        return None
    if kind is ColumnType.INT:
        if isinstance(value, bool):
            return None
        try:
            number = value if isinstance(value, int) else int(str(value).strip())
        except ValueError:
            return None
        return number if -(2**63) <= number < 2**63 else None  # a BIGINT, as the bounded table holds it
    return str(value)


def _shared(value: int | str, col: Column) -> str | None:
    """Why the bounded table may hold other units' rows under `value` (None: only this unit's): it clamps an int
    unit's values to its bounds and cuts a text or category unit's values to its max_length, so a value at a bound,
    or of max_length characters, may stand for several units (a consent for one of them covers none of the rest)."""
    if isinstance(value, int) and col.bounds is not None and not col.bounds[0] < value < col.bounds[1]:
        return f"values at or beyond the bounds {list(col.bounds)} are clamped to them, with other units' values"
    if isinstance(value, str) and col.max_length is not None and len(value) >= col.max_length:
        return f"values of max_length ({col.max_length}) characters or more are cut to it, with other units' values"
    return None


def _unit_value(value: Any, col: Column) -> int | str | None:
    """A unit's value as the bounded table holds it, or None if it cannot be read so or if the bounded table may
    hold other units' rows under it (`_shared`)."""
    parsed = _parsed_unit(value, col.type)
    return None if parsed is None or _shared(parsed, col) is not None else parsed


def _expiry(value: Any) -> dt.datetime | None:
    """A consent's end as an aware UTC time (a date is its midnight UTC; a time without a zone is UTC)."""
    if value is None:
        return None
    if isinstance(value, dt.datetime):
        moment = value
    elif isinstance(value, dt.date):
        moment = dt.datetime(value.year, value.month, value.day)
    else:
        try:
            moment = dt.datetime.fromisoformat(str(value).strip())
        except ValueError:
            return None
    try:
        return moment.replace(tzinfo=dt.UTC) if moment.tzinfo is None else moment.astimezone(dt.UTC)
    except OverflowError:  # in UTC, before year 1 or after 9999: no consent (the row is dropped, not the load)
        return None


def _read_source(path: Path) -> pa.Table:
    try:
        return read_table_file(path)
    except TableFileError as exc:
        raise AccessError(f"the consent source: {exc}") from None


def convert_consent(policy: Policy, table: pa.Table) -> tuple[pa.Table, int]:
    """The consent rows as kept (unit, scope, expires), and how many rows of the source are no consent."""
    consent = policy.consent
    assert consent is not None and policy.unit_column is not None
    names = {n.lower(): n for n in table.column_names}
    missing = [c for c in (consent.unit, consent.scope, consent.expires) if c.lower() not in names]
    if missing:
        raise AccessError(f"the consent source has no column(s) {missing} named in the policy's consent")
    unit_col = policy.columns[policy.unit_column]
    units, scopes, ends = (table[names[c.lower()]].to_pylist() for c in (consent.unit, consent.scope, consent.expires))
    declared = set(consent.scopes)
    kept: dict[str, list[Any]] = {"unit": [], "scope": [], "expires": []}
    for unit, scope, end in zip(units, scopes, ends, strict=True):
        value = _unit_value(unit, unit_col)
        moment = _expiry(end)
        scope_text = None if scope is None else str(scope).strip()
        if value is None or moment is None or scope_text not in declared:
            continue
        kept["unit"].append(str(value))
        kept["scope"].append(scope_text)
        kept["expires"].append(moment)
    out = pa.table(
        {
            "unit": pa.array(kept["unit"], pa.string()),
            "scope": pa.array(kept["scope"], pa.string()),
            "expires": pa.array(kept["expires"], pa.timestamp("us", tz="UTC")),
        }
    )
    return out, table.num_rows - out.num_rows


@dataclass(frozen=True)
class PreparedConsent:
    """A policy's consent, read and converted, not yet in place (None `table`: the policy declares no consent)."""

    dataset: str
    source: Path | None
    table: pa.Table | None


def prepare_consent(policy: Policy, *, base: Path | None = None, source: Path | None = None) -> PreparedConsent:
    """Read and convert the policy's consent source (or `source`; a relative path is relative to `base`, the policy
    file's directory), or AccessError naming the problem. Registration calls it before it changes anything."""
    if policy.consent is None:
        return PreparedConsent(policy.dataset, None, None)
    if source is None:
        path = Path(policy.consent.source)
        source = path if path.is_absolute() or base is None else base / path
    source = source.resolve()
    if not source.exists():
        raise AccessError(f"consent source not found: {source}")
    table, _ = convert_consent(policy, _read_source(source))
    return PreparedConsent(policy.dataset, source, table)


def store_consent(bastion: Bastion, prepared: PreparedConsent) -> int:
    """Put prepared consent in place, audited as `consent_loaded` first (a dataset whose policy declares no consent
    has any earlier consent removed). Returns the number of consent rows kept (admin-facing; the record has none)."""
    target = consent_path(bastion, prepared.dataset)
    if prepared.table is None:
        if target.exists():
            bastion.audit(
                None,
                Event.CONSENT_LOADED,
                dataset=prepared.dataset,
                decision="allowed",
                reason="removed",
                request={"source": None},
            )
            target.unlink()
        return 0
    meta = {"source": str(prepared.source), "loaded_at": _iso(_now())}
    table = prepared.table.replace_schema_metadata({_META: json.dumps(meta).encode()})
    target.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    temp = target.with_name(f".{target.name}.{secrets.token_hex(4)}.tmp")
    try:
        pq.write_table(table, temp)
        os.chmod(temp, 0o600)
        bastion.audit(
            None,
            Event.CONSENT_LOADED,
            dataset=prepared.dataset,
            decision="allowed",
            reason="ok",
            request={"source": str(prepared.source), "replaced": target.exists()},  # no count: from private rows
        )
        os.replace(temp, target)
    finally:
        temp.unlink(missing_ok=True)
    return int(table.num_rows)


def load_consent(bastion: Bastion, policy: Policy, *, base: Path | None = None, source: Path | None = None) -> int:
    """`prepare_consent` then `store_consent`."""
    return store_consent(bastion, prepare_consent(policy, base=base, source=source))


def consent_source(bastion: Bastion, dataset: str) -> Path | None:
    """The file the dataset's consent was last loaded from, if it has consent loaded."""
    path = consent_path(bastion, dataset)
    if not path.exists():
        return None
    raw = (pq.read_schema(path).metadata or {}).get(_META)
    return Path(json.loads(raw)["source"]) if raw is not None else None


def consented_units(bastion: Bastion, dataset: str, scope: str, units: list[str], now: dt.datetime) -> list[str]:
    """Those of `units` with a consent for `scope` that holds at `now` (read from the consent file every time)."""
    path = consent_path(bastion, dataset)
    if not path.exists():
        return []
    table = pq.read_table(path, columns=["unit", "scope", "expires"]).to_pylist()
    valid = {r["unit"] for r in table if r["scope"] == scope and r["expires"] is not None and r["expires"] > now}
    return [u for u in units if u in valid]


# --- the requests store -----------------------------------------------------------------------------------

_COLUMNS = {
    "id": "TEXT",
    "dataset": "TEXT",
    "requester": "TEXT",
    "role": "TEXT",
    "units": "TEXT",
    "purpose": "TEXT",
    "scope": "TEXT",
    "requested_at": "TEXT",
    "status": "TEXT",
    "approver": "TEXT",
    "decided_at": "TEXT",
    "max_rows": "INTEGER",
    "expires_at": "TEXT",
    "rows_released": "INTEGER",
}


def _create_sql() -> str:
    columns = [
        exp.ColumnDef(
            this=exp.to_identifier(name),
            kind=exp.DataType.build(kind),
            constraints=[exp.ColumnConstraint(kind=exp.PrimaryKeyColumnConstraint())] if name == "id" else [],
        )
        for name, kind in _COLUMNS.items()
    ]
    return exp.Create(this=exp.Schema(this=exp.to_table(_TABLE), expressions=columns), kind="TABLE", exists=True).sql(
        dialect="sqlite"
    )


_CREATE = _create_sql()
_INSERT = exp.insert(exp.values([tuple(exp.Placeholder() for _ in _COLUMNS)]), _TABLE, columns=list(_COLUMNS)).sql(
    dialect="sqlite"
)
_SELECT_ONE = exp.select(*_COLUMNS).from_(_TABLE).where(exp.column("id").eq(exp.Placeholder())).sql(dialect="sqlite")
_SELECT_ALL = exp.select(*_COLUMNS).from_(_TABLE).order_by("requested_at").sql(dialect="sqlite")


def _update_sql(columns: list[str]) -> str:
    return exp.update(
        _TABLE, {c: exp.Placeholder() for c in columns}, where=exp.column("id").eq(exp.Placeholder())
    ).sql(dialect="sqlite")


@dataclass
class AccessRequest:
    id: str
    dataset: str
    requester: str
    role: str
    units: list[str]
    purpose: str
    scope: str
    requested_at: str
    status: str  # pending | approved | denied | revoked | expired
    approver: str | None = None
    decided_at: str | None = None
    max_rows: int | None = None
    expires_at: str | None = None
    rows_released: int = 0

    @classmethod
    def from_row(cls, row: tuple[Any, ...]) -> AccessRequest:
        values = dict(zip(_COLUMNS, row, strict=True))
        values["units"] = json.loads(values["units"])
        return cls(**values)

    def row(self) -> tuple[Any, ...]:
        values = {**self.__dict__, "units": json.dumps(self.units)}
        return tuple(values[c] for c in _COLUMNS)

    @property
    def rows_left(self) -> int | None:
        return None if self.max_rows is None else max(self.max_rows - self.rows_released, 0)

    def past_expiry(self, now: dt.datetime) -> bool:
        return self.expires_at is not None and now >= dt.datetime.fromisoformat(self.expires_at)

    def view(self) -> dict[str, Any]:
        """What the requester sees: the request as filed and its state (never anything about consent)."""
        return {
            "id": self.id,
            "dataset": self.dataset,
            "units": self.units,
            "purpose": self.purpose,
            "scope": self.scope,
            "requested_at": self.requested_at,
            "status": self.status,
            "decided_at": self.decided_at,
            "expires_at": self.expires_at,
            "max_rows": self.max_rows,
            "rows_released": self.rows_released,
            "rows_left": self.rows_left,
        }


class AccessStore:
    """Access requests in one SQLite file; every change is one `BEGIN IMMEDIATE` transaction, so concurrent reads
    of one grant never release more rows than its cap."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        with contextlib.closing(self._connect()) as con:
            con.execute(_CREATE)
        os.chmod(path, 0o600)

    def _connect(self) -> sqlite3.Connection:
        con = sqlite3.connect(self.path, timeout=30, isolation_level=None)
        con.execute("PRAGMA journal_mode=WAL")
        return con

    @contextlib.contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """A write transaction: committed if the block ends normally, rolled back if it raises."""
        con = self._connect()
        try:
            con.execute("BEGIN IMMEDIATE")
            try:
                yield con
            except BaseException:
                con.execute("ROLLBACK")
                raise
            con.execute("COMMIT")
        finally:
            con.close()

    @staticmethod
    def get(con: sqlite3.Connection, request_id: str) -> AccessRequest | None:
        row = con.execute(_SELECT_ONE, [request_id]).fetchone()
        return AccessRequest.from_row(row) if row is not None else None

    @staticmethod
    def insert(con: sqlite3.Connection, request: AccessRequest) -> None:
        con.execute(_INSERT, request.row())

    @staticmethod
    def update(con: sqlite3.Connection, request: AccessRequest, *columns: str) -> None:
        values = request.row()
        index = list(_COLUMNS)
        con.execute(_update_sql(list(columns)), [*(values[index.index(c)] for c in columns), request.id])

    def all(self) -> list[AccessRequest]:
        with contextlib.closing(self._connect()) as con:
            return [AccessRequest.from_row(r) for r in con.execute(_SELECT_ALL).fetchall()]


def open_store(bastion: Bastion) -> AccessStore:
    return AccessStore(bastion.settings.private_dir / "access.sqlite")


# --- requests (HTTP, the requester) -----------------------------------------------------------------------


def _units(policy: Policy, units: Any) -> list[str]:
    """The requested units as text, checked against the unit column's type (a public fact) only."""
    if not isinstance(units, list) or not units:
        raise InvalidRequest("units must be a non-empty list of the privacy unit's values", field="units")
    if len(units) > MAX_UNITS:
        raise InvalidRequest(f"at most {MAX_UNITS} units per request", field="units")
    assert policy.unit_column is not None
    col = policy.columns[policy.unit_column]
    out: list[str] = []
    for u in units:
        if isinstance(u, bool) or not isinstance(u, int | str):
            raise InvalidRequest("each unit must be a number or a string", field="units")
        value = _parsed_unit(u, col.type)
        if value is None:
            raise InvalidRequest(
                f"unit {str(u)[:40]!r} is not a value of the {col.type.value} column {policy.privacy_unit!r}",
                field="units",
            )
        shared = _shared(value, col)
        if shared is not None:
            raise InvalidRequest(
                f"unit {str(u)[:40]!r} cannot be requested: in the {policy.privacy_unit!r} column {shared}",
                field="units",
            )
        if str(value) not in out:
            out.append(str(value))
    return out


def file_request(bastion: Bastion, ctx: Context, body: dict[str, Any]) -> dict[str, Any]:
    """Record an access request (pending) and answer with it; audited `access_requested`, a refusal too. The
    answer depends only on the request and the policy: nothing tells whether the units exist or have consent."""
    event = Event.ACCESS_REQUESTED
    dataset = str(body.get("dataset"))
    request = {k: body.get(k) for k in ("units", "purpose", "scope")}
    policy, _ = bastion.authorize(ctx, dataset, Grant.ACCESS, request, event)
    try:
        if policy.consent is None:
            raise InvalidRequest(
                f"dataset {dataset!r} declares no consent (consent: in its policy): no rows of it can be requested",
                field="dataset",
            )
        scope = body.get("scope") or policy.consent.scopes[0]
        if scope not in policy.consent.scopes:
            raise InvalidRequest(
                f"scope {str(scope)[:64]!r} is not declared; the dataset's scopes: {', '.join(policy.consent.scopes)}",
                field="scope",
            )
        purpose = body.get("purpose")
        if not isinstance(purpose, str) or not purpose.strip() or len(purpose) > MAX_PURPOSE:
            raise InvalidRequest(f"purpose must be 1 to {MAX_PURPOSE} characters saying why", field="purpose")
        units = _units(policy, body.get("units"))
    except GatewayError as exc:
        bastion.audit(ctx, event, dataset=dataset, request=request, decision="denied", reason=exc.code)
        raise
    req = AccessRequest(
        id=f"acc_{secrets.token_hex(8)}",
        dataset=dataset,
        requester=ctx.principal.name,
        role=ctx.principal.role,
        units=units,
        purpose=purpose.strip(),
        scope=str(scope),
        requested_at=_iso(_now()),
        status="pending",
    )
    with open_store(bastion).transaction() as con:
        AccessStore.insert(con, req)
        bastion.audit(
            ctx,
            event,
            dataset=dataset,
            decision="allowed",
            reason="ok",
            access_request=req.id,
            request={"units": units, "purpose": req.purpose, "scope": req.scope},
        )
    return {
        **req.view(),
        "note": "pending: an admin on the gateway host approves or denies it; "
        f"GET /v1/access/requests/{req.id} shows its status",
    }


def _own(
    bastion: Bastion, ctx: Context, con: sqlite3.Connection, request_id: str, event: Event, action: str
) -> AccessRequest:
    """The caller's own request (with the access grant still held), or a refusal recorded under `event`: another
    principal's request is answered as an unknown one."""
    req = AccessStore.get(con, request_id)
    asked: dict[str, Any] = {"action": action}
    if req is None or req.requester != ctx.principal.name:
        bastion.audit(ctx, event, decision="denied", reason="not_found", request=asked, access_request=request_id[:64])
        raise NotFound(f"no access request {request_id[:64]!r} of yours")
    bastion.authorize(ctx, req.dataset, Grant.ACCESS, asked, event)
    return req


def _expire(
    bastion: Bastion, con: sqlite3.Connection, req: AccessRequest, now: dt.datetime, ctx: Context | None = None
) -> None:
    """Mark an approved request past its expiry as expired, recorded once (`access_expired`), from where it was
    noticed: the requester's read (`ctx`) or a command on the host."""
    if req.status == "approved" and req.past_expiry(now):
        req.status = "expired"
        AccessStore.update(con, req, "status")
        bastion.audit(
            None,
            Event.ACCESS_EXPIRED,
            actor={"principal": req.requester, "role": req.role, "token_id": None},
            source=ctx.source if ctx is not None else "cli",
            dataset=req.dataset,
            decision="allowed",
            reason="expired",
            access_request=req.id,
            request={"expires_at": req.expires_at},
            rows_released=req.rows_released,
        )


def request_status(bastion: Bastion, ctx: Context, request_id: str) -> dict[str, Any]:
    """The caller's own request: its status, expiry and rows left; audited `access_status`."""
    with open_store(bastion).transaction() as con:
        req = _own(bastion, ctx, con, request_id, Event.ACCESS_STATUS, "status")
        _expire(bastion, con, req, _now(), ctx)
        bastion.audit(
            ctx,
            Event.ACCESS_STATUS,
            dataset=req.dataset,
            decision="allowed",
            reason="ok",
            access_request=req.id,
            request={"action": "status"},
        )
    return req.view()


def _released_columns(policy: Policy) -> list[str]:
    """The columns a read releases: the privacy unit, then every query or labeling column of the bounded table."""
    unit = policy.unit_column
    assert unit is not None
    return [unit] + [n for n, c in policy.columns.items() if n != unit and c.usage is not Usage.HIDDEN]


def _json(value: Any) -> Any:
    if isinstance(value, dt.date):
        return value.isoformat()
    if isinstance(value, float) and value != value:
        return None
    return value


def _literal(value: str, kind: ColumnType) -> exp.Expr:
    return exp.Literal.number(int(value)) if kind is ColumnType.INT else exp.Literal.string(value)


def read_rows(bastion: Bastion, ctx: Context, request_id: str) -> dict[str, Any]:
    """The rows of the caller's approved request whose units' consent holds now, up to the rows left of its cap;
    recorded `access_read` with the number of rows before they leave (a refusal too)."""
    event = Event.ACCESS_READ
    refusal: GatewayError | None = None
    with open_store(bastion).transaction() as con:
        req = _own(bastion, ctx, con, request_id, event, "rows")
        now = _now()
        _expire(bastion, con, req, now, ctx)
        fields = {"dataset": req.dataset, "access_request": req.id, "request": {"action": "rows"}}
        left = req.rows_left or 0
        policy, _ = bastion.engine.policy(req.dataset)
        if req.status != "approved":
            reason: str | None = req.status
        elif policy.consent is None or policy.unit_column is None:  # registered again since: a public fact
            reason = "no_consent"
        else:
            reason = "row_cap" if left == 0 else None
        if reason is not None:
            bastion.audit(ctx, event, decision="denied", reason=reason, **fields)
            why = {
                "pending": "it is not approved yet (an admin approves it on the gateway host)",
                "row_cap": f"its {req.max_rows} rows are all released",
                "no_consent": f"dataset {req.dataset!r} declares no consent now (its policy was registered again)",
            }.get(reason, f"it is {reason}")
            refusal = AccessClosed(f"access request {req.id} gives no rows: {why}", reason=reason)
        else:
            assert policy.unit_column is not None
            unit_type = policy.columns[policy.unit_column].type
            eligible = consented_units(bastion, req.dataset, req.scope, req.units, now)
            columns = _released_columns(policy)
            unit = exp.column(policy.unit_column, quoted=True)
            where: exp.Expr = (
                exp.In(this=unit.copy(), expressions=[_literal(u, unit_type) for u in eligible])
                if eligible
                else exp.false()
            )
            query = (
                exp.select(*[exp.column(c, quoted=True) for c in columns])
                .from_(bounded(req.dataset))
                .where(where)
                .order_by(unit.copy(), exp.column(ROW_ID, quoted=True))
                .limit(left)
            )
            # One version, the latest now, named in the read's record (as every other access's record does).
            version = bastion.engine.version(req.dataset, None).version
            rows = [[_json(v) for v in r] for r in bastion.engine.at({req.dataset: version}).rows(query)]
            req.rows_released += len(rows)
            AccessStore.update(con, req, "rows_released")
            bastion.audit(
                ctx, event, decision="allowed", reason="ok", rows_released=len(rows), version=version, **fields
            )
            return {
                "id": req.id,
                "dataset": req.dataset,
                "scope": req.scope,
                "columns": columns,
                "rows": rows,
                "rows_released": len(rows),
                "rows_left": req.rows_left,
                "expires_at": req.expires_at,
                "notes": [
                    "raw rows, not differentially private: only units whose consent for this scope holds now are "
                    "included, and every read is recorded with its row count",
                ],
            }
    assert refusal is not None
    raise refusal


# --- decisions (the host) ---------------------------------------------------------------------------------


def _admin_actor(name: str) -> dict[str, Any]:
    return {"principal": name, "role": "admin", "token_id": None}


def _check_approver(name: str) -> None:
    """An approver's name is spelled like a principal's (ASCII letters, digits, '.', '_', '-'): no Unicode
    look-alike or invisible character can make the requester's own name pass for someone else's."""
    if not NAME.fullmatch(name):
        raise AccessError(
            f"approver name {name[:64]!r} must be 1 to 64 ASCII letters, digits, '-', '_' or '.', starting and "
            "ending with a letter or digit, like a principal name (--as NAME)"
        )


@contextlib.contextmanager
def _pending_change(
    bastion: Bastion, request_id: str, approver: str, event: Event, states: set[str]
) -> Iterator[tuple[sqlite3.Connection, AccessRequest]]:
    """The request in one of `states`, in a transaction (a refusal is recorded under `event` and raised)."""
    _check_approver(approver)
    store = open_store(bastion)
    with store.transaction() as con:  # a grant past its expiry is recorded expired first, whatever follows
        found = AccessStore.get(con, request_id)
        if found is None:
            raise AccessError(f"no access request {request_id!r} (bastion access list shows them)")
        _expire(bastion, con, found, _now())
    with store.transaction() as con:
        req = AccessStore.get(con, request_id)
        assert req is not None
        if req.status not in states:
            bastion.audit(
                None,
                event,
                actor=_admin_actor(approver),
                dataset=req.dataset,
                decision="denied",
                reason=req.status,
                access_request=req.id,
            )
            raise Conflict(f"access request {req.id} is {req.status}")
        yield con, req


def approve(bastion: Bastion, request_id: str, *, rows: int, hours: float, approver: str) -> AccessRequest:
    """Approve a pending request for at most `rows` rows over `hours` hours; refused (and recorded) if `approver`
    is its requester in any case. Audited `access_approved` before the change commits."""
    if not 1 <= rows <= MAX_ROWS:
        raise AccessError(f"--rows must be between 1 and {MAX_ROWS:,}")
    if not 0 < hours <= MAX_HOURS:
        raise AccessError(f"--hours must be more than 0 and at most {MAX_HOURS}")
    event = Event.ACCESS_APPROVED
    with _pending_change(bastion, request_id, approver, event, {"pending"}) as (con, req):
        if approver.lower() == req.requester.lower():  # principal names differ by more than case
            bastion.audit(
                None,
                event,
                actor=_admin_actor(approver),
                dataset=req.dataset,
                decision="denied",
                reason="self_approval",
                access_request=req.id,
            )
            raise Forbidden(
                f"{approver!r} filed access request {req.id}: its approver must be someone else "
                "(--as NAME names the approver; by default the OS account)"
            )
        now = _now()
        req.status, req.approver, req.decided_at = "approved", approver, _iso(now)
        req.max_rows, req.expires_at = rows, _iso(now + dt.timedelta(hours=hours))
        AccessStore.update(con, req, "status", "approver", "decided_at", "max_rows", "expires_at")
        bastion.audit(
            None,
            event,
            actor=_admin_actor(approver),
            dataset=req.dataset,
            decision="allowed",
            reason="ok",
            access_request=req.id,
            request={"requester": req.requester, "max_rows": rows, "hours": hours, "expires_at": req.expires_at},
        )
    return req


def deny(bastion: Bastion, request_id: str, *, approver: str) -> AccessRequest:
    """Deny a pending request; audited `access_denied`."""
    event = Event.ACCESS_DENIED
    with _pending_change(bastion, request_id, approver, event, {"pending"}) as (con, req):
        req.status, req.approver, req.decided_at = "denied", approver, _iso(_now())
        AccessStore.update(con, req, "status", "approver", "decided_at")
        bastion.audit(
            None,
            event,
            actor=_admin_actor(approver),
            dataset=req.dataset,
            decision="allowed",
            reason="ok",
            access_request=req.id,
            request={"requester": req.requester},
        )
    return req


def revoke(bastion: Bastion, request_id: str, *, approver: str) -> AccessRequest:
    """End a pending or approved request at once; audited `access_revoked`."""
    event = Event.ACCESS_REVOKED
    with _pending_change(bastion, request_id, approver, event, {"pending", "approved"}) as (con, req):
        req.status = "revoked"
        AccessStore.update(con, req, "status")
        bastion.audit(
            None,
            event,
            actor=_admin_actor(approver),
            dataset=req.dataset,
            decision="allowed",
            reason="ok",
            access_request=req.id,
            request={"requester": req.requester},
            rows_released=req.rows_released,
        )
    return req


def end_requests_of(bastion: Bastion, requester: str) -> int:
    """End every pending or approved request filed by `requester`, each audited `access_revoked` (reason
    `new_owner`): called when the name is given to a new owner (a token created for a name with no token in use),
    so that whoever is given a name later never reads what its previous owner was granted. Returns how many."""
    ended = 0
    with open_store(bastion).transaction() as con:
        for req in [AccessRequest.from_row(r) for r in con.execute(_SELECT_ALL).fetchall()]:
            if req.requester != requester or req.status not in {"pending", "approved"}:
                continue
            req.status = "revoked"
            AccessStore.update(con, req, "status")
            bastion.audit(
                None,
                Event.ACCESS_REVOKED,
                dataset=req.dataset,
                decision="allowed",
                reason="new_owner",
                access_request=req.id,
                request={"requester": req.requester},
                rows_released=req.rows_released,
            )
            ended += 1
    return ended


def listing(bastion: Bastion, dataset: str | None = None) -> list[AccessRequest]:
    """Every request (of `dataset`), oldest first, for the admin on the host; past-expiry grants shown expired."""
    now = _now()
    out = []
    for req in open_store(bastion).all():
        if dataset is not None and req.dataset != dataset:
            continue
        if req.status == "approved" and req.past_expiry(now):
            req.status = "expired"
        out.append(req)
    return out

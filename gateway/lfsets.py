"""LF sets that follow the data: an lf_author saves a set of labeling functions on a dataset, and Bastion recomputes
the set's DP statistics at every new version of the dataset, charged to the author, up to a cap the author sets.

Each recomputation is the LF statistics release of `gateway.labeling.lf_stats` (the same plan, charge, audit and
release; nothing new is released): it runs under the author's principal, with a request that names the set
(`lf_set`) and the version, so the ledger charges the author's per-principal budget before it runs and the audit
log records it as the author's `lf_stats` access at that version.

Changes beyond noise. Each version's statistics are released at alpha' = alert_rate / (2 M), where M is the number
of compared statistics (coverage, overlaps, conflicts and, with a gold column, empirical accuracy, for each LF). A
change is reported when the two versions' intervals of a statistic are disjoint. If a statistic's true value is the
same at both versions, disjoint intervals mean that one of the two missed its true value; the 2 M intervals of the
two releases miss with probability at most 2 M alpha' = alert_rate in total (union bound), so a comparison of two
versions reports a false change with probability at most alert_rate, over all LFs and statistics together.

Storage. One JSON file per set (definition and history) under `lf_sets/` in the shared directory when one is set,
else in the workspace; written atomically (temporary file, fsync, rename, fsync of the directory). Recomputation of
a set holds an exclusive lock on the set's lock file (`fcntl.flock`, which the kernel releases if the process dies),
so two processes (replicas catching up at once) never compute a (set, version) twice: the second finds the version
in the history. A version's entry is written as `pending` before the charge, under a request id derived from the set
and the version; a pending entry found later (its process died, or the ledger or the log failed, before or after
the charge) is looked up in the ledger under that id: charged, it stays charged once (`interrupted`, no
statistics); not charged, it is computed.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import math
import os
import re
import secrets
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from audit.record import Event, utc_now
from gateway.labeling import lf_stats
from gateway.service import Bastion, Context
from gateway.stores.ledger import base_dataset
from gateway.stores.tokens import Principal
from policies.errors import BudgetExhausted, GatewayError, InvalidRequest, NotFound

EVENT = Event.LF_SET
DEFAULT_ALERT_RATE = 0.05
STATISTICS = ("coverage", "overlaps", "conflicts")
GOLD_STATISTICS = ("emp_acc",)
_ID = re.compile(r"^lfs_[0-9a-f]{16}$")
_NAMESPACE = uuid.UUID("6c1d3f0e-2a4b-4c5d-8e9f-0a1b2c3d4e5f")
NOTE = (
    "each version's statistics are the LF statistics release at alpha = alert_rate / (2 x compared statistics); a "
    "change is reported when the two versions' intervals are disjoint, so a comparison reports a change that is "
    "not there with probability at most alert_rate, over all LFs and statistics together"
)


class LFSetNotFound(NotFound):
    code = "lf_set_not_found"


def _not_found(set_id: str) -> LFSetNotFound:
    # The same answer for a set that does not exist and for another principal's set.
    return LFSetNotFound(f"no LF set {set_id!r} of yours", hint="GET /v1/lf/sets lists your LF sets")


class LFSetStore:
    """The LF sets' files: `<root>/<id>.json` (definition and history) and `<root>/<id>.lock`."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def _path(self, set_id: str) -> Path:
        return self.root / f"{set_id}.json"

    def ids(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(p.stem for p in self.root.glob("lfs_*.json") if _ID.match(p.stem))

    def read(self, set_id: str) -> dict[str, Any] | None:
        if not _ID.match(set_id):
            return None
        try:
            data: dict[str, Any] = json.loads(self._path(set_id).read_text())
        except FileNotFoundError:
            return None
        return data

    def write(self, record: dict[str, Any]) -> None:
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd, tmp = tempfile.mkstemp(dir=self.root, prefix=".tmp-", suffix=".json")
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(record, f, sort_keys=True)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self._path(record["id"]))
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        dir_fd = os.open(self.root, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)

    def remove(self, set_id: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self._path(set_id).unlink()
        with contextlib.suppress(FileNotFoundError):
            (self.root / f"{set_id}.lock").unlink()

    @contextlib.contextmanager
    def locked(self, set_id: str) -> Iterator[None]:
        """Exclusive, across processes (and hosts, where the shared directory's file system supports locks)."""
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(self.root / f"{set_id}.lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # releases the lock


def store_of(bastion: Bastion) -> LFSetStore:
    settings = bastion.settings
    return LFSetStore((settings.shared_dir if settings.shared_dir is not None else settings.workspace) / "lf_sets")


# --- change detection --------------------------------------------------------------------------------------------


def compared_statistics(n_lfs: int, has_gold: bool) -> int:
    return n_lfs * (len(STATISTICS) + (len(GOLD_STATISTICS) if has_gold else 0))


def release_alpha(alert_rate: float, n_lfs: int, has_gold: bool) -> float:
    """The alpha of each version's release for which a comparison's false-alert rate is at most `alert_rate`."""
    return alert_rate / (2 * max(compared_statistics(n_lfs, has_gold), 1))


def changes(before: dict[str, Any], after: dict[str, Any]) -> list[dict[str, Any]]:
    """Statistics whose intervals at the two versions are disjoint, LF by LF (post-processing of two releases)."""
    out = []
    previous = {lf["name"]: lf for lf in before.get("lfs", [])}
    for lf in after.get("lfs", []):
        old = previous.get(lf["name"])
        if old is None:
            continue
        for stat in (*STATISTICS, *GOLD_STATISTICS):
            a, b = old.get(stat), lf.get(stat)
            if not a or not b or a.get("interval") is None or b.get("interval") is None:
                continue
            (lo1, hi1), (lo2, hi2) = a["interval"], b["interval"]
            if lo2 > hi1 or hi2 < lo1:
                out.append(
                    {
                        "lf": lf["name"],
                        "statistic": stat,
                        "direction": "up" if lo2 > hi1 else "down",
                        "before": {"value": a["value"], "interval": a["interval"]},
                        "after": {"value": b["value"], "interval": b["interval"]},
                    }
                )
    return out


# --- the service -------------------------------------------------------------------------------------------------


def _request(record: dict[str, Any], version: str) -> dict[str, Any]:
    return {
        "dataset": record["dataset"],
        "lfs": record["lfs"],
        "python_lfs": record["python_lfs"],
        "epsilon": record["epsilon"],
        "alpha": record["alpha"],
        "version": version,
        "lf_set": record["id"],
    }


def _spent(record: dict[str, Any]) -> float:
    return float(sum(e.get("epsilon_spent", 0.0) for e in record["history"]))


def public(record: dict[str, Any]) -> dict[str, Any]:
    """What the author is shown: the definition, the spend, and the history with the changes."""
    return {
        "id": record["id"],
        "name": record["name"],
        "dataset": record["dataset"],
        "lfs": record["lfs"],
        "python_lfs": record["python_lfs"],
        "epsilon": record["epsilon"],
        "cap": record["cap"],
        "alert_rate": record["alert_rate"],
        "alpha": record["alpha"],
        "created": record["created"],
        "following": record["following"],
        "stopped": record.get("stopped"),
        "epsilon_spent": _spent(record),
        "history": record["history"],
        "note": NOTE,
    }


def summary(record: dict[str, Any]) -> dict[str, Any]:
    computed = [e for e in record["history"] if e["status"] == "computed"]
    return {
        "id": record["id"],
        "name": record["name"],
        "dataset": record["dataset"],
        "following": record["following"],
        "stopped": record.get("stopped"),
        "epsilon": record["epsilon"],
        "cap": record["cap"],
        "epsilon_spent": _spent(record),
        "versions": len(computed),
        "latest_version": computed[-1]["version"] if computed else None,
        "changes": len(computed[-1].get("changes", [])) if computed else 0,
    }


def _author_context(bastion: Bastion, record: dict[str, Any], version: str) -> Context | None:
    """The author's principal through a token in use with the role the set was saved under, or None."""
    author = record["author"]
    now = time.time()
    for token in bastion.tokens.list():
        if token.name == author["name"] and token.role == author["role"] and token.state(now) == "active":
            principal = Principal(token.name, token.role, token.token_id)
            request_id = uuid.uuid5(_NAMESPACE, f"{record['id']}/{version}").hex
            return Context(principal, source="lf_set", request_id=request_id)
    return None


def _statistics(answer: dict[str, Any]) -> dict[str, Any]:
    keep = ("lfs", "label_set", "alpha", "classes", "notes", "measurements")
    return {k: answer[k] for k in keep if k in answer}


def _compute(bastion: Bastion, record: dict[str, Any], version: str, ctx: Context) -> dict[str, Any]:
    """One version's entry: the LF statistics release at `version`, charged to the author (raises a refusal)."""
    answer = lf_stats(bastion, ctx, _request(record, version))
    entry: dict[str, Any] = {
        "version": version,
        "status": "computed",
        "time": utc_now(),
        "request_id": ctx.request_id,
        "epsilon_spent": float(answer["epsilon_spent"]),
        "cached": bool(answer["cached"]),
        "statistics": _statistics(answer),
    }
    previous = [e for e in record["history"] if e["status"] == "computed"]
    if previous:
        entry["compared_with"] = previous[-1]["version"]
        entry["changes"] = changes(previous[-1]["statistics"], entry["statistics"])
    return entry


def _stop(record: dict[str, Any], reason: str) -> None:
    record["following"] = False
    record["stopped"] = reason


def _advance(bastion: Bastion, record: dict[str, Any], store: LFSetStore) -> list[dict[str, Any]]:
    """Compute the versions the set has not seen (the lock held); each entry written before the next one."""
    done: list[dict[str, Any]] = []
    if not record["following"]:
        return done
    seen = {e["version"]: e for e in record["history"]}
    # A pending entry whose process died: charged once already (interrupted), or not charged (computed below).
    for e in list(record["history"]):
        if e["status"] == "pending":
            # Every ledger key of the dataset: with periods a charge is one row per period (`dataset@period`).
            charged = [
                c
                for c in bastion.ledger.history()
                if c["request_id"] == e["request_id"]
                and c["principal"] == record["author"]["name"]
                and base_dataset(str(c["dataset"])) == record["dataset"]
            ]
            if charged:
                e.update(status="interrupted", epsilon_spent=float(str(charged[0]["epsilon"])), time=utc_now())
                store.write(record)
            else:
                record["history"].remove(e)
                del seen[e["version"]]
    try:
        versions = bastion.engine.versions(record["dataset"])
    except GatewayError:
        return done  # the dataset is gone: nothing to follow now (a GET still shows the history)
    start = record["start_serial"]
    for v in versions:
        if v.serial < start or v.retired or v.version in seen:
            continue
        if _spent(record) + record["epsilon"] > record["cap"] * (1 + 1e-9):
            record["history"].append({"version": v.version, "status": "capped", "time": utc_now()})
            _stop(record, "cap_reached")
            store.write(record)
            break
        ctx = _author_context(bastion, record, v.version)
        if ctx is None:
            record["history"].append({"version": v.version, "status": "refused", "reason": "author_inactive"})
            _stop(record, "author_inactive")
            store.write(record)
            break
        record["history"].append({"version": v.version, "status": "pending", "request_id": ctx.request_id})
        store.write(record)
        try:
            entry = _compute(bastion, record, v.version, ctx)
        except GatewayError as exc:
            if exc.status >= 500:
                # The ledger or the log out of reach, before or after the charge: the entry stays pending, and the
                # next catch-up looks the charge up under its request id (charged: interrupted; not: computed).
                raise
            entry = {"version": v.version, "status": "refused", "reason": exc.code, "time": utc_now()}
            if isinstance(exc, BudgetExhausted):
                _stop(record, "budget_exhausted")
        record["history"][-1] = entry
        store.write(record)
        done.append(entry)
        if not record["following"]:
            break
    return done


def catch_up(bastion: Bastion, *, dataset: str | None = None, set_id: str | None = None) -> list[dict[str, Any]]:
    """Recompute every followed set (of `dataset`, or the one `set_id`) at the versions it missed. Returns
    [{id, name, dataset, version, status, changes}] for what was done."""
    store = store_of(bastion)
    out = []
    for sid in [set_id] if set_id is not None else store.ids():
        record = store.read(sid)
        if record is None or not record["following"] or (dataset is not None and record["dataset"] != dataset):
            continue
        with store.locked(sid):
            record = store.read(sid)  # as the last holder of the lock left it
            if record is None:
                continue
            for entry in _advance(bastion, record, store):
                out.append(
                    {
                        "id": sid,
                        "name": record["name"],
                        "dataset": record["dataset"],
                        "version": entry["version"],
                        "status": entry["status"],
                        "changes": entry.get("changes", []),
                    }
                )
    return out


def _check(request: dict[str, Any]) -> tuple[float, float]:
    def number(name: str, low: float, high: float) -> float:
        value = request.get(name)
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise InvalidRequest(f"{name} must be a finite number", hint=f"{name} in ({low:g}, {high:g}]")
        if not low < value <= high:
            raise InvalidRequest(f"{name}={value:g} is out of range", hint=f"{name} in ({low:g}, {high:g}]")
        return float(value)

    alert = number("alert_rate", 0.0, 0.5) if request.get("alert_rate") is not None else DEFAULT_ALERT_RATE
    cap = number("cap", 0.0, 1e6)
    epsilon = number("epsilon", 0.0, 1000.0)
    if epsilon > cap:
        raise InvalidRequest(
            f"epsilon per version ({epsilon:g}) is above the cap ({cap:g}): not one version could be computed",
            hint="raise the cap or lower epsilon",
        )
    name = request.get("name")
    if not isinstance(name, str) or not 1 <= len(name) <= 100:
        raise InvalidRequest("name must be 1 to 100 characters")
    return alert, cap


def save(bastion: Bastion, ctx: Context, request: dict[str, Any]) -> dict[str, Any]:
    """Save a set and compute it at the dataset's latest version (charged to the caller); a request the LF
    statistics would refuse is refused here, before any charge, and nothing is saved."""
    with bastion.denials_audited(ctx, EVENT, str(request.get("dataset")), request):
        alert_rate, cap = _check(request)
    lfs, python_lfs = list(request.get("lfs", [])), list(request.get("python_lfs", []))
    has_gold = bastion_has_gold(bastion, ctx, request)
    set_id = f"lfs_{secrets.token_hex(8)}"
    latest = bastion.engine.version(request["dataset"], None)
    record: dict[str, Any] = {
        "id": set_id,
        "name": request["name"],
        "dataset": request["dataset"],
        "author": {"name": ctx.principal.name, "role": ctx.principal.role},
        "lfs": lfs,
        "python_lfs": python_lfs,
        "epsilon": float(request["epsilon"]),
        "cap": cap,
        "alert_rate": alert_rate,
        "alpha": release_alpha(alert_rate, len(lfs) + len(python_lfs), has_gold),
        "created": utc_now(),
        "start_serial": latest.serial,
        "following": True,
        "stopped": None,
        "history": [],
    }
    entry = _compute(bastion, record, latest.version, ctx)  # refusals (before the charge) save nothing
    record["history"].append(entry)
    store = store_of(bastion)
    with store.locked(set_id):
        store.write(record)
    bastion.audit(
        ctx,
        EVENT,
        dataset=record["dataset"],
        request={"action": "save", "lf_set": set_id},
        decision="allowed",
        reason="ok",
    )
    return public(record)


def bastion_has_gold(bastion: Bastion, ctx: Context, request: dict[str, Any]) -> bool:
    """Whether the dataset's policy declares a gold column (public); refusals of the dataset audited."""
    from policies.schema import Grant

    policy, _ = bastion.authorize(ctx, str(request.get("dataset")), Grant.LABELING, request, event=EVENT)
    return policy.labels is not None and policy.labels.gold_column is not None


def _own(bastion: Bastion, ctx: Context, set_id: str, action: str) -> dict[str, Any]:
    record = store_of(bastion).read(set_id)
    if record is None or record["author"]["name"] != ctx.principal.name:
        bastion.audit(
            ctx, EVENT, request={"action": action, "lf_set": set_id}, decision="denied", reason=LFSetNotFound.code
        )
        raise _not_found(set_id)
    return record


def listing(bastion: Bastion, ctx: Context) -> list[dict[str, Any]]:
    store = store_of(bastion)
    out = []
    for sid in store.ids():
        record = store.read(sid)
        if record is not None and record["author"]["name"] == ctx.principal.name:
            out.append(summary(record))
    return out


def get(bastion: Bastion, ctx: Context, set_id: str) -> dict[str, Any]:
    """The set with its history, after catching up on the versions it missed."""
    _own(bastion, ctx, set_id, "read")
    catch_up(bastion, set_id=set_id)
    record = store_of(bastion).read(set_id)
    if record is None:  # deleted meanwhile
        raise _not_found(set_id)
    return public(record)


def delete(bastion: Bastion, ctx: Context, set_id: str) -> dict[str, Any]:
    """Stop following: the set and its history are removed (its accesses stay in the audit log)."""
    record = _own(bastion, ctx, set_id, "delete")
    store = store_of(bastion)
    with store.locked(set_id):
        store.remove(set_id)
    bastion.audit(
        ctx,
        EVENT,
        dataset=record["dataset"],
        request={"action": "delete", "lf_set": set_id},
        decision="allowed",
        reason="ok",
    )
    return {"id": set_id, "deleted": True}

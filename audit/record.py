"""Audit records: the event a caller passes, normalised to plain JSON, plus the fields the log adds.

A record is stored as its canonical JSON encoding (keys sorted, no whitespace, UTF-8, strict JSON numbers),
one record per line. The stored bytes are what is hashed, so a record never needs re-encoding to be verified.
"""

from __future__ import annotations

import datetime as dt
import enum
import hashlib
import json
import math
from collections.abc import Mapping
from typing import Any

from audit.errors import AuditRecordError

SCHEMA_VERSION = 1
GENESIS = "0" * 64
RESERVED = frozenset({"schema_version", "seq", "time", "prev_hash"})
TIME_FORMAT = "%Y-%m-%dT%H:%M:%S.%fZ"
TEXT_PREFIX_BYTES = 4_096  # a longer text in an event is stored as its digest, length and this many bytes of it
TRUNCATED = "_truncated"  # suffix of the field that describes a cut text beside it


class Event(enum.StrEnum):
    """The event names records carry: one per privileged action, allowed or denied."""

    QUERY = "query"
    SYNTH = "synth"
    SYNTH_APPROVED = "synth_approved"
    SYNTH_ACCESS = "synth_access"
    SYNTH_DOWNLOAD = "synth_download"
    SYNTH_REPORT = "synth_report"
    LF_STATS = "lf_stats"
    LF_SET = "lf_set"  # an LF set saved, deleted, or refused to another principal
    PUBLIC_READ = "public_read"
    EVALUATE = "evaluate"
    PREDICTIONS_ADDED = "predictions_added"
    ACCESS_REQUESTED = "access_requested"
    ACCESS_APPROVED = "access_approved"
    ACCESS_DENIED = "access_denied"
    ACCESS_REVOKED = "access_revoked"
    ACCESS_EXPIRED = "access_expired"
    ACCESS_STATUS = "access_status"
    ACCESS_READ = "access_read"
    CONSENT_LOADED = "consent_loaded"
    AUDIT_READ = "audit_read"
    AUTHENTICATION = "authentication"
    INVALID_REQUEST = "invalid_request"
    ORPHAN_CHARGE = "orphan_charge"
    LEDGER_RECONCILED = "ledger_reconciled"
    DATASET_REGISTERED = "dataset_registered"
    DATASET_APPENDED = "dataset_appended"
    MONITORING_REPORT = "monitoring_report"
    VERSION_RETIRED = "version_retired"
    TOKEN_CREATED = "token_created"
    TOKEN_REVOKED = "token_revoked"
    TOKEN_ROTATED = "token_rotated"
    KEY_GENERATED = "key_generated"
    KEY_ROTATED = "key_rotated"
    LOG_REPAIRED = "log_repaired"
    CHECKPOINT_REQUESTED = "checkpoint_requested"
    CHECKPOINT_EXPORTED = "checkpoint_exported"


# Names that older logs carry for an action that now has one Event name. They stay valid records (verification
# never depends on the name) and valid filter values, so old denials can still be found.
LEGACY_EVENTS: dict[str, Event] = {"labeling": Event.LF_STATS}  # denied LF requests, before they were lf_stats


def known_events() -> list[str]:
    """Every event name a record can carry (current and legacy), sorted."""
    return sorted({*(e.value for e in Event), *LEGACY_EVENTS})


def check_event_name(name: str) -> str:
    """`name` if records can carry it, else ValueError listing the known names."""
    if name not in known_events():
        raise ValueError(f"unknown event {name!r}; the events are: {', '.join(known_events())}")
    return name


def utc_now() -> str:
    """The current UTC time in the fixed-width form records use (sorts lexicographically)."""
    return dt.datetime.now(dt.UTC).strftime(TIME_FORMAT)


def format_time(value: dt.datetime | str) -> str:
    """A datetime (naive means UTC) or ISO 8601 string in the records' fixed-width UTC form."""
    if isinstance(value, str):
        value = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
    if value.tzinfo is None:
        value = value.replace(tzinfo=dt.UTC)
    return value.astimezone(dt.UTC).strftime(TIME_FORMAT)


def parse_time(value: str) -> dt.datetime:
    return dt.datetime.fromisoformat(value.replace("Z", "+00:00"))


def canonical(record: Mapping[str, Any]) -> bytes:
    """Canonical bytes of an already normalised record (see `normalize`)."""
    return json.dumps(record, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode(
        "utf-8"
    )


def normalize(value: Any, *, fix_text: bool = False) -> Any:
    """Turn a value into plain JSON types so that `json.loads(canonical(x)) == x`.

    Tuples and sets become lists (sets sorted), non-finite floats the strings "NaN", "Infinity" and
    "-Infinity", other numbers their int, float or exact decimal string, dates ISO 8601 strings, bytes hex,
    enums their value, and anything else `str(value)`. With `fix_text`, lone surrogates (which UTF-8 cannot
    encode) are escaped as backslash sequences.
    """
    if isinstance(value, str):
        if fix_text:
            return value.encode("utf-8", "backslashreplace").decode("utf-8")
        return value
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        if math.isfinite(value):
            return float(value)
        return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
    if isinstance(value, Mapping):
        return {_key(k, fix_text): normalize(v, fix_text=fix_text) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [normalize(v, fix_text=fix_text) for v in value]
    if isinstance(value, set | frozenset):
        items = [normalize(v, fix_text=fix_text) for v in value]
        return sorted(items, key=lambda v: json.dumps(v, sort_keys=True, ensure_ascii=False))
    if isinstance(value, enum.Enum):
        return normalize(value.value, fix_text=fix_text)
    if isinstance(value, dt.datetime | dt.date | dt.time):
        return value.isoformat()
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value).hex()
    if hasattr(value, "__index__"):
        return int(value.__index__())
    if type(value).__name__ == "Decimal":
        return normalize(str(value), fix_text=fix_text)
    if hasattr(value, "__float__"):
        return normalize(float(value), fix_text=fix_text)
    return normalize(str(value), fix_text=fix_text)


def bound_texts(value: Any, limit: int = TEXT_PREFIX_BYTES) -> Any:
    """A copy of an event's fields in which no text is longer than `limit` UTF-8 bytes, so that a record's size
    does not grow with what a client sends.

    A longer text is cut to its longest prefix of at most `limit` bytes. In an object, the member `<name>` keeps
    the prefix and `<name>_truncated` beside it is `{"sha256", "length"}` of the whole text (hex digest of its
    UTF-8 bytes, its length in characters); in a list the text becomes `{"prefix", "sha256", "length"}`.
    """
    if isinstance(value, Mapping):
        out: dict[Any, Any] = {}
        for k, v in value.items():
            if isinstance(v, str) and _too_long(v, limit):
                out[k], out[f"{k}{TRUNCATED}"] = _cut(v, limit)
            else:
                out[k] = bound_texts(v, limit)
        return out
    if isinstance(value, list | tuple):
        items = []
        for v in value:
            if isinstance(v, str) and _too_long(v, limit):
                prefix, about = _cut(v, limit)
                items.append({"prefix": prefix, **about})
            else:
                items.append(bound_texts(v, limit))
        return items
    return value


def _too_long(text: str, limit: int) -> bool:
    return len(text) > limit // 4 and len(text.encode("utf-8", "surrogatepass")) > limit


def _cut(text: str, limit: int) -> tuple[str, dict[str, Any]]:
    data = text.encode("utf-8", "surrogatepass")
    prefix = data[:limit].decode("utf-8", "ignore")
    return prefix, {"sha256": hashlib.sha256(data).hexdigest(), "length": len(text)}


def _key(key: Any, fix_text: bool) -> str:
    text = key if isinstance(key, str) else str(normalize(key))
    return normalize(text, fix_text=fix_text)


def prepare(event: Any) -> dict[str, Any]:
    """Validate and normalise a caller's event; raise AuditRecordError if it cannot become a record."""
    if not isinstance(event, Mapping):
        raise AuditRecordError(f"an audit event must be a dict, not {type(event).__name__}")
    clash = RESERVED.intersection(k for k in event if isinstance(k, str))
    if clash:
        raise AuditRecordError(f"event uses fields the log sets itself: {sorted(clash)}")
    kind = event.get("event")
    if not isinstance(kind, str) or not kind:
        raise AuditRecordError("an audit event needs a non-empty string field 'event' (its type)")
    try:
        # Fast path: events are usually plain JSON already; a JSON round trip yields exactly what is stored.
        return json.loads(json.dumps(event, sort_keys=True, ensure_ascii=False, allow_nan=False))
    except (TypeError, ValueError):
        pass
    try:
        return normalize(event)
    except RecursionError as exc:
        raise AuditRecordError("audit event is nested too deeply or contains a cycle") from exc


def seal(event: dict[str, Any], seq: int, time: str, prev_hash: str) -> tuple[dict[str, Any], bytes]:
    """The stored record for a prepared event and its canonical bytes (without the newline)."""
    record = {**event, "schema_version": SCHEMA_VERSION, "seq": seq, "time": time, "prev_hash": prev_hash}
    try:
        return record, canonical(record)
    except UnicodeEncodeError:
        record = {
            **normalize(event, fix_text=True),
            "schema_version": SCHEMA_VERSION,
            "seq": seq,
            "time": time,
            "prev_hash": prev_hash,
        }
        return record, canonical(record)
    except (TypeError, ValueError) as exc:
        raise AuditRecordError(f"audit event is not serialisable: {exc}") from exc

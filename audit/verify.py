"""Independent verification of an audit log directory from its files and a set of trusted public keys.

Everything is recomputed from the bytes on disk: every record's leaf hash and hash-chain link, the Merkle root
at the size of every checkpoint, every checkpoint's signature, and signing-key continuity (a checkpoint signed
by a different key than the one before it must be preceded by a ``key_rotated`` record announcing that key).
The writer's cached state (``audit.state``) is never read.

The default (fast) mode streams the file and treats records as bytes: a record's chain link and position are
checked by looking for its exact canonical ``"prev_hash":"<hex>"`` and ``,"seq":<n>,`` members, and records
are parsed only around a failure, to name it. ``strict=True`` also parses every record and checks that it is
in canonical form with well-typed top-level fields (about five times slower).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from audit import checkpoint as ckpt
from audit import keys, storage
from audit.checkpoint import Checkpoint
from audit.merkle import EMPTY_ROOT
from audit.record import GENESIS, SCHEMA_VERSION, canonical, parse_time

KeySource = keys.Keyring | str | Path | Mapping[str, Any] | Iterable[Any]
_CHUNK = 1 << 24


@dataclass
class VerifyReport:
    """The outcome of `verify_log`.

    `status` is ``"ok"``, ``"torn_tail"`` (the only defect is an unacknowledged final record cut short by a
    crash: not tampering) or ``"tampered"``. `first_bad` is the 0-based position (= expected seq) of the
    first record that cannot be trusted and `first_bad_line` its 1-based line in ``audit.jsonl``;
    `bad_checkpoint` is the 1-based line in ``checkpoints.jsonl`` of the first checkpoint that cannot be
    trusted.
    """

    ok: bool
    status: str
    message: str
    first_bad: int | None = None
    first_bad_line: int | None = None
    bad_checkpoint: int | None = None
    torn_line: int | None = None
    records: int = 0
    checkpoints: int = 0
    covered: int = 0
    last_checkpoint: Checkpoint | None = None
    root_hash: str = EMPTY_ROOT.hex()
    problems: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        data = dict(self.__dict__)
        data["last_checkpoint"] = self.last_checkpoint.to_dict() if self.last_checkpoint else None
        return data


@dataclass
class _Scan:
    """What one pass over the log file found."""

    records: int = 0
    root: bytes = EMPTY_ROOT
    roots: dict[int, bytes] = field(default_factory=dict)
    # (position, record bytes, leaf hash of the record before, leaf hash of the one before that)
    breaks: list[tuple[int, bytes, str, str | None]] = field(default_factory=list)
    strict_errors: list[tuple[int, str]] = field(default_factory=list)
    rotations: list[tuple[int, bytes]] = field(default_factory=list)
    last_body: bytes | None = None
    torn: bytes = b""


@dataclass(frozen=True)
class _Anchor:
    label: str
    line: int | None  # line in checkpoints.jsonl, None for a trusted checkpoint given by the caller
    cp: Checkpoint


@dataclass(frozen=True)
class _Problem:
    text: str
    position: int | None = None  # first untrusted record, if the problem is about records
    line: int | None = None  # checkpoint line, if the problem is about a checkpoint
    rank: int = 0  # among problems naming the same record, the lowest rank is the most specific


def verify_log(
    directory: str | Path,
    keyring: KeySource | None = None,
    trusted_checkpoint: str | Path | Checkpoint | dict[str, Any] | None = None,
    *,
    strict: bool = False,
) -> VerifyReport:
    """Verify the log in `directory`.

    `keyring`: the public keys checkpoints may be signed with (a `Keyring`, a keyring.json file or key
    directory, a PEM file, or a mapping / list of public keys). Auditors should pass their own copy; when
    None, the keyring of the default key directory ``directory.parent / "keys"`` is used.
    `trusted_checkpoint`: a checkpoint kept outside the log (an exported file, dict or `Checkpoint`); the log
    must contain its tree as a prefix.
    """
    directory = Path(directory)
    ring = keys.Keyring.load(directory.parent / "keys") if keyring is None else keys.Keyring.coerce(keyring)
    snap = storage.snapshot(directory)
    ckpt_entries, torn_ckpt = ckpt.read_lines(directory / storage.CHECKPOINTS, snap.checkpoints_size)

    problems: list[_Problem] = []
    anchors: list[_Anchor] = []  # signature-verified checkpoints
    prev_size = -1
    for line, entry in ckpt_entries:
        label = f"checkpoint at line {line} of {storage.CHECKPOINTS}"
        if isinstance(entry, str):
            problems.append(_Problem(f"{label}: {entry}", line=line))
            continue
        why = entry.problem(ring)
        if why is not None:
            problems.append(_Problem(f"{label}: {why}", line=line))
            continue
        if entry.tree_size < prev_size:
            problems.append(
                _Problem(
                    f"{label}: tree size {entry.tree_size} is smaller than the previous "
                    f"checkpoint's {prev_size} (checkpoints out of order)",
                    line=line,
                )
            )
        prev_size = max(prev_size, entry.tree_size)
        anchors.append(_Anchor(label, line, entry))
    if trusted_checkpoint is not None:
        for i, entry in enumerate(ckpt.load(trusted_checkpoint)):
            why = entry.problem(ring)
            if why is not None:
                problems.append(_Problem(f"trusted checkpoint {i}: {why}"))
            else:
                anchors.append(_Anchor(f"trusted checkpoint {i}", None, entry))

    scan = _scan_log(directory / storage.LOG, snap.log_size, {a.cp.tree_size for a in anchors}, strict)
    n = scan.records

    # Where the chain breaks, and which record that blames.
    chain_bad = sorted([_diagnose(*b) for b in scan.breaks] + scan.strict_errors)
    torn_line = None
    max_covered = max((a.cp.tree_size for a in anchors), default=0)
    if scan.torn:
        if max_covered <= n:  # otherwise the cut record was checkpointed, so acknowledged: truncation below
            torn_line = n + 1
    elif chain_bad and chain_bad[0][0] == n - 1 and n - 1 >= max_covered and scan.last_body is not None:
        try:
            json.loads(scan.last_body)
        except ValueError:
            torn_line = n
            chain_bad = chain_bad[1:]
            n -= 1  # the torn line is not a record
    for pos, why in chain_bad:
        problems.append(_Problem(f"record at position {pos} (line {pos + 1}): {why}", position=pos))

    # Every anchor must describe a prefix of the log.
    verified: list[_Anchor] = []
    mismatched: list[_Anchor] = []
    for anchor in anchors:
        cp = anchor.cp
        if cp.tree_size > n:
            problems.append(
                _Problem(
                    f"{anchor.label} covers {cp.tree_size} records but the log has {n}: records from position "
                    f"{n} on were deleted (log truncated)",
                    position=n,
                    line=anchor.line,
                    rank=1,
                )
            )
        elif scan.roots.get(cp.tree_size) != cp.root:
            mismatched.append(anchor)
        else:
            verified.append(anchor)
    good_sizes = sorted({a.cp.tree_size for a in verified})
    for anchor in mismatched:
        size = anchor.cp.tree_size
        low = max((s for s in good_sizes if s < size), default=0)
        inside = [p for p, _ in chain_bad if low <= p < size]
        detail = (
            f"first untrusted record at position {inside[0]}"
            if inside
            else f"records {low}..{size - 1} were rewritten (their hash chain was recomputed)"
        )
        problems.append(
            _Problem(
                f"{anchor.label} (tree size {size}) is inconsistent with the log: Merkle root differs; {detail}",
                position=inside[0] if inside else low,
                line=anchor.line,
                rank=2,
            )
        )

    in_log = [a for a in verified if a.line is not None]
    problems.extend(_key_continuity(in_log, scan.rotations))

    last = max((a.cp for a in in_log), key=lambda cp: cp.tree_size, default=None)
    report = VerifyReport(
        ok=True,
        status="ok",
        message="",
        records=n,
        checkpoints=len(verified),
        torn_line=torn_line,
        covered=last.tree_size if last else 0,
        last_checkpoint=last,
        root_hash=scan.root.hex(),
        problems=[p.text for p in problems],
    )
    record_level = sorted((p.position, p.rank, p.text) for p in problems if p.position is not None)
    if record_level:
        report.first_bad, _, report.message = record_level[0]
        report.first_bad_line = report.first_bad + 1
    lines = [p.line for p in problems if p.line is not None]
    report.bad_checkpoint = min(lines) if lines else None
    if problems:
        report.ok, report.status = False, "tampered"
        if not record_level:
            report.message = problems[0].text
    elif torn_line is not None:
        report.ok, report.status = False, "torn_tail"
        report.first_bad, report.first_bad_line = torn_line - 1, torn_line
        report.message = (
            f"torn final record at line {torn_line}: an append interrupted by a crash (never "
            f"acknowledged), not tampering; the {n} records before it verify and the next "
            "append repairs it"
        )
    else:
        report.message = _ok_message(report, torn_ckpt)
    return report


def _ok_message(report: VerifyReport, torn_ckpt: int | None) -> str:
    if report.records == 0 and report.checkpoints == 0:
        return "ok: empty log"
    parts = [f"ok: {report.records} records, {report.checkpoints} checkpoints verified"]
    cp = report.last_checkpoint
    if cp is None:
        parts.append("no checkpoint yet: records are protected by the hash chain only")
    else:
        parts.append(f"last checkpoint covers {cp.tree_size} records (key {cp.key_id}, {cp.time})")
        if report.records > cp.tree_size:
            later = report.records - cp.tree_size
            parts.append(f"{later} later records are chained but not yet checkpointed")
    if torn_ckpt is not None:
        parts.append(f"torn final checkpoint line {torn_ckpt} ignored (interrupted write)")
    return "; ".join(parts)


def _read_lines(path: Path, size: int, tail: list[bytes]) -> Iterator[bytes]:
    """The complete lines (no newline) of the first `size` bytes; the incomplete rest goes in tail[0]."""
    if size == 0:
        return
    with open(path, "rb") as f:
        carry, remaining = b"", size
        while remaining:
            chunk = f.read(min(_CHUNK, remaining))
            if not chunk:
                break
            remaining -= len(chunk)
            lines = (carry + chunk).split(b"\n")
            carry = lines.pop()
            yield from lines
        tail[0] = carry


def _scan_log(path: Path, size: int, wanted: set[int], strict: bool) -> _Scan:
    scan = _Scan()
    sha = hashlib.sha256
    stack: list[bytes] = []
    targets = sorted(s for s in wanted if s > 0)
    if 0 in wanted:
        scan.roots[0] = EMPTY_ROOT
    ti = 0
    next_target = targets[0] if targets else -1
    prev = GENESIS.encode()
    prev2: bytes | None = None
    n = 0
    body = None
    tail = [b""]
    for body in _read_lines(path, size, tail):
        leaf = sha(b"\x00" + body).digest()
        if (b'"prev_hash":"' + prev + b'"') not in body or (b',"seq":%d,' % n) not in body:
            if len(scan.breaks) < 100:
                scan.breaks.append((n, body, prev.decode(), prev2.decode() if prev2 is not None else None))
        elif strict:
            why = _strict_problem(body, n, prev.decode())
            if why is not None:
                scan.strict_errors.append((n, why))
        if b'"event":"key_rotated"' in body:
            scan.rotations.append((n, body))
        h, c = leaf, n
        while c & 1:
            h = sha(b"\x01" + stack.pop() + h).digest()
            c >>= 1
        stack.append(h)
        n += 1
        if n == next_target:
            scan.roots[n] = _fold(stack)
            ti += 1
            next_target = targets[ti] if ti < len(targets) else -1
        prev2, prev = prev, leaf.hex().encode()
    scan.records = n
    scan.root = _fold(stack)
    scan.last_body = body
    scan.torn = tail[0]
    return scan


def _fold(stack: list[bytes]) -> bytes:
    if not stack:
        return EMPTY_ROOT
    r = stack[-1]
    for h in reversed(stack[:-1]):
        r = hashlib.sha256(b"\x01" + h + r).digest()
    return r


def _strict_problem(body: bytes, pos: int, prev: str) -> str | None:
    try:
        record = json.loads(body)
    except ValueError:
        return "not valid JSON"
    if not isinstance(record, dict):
        return "not a JSON object"
    if record.get("schema_version") != SCHEMA_VERSION:
        return f"unsupported schema_version {record.get('schema_version')!r}"
    if record.get("seq") != pos or record.get("prev_hash") != prev:
        return "seq or prev_hash is not a top-level field with the expected value"
    if not isinstance(record.get("event"), str):
        return "no string 'event' field"
    try:
        parse_time(record["time"])
    except (KeyError, TypeError, ValueError):
        return "no valid 'time' field"
    try:
        if canonical(record) != body:
            return "not in canonical form"
    except (TypeError, ValueError):
        return "not in canonical form"
    return None


def _diagnose(pos: int, body: bytes, prev: str, prev2: str | None) -> tuple[int, str]:
    """Name the first untrusted record given that the record at `pos` does not link to the one before it."""
    try:
        record = json.loads(body)
    except ValueError:
        return pos, "not valid JSON"
    if not isinstance(record, dict):
        return pos, "not a JSON object"
    seq, link = record.get("seq"), record.get("prev_hash")
    if pos >= 1:
        before_previous = prev2 if prev2 is not None else GENESIS
        if link == before_previous and link != prev:
            return pos - 1, "inserted record: the record after it links to the record before it"
        if seq == pos and link != prev:
            return pos - 1, "modified: its hash does not match the prev_hash stored in the next record"
    if seq != pos:
        return pos, f"expected seq {pos} but found {seq!r}: records were deleted, inserted or reordered here"
    if link != prev:
        return pos, "prev_hash does not start the chain"
    return pos, "not in canonical form"


def _key_continuity(anchors: list[_Anchor], rotations: list[tuple[int, bytes]]) -> list[_Problem]:
    """A change of signing key between consecutive checkpoints must be announced by a key_rotated record."""
    announced: list[tuple[int, str, str]] = []
    for pos, body in rotations:
        try:
            record = json.loads(body)
        except ValueError:
            continue
        if record.get("event") == "key_rotated":
            announced.append((pos, str(record.get("old_key_id")), str(record.get("new_key_id"))))
    found = []
    previous: Checkpoint | None = None
    for anchor in anchors:
        cp = anchor.cp
        if previous is not None and cp.key_id != previous.key_id:
            if not any(
                old == previous.key_id and new == cp.key_id and pos < cp.tree_size for pos, old, new in announced
            ):
                found.append(
                    _Problem(
                        f"{anchor.label}: signed by key {cp.key_id} but the log never "
                        f"announced a rotation from {previous.key_id}",
                        line=anchor.line,
                    )
                )
        previous = cp
    return found


def verdict(report: VerifyReport) -> str:
    """One line for a `VerifyReport`: "OK", or "BROKEN: ..." naming the first bad record (or checkpoint)."""
    if report.ok:
        return "OK"
    if report.status == "torn_tail":
        return f"INCOMPLETE: torn final record at line {report.first_bad_line} (an interrupted write, not tampering)"
    if report.first_bad_line is not None:
        return f"BROKEN: first bad record at line {report.first_bad_line}"
    if report.bad_checkpoint is not None:
        return f"BROKEN: bad checkpoint at line {report.bad_checkpoint} of checkpoints.jsonl"
    return "BROKEN"

"""Run registered Python LFs in a separate worker process, each on its own input table (the distinct combinations
of the columns it declares, padded to a public number; see `labeling_functions.combos`).

The worker is forked from a worker server (multiprocessing "forkserver"): a fresh interpreter started once, which
has imported Snorkel, pyarrow and the policy schema (`PRELOAD`, third-party and our own code, never an LF's
module) and never runs an LF itself, so starting a worker takes milliseconds instead of seconds of imports. The
gateway starts the server when its app starts (`start_worker_server`). Its standard output and error go to /dev/null (an
LF's print or a warning could quote a row). Before it touches the rows it leaves the network (a new user and
network namespace where the kernel allows it, and in any case Python's socket constructors and name resolution
raise), and once the LFs are imported its address space is capped (RLIMIT_AS). The parent waits at most the time
limit and then kills it.

Each input row reaches the LF as a `Row`, Snorkel's `x`, whose attributes (and items) are the LF's declared
columns only, as Python values (None for NULL). An LF that raises on a row, takes longer than ROW_SECONDS on it,
or returns anything but an integer vote, abstains on that row: a row-dependent exception or slowness then changes
only DP counts. Reading an undeclared column, running out of memory, the time limit of the whole run, a crash or
a failed import fail the whole run with a SandboxError whose message names the LF and the kind of failure only:
never an exception message, a traceback or a value, which could quote a row (the gateway then releases the same
statistics of a default input, see labeling_functions.analysis).

While it runs, the worker reports how many of its inputs it has done; the parent passes the fraction to a
callback (the gateway logs it). The total is the sum of the input tables' lengths: the combinations padded to a
public number (more only past it, where one unit adds at most k).
"""

from __future__ import annotations

import importlib
import multiprocessing as mp
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

import numpy as np
import pyarrow as pa

from policies.errors import GatewayError

ABSTAIN = -1
MAX_VOTE = 2**31  # votes at or above this are abstentions (no dataset has that many classes)


class SandboxError(GatewayError):
    """A Python LF failed in its worker (timeout, memory, exception, network); the gateway is unaffected."""

    status = 422
    code = "lf_failed"


@dataclass(frozen=True)
class SandboxLimits:
    seconds: float = 300.0
    memory_bytes: int = 4 * 2**30  # address space the LFs may add on top of the loaded worker
    # An LF is applied to at least this many inputs: its columns' distinct combinations, padded with all-NULL
    # inputs up to this number when there are fewer (labeling_functions.combos).
    combinations: int = 10_000


@dataclass(frozen=True)
class LFRef:
    name: str
    module: str
    attribute: str
    columns: tuple[str, ...] = ()  # what its input table holds, and all its rows may show it


Progress = Callable[[float], None]  # called with the fraction of the inputs done, in [0, 1]


_NO_NETWORK = "network access is disabled inside labeling functions"


def _leave_network() -> None:
    """Best effort: a private network namespace (no interfaces up). Needs unprivileged user namespaces."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        clone_newuser, clone_newnet = 0x10000000, 0x40000000
        libc.unshare(clone_newuser | clone_newnet)
    except Exception:  # noqa: BLE001 - the Python-level block below applies regardless
        pass


def _block_sockets() -> None:
    import _socket
    import socket

    def deny(*_: Any, **__: Any) -> Any:
        raise PermissionError(_NO_NETWORK)

    class NoSocket(_socket.socket):
        def __init__(self, *_: Any, **__: Any) -> None:
            raise PermissionError(_NO_NETWORK)

    socket.socket = NoSocket  # type: ignore[misc, assignment]
    _socket.socket = NoSocket  # type: ignore[misc]
    for mod in (socket, _socket):
        for name in (
            "socketpair",
            "fromfd",
            "create_connection",
            "create_server",
            "getaddrinfo",
            "gethostbyname",
            "gethostbyname_ex",
            "gethostbyaddr",
            "getnameinfo",
        ):
            if hasattr(mod, name):
                setattr(mod, name, deny)


def _vm_size() -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmSize:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _cap_memory(extra: int) -> None:
    import resource

    limit = _vm_size() + extra
    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))


def _silence() -> None:
    """Send the worker's standard output and error to /dev/null, at the descriptor level too."""
    null = os.open(os.devnull, os.O_WRONLY)
    for fd in (1, 2):
        os.dup2(null, fd)
    os.close(null)
    sys.stdout = sys.stderr = open(os.devnull, "w")  # noqa: SIM115 - lives as long as the worker


# The most time one LF may take on one row; past it the LF abstains on that row. It bounds how much one unit's
# rows can change the running time (and keeps a row that makes an LF hang from failing the whole run).
ROW_SECONDS = 0.25
PROGRESS_SECONDS = 1.0  # how often the worker reports progress


class _RowTimeout(BaseException):
    """Raised by the per-row alarm; a BaseException so that an LF's own `except Exception` cannot swallow it."""


class _Undeclared(BaseException):
    """An LF read a column it does not declare: the whole run fails (an LF cannot catch it)."""


_timed_out = False  # set by the per-row alarm; a row whose LF ran out of time abstains, whatever it returns


def _on_alarm(signum: int, frame: Any) -> None:
    global _timed_out
    _timed_out = True
    signal.setitimer(signal.ITIMER_REAL, ROW_SECONDS / 25)  # again soon, should the LF's code catch this one
    raise _RowTimeout


class Row:
    """One input row as an LF sees it: `x.column` and `x["column"]` for its declared columns only."""

    __slots__ = ("_values",)

    def __init__(self, values: dict[str, Any]) -> None:
        object.__setattr__(self, "_values", values)

    def __getattr__(self, name: str) -> Any:
        try:
            return self._values[name]
        except KeyError:
            raise _Undeclared from None

    def __getitem__(self, name: str) -> Any:
        return self.__getattr__(name) if isinstance(name, str) else _undeclared()

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError("rows are read-only")

    def __repr__(self) -> str:
        return "Row(...)"


def _undeclared() -> Any:
    raise _Undeclared


def vote(lf: Any, x: Row) -> int:
    """`lf`'s vote on `x`: abstain where it raises (MemoryError and undeclared reads aside), takes longer than
    ROW_SECONDS, or returns no integer vote. The alarm needs the worker's main thread (it runs there)."""
    global _timed_out
    _timed_out = False
    try:
        signal.setitimer(signal.ITIMER_REAL, ROW_SECONDS)
        try:
            value = lf(x)
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
    except (MemoryError, _Undeclared):
        raise
    except _RowTimeout:
        return ABSTAIN
    except Exception:  # noqa: BLE001 - a failure on one row is an abstention on that row
        return ABSTAIN
    if _timed_out:  # the LF caught the alarm and went on: its answer depends on how long it took
        return ABSTAIN
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or not ABSTAIN <= value < MAX_VOTE:
        return ABSTAIN
    return int(value)


def _apply(lfs: list[Any], refs: list[LFRef], tables: list[pa.Table], conn: Connection) -> list[np.ndarray]:
    """Every LF on every row of its table, reporting progress; the votes per LF. A BaseException that escapes
    carries the index of the LF that was running as its only argument."""
    total = max(1, sum(t.num_rows for t in tables))
    done, last = 0, time.monotonic()
    out: list[np.ndarray] = []
    for j, (lf, ref, table) in enumerate(zip(lfs, refs, tables, strict=True)):
        names = list(ref.columns)
        columns = [table.column(c).to_pylist() for c in names]
        votes = np.empty(table.num_rows, dtype=np.int64)
        try:
            for i in range(table.num_rows):
                votes[i] = vote(lf, Row({c: col[i] for c, col in zip(names, columns, strict=True)}))
                if time.monotonic() - last >= PROGRESS_SECONDS:
                    last = time.monotonic()
                    conn.send(("progress", (done + i + 1) / total))
        except BaseException as exc:
            exc.args = (j,)  # nothing of the original message is kept
            raise
        done += table.num_rows
        out.append(votes)
    return out


def _worker(conn: Connection, data: Connection, refs: list[LFRef], memory_bytes: int) -> None:
    _silence()
    _leave_network()
    _block_sockets()  # before importing the LFs' modules, whose top-level code runs here too
    try:
        lfs = [getattr(importlib.import_module(r.module), r.attribute) for r in refs]
        tables = data.recv()
        data.close()
    except BaseException as exc:  # noqa: BLE001
        conn.send(("error", None, None, "import", type(exc).__name__))
        return
    try:
        _cap_memory(memory_bytes)
        signal.signal(signal.SIGALRM, _on_alarm)
        votes = _apply(lfs, refs, tables, conn)
        del tables
        conn.send(("ok", [v.tobytes() for v in votes], None, None, None))
    except BaseException as exc:  # noqa: BLE001
        j = exc.args[0] if exc.args and isinstance(exc.args[0], int) else None
        culprit = refs[j].name if j is not None and 0 <= j < len(refs) else None
        if isinstance(exc, MemoryError):
            kind = "memory"
        elif isinstance(exc, _Undeclared):
            kind = "undeclared"
        elif isinstance(exc, PermissionError):
            kind = "network"
        else:
            kind = "exception"
        name = type(exc).__name__
        del exc
        conn.send(("error", None, culprit, kind, name))
    finally:
        conn.close()


PRELOAD = ["snorkel.labeling", "pyarrow", "policies.schema"]


def _context() -> Any:
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)
    return ctx


def start_worker_server() -> None:
    """Start the worker server now (it is otherwise started by the first run, which then waits for its imports)."""
    from multiprocessing import forkserver

    _context()
    forkserver.ensure_running()


def apply_python_lfs(
    refs: Sequence[LFRef], tables: Sequence[pa.Table], limits: SandboxLimits, progress: Progress | None = None
) -> list[np.ndarray]:
    """The votes of each LF on each row of its table (`tables[j]` holds `refs[j].columns`, and may hold others,
    which the LF does not see), computed in a sandboxed worker; `progress` is called with the fraction done as the
    worker reports it."""
    if len(refs) != len(tables):
        raise ValueError("one input table per labeling function")
    if not refs:
        return []
    names = ", ".join(repr(r.name) for r in refs)
    ctx = _context()
    receive, send = ctx.Pipe(duplex=False)
    data_in, data_out = ctx.Pipe(duplex=False)
    proc = ctx.Process(
        target=_worker, args=(send, data_in, list(refs), limits.memory_bytes), daemon=True, name="bastion-lf-worker"
    )
    proc.start()
    send.close()
    data_in.close()

    def feed() -> None:  # in a thread, so that the deadline below also covers a worker that never reads
        try:
            data_out.send(tables)
        except (OSError, ValueError):
            pass
        finally:
            data_out.close()

    feeder = threading.Thread(target=feed, name="bastion-lf-feed", daemon=True)
    feeder.start()
    deadline = time.monotonic() + limits.seconds
    try:
        while True:
            if not receive.poll(max(0.0, deadline - time.monotonic())):
                raise SandboxError(
                    f"python labeling function(s) {names} did not finish within {limits.seconds:g} s; "
                    "the worker was stopped",
                    reason="timeout",
                )
            try:
                message = receive.recv()
            except (EOFError, OSError):
                proc.join(5)
                raise SandboxError(
                    f"the worker running python labeling function(s) {names} died "
                    f"(exit code {proc.exitcode}); no details are given since they could reveal row "
                    "contents",
                    reason="crashed",
                ) from None
            if message[0] != "progress":
                break
            if progress is not None:
                progress(float(message[1]))
    finally:
        receive.close()
        if proc.is_alive():
            proc.kill()
        proc.join(10)
        feeder.join(10)
        if proc.exitcode is not None:
            proc.close()
    status, payload, culprit, kind, detail = message
    if status == "ok":
        return [np.frombuffer(p, dtype=np.int64).copy() for p in payload]
    who = f"python labeling function {culprit!r}" if culprit else f"python labeling function(s) {names}"
    if kind == "memory":
        raise SandboxError(
            f"{who} exceeded the memory limit of {limits.memory_bytes / 2**20:,.0f} MiB", reason="memory", lf=culprit
        )
    if kind == "undeclared":
        raise SandboxError(
            f"{who} read a column its registry entry does not declare", reason="undeclared_column", lf=culprit
        )
    if kind == "network":
        raise SandboxError(
            f"{who} tried to open a network connection; labeling functions run without network",
            reason="network",
            lf=culprit,
        )
    if kind == "import":
        raise SandboxError(f"python labeling function(s) {names} could not be loaded ({detail})", reason="import")
    raise SandboxError(
        f"{who} raised {detail}; the message and traceback are withheld since they could reveal row contents",
        reason="exception",
        lf=culprit,
    )

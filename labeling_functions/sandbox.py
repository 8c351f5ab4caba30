"""Run registered Python LFs with Snorkel's PandasLFApplier in a separate worker process.

The worker is a fresh interpreter (multiprocessing "spawn"). Its standard output and error go to /dev/null (an
LF's print or a warning could quote a row). Before it touches the rows it leaves the network (a new user and
network namespace where the kernel allows it, and in any case Python's socket constructors and name resolution
raise), and once the LFs are imported its address space is capped (RLIMIT_AS). The parent waits at most the time
limit and then kills it.

An LF that raises on a row, takes longer than ROW_SECONDS on it, or returns anything but an integer vote, abstains
on that row: a row-dependent exception or slowness then changes only DP counts. Running out of memory, the time
limit of the whole run, a crash or a failed import fail the whole run with a SandboxError whose message names the
LF and the kind of failure only: never an exception message, a traceback or a value, which could quote a row (the
gateway then releases the same statistics of a default input, see labeling_functions.analysis).
"""

from __future__ import annotations

import importlib
import multiprocessing as mp
import os
import signal
import sys
import threading
import traceback
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

import numpy as np
import pandas as pd

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


@dataclass(frozen=True)
class LFRef:
    name: str
    module: str
    attribute: str


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


def _culprit(exc: BaseException, functions: dict[Any, str]) -> str | None:
    """The LF whose code raised, from the traceback's code objects (never from the message)."""
    found = None
    for frame, _ in traceback.walk_tb(exc.__traceback__):
        if frame.f_code in functions:
            found = functions[frame.f_code]
    return found


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


class _RowTimeout(BaseException):
    """Raised by the per-row alarm; a BaseException so that an LF's own `except Exception` cannot swallow it."""


def _on_alarm(signum: int, frame: Any) -> None:
    raise _RowTimeout


def abstaining(lf: Any) -> Any:
    """`lf` as a Snorkel LF that abstains on a row where it raises (MemoryError aside), takes longer than
    ROW_SECONDS, or returns no integer vote. The alarm needs the worker's main thread (it runs there)."""
    from snorkel.labeling import LabelingFunction

    def vote(x: Any) -> int:
        try:
            signal.setitimer(signal.ITIMER_REAL, ROW_SECONDS)
            try:
                value = lf(x)
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
        except MemoryError:
            raise
        except _RowTimeout:
            return ABSTAIN
        except Exception:  # noqa: BLE001 - a failure on one row is an abstention on that row
            return ABSTAIN
        if isinstance(value, bool) or not isinstance(value, int | np.integer) or not ABSTAIN <= value < MAX_VOTE:
            return ABSTAIN
        return int(value)

    return LabelingFunction(name=lf.name, f=vote)


def _worker(conn: Connection, data: Connection, refs: list[LFRef], memory_bytes: int) -> None:
    _silence()
    _leave_network()
    _block_sockets()  # before importing the LFs' modules, whose top-level code runs here too
    try:
        from snorkel.labeling import PandasLFApplier

        originals = [getattr(importlib.import_module(r.module), r.attribute) for r in refs]
        lfs = [abstaining(lf) for lf in originals]
        frame = data.recv()
        data.close()
    except BaseException as exc:  # noqa: BLE001
        conn.send(("error", None, None, "import", type(exc).__name__))
        return
    functions = {lf._f.__code__: ref.name for lf, ref in zip(originals, refs, strict=True)}
    try:
        _cap_memory(memory_bytes)
        signal.signal(signal.SIGALRM, _on_alarm)
        matrix = PandasLFApplier(lfs).apply(frame, progress_bar=False)
        del frame
        conn.send(("ok", np.asarray(matrix, dtype=np.int64).tobytes(), None, None, None))
    except MemoryError as exc:
        culprit = _culprit(exc, functions)
        del exc
        conn.send(("error", None, culprit, "memory", "MemoryError"))
    except BaseException as exc:  # noqa: BLE001
        culprit = _culprit(exc, functions)
        kind = "network" if isinstance(exc, PermissionError) and str(exc) == _NO_NETWORK else "exception"
        conn.send(("error", None, culprit, kind, type(exc).__name__))
    finally:
        conn.close()


def apply_python_lfs(refs: list[LFRef], frame: pd.DataFrame, limits: SandboxLimits) -> np.ndarray:
    """The n × len(refs) vote matrix of the LFs on `frame`'s rows (in order), computed in a sandboxed worker."""
    if not refs:
        return np.zeros((len(frame), 0), dtype=np.int64)
    names = ", ".join(repr(r.name) for r in refs)
    ctx = mp.get_context("spawn")
    receive, send = ctx.Pipe(duplex=False)
    data_in, data_out = ctx.Pipe(duplex=False)
    proc = ctx.Process(
        target=_worker, args=(send, data_in, refs, limits.memory_bytes), daemon=True, name="bastion-lf-worker"
    )
    proc.start()
    send.close()
    data_in.close()

    def feed() -> None:  # in a thread, so that the deadline below also covers a worker that never reads
        try:
            data_out.send(frame)
        except (OSError, ValueError):
            pass
        finally:
            data_out.close()

    feeder = threading.Thread(target=feed, name="bastion-lf-feed", daemon=True)
    feeder.start()
    try:
        if not receive.poll(limits.seconds):
            raise SandboxError(
                f"python labeling function(s) {names} did not finish within {limits.seconds:g} s; "
                "the worker was stopped",
                reason="timeout",
            )
        try:
            status, payload, culprit, kind, detail = receive.recv()
        except (EOFError, OSError):
            proc.join(5)
            raise SandboxError(
                f"the worker running python labeling function(s) {names} died "
                f"(exit code {proc.exitcode}); no details are given since they could reveal row "
                "contents",
                reason="crashed",
            ) from None
    finally:
        receive.close()
        if proc.is_alive():
            proc.kill()
        proc.join(10)
        feeder.join(10)
        if proc.exitcode is not None:
            proc.close()
    if status == "ok":
        return np.frombuffer(payload, dtype=np.int64).reshape(len(frame), len(refs)).copy()
    who = f"python labeling function {culprit!r}" if culprit else f"python labeling function(s) {names}"
    if kind == "memory":
        raise SandboxError(
            f"{who} exceeded the memory limit of {limits.memory_bytes / 2**20:,.0f} MiB", reason="memory"
        )
    if kind == "network":
        raise SandboxError(
            f"{who} tried to open a network connection; labeling functions run without network", reason="network"
        )
    if kind == "import":
        raise SandboxError(f"python labeling function(s) {names} could not be loaded ({detail})", reason="import")
    raise SandboxError(
        f"{who} raised {detail}; the message and traceback are withheld since they could reveal row contents",
        reason="exception",
    )

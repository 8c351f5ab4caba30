"""Refusals made before a caller is authenticated (a bad token, a body over the size limit, a throttled source),
counted per source and time window so that nobody can grow the audit log without bound.

A source is an IPv4 address, or the /64 network of an IPv6 address (one host is commonly given a whole /64, so
counting each of its addresses apart would let it step around the limit); an IPv4-mapped IPv6 address is its IPv4
address. Anything else (a test client's name) is taken as it is.

The first refusal of a source in its window is recorded in full; later ones are only counted, and each closed
window that counted any becomes one aggregate record (source, window start and end, count, reasons, and the ids of
the tokens it counted: a revoked, rotated or expired token presented again is named with how often, never only
counted). Once a source has been refused `threshold` times in its window, it is refused with 429 until the window
ends, without its token being looked at. At most `max_sources` windows are open at once; past that the oldest is
closed early.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Window:
    source: str
    start: float
    end: float
    refusals: int = 1  # every refusal in the window, the first (recorded in full) included
    counted: Counter[str] = field(default_factory=Counter)  # reasons of the refusals recorded only as a count
    tokens: Counter[str] = field(default_factory=Counter)  # ids of the known tokens among them (not working any more)

    def aggregate(self, closed_at: float) -> dict[str, Any]:
        """The fields of the window's aggregate record."""
        return {
            "source": self.source,
            "window_start": _iso(self.start),
            "window_end": _iso(min(closed_at, self.end)),
            "count": sum(self.counted.values()),
            "reasons": dict(sorted(self.counted.items())),
            **({"tokens": dict(sorted(self.tokens.items()))} if self.tokens else {}),
        }


def _iso(ts: float) -> str:
    return dt.datetime.fromtimestamp(ts, dt.UTC).isoformat()


_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")  # RFC 6052: an IPv4 host's address behind a NAT64 gateway
_IPV4_COMPATIBLE = ipaddress.IPv6Network("::/96")  # RFC 4291 (deprecated) IPv4-compatible addresses, :: and ::1 aside
NOT_AN_ADDRESS = "not-an-address"  # the one source of every text that is no IP address (from a trusted proxy)


def source_key(address: str) -> str:
    """The source a refusal is counted under: an IPv4 address (also when written inside an IPv6 address: mapped,
    NAT64, IPv4-compatible), else the /64 network of an IPv6 address (loopback apart); any text that is no address
    at all counts as one source, so a proxy's odd headers cannot open a window each."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])  # an IPv6 zone (fe80::1%eth0) names no other host
    except ValueError:
        return NOT_AN_ADDRESS
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        if ip in _NAT64 or (ip in _IPV4_COMPATIBLE and int(ip) > 1):
            return str(ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF))
        if ip.is_loopback:
            return str(ip)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)


class RefusalWindows:
    def __init__(
        self, seconds: float, threshold: int, max_sources: int, clock: Callable[[], float] = time.time
    ) -> None:
        self.seconds, self.threshold, self.max_sources = seconds, threshold, max_sources
        self._clock = clock
        self._lock = threading.Lock()
        self._open: dict[str, Window] = {}  # in the order the windows opened
        self._closed: list[dict[str, Any]] = []  # aggregate records not yet written

    def blocked(self, source: str) -> bool:
        """Whether `source` has used up its refusals in its current window."""
        with self._lock:
            window = self._current(source_key(source), self._clock())
            return window is not None and window.refusals >= self.threshold

    def note(self, source: str, reason: str, token_id: str | None = None) -> bool:
        """Count one refusal of `source` (of known token `token_id`, if any); True if it is the first of its window
        (to be recorded in full)."""
        source = source_key(source)
        with self._lock:
            now = self._clock()
            window = self._current(source, now)
            if window is not None:
                window.refusals += 1
                window.counted[reason] += 1
                if token_id is not None:
                    window.tokens[token_id] += 1
                return False
            while len(self._open) >= self.max_sources:
                self._close(next(iter(self._open.values())), now)
            self._open[source] = Window(source, now, now + self.seconds)
            return True

    def closed(self) -> list[dict[str, Any]]:
        """Aggregate records of the windows that have ended since the last call (taken: the caller writes them).
        Called before every audit append, so it looks only at the windows that have ended: they all come first, as
        windows are kept in the order they opened and all last `seconds`."""
        return self._take(everything=False)

    def drain(self) -> list[dict[str, Any]]:
        """Close every window now and return the aggregate records due (at shutdown)."""
        return self._take(everything=True)

    def _take(self, *, everything: bool) -> list[dict[str, Any]]:
        with self._lock:
            now = self._clock()
            while self._open:
                window = next(iter(self._open.values()))
                if not everything and now < window.end:
                    break
                self._close(window, now)
            out, self._closed = self._closed, []
            return out

    def restore(self, aggregates: list[dict[str, Any]]) -> None:
        """Put back aggregate records that could not be written, to be written with the next record."""
        with self._lock:
            self._closed[:0] = aggregates

    def _current(self, source: str, now: float) -> Window | None:
        window = self._open.get(source)
        if window is not None and now >= window.end:
            self._close(window, now)
            return None
        return window

    def _close(self, window: Window, now: float) -> None:
        del self._open[window.source]
        if window.counted:
            self._closed.append(window.aggregate(now))

"""What a token check costs on the hot path, and how soon a revocation is seen by another store on the same data.

    .venv/bin/python benchmarks/token_bench.py [--tokens 1000] [--checks 20000] [--threads 4] [--store postgresql://...]

Prints the latency of `authenticate` (p50, p99 in µs) from one thread and from `--threads` threads sharing one
store (as a gateway process's request threads do), and the time from `revoke` on one store to the first refusal by a
second store opened on the same SQLite file (as a second gateway process would). With `--store` it measures that
PostgreSQL database instead, which must be migrated (`bastion store migrate`) and gets the benchmark's tokens
(principals `p0`, `p1`, ...) added to its table.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import threading
import time
from pathlib import Path

from gateway.stores.tokens import SqliteTokenStore, TokenRefused, TokenStore


def _open(store: str | None, path: Path) -> TokenStore:
    if store:
        from gateway.stores.pg_tokens import PgTokenStore

        return PgTokenStore(store)
    return SqliteTokenStore(path)


def _latencies(store: TokenStore, tokens: list[str], checks: int) -> list[float]:
    out = []
    for i in range(checks):
        token = tokens[i % len(tokens)]
        start = time.perf_counter()
        store.authenticate(token)
        out.append(time.perf_counter() - start)
    return out


def _pct(values: list[float], q: float) -> float:
    return sorted(values)[min(len(values) - 1, int(q * len(values)))] * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=1_000)
    ap.add_argument("--checks", type=int, default=20_000)
    ap.add_argument("--threads", type=int, default=4)
    ap.add_argument("--store", help="a migrated PostgreSQL database (default: a SQLite file in a temporary directory)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "tokens.sqlite"
        store = _open(args.store, path)
        print(f"store: {'PostgreSQL' if args.store else 'SQLite'}")
        tokens = [store.create(f"p{i}", "analyst")[0] for i in range(args.tokens)]
        one = _latencies(store, tokens, args.checks)
        print(
            f"authenticate, 1 thread, {args.tokens} tokens: p50 {_pct(one, 0.5):.1f} µs, p99 {_pct(one, 0.99):.1f} µs"
        )
        results: list[list[float]] = [[] for _ in range(args.threads)]

        def run(k: int) -> None:
            results[k] = _latencies(store, tokens, args.checks // args.threads)

        threads = [threading.Thread(target=run, args=(k,)) for k in range(args.threads)]
        start = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - start
        merged = [x for r in results for x in r]
        print(
            f"authenticate, {args.threads} threads: p50 {_pct(merged, 0.5):.1f} µs, p99 {_pct(merged, 0.99):.1f} µs, "
            f"{len(merged) / wall:,.0f} checks/s"
        )
        other = _open(args.store, path)
        seen = []
        for token in tokens[:20]:
            other.authenticate(token)
            start = time.perf_counter()
            store.revoke(token.split("_", 2)[1])
            try:
                other.authenticate(token)
            except TokenRefused:
                seen.append(time.perf_counter() - start)
            else:
                raise SystemExit("a revoked token was accepted by the second store")
        print(f"revoke on one store to refusal by another: median {statistics.median(seen) * 1e3:.2f} ms (20 tokens)")
        other.close()
        store.close()


if __name__ == "__main__":
    main()

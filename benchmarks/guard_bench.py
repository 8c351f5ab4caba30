"""Hostile requests against the real app (in process, through Starlette's TestClient): how long each takes to be
refused, how many body bytes were read, and how many audit records and bytes a burst of refusals leaves; and
identical concurrent queries, which must cost one charge.

    .venv/bin/python benchmarks/guard_bench.py [--rows 20000] [--burst 1000] [--concurrent 8]

Each figure is the median of `--runs` runs (the burst and the concurrent queries run once).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

from fastapi.testclient import TestClient

from gateway.demo import write_demo
from gateway.http.app import create_app
from gateway.service import Bastion
from gateway.settings import Settings
from policies.schema import load_policy


def workspace(root: Path, rows: int) -> tuple[Settings, str]:
    data, policy = write_demo(root / "demo", n_rows=rows, seed=11)
    settings = Settings(workspace=root / "ws")
    settings.save()
    admin = Bastion(settings, read_only=False)
    admin.engine.register(load_policy(policy), data)
    token, _ = admin.tokens.create("alice", "analyst")
    admin.close()
    return settings, token


def unread_body(app: Any, declared: int) -> tuple[int, int]:
    """POST a body announced as `declared` bytes that never ends; returns the status and the 64 KiB chunks read."""
    read = 0
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        nonlocal read
        read += 1
        return {"type": "http.request", "body": b"x" * 65536, "more_body": True}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    headers = [(b"content-type", b"application/json"), (b"content-length", str(declared).encode())]
    scope = {"type": "http", "method": "POST", "path": "/v1/query", "headers": headers, "client": ("10.9.9.9", 1)}
    asyncio.run(app(scope, receive, send))
    return next(m["status"] for m in sent if m["type"] == "http.response.start"), read


def median_ms(runs: int, call: Callable[[], Any]) -> tuple[float, Any]:
    times, last = [], None
    for _ in range(runs):
        started = time.perf_counter()
        last = call()
        times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times), last


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=20_000)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--burst", type=int, default=1_000)
    parser.add_argument("--concurrent", type=int, default=8)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        settings, token = workspace(Path(tmp), args.rows)
        auth = {"Authorization": f"Bearer {token}", "content-type": "application/json"}
        app = create_app(settings)
        with TestClient(app) as c:
            status, chunks = unread_body(app, 100 * 2**20)
            print(f"100 MB body announced, no token: {status}, {chunks} chunks read")

            def post(body: bytes, headers: dict[str, str] = auth) -> int:
                return c.post("/v1/query", content=body, headers=headers).status_code

            keys = b"{" + b",".join(b'"k%d":1' % i for i in range(1_000_000)) + b"}"
            small_keys = b"{" + b",".join(b'"k%d":1' % i for i in range(90_000)) + b"}"
            chain = " AND ".join(["age > 1"] * 100_000)
            cases: dict[str, bytes | str] = {
                f"1,000,000 keys ({len(keys) / 2**20:.1f} MiB)": keys,
                f"90,000 keys ({len(small_keys) / 2**20:.2f} MiB)": small_keys,
                "1 MB AND chain": json.dumps({"sql": f"SELECT COUNT(*) FROM visits WHERE {chain}"[:1_000_000]}),
                "90 kB AND chain": json.dumps(
                    {"sql": f"SELECT COUNT(*) FROM visits WHERE {chain}"[:90_000].rsplit(" AND", 1)[0], "epsilon": 1}
                ),
                "10,000-term age + age": json.dumps(
                    {"sql": "SELECT SUM(" + " + ".join(["age"] * 10_000) + ") FROM visits", "epsilon": 1}
                ),
                "5,000 nested parentheses": json.dumps(
                    {"sql": "SELECT COUNT(*) FROM visits WHERE " + "(" * 5000 + "age > 1" + ")" * 5000, "epsilon": 1}
                ),
                "epsilon NaN": '{"sql": "SELECT COUNT(*) FROM visits", "epsilon": NaN}',
            }
            for label, body in cases.items():
                raw = body if isinstance(body, bytes) else body.encode()
                ms, code = median_ms(args.runs, partial(post, raw))
                print(f"{label}: {code} in {ms:.1f} ms")

        # A fresh app (fresh refusal windows) for a burst of bad tokens from one address.
        with TestClient(create_app(settings)) as c:
            log = settings.audit_dir / "audit.jsonl"
            before_bytes, before_lines = log.stat().st_size, len(log.read_bytes().splitlines())
            bad = {"Authorization": "Bearer bst_bad_token", "content-type": "application/json"}
            started = time.perf_counter()
            codes = [
                c.post("/v1/query", content=b'{"sql": "SELECT 1", "epsilon": 1}', headers=bad).status_code
                for _ in range(args.burst)
            ]
            elapsed = time.perf_counter() - started
            grew_lines = len(log.read_bytes().splitlines()) - before_lines
            print(
                f"{args.burst} bad tokens from one address: {codes.count(401)}x 401, {codes.count(429)}x 429 in "
                f"{elapsed:.2f} s; the log grew by {grew_lines} record(s), {log.stat().st_size - before_bytes} bytes "
                "(the window's aggregate record follows when it closes)"
            )
        # Another fresh app for the concurrent identical queries (the burst's address is throttled in the last one).
        with TestClient(create_app(settings)) as c:
            query = {"sql": "SELECT region, COUNT(*), AVG(income) FROM visits GROUP BY region", "epsilon": 0.5}
            answers: list[dict[str, Any]] = []
            barrier = threading.Barrier(args.concurrent)

            def ask() -> None:
                barrier.wait()
                answers.append(c.post("/v1/query", json=query, headers=auth).json())

            threads = [threading.Thread(target=ask) for _ in range(args.concurrent)]
            started = time.perf_counter()
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            elapsed = time.perf_counter() - started
            spent = sum(a["epsilon_spent"] for a in answers)
            distinct = len({json.dumps(a["rows"]) for a in answers})
            print(
                f"{args.concurrent} identical concurrent queries: ε spent {spent:g} in total, {distinct} distinct "
                f"answer(s), {sum(not a['cached'] for a in answers)} computed, {elapsed:.2f} s"
            )


if __name__ == "__main__":
    main()

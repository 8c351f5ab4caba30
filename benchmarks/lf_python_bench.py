"""Benchmark of reviewed Python labeling functions on the demo table: once per distinct combination of the columns
they declare, padded to the public number of inputs (the default) and unpadded, and the demo's example LF file
end to end.

Generates the demo visits (500,000 rows by default), registers them in a temporary workspace and serves the
gateway on a local port (uvicorn, in this process). Then:

- the demo's example LF file (`gateway.demo.EXAMPLE_LFS_YAML`: four declarative LFs and the Python LF
  `urgent_diagnosis`) with `bastion lf stats lfs.yaml --dataset visits --epsilon E`, each run a fresh CLI process
  with a distinct ε (never cached); the first run after the gateway started is reported on its own;
- each registered Python LF alone through the core (`run_lfs`, no HTTP): its combinations padded with NULL inputs
  to `SandboxLimits.combinations` (the default) and unpadded (a padding of 1), checking that both give identical
  exact statistics.

    .venv/bin/python benchmarks/lf_python_bench.py [--rows 500000] [--reps 5] [--lfs urgent_diagnosis,...]
"""

from __future__ import annotations

import argparse
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.lf_bench import demo_workspace  # noqa: E402
from gateway.demo import EXAMPLE_LFS_YAML  # noqa: E402
from gateway.service import Bastion  # noqa: E402
from labeling_functions.analysis import plan_lf_stats, run_lfs  # noqa: E402
from labeling_functions.registry import REGISTRY  # noqa: E402
from labeling_functions.sandbox import SandboxLimits  # noqa: E402

CLI = "import sys; sys.argv[0] = 'bastion'; from gateway.cli.main import main; main()"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=500_000, help="rows of the demo table")
    parser.add_argument("--reps", type=int, default=5, help="timed runs of the example file (median reported)")
    parser.add_argument(
        "--lfs",
        default="urgent_diagnosis,red_flag_words,routine_words,stay_and_age",
        help="registered Python LFs to time padded and unpadded (comma-separated; empty: none)",
    )
    args = parser.parse_args()

    import uvicorn

    from gateway.http.app import create_app

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        settings, token = demo_workspace(root, args.rows)
        lf_file = root / "lfs.yaml"
        lf_file.write_text(EXAMPLE_LFS_YAML)

        bastion = Bastion(settings)
        port = _free_port()
        server = uvicorn.Server(uvicorn.Config(create_app(settings, bastion), port=port, log_level="warning"))
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        while not server.started:
            time.sleep(0.05)

        def cli(epsilon: float) -> float:
            cmd = [sys.executable, "-c", CLI, "lf", "stats", str(lf_file), "--dataset", "visits"]
            cmd += ["--epsilon", f"{epsilon:g}", "--url", f"http://127.0.0.1:{port}", "--token", token]
            start = time.perf_counter()
            done = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            elapsed = time.perf_counter() - start
            if done.returncode:
                sys.exit(f"bastion lf stats failed: {done.stderr.strip()}")
            return elapsed

        try:
            print("running the demo's example LF file with the CLI...", flush=True)
            first = cli(0.01)
            runs = [cli(0.01 * (rep + 2)) for rep in range(args.reps)]

            policy, _ = bastion.engine.policy("visits")
            per_lf = []
            for name in [n for n in args.lfs.split(",") if n]:
                plan = plan_lf_stats(policy, lfs=[], python_lfs=[name], epsilon=1.0, alpha=0.05)
                timings = []
                results = []
                for limits in (SandboxLimits(), SandboxLimits(combinations=1)):
                    print(f"{name}: {'unpadded' if limits.combinations == 1 else 'padded'}...", flush=True)
                    t0 = time.perf_counter()
                    results.append(run_lfs(plan, bastion.engine, limits=limits, progress=lambda _: None))
                    timings.append(time.perf_counter() - t0)
                a, b = (r.exact for r in results)
                same = all(
                    np.array_equal(v, getattr(b, k)) if isinstance(v, np.ndarray) else v == getattr(b, k)
                    for k, v in vars(a).items()
                )
                per_lf.append((name, REGISTRY.get(name).columns, timings[0], timings[1], same))
        finally:
            server.should_exit = True
            thread.join(10)
            bastion.close()

    print()
    print(f"demo example LF file, `bastion lf stats` end to end ({args.rows:,} rows):")
    print(f"  first run after the gateway started: {first:,.2f} s")
    print(f"  median of {args.reps} runs:              {statistics.median(runs):,.2f} s  (min {min(runs):,.2f} s)")
    if per_lf:
        print()
        print(f"{'python LF':<18} {'columns':<26} {'padded':>16} {'unpadded':>10}  identical")
        for name, columns, combined, rows, same in per_lf:
            print(f"{name:<18} {', '.join(columns):<26} {combined:>14,.2f} s {rows:>8,.2f} s  {same}")
    if not all(p[4] for p in per_lf):
        sys.exit("padded and unpadded statistics differ")


if __name__ == "__main__":
    main()

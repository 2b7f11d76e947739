"""The `recsys demo` figures as one JSON object: the default run's comparison table (DARE, TWIN, DIN on the
seeded synthetic lifelong data, Ray Train with 2 workers), live-vs-offline parity, /v1/score latency and
the wall time, with the machine it ran on.

    .venv/bin/python benchmarks/demo.py [--small] [--out results/demo.json]

The demo's own files (report.html, bundles) go to a temporary folder unless --keep DIR is given.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _machine import add_out_arg, emit  # noqa: E402

KEEP = ("best_val", "test", "samples_per_s", "best_step", "steps", "wall_s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--small", action="store_true", help="the seconds-scale demo (`recsys demo --small`)")
    ap.add_argument("--keep", type=Path, default=None, help="write the demo's files here instead of a temp folder")
    add_out_arg(ap, "demo")
    a = ap.parse_args()
    from recsys.cli.demo import run_demo

    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="recsys-demo-") as tmp:
        summary = run_demo(None, a.keep or Path(tmp), a.small)
    wall = time.perf_counter() - t0
    service = summary.get("service", {})
    emit({
        "benchmark": "demo",
        "inputs": {"command": "recsys demo" + (" --small" if a.small else ""), "data": "seeded synthetic (recsys demo default)",
                   "ray_train_workers": 2},
        "wall_s": round(wall, 1),
        "models": {name: {k: r.get(k) for k in KEEP if k in r} for name, r in summary.get("models", {}).items()},
        "service": {k: v for k, v in service.items() if k not in ("explanation", "latency_ms")},
    }, a.out)


if __name__ == "__main__":
    main()

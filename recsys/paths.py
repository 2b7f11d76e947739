"""Where the shared real data lives (never copied into the repo)."""

from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


def shared_dir() -> Path:
    """`$RECSYS_SHARED`, else `../shared` beside the repository."""
    env = os.environ.get("RECSYS_SHARED")
    return Path(env) if env else REPO_ROOT.parent / "shared"


def benchmark_dir(name: str = "ml-latest-small") -> Path:
    return shared_dir() / "benchmarks" / name

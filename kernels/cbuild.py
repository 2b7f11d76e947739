"""Compile a C kernel for this machine once and load it with ctypes.

Built with the system C compiler (`cc`, or $CC) for this CPU (-march=native) into a cache folder
($RECSYS_KERNEL_CACHE, else ~/.cache/recsys/kernels), named by a hash of the sources, flags, compiler and
CPU, written atomically, so concurrent processes and workers share one build.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Sequence

log = logging.getLogger(__name__)

FLAGS = ["-O3", "-march=native", "-std=gnu11", "-ffp-contract=fast", "-fPIC", "-shared", "-fopenmp"]
LIBS = ["-lm"]


def cpu_signature() -> str:
    """-march=native builds for this CPU: a cached build from another CPU model must not be reused."""
    try:
        text = Path("/proc/cpuinfo").read_text()
        return "\n".join(sorted({ln for ln in text.splitlines() if ln.startswith(("model name", "flags"))}))
    except OSError:
        return platform.processor() or platform.machine()


def cache_dir() -> Path:
    return Path(os.environ.get("RECSYS_KERNEL_CACHE") or Path.home() / ".cache" / "recsys" / "kernels")


def c_compiler() -> str | None:
    """$CC, else cc or gcc on PATH, else None."""
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")


def build(source: Path, name: str, extra_flags: Sequence[str] = (), includes: Sequence[Path] = ()) -> Path:
    """Compile `source` (which may #include the files `includes`, hashed with it) for this machine, or find
    the cached build -> the shared library's path."""
    flags = [*FLAGS, *extra_flags]
    cc = c_compiler()
    if not cc:
        raise RuntimeError("no C compiler (cc/gcc) on PATH; set CC")
    version = subprocess.run([cc, "--version"], capture_output=True, text=True, check=True).stdout
    digest = hashlib.sha256()
    for part in [source.read_bytes(), *(p.read_bytes() for p in includes), " ".join(flags + LIBS).encode(),
                 version.encode(), cpu_signature().encode()]:
        digest.update(part)
    out = cache_dir() / f"{name}_{digest.hexdigest()[:16]}.so"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        so = Path(tmp) / out.name
        res = subprocess.run([cc, *flags, "-I", str(source.parent), "-o", str(so), str(source), *LIBS],
                             capture_output=True, text=True)
        if res.returncode != 0:
            raise RuntimeError(f"compiling {source} failed:\n{res.stderr[-2000:]}")
        os.replace(so, out)  # atomic: a concurrent builder's identical file is replaced whole
    return out


def open_library(source: Path, name: str, fallback: str, extra_flags: Sequence[str] = (),
                 includes: Sequence[Path] = ()) -> ctypes.CDLL | None:
    """`build` and load the library; None, with a warning naming the kernel and the path used instead
    (`fallback`), where it cannot be built or loaded here (the callers cache the answer, so it is logged once)."""
    try:
        return ctypes.CDLL(str(build(source, name, extra_flags, includes)))
    except Exception as e:  # noqa: BLE001 - any build/load failure means: use the fallback path
        log.warning("C kernel %s unavailable, using %s: %s", name, fallback, e)
        return None


def switch_on(env: str) -> bool:
    """Whether the environment variable `env` leaves a kernel (or a tuning step) on: unset, or anything but
    0 / false / no / off. Read per call, so tests and A/B runs can flip it."""
    return os.environ.get(env, "1").strip().lower() not in ("0", "false", "no", "off")

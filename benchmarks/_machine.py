"""Machine facts every benchmark records beside its figures, the fp32 FMA peak, and the JSON writer.

Every benchmark ends with `emit(result, args.out)`: the result gets a "machine" object (CPU model,
cores, torch threads, load average at the start and the end of the run, git commit and whether the
work tree had uncommitted changes) and is printed; with `--out results/<name>.json` it is also written
there, which is where the README's figures come from.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# The code measured is this checkout's. A script's own folder (benchmarks/) is on sys.path, its checkout is
# not, so `import service` went through the virtual environment's editable install, i.e. the checkout the
# environment was made from: a benchmark run from a worktree of another commit (a linked .venv) measured
# the code of the main checkout in process (only its HTTP servers, started in the worktree, ran its own).
if sys.path[:1] != [str(REPO)]:
    sys.path.insert(0, str(REPO))

# Load average when the benchmark imported this module: the start of its run.
LOAD_AT_START = os.getloadavg()


def cpu_model() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def cpu_id() -> str:
    """Vendor, family, model, stepping: a VM's model name can be as bare as "AMD EPYC" (Zen 4 is family 25
    model 17 there), and kernel figures differ by generation."""
    fields = {}
    try:
        for line in open("/proc/cpuinfo"):
            key, _, value = line.partition(":")
            key = key.strip()
            if key in ("vendor_id", "cpu family", "model", "stepping") and key not in fields:
                fields[key] = value.strip()
            if not line.strip():
                break
    except OSError:
        return platform.machine()
    return " ".join(f"{k} {v}" for k, v in fields.items())


def _git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True).stdout.strip()
    except OSError:
        return ""


# The commit the run started at (HEAD can move during a long run: others commit to the same tree).
COMMIT_AT_START = _git("rev-parse", "--short", "HEAD")


def _code_from() -> str | None:
    """The checkout the project's modules were imported from (None if none was): REPO, or the JSON says not."""
    mod = sys.modules.get("recsys")
    return str(Path(mod.__file__).resolve().parent.parent) if mod is not None and mod.__file__ else None


def machine() -> dict:
    import torch

    flags = ""
    try:
        flags = next((ln for ln in open("/proc/cpuinfo") if ln.startswith("flags")), "")
    except OSError:
        pass
    return {
        "cpu": cpu_model(),
        "cpu_id": cpu_id(),
        "vector_isa": "avx512" if " avx512f" in flags else "avx2" if " avx2" in flags else "other",
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "commit": COMMIT_AT_START,
        "code_from": _code_from(),
        "commit_at_end": _git("rev-parse", "--short", "HEAD"),
        # Other engineers edit the same tree: 'dirty' says some tracked file outside results/ (which the
        # benchmarks themselves write) differed from the commit.
        "dirty": bool(_git("status", "--porcelain", "--untracked-files=no", "--", ".", ":(exclude)results")),
        "load_avg_at_start": [round(x, 2) for x in LOAD_AT_START],
        "load_avg_at_end": [round(x, 2) for x in os.getloadavg()],
    }


def fma_peak(threads: int) -> float | None:
    """fp32 FLOP/s of independent FMA chains at the widest vectors on `threads` threads
    (benchmarks/_fma_peak.c, compiled here with -march=native), or None without a C compiler."""
    from kernels import cbuild

    cc = cbuild.c_compiler()
    if not cc:
        return None
    src = Path(__file__).with_name("_fma_peak.c")
    with tempfile.TemporaryDirectory() as tmp:
        exe = Path(tmp) / "fma_peak"
        flags = ["-O3", "-march=native", "-ffp-contract=fast", "-fopenmp"]
        if subprocess.run([cc, *flags, "-o", str(exe), str(src)], capture_output=True).returncode != 0:
            return None
        out = subprocess.run([str(exe), str(threads)], capture_output=True, text=True, check=True).stdout
    return float(out.split()[0])


def _matmul_seconds(_=None) -> float:
    import torch

    torch.set_num_threads(1)
    a, b = torch.randn(512, 512), torch.randn(512, 512)
    for _ in range(3):
        a @ b
    t = time.perf_counter()
    for _ in range(100):
        a @ b
    return time.perf_counter() - t


def fp_scaling() -> dict:
    """Whether this machine's cores add up for floating-point work right now: the same one-thread fp32 matmul
    loop in one process, then in two at once. On a VM the second vCPU can share a physical core with the
    first or with another tenant: on one Zen 4 VM two processes took 1.7-2.1x as long each at midday and
    0.97x an hour later. Where they slow down, a server's concurrent requests get little more FP throughput
    than one, and the many-client figures of the same run say so."""
    import multiprocessing as mp

    one = _matmul_seconds()
    with mp.get_context("spawn").Pool(2) as pool:
        two = pool.map(_matmul_seconds, [0, 1])
    return {"matmul_512_x100_one_process_s": round(one, 3), "two_processes_s": [round(x, 3) for x in two],
            "slowdown_two_vs_one": round(sum(two) / len(two) / one, 2)}


def _spin_windows(args: tuple[int, float]) -> list[int]:
    """Pinned to one CPU: iterations of a fixed integer loop in each 10 ms window for `seconds`."""
    cpu, seconds = args
    os.sched_setaffinity(0, {cpu})
    counts, end = [], time.perf_counter() + seconds
    while (t0 := time.perf_counter()) < end:
        n = 0
        while time.perf_counter() - t0 < 0.01:
            for _ in range(100):
                pass
            n += 1
        counts.append(n)
    return counts


def cpu_steadiness(seconds: float = 2.0) -> dict:
    """How steady each CPU's speed is right now: a process pinned to each CPU, all at once, counting a fixed
    loop's iterations per 10 ms window. On a shared VM a vCPU's speed can halve for 100 ms at a time (a Zen 4 VM:
    10% of the windows of one vCPU below 70% of its median, in runs of ~10 windows): requests that fall there
    take up to twice as long, which is what a p99 over a few seconds then measures. -> per CPU the share of
    slow windows (below 70% of that CPU's median) and the longest run of them in ms."""
    import multiprocessing as mp

    cpus = sorted(os.sched_getaffinity(0))
    with mp.get_context("spawn").Pool(len(cpus)) as pool:
        counts = pool.map(_spin_windows, [(c, seconds) for c in cpus])
    out = {"seconds": seconds, "window_ms": 10, "per_cpu": {}}
    for cpu, c in zip(cpus, counts):
        med = sorted(c)[len(c) // 2] if c else 0
        slow = [x < 0.7 * med for x in c]
        run = longest = 0
        for s in slow:
            run = run + 1 if s else 0
            longest = max(longest, run)
        out["per_cpu"][str(cpu)] = {"windows": len(c), "slow_share": round(sum(slow) / max(len(c), 1), 3),
                                    "longest_slow_run_ms": 10 * longest}
    return out


def add_out_arg(parser, name: str) -> None:
    parser.add_argument("--out", type=Path, default=None,
                        help=f"also write the JSON here (the README's figures: results/{name}.json)")


def emit(result: dict, out: Path | str | None = None, indent: int | None = 1) -> None:
    """Record the machine (unless the result already has one), print the JSON, write it to `out`."""
    m = machine()
    result["machine"] = {**m, **result.get("machine", {}), "load_avg_at_end": m["load_avg_at_end"]}
    text = json.dumps(result, indent=indent)
    if out:
        out = Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text + "\n")
    print(text, flush=True)

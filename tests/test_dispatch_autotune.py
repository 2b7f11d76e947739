"""retrieval.dispatch measures its CPU paths on the machine it runs on: whichever path it picks (each is forced
to win in turn) returns the reference's top k; the choice is cached in a file that other processes read;
concurrent first calls measure once; RECSYS_TOPK_AUTOTUNE=0 gives the fixed rule."""

from __future__ import annotations

import json
import threading

import pytest
import torch

import retrieval
from kernels.topk_attention import cpu as fused
from kernels.topk_attention.reference import topk_reference
from retrieval import dispatch


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """A fresh in-memory cache whose file lives in tmp_path (the kernel build itself stays where it is)."""
    monkeypatch.setenv(dispatch.AUTOTUNE_ENV, "1")
    fresh = dispatch._Cache()
    monkeypatch.setattr(dispatch._Cache, "path", lambda self: tmp_path / "topk_dispatch_test.json")
    monkeypatch.setattr(dispatch, "_cache", fresh)
    return fresh


def _force(monkeypatch, winner: str):
    """Every timing of `winner` reads 1 us, every other path 1 s."""
    def fake_time(fn, args):
        fn(*args)
        name = next(n for layout in dispatch.CANDIDATES.values() for n, f in layout.items() if f is fn)
        return 1e-6 if name == winner else 1.0
    monkeypatch.setattr(dispatch, "_time", fake_time)


def _integers(gen, *shape):
    """Entries in {-2..2}, d a power of 4: every score exact in any summation order, many real ties."""
    return torch.randint(-2, 3, shape, generator=gen).float()


CASES = [("serving", 37, 3_000, 16), ("serving", 2, 9_000, 4), ("training", 5, 1_500, 16)]


def _winners(case) -> list[str]:
    """The paths the tune may pick for the case: candidates at its class's synthetic shape and at its own (the
    fused kernel's pass-1 variants only where this build runs another pass 1 than its rule there)."""
    layout, rows, L, d = case
    _, r, n, _, _ = dispatch._representative(dispatch.shape_class(layout == "serving", rows, L, d, 20))
    return [w for w in dispatch.CANDIDATES[layout] if w in dispatch.candidates(layout, r, n, d)
            and w in dispatch.candidates(layout, rows, L, d)]


# every path the tune may pick for each layout (a path of the other layout is never a candidate: no skips)
@pytest.mark.parametrize("case,winner", [(c, w) for c in CASES for w in _winners(c)],
                         ids=lambda v: "-".join(map(str, v)) if isinstance(v, tuple) else v)
def test_every_forced_choice_equals_the_reference(case, winner, cache, monkeypatch):
    layout, rows, L, d = case
    _force(monkeypatch, winner)
    gen = torch.Generator().manual_seed(rows + L)
    q = _integers(gen, rows, d)
    if layout == "serving":
        keys, lengths = _integers(gen, L, d), L - 5
    else:
        keys, lengths = _integers(gen, rows, L, d), torch.randint(0, L + 1, (rows,), generator=gen)
    scores, idx = retrieval.topk(q, keys, lengths, 20)
    assert dispatch.choose(q, keys, lengths, 20) == winner
    ref_scores, ref_idx = topk_reference(q, keys, lengths, 20)
    assert torch.equal(idx, ref_idx) and torch.equal(scores, ref_scores)


def test_a_slower_fused_kernel_never_runs(cache, monkeypatch):
    _force(monkeypatch, "shared")
    q, keys = torch.randn(200, 16), torch.randn(3_000, 16)
    ran = []
    monkeypatch.setitem(dispatch.CANDIDATES["serving"], "fused",
                        lambda *a: ran.append(1) or dispatch._fused(*a))
    dispatch.choose(q, keys, 3_000, 20)   # tuning runs it (to time it) ...
    ran.clear()
    for _ in range(3):
        retrieval.topk(q, keys, 3_000, 20)
    assert not ran                        # ... serving never does


def test_real_measurement_picks_an_exact_path(cache):
    gen = torch.Generator().manual_seed(7)
    q, keys = _integers(gen, 24, 16), _integers(gen, 5_000, 16)
    scores, idx = retrieval.topk(q, keys, 4_990, 20)
    cls = dispatch.shape_class(True, 24, 5_000, 16, 20)
    result = cache.choices[cls]
    assert result["path"] in dispatch.candidates("serving", 24, 5_000, 16)
    assert result["path"] == min(result["median_s"], key=result["median_s"].get)
    assert all(t < 5 for t in result["median_s"].values())
    ref_scores, ref_idx = topk_reference(q, keys, 4_990, 20)
    assert torch.equal(idx, ref_idx) and torch.equal(scores, ref_scores)


def test_the_cache_file_is_read_by_a_later_process(cache, monkeypatch, tmp_path):
    _force(monkeypatch, "blocked")
    q, keys = torch.randn(3, 8), torch.randn(2_000, 8)
    assert dispatch.choose(q, keys, 2_000, 10) == "blocked"
    body = json.loads((tmp_path / "topk_dispatch_test.json").read_text())
    assert body["cpu"] == fused.cpu_model() and body["torch"] == torch.__version__
    assert body["kernel_build"] == fused.build_tag()
    assert body["choices"][dispatch.shape_class(True, 3, 2_000, 8, 10)]["path"] == "blocked"

    later = dispatch._Cache()             # a new process: nothing in memory, no measuring allowed
    monkeypatch.setattr(dispatch, "_cache", later)
    monkeypatch.setattr(dispatch, "measure", lambda cls: pytest.fail(f"measured {cls} again"))
    assert dispatch.choose(q, keys, 2_000, 10) == "blocked"


def test_processes_writing_different_classes_keep_both(cache, monkeypatch, tmp_path):
    other = dispatch._Cache()
    monkeypatch.setattr(dispatch, "measure", lambda cls: {"path": "shared", "median_s": {}, "left_out_s": {}})
    cache.choose(dispatch.shape_class(True, 4, 100, 4, 4))
    other.choose(dispatch.shape_class(True, 8, 100, 4, 4))   # loaded the file before: its write merges
    body = json.loads((tmp_path / "topk_dispatch_test.json").read_text())
    assert len(body["choices"]) == 2
    assert not list(tmp_path.glob("*.tmp"))


def test_concurrent_first_calls_measure_once(cache, monkeypatch):
    calls = []
    real = dispatch.measure
    monkeypatch.setattr(dispatch, "measure", lambda cls: calls.append(cls) or real(cls))
    q, keys = torch.randn(16, 16), torch.randn(4_000, 16)
    want = topk_reference(q, keys, 4_000, 20)[1]
    got = []
    threads = [threading.Thread(target=lambda: got.append(retrieval.topk(q, keys, 4_000, 20)[1])) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and len(got) == 6
    for idx in got:
        assert int((idx != want).sum()) <= 2 + want.numel() // 50   # the fused kernel's near-tie allowance


def test_fixed_rule_when_measuring_is_off(monkeypatch):
    """RECSYS_TOPK_AUTOTUNE=0: many candidates or a short history -> the fused kernel; few candidates
    against a long history -> topk_blocked; one history per query -> topk_chunked. Nothing is measured."""
    monkeypatch.setenv(dispatch.AUTOTUNE_ENV, "0")
    monkeypatch.setattr(dispatch, "measure", lambda cls: pytest.fail("measured with autotune off"))
    many, few = torch.randn(dispatch.FUSED_MIN_ROWS, 16), torch.randn(2, 16)
    keys, long_keys = torch.randn(3_000, 16), torch.randn(dispatch.FUSED_MAX_FEW // 16 + 1, 16)
    want = "fused" if fused.available() else "shared"
    assert dispatch.choose(many, keys, 2_990, 20) == want
    assert dispatch.choose(few, keys, 2_990, 20) == want
    assert dispatch.choose(few, long_keys, 16_000, 20) == ("blocked" if fused.available() else "shared")
    assert dispatch.choose(torch.randn(4, 16), torch.randn(4, 900, 16), torch.tensor([900, 5, 0, 400]), 20) == "chunked"


def test_shape_classes():
    assert dispatch.shape_class(True, 200, 10_000, 16, 20, 1) == "serving|256|16384|16|32|1"
    assert dispatch.shape_class(False, 1, 1, 4, 1, 2) == "training|1|1|4|1|2"
    assert dispatch.shape_class(True, 256, 16_384, 16, 32, 1) == dispatch.shape_class(True, 129, 4_097, 16, 17, 1)
    layout, rows, L, d, k = dispatch._representative("serving|256|16384|16|32|1")
    assert (layout, d, k) == ("serving", 16, 32) and 128 < rows <= 256 and 4_096 < L <= 16_384


def test_tune_ahead_of_the_first_call(cache, monkeypatch):
    _force(monkeypatch, "shared")
    assert dispatch.tune(True, 200, 3_000, 16, 20) == "shared"
    monkeypatch.setattr(dispatch, "measure", lambda cls: pytest.fail(f"measured {cls} again"))
    assert dispatch.choose(torch.randn(200, 16), torch.randn(3_000, 16), 3_000, 20) == "shared"


def test_deferred_tuning_never_measures_inside_a_call(cache, monkeypatch):
    """A server's mode: the first call of a class runs the fixed rule at once while a background thread
    measures; once measured, calls run the measured path (here forced to differ from the fixed rule)."""
    monkeypatch.setattr(cache, "defer", True)
    measuring, release = threading.Event(), threading.Event()
    inside = []

    def slow_measure(cls):
        inside.append(threading.current_thread().name)
        measuring.set()
        assert release.wait(30)
        return {"path": "shared" if fixed != "shared" else "blocked", "median_s": {}, "left_out_s": {}}

    monkeypatch.setattr(dispatch, "measure", slow_measure)
    q, keys = torch.randn(16, 16), torch.randn(3_000, 16)
    fixed = dispatch.fixed_choice(True, 16, 3_000, 16)
    assert dispatch.choose(q, keys, 3_000, 20) == fixed           # answered while nothing is measured yet
    assert measuring.wait(30)
    assert dispatch.choose(q, keys, 3_000, 20) == fixed           # ... and while the class is measured
    release.set()
    assert dispatch.wait_tuned(30)
    assert inside == ["topk-dispatch-tune"]                       # measured once, off the calling thread
    assert dispatch.choose(q, keys, 3_000, 20) == ("shared" if fixed != "shared" else "blocked")
    want = topk_reference(q, keys, 3_000, 20)[1]
    assert int((retrieval.topk(q, keys, 3_000, 20)[1] != want).sum()) == 0


def test_the_fused_pass1_variants_are_candidates_where_they_differ_from_the_rule():
    """A pass-1 variant is measured only where the build can run it and its rule picks another pass 1; a forced
    variant returns the rule's result bit for bit; one the build cannot run is refused, not run in another."""
    for rows, L, d in [(200, 2_000, 33), (32, 100_000, 33), (200, 20_000, 33), (8, 5_000, 16), (200, 2_000, 2_000)]:
        paths = dispatch.candidates("serving", rows, L, d)
        for name, bits in dispatch.FUSED_BITS.items():
            want = fused.available() and fused.pass1_can(rows, d, bits) and fused.pass1_bits(rows, d, length=L) != bits
            assert (name in paths) == want
    assert "fused_int8" not in dispatch.candidates("training", 200, 2_000, 33)
    if not fused.available():
        return
    gen = torch.Generator().manual_seed(11)
    q, keys = torch.randn(40, 33, generator=gen), torch.randn(3_000, 33, generator=gen)
    want = fused.topk_fused(q, keys, 2_990, 20)
    for bits in (8, 16, 32):
        if fused.pass1_can(40, 33, bits):
            got = fused.topk_fused(q, keys, 2_990, 20, bits=bits)
            assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
        else:
            with pytest.raises(ValueError, match="cannot run pass 1"):
                fused.topk_fused(q, keys, 2_990, 20, bits=bits)
    with pytest.raises(ValueError, match="cannot run pass 1"):
        fused.topk_fused(q[:8], keys, 2_990, 20, bits=8)   # lowp passes take 16 rows or more

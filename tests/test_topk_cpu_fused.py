"""The fused CPU top-k kernel (kernels/topk_attention/cpu.c) against the reference: the same indices in
both layouts, scores to fp32 rounding (bit-equal where every score is exact), ties to the lower index,
non-finite inputs handed to the reference, any thread count."""

from __future__ import annotations

import contextlib
import os
from unittest import mock

import pytest
import torch
from hypothesis import given, settings, strategies as st

from kernels.topk_attention import cpu
from kernels.topk_attention.reference import segment_scale, topk_reference

TOL = dict(rtol=1e-5, atol=1e-5)


def assert_same_topk(q, keys, lengths, k, segments, scores, idx, near_ties=False):
    """The reference's top k, up to near-ties. The kernel sums the d products in its own order, so with an
    inexact scale (1/sqrt(17)) a score's last bit can differ from BLAS's and swap two events whose scores
    are within fp32 rounding. So: scores equal the reference's to rounding; each chosen event is a valid,
    distinct event whose exact (fp64) score is the reference's score at that rank; indices differ only in
    a few places (anywhere with near_ties: data made of scores within rounding of each other)."""
    ref_scores, ref_idx = topk_reference(q, keys, lengths, k, segments)
    torch.testing.assert_close(scores, ref_scores, **TOL)
    valid = idx >= 0
    assert torch.equal(valid, ref_idx >= 0)
    x = keys.double() if keys.dim() == 3 else keys.double().expand(q.shape[0], *keys.shape)
    x = torch.cat([x, x.new_zeros(x.shape[0], 1, x.shape[-1])], 1)   # a row for the empty slots to point at
    n = torch.as_tensor(lengths).reshape(-1, 1)
    assert bool((idx < n).all())
    picked = x.gather(1, idx.clamp(min=0).unsqueeze(-1).expand(-1, -1, x.shape[-1]))   # [R, k, d]
    exact = ((q.double() * segment_scale(q.shape[-1], segments).double()).unsqueeze(1) * picked).sum(-1)
    torch.testing.assert_close(exact[valid], ref_scores[valid].double(), **TOL)
    for r in range(idx.shape[0]):
        assert idx[r][valid[r]].unique().numel() == int(valid[r].sum())
    assert near_ties or int((idx != ref_idx).sum()) <= 2 + idx.numel() // 50


# The kernel's vector code depends on the target: 16 lanes with AVX-512, 8 with AVX (AVX2: pass 1 blocks 3
# rows x half a block in 16 registers), generic vectors without either; pass 1 of a serving call with >= 16 rows
# scores in int8 with AVX512_VNNI ("native" on such a CPU), else in bf16 with AVX512_BF16 ("bf16-pass1" is the
# target without VNNI), and "fp32-pass1" is the target without either; AVX2 without AVX-512 scores the calls with
# enough rows and events in int8 too ("avx2"; -DINT8_AVX2=0 keeps the fp32 and bf16 builds what they say on such a
# CPU). This CPU compiles all of them, so each is checked here whatever CPU runs it later ("avx2" is the native build
# on a CPU without AVX-512).
VARIANTS = {"native": (), "bf16-pass1": ("-mno-avx512vnni", "-DINT8_AVX2=0"),
            "fp32-pass1": ("-mno-avx512bf16", "-mno-avx512vnni", "-DINT8_AVX2=0"),
            "avx2": ("-mno-avx512f",), "no-avx": ("-mno-avx",)}


@contextlib.contextmanager
def using(build):
    """topk_fused runs the given build inside the block (a context, not a fixture: hypothesis draws it)."""
    lib = cpu.load(VARIANTS[build])
    assert lib is not None, f"the {build} build failed"
    with mock.patch.object(cpu, "_lib", lambda: lib):
        yield


@pytest.fixture(params=list(VARIANTS))
def variant(request):
    with using(request.param):
        yield request.param


def test_kernel_builds_once_per_machine(tmp_path, monkeypatch):
    """CI has a C compiler: the kernel must really run there, not fall back silently."""
    assert cpu.available()
    monkeypatch.setenv("RECSYS_KERNEL_CACHE", str(tmp_path))
    first = cpu.build()
    assert first.parent == tmp_path and first.exists()
    stamp = first.stat().st_mtime_ns
    assert cpu.build() == first and first.stat().st_mtime_ns == stamp  # cached: not rebuilt


def _draw(gen, integers, *shape):
    if integers:
        return torch.randint(-2, 3, shape, generator=gen).float()
    return torch.randn(*shape, generator=gen)


CASES = [  # layout, rows, L, d, k, segments
    ("serving", 200, 10_000, 16, 20, [8, 8]),
    ("serving", 7, 3_001, 64, 256, [32, 32]),
    ("serving", 3, 2_500, 5, 20, None),        # d not a multiple of the vector width
    ("serving", 4, 7, 4, 20, None),            # k > L
    ("serving", 2, 0, 4, 3, None),             # L = 0
    ("serving", 1, 100_000, 16, 20, [8, 8]),
    ("serving", 3, 50_000, 64, 20, None),     # few rows: T not kept, two threads transpose again in pass 2
    ("serving", 2, 20_000, 5, 10, None),      # the same with the scalar transpose
    ("training", 9, 2_000, 32, 20, [16, 16]),
    ("training", 5, 70, 4, 64, None),          # k > most lengths
    ("training", 4, 3_000, 16, 5, None),       # one query per history, small k: T not kept
    ("training", 3, 0, 4, 5, None),
]


def _case(layout, rows, L, d, integers, gen):
    q = _draw(gen, integers, rows, d)
    if layout == "serving":
        return q, _draw(gen, integers, L, d), max(0, L - 3)
    return q, _draw(gen, integers, rows, L, d), torch.randint(0, L + 1, (rows,), generator=gen)


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c[:5])))
def test_equals_the_reference(case, variant):
    layout, rows, L, d, k, segments = case
    q, keys, lengths = _case(layout, rows, L, d, False, torch.Generator().manual_seed(L + d + k))
    scores, idx = cpu.topk_fused(q, keys, lengths, k, segments)
    assert_same_topk(q, keys, lengths, k, segments, scores, idx)


@pytest.mark.parametrize("layout", ["serving", "training"])
@pytest.mark.parametrize("d,segments", [(4, None), (16, [4, 4, 4, 4]), (20, [4, 16])])
def test_ties_go_to_the_lower_index(layout, d, segments, variant):
    """Entries in {-2..2} and scales 1/2, 1/4: every score exact in any order, hundreds of real ties."""
    gen = torch.Generator().manual_seed(d)
    q, keys, lengths = _case(layout, 6, 3_000, d, True, gen)
    scores, idx = cpu.topk_fused(q, keys, lengths, 40, segments)
    ref_scores, ref_idx = topk_reference(q, keys, lengths, 40, segments)
    assert torch.equal(idx, ref_idx) and torch.equal(scores, ref_scores)
    cut = topk_reference(q, keys, lengths, 41, segments)[0]
    assert (cut[:, 39] == cut[:, 40]).any()  # ties across the cut really occur


def test_all_equal_scores_keep_the_first_k(variant):
    scores, idx = cpu.topk_fused(torch.ones(3, 4), torch.ones(5_000, 4), 4_000, 20)
    assert torch.equal(idx, torch.arange(20).expand(3, 20)) and torch.equal(scores, torch.full((3, 20), 2.0))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_and_strided_inputs(dtype, variant):
    gen = torch.Generator().manual_seed(1)
    keys = torch.randn(3, 16, 1_500, generator=gen).to(dtype).transpose(1, 2)    # [B, L, d], d not contiguous
    q = torch.randn(16, 3, generator=gen).to(dtype).t()                           # [B, d], strided
    lengths = torch.tensor([1_500, 700, 1])
    scores, idx = cpu.topk_fused(q, keys, lengths, 20, [8, 8])
    assert_same_topk(q, keys, lengths, 20, [8, 8], scores, idx)
    shared = keys[0, ::2]                                                          # [L/2, d], rows strided
    s2, i2 = cpu.topk_fused(q, shared, 600, 20)
    assert_same_topk(q, shared, 600, 20, None, s2, i2)


@pytest.mark.parametrize("bad", ["nan_key", "inf_query", "overflow"])
def test_non_finite_rows_fall_back_to_the_reference(bad, variant):
    gen = torch.Generator().manual_seed(2)
    q, keys = torch.randn(4, 8, generator=gen), torch.randn(4, 500, 8, generator=gen)
    lengths = torch.tensor([500, 500, 30, 0])
    if bad == "nan_key":
        keys[1, 17, 3] = float("nan")
    elif bad == "inf_query":
        q[2, 0] = float("inf")
    else:
        keys[0, 400] = 3e37                                                        # |score| beyond fp32
    scores, idx = cpu.topk_fused(q, keys, lengths, 10)
    ref_scores, ref_idx = topk_reference(q, keys, lengths, 10)
    assert torch.equal(idx, ref_idx)
    assert torch.equal(scores.isnan(), ref_scores.isnan())
    torch.testing.assert_close(scores.nan_to_num(), ref_scores.nan_to_num(), **TOL)


@pytest.mark.parametrize("bad", ["nan_key", "inf_query"])
def test_non_finite_inputs_in_the_serving_layout(bad, variant):
    """Enough events that pass 2 selects its threshold among hundreds of sub-block maxima with a NaN among them."""
    gen = torch.Generator().manual_seed(5)
    q, keys = torch.randn(40, 16, generator=gen), torch.randn(5_000, 16, generator=gen)
    if bad == "nan_key":
        keys[1_234, 5] = float("nan")
    else:
        q[7, 3] = float("inf")
    scores, idx = cpu.topk_fused(q, keys, 5_000, 20)
    ref_scores, ref_idx = topk_reference(q, keys, 5_000, 20)
    assert torch.equal(idx, ref_idx)
    assert torch.equal(scores.isnan(), ref_scores.isnan())
    torch.testing.assert_close(scores.nan_to_num(), ref_scores.nan_to_num(), **TOL)


@pytest.mark.parametrize("k", [1, 20, 32, 33, 100])
@pytest.mark.parametrize("layout,rows,L,d", [("serving", 200, 10_000, 16), ("serving", 8, 9_000, 33),
                                              ("serving", 3, 40_000, 64), ("training", 7, 3_000, 16)])
def test_fused_multiply_add_builds_agree_bit_for_bit(layout, rows, L, d, k):
    """Every build with the same multiply-add (all but no-avx, which has no FMA instruction) sums each score in the
    same order, whatever its vector width, row blocking (AVX-512: 2 rows of whole blocks; AVX2: 3 rows of half
    blocks), bound (block or sub-block maxima) or pass 1 (int8, bf16): scores and indices equal bit for bit, on
    inexact data where a different order would show. So the AVX2 build is checked on AVX-512 CPUs too."""
    gen = torch.Generator().manual_seed(L + d + k)
    q, keys, lengths = _case(layout, rows, L, d, False, gen)
    got = {}
    for build in ("native", "bf16-pass1", "fp32-pass1", "avx2"):
        with using(build):
            got[build] = cpu.topk_fused(q, keys, lengths, k, None if d % 2 else [d // 2, d // 2])
    for build, (scores, idx) in got.items():
        assert torch.equal(idx, got["native"][1]), build
        assert torch.equal(scores.view(torch.int32), got["native"][0].view(torch.int32)), build
    assert_same_topk(q, keys, lengths, k, None if d % 2 else [d // 2, d // 2], *got["avx2"])


def test_thread_count_does_not_change_the_result():
    gen = torch.Generator().manual_seed(3)
    q, keys = torch.randn(37, 16, generator=gen), torch.randn(20_000, 16, generator=gen)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = cpu.topk_fused(q, keys, 20_000, 20)
        torch.set_num_threads(max(2, os.cpu_count() or 2))
        many = cpu.topk_fused(q, keys, 20_000, 20)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one[0], many[0]) and torch.equal(one[1], many[1])


def _fork_child_search(q, keys, want_idx):  # runs in a forked child: exit code 0 when the search is right
    torch.set_num_threads(2)
    os._exit(0 if torch.equal(cpu.topk_fused(q, keys, keys.shape[0], 20)[1], want_idx) else 1)


def test_concurrent_callers_and_a_forked_child():
    """Concurrent callers each get their own OpenMP team and the right answer; a forked child, which
    inherits libgomp's state but not its threads, searches on one thread instead of waiting forever
    (torch's own parallel ops do hang there)."""
    import multiprocessing
    from concurrent.futures import ThreadPoolExecutor

    gen = torch.Generator().manual_seed(4)
    q, keys = torch.randn(64, 16, generator=gen), torch.randn(12_000, 16, generator=gen)
    want_s, want_i = topk_reference(q, keys, 12_000, 20)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(3)  # more OpenMP threads than this machine's 2 cores (oversubscribed barrier)
        cpu.topk_fused(q, keys, 12_000, 20)  # the OpenMP thread pool exists from here on
        with ThreadPoolExecutor(4) as ex:
            got = list(ex.map(lambda _: cpu.topk_fused(q, keys, 12_000, 20), range(16)))
    finally:
        torch.set_num_threads(before)
    for s, i in got:
        assert torch.equal(i, want_i)
        torch.testing.assert_close(s, want_s, **TOL)
    child = multiprocessing.get_context("fork").Process(target=_fork_child_search, args=(q, keys, want_i))
    child.start()
    child.join(60)
    if child.is_alive():
        child.kill()
        pytest.fail("the forked child's search hung (waiting on the parent's OpenMP threads)")
    assert child.exitcode == 0


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="lengths"):
        cpu.topk_fused(torch.randn(3, 4), torch.randn(3, 10, 4), torch.tensor([1, 2]), 2)
    with pytest.raises(ValueError, match="k must be"):
        cpu.topk_fused(torch.randn(3, 4), torch.randn(10, 4), 10, 0)


@settings(max_examples=90, deadline=None)
@given(
    rows=st.integers(1, 9), L=st.integers(0, 700), k=st.integers(1, 70), d=st.sampled_from([1, 3, 4, 16, 17, 64]),
    serving=st.booleans(), integers=st.booleans(), seed=st.integers(0, 2**16), build=st.sampled_from(list(VARIANTS)),
)
def test_property_equals_reference(rows, L, k, d, serving, integers, seed, build):
    if integers and d not in (1, 4, 16, 64):
        d = 4  # exact scales only: with an inexact scale, "ties" are rounding artefacts of one summation order
    gen = torch.Generator().manual_seed(seed)
    q, keys, lengths = _case("serving" if serving else "training", rows, L, d, integers, gen)
    with using(build):
        scores, idx = cpu.topk_fused(q, keys, lengths, k)
    if integers:  # every score exact in any summation order: the reference's result bit for bit
        ref_scores, ref_idx = topk_reference(q, keys, lengths, k)
        assert torch.equal(idx, ref_idx) and torch.equal(scores, ref_scores)
    else:
        assert_same_topk(q, keys, lengths, k, None, scores, idx)


def test_serving_layout_takes_one_length():
    q, keys = torch.randn(3, 4), torch.randn(50, 4)
    same = cpu.topk_fused(q, keys, torch.tensor([40, 40, 40]), 5)
    assert torch.equal(same[1], topk_reference(q, keys, 40, 5)[1])
    with pytest.raises(ValueError, match="one length"):
        cpu.topk_fused(q, keys, torch.tensor([40, 30, 40]), 5)


def cpu_has(flag: str) -> bool:
    flags = next((ln for ln in open("/proc/cpuinfo") if ln.startswith("flags")), "")
    return flag in flags.split()


def test_bf16_pass1_runs_where_the_cpu_has_it():
    """On an AVX512_BF16 CPU the bf16-pass1 build (the native one where the CPU has no AVX512_VNNI) scores pass 1
    of a serving call with >= 16 rows in bf16; the other builds, the training layout and fewer rows stay fp32 (but
    the avx2 build's int8 pass, tests/test_topk_int8.py)."""
    with using("bf16-pass1"):
        assert cpu.pass1_bits(200, 33) == (16 if cpu_has("avx512_bf16") else 32)
        assert cpu.pass1_bits(15, 33) == 32 and cpu.pass1_bits(200, 33, serving=False) == 32
    for build in ("fp32-pass1", "no-avx"):
        with using(build):
            assert cpu.pass1_bits(200, 33) == 32
    with using("avx2"):
        assert cpu.pass1_bits(200, 33) == 8 and cpu.pass1_bits(200, 33, serving=False) == 32


def _adversarial(kind, L, gen, rows=40, d=33):
    """Queries [rows, d] and keys [L, d] that stress the bf16 pass 1's bound (cpu.c's header)."""
    q, x = torch.randn(rows, d, generator=gen), torch.randn(L, d, generator=gen)
    if kind == "near_ties":           # scores within bf16 rounding of each other: the approximate pass cannot rank
        x = torch.randn(1, d, generator=gen) + 2.0**-11 * x
    elif kind == "bf16_boundaries":   # +-(1 + 2^-8 + m 2^-21) 2^e: ties of bf16's round-to-nearest-even and neighbours
        def boundary(*shape):
            m = torch.randint(-3, 4, shape, generator=gen).double()
            e = torch.randint(-2, 3, shape, generator=gen).double()
            sign = torch.randint(0, 2, shape, generator=gen).double() * 2 - 1
            return (sign * (1 + 2.0**-8 + m * 2.0**-21) * 2.0**e).float()
        q, x = boundary(rows, d), boundary(L, d)
    elif kind == "outlier" and L:     # one key 1e30 (in one dim: no cancellation): first for some rows, last for others
        x[L // 2, 0] = 1e30
    elif kind == "denormal":          # denormal keys (bf16 conversion flushes them to 0), huge queries
        x, q = x * 1e-39, q * 1e30
    elif kind == "huge":              # keys at fp32's top (clamped below bf16's inf), tiny queries; positive, so
        x = x.abs().clamp(max=4) * 0.85e38   # that no cancellation makes BLAS's order differ beyond the tolerance:
        q = q.abs() * 1e-30                  # |x| up to 3.4e38, above bf16's largest finite 3.39e38
    elif kind == "inverted":          # bf16 ranks the top events last: their error meets half the bound (below)
        # q = +-1 (16 each) and 2^-15; "up" events 1 + 2^-8 + 2^-21 where q = +1 (rounded up by 2^-8) and 1 + 2^-8
        # (a tie, rounded down) where q = -1, 0 in the last dim: score 2^-17 exactly, 2^-3 in bf16. "Down" events the
        # other way round and 1 + 2^-10 u (u distinct) in the last dim: 2^-15 - 2^-17 + ~2^-25 u, bf16 ~2^-15 - 2^-3.
        # One 16-event sub-block in four is "down": the exact top k, which a bound under half the proven one misses.
        assert d == 33
        plus = torch.arange(d - 1) % 2 == 0
        q = torch.where(plus, 1.0, -1.0).expand(rows, d - 1)
        q = torch.cat([q, torch.full((rows, 1), 2.0**-15)], 1)
        tie, up = 1 + 2.0**-8, 1 + 2.0**-8 + 2.0**-21
        down = (torch.arange(L) // 16) % 4 == 3
        x = torch.where(down[:, None], torch.where(plus, tie, up), torch.where(plus, up, tie)).float()
        x = torch.cat([x, torch.where(down, 1 + 2.0**-10 * torch.rand(L, generator=gen), 0.0)[:, None]], 1)
    elif kind == "all_equal":
        q, x = torch.ones(rows, d), torch.ones(L, d)
    elif kind == "integers":          # every score exact: hundreds of real ties
        q, x = torch.randint(-2, 3, (rows, d), generator=gen).float(), torch.randint(-2, 3, (L, d), generator=gen).float()
    return q, x


def _both_pass1s(q, keys, n, k, low="bf16-pass1"):
    """The `low` build's result, checked equal bit for bit to the fp32-pass1 build's (pass 2 is the same fp32
    arithmetic, so any pruning mistake of the bf16 or int8 pass shows as a difference)."""
    with using(low):
        got = cpu.topk_fused(q, keys, n, k)
    with using("fp32-pass1"):
        want = cpu.topk_fused(q, keys, n, k)
    assert torch.equal(got[1], want[1]) and torch.equal(got[0], want[0])
    return got


@pytest.mark.parametrize("kind", ["normal", "near_ties", "bf16_boundaries", "outlier", "denormal", "huge",
                                  "all_equal", "integers"])
@pytest.mark.parametrize("L", [0, 1, 63, 64, 65, 5_037])
def test_bf16_pass1_equals_the_fp32_kernel_and_the_reference(kind, L):
    gen = torch.Generator().manual_seed(L + len(kind))
    exact = kind in ("integers", "all_equal")   # d = 16: the scale 1/4 is exact, so is every score
    q, x = _adversarial(kind, L, gen, d=16 if exact else 33)
    k = 20
    scores, idx = _both_pass1s(q, x, L, k)
    if exact:   # the reference's result bit for bit, ties to the lower index
        ref_scores, ref_idx = topk_reference(q, x, L, k)
        assert torch.equal(idx, ref_idx) and torch.equal(scores, ref_scores)
    else:
        assert_same_topk(q, x, L, k, None, scores, idx, near_ties=kind in ("near_ties", "bf16_boundaries"))


@pytest.mark.parametrize("layout", ["dims_strided", "rows_strided"])
def test_bf16_pass1_strided_keys(layout):
    gen = torch.Generator().manual_seed(6)
    q = torch.randn(40, 33, generator=gen)
    base = torch.randn(33, 4_001, generator=gen).t() if layout == "dims_strided" else torch.randn(8_002, 33, generator=gen)[::2]
    scores, idx = _both_pass1s(q, base, 4_001, 20)
    assert_same_topk(q, base, 4_001, 20, None, scores, idx)


@pytest.mark.parametrize("L", [3_001, 5_037])
def test_bf16_pass1_finds_the_events_it_ranks_last(L):
    q, x = _adversarial("inverted", L, torch.Generator().manual_seed(L))
    scores, idx = _both_pass1s(q, x, L, 20)
    assert bool((idx // 16 % 4 == 3).all())   # all top events are "down" events, which bf16 ranks last
    assert_same_topk(q, x, L, 20, None, scores, idx)


@pytest.mark.parametrize("kind", ["near_ties", "inverted"])
def test_bf16_pass1_with_two_threads_and_a_tail_block(kind):
    gen = torch.Generator().manual_seed(5)
    q, x = _adversarial(kind, 30_001, gen, rows=64)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        scores, idx = _both_pass1s(q, x, 30_001, 20)
    finally:
        torch.set_num_threads(before)
    assert_same_topk(q, x, 30_001, 20, None, scores, idx, near_ties=True)


@settings(max_examples=40, deadline=None)
@given(
    rows=st.integers(16, 40), L=st.integers(0, 3_000), k=st.integers(1, 70), d=st.sampled_from([1, 2, 3, 16, 17, 33]),
    kind=st.sampled_from(["normal", "near_ties", "bf16_boundaries", "integers"]), seed=st.integers(0, 2**16),
)
def test_property_bf16_pass1(rows, L, k, d, kind, seed):
    q, x = _adversarial(kind, L, torch.Generator().manual_seed(seed), rows=rows, d=d)
    scores, idx = _both_pass1s(q, x, L, k)
    if kind == "integers" and d in (1, 4, 16, 64):   # exact scale 1/sqrt(d): exact scores
        ref_scores, ref_idx = topk_reference(q, x, L, k)
        assert torch.equal(idx, ref_idx) and torch.equal(scores, ref_scores)
    else:   # integers with an inexact scale 1/sqrt(d): exact ties become rounding artefacts of each summation order
        assert_same_topk(q, x, L, k, None, scores, idx, near_ties=kind in ("near_ties", "bf16_boundaries", "integers"))

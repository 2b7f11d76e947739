"""The int8 pass 1 of the fused CPU top-k kernel (kernels/topk_attention/cpu.c: vpdpbusd with AVX512_VNNI, vpmaddubsw
with AVX2 and queries within +-63): its pruning bound must never drop an event of the top k, so it returns the
fp32-pass1 build's indices and scores bit for bit, on random and adversarial data. The comparisons run each int8 build
this CPU can run with INT8_MIN_LEN = 0 (int8 on short histories too: tail blocks, k > L): the AVX2 one everywhere (built
without AVX-512 where the CPU has it), the VNNI one where the CPU has VNNI, the AMX one where it has AMX-INT8."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings, strategies as st

from kernels.topk_attention import cpu
from kernels.topk_attention.reference import topk_reference
from test_topk_cpu_fused import VARIANTS, _adversarial, _both_pass1s, assert_same_topk, cpu_has, using

ROWS = 64   # the fewest rows the VNNI pass takes where bf16 is there too (cpu.c's INT8_MIN_ROWS)
# int8 whatever the history's length; the AVX2 pass from 16 rows (LOWP_MIN_ROWS) so that ROWS rows run it too
INT8_BUILDS = {"avx2": ("-mno-avx512f", "-DINT8_MIN_LEN=0", "-DINT8_MIN_ROWS=16")}
if cpu_has("avx512_vnni"):   # vpdpbusd (without AMX tiles where the CPU has them too)
    INT8_BUILDS["vnni"] = ("-DINT8_MIN_LEN=0", "-DINT8_AMX=0")
if cpu_has("amx_int8"):      # the same dots on AMX tiles (d <= 64)
    INT8_BUILDS["amx"] = ("-DINT8_MIN_LEN=0",)
FP32 = VARIANTS["fp32-pass1"]
AVX2_MIN_ROWS, AVX2_MIN_LEN = 128, 16_384   # cpu.c's INT8_MIN_ROWS and INT8_MIN_LEN for the AVX2 pass


@pytest.fixture(params=list(INT8_BUILDS))
def int8(request):
    return INT8_BUILDS[request.param]


def _int8(build, q, keys, n, k, segments=None):
    """The int8 build's result, equal bit for bit to the fp32-pass1 build's."""
    assert cpu.load(build).topk_pass1_bits(q.shape[0], q.shape[1], 0, n) == (8 if q.shape[1] <= 1024 else 32)
    got = cpu.topk_fused(q, keys, n, k, segments, build=build)
    want = cpu.topk_fused(q, keys, n, k, segments, build=FP32)
    assert torch.equal(got[1], want[1]) and torch.equal(got[0], want[0])
    return got


def test_int8_pass1_runs_where_the_cpu_has_it():
    """VNNI where the CPU has it; else AVX2 without AVX-512 (this build's thresholds); the fp32 builds never."""
    bf16 = 16 if cpu_has("avx512_bf16") else 32
    avx2_only = not cpu_has("avx512f")
    with using("native"):
        bits = cpu.pass1_bits(200, 33)
        assert bits == (8 if cpu_has("avx512_vnni") or avx2_only else bf16)
        assert cpu.pass1_bits(15, 33) == 32 and cpu.pass1_bits(200, 33, serving=False) == 32
        if cpu_has("avx512_vnni"):   # bf16 (where there) takes fewer rows and shorter histories
            assert cpu.pass1_bits(ROWS, 33) == 8 and cpu.pass1_bits(ROWS - 1, 33) == (16 if bf16 == 16 else 8)
            assert cpu.pass1_bits(200, 33, length=4096) == 8 and cpu.pass1_bits(200, 33, length=4095) == (16 if bf16 == 16 else 8)
            # exact int32 dots need 127^2 * d (d rounded up to 4) < 2^24: bf16 beyond d = 1024
            assert cpu.pass1_bits(200, 1024) == 8 and cpu.pass1_bits(200, 1025) == bf16
    with using("avx2"):   # the AVX2 pass where it pays (cpu.c's INT8_MIN_ROWS, INT8_MIN_LEN)
        assert cpu.pass1_bits(AVX2_MIN_ROWS, 33, length=AVX2_MIN_LEN) == 8
        assert cpu.pass1_bits(AVX2_MIN_ROWS - 1, 33) == 32 and cpu.pass1_bits(200, 33, length=AVX2_MIN_LEN - 1) == 32
        assert cpu.pass1_bits(200, 1024) == 8 and cpu.pass1_bits(200, 1025) == 32
        assert cpu.pass1_bits(200, 33, serving=False) == 32
    with using("fp32-pass1"):   # -DINT8_AVX2=0: the fp32 kernel on every CPU, what the comparisons need
        assert cpu.pass1_bits(200, 33) == 32
    with using("bf16-pass1"):
        assert cpu.pass1_bits(200, 33) == bf16
    for build in INT8_BUILDS.values():
        assert cpu.load(build).topk_pass1_bits(ROWS, 33, 0, 1) == 8


def test_amx_tiles_run_where_the_cpu_has_them():
    """The native build multiplies pass 1's int8 dots on AMX tiles where the CPU has AMX-INT8 (and Linux grants the
    tile state); the vnni build never; the results are the same bit for bit (the other tests, every build)."""
    assert cpu.int8_amx() == cpu_has("amx_int8")
    assert not cpu.int8_amx(("-DINT8_AMX=0",))
    if "amx" in INT8_BUILDS:
        assert cpu.int8_amx(INT8_BUILDS["amx"])


def _int8_case(kind, L, gen, rows=ROWS, d=33):
    """Queries [rows, d] and keys [L, d] that stress the int8 pass's bound (cpu.c's header), beyond _adversarial's."""
    q, x = torch.randn(rows, d, generator=gen), torch.randn(L, d, generator=gen)
    if kind == "zero_keys":             # zero keys (scale floor), a zero query row, a zero block
        x[: L // 2] = 0.0
        q[3] = 0.0
    elif kind == "tiny_queries":        # every query below the 2^-40 scale floor: q~ all 0, the bound is all slack
        q = q * 1e-15
    elif kind == "huge_queries":        # queries past 2^47: those rows are not quantized (rescored in full)
        q[::3] = q[::3] * 1e20
        x = x * 1e-20
    elif kind == "one_huge_block" and L:  # one event past 2^47: its block is not quantized, the others are
        x[L // 3] = x[L // 3] * 1e14
    elif kind == "folded_position":     # DARE's serving search: query column 1, a key column ~100x smaller
        q[:, -1] = 1.0 * d**0.5         # (times sqrt(d): topk_fused scales the query by 1/sqrt(d))
        x[:, -1] = 0.01 * torch.linspace(-1, 1, L)
    elif kind == "mixed_scales":        # columns of very different sizes in both queries and keys
        c = 2.0 ** torch.randint(-12, 13, (d,), generator=gen).float()
        q, x = q * c, x / c.flip(0)
    return q, x


KINDS = ["normal", "near_ties", "bf16_boundaries", "outlier", "denormal", "huge", "all_equal", "integers",
         "zero_keys", "tiny_queries", "huge_queries", "one_huge_block", "folded_position", "mixed_scales"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("L", [0, 1, 63, 64, 65, 5_037])
def test_int8_pass1_equals_the_fp32_kernel_and_the_reference(int8, kind, L):
    gen = torch.Generator().manual_seed(L + len(kind))
    exact = kind in ("integers", "all_equal")   # d = 16: the scale 1/4 is exact, so is every score
    d = 16 if exact else 33
    if kind in KINDS[:8]:
        q, x = _adversarial(kind, L, gen, rows=ROWS, d=d)
    else:
        q, x = _int8_case(kind, L, gen, d=d)
    scores, idx = _int8(int8, q, x, L, 20)
    if exact:   # the reference's result bit for bit, ties to the lower index
        ref_scores, ref_idx = topk_reference(q, x, L, 20)
        assert torch.equal(idx, ref_idx) and torch.equal(scores, ref_scores)
    elif kind not in ("huge_queries", "one_huge_block", "mixed_scales"):
        # cancellation (1e20 * 1e-20 terms, terms beside 1e14 ones, columns 2^24 apart): BLAS's summation order differs
        # from the kernel's beyond the tolerance there (_int8 checked the fp32 kernel's result bit for bit)
        assert_same_topk(q, x, L, 20, None, scores, idx, near_ties=kind in ("near_ties", "bf16_boundaries"))


def _inverted(L, rows=ROWS, d=33):
    """Data that int8 ranks upside down, within its bound (cpu.c's header): every row q = +-1 (one sign pattern);
    event 0 of each 64-event block -127 q (all columns, so the column scales are 1 and the block's key scale
    t = 1); "up" events 0.5 + 2^-8 q in all but 2 columns (k~ = q there: int8 dot 127 (d - 2), exact ~(d - 2) / 2);
    "down" events (0.5 - u) q in every column, u ~ 2^-12 distinct (k~ = 0: int8 dot 0, exact ~d / 2, the top).
    Sub-blocks 1-3 of every 4th block hold "down" events, of the others "up" events, sub-block 0 zeros but event 0.
    Each one's int8 error is ~127 d / 2 of the bound's ~(127 d + K1) / 2: a bound a quarter as large (or half)
    drops every "down" sub-block, as int8 ranks them below every "up" one by 127 (d - 2) ~ the bound."""
    sign = torch.where(torch.arange(d) % 3 == 1, -1.0, 1.0)
    q = sign.expand(rows, d).clone()
    e = torch.arange(L)
    block, sub = e // 64, e % 64 // 16
    down = (block % 4 == 3) & (sub > 0)
    up = (block % 4 != 3) & (sub > 0)
    u = 2.0**-12 * (1 + (e % 97).float() / 97)
    x = torch.zeros(L, d)
    x[down] = (0.5 - u[down])[:, None] * sign
    x[up] = 0.5 + 2.0**-8
    x[up, -2:] = 0.0
    x[up] = x[up] * sign
    x[e % 64 == 0] = -127.0 * sign
    return q, x


@pytest.mark.parametrize("L", [3_001, 5_037])
def test_int8_pass1_finds_the_events_it_ranks_last(int8, L):
    q, x = _inverted(L)
    scores, idx = _int8(int8, q, x, L, 20)
    e = idx.flatten()
    assert bool(((e // 64 % 4 == 3) & (e % 64 >= 16)).all())   # all top events are "down" events
    assert_same_topk(q, x, L, 20, None, scores, idx)


@pytest.mark.parametrize("kind", ["near_ties", "inverted"])
def test_int8_pass1_with_two_threads_and_a_tail_block(int8, kind):
    L = 30_001
    q, x = _inverted(L, rows=80) if kind == "inverted" else _adversarial(kind, L, torch.Generator().manual_seed(5), rows=80)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        scores, idx = _int8(int8, q, x, L, 20)
    finally:
        torch.set_num_threads(before)
    assert_same_topk(q, x, L, 20, None, scores, idx, near_ties=True)


@pytest.mark.parametrize("bad", ["nan_key", "inf_key", "inf_query", "nan_query", "overflow"])
def test_int8_pass1_non_finite_inputs_go_to_the_reference(int8, bad):
    """As in the fp32 pass: such rows are flagged and recomputed by the reference, whatever the int8 pass made of
    them (a NaN key quantizes to garbage; an inf key or query row is not quantized)."""
    gen = torch.Generator().manual_seed(9)
    q, x = torch.randn(ROWS + 16, 33, generator=gen), torch.randn(5_000, 33, generator=gen)
    if bad == "nan_key":
        x[1_234, 5] = float("nan")
    elif bad == "inf_key":
        x[77, 0] = float("-inf")
    elif bad == "inf_query":
        q[7, 3] = float("inf")
    elif bad == "nan_query":
        q[70, 32] = float("nan")
    else:
        q[5] = q[5].abs() * 1e30      # d max|q| max|x| past FLT_MAX / 2 for row 5 only; positive, so that its
        x[4_000] = x[4_000].abs() * 1e10   # score is +inf (inf - inf would make the reference's order batch-dependent)
    scores, idx = cpu.topk_fused(q, x, 5_000, 20, build=int8)
    ref_scores, ref_idx = topk_reference(q, x, 5_000, 20)
    assert torch.equal(idx, ref_idx)
    assert torch.equal(scores.isnan(), ref_scores.isnan())
    torch.testing.assert_close(scores.nan_to_num(), ref_scores.nan_to_num(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("d", [1_021, 1_024])
def test_int8_pass1_at_the_largest_d(int8, d):
    """d = 1024: dots up to 127^2 * 1024, just below 2^24 (exact in fp32); +-1 entries make them all reach it."""
    gen = torch.Generator().manual_seed(d)
    q = torch.randint(0, 2, (ROWS, d), generator=gen).float() * 2 - 1
    x = torch.randint(0, 2, (300, d), generator=gen).float() * 2 - 1
    x[7] = q[0]                      # row 0's score d / sqrt(d): its int8 dot is 127^2 d
    scores, idx = _int8(int8, q, x, 300, 20)
    assert int(idx[0, 0]) == 7
    assert_same_topk(q, x, 300, 20, None, scores, idx, near_ties=True)


@pytest.mark.parametrize("d", [33, 64])
def test_int8_pass1_pair_sums_at_the_saturation_limit(int8, d):
    """Every key and query +-1: the keys quantize to +-127 (stored 1 and 255) and the queries to +-63 on AVX2 (+-127 with
    VNNI), so each of vpmaddubsw's int16 pair sums where both keys and both queries are +1 is at its largest, 2 * 255 *
    63 = 32130. Each row's best event is its own sign pattern (every product positive), then copies with a dim flipped:
    with queries at +-127 such pairs would saturate (64770 -> 32767), cost those events' dots ~d / 8 * 32000 and drop
    them from the top k."""
    gen = torch.Generator().manual_seed(d)
    rows, L = 80, 6_000
    q = torch.randint(0, 2, (rows, d), generator=gen).float() * 2 - 1
    x = torch.randint(0, 2, (L, d), generator=gen).float() * 2 - 1
    own = 37 + 71 * torch.arange(rows)   # no two of these positions (+ 64 t - 5 below) coincide
    x[own] = q
    for t in range(1, 4):
        x[own + 64 * t - 5] = q
        x[own + 64 * t - 5, (torch.arange(rows) + t) % d] *= -1
    scores, idx = _int8(int8, q, x, L, 20)
    assert torch.equal(idx[:, 0], own)
    assert_same_topk(q, x, L, 20, None, scores, idx, near_ties=True)


@pytest.mark.parametrize("layout", ["dims_strided", "rows_strided"])
def test_int8_pass1_strided_keys(int8, layout):
    gen = torch.Generator().manual_seed(6)
    q = torch.randn(ROWS, 33, generator=gen)
    base = torch.randn(33, 4_001, generator=gen).t() if layout == "dims_strided" else torch.randn(8_002, 33, generator=gen)[::2]
    scores, idx = _int8(int8, q, base, 4_001, 20)
    assert_same_topk(q, base, 4_001, 20, None, scores, idx)


def test_int8_pass1_serving_segments_and_large_k(int8):
    """DARE's segments [32, 1] (the position column's scale 1), k > L and k past a block's events."""
    gen = torch.Generator().manual_seed(7)
    q, x = _int8_case("folded_position", 20_000, gen, rows=200)
    for L, k in [(20_000, 20), (20_000, 300), (50, 64)]:
        scores, idx = _int8(int8, q, x, L, k, [32, 1])
        assert_same_topk(q, x, L, k, [32, 1], scores, idx)


def test_all_three_pass1s_agree(int8):
    gen = torch.Generator().manual_seed(8)
    q, x = torch.randn(200, 33, generator=gen), torch.randn(10_000, 33, generator=gen)
    want = _int8(int8, q, x, 10_000, 20)
    got = _both_pass1s(q, x, 10_000, 20)
    assert torch.equal(got[1], want[1]) and torch.equal(got[0], want[0])


@pytest.mark.parametrize("build", list(INT8_BUILDS))
@settings(max_examples=40, deadline=None)
@given(
    rows=st.integers(ROWS, 100), L=st.integers(0, 3_000), k=st.integers(1, 70), d=st.sampled_from([1, 2, 3, 4, 5, 16, 17, 33]),
    kind=st.sampled_from(["normal", "near_ties", "integers", "zero_keys", "folded_position", "mixed_scales"]),
    seed=st.integers(0, 2**16),
)
def test_property_int8_pass1(build, rows, L, k, d, kind, seed):
    gen = torch.Generator().manual_seed(seed)
    q, x = (_adversarial if kind in ("normal", "near_ties", "integers") else _int8_case)(kind, L, gen, rows=rows, d=d)
    scores, idx = _int8(INT8_BUILDS[build], q, x, L, k)
    if kind == "integers" and d in (1, 4, 16):   # exact scale 1/sqrt(d): exact scores
        ref_scores, ref_idx = topk_reference(q, x, L, k)
        assert torch.equal(idx, ref_idx) and torch.equal(scores, ref_scores)
    elif kind != "mixed_scales":   # as above: only the fp32 kernel's result, bit for bit
        # integers with an inexact scale 1/sqrt(d): exact ties become rounding artefacts of each summation order
        assert_same_topk(q, x, L, k, None, scores, idx, near_ties=kind in ("near_ties", "integers"))

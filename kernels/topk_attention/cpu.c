/* Fused top-k attention search on CPU: score and select without writing the score matrix.

   Rows r = 0..R-1 each hold a scaled fp32 query q[r, 0..d) (the caller applies the segment scales)
   and a history of n[r] fp32 keys. Serving layout: every row shares one history (key_row_stride 0,
   one length). Training layout: row r's history starts key_row_stride floats after row r-1's.

   The history is transposed block by block into T[b][j][lane] (block b = events 64 b .. 64 b + 63), so
   that consecutive events share a vector and a block's d rows are one contiguous read. Pass 1: a tile
   of blocks is transposed and, while it sits in L1, every row scores it in vector accumulators (16 lanes
   with AVX-512, two rows x a block of 64 events at a time; with AVX2 8 lanes, three rows x half a block;
   else 8 lanes, one row x a block), keeping only each block's maximum (no score-dependent branch). The
   k-th largest block maximum tau bounds the k-th best score from below, so pass 2 rescores only the
   blocks whose maximum reaches tau (about k per row) and appends their events scoring >= tau to the row's
   candidates, which are ranked once at the end (score desc, index asc: ties go to the lower index, as in
   the reference). (A single pass with a running threshold does ~k (1 + ln(L / k)) list inserts per row,
   each with mispredicted branches: measured 1.5x slower at L = 10k, C = 200, d = 16, k = 20.) Pass 1
   also keeps the maxima of each block's four 16-event sub-blocks, and pass 2 rescores only those that
   reach tau. Without AVX-512 pass 1 keeps only those: tau is the k-th largest sub-block maximum (k
   sub-blocks hold an event scoring >= it, so the same argument holds with a higher bound).
   With few rows per history (2 R (k + 1) < blocks) T is not kept: pass 1 transposes tile by tile into
   an L1 buffer and pass 2 transposes again the few sub-blocks it visits (writing T cost more than the
   search there: 25.6 MB at L = 100k, d = 64).

   Threads (torch's OpenMP team, see topk_search): with one shared history the workers split its blocks for pass 1
   (each transposes only its part; all rows score it), meet at a barrier, then split the rows for
   pass 2, which visits (block, row) pairs block by block; both in chunks the workers take in turn (run_part).
   With one history per row they split the rows.

   Score of an event: sum over j of q[j] * x[j], accumulated in fp32 in order j = 0..d-1 (fused
   multiply-add where the target has it), the same chain in both passes, both layouts and every vector
   width.
   Non-finite scores are ruled out up front instead of tested per event: a row is flagged bad[r] = 1
   (the caller recomputes it with the reference) when its query or the history holds a NaN or inf, or
   when d * max|q| * max|x| could overflow fp32.

   Pass 1 in bf16 (targets with AVX512_BF16, serving layout, R >= LOWP_MIN_ROWS, d <= LOWP_MAX_D; see
   pass1_lowp): each block's events are converted once to bf16 pairs (dims 2i, 2i + 1 in 32 bits, d padded
   to even with a zero column) and scored against all rows with vdpbf16ps (two multiply-adds per lane and
   instruction: half the instructions of the fp32 pass), keeping each 16-event sub-block's maximum. T is not
   written: pass 2 transposes the sub-blocks it rescores. Those approximate scores a(x) only prune:
   pass 2 rescores in fp32 with the chain above, so the result is the fp32 pass's, bit for bit, provided
   the pruning never drops an event of the top k. Proof:
     Notation: w = 2^-23 (one fp32 ulp, relative: covers round-to-nearest and any faithful rounding), v = 2^-8
     (bf16 unit roundoff), lam = 2^-126 (smallest normal fp32), D = d rounded up to even, g_n = n w / (1 - n w).
     For query q (fp32) and an event x of block b: P = sum_j |q_j||x_j|, X_bj = max over the block's events
     of |x_j|, so P <= S_b = sum_j |q_j| X_bj and sum_j |x_j| <= sum_j X_bj.
     (a) bf16 rounding (vcvtne*: RNE; denormal inputs may become 0; inputs are first clamped to +-BF16_MAX,
         which moves a value by < 2^-8 of itself): bq = bf(q) has |bq - q| <= v|q| + lam and
         |bq| <= (1 + v)|q| + lam, the same for x. So sum_j |bq_j bx_j - q_j x_j|
         <= (2v + v^2) P + 1.01 lam (sum |q_j| + sum |x_j|) (dropping terms of order lam^2 and v lam).
     (b) vdpbf16ps: the products of bf16 values are exact in fp32 unless they flush to 0 (< lam each); the
         D products are summed in fp32 in some order, each addition within one ulp or flushed (< lam): the
         result a is within g_D (1 + v)^2 P + 1.01 (2 D lam + lam (sum |q_j| + sum |x_j|) v) of sum_j bq_j bx_j.
     (c) the fp32 chain s (pass 2) is within g_2d P + 1.01 (2 d lam + lam (sum |q_j| + sum |x_j|)) of
         q.x (2d roundings without fused multiply-add; denormal inputs or results may flush if MXCSR says).
     So |a - s| <= c_rel S_b + 2.01 lam (sum_j |q_j| + sum_j X_bj) + 4.1 (d + 1) lam, with
     c_rel = 2v + v^2 + g_D (1 + v)^2 + g_2d (~2^-7). With rho = 2^-117 (c_rel rho >= 2.01 lam):
       |a - s| <= eps_b := c_rel sum_j (|q_j| + rho)(X_bj + rho) + 8 (d + 2) lam.
     eps_b is evaluated in fp32 (pass 2, 16 blocks per vector) as fma(E, C_EPS, A_EPS) with E = sum_j
     fl(|q_j| + rho) * fl(X_bj + rho), C_EPS = c_rel (1 + 2^-10) rounded up and A_EPS = 8 (d + 2) lam: the
     at most d + 6 roundings on these nonnegative terms lose a factor >= (1 - w)^(d + 6) >= 1 - 2^-12
     (d <= 2048) plus < 2 (d + 2) lam of flushes, so the computed eps_b exceeds the bound by at least
     2^-11 c_rel E + lam ~ 2^-18 E, more than the rounding of U = fl(m + eps_b) and W = fl(m - eps_b)
     (< w (|m| + eps_b) + lam with |m| <= 1.01 E): U >= m + |a - s| and W <= m - |a - s|.
     Here m is a sub-block's largest a over its events, with its block's eps_b (U and W per sub-block).
   Pruning: W <= s(e) for the event e attaining m, so k distinct sub-blocks hold an event scoring >=
   tau = the k-th largest W: the k-th best fp32 score is >= tau. An event e of the top k has s(e) >= tau,
   and its sub-block has U >= m + eps_b >= a(e) + eps_b >= s(e) >= tau: pass 2 (which takes U in place of
   the fp32 pass's maxima, and keeps the events with s >= tau) rescores it and keeps it. The same holds
   for the thresholds keep_best raises later (U bounds every fp32 score of its sub-block), so U replaces
   the maxima even when tau starts at -inf (no more than k sub-blocks). Non-finite
   inputs flag their rows as before; in a row not flagged d max|q| max|x| < FLT_MAX / 2, so neither a
   nor eps overflows.

   Pass 1 in int8 (targets with AVX512_VNNI, serving layout, R >= INT8_MIN_ROWS, L >= INT8_MIN_LEN, d <= INT8_MAX_D;
   see pass1_int8; before bf16 where both exist): bf16's layout (rows in the lanes, an event broadcast), four dims per 32-bit word,
   vpdpbusd (four u8 x s8 multiply-adds per lane and instruction: at d = 33, 9 instructions and an integer maximum
   per event and 16 rows where bf16 takes 17 and a maximum). Quantization, exactly:
     Column scales g_j = 2^e_j, e_j in [-8, 8] (int8_setup: ~log2 sqrt(max_r |q_rj| / max |x_j|) over a sample of
     the keys; any powers of two keep the bound below, these keep one column, such as DARE's folded position, 100x
     smaller in the keys than in the queries, from setting the scales). Row r: M = max_j |q_j| / g_j (exact),
     inv_s = fl(127 / M), 2^40 where M < 127 2^-40, p_j = inv_s / g_j (exact), q~_j = RNE(fl(q_j p_j)) in
     [-127, 127] (q_j p_j <= 127 (1 + w)^2 < 127.5). Block b: K = max over its events and j of |x_j| g_j (exact),
     inv_t = fl(127 / K) (2^40 below 127 2^-40), h_j = g_j inv_t (exact), k~_j = RNE(fl(x_j h_j)) in [-127, 127],
     stored k~ + 128 as u8 (dims past d: 0); the accumulators start at -128 sum_j q~_j, so the int32 result is
     P = sum_j q~_j k~_j exactly (|P| <= 127^2 D < 2^24 with D = d rounded up to 4, d <= INT8_MAX_D: exact in fp32
     too). A row with M > 2^47 or a block with K > 2^47 (or not finite) is not quantized: its sub-blocks get
     U = inf, W = -inf (rescored in full, never a threshold), so below M, K <= 2^47 and 2^-40 <= s, t <= 2^40.
     Residuals: q_j p_j = q~_j + a_j, x_j h_j = k~_j + b_j with |a_j|, |b_j| <= alpha = 1/2 + 2^-16 (the
     rounding to integer, one fp32 rounding < 2^-17, and a denormal input or product flushed to 0: < 2^-78).
     Since p_j h_j = inv_s inv_t for every j, with sigma = 1 / (inv_s inv_t):
       q.x = sigma sum_j (q~_j + a_j)(k~_j + b_j), so |q.x - sigma P| <= sigma (alpha (K1 + Q1) + d alpha^2)
     with K1 = ||k~||_1 (the event's) and Q1 = ||q~||_1 (the row's). The fp32 chain s (pass 2) is within
     g_2d P' + A of q.x (bf16's (c)), P' = sum_j |q_j x_j| <= sigma (127 + alpha)(K1 + alpha d), and
     A = 1.01 (2 d lam + lam (sum |q_j| + sum |x_j|)) < sigma (|q_j| <= 127.5 g_j s <= 2^15 s, the same for x,
     s, t >= 2^-40, sigma >= 2^-80). So |s - sigma P| <= sigma E with
       E = K1 c_k + e_r,  c_k = alpha + g_2d (127 + alpha),  e_r = alpha Q1 + d alpha^2 + g_2d (127 + alpha) alpha d + 1
     (c_k >= its value; K1 is the sub-block's largest, an upper bound for each of its events). For a sub-block
     with m its largest P, |m| <= 127 Q1 and K1 <= 127 d, so |m| + E <= Z = 127 Q1 + 127 d c_k + e_r; the row's
     constant e2_r = e_r + 2^-18 Z is rounded up to fp32 (erow) and int8_bounds evaluates c = fl(s_r t_b)
     (s_r = fl(1 / inv_s), t_b = fl(1 / inv_t): c = sigma (1 + th), |th| <= 3.01 w, w = 2^-23 as above: any
     faithful rounding), E2 = fl(fma(K1, c_k, e2_r)) >= E + 2^-18 Z (1 - 2^-5 - 2^-22), U = fl(c fl(m + E2)),
     W = fl(c fl(m - E2)). The slack E2 - E >= 0.96 2^-18 Z = 30.7 w Z exceeds what the roundings of the sum, c and
     the product take, 5.1 w (|m| + E2) <= 5.2 w Z (a product flushed or rounded below 2^-126 is off by < 2^-126, far
     below sigma w Z >= 2^-103), so U >= sigma (m + E) and W <= sigma (m - E). These are bf16's U and W: the pruning
     argument above holds word for word (an empty sub-block has m = -inf: U = W = -inf). Non-finite inputs flag
     their rows as in the fp32 pass: whatever pass 1 made of them is discarded.
   With AMX-INT8 (INT8_AMX, d <= 64, and the kernel granting the process the tile state) the same P are computed
   by tile multiplies instead of vpdpbusd (int8_rows_amx): a tile of a sub-block's 16 events x D key bytes (u8) times
   a tile of D / 4 query words x 16 rows (s8) is 16 x 16 exact int32 dots, stored and reduced over the events with
   vpmaxsd, -128 sum_j q~_j added after the maximum (the same integer). So S is vpdpbusd's to the bit and everything
   after it is unchanged.

   Pass 1 in int8 on AVX2 targets without AVX-512 (INT8_AVX2; serving layout, R >= INT8_MIN_ROWS, L >= INT8_MIN_LEN,
   d <= INT8_MAX_D; the second pass1_int8, 8 rows per vector): the quantization and bounds above, with vpmaddubsw +
   vpmaddwd in place of vpdpbusd. vpmaddubsw adds each two u8 x s8 products to int16 WITH SATURATION, which would make P
   inexact, so the queries are quantized to QMAX = 63 in place of 127 (the keys as above):
     inv_s = fl(63 / M) (2^40 where M < 63 2^-40), so q_j p_j <= 63 (1 + w)^2 < 63.5 and q~_j in [-63, 63]. With keys
     stored k~ + 128 in [1, 255], a pair is at most 2 * 255 * 63 = 32130 < 32767 in size: none saturates. vpmaddwd by
     ones adds a lane's two pairs to int32 and vpaddd accumulates them from -128 sum_j q~_j; every partial sum is at
     most (128 + 255) 63 D < 2^31 in size (D <= 1024), so the result is P = sum_j q~_j k~_j exactly, |P| <= 63 * 127 D
     < 2^24 (exact in fp32). Every step above that bounds |q~| by 127 takes QMAX = 63: P' <= sigma (63 + alpha)(K1 +
     alpha d), so c_k = alpha + g_2d (63 + alpha) and e_r = alpha Q1 + d alpha^2 + g_2d (63 + alpha) alpha d + 1;
     |q_j| <= 63.5 g_j s <= 2^14 s; s = fl(1 / inv_s) lies in [2^-40, 2^47 / 63 < 2^41], so s, t >= 2^-40, sigma >=
     2^-80 and A < sigma as before. The steps that use |k~| <= 127 (|m| <= 127 Q1, K1 <= 127 d: Z = 127 Q1 + 127 d c_k
     + e_r) and the slack (relative to Z: 30.7 w Z against 5.2 w Z, whatever QMAX) are unchanged: U >= sigma (m + E),
     W <= sigma (m - E), and the pruning argument holds (the threshold is sub_threshold's k-th largest W).
   Keys at 7 bits (|k~| <= 63, stored + 64) with queries at 127 keep the pairs below 2^15 too, but the keys' scale is
   set by a whole block's largest value, so their rounding weighs more: more sub-blocks pass the bound (C = 200, L =
   10k, one thread: 63.7 per row at d = 33 and 158.9 at d = 64, against 61.2 and 131.0 with queries at 63; the fp32
   pass rescores 20). Signed keys with the sign moved onto the query (vpsignb, both at 127: 43.7 per row at d = 33)
   take a fourth instruction per multiply-add step: pass 1 took 18.4 ms against 15.4 at L = 100k. int16 keys and
   queries with vpmaddwd alone (no offset, nothing to saturate; 600 levels each, |P| < 2^24 up to d = 46) pass 24 per
   row at d = 33, but take twice the broadcasts and adds per multiply-add: one thread, C = 200, d = 33, ms int8 /
   int16 / fp32: L = 10k 1.94 / 1.83 / 2.04, L = 100k 15.2 / 17.1 / 19.3 (not kept; where it would pay is below
   INT8_MIN_LEN). */

#define _POSIX_C_SOURCE 200112L
#include <float.h>
#include <math.h>
#include <omp.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include "../team.h"
#ifdef __AVX__
#include <immintrin.h>
#endif

#define SUB 64        /* events per block: scored in one step, their accumulators in registers */
#define MAX_THREADS 64

typedef float v8 __attribute__((vector_size(32)));
typedef int32_t v8i __attribute__((vector_size(32)));

/* Scoring vectors: 16 lanes where the target has AVX-512 (twice the multiply-adds per instruction;
   32 registers), else 8. The block layout and each score's arithmetic do not depend on the width. */
#ifdef __AVX512F__
#define VW 16
typedef float vf __attribute__((vector_size(64)));
typedef int32_t vfi __attribute__((vector_size(64)));
#else
#define VW 8
typedef v8 vf;
typedef v8i vfi;
#endif
#define NV (SUB / VW)  /* scoring vectors per block */
/* Pass 1 keeps the maximum of each of a block's NS sub-blocks (S), pass 2 rescores only the sub-blocks that
   can still hold a top-k event (about k + 1 per row instead of k whole blocks) */
#define NS 4
#define SUBW (SUB / NS)  /* events per sub-block: one AVX-512 vector, two of 8 lanes */
#define SV (SUBW / VW)   /* scoring vectors per sub-block */

typedef struct {
    const float *q;          /* [R, d] */
    const float *keys;       /* row 0's history */
    int64_t key_row_stride;  /* floats between two rows' histories; 0: shared */
    int64_t stride_l, stride_d;
    const int64_t *n;        /* [R] lengths, clipped to [0, L]; one length when the history is shared */
    int R, d, k;
    float *out_s;            /* [R, k] best first; -inf past the kept count */
    int64_t *out_i;          /* [R, k]; -1 past the kept count */
    uint8_t *bad;            /* [R] */
    int n_threads;           /* workers taking part (fixed before any starts work) */
    float *T;                /* shared history: [nb][d][SUB] blocked transpose */
    float *M;                /* shared history: [R][nbp] block maxima */
    float *S;                /* shared history: [R][nbp][NS] sub-block maxima */
    float *tau;              /* shared history: [R] pass-2 thresholds */
    int32_t *pairs;          /* shared history: [R][nbp] pass-2 (block, row) pairs, a row range per worker */
    float *cs;               /* shared history: [R][cap] pass-2 candidate scores */
    int32_t *ci;             /* shared history: [R][cap] their indices */
    int32_t *cnt;            /* shared history: [R] candidates per row */
    int cap;                 /* candidates a row holds: see pass2 */
    int64_t sel;             /* per-worker selection scratch, floats: kth_floats of the larger of nbp and cap */
    int64_t nbp;             /* blocks of the longest history, padded to a multiple of 8 */
    int keep_T;              /* shared history: T holds the whole history (else pass 2 transposes again) */
    int64_t tile_floats;     /* per worker: a tile of transposed blocks when T is not kept */
    char *ws;                /* per-worker scratch, ws_stride bytes each */
    size_t ws_stride;
    int lowp;                /* pass 1's bits, 16 (bf16, pass1_lowp) or 8 (int8, pass1_int8), else 0: the fields below are set */
    int64_t Rp;              /* lowp: R rounded up to 16 */
    const uint32_t *qt;      /* lowp: [dh][Rp] the rows' queries as bf16 pairs (dims 2i, 2i + 1) */
    float *X;                /* lowp: [d][nbp] per block, fl(max over its events of |x_j| + RHO) */
    float c_eps, a_eps;      /* lowp: eps_b = fl(c_eps sum_j fl(|q_j| + RHO) X[j][b] + a_eps) */
    int32_t *qbias;          /* int8: [Rp] -128 sum_j q~_rj (qt holds the s8 query quads [D4][Rp]; X [nbp] t_b, [nbp][NV] K1) */
    float *srow, *erow;      /* int8: [R] s_r (inf: row not quantized) and e2_r */
    float *gcol;             /* int8: [d] column scales g_j (powers of two) */
    float c_k;               /* int8: E2 = fl(K1 c_k + e2_r) (the header) */
    int amx;                 /* int8: pass 1's dots by AMX tiles (int8_rows_amx) */
    float xmax[MAX_THREADS]; /* per worker: max |key| of its part, and whether it was finite */
    int x_ok[MAX_THREADS];
    int64_t next_tile;       /* shared history: the first tile of pass 1's next chunk (workers take chunks in turn) */
    int next_row;            /* shared history: the first row of pass 2's next chunk */
    int64_t done_tiles;      /* shared history: pass 1's tiles finished (pass 2 starts when all are) */
    int done_rows;           /* shared history: pass 2's rows finished (the call returns when all are) */
    int chunks[MAX_THREADS]; /* shared history: chunks of either pass each worker took */
} call_t;

static inline uint32_t mask8(v8i a) {   /* lane e of a comparison -> bit e */
#ifdef __AVX__
    return (uint32_t)_mm256_movemask_ps((__m256)a);
#else
    uint32_t m = 0;
    for (int t = 0; t < 8; t++) m |= (a[t] ? 1u : 0u) << t;
    return m;
#endif
}

static inline v8 vmax(v8 a, v8 b) {   /* NaN never reaches here: such rows are flagged and redone */
#ifdef __AVX__
    return (v8)_mm256_max_ps((__m256)a, (__m256)b);
#else
    v8i gt = a > b;
    return (v8)(((v8i)a & gt) | ((v8i)b & ~gt));
#endif
}

/* Lanes of a scoring vector that are >= t and above -inf (masked events) -> bits. */
static inline uint32_t lanes_ge(vf a, vf t) {
#ifdef __AVX512F__
    return _mm512_cmp_ps_mask((__m512)a, (__m512)t, _CMP_GE_OQ) &
           _mm512_cmp_ps_mask((__m512)a, _mm512_set1_ps(-INFINITY), _CMP_GT_OQ);
#else
    return mask8((a >= t) & (a > -INFINITY));
#endif
}

static inline float hmax(v8 a) {
#ifdef __AVX__
    __m128 m = _mm_max_ps(_mm256_castps256_ps128((__m256)a), _mm256_extractf128_ps((__m256)a, 1));
    m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    m = _mm_max_ss(m, _mm_shuffle_ps(m, m, 1));
    return _mm_cvtss_f32(m);
#else
    float b = a[0];
    for (int t = 1; t < 8; t++) b = a[t] > b ? a[t] : b;
    return b;
#endif
}

#ifdef __AVX512F__
/* Maxima of a block's NV = 4 scoring vectors (its 16-event sub-blocks) -> sub[0..3], and their maximum,
   the block's, returned: shuffles that reduce the four vectors together (as many instructions as
   one block-wide reduction took). Pass 2 then rescores only the sub-blocks that can still hold a top-k
   event (a quarter of the work at L = 10k, C = 200, d = 16). */
static inline float sub_maxima(const vf a[NV], float sub[NS]) {
    const __m512 a0 = (__m512)a[0], a1 = (__m512)a[1], a2 = (__m512)a[2], a3 = (__m512)a[3];
    const __m512 ab = _mm512_max_ps(_mm512_shuffle_f32x4(a0, a1, 0x44), _mm512_shuffle_f32x4(a0, a1, 0xEE));
    const __m512 cd = _mm512_max_ps(_mm512_shuffle_f32x4(a2, a3, 0x44), _mm512_shuffle_f32x4(a2, a3, 0xEE));
    __m512 x = _mm512_max_ps(_mm512_shuffle_f32x4(ab, cd, 0x88), _mm512_shuffle_f32x4(ab, cd, 0xDD));
    x = _mm512_max_ps(x, _mm512_permute_ps(x, 0x4E));   /* 128-bit chunk v: vector v's maximum in every lane */
    x = _mm512_max_ps(x, _mm512_permute_ps(x, 0xB1));
    const __m128 m = _mm512_castps512_ps128(_mm512_permutexvar_ps(_mm512_setr_epi32(0, 4, 8, 12, 0, 4, 8, 12, 0, 4, 8, 12, 0, 4, 8, 12), x));
    _mm_storeu_ps(sub, m);
    __m128 y = _mm_max_ps(m, _mm_movehl_ps(m, m));
    y = _mm_max_ss(y, _mm_shuffle_ps(y, y, 1));
    return _mm_cvtss_f32(y);
}
/* AVX-512 also keeps each block's maximum (M): tau is the k-th largest of those, as measured on Zen 4/5 and
   the Xeon. Elsewhere tau is the k-th largest sub-block maximum (sub_threshold): a higher bound, fewer blocks
   and candidates in pass 2. */
#define KEEP_M 1
#else
/* Maxima of a block's four sub-blocks from p[s], the lane-wise maximum of sub-block s's two scoring vectors,
   -> sub[0..3]: the four reduced together (with AVX 11 instructions, 15 with the 4 maxima that make p, where
   the one block-wide maximum took 13). */
static inline void sub_maxima_of_pairs(const vf p[NS], float sub[NS]) {
#ifdef __AVX__
    const __m256 p0 = (__m256)p[0], p1 = (__m256)p[1], p2 = (__m256)p[2], p3 = (__m256)p[3];
    const __m256 t01 = _mm256_max_ps(_mm256_unpacklo_ps(p0, p1), _mm256_unpackhi_ps(p0, p1));
    const __m256 t23 = _mm256_max_ps(_mm256_unpacklo_ps(p2, p3), _mm256_unpackhi_ps(p2, p3));
    /* 128-bit half h: lane s = sub-block s's maximum over that half's lanes */
    const __m256 u = _mm256_max_ps(_mm256_shuffle_ps(t01, t23, 0x44), _mm256_shuffle_ps(t01, t23, 0xEE));
    _mm_storeu_ps(sub, _mm_max_ps(_mm256_castps256_ps128(u), _mm256_extractf128_ps(u, 1)));
#else
    for (int s = 0; s < NS; s++) sub[s] = hmax(p[s]);
#endif
}

/* Maxima of a block's NV = 8 scoring vectors, two per 16-event sub-block -> sub[0..3]. */
static inline void sub_maxima(const vf a[NV], float sub[NS]) {
    const vf p[NS] = {vmax(a[0], a[1]), vmax(a[2], a[3]), vmax(a[4], a[5]), vmax(a[6], a[7])};
    sub_maxima_of_pairs(p, sub);
}
#define KEEP_M 0
#endif

#if defined(__AVX512BF16__) && defined(__AVX512F__)
#define LOWP 1                 /* this target can run pass 1 in bf16 (see the header) */
#else
#define LOWP 0
#endif
#define LOWP_MIN_ROWS 16       /* fewer rows per history: converting each block costs more than it saves (L = 100k,
                                  d = 33, one thread: C = 8 1.7 against 1.1 ms; C = 16 1.8 against 2.0; C = 32 3.1
                                  against 3.7; L = 10k, C = 16 even) */
#define LOWP_MAX_D 2048        /* the fp32 evaluation of eps_b is proven for d <= 2048 (see the header) */
#define RHO 0x1p-117f          /* added to |q_j| and X_bj so that c_rel RHO covers the denormal terms */
#define BF16_MAX 0x1.fep127f   /* largest finite bf16: larger values are clamped, not rounded to inf */
#if defined(__AVX512VNNI__) && defined(__AVX512BW__) && defined(__AVX512F__)
#define INT8_VNNI 1            /* this target can run pass 1 in int8 with vpdpbusd (see the header), before bf16 */
#else
#define INT8_VNNI 0
#endif
/* AMX-INT8 (Sapphire Rapids and later Xeons): pass 1's int8 dots by tile multiplies where d <= 64 (one tile's depth);
   -DINT8_AMX=0 (or -mno-amx-int8) keeps vpdpbusd. */
#ifndef INT8_AMX
#if INT8_VNNI && defined(__AMX_INT8__) && defined(__AMX_TILE__)
#define INT8_AMX 1
#else
#define INT8_AMX 0
#endif
#endif
#define AMX_MAX_D 64
/* AVX2 without AVX-512: pass 1 in int8 with vpmaddubsw + vpmaddwd (see the header), queries within +-63. Where
   AVX-512 is there without VNNI (Skylake-X) the fp32 pass stays: its 512-bit FMAs (two a cycle on the Xeons with
   two FMA units) already do the 32 multiply-adds a cycle that 256-bit vpmaddubsw does. -DINT8_AVX2=0 turns it off
   (the fp32-pass1 builds of the tests and benchmarks). */
#ifndef INT8_AVX2
#if defined(__AVX2__) && defined(__FMA__) && !defined(__AVX512F__)
#define INT8_AVX2 1
#else
#define INT8_AVX2 0
#endif
#endif
#if INT8_AVX2 && (INT8_VNNI || !defined(__AVX2__))
#error "INT8_AVX2 is for AVX2 targets without AVX-512"
#endif
#define INT8 (INT8_VNNI || INT8_AVX2)
#define QMAX (INT8_VNNI ? 127 : 63)   /* |q~| bound: vpmaddubsw's int16 pair sums 2 * 255 * 63 < 2^15 do not saturate */
#define INT8_MAX_D 1024        /* exact dots in fp32: 127^2 D < 2^24 (D = d rounded up to 4) */
/* Fewer rows: converting a block (two passes over its keys, a sum of |k~| per event) costs more than the halved
   multiply-adds save. With bf16 beside it (Zen 4, one thread, ms int8 / bf16): C = 32 L = 10k d = 33 0.32 / 0.30,
   L = 100k 2.7 / 3.0; C = 48 0.37 / 0.32 and 2.9 / 3.2; C = 64 0.43 / 0.40 and 3.5 / 4.4; C = 200 0.97 / 1.09 and
   8.7 / 11.4. Against fp32 (a target with VNNI but no bf16): C = 16 0.24 / 0.19 and 1.9 / 2.1, C = 32 0.32 / 0.39
   and 2.7 / 3.5 (ms int8 / fp32). */
/* AVX2 (Zen 3, one thread, ms int8 / fp32; d = 16 / 33 / 64): the looser bound (queries at 63) sends 3 to 6 times
   the fp32 pass's sub-blocks to pass 2 (C = 200, L = 10k: 40 / 61 / 131 per row against 20), which fewer rows
   do not pay back: C = 64 L = 20k 0.71 / 0.64, 1.36 / 1.25, 2.28 / 2.42, L = 100k 2.98 / 3.52, 6.11 / 7.14, 12.2 /
   15.1; C = 128 L = 20k 1.19 / 1.22, 2.15 / 2.27, 3.96 / 4.97; C = 32 L = 100k d = 33 4.03 / 3.75. Tests build
   with 16 to run it on fewer rows too. */
#ifndef INT8_MIN_ROWS
#define INT8_MIN_ROWS (INT8_AVX2 ? 128 : LOWP ? 64 : 32)
#endif
/* Shorter histories, with bf16 beside: pass 2 (more sub-blocks pass the int8 bound: ~48 per row at L = 100k,
   d = 33 where bf16 passes ~34) outweighs pass 1 (C = 200, one thread, ms int8 / bf16: L = 1k d = 33 0.45 / 0.42,
   d = 64 0.60 / 0.52; L = 2k 0.40 / 0.42 and 0.78 / 0.73; L = 4k 0.57 / 0.63 and 1.09 / 1.07; L = 8k 0.87 / 1.01
   and 1.65 / 1.78). AVX2 against fp32 (C = 200, d = 16 / 33 / 64, ms int8 / fp32): L = 1k d = 33 0.53 / 0.42;
   L = 4k 1.01 / 0.87; L = 10k 1.01 / 1.03, 1.82 / 1.85, 3.53 / 3.50; L = 20k 1.79 / 1.87, 3.09 / 3.59, 6.61 / 7.15;
   L = 100k 7.34 / 9.96, 13.7 / 17.8, 24.5 / 34.3. Tests build with 0 to run the int8 pass on short histories too. */
#ifndef INT8_MIN_LEN
#define INT8_MIN_LEN (INT8_AVX2 ? 16384 : LOWP ? 4096 : 0)
#endif

/* Blocks transposed and scored at once: their d * SUB floats each stay within 16 KB of L1. */
static inline int tile_blocks(int d) {
    int t = 4096 / SUB / (d > 0 ? d : 1);
    return t < 1 ? 1 : t;
}

#ifdef __AVX__
/* out[j * ld_out + e] = in[e * ld_in + j] for e, j < 8: eight unaligned loads, 24 shuffles, eight stores. */
static inline void transpose8(const float *in, int64_t ld_in, float *out, int64_t ld_out) {
    __m256 r0 = _mm256_loadu_ps(in), r1 = _mm256_loadu_ps(in + ld_in), r2 = _mm256_loadu_ps(in + 2 * ld_in),
           r3 = _mm256_loadu_ps(in + 3 * ld_in), r4 = _mm256_loadu_ps(in + 4 * ld_in),
           r5 = _mm256_loadu_ps(in + 5 * ld_in), r6 = _mm256_loadu_ps(in + 6 * ld_in),
           r7 = _mm256_loadu_ps(in + 7 * ld_in);
    __m256 t0 = _mm256_unpacklo_ps(r0, r1), t1 = _mm256_unpackhi_ps(r0, r1), t2 = _mm256_unpacklo_ps(r2, r3),
           t3 = _mm256_unpackhi_ps(r2, r3), t4 = _mm256_unpacklo_ps(r4, r5), t5 = _mm256_unpackhi_ps(r4, r5),
           t6 = _mm256_unpacklo_ps(r6, r7), t7 = _mm256_unpackhi_ps(r6, r7);
    __m256 u0 = _mm256_shuffle_ps(t0, t2, 0x44), u1 = _mm256_shuffle_ps(t0, t2, 0xEE),
           u2 = _mm256_shuffle_ps(t1, t3, 0x44), u3 = _mm256_shuffle_ps(t1, t3, 0xEE),
           u4 = _mm256_shuffle_ps(t4, t6, 0x44), u5 = _mm256_shuffle_ps(t4, t6, 0xEE),
           u6 = _mm256_shuffle_ps(t5, t7, 0x44), u7 = _mm256_shuffle_ps(t5, t7, 0xEE);
    _mm256_storeu_ps(out, _mm256_permute2f128_ps(u0, u4, 0x20));
    _mm256_storeu_ps(out + ld_out, _mm256_permute2f128_ps(u1, u5, 0x20));
    _mm256_storeu_ps(out + 2 * ld_out, _mm256_permute2f128_ps(u2, u6, 0x20));
    _mm256_storeu_ps(out + 3 * ld_out, _mm256_permute2f128_ps(u3, u7, 0x20));
    _mm256_storeu_ps(out + 4 * ld_out, _mm256_permute2f128_ps(u0, u4, 0x31));
    _mm256_storeu_ps(out + 5 * ld_out, _mm256_permute2f128_ps(u1, u5, 0x31));
    _mm256_storeu_ps(out + 6 * ld_out, _mm256_permute2f128_ps(u2, u6, 0x31));
    _mm256_storeu_ps(out + 7 * ld_out, _mm256_permute2f128_ps(u3, u7, 0x31));
}
#endif

/* Transpose blocks b0 .. b1 of `keys` (n events) into the blocked layout T[b - b0][j][lane] (event
   b * SUB + lane), zeros past n, and fold them into the finiteness check (NaN once any key is NaN or
   inf) and max |key|. A block's d rows are contiguous, so a block is one 4 KB read in either pass. */
static void load_blocks(const call_t *c, const float *keys, int64_t n, int64_t b0, int64_t b1, float *T,
                        v8 *check, v8 *amax) {
    const int d = c->d;
    for (int64_t b = b0; b < b1; b++) {
        float *Tb = T + (b - b0) * d * SUB;
        int64_t e1 = n - b * SUB < SUB ? n - b * SUB : SUB;
        int64_t e = 0;
#ifdef __AVX__
        if (c->stride_d == 1 && d >= 8)   /* 8 events x 8 dims at a time, transposed in registers */
            for (; e + 8 <= e1; e += 8) {
                const float *x = keys + (b * SUB + e) * c->stride_l;
                int j = 0;
                for (; j + 8 <= d; j += 8) transpose8(x + j, c->stride_l, Tb + j * SUB + e, SUB);
                for (; j < d; j++)   /* d not a multiple of 8 (DARE's 33): the last dims one by one */
                    for (int t = 0; t < 8; t++) Tb[j * SUB + e + t] = x[t * c->stride_l + j];
            }
#endif
        for (; e < e1; e++) {
            const float *x = keys + (b * SUB + e) * c->stride_l;
            if (c->stride_d == 1)
                for (int j = 0; j < d; j++) Tb[j * SUB + e] = x[j];
            else
                for (int j = 0; j < d; j++) Tb[j * SUB + e] = x[j * c->stride_d];
        }
        if (e1 < SUB)
            for (int j = 0; j < d; j++) memset(Tb + j * SUB + e1, 0, (size_t)(SUB - e1) * sizeof(float));
        /* four independent chains: one chain of dependent adds took a quarter of the transpose's time */
        v8 ck[4] = {*check, {0}, {0}, {0}}, am[4] = {*amax, {0}, {0}, {0}};
        for (int t = 0; t < d * SUB; t += 32)   /* d * SUB is a multiple of 64 */
            for (int u = 0; u < 4; u++) {
                v8 x;
                memcpy(&x, Tb + t + 8 * u, sizeof x);
                ck[u] += x * 0.0f;
                am[u] = vmax(am[u], (v8)((v8i)x & 0x7fffffff));
            }
        *check = (ck[0] + ck[1]) + (ck[2] + ck[3]);
        *amax = vmax(vmax(am[0], am[1]), vmax(am[2], am[3]));
    }
}

/* Scores of block Tb's SUB events for query q: acc[v] lane t = event VW v + t of the block; lanes at or
   past `left` (events left in the history) are -inf. The one place scores are computed, so both
   passes see bit-identical values. */
static inline void score_block(const float *Tb, int64_t left, const float *q, int d, vf acc[NV]) {
    for (int v = 0; v < NV; v++) acc[v] = (vf){0};
    for (int j = 0; j < d; j++) {
        float qj = q[j];
        const float *row = Tb + j * SUB;
        for (int v = 0; v < NV; v++) {
            vf x;
            memcpy(&x, row + VW * v, sizeof x);
            acc[v] += qj * x;
        }
    }
    if (left < SUB) {
        vfi lane;
        for (int t = 0; t < VW; t++) lane[t] = t;
        for (int v = 0; v < NV; v++) {
            vfi keep = (lane + (int32_t)(VW * v)) < (int32_t)left;
            acc[v] = (vf)(((vfi)acc[v] & keep) | ((vfi)((vf){0} - INFINITY) & ~keep));
        }
    }
}

#if !defined(__AVX512F__) && defined(__AVX2__)
/* compress8[mask] lists the set lanes of an 8-bit mask first: a permutation that packs them (AVX2 has no
   compress instruction). Filled when the library loads. */
static int32_t compress8[256][8];
__attribute__((constructor)) static void fill_compress8(void) {
    for (int m = 0; m < 256; m++)
        for (int t = 0, j = 0; t < 8; t++)
            if (m >> t & 1) compress8[m][j++] = t;
}
#endif

/* The pivot of the k-th largest selections below: the median of three of the values. */
static inline float median3(float x, float y, float z) {
    return x > y ? (y > z ? y : (x > z ? z : x)) : (x > z ? x : (y > z ? z : y));
}

/* Scratch floats for the k-th largest block maximum of a row of nbp (padded) maxima. */
static inline int64_t kth_floats(int64_t nbp) { return 2 * (nbp + 16); }

#ifdef __AVX512F__
/* The k-th largest of a[0..m) (0 < k <= m), a left unchanged; buf holds kth_floats(m) floats. Each
   round counts the values above and below a pivot (median of 3) with vector compares, then compresses
   the side holding the answer into the other half of buf: no branch on the data, 16 values per step
   (the scalar partition below took a third of pass 2). */
static float kth_largest_v(const float *a, int m, int k, float *buf) {
    const int half = m + 16;   /* a full-vector store of the compressed lanes may write 15 past the end */
    int want = k - 1;
    for (;;) {
        const float p = median3(a[0], a[m / 2], a[m - 1]);
        const __m512 vp = _mm512_set1_ps(p);
        int above = 0, below = 0;
        for (int i = 0; i < m; i += 16) {
            __mmask16 in = m - i >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (m - i)) - 1u);
            __m512 v = _mm512_maskz_loadu_ps(in, a + i);
            above += __builtin_popcount(_mm512_mask_cmp_ps_mask(in, v, vp, _CMP_GT_OQ));
            below += __builtin_popcount(_mm512_mask_cmp_ps_mask(in, v, vp, _CMP_LT_OQ));
        }
        /* the pivot is one of the values, so each side is smaller than m: the loop ends (a NaN
           pivot counts nothing on either side and is returned; such rows are redone anyway) */
        const int keep_above = want < above;
        if (!keep_above && want < m - below) return p;
        if (!keep_above) want -= m - below;
        float *out = a == buf ? buf + half : buf;
        int j = 0;
        for (int i = 0; i < m; i += 16) {
            __mmask16 in = m - i >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (m - i)) - 1u);
            __m512 v = _mm512_maskz_loadu_ps(in, a + i);
            __mmask16 side = keep_above ? _mm512_mask_cmp_ps_mask(in, v, vp, _CMP_GT_OQ)
                                        : _mm512_mask_cmp_ps_mask(in, v, vp, _CMP_LT_OQ);
            _mm512_storeu_ps(out + j, _mm512_maskz_compress_ps(side, v));
            j += __builtin_popcount(side);
        }
        a = out;
        m = j;
    }
}
#elif defined(__AVX2__)
/* kth_largest_v above in 8 lanes, the compress a permutation (compress8): with the scalar partition below
   the thresholds took 0.107 of pass 2's 0.376 ms on Zen 3 (L = 10k, C = 200, d = 16, one thread; 0.070 with
   this and sub_threshold's filter). */
static float kth_largest_v(const float *a, int m, int k, float *buf) {
    const int half = m + 8;   /* a full-vector store of the compressed lanes may write 7 past the end */
    const __m256i iota = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    int want = k - 1;
    for (;;) {
        const float p = median3(a[0], a[m / 2], a[m - 1]);
        const __m256 vp = _mm256_set1_ps(p);
        int above = 0, below = 0;
        for (int i = 0; i < m; i += 8) {
            const __m256i in = _mm256_cmpgt_epi32(_mm256_set1_epi32(m - i), iota);
            const __m256 v = _mm256_maskload_ps(a + i, in);
            above += __builtin_popcount((unsigned)_mm256_movemask_ps(_mm256_and_ps(_mm256_cmp_ps(v, vp, _CMP_GT_OQ), (__m256)in)));
            below += __builtin_popcount((unsigned)_mm256_movemask_ps(_mm256_and_ps(_mm256_cmp_ps(v, vp, _CMP_LT_OQ), (__m256)in)));
        }
        /* as above: each side is smaller than m, and a NaN pivot is returned */
        const int keep_above = want < above;
        if (!keep_above && want < m - below) return p;
        if (!keep_above) want -= m - below;
        float *out = a == buf ? buf + half : buf;
        int j = 0;
        for (int i = 0; i < m; i += 8) {
            const __m256i in = _mm256_cmpgt_epi32(_mm256_set1_epi32(m - i), iota);
            const __m256 v = _mm256_maskload_ps(a + i, in);
            const __m256 side = keep_above ? _mm256_cmp_ps(v, vp, _CMP_GT_OQ) : _mm256_cmp_ps(v, vp, _CMP_LT_OQ);
            const unsigned lanes = (unsigned)_mm256_movemask_ps(_mm256_and_ps(side, (__m256)in));
            _mm256_storeu_ps(out + j, _mm256_permutevar8x32_ps(v, _mm256_loadu_si256((const __m256i *)compress8[lanes])));
            j += __builtin_popcount(lanes);
        }
        a = out;
        m = j;
    }
}
#else
/* The k-th largest of a[0..m) (0 < k <= m), reordering a. Partitions without data-dependent branches
   (the block maxima are random: a branchy partition mispredicts on every other element). */
static float kth_largest(float *a, int m, int k) {
    int lo = 0, hi = m, want = k - 1;
    while (hi - lo > 16) {
        const float p = median3(a[lo], a[lo + (hi - lo) / 2], a[hi - 1]);
        int j = lo;
        for (int i = lo; i < hi; i++) {   /* [lo, j) > p */
            float t = a[i];
            int c = t > p;
            a[i] = a[j];
            a[j] = t;
            j += c;
        }
        if (want < j) { hi = j; continue; }
        int e = j;
        for (int i = j; i < hi; i++) {    /* [j, e) == p */
            float t = a[i];
            int c = t == p;
            a[i] = a[e];
            a[e] = t;
            e += c;
        }
        if (want < e) return p;
        lo = e;
    }
    for (int i = lo + 1; i < hi; i++) {   /* a few left: insertion sort, descending */
        float t = a[i];
        int j = i - 1;
        while (j >= lo && a[j] < t) { a[j + 1] = a[j]; j--; }
        a[j + 1] = t;
    }
    return a[want];
}
#endif

/* Block maxima of QB rows (queries q, q + d, ...) for block Tb. With 32 vector registers (AVX-512) each
   loaded key vector feeds QB rows' accumulators, so loads no longer bound the multiply-adds. With 16 (AVX2)
   see block_max_rows below. Each score is score_block's multiply-add chain over j, so pass 2 rescoring
   reproduces these values exactly. (With 16 registers, QB = 1 here would hold 8 loaded vectors and 8
   accumulators at once and spill: 6x slower than score_block's load-as-you-go loop.) */
#ifdef __AVX512F__
#define QB 2
static inline void block_max_rows(const float *Tb, int64_t left, const float *q, int d, float out[QB],
                                  float *sub, int64_t sub_stride) {
    vf acc[QB][NV];
    for (int u = 0; u < QB; u++)
        for (int v = 0; v < NV; v++) acc[u][v] = (vf){0};
    for (int j = 0; j < d; j++) {
        const float *row = Tb + j * SUB;
        vf x[NV];
        for (int v = 0; v < NV; v++) memcpy(&x[v], row + VW * v, sizeof x[v]);
        for (int u = 0; u < QB; u++) {
            float qj = q[u * d + j];
            for (int v = 0; v < NV; v++) acc[u][v] += qj * x[v];
        }
    }
    if (left < SUB) {
        vfi lane;
        for (int t = 0; t < VW; t++) lane[t] = t;
        for (int v = 0; v < NV; v++) {
            vfi keep = (lane + (int32_t)(VW * v)) < (int32_t)left;
            for (int u = 0; u < QB; u++)
                acc[u][v] = (vf)(((vfi)acc[u][v] & keep) | ((vfi)((vf){0} - INFINITY) & ~keep));
        }
    }
    for (int u = 0; u < QB; u++) out[u] = sub_maxima(acc[u], sub + u * sub_stride);
}
#else
/* With 16 registers: half a block (4 vectors, 32 events) of QB = 3 rows at a time, 12 accumulators, each
   loaded key vector feeding the three rows. score_block's loop (one row, the whole block) loads a key vector
   per multiply-add plus the query's broadcasts, 9 loads per 8 multiply-adds: Zen 3 takes two 256-bit loads
   a cycle, so loads bounded pass 1 at 80% of the FMA peak there (L = 10k, C = 200, d = 16, one thread: pass 1
   0.79 ms; 2 rows, 6 loads per 8, 0.74 ms; 3 rows, 7 per 12, 0.72 ms). Each half's two sub-blocks are
   reduced to their lane maxima as it ends. */
#define QB 3
static inline void block_max_rows(const float *Tb, int64_t left, const float *q, int d, float *sub, int64_t sub_stride) {
    enum { HV = NV / 2 };   /* vectors per half block */
    vf pm[QB][NS];
    for (int h = 0; h < 2; h++) {
        vf acc[QB][HV];
        for (int u = 0; u < QB; u++)
            for (int v = 0; v < HV; v++) acc[u][v] = (vf){0};
        for (int j = 0; j < d; j++) {
            const float *row = Tb + j * SUB + h * HV * VW;
            float qj[QB];
            for (int u = 0; u < QB; u++) qj[u] = q[u * d + j];
            for (int v = 0; v < HV; v++) {   /* one key vector live at a time: the rows' accumulators fill the rest */
                vf x;
                memcpy(&x, row + VW * v, sizeof x);
#ifdef __AVX__
                __asm__("" : "+x"(x));   /* loaded once into a register: GCC folds it into each row's multiply-add */
#endif
                for (int u = 0; u < QB; u++) acc[u][v] += qj[u] * x;
            }
        }
        if (left < SUB) {
            vfi lane;
            for (int t = 0; t < VW; t++) lane[t] = t;
            for (int v = 0; v < HV; v++) {
                vfi keep = (lane + (int32_t)(VW * (h * HV + v))) < (int32_t)left;
                for (int u = 0; u < QB; u++)
                    acc[u][v] = (vf)(((vfi)acc[u][v] & keep) | ((vfi)((vf){0} - INFINITY) & ~keep));
            }
        }
        for (int u = 0; u < QB; u++)
            for (int v = 0; v < HV; v += 2) pm[u][(h * HV + v) / 2] = vmax(acc[u][v], acc[u][v + 1]);
    }
    for (int u = 0; u < QB; u++) sub_maxima_of_pairs(pm[u], sub + u * sub_stride);
}
#endif

#if LOWP || INT8_VNNI
/* bf16 pass 1 (see the header). Rows go in the vector lanes here (fp32's pass 1 puts events there): an
   accumulator holds one event's scores for 16 rows, so a sub-block's maximum over its 16 events is 15
   vertical maxima per 16 rows, where lanes of events needed a shuffle reduction per row and block (that
   reduction took over a third of pass 1 once the multiply-adds were halved). The keys need no transpose:
   an event's bf16 pairs, dims (2i, 2i + 1), are broadcast to all lanes. qt [dh][Rp] holds the rows' bf16
   query pairs (Rp = R rounded up to 16), X [d][nbp] the blocks' fl(max |x_j| + RHO); the sub-block maxima
   go to S in fp32's layout, and no block maxima are kept (pass 2 works on sub-blocks, lowp_bounds). */
#define LE 8   /* events per micro-tile: 8 x 3 accumulators, 3 query vectors and a broadcast fit 32 registers */

/* Sub-block maxima m[v] (lanes: rows row0 .. row0 + 15) of block b -> S[r][b][v], through a 4 x 4 transpose per
   128-bit lane; rows past R are not written. */
static inline __attribute__((always_inline)) void store_sub_maxima(const call_t *c, const __m512 m[NV], int row0, int64_t b) {
    const int64_t nbp = c->nbp;
    const __m512 t0 = _mm512_unpacklo_ps(m[0], m[1]), t1 = _mm512_unpackhi_ps(m[0], m[1]);
    const __m512 t2 = _mm512_unpacklo_ps(m[2], m[3]), t3 = _mm512_unpackhi_ps(m[2], m[3]);
    __m512 rs[4];   /* 128-bit lane l of rs[s]: the NV sub-block maxima of row row0 + 4 l + s */
    rs[0] = _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(t0), _mm512_castps_pd(t2)));
    rs[1] = _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(t0), _mm512_castps_pd(t2)));
    rs[2] = _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(t1), _mm512_castps_pd(t3)));
    rs[3] = _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(t1), _mm512_castps_pd(t3)));
    if (row0 + 16 <= c->R) {
        for (int s = 0; s < 4; s++) {
            float *o = c->S + ((int64_t)(row0 + s) * nbp + b) * NV;
            _mm_storeu_ps(o, _mm512_castps512_ps128(rs[s]));
            _mm_storeu_ps(o + 4 * nbp * NV, _mm512_extractf32x4_ps(rs[s], 1));
            _mm_storeu_ps(o + 8 * nbp * NV, _mm512_extractf32x4_ps(rs[s], 2));
            _mm_storeu_ps(o + 12 * nbp * NV, _mm512_extractf32x4_ps(rs[s], 3));
        }
    } else {   /* the last rows: not past R */
        float tmp[4][16];
        for (int s = 0; s < 4; s++) _mm512_storeu_ps(tmp[s], rs[s]);
        for (int r = row0; r < c->R; r++)
            memcpy(c->S + ((int64_t)r * nbp + b) * NV, &tmp[(r - row0) % 4][4 * ((r - row0) / 4)], NV * sizeof(float));
    }
}

#if LOWP

/* Events [e0, e1) of block b (e1 - e0 <= SUB) -> kb[e - e0][i] (bf16 of dims 2i, 2i + 1; dim d is 0),
   X[b][j] = fl(max over them of |x_j| + RHO); check and amax as load_blocks when they are not NULL. */
static void lowp_convert(const call_t *c, const float *keys, int64_t b, int64_t e0, int64_t e1, uint32_t *kb, float *xt,
                         v8 *check, v8 *amax) {
    const int d = c->d, dh = (d + 1) / 2;
    __m512 ck = _mm512_setzero_ps(), am = _mm512_setzero_ps();
    float row[32];
    /* 32 dims of every event at a time, their maxima in registers (kept in xt per event, the maxima were a
       chain of masked stores and reloads: a fifth of pass 1) */
    for (int j = 0; j < d; j += 32) {
        const int left = d - j;
        const __mmask16 m0 = left >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << left) - 1u);
        const __mmask16 m1 = left >= 32 ? (__mmask16)0xFFFF : left <= 16 ? 0 : (__mmask16)((1u << (left - 16)) - 1u);
        const int pairs = (left + 1) / 2 >= 16 ? 16 : (left + 1) / 2;
        __m512 xlo = _mm512_setzero_ps(), xhi = _mm512_setzero_ps();
        for (int64_t e = e0; e < e1; e++) {
            const float *x = keys + e * c->stride_l + (int64_t)j * c->stride_d;
            if (c->stride_d != 1) {   /* strided dims: gathered first */
                for (int t = 0; t < (left < 32 ? left : 32); t++) row[t] = x[t * c->stride_d];
                x = row;
            }
            __m512 lo = _mm512_maskz_loadu_ps(m0, x), hi = _mm512_maskz_loadu_ps(m1, x + 16);
            const __m512 alo = _mm512_abs_ps(lo), ahi = _mm512_abs_ps(hi);
            xlo = _mm512_max_ps(xlo, alo);
            xhi = _mm512_max_ps(xhi, ahi);
            if (check) {
                ck = _mm512_add_ps(ck, _mm512_add_ps(_mm512_mul_ps(lo, _mm512_setzero_ps()), _mm512_mul_ps(hi, _mm512_setzero_ps())));
                am = _mm512_max_ps(am, _mm512_max_ps(alo, ahi));
            }
            if (_mm512_cmp_ps_mask(_mm512_max_ps(alo, ahi), _mm512_set1_ps(BF16_MAX), _CMP_GE_OQ)) {
                /* would round to inf: clamp (moves a value by < 2^-8 of itself) */
                lo = _mm512_min_ps(_mm512_max_ps(lo, _mm512_set1_ps(-BF16_MAX)), _mm512_set1_ps(BF16_MAX));
                hi = _mm512_min_ps(_mm512_max_ps(hi, _mm512_set1_ps(-BF16_MAX)), _mm512_set1_ps(BF16_MAX));
            }
            /* words 0..15: dims j..j+15, 16..31: dims j+16..j+31, i.e. the pairs in order */
            _mm512_mask_storeu_epi32(kb + (e - e0) * dh + j / 2, (__mmask16)((1u << pairs) - 1u),
                                     (__m512i)_mm512_cvtne2ps_pbh(hi, lo));
        }
        _mm512_mask_storeu_ps(xt + j, m0, xlo);
        _mm512_mask_storeu_ps(xt + j + 16, m1, xhi);
    }
    for (int j = 0; j < d; j++) c->X[j * c->nbp + b] = xt[j] + RHO;
    if (check) {   /* fold into load_blocks's 8-lane form */
        v8 c8, a8;
        __m256 clo = _mm512_castps512_ps256(ck), chi = _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(ck), 1));
        __m256 alo = _mm512_castps512_ps256(am), ahi = _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(am), 1));
        c8 = (v8)_mm256_add_ps(clo, chi);
        a8 = (v8)_mm256_max_ps(alo, ahi);
        *check += c8;
        *amax = vmax(*amax, a8);
    }
}

/* Maxima over events [0, ne) (1 <= ne <= LE) of kb of RB vectors of 16 rows (qt: their first row) -> out[RB]. */
static inline __attribute__((always_inline)) void lowp_tile(const uint32_t *kb, int ne, int dh, const uint32_t *qt,
                                                            int64_t Rp, int RB, __m512 out[3]) {
    __m512 acc[LE][3];
    for (int e = 0; e < LE; e++)
        for (int u = 0; u < RB; u++) acc[e][u] = _mm512_setzero_ps();
    for (int i = 0; i < dh; i++) {
        __m512bh qv[3];
        for (int u = 0; u < RB; u++) qv[u] = (__m512bh)_mm512_loadu_si512(qt + i * Rp + 16 * u);
        for (int e = 0; e < LE; e++) {
            const __m512bh x = (__m512bh)_mm512_set1_epi32((int32_t)kb[e * dh + i]);
            for (int u = 0; u < RB; u++) acc[e][u] = _mm512_dpbf16_ps(acc[e][u], qv[u], x);
        }
    }
    for (int u = 0; u < RB; u++) {   /* events past ne (a history's end) hold stale pairs: left out */
        __m512 m = acc[0][u];
        for (int e = 1; e < LE; e++)
            if (e < ne) m = _mm512_max_ps(m, acc[e][u]);
        out[u] = m;
    }
}

/* Sub-block maxima of rows [16 g0, 16 g1) (RB vectors at a time) for block b's events kb (nv of them), stored
   in S's row-major layout, S[r][b][v], through a 4 x 4 transpose per 128-bit lane. */
static inline __attribute__((always_inline)) void lowp_rows(const call_t *c, const uint32_t *kb, int64_t nv, int64_t b,
                                                            int g0, int g1, int RB) {
    const int dh = (c->d + 1) / 2;
    const int64_t Rp = c->Rp;
    for (int g = g0; g + RB <= g1; g += RB) {
        __m512 m[NV][3];
        for (int v = 0; v < NV; v++) {
            const int64_t first = (int64_t)VW * v;
            if (first >= nv) {   /* past the history's end: no event */
                for (int u = 0; u < RB; u++) m[v][u] = _mm512_set1_ps(-INFINITY);
                continue;
            }
            lowp_tile(kb + first * dh, (int)(nv - first < LE ? nv - first : LE), dh, c->qt + 16 * g, Rp, RB, m[v]);
            if (nv - first > LE) {
                __m512 m2[3];
                lowp_tile(kb + (first + LE) * dh, (int)(nv - first - LE < LE ? nv - first - LE : LE), dh, c->qt + 16 * g, Rp, RB, m2);
                for (int u = 0; u < RB; u++) m[v][u] = _mm512_max_ps(m[v][u], m2[u]);
            }
        }
        for (int u = 0; u < RB; u++) {
            const __m512 mu[NV] = {m[0][u], m[1][u], m[2][u], m[3][u]};
            store_sub_maxima(c, mu, 16 * (g + u), b);
        }
    }
}

/* bf16 pass 1 over blocks [b0, b1) of the shared history, every row. With keep_T the blocks are also
   transposed into T for pass 2 (load_blocks checks them); without, lowp_convert checks them. */
static void pass1_lowp(const call_t *c, const float *keys, int64_t n, int64_t b0, int64_t b1, float *T, uint32_t *kb,
                       float *xt, v8 *check, v8 *amax) {
    const int d = c->d, nrv = (int)(c->Rp / 16);
    for (int64_t b = b0; b < b1; b++) {
        const int64_t nv = n - b * SUB < SUB ? n - b * SUB : SUB;
        if (T) load_blocks(c, keys, n, b, b + 1, T + b * d * SUB, check, amax);
        lowp_convert(c, keys, b, b * SUB, b * SUB + nv, kb, xt, T ? NULL : check, T ? NULL : amax);
        const int g3 = nrv / 3 * 3;
        lowp_rows(c, kb, nv, b, 0, g3, 3);
        if (nrv - g3 == 2) lowp_rows(c, kb, nv, b, g3, nrv, 2);
        if (nrv - g3 == 1) lowp_rows(c, kb, nv, b, g3, nrv, 1);
    }
}

#endif

/* The k-th largest of a row's m sub-block lower bounds W (kth[0..m), built by the bounds below; top: lane maxima
   of W over 32 disjoint subsets), -inf when m <= k: pass 2's threshold. kth: kth_floats(m) floats. */
static float bounds_threshold(const __m512 top[2], float *kth, int m, int k) {
    if (m <= k) return -INFINITY;
    if (k <= 32) {
        /* 32 disjoint subsets each hold a W >= p = the least of their maxima: at least 32 >= k values are
           >= p, so the k-th largest is, and only the values >= p (a few dozen) go to the selection, which
           otherwise partitioned all NV nb of them (5% of a call at L = 100k, C = 200) */
        const __m512 p = _mm512_set1_ps(_mm512_reduce_min_ps(_mm512_min_ps(top[0], top[1])));
        float *kept = kth + m + 16;
        int n_kept = 0;
        for (int i = 0; i < m; i += 16) {
            const __mmask16 in = m - i >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (m - i)) - 1u);
            const __mmask16 ge = _mm512_mask_cmp_ps_mask(in, _mm512_maskz_loadu_ps(in, kth + i), p, _CMP_GE_OQ);
            _mm512_storeu_ps(kept + n_kept, _mm512_maskz_compress_ps(ge, _mm512_maskz_loadu_ps(in, kth + i)));
            n_kept += __builtin_popcount(ge);
        }
        if (n_kept >= k) return kth_largest_v(kept, n_kept, k, kth);   /* fewer: NaN (a row flagged bad) */
    }
    return kth_largest_v(kth, m, k, kth);
}

#if LOWP
/* Row r after a bf16 pass 1: its sub-block maxima S become the upper bounds U = fl(m + eps_b) on the fp32
   scores there (always: pass 2 compares them with a threshold that keep_best raises even when it starts at
   -inf), and its threshold, the k-th largest sub-block W = fl(m - eps_b), is returned, -inf when there are
   no more than k sub-blocks (the header's proof, with sub-blocks for blocks: k distinct sub-blocks hold an
   event scoring >= their W). kth: kth_floats(NV nbp) floats, W is built in its first half. */
static float lowp_bounds(const call_t *c, int r, float *S, int64_t nb, int k, float *kth) {
    static const int32_t quarter[16] = {0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3};
    const int d = c->d;
    const int64_t nbp = c->nbp;
    float qp[LOWP_MAX_D];
    for (int j = 0; j < d; j++) qp[j] = fabsf(c->q[(int64_t)r * d + j]) + RHO;
    const __m512 ce = _mm512_set1_ps(c->c_eps), ae = _mm512_set1_ps(c->a_eps);
    const __m512i qi = _mm512_loadu_si512(quarter);
    __m512 top[2] = {_mm512_set1_ps(-INFINITY), _mm512_set1_ps(-INFINITY)};   /* lane maxima of W: 32 subsets */
    for (int64_t b = 0; b < nb; b += 16) {
        const __mmask16 in = nb - b >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (nb - b)) - 1u);
        __m512 e = _mm512_setzero_ps();
        for (int j = 0; j < d; j++) e = _mm512_fmadd_ps(_mm512_set1_ps(qp[j]), _mm512_maskz_loadu_ps(in, c->X + j * nbp + b), e);
        e = _mm512_fmadd_ps(e, ce, ae);
        for (int w = 0; w < 4 && b + 4 * w < nb; w++) {   /* 4 blocks of NV = 4 sub-blocks per vector */
            const int64_t blocks = nb - b - 4 * w;
            const __mmask16 sm = blocks >= 4 ? (__mmask16)0xFFFF : (__mmask16)((1u << (4 * blocks)) - 1u);
            const __m512 ew = _mm512_permutexvar_ps(_mm512_add_epi32(qi, _mm512_set1_epi32(4 * w)), e);
            float *Sw = S + (b + 4 * w) * NV;
            const __m512 sv = _mm512_maskz_loadu_ps(sm, Sw);
            const __m512 lower = _mm512_sub_ps(sv, ew);
            _mm512_mask_storeu_ps(Sw, sm, _mm512_add_ps(sv, ew));
            _mm512_mask_storeu_ps(kth + (b + 4 * w) * NV, sm, lower);
            top[w & 1] = _mm512_mask_max_ps(top[w & 1], sm, top[w & 1], lower);
        }
    }
    return bounds_threshold(top, kth, (int)(NV * nb), k);
}
#endif

#if INT8_VNNI
/* int8 pass 1 (see the header): the bf16 pass's layout (rows in the lanes, an event broadcast) with vpdpbusd, four
   u8 x s8 products per lane and instruction. qt [D4][Rp] holds the rows' s8 query quads (dims 4i .. 4i + 3), qbias
   [Rp] -128 times each row's sum of them (the keys are stored + 128 as u8), X [nbp] the blocks' key scales t_b
   (INFINITY: not quantized) and X + nbp [nbp][NV] each sub-block's largest ||k~||_1. The exact int32 dots' sub-block
   maxima go to S as floats (exact: |q~.k~| <= 127^2 D < 2^24); int8_bounds turns them into bounds. */

/* Lane t <- the sum of v[t]'s 16 lanes, for 16 vectors at once (a transposing tree: 45 instructions where 16
   separate reductions took ~150). */
static inline __m512i hsum16(const __m512i v[16]) {
    __m512i a[8], b[4], c[2];
    for (int i = 0; i < 8; i++)   /* 128-bit lane l: [v2i, v2i+1, v2i, v2i+1] partial sums */
        a[i] = _mm512_add_epi32(_mm512_unpacklo_epi32(v[2 * i], v[2 * i + 1]), _mm512_unpackhi_epi32(v[2 * i], v[2 * i + 1]));
    for (int i = 0; i < 4; i++)   /* 128-bit lane l: vectors 4i .. 4i + 3's sums over that lane */
        b[i] = _mm512_add_epi32(_mm512_unpacklo_epi64(a[2 * i], a[2 * i + 1]), _mm512_unpackhi_epi64(a[2 * i], a[2 * i + 1]));
    for (int i = 0; i < 2; i++)
        c[i] = _mm512_add_epi32(_mm512_shuffle_i32x4(b[2 * i], b[2 * i + 1], 0x88), _mm512_shuffle_i32x4(b[2 * i], b[2 * i + 1], 0xDD));
    return _mm512_add_epi32(_mm512_shuffle_i32x4(c[0], c[1], 0x88), _mm512_shuffle_i32x4(c[0], c[1], 0xDD));
}

/* Events [e0, e1) of block b -> kb [e - e0][4 D4] bytes (k~ + 128; dims past d 128), c->X[b] = t_b and the
   sub-blocks' largest ||k~||_1; check and amax as load_blocks. */
static void int8_convert(const call_t *c, const float *keys, int64_t b, int64_t e0, int64_t e1, uint8_t *kb,
                         v8 *check, v8 *amax) {
    const int d = c->d, D = (d + 3) / 4 * 4;
    __m512 ck = _mm512_setzero_ps(), am = _mm512_setzero_ps(), colmax = _mm512_setzero_ps();
    float row[INT8_MAX_D];
    /* the block's largest |x_j| g_j (g: the column scales) */
    for (int j = 0; j < d; j += 16) {
        const int left = d - j;
        const __mmask16 in = left >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << left) - 1u);
        __m512 xm = _mm512_setzero_ps();
        for (int64_t e = e0; e < e1; e++) {
            const float *x = keys + e * c->stride_l + (int64_t)j * c->stride_d;
            if (c->stride_d != 1) {
                for (int t = 0; t < (left < 16 ? left : 16); t++) row[t] = x[t * c->stride_d];
                x = row;
            }
            const __m512 v = _mm512_maskz_loadu_ps(in, x);
            ck = _mm512_add_ps(ck, _mm512_mul_ps(v, _mm512_setzero_ps()));
            xm = _mm512_max_ps(xm, _mm512_abs_ps(v));
        }
        am = _mm512_max_ps(am, xm);
        colmax = _mm512_max_ps(colmax, _mm512_mul_ps(xm, _mm512_maskz_loadu_ps(in, c->gcol + j)));
    }
    const float kmax = _mm512_reduce_max_ps(colmax);
    /* inv_t = fl(127 / kmax), at most 2^40; a block past 2^47 (or not finite) is not quantized: t_b = inf */
    const int ok = kmax <= 0x1p47f;
    const float inv_t = !ok ? 0.0f : kmax > 127.0f * 0x1p-40f ? 127.0f / kmax : 0x1p40f;
    c->X[b] = ok ? 1.0f / inv_t : INFINITY;
    __m512 h[INT8_MAX_D / 16];   /* h_j = g_j inv_t, exact (a power of two times a float in range) */
    for (int j = 0; j < D; j += 16) {
        const int left = d - j;
        const __mmask16 in = left >= 16 ? (__mmask16)0xFFFF : left <= 0 ? 0 : (__mmask16)((1u << left) - 1u);
        h[j / 16] = _mm512_mul_ps(_mm512_maskz_loadu_ps(in, c->gcol + j), _mm512_set1_ps(inv_t));
    }
    float *K1 = c->X + c->nbp + b * NV;
    for (int v = 0; v < NV; v++) {
        /* lane t of sums[t]: partial sums of event t's |k~_j|, added up for the 16 events at once (hsum16) */
        __m512i sums[SUBW];
        const int64_t f = e0 + SUBW * v, ne = e1 - f < 0 ? 0 : e1 - f < SUBW ? e1 - f : SUBW;
        for (int64_t t = 0; t < SUBW; t++) {
            sums[t] = _mm512_setzero_si512();
            if (t >= ne) continue;
            const float *x = keys + (f + t) * c->stride_l;
            if (c->stride_d != 1) {
                for (int j = 0; j < d; j++) row[j] = x[j * c->stride_d];
                x = row;
            }
            uint8_t *out = kb + (f + t - e0) * D;
            for (int j = 0; j < D; j += 16) {
                const int left = d - j;
                const __mmask16 in = left >= 16 ? (__mmask16)0xFFFF : left <= 0 ? 0 : (__mmask16)((1u << left) - 1u);
                /* RNE whatever MXCSR says; dims past d load 0 and store 0 + 128 */
                const __m512i k = _mm512_cvt_roundps_epi32(_mm512_mul_ps(_mm512_maskz_loadu_ps(in, x + j), h[j / 16]),
                                                           _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
                sums[t] = _mm512_add_epi32(sums[t], _mm512_abs_epi32(k));
                const int bytes = D - j >= 16 ? 16 : D - j;
                _mm_mask_storeu_epi8(out + j, (__mmask16)((1u << bytes) - 1u),
                                     _mm_xor_si128(_mm512_cvtsepi32_epi8(k), _mm_set1_epi8((char)0x80)));
            }
        }
        K1[v] = (float)_mm512_reduce_max_epi32(hsum16(sums));
    }
    if (check) {
        const __m256 clo = _mm512_castps512_ps256(ck), chi = _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(ck), 1));
        const __m256 alo = _mm512_castps512_ps256(am), ahi = _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(am), 1));
        *check += (v8)_mm256_add_ps(clo, chi);
        *amax = vmax(*amax, (v8)_mm256_max_ps(alo, ahi));
    }
}

/* Largest exact dots over events [0, ne) (1 <= ne <= LE) of kb (4 D4 bytes each) for RB vectors of 16 rows (qt,
   qbias: their first row) -> out[RB] as floats. */
static inline __attribute__((always_inline)) void int8_tile(const uint32_t *kb, int ne, int D4, const uint32_t *qt,
                                                            const int32_t *qbias, int64_t Rp, int RB, __m512 out[3]) {
    __m512i acc[LE][3];
    for (int u = 0; u < RB; u++) {
        const __m512i bias = _mm512_loadu_si512(qbias + 16 * u);
        for (int e = 0; e < LE; e++) acc[e][u] = bias;
    }
    for (int i = 0; i < D4; i++) {
        __m512i qv[3];
        for (int u = 0; u < RB; u++) qv[u] = _mm512_loadu_si512(qt + i * Rp + 16 * u);
        for (int e = 0; e < LE; e++) {
            const __m512i x = _mm512_set1_epi32((int32_t)kb[e * D4 + i]);
            for (int u = 0; u < RB; u++) __asm__("vpdpbusd %2, %1, %0" : "+v"(acc[e][u]) : "v"(x), "v"(qv[u]));
        }
    }
    for (int u = 0; u < RB; u++) {   /* events past ne (a history's end) hold stale keys: left out */
        __m512i m = acc[0][u];
        for (int e = 1; e < LE; e++)
            if (e < ne) m = _mm512_max_epi32(m, acc[e][u]);
        out[u] = _mm512_cvtepi32_ps(m);
    }
}

/* Sub-block maxima of rows [16 g0, 16 g1) (RB vectors at a time) for block b's keys kb (nv events) -> S; each group
   of rows also prefetches `lines` cache lines from *pf on (the next block's keys), advancing *pf. */
static inline __attribute__((always_inline)) void int8_rows(const call_t *c, const uint32_t *kb, int64_t nv, int64_t b,
                                                            int g0, int g1, int RB, const char **pf, const char *pf_end,
                                                            int64_t lines) {
    const int D4 = (c->d + 3) / 4;
    const int64_t Rp = c->Rp;
    for (int g = g0; g + RB <= g1; g += RB) {
        for (int64_t t = 0; t < lines && *pf < pf_end; t++, *pf += 64) __builtin_prefetch(*pf, 0, 3);
        __m512 m[NV][3];
        for (int v = 0; v < NV; v++) {
            const int64_t first = (int64_t)VW * v;
            if (first >= nv) {   /* past the history's end: no event */
                for (int u = 0; u < RB; u++) m[v][u] = _mm512_set1_ps(-INFINITY);
                continue;
            }
            int8_tile(kb + first * D4, (int)(nv - first < LE ? nv - first : LE), D4, c->qt + 16 * g, c->qbias + 16 * g, Rp, RB, m[v]);
            if (nv - first > LE) {
                __m512 m2[3];
                int8_tile(kb + (first + LE) * D4, (int)(nv - first - LE < LE ? nv - first - LE : LE), D4, c->qt + 16 * g,
                          c->qbias + 16 * g, Rp, RB, m2);
                for (int u = 0; u < RB; u++) m[v][u] = _mm512_max_ps(m[v][u], m2[u]);
            }
        }
        for (int u = 0; u < RB; u++) {
            const __m512 mu[NV] = {m[0][u], m[1][u], m[2][u], m[3][u]};
            store_sub_maxima(c, mu, 16 * (g + u), b);
        }
    }
}

#if INT8_AMX
#include <sys/syscall.h>
#define ARCH_REQ_XCOMP_PERM 0x1023
#define XFEATURE_XTILEDATA 18
static int amx_granted = -1;   /* -1: not asked yet in this process; 0 refused; 1 granted */

/* Linux hands a process the tile state only when asked (else the first tile instruction raises SIGILL). A forked
   child asks again (mark_forked). */
static int amx_permitted(void) {
    int g = __atomic_load_n(&amx_granted, __ATOMIC_ACQUIRE);
    if (g < 0) {
        g = syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0;
        __atomic_store_n(&amx_granted, g, __ATOMIC_RELEASE);
    }
    return g;
}

typedef struct {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} tilecfg_t;

/* Tiles 0, 1: two sub-blocks' 16 events x D key bytes; 2, 3: D / 4 query words x two groups of 16 rows; 4-7: their
   16 x 16 int32 products. Loaded per chunk of pass 1 (tile state is per thread), released after it. */
static void amx_configure(int D) {
    tilecfg_t cfg;
    memset(&cfg, 0, sizeof cfg);
    cfg.palette = 1;
    for (int t = 0; t < 2; t++) { cfg.rows[t] = 16; cfg.colsb[t] = (uint16_t)D; }
    for (int t = 2; t < 4; t++) { cfg.rows[t] = (uint8_t)(D / 4); cfg.colsb[t] = 64; }
    for (int t = 4; t < 8; t++) { cfg.rows[t] = 16; cfg.colsb[t] = 64; }
    _tile_loadconfig(&cfg);
}

/* max over the first ne (1..16) of C's rows (16 events' int32 dots for 16 rows) + bias, as floats */
static inline __m512 amx_events_max(const int32_t *C, int ne, __m512i bias) {
    __m512i m;
    if (ne == 16) {   /* four chains: one took the latency of 15 dependent maxima */
        __m512i a[4];
        for (int u = 0; u < 4; u++) a[u] = _mm512_load_si512(C + 16 * u);
        for (int e = 4; e < 16; e += 4)
            for (int u = 0; u < 4; u++) a[u] = _mm512_max_epi32(a[u], _mm512_load_si512(C + 16 * (e + u)));
        m = _mm512_max_epi32(_mm512_max_epi32(a[0], a[1]), _mm512_max_epi32(a[2], a[3]));
    } else {          /* the history's last block: its rows past the end hold stale keys */
        m = _mm512_load_si512(C);
        for (int e = 1; e < ne; e++) m = _mm512_max_epi32(m, _mm512_load_si512(C + 16 * e));
    }
    return _mm512_cvtepi32_ps(_mm512_add_epi32(m, bias));
}

/* int8_rows for every row of block b (nv events in kb, D bytes each) by tile multiplies: two groups of 16 rows x
   two sub-blocks per step (4 products in tiles 4-7). In a stand-alone loop of this work (Intel Xeon VM, C = 200,
   d = 33) a block's products took ~800 cycles, ~3,200 with storing and reducing them; int8_rows takes ~6,000. */
static void int8_rows_amx(const call_t *c, const uint8_t *kb, int64_t nv, int64_t b, const char **pf,
                          const char *pf_end, int64_t lines) {
    const int D = (c->d + 3) / 4 * 4, nrv = (int)(c->Rp / 16);
    const int64_t Rp = c->Rp;
    int32_t prod[4][256] __attribute__((aligned(64)));
    for (int g = 0; g < nrv; g += 2) {
        for (int64_t t = 0; t < lines && *pf < pf_end; t++, *pf += 64) __builtin_prefetch(*pf, 0, 3);
        const int two = g + 1 < nrv;
        _tile_loadd(2, c->qt + 16 * g, Rp * 4);
        if (two) _tile_loadd(3, c->qt + 16 * (g + 1), Rp * 4);
        const __m512i bias0 = _mm512_loadu_si512(c->qbias + 16 * g);
        const __m512i bias1 = two ? _mm512_loadu_si512(c->qbias + 16 * (g + 1)) : bias0;
        __m512 m[2][NV];
        for (int v = 0; v < NV; v += 2) {
            _tile_loadd(0, kb + (int64_t)SUBW * v * D, D);
            _tile_loadd(1, kb + (int64_t)SUBW * (v + 1) * D, D);
            _tile_zero(4);
            _tile_zero(6);
            _tile_dpbusd(4, 0, 2);
            _tile_dpbusd(6, 1, 2);
            if (two) {
                _tile_zero(5);
                _tile_zero(7);
                _tile_dpbusd(5, 0, 3);
                _tile_dpbusd(7, 1, 3);
            }
            _tile_stored(4, prod[0], 64);
            _tile_stored(6, prod[2], 64);
            if (two) {
                _tile_stored(5, prod[1], 64);
                _tile_stored(7, prod[3], 64);
            }
            for (int h = 0; h < 2; h++) {
                const int64_t first = (int64_t)SUBW * (v + h);
                const int ne = first >= nv ? 0 : nv - first < SUBW ? (int)(nv - first) : SUBW;
                m[0][v + h] = ne ? amx_events_max(prod[2 * h], ne, bias0) : _mm512_set1_ps(-INFINITY);
                if (two) m[1][v + h] = ne ? amx_events_max(prod[2 * h + 1], ne, bias1) : _mm512_set1_ps(-INFINITY);
            }
        }
        store_sub_maxima(c, m[0], 16 * g, b);
        if (two) store_sub_maxima(c, m[1], 16 * (g + 1), b);
    }
}
#endif

/* int8 pass 1 over blocks [b0, b1) of the shared history, every row (T is not kept). */
static void pass1_int8(const call_t *c, const float *keys, int64_t n, int64_t b0, int64_t b1, uint8_t *kb,
                       v8 *check, v8 *amax) {
    const int nrv = (int)(c->Rp / 16), g3 = nrv / 3 * 3, groups = g3 / 3 + (nrv > g3);
#if INT8_AMX
    if (c->amx) amx_configure((c->d + 3) / 4 * 4);
#endif
    for (int64_t b = b0; b < b1; b++) {
        const int64_t nv = n - b * SUB < SUB ? n - b * SUB : SUB;
        int8_convert(c, keys, b, b * SUB, b * SUB + nv, kb, check, amax);
        /* the next block's keys, prefetched while this one is scored: its conversion waited on memory for a fifth of
           pass 1 (L = 100k, d = 33); rows strided by dims are left to the hardware */
        const char *pf = (const char *)(keys + (b + 1) * SUB * c->stride_l), *pf_end = pf;
        if (b + 1 < b1 && c->stride_d == 1) {
            const int64_t nn = n - (b + 1) * SUB < SUB ? n - (b + 1) * SUB : SUB;
            pf_end = (const char *)(keys + ((b + 1) * SUB + nn - 1) * c->stride_l + c->d);
        }
#if INT8_AMX
        if (c->amx) {
            const int pairs = (nrv + 1) / 2;
            int8_rows_amx(c, kb, nv, b, &pf, pf_end, ((pf_end - pf) / 64 + pairs) / pairs);
            continue;
        }
#endif
        const int64_t lines = ((pf_end - pf) / 64 + groups) / groups;
        const uint32_t *kw = (const uint32_t *)kb;
        int8_rows(c, kw, nv, b, 0, g3, 3, &pf, pf_end, lines);
        if (nrv - g3 == 2) int8_rows(c, kw, nv, b, g3, nrv, 2, &pf, pf_end, lines);
        if (nrv - g3 == 1) int8_rows(c, kw, nv, b, g3, nrv, 1, &pf, pf_end, lines);
    }
#if INT8_AMX
    if (c->amx) _tile_release();
#endif
}

/* Row r after an int8 pass 1: S's exact dot maxima m become U = fl(c fl(m + E2)) and W = fl(c fl(m - E2)) with
   c = fl(s_r t_b), E2 = fl(K1 c_k + e2_r) (the header's bound); a row or block that was not quantized gets U = inf,
   W = -inf. Returns the threshold, as lowp_bounds. */
static float int8_bounds(const call_t *c, int r, float *S, int64_t nb, int k, float *kth) {
    static const int32_t quarter[16] = {0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3};
    const __m512 s = _mm512_set1_ps(c->srow[r]), er = _mm512_set1_ps(c->erow[r]), ck = _mm512_set1_ps(c->c_k);
    const __m512 inf = _mm512_set1_ps(INFINITY);
    const __m512i qi = _mm512_loadu_si512(quarter);
    __m512 top[2] = {_mm512_set1_ps(-INFINITY), _mm512_set1_ps(-INFINITY)};
    for (int64_t b = 0; b < nb; b += 4) {   /* 4 blocks of NV = 4 sub-blocks per vector */
        const int64_t blocks = nb - b;
        const __mmask16 sm = blocks >= 4 ? (__mmask16)0xFFFF : (__mmask16)((1u << (4 * blocks)) - 1u);
        const __m512 t = _mm512_permutexvar_ps(qi, _mm512_maskz_loadu_ps(blocks >= 4 ? 0xF : (__mmask16)((1u << blocks) - 1u), c->X + b));
        const __m512 cst = _mm512_mul_ps(s, t);
        const __mmask16 open = _mm512_cmp_ps_mask(cst, inf, _CMP_EQ_OQ);   /* not quantized: rescored in full */
        float *Sw = S + b * NV;
        const __m512 m = _mm512_maskz_loadu_ps(sm, Sw);
        const __m512 e2 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(sm, c->X + c->nbp + b * NV), ck, er);   /* m = -inf stays */
        const __m512 upper = _mm512_mask_blend_ps(open, _mm512_mul_ps(cst, _mm512_add_ps(m, e2)), inf);
        const __m512 lower = _mm512_mask_blend_ps(open, _mm512_mul_ps(cst, _mm512_sub_ps(m, e2)), _mm512_set1_ps(-INFINITY));
        _mm512_mask_storeu_ps(Sw, sm, upper);
        _mm512_mask_storeu_ps(kth + b * NV, sm, lower);
        top[(b >> 2) & 1] = _mm512_mask_max_ps(top[(b >> 2) & 1], sm, top[(b >> 2) & 1], lower);
    }
    return bounds_threshold(top, kth, (int)(NV * nb), k);
}
#endif
#endif   /* LOWP || INT8_VNNI */

/* Pass 1 over blocks [b0, b1) of T for rows [r0, r1): a tile of blocks is transposed and, while it
   sits in L1, every row scores it, keeping only each sub-block's maximum in S[row][b][s] and, with KEEP_M,
   each block's in M[row][b] (no branch that depends on the scores). */
static void pass1(const call_t *c, const float *keys, int64_t n, int64_t b0, int64_t b1, int r0, int r1,
                  float *T, float *tile_buf, float *M, float *S, int64_t nbp, v8 *check, v8 *amax) {
    /* tile_buf non-NULL: the tile is transposed there and T is not kept (pass 2 transposes what it needs) */
    /* row r's maxima: M + (r - r0) nbp; its sub-block maxima S + ((r - r0) nbp + b) NS */
    const int d = c->d, tile = tile_blocks(d);
    for (int64_t t0 = b0; t0 < b1; t0 += tile) {
        int64_t t1 = t0 + tile < b1 ? t0 + tile : b1;
        float *Tt = tile_buf ? tile_buf : T + t0 * d * SUB;
        load_blocks(c, keys, n, t0, t1, Tt, check, amax);
        int r = r0;
        for (; r + QB <= r1; r += QB) {
            const float *q = c->q + (int64_t)r * d;
            float *Mr = M + (int64_t)(r - r0) * nbp;
            for (int64_t b = t0; b < t1; b++) {
#if KEEP_M
                float m[QB];
                block_max_rows(Tt + (b - t0) * d * SUB, n - b * SUB, q, d, m, S + ((int64_t)(r - r0) * nbp + b) * NS, nbp * NS);
                for (int u = 0; u < QB; u++) Mr[u * nbp + b] = m[u];
#else
                (void)Mr;
                block_max_rows(Tt + (b - t0) * d * SUB, n - b * SUB, q, d, S + ((int64_t)(r - r0) * nbp + b) * NS, nbp * NS);
#endif
            }
        }
        for (; r < r1; r++) {   /* the rows left over, one at a time */
            const float *q = c->q + (int64_t)r * d;
            float *Mr = M + (int64_t)(r - r0) * nbp;
            for (int64_t b = t0; b < t1; b++) {
                vf acc[NV];
                score_block(Tt + (b - t0) * d * SUB, n - b * SUB, q, d, acc);
#if KEEP_M
                Mr[b] = sub_maxima(acc, S + ((int64_t)(r - r0) * nbp + b) * NS);
#else
                (void)Mr;
                sub_maxima(acc, S + ((int64_t)(r - r0) * nbp + b) * NS);
#endif
            }
        }
    }
}

/* Candidate slots per row: a row is compacted to its best k once it holds more than 2 k' (k' = k rounded
   up to 16), so each compaction (linear in the count) is paid for by >= k' appends; a block adds at most
   SUB, and a full-vector store of compressed lanes may write VW past the count. */
static inline int cand_cap(int k) { return 2 * ((k + 15) / 16 * 16) + SUB + 16; }

/* rank[i] = place of candidate i in the order (score desc, index asc); candidates are in index order. */
static void rank_candidates(const float *s, int m, int32_t *rank) {
#ifdef __AVX512F__
    /* 16 comparisons per instruction (the scalar double loop was 4% of a call at L = 10k, C = 200) */
    for (int i = 0; i < m; i++) {
        const __m512 si = _mm512_set1_ps(s[i]);
        int r = 0;
        for (int j = 0; j < m; j += 16) {
            const __mmask16 in = m - j >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (m - j)) - 1u);
            const __m512 v = _mm512_maskz_loadu_ps(in, s + j);
            /* lanes before i count ties (the lower index goes first), lanes after i only greater scores */
            const int below = i - j <= 0 ? 0 : i - j >= 16 ? 0xFFFF : (int)((1u << (i - j)) - 1u);
            const __mmask16 ge = _mm512_mask_cmp_ps_mask(in & (__mmask16)below, v, si, _CMP_GE_OQ);
            const __mmask16 gt = _mm512_mask_cmp_ps_mask(in & (__mmask16)~below, v, si, _CMP_GT_OQ);
            r += __builtin_popcount((unsigned)ge) + __builtin_popcount((unsigned)gt);
        }
        rank[i] = r;
    }
#else
    for (int i = 0; i < m; i++) {
        const float si = s[i];
        int r = 0;
        for (int j = 0; j < i; j++) r += s[j] >= si;   /* ties: the lower index goes first */
        for (int j = i + 1; j < m; j++) r += s[j] > si;
        rank[i] = r;
    }
#endif
}

/* Keep the best k of m (> k) candidates, in index order, and raise the row's threshold above the k-th
   best: an equal score arriving later has a higher index and cannot enter. Linear in m: the k-th largest
   score t by selection, then one pass keeps every score above t and the first k - #(above t) equal to it.
   sel: kth_floats(m) floats of scratch. Returns k. */
static int keep_best(float *cs, int32_t *ci, int m, int k, float *sel, float *tau) {
#ifdef __AVX2__
    const float t = kth_largest_v(cs, m, k, sel);
#else
    memcpy(sel, cs, (size_t)m * sizeof(float));
    const float t = kth_largest(sel, m, k);
#endif
    int ties = k;
    for (int i = 0; i < m; i++) ties -= cs[i] > t;
    int w = 0;
    for (int i = 0; i < m; i++) {   /* branch-free compaction: w <= i, so the writes never overtake the reads */
        const int eq = cs[i] == t, keep = (cs[i] > t) | (eq & (ties > 0));
        ties -= eq & keep;
        cs[w] = cs[i];
        ci[w] = ci[i];
        w += keep;
    }
    const float above = nextafterf(t, INFINITY);
    *tau = above > *tau ? above : *tau;
    return w;
}

#if !KEEP_M
/* A row's threshold without block maxima: the k-th largest of its m sub-block maxima S[0..m) (0 < k < m; S is
   -inf past m up to a multiple of 8). kth: kth_floats(m) floats. With AVX2 and k <= 32: k of 32 disjoint
   subsets have a maximum >= p, the k-th largest of the 32 maxima, so at least k values are >= p and the k-th
   largest is one of them: only those (29 on average at L = 10k, k = 20; 114 with p the least of the 32
   maxima) go to the selection, which partitioned all 628 of them otherwise. */
static float sub_threshold(const float *S, int m, int k, float *kth) {
#ifdef __AVX2__
    if (k <= 32) {
        const int m8 = (m + 7) / 8 * 8;
        __m256 top[4];
        for (int w = 0; w < 4; w++) top[w] = _mm256_set1_ps(-INFINITY);
        int i = 0;
        for (; i + 32 <= m8; i += 32)
            for (int w = 0; w < 4; w++) top[w] = _mm256_max_ps(top[w], _mm256_loadu_ps(S + i + 8 * w));
        for (int w = 0; i < m8; i += 8, w++) top[w] = _mm256_max_ps(top[w], _mm256_loadu_ps(S + i));
        float tops[32], sel[2 * (32 + 16)];
        for (int w = 0; w < 4; w++) _mm256_storeu_ps(tops + 8 * w, top[w]);
        const __m256 p = _mm256_set1_ps(kth_largest_v(tops, 32, k, sel));
        int n_kept = 0;
        for (i = 0; i < m8; i += 8) {
            const __m256 v = _mm256_loadu_ps(S + i);
            const uint32_t ge = (uint32_t)_mm256_movemask_ps(_mm256_cmp_ps(v, p, _CMP_GE_OQ));
            _mm256_storeu_ps(kth + n_kept, _mm256_permutevar8x32_ps(v, _mm256_loadu_si256((const __m256i *)compress8[ge])));
            n_kept += __builtin_popcount(ge);
        }
        if (n_kept >= k) return kth_largest_v(kth, n_kept, k, kth);   /* fewer: a NaN (a row flagged bad) */
    }
    return kth_largest_v(S, m, k, kth);
#else
    memcpy(kth, S, (size_t)m * sizeof(float));
    return kth_largest(kth, m, k);
#endif
}
#endif

#if INT8_AVX2
/* int8 pass 1 with AVX2 (see the header): the VNNI pass's layout (rows in the lanes, 8 per vector, an event's 4-dim
   u8 quad broadcast) and its buffers (qt [D4][Rp] s8 query quads, qbias, X [nbp] t_b and X + nbp [nbp][NS] K1). Each
   quad is vpmaddubsw (u8 keys x s8 queries, pairs summed to int16: |pair| <= 2 * 255 * 63 < 2^15, never saturated)
   and vpmaddwd by ones (pairs -> int32), added to the accumulator: 32 multiply-adds per cycle on Zen 3 where fp32's
   FMAs do 16 (the two multiplies share the FMA pipes). */
#define LE8 4   /* events per micro-tile: 4 x 3 accumulators, ones, the broadcast and a product: 15 of 16 registers */
#define RB8 3   /* row vectors per micro-tile */

static inline __m256i lanes_below(int left) { return _mm256_cmpgt_epi32(_mm256_set1_epi32(left), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7)); }

/* 8 floats from x, the lanes at or past `left` 0 (not read). */
static inline __m256 load_part(const float *x, int left) {
    return left >= 8 ? _mm256_loadu_ps(x) : left <= 0 ? _mm256_setzero_ps() : _mm256_maskload_ps(x, lanes_below(left));
}

/* int8_convert of the VNNI pass with 8 lanes: events [e0, e1) of block b -> kb [e - e0][D] bytes (k~ + 128; dims past d
   128; up to 31 bytes past the last event are written), c->X[b] = t_b and the sub-blocks' largest ||k~||_1. */
static void int8_convert(const call_t *c, const float *keys, int64_t b, int64_t e0, int64_t e1, uint8_t *kb,
                         v8 *check, v8 *amax) {
    const int d = c->d, D = (d + 3) / 4 * 4;
    const float *g = c->gcol;   /* 0 past d, to D + 32 */
    const __m256 zero = _mm256_setzero_ps(), absm = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
    __m256 ck = zero, am = zero, colmax = zero;
    float row[INT8_MAX_D + 32];
    for (int j = 0; j < d; j += 8) {   /* the block's largest |x_j| g_j */
        const int left = d - j;
        __m256 xm = zero;
        for (int64_t e = e0; e < e1; e++) {
            const float *x = keys + e * c->stride_l + (int64_t)j * c->stride_d;
            if (c->stride_d != 1) {
                for (int t = 0; t < (left < 8 ? left : 8); t++) row[t] = x[t * c->stride_d];
                x = row;
            }
            const __m256 v = load_part(x, left);
            ck = _mm256_or_ps(ck, _mm256_mul_ps(v, zero));   /* NaN once a key is NaN or inf: an or, no add chain */
            xm = _mm256_max_ps(xm, _mm256_and_ps(v, absm));
        }
        am = _mm256_max_ps(am, xm);
        colmax = _mm256_max_ps(colmax, _mm256_mul_ps(xm, _mm256_loadu_ps(g + j)));
    }
    const float kmax = hmax((v8)colmax);
    /* as the VNNI pass: inv_t = fl(127 / kmax), at most 2^40; past 2^47 (or not finite) not quantized, t_b = inf */
    const int ok = kmax <= 0x1p47f;
    const float inv_t = !ok ? 0.0f : kmax > 127.0f * 0x1p-40f ? 127.0f / kmax : 0x1p40f;
    c->X[b] = ok ? 1.0f / inv_t : INFINITY;
    float h[INT8_MAX_D + 32];   /* h_j = g_j inv_t, exact; 0 past d */
    for (int j = 0; j < D; j += 8) _mm256_storeu_ps(h + j, _mm256_mul_ps(_mm256_loadu_ps(g + j), _mm256_set1_ps(inv_t)));
    for (int j = D; j < (D + 31) / 32 * 32; j++) h[j] = 0.0f;
    const __m256i bias = _mm256_set1_epi8((char)0x80), order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    int32_t k1[NS] = {0};
    for (int64_t e = e0; e < e1; e++) {
        const float *x = keys + e * c->stride_l;
        if (c->stride_d != 1) {
            for (int j = 0; j < d; j++) row[j] = x[j * c->stride_d];
            x = row;
        }
        uint8_t *out = kb + (e - e0) * D;
        __m256i sad = _mm256_setzero_si256();
        for (int j = 0; j < D; j += 32) {   /* 32 dims -> 32 bytes */
            __m256i k[4];
            for (int u = 0; u < 4; u++)   /* RNE whatever MXCSR says; dims past d load 0 */
                k[u] = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(load_part(x + j + 8 * u, d - j - 8 * u), _mm256_loadu_ps(h + j + 8 * u)),
                                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
            /* packs interleave the 128-bit halves: dwords k0 lo, k1 lo, .., k3 lo, k0 hi, .., k3 hi -> in order */
            const __m256i p = _mm256_xor_si256(_mm256_permutevar8x32_epi32(
                _mm256_packs_epi16(_mm256_packs_epi32(k[0], k[1]), _mm256_packs_epi32(k[2], k[3])), order), bias);
            sad = _mm256_add_epi64(sad, _mm256_sad_epu8(p, bias));   /* sum |k~_j| (dims past d: 0) */
            _mm256_storeu_si256((__m256i *)(out + j), p);
        }
        const __m128i s2 = _mm_add_epi64(_mm256_castsi256_si128(sad), _mm256_extracti128_si256(sad, 1));
        const int32_t sum = (int32_t)_mm_cvtsi128_si32(_mm_add_epi64(s2, _mm_unpackhi_epi64(s2, s2)));
        const int v = (int)((e - e0) / SUBW);
        k1[v] = sum > k1[v] ? sum : k1[v];
    }
    float *K1 = c->X + c->nbp + b * NS;
    for (int v = 0; v < NS; v++) K1[v] = (float)k1[v];
    if (check) {
        *check += (v8)ck;
        *amax = vmax(*amax, (v8)am);
    }
}

/* Largest exact dots over events [0, ne) (1 <= ne <= LE8) of kb (4 D4 bytes each) for RB vectors of 8 rows (qt,
   qbias: their first row) -> out[RB] as floats. */
static inline __attribute__((always_inline)) void int8_tile(const uint32_t *kb, int ne, int D4, const uint32_t *qt,
                                                            const int32_t *qbias, int64_t Rp, int RB, __m256 out[RB8]) {
    const __m256i ones = _mm256_set1_epi16(1);
    __m256i acc[LE8][RB8];
    for (int u = 0; u < RB; u++) {
        const __m256i bias = _mm256_loadu_si256((const __m256i *)(qbias + 8 * u));
        for (int e = 0; e < LE8; e++) acc[e][u] = bias;
    }
    for (int i = 0; i < D4; i++)
        for (int e = 0; e < LE8; e++) {
            const __m256i x = _mm256_set1_epi32((int32_t)kb[e * D4 + i]);
            for (int u = 0; u < RB; u++)
                acc[e][u] = _mm256_add_epi32(acc[e][u], _mm256_madd_epi16(_mm256_maddubs_epi16(x, _mm256_loadu_si256((const __m256i *)(qt + i * Rp + 8 * u))), ones));
        }
    for (int u = 0; u < RB; u++) {   /* events past ne (a history's end) hold stale keys: left out */
        __m256i m = acc[0][u];
        for (int e = 1; e < LE8; e++)
            if (e < ne) m = _mm256_max_epi32(m, acc[e][u]);
        out[u] = _mm256_cvtepi32_ps(m);
    }
}

/* Sub-block maxima m[v] (lanes: rows row0 .. row0 + 7) of block b -> S[r][b][v]; rows past R are not written. */
static inline void store_sub_maxima8(const call_t *c, const __m256 m[NS], int row0, int64_t b) {
    const int64_t nbp = c->nbp;
    const __m256 t0 = _mm256_unpacklo_ps(m[0], m[1]), t1 = _mm256_unpackhi_ps(m[0], m[1]);
    const __m256 t2 = _mm256_unpacklo_ps(m[2], m[3]), t3 = _mm256_unpackhi_ps(m[2], m[3]);
    __m256 rs[4];   /* 128-bit half h of rs[s]: the NS sub-block maxima of row row0 + 4 h + s */
    rs[0] = _mm256_castpd_ps(_mm256_unpacklo_pd(_mm256_castps_pd(t0), _mm256_castps_pd(t2)));
    rs[1] = _mm256_castpd_ps(_mm256_unpackhi_pd(_mm256_castps_pd(t0), _mm256_castps_pd(t2)));
    rs[2] = _mm256_castpd_ps(_mm256_unpacklo_pd(_mm256_castps_pd(t1), _mm256_castps_pd(t3)));
    rs[3] = _mm256_castpd_ps(_mm256_unpackhi_pd(_mm256_castps_pd(t1), _mm256_castps_pd(t3)));
    for (int s = 0; s < 4; s++)
        for (int h = 0; h < 2; h++)
            if (row0 + 4 * h + s < c->R)
                _mm_storeu_ps(c->S + ((int64_t)(row0 + 4 * h + s) * nbp + b) * NS, h ? _mm256_extractf128_ps(rs[s], 1) : _mm256_castps256_ps128(rs[s]));
}

/* int8_rows of the VNNI pass: rows [8 g0, 8 g1), RB vectors at a time. */
static inline __attribute__((always_inline)) void int8_rows(const call_t *c, const uint32_t *kb, int64_t nv, int64_t b,
                                                            int g0, int g1, int RB, const char **pf, const char *pf_end,
                                                            int64_t lines) {
    const int D4 = (c->d + 3) / 4;
    const int64_t Rp = c->Rp;
    for (int g = g0; g + RB <= g1; g += RB) {
        for (int64_t t = 0; t < lines && *pf < pf_end; t++, *pf += 64) __builtin_prefetch(*pf, 0, 3);
        __m256 m[RB8][NS];
        for (int v = 0; v < NS; v++) {
            const int64_t first = (int64_t)SUBW * v;
            for (int u = 0; u < RB; u++) m[u][v] = _mm256_set1_ps(-INFINITY);   /* past the history's end: no event */
            for (int64_t e = first; e < first + SUBW && e < nv; e += LE8) {
                __m256 t[RB8];
                int8_tile(kb + e * D4, (int)(nv - e < LE8 ? nv - e : LE8), D4, c->qt + 8 * g, c->qbias + 8 * g, Rp, RB, t);
                for (int u = 0; u < RB; u++) m[u][v] = _mm256_max_ps(m[u][v], t[u]);
            }
        }
        for (int u = 0; u < RB; u++) store_sub_maxima8(c, m[u], 8 * (g + u), b);
    }
}

/* pass1_int8 of the VNNI pass, 8 rows per vector. */
static void pass1_int8(const call_t *c, const float *keys, int64_t n, int64_t b0, int64_t b1, uint8_t *kb,
                       v8 *check, v8 *amax) {
    const int nrv = (int)((c->R + 7) / 8), gm = nrv / RB8 * RB8, groups = gm / RB8 + (nrv > gm);
    for (int64_t b = b0; b < b1; b++) {
        const int64_t nv = n - b * SUB < SUB ? n - b * SUB : SUB;
        int8_convert(c, keys, b, b * SUB, b * SUB + nv, kb, check, amax);
        const char *pf = (const char *)(keys + (b + 1) * SUB * c->stride_l), *pf_end = pf;
        if (b + 1 < b1 && c->stride_d == 1) {
            const int64_t nn = n - (b + 1) * SUB < SUB ? n - (b + 1) * SUB : SUB;
            pf_end = (const char *)(keys + ((b + 1) * SUB + nn - 1) * c->stride_l + c->d);
        }
        const int64_t lines = ((pf_end - pf) / 64 + groups) / groups;
        const uint32_t *kw = (const uint32_t *)kb;
        int8_rows(c, kw, nv, b, 0, gm, RB8, &pf, pf_end, lines);
        if (nrv - gm == 2) int8_rows(c, kw, nv, b, gm, nrv, 2, &pf, pf_end, lines);
        if (nrv - gm == 1) int8_rows(c, kw, nv, b, gm, nrv, 1, &pf, pf_end, lines);
    }
}

/* int8_bounds of the VNNI pass with 8 lanes (two blocks), the threshold sub_threshold's over W. */
static float int8_bounds(const call_t *c, int r, float *S, int64_t nb, int k, float *kth) {
    const __m256 s = _mm256_set1_ps(c->srow[r]), er = _mm256_set1_ps(c->erow[r]), ck = _mm256_set1_ps(c->c_k);
    const __m256 inf = _mm256_set1_ps(INFINITY), ninf = _mm256_set1_ps(-INFINITY);
    for (int64_t b = 0; b < nb; b += 2) {   /* block nb (when nb is odd) is padding: its lanes are overwritten below */
        const __m256 t = _mm256_setr_m128(_mm_set1_ps(c->X[b]), _mm_set1_ps(c->X[b + 1]));
        const __m256 cst = _mm256_mul_ps(s, t);
        const __m256 open = _mm256_cmp_ps(cst, inf, _CMP_EQ_OQ);   /* not quantized: rescored in full */
        const __m256 m = _mm256_loadu_ps(S + b * NS);
        const __m256 e2 = _mm256_fmadd_ps(_mm256_loadu_ps(c->X + c->nbp + b * NS), ck, er);   /* m = -inf stays */
        _mm256_storeu_ps(S + b * NS, _mm256_blendv_ps(_mm256_mul_ps(cst, _mm256_add_ps(m, e2)), inf, open));
        _mm256_storeu_ps(kth + b * NS, _mm256_blendv_ps(_mm256_mul_ps(cst, _mm256_sub_ps(m, e2)), ninf, open));
    }
    const int m = (int)(NS * nb);
    for (int i = m; i < (m + 7) / 8 * 8; i++) kth[i] = -INFINITY;   /* sub_threshold reads 8 at a time */
    return m > k ? sub_threshold(kth, m, k, kth) : -INFINITY;
}
#endif

/* The sub-blocks of s[0..NS) whose maximum reaches t -> bits. */
static inline uint32_t subs_ge(const float *s, float t) {
#ifdef __AVX__
    return (uint32_t)_mm_movemask_ps(_mm_cmp_ps(_mm_loadu_ps(s), _mm_set1_ps(t), _CMP_GE_OQ));
#else
    uint32_t m = 0;
    for (int v = 0; v < NS; v++) m |= (uint32_t)(s[v] >= t) << v;
    return m;
#endif
}

/* Sub-block v of block b (events b SUB + SUBW v ..) transposed into buf's lanes SUBW v .. SUBW v + SUBW - 1
   (the blocked layout), zeros past n: pass 2 without T transposes only the sub-blocks it rescores (at
   L = 100k, C = 200 about half of them; all of T was a fifth of a bf16 call, writing it included). */
static void sub_block_of(const call_t *c, const float *keys, int64_t n, int64_t b, int v, float *buf) {
    const int d = c->d;
    const int64_t e0 = b * SUB + SUBW * v, e1 = n - e0 < SUBW ? n : e0 + SUBW;
    float *out = buf + SUBW * v;
    int64_t e = e0;
#ifdef __AVX__
    if (c->stride_d == 1 && d >= 8)
        for (; e + 8 <= e1; e += 8) {
            const float *x = keys + e * c->stride_l;
            int j = 0;
            for (; j + 8 <= d; j += 8) transpose8(x + j, c->stride_l, out + j * SUB + (e - e0), SUB);
            for (; j < d; j++)
                for (int t = 0; t < 8; t++) out[j * SUB + (e - e0) + t] = x[t * c->stride_l + j];
        }
#endif
    for (; e < e1; e++)
        for (int j = 0; j < d; j++) out[j * SUB + (e - e0)] = keys[e * c->stride_l + j * c->stride_d];
    for (; e < e0 + SUBW; e++)
        for (int j = 0; j < d; j++) out[j * SUB + (e - e0)] = 0.0f;
}

/* Appends the lanes of a set in `lanes` (scores to s, indices first + lane to e), branch-free -> how many. A
   full-vector store: up to VW slots past them are written. */
static inline int append_lanes(vf a, uint32_t lanes, int32_t first, float *s, int32_t *e) {
#ifdef __AVX512F__
    _mm512_storeu_ps(s, _mm512_maskz_compress_ps((__mmask16)lanes, (__m512)a));
    _mm512_storeu_si512(e, _mm512_maskz_compress_epi32(
        (__mmask16)lanes, _mm512_add_epi32(_mm512_set1_epi32(first),
                                           _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15))));
#elif defined(__AVX2__)
    const __m256i perm = _mm256_loadu_si256((const __m256i *)compress8[lanes]);
    _mm256_storeu_ps(s, _mm256_permutevar8x32_ps((__m256)a, perm));
    _mm256_storeu_si256((__m256i *)e, _mm256_add_epi32(_mm256_set1_epi32(first), perm));
#else
    int m = 0;
    for (; lanes; lanes &= lanes - 1, m++) {
        const int t = __builtin_ctz(lanes);
        s[m] = a[t];
        e[m] = first + t;
    }
    return m;
#endif
    return __builtin_popcount(lanes);
}

/* Rescore items u < n_it (sub-block it_v[u] of the current block for row index it_row[u]) with independent
   accumulators, then append each one's events scoring >= the row's threshold to its candidates. */
static inline void rescore_group(const call_t *c, const float *Tb, int64_t left, int64_t b, const int *it_row,
                                 const int *it_v, int n_it, int r0, float *cs, int32_t *ci, int32_t *cnt,
                                 float *tau, float *kth) {
    const int d = c->d, k = c->k, cap = c->cap;
    const float *q[4], *x[4];
    for (int u = 0; u < 4; u++) {   /* the slots past n_it repeat the last item; their results are dropped */
        const int w = u < n_it ? u : n_it - 1;
        q[u] = c->q + (int64_t)(it_row[w] + r0) * d;
        x[u] = Tb + SUBW * it_v[w];
    }
    vf acc[4][SV];
    for (int u = 0; u < 4; u++)
        for (int h = 0; h < SV; h++) acc[u][h] = (vf){0};
    for (int j = 0; j < d; j++)
        for (int u = 0; u < 4; u++)
            for (int h = 0; h < SV; h++) {
                vf xv;
                memcpy(&xv, x[u] + j * SUB + VW * h, sizeof xv);
                acc[u][h] += q[u][j] * xv;
            }
    for (int u = 0; u < n_it; u++) {
        const int i = it_row[u], v = it_v[u];
        float *s = cs + (int64_t)i * cap;
        int32_t *e = ci + (int64_t)i * cap;
        if (cnt[i] > cap - SUBW - 16) cnt[i] = keep_best(s, e, cnt[i], k, kth, &tau[i]);
        for (int h = 0; h < SV; h++) {
            vf a = acc[u][h];
            const int32_t offset = SUBW * v + VW * h;   /* of lane 0 in the block */
            if (left < SUB) {
                vfi lane;
                for (int t = 0; t < VW; t++) lane[t] = t;
                const vfi keep = (lane + offset) < (int32_t)left;
                a = (vf)(((vfi)a & keep) | ((vfi)((vf){0} - INFINITY) & ~keep));
            }
            const uint32_t lanes = lanes_ge(a, (vf){0} + tau[i]);
            cnt[i] += append_lanes(a, lanes, (int32_t)(b * SUB) + offset, s + cnt[i], e + cnt[i]);
        }
    }
}

static void finish_rows(const call_t *c, int r0, int r1, float *cs, int32_t *ci, int32_t *cnt, float *tau, float *kth,
                        int32_t *rank);

/* Pass 2 for rows [r0, r1) (row r's block maxima at M + (r - r0) nbp with KEEP_M, nb blocks, -inf padded to
   nbp, a multiple of 8; its sub-block maxima at sub_max + (r - r0) nbp NS). tau_r = the k-th largest block
   maximum of row r (KEEP_M), else the k-th largest sub-block maximum: k blocks (sub-blocks) hold an event
   scoring >= tau_r, so the k-th best score is >= tau_r and every event of the top k lies in a sub-block whose
   maximum reaches tau_r. Only those sub-blocks (about k + 1 per row) are rescored (same arithmetic, same
   values) and their events scoring >= tau_r appended to the row's candidates (about k + 1 per row; when the
   slots fill up, the best k are kept and tau_r raised). The (block, row) pairs are visited block by block, so
   a block is read once into L1 for all the rows that need it (rows visiting the whole T one by one were
   bound by L2 reads), and each row appends in increasing index. At the end each row's candidates are
   ranked (score desc, index asc: ties to the lower index) and the first k written: a sorted list with an
   insert per candidate was 60% of this pass (a mispredicted branch and a store-forwarding stall each).
   Scratch: tau [r1 - r0], start [nbp + 1], rows [(r1 - r0) nb], kth [kth_floats(max(nbp, cap))], cs
   and ci [(r1 - r0) cap], cnt [r1 - r0], rank [cap]; without KEEP_M also M [(r1 - r0) nbp], the block lists. */
static void pass2(const call_t *c, int r0, int r1, int64_t n, const float *T, const float *keys, float *block_buf,
                  float *M, float *sub_max, int64_t nbp,
                  float *tau, int32_t *start, int32_t *rows, float *kth, float *cs, int32_t *ci, int32_t *cnt,
                  int32_t *rank) {
    const int d = c->d, k = c->k, cap = c->cap;
    (void)cap;
    const int64_t nb = (n + SUB - 1) / SUB;
    for (int r = r0; r < r1; r++) {
        cnt[r - r0] = 0;
        tau[r - r0] = -INFINITY;
#if INT8
        if (c->lowp == 8) {   /* S becomes upper bounds, tau the k-th largest lower one */
            tau[r - r0] = int8_bounds(c, r, sub_max + (int64_t)(r - r0) * nbp * NS, nb, k, kth);
            continue;
        }
#endif
#if LOWP
        if (c->lowp) {
            tau[r - r0] = lowp_bounds(c, r, sub_max + (int64_t)(r - r0) * nbp * NS, nb, k, kth);
            continue;
        }
#endif
#if KEEP_M
        if (nb > k) tau[r - r0] = kth_largest_v(M + (int64_t)(r - r0) * nbp, (int)nb, k, kth);
#else
        if (NS * nb > k) tau[r - r0] = sub_threshold(sub_max + (int64_t)(r - r0) * nbp * NS, (int)(NS * nb), k, kth);
#endif
    }
    /* counting sort of the pairs by block: start[b + 1] counts, then offsets, then fill */
    for (int64_t b = 0; b <= nb; b++) start[b] = 0;
#if KEEP_M
    for (int pass = 0; pass < 2; pass++) {
        for (int r = r0; r < r1; r++) {
            const v8 vtau = (v8){0} + tau[r - r0];
            for (int64_t b8 = 0; b8 < nb; b8 += 8) {   /* the blocks that reach tau, 8 tested at once */
                uint32_t blocks;
#if LOWP || INT8_VNNI
                if (c->lowp) {   /* no block maxima: the blocks with a sub-block U >= tau */
                    const float *Sr = sub_max + ((int64_t)(r - r0) * nbp + b8) * NS;
                    const __m512 vt = _mm512_set1_ps(tau[r - r0]);
                    const uint32_t subs = (uint32_t)_mm512_cmp_ps_mask(_mm512_loadu_ps(Sr), vt, _CMP_GE_OQ) |
                                          (uint32_t)_mm512_cmp_ps_mask(_mm512_loadu_ps(Sr + 16), vt, _CMP_GE_OQ) << 16;
                    blocks = _pext_u32(subs | subs >> 1 | subs >> 2 | subs >> 3, 0x11111111u);
                } else
#endif
                {
                    v8 mb;
                    memcpy(&mb, M + (int64_t)(r - r0) * nbp + b8, sizeof mb);
                    blocks = mask8(mb >= vtau);
                }
                if (nb - b8 < 8) blocks &= (1u << (nb - b8)) - 1u;   /* never the padding (tau may be -inf) */
                for (; blocks; blocks &= blocks - 1) {
                    int64_t b = b8 + __builtin_ctz(blocks);
                    if (pass == 0) start[b + 1]++;
                    else rows[start[b]++] = r;
                }
            }
        }
        if (pass == 0)
            for (int64_t b = 0; b < nb; b++) start[b + 1] += start[b];
    }
#else
    /* the blocks with a sub-block maximum >= tau: each row's listed in M's place as they are counted, so the
       fill reads the lists instead of testing all of S again (pairing took 0.085 of pass 2's 0.30 ms at
       L = 10k, C = 200, d = 16, one thread on Zen 3, 0.032 so); cnt holds the list lengths until the fill */
    for (int r = r0; r < r1; r++) {
        int32_t *list = (int32_t *)M + (int64_t)(r - r0) * nbp;
        int m = 0;
        const v8 vtau = (v8){0} + tau[r - r0];
        for (int64_t b8 = 0; b8 < nb; b8 += 8) {
            const float *Sr = sub_max + ((int64_t)(r - r0) * nbp + b8) * NS;   /* two blocks per 8 lanes */
            uint32_t blocks = 0;
            for (int h = 0; h < 4; h++) {
                v8 sv;
                memcpy(&sv, Sr + 8 * h, sizeof sv);
                const uint32_t ge = mask8(sv >= vtau);
                blocks |= (uint32_t)((ge & 0xF) != 0) << 2 * h | (uint32_t)((ge >> 4) != 0) << (2 * h + 1);
            }
            if (nb - b8 < 8) blocks &= (1u << (nb - b8)) - 1u;   /* never the padding (tau may be -inf) */
            for (; blocks; blocks &= blocks - 1) {
                const int32_t b = (int32_t)b8 + __builtin_ctz(blocks);
                start[b + 1]++;
                list[m++] = b;
            }
        }
        cnt[r - r0] = m;
    }
    for (int64_t b = 0; b < nb; b++) start[b + 1] += start[b];
    for (int r = r0; r < r1; r++) {
        const int32_t *list = (const int32_t *)M + (int64_t)(r - r0) * nbp;
        for (int t = 0; t < cnt[r - r0]; t++) rows[start[list[t]]++] = r;
        cnt[r - r0] = 0;
    }
#endif
    /* after the fill start[b] is the end of block b's rows, i.e. the start of block b + 1's */
    /* Only the sub-blocks whose maximum reaches the row's threshold are rescored (about k + 1 per row),
       GROUP of them at once: one alone is a chain of d dependent multiply-adds, latency-bound. Each is
       score_block's chain for that vector, so the same values. The items of a row come in index order. */
    enum { GROUP = 4 };
    int it_row[GROUP], it_v[GROUP];
    int64_t next = 0;   /* without T: the next block with pairs, whose sub-blocks are being prefetched */
    for (int64_t b = 0, p = 0; b < nb; b++) {
        if (p == start[b]) continue;
        const float *Tb = block_buf ? block_buf : T + b * d * SUB;
        uint32_t have = block_buf ? 0 : 0xF;   /* sub-blocks of Tb in place */
        if (block_buf) {
            /* the keys of the sub-blocks the next block rescores, one block ahead: transposing them from
               memory waited on cache misses for 60% of this pass at L = 100k, C = 200 (prefetching T's
               sub-blocks the same way made rescoring slower at L = 10k, C = 200, d = 16 on Zen 3) */
            if (next <= b) next = b + 1;
            while (next < nb && start[next] == start[next - 1]) next++;
            if (next < nb) {
                uint32_t need = 0;
                for (int64_t q = start[b]; q < start[next]; q++) {
                    const int i = rows[q] - r0;
                    need |= subs_ge(sub_max + ((int64_t)i * nbp + next) * NS, tau[i]);
                }
                for (; need; need &= need - 1) {
                    const int64_t e0 = next * SUB + SUBW * __builtin_ctz(need), e1 = n - e0 < SUBW ? n : e0 + SUBW;
                    const char *lo = (const char *)(keys + e0 * c->stride_l), *hi = (const char *)(keys + (e1 - 1) * c->stride_l + (int64_t)(d - 1) * c->stride_d);
                    for (const char *a = lo; a <= hi + 63; a += 64) __builtin_prefetch(a, 0, 3);
                }
            }
        }
        const int64_t left = n - b * SUB;
        int n_it = 0;
        for (;;) {
            const int done = p == start[b];
            if (!done) {
                const int i = rows[p++] - r0;
                for (uint32_t subs = subs_ge(sub_max + ((int64_t)i * nbp + b) * NS, tau[i]); subs; subs &= subs - 1) {
                    if (!(have >> __builtin_ctz(subs) & 1)) {
                        sub_block_of(c, keys, n, b, __builtin_ctz(subs), block_buf);
                        have |= 1u << __builtin_ctz(subs);
                    }
                    it_row[n_it] = i;
                    it_v[n_it++] = __builtin_ctz(subs);
                    if (n_it == GROUP) {
                        rescore_group(c, Tb, left, b, it_row, it_v, GROUP, r0, cs, ci, cnt, tau, kth);
                        n_it = 0;
                    }
                }
            }
            if (done) break;
        }
        if (n_it) rescore_group(c, Tb, left, b, it_row, it_v, n_it, r0, cs, ci, cnt, tau, kth);
    }
    finish_rows(c, r0, r1, cs, ci, cnt, tau, kth, rank);
}

/* Rows [r0, r1) after pass 2: each row's candidates (index order) ranked (score desc, index asc: ties to the
   lower index) and the first k written out. */
static void finish_rows(const call_t *c, int r0, int r1, float *cs, int32_t *ci, int32_t *cnt, float *tau, float *kth,
                        int32_t *rank) {
    const int k = c->k, cap = c->cap;
    (void)tau;
    (void)kth;
    for (int r = r0; r < r1; r++) {
        const int i = r - r0;
        float *S = c->out_s + (int64_t)r * k;
        int64_t *I = c->out_i + (int64_t)r * k;
        for (int t = 0; t < k; t++) { S[t] = -INFINITY; I[t] = -1; }
#ifndef __AVX512F__   /* with AVX-512 ranking all of them costs less than selecting the best k first */
        if (cnt[i] > k) cnt[i] = keep_best(cs + (int64_t)i * cap, ci + (int64_t)i * cap, cnt[i], k, kth, &tau[i]);
#endif
        const int m = cnt[i];
        rank_candidates(cs + (int64_t)i * cap, m, rank);
        for (int j = 0; j < m; j++)
            if (rank[j] < k) {
                S[rank[j]] = cs[(int64_t)i * cap + j];
                I[rank[j]] = ci[(int64_t)i * cap + j];
            }
    }
}

/* bad[r]: the row's query or its history holds a NaN or inf, or d * max|q| * max|x| could overflow. */
static void flag_row(const call_t *c, int r, int x_ok, float xmax) {
    float qmax = 0.0f, q_check = 0.0f;
    for (int j = 0; j < c->d; j++) {
        float a = fabsf(c->q[(int64_t)r * c->d + j]);
        q_check += a * 0.0f;
        qmax = a > qmax ? a : qmax;
    }
    c->bad[r] = !(x_ok && q_check == 0.0f && (double)c->d * qmax * xmax < 0.5 * FLT_MAX);
}

static void reduce_check(v8 check, v8 amax, int *x_ok, float *xmax) {
    *x_ok = 1;
    *xmax = 0.0f;
    for (int t = 0; t < 8; t++) {
        *x_ok &= check[t] == 0.0f;
        *xmax = amax[t] > *xmax ? amax[t] : *xmax;
    }
}

static inline int64_t blocks_of(int64_t n) { return (n + SUB - 1) / SUB; }
static inline int64_t padded8(int64_t nb) { return (nb + 7) / 8 * 8; }
static inline int64_t align8(int64_t x) { return (x + 7) / 8 * 8; }   /* keeps 32-byte alignment */
static inline size_t align64(size_t bytes) { return (bytes + 63) / 64 * 64; }

/* Whether to drop the transposed copy T of a history: when R rows visit at most about R (k + 1) of its nb
   blocks in pass 2, transposing those again costs less than writing and rereading all of T (at L = 100k,
   C = 1, d = 64 T is 25.6 MB: the search was DRAM-bound on it). */
static inline int few_rows_skip_T(int64_t R, int k, int64_t nb) { return 2 * R * ((int64_t)k + 1) < nb; }

/* A row's maxima past its nb blocks, to nbp: -inf (KEEP_M: M's, read 8 at a time; else S's, which
   sub_threshold reads 8 at a time). */
static void pad_maxima(float *M, float *S, int64_t nb, int64_t nbp) {
#if KEEP_M
    (void)S;
    for (int64_t b = nb; b < nbp; b++) M[b] = -INFINITY;
#else
    (void)M;
    for (int64_t i = nb * NS; i < nbp * NS; i++) S[i] = -INFINITY;
#endif
}

/* Worker t's part of call c (t < c->n_threads). */
static void run_part(call_t *c, int t) {
    const int nt = c->n_threads, d = c->d;
    char *mine = c->ws + (size_t)t * c->ws_stride;
    v8 check = (v8){0}, amax = (v8){0};
    if (c->key_row_stride == 0) {
        /* One shared history: the workers split its blocks for pass 1 (each transposes only its own
           part, all rows score it), then split the rows for pass 2, which reads the whole T. Pass 1 in chunks
           taken in turn (about 8 per worker), not a fixed share each: a worker that another process
           preempts holds the others up at the barrier by its chunk, not by its whole share (Zen 3 VM, two threads,
           L = 100k, C = 200, d = 33, another process spinning on the second core: 22.5 ms with halves, 15.1 with
           chunks, 13.8 on one thread; idle: 8.5 and 8.3 against 13.7-14.8). */
        const int64_t n = c->n[0], nb = blocks_of(n), nbp = c->nbp, tile = tile_blocks(d);
        const int64_t tiles = (nb + tile - 1) / tile, tchunk = nt == 1 ? tiles : (tiles + 8 * nt - 1) / (8 * nt);
        char *bufs = mine + align64((size_t)(c->sel + align8(nbp + 1) + c->cap) * 4);
        float *tile_buf = c->keep_T ? NULL : (float *)bufs;
#if LOWP || INT8
        uint32_t *kb = (uint32_t *)(bufs + (c->keep_T ? 0 : (size_t)c->tile_floats * 4));   /* lowp: a block's converted keys */
#endif
        for (int64_t first; tiles > 0 && (first = __atomic_fetch_add(&c->next_tile, tchunk, __ATOMIC_RELAXED)) < tiles;) {
            const int64_t b0 = first * tile, b1 = (first + tchunk) * tile < nb ? (first + tchunk) * tile : nb;
#if LOWP || INT8
            if (c->lowp) {
#if INT8
                if (c->lowp == 8) pass1_int8(c, c->keys, n, b0, b1, (uint8_t *)kb, &check, &amax);
#endif
#if LOWP
                if (c->lowp == 16)
                    pass1_lowp(c, c->keys, n, b0, b1, c->keep_T ? c->T : NULL, kb, (float *)(kb + SUB * ((d + 1) / 2)), &check, &amax);
#endif
            } else
#endif
            pass1(c, c->keys, n, b0, b1, 0, c->R, c->T, tile_buf, c->M, c->S, nbp, &check, &amax);
            reduce_check(check, amax, &c->x_ok[t], &c->xmax[t]);   /* this worker's chunks so far, before they count as done */
            c->chunks[t]++;
            __atomic_fetch_add(&c->done_tiles, (first + tchunk < tiles ? first + tchunk : tiles) - first, __ATOMIC_RELEASE);
        }
        /* The barrier: every tile scored, by whichever worker took it. A worker that took none, or never came
           (a lent thread that arrives late, topk_team_join), holds nobody up: only a chunk in progress is waited for. */
        while (__atomic_load_n(&c->done_tiles, __ATOMIC_ACQUIRE) < tiles) cpu_relax();
        int x_ok = 1;
        float xmax = 0.0f;
        for (int u = 0; u < nt; u++) {
            x_ok &= c->x_ok[u];
            xmax = c->xmax[u] > xmax ? c->xmax[u] : xmax;
        }
        /* a chunk's rows index the shared tau and pairs, so their size does not depend on the team's. Pass 2 takes one
           chunk per worker, not 8: every chunk walks all blocks and transposes again the sub-blocks its rows rescore,
           in groups of four items that a few rows fill only in part (Intel Xeon with AVX512-VNNI, two threads, C = 200:
           L = 10k, d = 16 pass 2 300 -> 228 us of a 454 -> 377 us search; L = 100k, d = 33 4.12 -> 3.75 ms). Chunks
           start at multiples of 16 rows: two workers' rows in one cache line of cnt and tau (written per rescored
           sub-block) made pass 2 at L = 10k, d = 16 take 351 instead of 303 us with chunks of 13 rows. Still taken in
           turn, so a member that arrives late (retrieval.lend) finds the second chunk done, or takes it; the price is
           that a worker preempted in pass 2 holds the other up by up to half of it (pass 1, most of a long search,
           keeps its 8 chunks). */
        const int64_t cap = c->cap;
        float *kth = (float *)mine;
        int32_t *start = (int32_t *)(kth + c->sel), *rank = start + align8(nbp + 1);
        const int rchunk = nt == 1 ? c->R : ((c->R + nt - 1) / nt + 15) / 16 * 16;
        for (int r0; (r0 = __atomic_fetch_add(&c->next_row, rchunk, __ATOMIC_RELAXED)) < c->R;) {
            const int r1 = r0 + rchunk < c->R ? r0 + rchunk : c->R;
            pass2(c, r0, r1, n, c->T, c->keys, tile_buf, c->M + (int64_t)r0 * nbp, c->S + (int64_t)r0 * nbp * NS, nbp, c->tau + r0, start, c->pairs + (int64_t)r0 * nbp, kth,
                  c->cs + r0 * cap, c->ci + r0 * cap, c->cnt + r0, rank);
            for (int r = r0; r < r1; r++) flag_row(c, r, x_ok, xmax);
            c->chunks[t]++;
            __atomic_fetch_add(&c->done_rows, r1 - r0, __ATOMIC_RELEASE);
        }
        while (__atomic_load_n(&c->done_rows, __ATOMIC_ACQUIRE) < c->R) cpu_relax();   /* the rows others are finishing */
    } else {
        /* One history per row: the workers split the rows; each transposes and scans its rows'
           histories one by one in its own scratch. */
        const int64_t nbp = c->nbp;
        const int64_t cap = c->cap;
        float *tau = (float *)mine, *kth = tau + 8, *M = kth + c->sel, *cs = M + nbp;
        int32_t *start = (int32_t *)(cs + cap), *rows = start + align8(nbp + 1), *ci = rows + nbp, *rank = ci + cap;
        int32_t *cnt = rank + cap;
        float *S = (float *)(cnt + 16), *tile = S + nbp * NS, *T = tile + c->tile_floats;   /* sizes: multiples of 32 floats */
        for (int r = c->R * t / nt; r < c->R * (t + 1) / nt; r++) {
            const int64_t n = c->n[r], nb = blocks_of(n);
            pad_maxima(M, S, nb, padded8(nb));
            check = (v8){0};
            amax = (v8){0};
            const float *keys = c->keys + (int64_t)r * c->key_row_stride;
            float *tile_buf = few_rows_skip_T(1, c->k, nb) ? tile : NULL;
            pass1(c, keys, n, 0, nb, r, r + 1, T, tile_buf, M, S, 0, &check, &amax);
            int x_ok;
            float xmax;
            reduce_check(check, amax, &x_ok, &xmax);
            pass2(c, r, r + 1, n, T, keys, tile_buf, M, S, nbp, tau, start, rows, kth, cs, ci, cnt, rank);
            flag_row(c, r, x_ok, xmax);
        }
    }
}

/* The calling thread keeps its workspace between calls (up to KEEP_BYTES): fresh pages for a
   history-sized buffer on every call cost page faults comparable to the search itself. */
#define KEEP_BYTES ((size_t)64 << 20)
static __thread void *kept_ws;
static __thread size_t kept_size;

static void *workspace(size_t bytes) {
    if (bytes <= kept_size) return kept_ws;
    void *mem = NULL;
    if (posix_memalign(&mem, 64, bytes) != 0) return NULL;
    if (bytes <= KEEP_BYTES) {
        free(kept_ws);
        kept_ws = mem;
        kept_size = bytes;
    }
    return mem;
}


/* A child forked after this library loaded inherits libgomp's state but not its threads: a parallel
   region there waits forever (torch's own ops too), so the child searches on its own thread. */
static int forked;
static void mark_forked(void) {
    forked = 1;
#if INT8_AMX
    amx_granted = -1;   /* asked again in the child */
#endif
}
__attribute__((constructor)) static void register_fork_handler(void) { pthread_atfork(NULL, NULL, mark_forked); }

/* 1 when this build's int8 pass 1 runs on AMX tiles here (d <= 64): built for AMX-INT8 and granted the tile state. */
int topk_int8_amx(void) {
#if INT8_AMX
    return amx_permitted();
#else
    return 0;
#endif
}

/* 8 when a call with these sizes (n: the longest history) runs pass 1 in int8, 16 in bf16 (see the header), else
   32: what a measurement ran. */
int topk_pass1_bits(int R, int d, int64_t key_row_stride, int64_t n) {
    if (key_row_stride != 0 || R < LOWP_MIN_ROWS) return 32;
    if (INT8 && d <= INT8_MAX_D && R >= INT8_MIN_ROWS && n >= INT8_MIN_LEN) return 8;
    return LOWP && d <= LOWP_MAX_D ? 16 : 32;
}

/* Whether this build can run pass 1 of such a call in `bits` (8, 16, 32) when asked to (topk_search's `bits`),
   whatever topk_pass1_bits would choose: the thresholds above were measured on one CPU (Zen 4), and the
   dispatch measures the variants where it runs (retrieval/dispatch.py). */
int topk_pass1_can(int R, int d, int64_t key_row_stride, int bits) {
    if (bits == 32) return 1;
    if (key_row_stride != 0 || R < LOWP_MIN_ROWS) return 0;
    if (bits == 8) return INT8 && d <= INT8_MAX_D;
    if (bits == 16) return LOWP && d <= LOWP_MAX_D;
    return 0;
}

#if INT8
static int cmp_int(const void *a, const void *b) { return (*(const int *)a > *(const int *)b) - (*(const int *)a < *(const int *)b); }

#if INT8_VNNI
/* mx[j] = max(mx[j], |x_j|) for j < d (mx holds d rounded up to 16). */
static inline void fold_abs_max(float *mx, const float *x, int d) {
    for (int j = 0; j < d; j += 16) {
        const __mmask16 in = d - j >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (d - j)) - 1u);
        _mm512_storeu_ps(mx + j, _mm512_max_ps(_mm512_loadu_ps(mx + j), _mm512_abs_ps(_mm512_maskz_loadu_ps(in, x + j))));
    }
}

/* max_j |q_j| / g_j (exact: powers of two); a NaN is its row's flag's business. */
static inline float row_max(const float *qr, const float *g, int d) {
    __m512 mq = _mm512_setzero_ps();
    for (int j = 0; j < d; j += 16) {
        const __mmask16 in = d - j >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (d - j)) - 1u);
        mq = _mm512_max_ps(mq, _mm512_div_ps(_mm512_abs_ps(_mm512_maskz_loadu_ps(in, qr + j)),
                                             _mm512_mask_loadu_ps(_mm512_set1_ps(1.0f), in, g + j)));
    }
    return _mm512_reduce_max_ps(mq);
}

/* q8[j] = q~_j = RNE(q_j p_j), p_j = inv_s / g_j (exact), for j < D (dims past d 0); *q1 = sum |q~_j|, *sum = sum q~_j. */
static inline void row_quantize(const float *qr, const float *g, int d, int D, float inv_s, int8_t *q8, int *q1, int *sum) {
    __m512i a1 = _mm512_setzero_si512(), as = _mm512_setzero_si512();
    for (int j = 0; j < D; j += 16) {
        const int left = d - j;
        const __mmask16 in = left >= 16 ? (__mmask16)0xFFFF : left <= 0 ? 0 : (__mmask16)((1u << left) - 1u);
        const __m512 p = _mm512_div_ps(_mm512_set1_ps(inv_s), _mm512_mask_loadu_ps(_mm512_set1_ps(1.0f), in, g + j));
        __m512i k = _mm512_cvt_roundps_epi32(_mm512_mul_ps(_mm512_maskz_loadu_ps(in, qr + j), p),
                                             _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        /* within +-QMAX by construction; the clamp only keeps a NaN query (its row is redone) from -128 */
        k = _mm512_min_epi32(_mm512_max_epi32(k, _mm512_set1_epi32(-QMAX)), _mm512_set1_epi32(QMAX));
        a1 = _mm512_add_epi32(a1, _mm512_abs_epi32(k));
        as = _mm512_add_epi32(as, k);
        _mm_storeu_si128((__m128i *)(q8 + j), _mm512_cvtsepi32_epi8(k));
    }
    *q1 = _mm512_reduce_add_epi32(a1);
    *sum = _mm512_reduce_add_epi32(as);
}
#else
/* The same in scalar code: once per call and row, d values each. */
static inline void fold_abs_max(float *mx, const float *x, int d) {
    for (int j = 0; j < d; j++) mx[j] = fabsf(x[j]) > mx[j] ? fabsf(x[j]) : mx[j];
}

static inline float row_max(const float *qr, const float *g, int d) {
    float m = 0.0f;
    for (int j = 0; j < d; j++) m = fabsf(qr[j]) / g[j] > m ? fabsf(qr[j]) / g[j] : m;
    return m;
}

static inline void row_quantize(const float *qr, const float *g, int d, int D, float inv_s, int8_t *q8, int *q1, int *sum) {
    *q1 = *sum = 0;
    for (int j = 0; j < D; j++) {
        const float p = inv_s / (j < d ? g[j] : 1.0f), x = j < d ? qr[j] * p : 0.0f;
        /* RNE whatever MXCSR says; the clamp only keeps a NaN query (its row is redone) in range */
        int k = _mm_cvtss_si32(_mm_round_ss(_mm_setzero_ps(), _mm_set_ss(x), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
        k = k < -QMAX ? -QMAX : k > QMAX ? QMAX : k;
        *q1 += k < 0 ? -k : k;
        *sum += k;
        q8[j] = (int8_t)k;
    }
}
#endif

/* The int8 pass's per-call state (see the header): column scales g_j from the queries and a sample of the keys,
   each row's s8 query, bias, s_r and e_r, and c_k. */
static void int8_setup(call_t *c, const float *q, int64_t n) {
    const int d = c->d, R = c->R, D = (d + 3) / 4 * 4;
    const int64_t Rp = c->Rp;
    /* g_j = 2^e_j, e_j ~ log2 sqrt(max_r |q_rj| / max |x_j|) (over up to 256 events spread over the history) less
       their median, within [-8, 8]: a column far smaller in the keys than in the queries (DARE's folded position)
       no longer sets a row's scale alone. Any powers of two keep the bound; these make it tight. */
    int ex[INT8_MAX_D], sorted[INT8_MAX_D], n_ok = 0;
    float qc[INT8_MAX_D + 16], xc[INT8_MAX_D + 16], row[INT8_MAX_D + 16];
    memset(qc, 0, sizeof(float) * (size_t)(d + 16));
    memset(xc, 0, sizeof(float) * (size_t)(d + 16));
    for (int r = 0; r < R; r++) fold_abs_max(qc, q + (int64_t)r * d, d);
    const int64_t ns = n < 256 ? n : 256;
    for (int64_t i = 0; i < ns; i++) {
        const int64_t e = ns > 1 ? i * (n - 1) / (ns - 1) : 0;
        const float *x = c->keys + e * c->stride_l;
        if (c->stride_d != 1) {
            for (int j = 0; j < d; j++) row[j] = x[j * c->stride_d];
            x = row;
        }
        fold_abs_max(xc, x, d);
    }
    for (int j = 0; j < d; j++) {
        ex[j] = INT32_MIN;
        if (qc[j] > 0.0f && xc[j] > 0.0f && qc[j] <= FLT_MAX && xc[j] <= FLT_MAX)
            sorted[n_ok++] = ex[j] = (int)lrint(0.5 * log2((double)qc[j] / xc[j]));
    }
    int med = 0;
    if (n_ok) {
        qsort(sorted, (size_t)n_ok, sizeof(int), cmp_int);
        med = sorted[n_ok / 2];
    }
    for (int j = 0; j < d; j++) {
        const int e = ex[j] == INT32_MIN ? 0 : ex[j] - med < -8 ? -8 : ex[j] - med > 8 ? 8 : ex[j] - med;
        c->gcol[j] = ldexpf(1.0f, e);
    }
    for (int j = d; j < D + 32; j++) c->gcol[j] = 0.0f;   /* AVX2's conversion reads whole 32-dim groups */
    const double w = 0x1p-23, alpha = 0.5 + 0x1p-16, g2d = 2 * d * w / (1 - 2 * d * w);
    const double ck = alpha + g2d * (QMAX + alpha);
    c->c_k = (float)ck;
    if ((double)c->c_k < ck) c->c_k = nextafterf(c->c_k, INFINITY);
    uint32_t *qt = (uint32_t *)c->qt;
    memset(qt, 0, (size_t)(D / 4) * Rp * 4);   /* the padding rows score their bias, 0, and are never read */
    memset(c->qbias, 0, (size_t)Rp * 4);
    int8_t q8[INT8_MAX_D + 16];
    for (int r = 0; r < R; r++) {
        const float *qr = q + (int64_t)r * d;
        const float maxq = row_max(qr, c->gcol, d);
        const int ok = maxq <= 0x1p47f;
        const float inv_s = !ok ? 0.0f : maxq > (float)QMAX * 0x1p-40f ? (float)QMAX / maxq : 0x1p40f;
        c->srow[r] = ok ? 1.0f / inv_s : INFINITY;
        int q1i, sum;
        row_quantize(qr, c->gcol, d, D, inv_s, q8, &q1i, &sum);
        c->qbias[r] = -128 * sum;
        for (int i = 0; i < D / 4; i++) {
            uint32_t word;
            memcpy(&word, q8 + 4 * i, 4);
            qt[(int64_t)i * Rp + r] = word;
        }
        const double q1s = q1i, er = alpha * q1s + d * alpha * alpha + g2d * (QMAX + alpha) * alpha * d + 1;
        const double e2r = er + 0x1p-18 * (127 * q1s + 127.0 * d * c->c_k + er);   /* the header's e2_r (127: |k~|'s bound) */
        c->erow[r] = (float)e2r;
        if ((double)c->erow[r] < e2r) c->erow[r] = nextafterf(c->erow[r], INFINITY);
    }
}
#endif

/* A team for one serving-layout call (../team.h): the caller (topk_search_team) is worker 0 of run_part, and this,
   called from another thread, worker 1 once the call is open; 1 when it took part, 0 when it was closed first. */
int topk_team_join(team_t *team) {
    call_t *c = team_enter(team);
    if (c == NULL) return 0;
    run_part(c, 1);
    team_leave(team);
    return 1;
}

void topk_team_close(team_t *team) { team_close(team); }

static int search(const float *q, const float *keys, int64_t key_row_stride, int64_t stride_l, int64_t stride_d,
                  const int64_t *n, int R, int d, int k, float *out_s, int64_t *out_i, uint8_t *bad, int n_threads,
                  team_t *team, int bits) {
    if (R <= 0) return 0;
    if (key_row_stride != 0) team = NULL;   /* rows go to workers by a fixed share there: every member must come */
    if (team != NULL) n_threads = 2;
    if (n_threads > R && team == NULL) n_threads = R;
    if (n_threads > MAX_THREADS) n_threads = MAX_THREADS;
    if (n_threads < 1) n_threads = 1;
    call_t c = {q, keys, key_row_stride, stride_l, stride_d, n, R, d, k, out_s, out_i, bad, n_threads};
    for (int t = 0; t < MAX_THREADS; t++) c.x_ok[t] = 1;   /* a worker that scores no tile leaves its check clean */
    int64_t n_max = 0;
    for (int r = 0; r < (key_row_stride == 0 ? 1 : R); r++) n_max = n[r] > n_max ? n[r] : n_max;
    if (n_max > INT32_MAX - 2 * SUB) return -2;   /* candidate indices are int32 */
    const int64_t nb = blocks_of(n_max), nbp = padded8(nb), cap = cand_cap(k);
    c.nbp = nbp;
    c.cap = (int)cap;
    c.sel = kth_floats(nbp > cap ? nbp : cap);
    if (bits != 0 && !topk_pass1_can(R, d, key_row_stride, bits)) return -3;
    c.lowp = bits != 0 ? bits : topk_pass1_bits(R, d, key_row_stride, n_max);
    if (c.lowp == 32) c.lowp = 0;
    /* the bf16 pass reads the keys untransposed: pass 2 transposes the sub-blocks it rescores (sub_block_of) */
    c.keep_T = key_row_stride != 0 || (!c.lowp && !few_rows_skip_T(R, k, nb));
    c.tile_floats = (int64_t)tile_blocks(d) * d * SUB;
    const size_t t_bytes = c.keep_T ? align64((size_t)nb * d * SUB * sizeof(float)) : 0;
    const size_t m_bytes = align64((size_t)R * nbp * sizeof(float)), tau_bytes = align64((size_t)R * sizeof(float));
    const size_t mx_bytes = c.lowp && KEEP_M ? 0 : m_bytes;   /* M: the bf16 pass keeps no block maxima (pairs: m_bytes);
                                                                    without KEEP_M M holds pass 2's block lists */
    size_t shared = 0;
    const size_t c_bytes = align64((size_t)R * cap * 4);
    const size_t s_bytes = align64((size_t)R * nbp * NS * sizeof(float));
    /* bf16 pass 1 (see the header, pass1_lowp): qt and X shared, a block's bf16 keys and X row per worker, and
       the selection scratch takes the sub-blocks' lower bounds (lowp_bounds) */
    const int dh = (d + 1) / 2;
    c.Rp = (R + 15) / 16 * 16;
    /* int8 (fits in bf16's sizes): qt [D4][Rp], X [1 + NV][nbp], a block's u8 keys per worker; and its
       per-row qbias, srow, erow and the column scales */
    const size_t qt_bytes = c.lowp ? align64((size_t)dh * c.Rp * 4) : 0;
    const size_t x_bytes = c.lowp ? align64((size_t)(d > 1 + NV ? d : 1 + NV) * nbp * 4) : 0;
    const size_t kb_bytes = c.lowp ? align64((size_t)SUB * dh * 4 + ((size_t)d + 32) * 4) : 0;
    const size_t r8_bytes = c.lowp == 8 ? align64((size_t)(c.Rp + 2 * R + d + 36) * 4) : 0;
    if (c.lowp || !KEEP_M) c.sel = kth_floats(NS * nbp > cap ? NS * nbp : cap);   /* a selection over sub-blocks */
    if (key_row_stride == 0) {   /* T, M, pairs, tau, cs, ci, S, cnt, qt, X shared; per worker: kth, start, rank, tiles (see run_part) */
        shared = t_bytes + mx_bytes + m_bytes + 2 * tau_bytes + 2 * c_bytes + s_bytes + r8_bytes + qt_bytes + x_bytes;
        c.ws_stride = align64((size_t)(c.sel + align8(nbp + 1) + cap) * 4) + (c.keep_T ? 0 : (size_t)c.tile_floats * 4) + kb_bytes;
    } else {                     /* per worker: tau, kth, M, cs, start, rows, ci, rank, cnt, S, T */
        c.ws_stride = align64((size_t)(8 + c.sel + nbp + cap + align8(nbp + 1) + nbp + 2 * cap + 16 + nbp * NS + c.tile_floats) * 4) + t_bytes;
    }
    char *ws = workspace(shared + (size_t)n_threads * c.ws_stride);
    if (ws == NULL) return -1;
    c.T = (float *)ws;
    c.M = (float *)(ws + t_bytes);
    c.pairs = (int32_t *)(ws + t_bytes + mx_bytes);
    c.tau = (float *)(ws + t_bytes + mx_bytes + m_bytes);
    c.cnt = (int32_t *)(ws + t_bytes + mx_bytes + m_bytes + tau_bytes);
    c.cs = (float *)(ws + t_bytes + mx_bytes + m_bytes + 2 * tau_bytes);
    c.ci = (int32_t *)(ws + t_bytes + mx_bytes + m_bytes + 2 * tau_bytes + c_bytes);
    c.S = (float *)(ws + t_bytes + mx_bytes + m_bytes + 2 * tau_bytes + 2 * c_bytes);
    c.ws = ws + shared;
#if INT8
    if (c.lowp == 8) {
        c.qt = (uint32_t *)(ws + shared - qt_bytes - x_bytes);
        c.X = (float *)(ws + shared - x_bytes);
        c.qbias = (int32_t *)(ws + shared - qt_bytes - x_bytes - r8_bytes);
        c.srow = (float *)(c.qbias + c.Rp);
        c.erow = c.srow + R;
        c.gcol = c.erow + R;
        int8_setup(&c, q, n_max);
#if INT8_AMX
        c.amx = d <= AMX_MAX_D && amx_permitted();
#endif
    }
#endif
#if LOWP
    if (c.lowp == 16) {
        uint32_t *qt = (uint32_t *)(ws + shared - qt_bytes - x_bytes);
        c.qt = qt;
        c.X = (float *)(ws + shared - x_bytes);
        memset(qt, 0, qt_bytes);   /* the padding rows score 0 and are never read */
        uint16_t pairs[2 * LOWP_MAX_D + 16];
        for (int r = 0; r < R; r++) {
            for (int j = 0; j < 2 * dh; j += 16) {   /* clamped, then RNE to bf16; the pad dim d (d odd) is 0 */
                const int left = d - j;
                const __mmask16 in = left >= 16 ? (__mmask16)0xFFFF : left <= 0 ? 0 : (__mmask16)((1u << left) - 1u);
                __m512 x = _mm512_maskz_loadu_ps(in, q + (int64_t)r * d + j);
                x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-BF16_MAX)), _mm512_set1_ps(BF16_MAX));
                _mm256_storeu_si256((__m256i *)(pairs + j), (__m256i)_mm512_cvtneps_pbh(x));
            }
            for (int i = 0; i < dh; i++) qt[(int64_t)i * c.Rp + r] = pairs[2 * i] | (uint32_t)pairs[2 * i + 1] << 16;
        }
        /* c_rel (header) for this d, with the 2^-10 margin the fp32 evaluation of eps_b needs, rounded up */
        const double w = 0x1p-23, v = 0x1p-8, gD = 2 * dh * w / (1 - 2 * dh * w), g2d = 2 * d * w / (1 - 2 * d * w);
        const double c_eval = (2 * v + v * v + gD * (1 + v) * (1 + v) + g2d) * (1 + 0x1p-10);
        c.c_eps = (float)c_eval;
        if ((double)c.c_eps < c_eval) c.c_eps = nextafterf(c.c_eps, INFINITY);
        c.a_eps = (float)(8.0 * (d + 2)) * 0x1p-126f;
    }
#endif
    if (key_row_stride == 0 && !c.lowp)   /* before any worker starts: pass 2 reads every row's padding */
        for (int r = 0; r < R; r++) pad_maxima(c.M + (int64_t)r * nbp, c.S + (int64_t)r * nbp * NS, nb, nbp);
    /* torch's OpenMP runtime (the process loads one libgomp.so.1: torch's): its worker threads, still
       spinning after the model's last op, run the parts instead of competing with threads of ours */
    if (team != NULL) {
        team_open(team, &c);
        run_part(&c, 0);
        team_close(team);
        team->chunks[0] = c.chunks[0];
        team->chunks[1] = c.chunks[1];
    } else if (forked || n_threads == 1) {
        c.n_threads = 1;
        run_part(&c, 0);
    } else {
#pragma omp parallel num_threads(n_threads)
    {
#pragma omp single
        c.n_threads = omp_get_num_threads();   /* the team may be smaller than asked; implied barrier */
        run_part(&c, omp_get_thread_num());
    }
    }
    if (ws != kept_ws) free(ws);
    int n_bad = 0;
    for (int r = 0; r < R; r++) n_bad += bad[r];
    return n_bad;
}

/* Returns the number of rows flagged bad (the caller redoes them), -1 when memory could not be had, -2
   for a history of 2^31 - 128 events or more, -3 for a pass-1 `bits` this build cannot run here (topk_pass1_can;
   0: topk_pass1_bits decides). */
int topk_search(const float *q, const float *keys, int64_t key_row_stride, int64_t stride_l, int64_t stride_d,
                const int64_t *n, int R, int d, int k, float *out_s, int64_t *out_i, uint8_t *bad, int n_threads,
                int bits) {
    return search(q, keys, key_row_stride, stride_l, stride_d, n, R, d, k, out_s, out_i, bad, n_threads, NULL, bits);
}

/* topk_search on the caller's thread with `team`'s member helping where it joins (topk_team_join). The team is
   closed when this returns, on every path. */
int topk_search_team(const float *q, const float *keys, int64_t key_row_stride, int64_t stride_l, int64_t stride_d,
                     const int64_t *n, int R, int d, int k, float *out_s, int64_t *out_i, uint8_t *bad, team_t *team,
                     int bits) {
    const int ret = search(q, keys, key_row_stride, stride_l, stride_d, n, R, d, k, out_s, out_i, bad, 1, team, bits);
    team_close(team);
    return ret;
}

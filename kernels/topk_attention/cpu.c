/* Fused top-k attention search on CPU: score and select without writing the score matrix.

   Rows r = 0..R-1 each hold a scaled fp32 query q[r, 0..d) (the caller applies the segment scales)
   and a history of n[r] fp32 keys. Serving layout: every row shares one history (key_row_stride 0,
   one length). Training layout: row r's history starts key_row_stride floats after row r-1's.

   A worker transposes the history tile by tile into a [d][L] buffer, so that 8 consecutive events are
   one vector, and while a tile sits in L1 every row of the worker scores it, 64 events per step in 8
   vector accumulators, keeping only each 64-event block's maximum (pass 1: no score-dependent branch).
   The k-th largest block maximum tau bounds the k-th best score from below, so pass 2 rescores only
   the blocks whose maximum reaches tau (about k of them) and inserts their events scoring >= tau into
   a sorted list. Blocks and events are visited in increasing index and an equal score never displaces
   a kept one: ties go to the lower index, as in the reference. (A single pass with a running
   threshold does ~k (1 + ln(L / k)) list inserts per row, each with mispredicted branches: measured
   1.5x slower at L = 10k, C = 200, d = 16, k = 20.)

   Score of an event: sum over j of q[j] * x[j], accumulated in fp32 in order j = 0..d-1 (fused
   multiply-add where the target has it), computed in one function for both passes and both layouts.
   Non-finite scores are ruled out up front instead of tested per event: a row is flagged bad[r] = 1
   (the caller recomputes it with the reference) when its query or the history holds a NaN or inf, or
   when d * max|q| * max|x| could overflow fp32. */

#define _POSIX_C_SOURCE 200112L
#include <float.h>
#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef __AVX__
#include <immintrin.h>
#endif

#define NV 8           /* 8-lane vectors per step: the accumulators stay in registers */
#define SUB (8 * NV)   /* events scored per step */
#define TILE 256       /* most events per transposed tile (tile_of: fewer for d > 16) */
#define MAX_THREADS 64

typedef float v8 __attribute__((vector_size(32)));
typedef int32_t v8i __attribute__((vector_size(32)));

typedef struct {
    const float *q;          /* [R, d] */
    const float *keys;       /* row 0's history */
    int64_t key_row_stride;  /* floats between two rows' histories; 0: shared */
    int64_t stride_l, stride_d;
    const int64_t *n;        /* [R] lengths, clipped to [0, L]; one length when the history is shared */
    int d, k;
    float *out_s;            /* [R, k] best first; -inf past the kept count */
    int64_t *out_i;          /* [R, k]; -1 past the kept count */
    uint8_t *bad;            /* [R] */
    int r0, r1;              /* this worker's rows */
    void *ws;                /* this worker's workspace (job_bytes), 64-byte aligned */
} job_t;

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

/* Insert score s (finite, above s[k - 1]) of an event whose index is above every kept index: walk up
   from the bottom, moving lower scores down; an equal score kept earlier has the lower index and
   stays ahead. Scalar on purpose: a vector count over the list just written by the previous insert
   stalls on store forwarding, and a heap's sift mispredicts on every level. */
static void insert(float *S, int64_t *I, int k, float s, int64_t i) {
    int p = k - 1;
    while (p > 0 && S[p - 1] < s) {
        S[p] = S[p - 1];
        I[p] = I[p - 1];
        p--;
    }
    S[p] = s;
    I[p] = i;
}

/* The tile of events transposed at once: its [d][tile] floats stay within 16 KB of L1. */
static inline int tile_of(int d) {
    int t = (4096 / (d > 0 ? d : 1)) / SUB * SUB;
    return t < SUB ? SUB : (t > TILE ? TILE : t);
}

/* Transpose events t0 .. t0 + tw of `keys` into T[j][t0 + e] (row stride Lp), zero the padding up to
   tw_pad, and fold them into the finiteness check (NaN once any key is NaN or inf) and max |key|. */
static void load_tile(const job_t *jb, const float *keys, int64_t t0, int tw, int tw_pad, int64_t Lp,
                      float *T, v8 *check, v8 *amax) {
    const int d = jb->d;
    for (int e = 0; e < tw; e++) {
        const float *x = keys + (t0 + e) * jb->stride_l;
        if (jb->stride_d == 1)
            for (int j = 0; j < d; j++) T[j * Lp + t0 + e] = x[j];
        else
            for (int j = 0; j < d; j++) T[j * Lp + t0 + e] = x[j * jb->stride_d];
    }
    for (int j = 0; j < d; j++) {
        float *row = T + j * Lp + t0;
        memset(row + tw, 0, (size_t)(tw_pad - tw) * sizeof(float));
        for (int e = 0; e < tw_pad; e += 8) {
            v8 x;
            memcpy(&x, row + e, sizeof x);
            *check += x * 0.0f;
            *amax = vmax(*amax, (v8)((v8i)x & 0x7fffffff));
        }
    }
}

/* Row pitch of the transposed history: n rounded up to whole blocks, plus one cache line so that the
   d rows of a block do not all fall in the same L1 set (a pitch of 10,240 floats put all 16 there). */
static inline int64_t pitch_of(int64_t n) {
    return (n + SUB - 1) / SUB * SUB + 16;
}

/* Scores of events e0 .. e0 + SUB for query q: acc[v] lane t = event e0 + 8 v + t; lanes at or past
   n are -inf. The one place scores are computed, so both passes see bit-identical values. */
static inline void score_step(const float *T, int64_t Lp, int64_t e0, int64_t n, const float *q, int d, v8 acc[NV]) {
    for (int v = 0; v < NV; v++) acc[v] = (v8){0};
    for (int j = 0; j < d; j++) {
        float qj = q[j];
        const float *row = T + j * Lp + e0;
        for (int v = 0; v < NV; v++) {
            v8 x;
            memcpy(&x, row + 8 * v, sizeof x);
            acc[v] += qj * x;
        }
    }
    if (n - e0 < SUB) {
        const v8i lane = {0, 1, 2, 3, 4, 5, 6, 7};
        for (int v = 0; v < NV; v++) {
            v8i keep = (lane + (int32_t)(8 * v)) < (int32_t)(n - e0);
            acc[v] = (v8)(((v8i)acc[v] & keep) | ((v8i)((v8){0} - INFINITY) & ~keep));
        }
    }
}

/* The k-th largest of a[0..m) (0 < k <= m), reordering a. Partitions without data-dependent branches
   (the block maxima are random: a branchy partition mispredicts on every other element). */
static float kth_largest(float *a, int m, int k) {
    int lo = 0, hi = m, want = k - 1;
    while (hi - lo > 16) {
        float x = a[lo], y = a[lo + (hi - lo) / 2], z = a[hi - 1];
        float p = x > y ? (y > z ? y : (x > z ? z : x)) : (x > z ? x : (y > z ? z : y));  /* median of 3 */
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

/* Rows [r0, r1), all reading the history at `keys` (n events, n = the first row's length).

   Pass 1, tile by tile while the tile sits in L1: every row scores every 64-event block and keeps only
   the block's maximum M[b]. Threshold tau = the k-th largest block maximum: k blocks hold an event
   scoring >= tau, so the k-th best score is >= tau, and every event of the top k lies in a block with
   M[b] >= tau. Pass 2 rescores only those blocks (about k of them; same arithmetic, same values) and
   inserts their events scoring >= tau into the row's sorted list. So the list sees ~k + a few inserts
   instead of the ~k (1 + ln(L / k)) of a running threshold, and the 64-event steps of pass 1 carry no
   branch that depends on the scores.

   T: [d][Lp] the history transposed; M: [rows][nbp] block maxima (-inf padded), scratch: [nbp];
   S, I: [rows][k]. */
static void scan(const job_t *jb, int r0, int r1, const float *keys, float *T, float *M, float *scratch,
                 float *S, int64_t *I) {
    const int d = jb->d, k = jb->k, tile = tile_of(d);
    const int64_t n = jb->n[r0], nb = (n + SUB - 1) / SUB, nbp = (nb + 7) / 8 * 8, Lp = pitch_of(n);
    for (int64_t t = 0; t < (int64_t)(r1 - r0) * k; t++) { S[t] = -INFINITY; I[t] = -1; }
    for (int64_t t = 0; t < (int64_t)(r1 - r0) * nbp; t++) M[t] = -INFINITY;
    v8 check = (v8){0}, amax = (v8){0};
    for (int64_t t0 = 0; t0 < n; t0 += tile) {
        int tw = (int)((n - t0) < tile ? (n - t0) : tile);
        int tw_pad = (tw + SUB - 1) / SUB * SUB;
        load_tile(jb, keys, t0, tw, tw_pad, Lp, T, &check, &amax);
        for (int r = r0; r < r1; r++) {
            const float *q = jb->q + (int64_t)r * d;
            float *Mr = M + (int64_t)(r - r0) * nbp;
            for (int64_t e0 = t0; e0 < t0 + tw_pad; e0 += SUB) {
                v8 acc[NV];
                score_step(T, Lp, e0, n, q, d, acc);
                v8 m = acc[0];
                for (int v = 1; v < NV; v++) m = vmax(m, acc[v]);
                Mr[e0 / SUB] = hmax(m);
            }
        }
    }
    for (int r = r0; r < r1; r++) {
        const float *q = jb->q + (int64_t)r * d;
        const float *Mr = M + (int64_t)(r - r0) * nbp;
        float *Sr = S + (int64_t)(r - r0) * k;
        int64_t *Ir = I + (int64_t)(r - r0) * k;
        float tau = -INFINITY;
        if (nb > k) {
            memcpy(scratch, Mr, (size_t)nb * sizeof(float));
            tau = kth_largest(scratch, (int)nb, k);
        }
        const v8 vtau = (v8){0} + tau;
        for (int64_t b8 = 0; b8 < nb; b8 += 8) {   /* the blocks with M[b] >= tau, 8 tested at once */
            v8 mb;
            memcpy(&mb, Mr + b8, sizeof mb);
            uint32_t blocks = mask8(mb >= vtau);
            if (nb - b8 < 8) blocks &= (1u << (nb - b8)) - 1u;   /* never the padding (tau may be -inf) */
            for (; blocks; blocks &= blocks - 1) {
                int64_t b = b8 + __builtin_ctz(blocks);
                v8 acc[NV];
                score_step(T, Lp, b * SUB, n, q, d, acc);
                uint64_t lanes = 0;
                for (int v = 0; v < NV; v++)
                    lanes |= (uint64_t)mask8((acc[v] >= vtau) & (acc[v] > -INFINITY)) << (8 * v);
                while (lanes) {
                    int e = __builtin_ctzll(lanes);
                    lanes &= lanes - 1;
                    float s = acc[e >> 3][e & 7];
                    if (s > Sr[k - 1]) insert(Sr, Ir, k, s, b * SUB + e);
                }
            }
        }
    }
    float xmax = 0.0f;
    int x_ok = 1;
    for (int t = 0; t < 8; t++) {
        x_ok &= check[t] == 0.0f;
        xmax = amax[t] > xmax ? amax[t] : xmax;
    }
    for (int r = r0; r < r1; r++) {
        float qmax = 0.0f, q_check = 0.0f;
        for (int j = 0; j < d; j++) {
            float a = fabsf(jb->q[(int64_t)r * d + j]);
            q_check += a * 0.0f;
            qmax = a > qmax ? a : qmax;
        }
        jb->bad[r] = !(x_ok && q_check == 0.0f && (double)d * qmax * xmax < 0.5 * FLT_MAX);
        memcpy(jb->out_s + (int64_t)r * k, S + (int64_t)(r - r0) * k, (size_t)k * sizeof(float));
        memcpy(jb->out_i + (int64_t)r * k, I + (int64_t)(r - r0) * k, (size_t)k * sizeof(int64_t));
    }
}

/* Workspace of one job: the transposed history, block maxima (+ scratch), and the kept lists. */
static size_t job_bytes(const job_t *jb, int64_t *Lp, int64_t *nbp) {
    int rows = jb->key_row_stride == 0 ? jb->r1 - jb->r0 : 1;
    int64_t n_max = 0;
    for (int r = jb->r0; r < jb->r1; r++) n_max = jb->n[r] > n_max ? jb->n[r] : n_max;
    *Lp = pitch_of(n_max);
    *nbp = ((n_max + SUB - 1) / SUB + 7) / 8 * 8;
    size_t bytes = (size_t)jb->d * *Lp * sizeof(float) + ((size_t)rows + 1) * *nbp * sizeof(float)
                   + (size_t)rows * jb->k * (sizeof(float) + sizeof(int64_t));
    return (bytes + 63) / 64 * 64;
}

static void *worker(void *arg) {
    const job_t *jb = (const job_t *)arg;
    int shared = jb->key_row_stride == 0, rows = shared ? jb->r1 - jb->r0 : 1;
    int64_t Lp, nbp;
    job_bytes(jb, &Lp, &nbp);
    float *T = jb->ws;
    float *M = T + (size_t)jb->d * Lp, *scratch = M + (size_t)rows * nbp;
    int64_t *I = (int64_t *)(scratch + nbp);
    float *S = (float *)(I + (size_t)rows * jb->k);
    if (shared) {
        if (jb->r1 > jb->r0) scan(jb, jb->r0, jb->r1, jb->keys, T, M, scratch, S, I);
    } else {
        for (int r = jb->r0; r < jb->r1; r++)
            scan(jb, r, r + 1, jb->keys + (int64_t)r * jb->key_row_stride, T, M, scratch, S, I);
    }
    return NULL;
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

/* Rows split evenly over n_threads (the caller's thread 0 included). Returns 0, or 1 when memory
   could not be had; a thread that cannot start has its rows run by the caller. */
int topk_search(const float *q, const float *keys, int64_t key_row_stride, int64_t stride_l, int64_t stride_d,
                const int64_t *n, int R, int d, int k, float *out_s, int64_t *out_i, uint8_t *bad, int n_threads) {
    if (R <= 0) return 0;
    if (n_threads > R) n_threads = R;
    if (n_threads > MAX_THREADS) n_threads = MAX_THREADS;
    if (n_threads < 1) n_threads = 1;
    job_t jobs[MAX_THREADS];
    pthread_t tid[MAX_THREADS];
    int started[MAX_THREADS] = {0}, err = 0;
    size_t offset[MAX_THREADS + 1] = {0};
    for (int t = 0; t < n_threads; t++) {
        jobs[t] = (job_t){q, keys, key_row_stride, stride_l, stride_d, n, d, k, out_s, out_i, bad,
                          (int)((int64_t)R * t / n_threads), (int)((int64_t)R * (t + 1) / n_threads), NULL};
        int64_t Lp, nbp;
        offset[t + 1] = offset[t] + job_bytes(&jobs[t], &Lp, &nbp);
    }
    char *ws = workspace(offset[n_threads]);
    if (ws == NULL) return 1;
    for (int t = 0; t < n_threads; t++) jobs[t].ws = ws + offset[t];
    for (int t = 1; t < n_threads; t++) started[t] = pthread_create(&tid[t], NULL, worker, &jobs[t]) == 0;
    worker(&jobs[0]);
    for (int t = 1; t < n_threads; t++) {
        if (started[t]) pthread_join(tid[t], NULL);
        else worker(&jobs[t]);
    }
    if (ws != kept_ws) free(ws);
    return err;
}

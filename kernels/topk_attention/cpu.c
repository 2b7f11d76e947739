/* Fused top-k attention search on CPU: score and select in one pass, never writing the score matrix.

   Rows r = 0..R-1 each hold a scaled fp32 query q[r, 0..d) (the caller applies the segment scales)
   and a history of n[r] fp32 keys. Serving layout: every row shares one history (key_row_stride 0,
   one length). Training layout: row r's history starts key_row_stride floats after row r-1's.

   A worker streams the history in tiles of events, transposed into a [d][tile] buffer that stays in
   L1, so that 8 consecutive events are one vector; every row of the worker scores the tile while it
   is there, SUB = 64 events per step in 8 vector accumulators. A row keeps its top k in a sorted
   list (score desc, index asc) whose last entry is the threshold: a step none of whose 64 scores beats
   it is dropped after one vector max and compare, which is almost every step once the list has filled.
   Events are visited in increasing index, so an equal score never displaces a kept one: ties go to
   the lower index, as in the reference.

   Score of an event: sum over j of q[j] * x[j], accumulated in fp32 in order j = 0..d-1 (fused
   multiply-add where the target has it); the same arithmetic in both layouts. Non-finite scores are
   ruled out up front instead of tested per event: a row is flagged bad[r] = 1 (the caller recomputes
   it with the reference) when its query or the history holds a NaN or inf, or when d * max|q| * max|x|
   could overflow fp32. */

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

static inline v8 vmax(v8 a, v8 b) {
    v8i gt = a > b;
    return (v8)(((v8i)a & gt) | ((v8i)b & ~gt));
}

/* Insert score s (finite, above s[k - 1]) of an event whose index is above every kept index. New
   entries mostly land near the bottom, so walk up from there, moving lower scores down; an equal
   score kept earlier has the lower index and stays ahead. Scalar on purpose: a vector count over
   the list just written by the previous insert stalls on store forwarding (measured 2x slower), and
   a heap's sift mispredicts on every level. ~k (1 + ln(L / k)) inserts per row. */
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

/* Transpose events t0 .. t0 + tw of `keys` into T[j][e], zero the padding up to tw_pad, and fold
   the tile into the finiteness check (NaN once any key is NaN or inf) and max |key|. */
static void load_tile(const job_t *jb, const float *keys, int64_t t0, int tw, int tw_pad, int tile,
                      float *T, v8 *check, v8 *amax) {
    const int d = jb->d;
    for (int e = 0; e < tw; e++) {
        const float *x = keys + (t0 + e) * jb->stride_l;
        if (jb->stride_d == 1)
            for (int j = 0; j < d; j++) T[j * tile + e] = x[j];
        else
            for (int j = 0; j < d; j++) T[j * tile + e] = x[j * jb->stride_d];
    }
    for (int j = 0; j < d; j++) {
        memset(T + j * tile + tw, 0, (size_t)(tw_pad - tw) * sizeof(float));
        for (int e = 0; e < tw_pad; e += 8) {
            v8 x;
            memcpy(&x, T + j * tile + e, sizeof x);
            *check += x * 0.0f;
            *amax = vmax(*amax, (v8)((v8i)x & 0x7fffffff));
        }
    }
}

/* Rows [r0, r1), all reading the history at `keys` (n events, n = the first row's length). S, I:
   [rows][k] kept lists; T: [d][tile]. */
static void scan(const job_t *jb, int r0, int r1, const float *keys, float *S, int64_t *I, float *T) {
    const int d = jb->d, k = jb->k, tile = tile_of(d);
    const int64_t n = jb->n[r0];
    for (int64_t t = 0; t < (int64_t)(r1 - r0) * k; t++) { S[t] = -INFINITY; I[t] = -1; }
    v8 check = (v8){0}, amax = (v8){0};
    for (int64_t t0 = 0; t0 < n; t0 += tile) {
        int tw = (int)((n - t0) < tile ? (n - t0) : tile);
        int tw_pad = (tw + SUB - 1) / SUB * SUB;
        load_tile(jb, keys, t0, tw, tw_pad, tile, T, &check, &amax);
        for (int r = r0; r < r1; r++) {
            const float *q = jb->q + (int64_t)r * d;
            float *Sr = S + (int64_t)(r - r0) * k;
            int64_t *Ir = I + (int64_t)(r - r0) * k;
            for (int e0 = 0; e0 < tw_pad; e0 += SUB) {
                v8 acc[NV];                                  /* events e0 + 8 v + lane */
                for (int v = 0; v < NV; v++) acc[v] = (v8){0};
                for (int j = 0; j < d; j++) {
                    float qj = q[j];
                    const float *row = T + j * tile + e0;
                    for (int v = 0; v < NV; v++) {
                        v8 x;
                        memcpy(&x, row + 8 * v, sizeof x);
                        acc[v] += qj * x;
                    }
                }
                v8 thr = (v8){0} + Sr[k - 1];                /* worst kept score; -inf while filling */
                v8 m = acc[0];
                for (int v = 1; v < NV; v++) m = vmax(m, acc[v]);
                if (!mask8(m > thr)) continue;
                uint64_t lanes = 0;
                for (int v = 0; v < NV; v++) lanes |= (uint64_t)mask8(acc[v] > thr) << (8 * v);
                int lim = tw - e0 < SUB ? tw - e0 : SUB;     /* padding lanes are never kept */
                if (lim < SUB) lanes &= (1ull << lim) - 1ull;
                while (lanes) {
                    int e = __builtin_ctzll(lanes);
                    lanes &= lanes - 1;
                    float s = acc[e >> 3][e & 7];
                    if (s > Sr[k - 1]) insert(Sr, Ir, k, s, t0 + e0 + e);
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

static void *worker(void *arg) {
    const job_t *jb = (const job_t *)arg;
    int shared = jb->key_row_stride == 0, rows = shared ? jb->r1 - jb->r0 : 1;
    size_t t_bytes = (size_t)jb->d * tile_of(jb->d) * sizeof(float);
    size_t l_bytes = (size_t)rows * jb->k * (sizeof(float) + sizeof(int64_t));
    void *mem = NULL;
    if (posix_memalign(&mem, 64, t_bytes + l_bytes) != 0) return (void *)1;
    float *T = mem;
    int64_t *I = (int64_t *)((char *)mem + t_bytes);
    float *S = (float *)(I + (size_t)rows * jb->k);
    if (shared) {
        if (jb->r1 > jb->r0) scan(jb, jb->r0, jb->r1, jb->keys, S, I, T);
    } else {
        for (int r = jb->r0; r < jb->r1; r++) scan(jb, r, r + 1, jb->keys + (int64_t)r * jb->key_row_stride, S, I, T);
    }
    free(mem);
    return NULL;
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
    for (int t = 0; t < n_threads; t++)
        jobs[t] = (job_t){q, keys, key_row_stride, stride_l, stride_d, n, d, k, out_s, out_i, bad,
                          (int)((int64_t)R * t / n_threads), (int)((int64_t)R * (t + 1) / n_threads)};
    for (int t = 1; t < n_threads; t++) started[t] = pthread_create(&tid[t], NULL, worker, &jobs[t]) == 0;
    if (worker(&jobs[0]) != NULL) err = 1;
    for (int t = 1; t < n_threads; t++) {
        void *ret = NULL;
        if (started[t]) pthread_join(tid[t], &ret);
        else ret = worker(&jobs[t]);
        if (ret != NULL) err = 1;
    }
    return err;
}

/* Stage 2's attention over the kept events of one served history (see cpu.py), per target c:
 *     s_j = <key_j, q_c>                      key_j: the kept event's attention rows, field after field
 *     w   = softmax of s over the valid slots (0 at a hole; all 0 where the row has no valid slot)
 *     out_c = sum_j w_j rep_j                 rep_j: its representation rows, field after field
 * in one pass over the kept rows, where torch gathers the keys and the representation rows into [C, k, .]
 * copies and reads them back in a dozen operations.
 *
 * The rows are scattered reads from tables far larger than the caches (the search just evicted them): the
 * rows `ahead` events on are prefetched, and every id is checked against its table's rows when it is first
 * read (at prefetch time), before any address is formed from it.
 *
 * Not torch's bits (another summation order for the dot products, libm's expf): the reference is an oracle
 * within rounding (tests/test_kept_attention.py). The order is fixed by this source, so every call of a
 * build gives the same bits for the same inputs, whichever serving path (whole history, block index) calls. */
#include <math.h>
#include <stdint.h>
#include <string.h>

#define LANES 16

/* <row, q> over d numbers: LANES partial sums in a fixed order, then a fixed tree (vectorizes without
   reassociation). */
static inline float dot_into(const float *restrict row, const float *restrict q, int64_t d, float lanes[LANES], float tail)
{
    int64_t t = 0;
    for (; t + LANES <= d; t += LANES)
        for (int l = 0; l < LANES; l++)
            lanes[l] += row[t + l] * q[t + l];
    for (; t < d; t++)
        tail += row[t] * q[t];
    return tail;
}

static inline float reduce(float lanes[LANES])
{
    for (int w = LANES / 2; w; w /= 2)
        for (int l = 0; l < w; l++)
            lanes[l] += lanes[l + w];
    return lanes[0];
}

static inline void prefetch_row(const float *row, int64_t d)
{
    for (int64_t b = 0; b < d * (int64_t)sizeof(float); b += 64)
        __builtin_prefetch((const char *)row + b);
}

/* The attention for nf fields; wa, wr: the fields' common attention and representation widths with the last
 * attention field one number (the folded position), or 0: each field its own width (att_dims, rep_dims).
 * Inlined with constant nf, wa and wr for DARE's layouts, so the loops over the fields and the rows unroll into
 * fixed vector operations (C = 200 x k = 20 on cached rows: ~170 -> ~130 us a call, Zen 4 VM). */
static inline __attribute__((always_inline)) int64_t
attend(int64_t C, int64_t k, const int64_t nf, const float *const *att, const int64_t *att_rows, const int64_t *att_dims,
       const float *const *rep, const int64_t *rep_rows, const int64_t *rep_dims, const int64_t *const *ids,
       const uint8_t *valid, const float *q, float *restrict out, int64_t ahead, int64_t *bad_event,
       const int64_t wa, const int64_t wr)
{
#define ADIM(f) (wa ? ((f) == nf - 1 ? 1 : wa) : att_dims[f])
#define RDIM(f) (wr ? wr : rep_dims[f])
    int64_t dq = 0, dr = 0;
    for (int64_t f = 0; f < nf; f++) {
        dq += ADIM(f);
        dr += RDIM(f);
    }
    const int64_t n = C * k;
    /* event a's ids checked and its rows prefetched: the first `ahead` here, the rest `ahead` events early */
    int64_t checked = 0;
#define CHECK_AND_PREFETCH(a)                                                                       \
    for (int64_t f = 0; f < nf; f++) {                                                              \
        const int64_t id = ids[f][a];                                                               \
        if ((uint64_t)id >= (uint64_t)att_rows[f] || (uint64_t)id >= (uint64_t)rep_rows[f]) {       \
            *bad_event = (a);                                                                       \
            return (uint64_t)id >= (uint64_t)att_rows[f] ? f : nf + f;                              \
        }                                                                                           \
        prefetch_row(att[f] + id * ADIM(f), ADIM(f));                                               \
        prefetch_row(rep[f] + id * RDIM(f), RDIM(f));                                               \
    }
    for (; checked < (ahead < n ? ahead : n); checked++)
        CHECK_AND_PREFETCH(checked)
    float s[k > 0 ? k : 1];
    for (int64_t c = 0; c < C; c++) {
        const float *qc = q + c * dq;
        float m = -INFINITY;
        int any = 0;
        for (int64_t j = 0; j < k; j++) {
            const int64_t e = c * k + j;
            if (checked < n && checked <= e + ahead) {
                CHECK_AND_PREFETCH(checked)
                checked++;
            }
            if (!valid[e]) {
                s[j] = -INFINITY;
                continue;
            }
            float lanes[LANES] = {0}, tail = 0.0f;
            const float *qf = qc;
            for (int64_t f = 0; f < nf; f++) {
                tail = dot_into(att[f] + ids[f][e] * ADIM(f), qf, ADIM(f), lanes, tail);
                qf += ADIM(f);
            }
            s[j] = reduce(lanes) + tail;
            if (!any || s[j] > m)
                m = s[j];
            any = 1;
        }
        float *restrict o = out + c * dr;
        memset(o, 0, (size_t)dr * sizeof *o);
        if (!any)
            continue;
        float z = 0.0f;
        for (int64_t j = 0; j < k; j++) {
            s[j] = valid[c * k + j] ? expf(s[j] - m) : 0.0f;
            z += s[j];
        }
        const float inv = 1.0f / z;
        for (int64_t j = 0; j < k; j++) {
            const int64_t e = c * k + j;
            if (!valid[e])
                continue;
            const float w = s[j] * inv;
            float *restrict of = o;
            for (int64_t f = 0; f < nf; f++) {
                const float *restrict r = rep[f] + ids[f][e] * RDIM(f);
                for (int64_t t = 0; t < RDIM(f); t++)
                    of[t] += w * r[t];
                of += RDIM(f);
            }
        }
    }
#undef CHECK_AND_PREFETCH
#undef ADIM
#undef RDIM
    return -1;
}

/* C targets x k kept slots (event e = c k + j); fields tables att[f] [att_rows[f], att_dims[f]] and
 * rep[f] [rep_rows[f], rep_dims[f]], both read at ids[f][e]; valid [C k] (1: an event, 0: a hole); q [C, sum
 * att_dims]; out [C, sum rep_dims]. -> -1, or the first table (att f: f, rep f: fields + f, in event order)
 * whose id is out of range, with that event in *bad_event (nothing of its row is read; out is undefined). */
int64_t kept_attention_f32(int64_t C, int64_t k, int64_t fields, const float *const *att, const int64_t *att_rows,
                           const int64_t *att_dims, const float *const *rep, const int64_t *rep_rows,
                           const int64_t *rep_dims, const int64_t *const *ids, const uint8_t *valid,
                           const float *q, float *restrict out, int64_t ahead, int64_t *bad_event)
{
    if (ahead < 1)
        ahead = 1;
    int64_t wa = att_dims[0], wr = rep_dims[0];
    const int last1 = fields > 1 && att_dims[fields - 1] == 1;
    for (int64_t f = 1; f < fields; f++) {
        if (f < fields - last1 && att_dims[f] != wa)
            wa = 0;
        if (rep_dims[f] != wr)
            wr = 0;
    }
    /* DARE's: item and category rows of the attention width and the folded position number; representation
       rows of one width */
#define LAYOUT(NF, WA, WR)                                                                                  \
    if (last1 && fields == NF && wa == WA && wr == WR)                                                      \
        return attend(C, k, NF, att, att_rows, att_dims, rep, rep_rows, rep_dims, ids, valid, q, out, ahead, \
                      bad_event, WA, WR);
    LAYOUT(3, 16, 16) LAYOUT(3, 32, 32) LAYOUT(3, 64, 64) LAYOUT(3, 16, 32) LAYOUT(3, 32, 16)
#undef LAYOUT
    return attend(C, k, fields, att, att_rows, att_dims, rep, rep_rows, rep_dims, ids, valid, q, out, ahead,
                  bad_event, 0, 0);
}

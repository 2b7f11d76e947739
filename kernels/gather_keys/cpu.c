/* The search's keys gathered row by row (see cpu.py): event j's output row is the rows of every field's
 * table at that field's id, side by side, written once:
 *     out[j] = [ tables[0][ids[0][j]], tables[1][ids[1][j]], ... ]
 * A field of width 1 is a per-row number (the folded position term).
 *
 * The tables are scattered reads over rows far larger than L1 (and at 1M rows than the caches): the rows
 * `ahead` events on are prefetched, so their misses overlap the copies of the events between. Every id
 * is checked against its table's rows when it is first read (at prefetch time), before any address is
 * formed from it: a bad id stops the gather and is reported, never read through.
 *
 * The values are copied as 32-bit words (no float operation touches them): bit for bit torch's
 * index_select, NaN payloads included. */
#include <stdint.h>
#include <sys/mman.h>
#include "../team.h"

/* An output past a few huge pages is asked to be backed by them (Linux, transparent huge pages in "madvise"
 * mode): a fresh [1M, 33] output faulted in 4 KiB pages cost ~100 ms on a Zen 4 VM, ~5x its gather. */
#define HUGE_PAGE ((uintptr_t)2 << 20)
#define HUGE_MIN_BYTES ((uintptr_t)8 << 20)

static void advise_huge(void *p, uintptr_t bytes)
{
#ifdef MADV_HUGEPAGE
    if (bytes < HUGE_MIN_BYTES)
        return;
    const uintptr_t a = ((uintptr_t)p + HUGE_PAGE - 1) & ~(HUGE_PAGE - 1), e = ((uintptr_t)p + bytes) & ~(HUGE_PAGE - 1);
    if (e > a)
        madvise((void *)a, e - a, MADV_HUGEPAGE);  /* advice: where it fails, the pages stay small */
#else
    (void)p, (void)bytes;
#endif
}

/* The gather for nf fields; w: their common width with the last field one column (last1 = 1), or w = 0:
 * each field dims[f] wide. Inlined with constant nf and w for the common layouts, so that the loops over the
 * fields and the row copies unroll into fixed moves (the runtime-width loops took ~2x the time per event on
 * cached rows). */
static inline __attribute__((always_inline)) int64_t
gather(int64_t n, const int64_t nf, const uint32_t *const *tables, const int64_t *rows, const int64_t *dims,
       const int64_t *const *ids, uint32_t *restrict out, int64_t width, int64_t ahead, int64_t *bad_event,
       const int64_t w, const int last1)
{
    /* event j's rows are prefetched (and its ids checked) `ahead` events before its copy: the first ones here */
    for (int64_t j = 0; j < (ahead < n ? ahead : n); j++)
        for (int64_t f = 0; f < nf; f++) {
            const int64_t id = ids[f][j];
            if ((uint64_t)id >= (uint64_t)rows[f]) {
                *bad_event = j;
                return f;
            }
            __builtin_prefetch(tables[f] + id * dims[f]);
        }
    if (w)
        width = (nf - last1) * w + last1;
    for (int64_t j = 0; j < n; j++) {
        if (j + ahead < n) {
            const int64_t a = j + ahead;
            int bad = 0;
            for (int64_t f = 0; f < nf; f++)
                bad |= (uint64_t)ids[f][a] >= (uint64_t)rows[f];
            if (bad)
                for (int64_t f = 0;; f++)
                    if ((uint64_t)ids[f][a] >= (uint64_t)rows[f]) {
                        *bad_event = a;
                        return f;
                    }
            for (int64_t f = 0; f < nf; f++)
                __builtin_prefetch(tables[f] + ids[f][a] * (w ? (last1 && f == nf - 1 ? 1 : w) : dims[f]));
        }
        uint32_t *restrict o = out + j * width;
        for (int64_t f = 0; f < nf - last1; f++) {
            const int64_t d = w ? w : dims[f];
            const uint32_t *restrict r = tables[f] + ids[f][j] * d;
            for (int64_t c = 0; c < d; c++)
                o[c] = r[c];
            o += d;
        }
        if (last1)
            o[0] = tables[nf - 1][ids[nf - 1][j]];
    }
    return -1;
}

/* The gather of events [j0, j1) (the common layouts inlined, see gather); -> as gather, *bad_event absolute. */
static int64_t gather_range(int64_t j0, int64_t j1, int64_t fields, const uint32_t *const *tables, const int64_t *rows,
                            const int64_t *dims, const int64_t *const *ids, uint32_t *restrict out, int64_t width,
                            int64_t ahead, int64_t *bad_event)
{
    const int64_t *sub[fields];
    for (int64_t f = 0; f < fields; f++)
        sub[f] = ids[f] + j0;
    out += j0 * width;
    const int64_t n = j1 - j0;
    const int last1 = fields > 1 && dims[fields - 1] == 1;
    int64_t w = dims[0], f = -1;
    for (int64_t g = 1; g < fields - last1; g++)
        if (dims[g] != w)
            w = 0;
    /* DARE's and TWIN's keys: item and category rows of the attention width, then the position number */
#define LAYOUT(NF, W) \
    else if (last1 && fields == NF && w == W) \
        f = gather(n, NF, tables, rows, dims, sub, out, width, ahead, bad_event, W, 1);
    if (0) {}
    LAYOUT(3, 16) LAYOUT(3, 32) LAYOUT(3, 64) LAYOUT(2, 16) LAYOUT(2, 32) LAYOUT(2, 64)
    else
        f = gather(n, fields, tables, rows, dims, sub, out, width, ahead, bad_event, 0, 0);
#undef LAYOUT
    if (f >= 0)
        *bad_event += j0;
    return f;
}

/* One call shared by a team (../team.h): both workers take chunks of CHUNK events from `next`. A bad id ends
   the chunk it is in; the smallest (event, field) found is reported, and chunks taken after it are skipped. */
#define CHUNK 2048
typedef struct {
    int64_t n, fields;
    const uint32_t *const *tables;
    const int64_t *rows, *dims;
    const int64_t *const *ids;
    uint32_t *out;
    int64_t width, ahead;
    int64_t next;   /* first event of the next chunk */
    int64_t bad;    /* smallest bad event * fields + field, INT64_MAX while none */
    int chunks[2];
} call_t;

static void run_part(call_t *c, int t)
{
    for (;;) {
        const int64_t j0 = __atomic_fetch_add(&c->next, CHUNK, __ATOMIC_RELAXED);
        if (j0 >= c->n)
            return;
        c->chunks[t]++;
        if (__atomic_load_n(&c->bad, __ATOMIC_RELAXED) != INT64_MAX)
            continue;
        int64_t e;
        const int64_t f = gather_range(j0, j0 + CHUNK < c->n ? j0 + CHUNK : c->n, c->fields, c->tables, c->rows,
                                       c->dims, c->ids, c->out, c->width, c->ahead, &e);
        if (f >= 0) {
            int64_t key = e * c->fields + f, was = __atomic_load_n(&c->bad, __ATOMIC_RELAXED);
            while (key < was && !__atomic_compare_exchange_n(&c->bad, &was, key, 0, __ATOMIC_RELAXED, __ATOMIC_RELAXED))
                ;
        }
    }
}

/* n events; fields tables[f] [rows[f], dims[f]] (row-major, contiguous) with ids[f] [n]; out [n, width],
 * width = sum of dims. -> -1, or the first field (in event order) whose id is out of range, with that
 * event in *bad_event (the rows before it are written, the rest not). */
int64_t gather_keys_f32(int64_t n, int64_t fields, const uint32_t *const *tables, const int64_t *rows,
                        const int64_t *dims, const int64_t *const *ids, uint32_t *restrict out, int64_t width,
                        int64_t ahead, int64_t *bad_event)
{
    advise_huge(out, (uintptr_t)n * (uintptr_t)width * sizeof *out);
    return gather_range(0, n, fields, tables, rows, dims, ids, out, width, ahead, bad_event);
}

/* gather_keys_f32 on the caller's thread with `team`'s member taking chunks where it joins (gather_team_join).
 * The team is closed when this returns. On a bad id, rows after it may be written too (the other worker's). */
int64_t gather_keys_team(int64_t n, int64_t fields, const uint32_t *const *tables, const int64_t *rows,
                         const int64_t *dims, const int64_t *const *ids, uint32_t *restrict out, int64_t width,
                         int64_t ahead, int64_t *bad_event, team_t *team)
{
    advise_huge(out, (uintptr_t)n * (uintptr_t)width * sizeof *out);
    call_t c = {n, fields, tables, rows, dims, ids, out, width, ahead, 0, INT64_MAX, {0, 0}};
    team_open(team, &c);
    run_part(&c, 0);
    team_close(team);
    team->chunks[0] = c.chunks[0];
    team->chunks[1] = c.chunks[1];
    if (c.bad == INT64_MAX)
        return -1;
    *bad_event = c.bad / fields;
    return c.bad % fields;
}

/* Worker 1 of the team's gather, once it is open; 1 when it took part, 0 when the call was closed first. */
int gather_team_join(team_t *team)
{
    call_t *c = team_enter(team);
    if (c == NULL)
        return 0;
    run_part(c, 1);
    team_leave(team);
    return 1;
}

void gather_team_close(team_t *team) { team_close(team); }

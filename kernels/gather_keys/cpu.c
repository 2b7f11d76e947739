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

/* n events; fields tables[f] [rows[f], dims[f]] (row-major, contiguous) with ids[f] [n]; out [n, width],
 * width = sum of dims. -> -1, or the first field (in event order) whose id is out of range, with that
 * event in *bad_event (the rows before it are written, the rest not). */
int64_t gather_keys_f32(int64_t n, int64_t fields, const uint32_t *const *tables, const int64_t *rows,
                        const int64_t *dims, const int64_t *const *ids, uint32_t *restrict out, int64_t width,
                        int64_t ahead, int64_t *bad_event)
{
    advise_huge(out, (uintptr_t)n * (uintptr_t)width * sizeof *out);
    /* the events [0, ahead) are checked and prefetched before the loop; event j + ahead inside it */
    for (int64_t j = 0; j < (ahead < n ? ahead : n); j++)
        for (int64_t f = 0; f < fields; f++) {
            const int64_t id = ids[f][j];
            if ((uint64_t)id >= (uint64_t)rows[f]) {
                *bad_event = j;
                return f;
            }
            __builtin_prefetch(tables[f] + id * dims[f]);
        }
    for (int64_t j = 0; j < n; j++) {
        if (j + ahead < n)
            for (int64_t f = 0; f < fields; f++) {
                const int64_t id = ids[f][j + ahead];
                if ((uint64_t)id >= (uint64_t)rows[f]) {
                    *bad_event = j + ahead;
                    return f;
                }
                __builtin_prefetch(tables[f] + id * dims[f]);
            }
        uint32_t *restrict o = out + j * width;
        for (int64_t f = 0; f < fields; f++) {
            const int64_t d = dims[f];
            const uint32_t *restrict r = tables[f] + ids[f][j] * d;
            for (int64_t c = 0; c < d; c++)
                o[c] = r[c];
            o += d;
        }
    }
    return -1;
}

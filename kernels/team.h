/* A team of two threads on one kernel call, without OpenMP (retrieval.lend lends an idle core this way):
 * the caller, worker 0, and a member, worker 1, that joins whenever it gets there. Both take the call's work
 * in chunks from shared counters, so a member that comes late or never takes fewer chunks and nobody waits
 * for it; the caller returns only once a member that joined has left.
 *
 * state moves WAITING -> OPEN (the caller has set the call up) -> JOINED (a member is in) -> LEFT, or to
 * CLOSED where no member got in (closed before it came). A team serves one call and starts zeroed (WAITING):
 * the lender makes one per call, so a member still on its way from the last call joins nothing.
 *
 * kernels.team.TeamState is this struct on the Python side. */
#ifndef RECSYS_TEAM_H
#define RECSYS_TEAM_H

#include <stddef.h>

typedef struct {
    int state;
    int chunks[2];   /* after the call: chunks the caller and the member took */
    void *call;      /* the kernel's own call state, set by team_open */
} team_t;
enum { TEAM_WAITING, TEAM_OPEN, TEAM_JOINED, TEAM_CLOSED, TEAM_LEFT };

static inline void cpu_relax(void) {   /* in a spin wait: let the sibling hyperthread run, save power */
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    __asm__ volatile("yield");
#endif
}

/* The member: wait while the caller sets the call up (microseconds) -> the call to work on, or NULL where
   it was closed first. A member that got a call runs its part, then team_leave. */
static inline void *team_enter(team_t *team) {
    for (;;) {
        int s = __atomic_load_n(&team->state, __ATOMIC_ACQUIRE);
        if (s == TEAM_WAITING) {
            cpu_relax();
            continue;
        }
        if (s != TEAM_OPEN) return NULL;
        if (__atomic_compare_exchange_n(&team->state, &s, TEAM_JOINED, 0, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE))
            return team->call;
    }
}

static inline void team_leave(team_t *team) { __atomic_store_n(&team->state, TEAM_LEFT, __ATOMIC_RELEASE); }

/* The caller, once `call` is ready for a second worker. */
static inline void team_open(team_t *team, void *call) {
    team->call = call;
    __atomic_store_n(&team->state, TEAM_OPEN, __ATOMIC_RELEASE);
}

/* No member may join after this returns, and a member that joined has left (its chunks are done). */
static inline void team_close(team_t *team) {
    int s = TEAM_WAITING;
    if (__atomic_compare_exchange_n(&team->state, &s, TEAM_CLOSED, 0, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE)) return;
    s = TEAM_OPEN;
    if (__atomic_compare_exchange_n(&team->state, &s, TEAM_CLOSED, 0, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE)) return;
    while (__atomic_load_n(&team->state, __ATOMIC_ACQUIRE) == TEAM_JOINED) cpu_relax();
}

#endif

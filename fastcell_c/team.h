/* A thread team: fastcell's own native threads (not BLAS's, not OpenMP's), made once for a model
 * or a pool and reused by every call. fc_team_run(t, fn, arg, n) runs fn(arg, part, n) for
 * part = 0 .. n-1, part 0 on the calling thread and the others on workers, and returns when all
 * are done; inside a run the parts may meet at fc_team_barrier.
 *
 * Only the workers that have a part are woken: each has its own job counter and condition
 * variable. Between runs a worker spins a little on its counter, then sleeps. The spins have no
 * PAUSE instruction on purpose: in a virtual machine a loop of PAUSEs makes the hypervisor take
 * the vCPU away (pause-loop exiting), and measured on a 2-vCPU guest that left the second thread
 * out of every step that followed some Python work (1.05x one thread, against 1.8x without).
 *
 * The barrier (fc_team_meet) spins on an epoch counter (one shared line, no mutex); a part that
 * has spun long without the others arriving yields its CPU (sched_yield), so more parts than
 * cores (3 on 2) still progress, only slower. A run's first stalled barrier (a wait past
 * FC_STALL_NS: a part's CPU was taken a while, as a VM does to a vCPU dozens of times a second
 * here) is waited out. At a second one (the part's CPU is shared with another busy thread, and
 * every step would wait for its time slice), the caller's part takes the run over: once that
 * barrier completes, the other parts stop and the caller does every part's work alone for the
 * rest of the run (the walks widen its slice: walk.pxd). The decision is one bit in the arrival
 * counter, read by the part whose arrival completes the barrier, so every part sees the same.
 *
 * One call at a time: fc_team_enter claims the team for a call, and a call that finds it taken
 * (another Python thread's call on the same model) computes on its own thread alone: never more
 * busy threads than a model was given, never a wait. In a process forked from the one that
 * started the workers they do not exist: enter fails there, and every call runs on its caller.
 *
 * A team whose parts stall (a barrier or the end of a run waited more than FC_STALL_NS: a part's
 * CPU was taken by another process, or the VM took a vCPU away) stands down for a while: calls
 * run on their caller alone (fc_team_enter and fc_team_ready say no) for FC_BACKOFF_NS after
 * the stall. A stall that follows the last one within FC_RESTALL_NS doubles the stand-down, up
 * to FC_BACKOFF_MAX_NS: a busy neighbour on a worker's CPU stalls every split run (each waits
 * for the worker's next time slice), so one thread is the faster there; a VM's brief vCPU gaps
 * (dozens a second, 1-16 ms, measured on this machine's idle guest) cost one short stand-down
 * each.
 *
 * Workers are pinned to the CPUs the process may run on (worker i to the i-th such CPU after
 * the first), where the OS allows it (Linux's pthread_setaffinity_np); elsewhere, or when the
 * process may run on fewer CPUs than the team has threads, they float as the OS schedules them.
 * Workers block every signal: Python handles signals on its main thread.
 */
#ifndef FASTCELL_TEAM_H
#define FASTCELL_TEAM_H

#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stdlib.h>
#include <time.h>
#include <unistd.h>

typedef void (*fc_task)(void *arg, int part, int nparts);

#define FC_SPIN 200000        /* loads of a counter, about 100 us, before a worker sleeps */
#define FC_BARRIER_SPIN 20000 /* loads of the epoch before a waiting part yields its CPU */
#define FC_RELAX() __asm__ __volatile__("" ::: "memory")
#define FC_STALL_NS 200000LL           /* a wait this long: a part was not running (200 us; a
                                          scheduler time slice is 0.75-3 ms) */
#define FC_BACKOFF_NS 2000000LL        /* a stand-down after a stall (2 ms) ... */
#define FC_RESTALL_NS 100000000LL      /* ... doubled by a stall within 100 ms of the last, */
#define FC_BACKOFF_MAX_NS 1000000000LL /* ... up to 1 s */

static long long fc_now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (long long)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

struct fc_team;

typedef struct {
    struct fc_team *t;
    int index;                 /* this worker's part: 1 .. nthreads-1 */
    unsigned long go;          /* bumped once per run this worker has a part in (atomics) */
    int sleeping;              /* waiting on cv (under t->mu) */
    pthread_cond_t cv;
} fc_team_slot;

typedef struct fc_team {
    pthread_mutex_t mu;
    pthread_cond_t done;
    pid_t pid;                 /* the process whose threads these are */
    int nthreads;              /* the caller and the workers */
    int started;               /* workers running */
    int pinned;                /* workers pinned to CPUs */
    int busy;                  /* a call holds the team (atomics) */
    int pending;               /* workers still on the current run (atomics) */
    int waiting;               /* the caller waits on done (under mu) */
    int stop;
    fc_task fn;
    void *arg;
    int nparts;
    int stalled;               /* a wait of the current run stalled (atomics) */
    int alone;                 /* the last barrier handed the run to the caller's part */
    unsigned long takeovers;   /* runs the caller's part finished alone (diagnostics) */
    unsigned long stalls;      /* runs that stalled (each stood the team down) */
    int fault_part, fault_at;  /* tests: part fault_part sleeps fault_us at its fault_at-th */
    int fault_times;           /* ... barrier from now, and the fault_times - 1 after it */
    long fault_us;             /* ... (fault_at < 0: never) */
    long long backoff_ns;      /* the last stand-down; written by runs, which one call at a */
    long long last_stall_ns;   /* ... time makes; */
    long long retry_ns;        /* ... read racily by enter/ready (0: not standing down) */
    /* the barrier of the current run */
    unsigned bar_count __attribute__((aligned(64)));
    unsigned bar_epoch __attribute__((aligned(64)));
    pthread_t *tid;
    fc_team_slot *slots;
} fc_team;

static void *fc_team_main(void *p) {
    fc_team_slot *s = (fc_team_slot *)p;
    fc_team *t = s->t;
    unsigned long seen = 0;
    for (;;) {
        for (int i = 0; i < FC_SPIN && __atomic_load_n(&s->go, __ATOMIC_ACQUIRE) == seen
                        && !__atomic_load_n(&t->stop, __ATOMIC_ACQUIRE); i++)
            FC_RELAX();
        pthread_mutex_lock(&t->mu);
        while (__atomic_load_n(&s->go, __ATOMIC_ACQUIRE) == seen && !t->stop) {
            s->sleeping = 1;
            pthread_cond_wait(&s->cv, &t->mu);
            s->sleeping = 0;
        }
        if (t->stop) {
            pthread_mutex_unlock(&t->mu);
            return NULL;
        }
        pthread_mutex_unlock(&t->mu);
        seen = __atomic_load_n(&s->go, __ATOMIC_ACQUIRE);
        t->fn(t->arg, s->index, t->nparts);    /* set before go was bumped (release/acquire) */
        if (__atomic_sub_fetch(&t->pending, 1, __ATOMIC_ACQ_REL) == 0) {
            pthread_mutex_lock(&t->mu);
            if (t->waiting) pthread_cond_signal(&t->done);
            pthread_mutex_unlock(&t->mu);
        }
    }
}

static void fc_team_free(fc_team *t) {
    if (t == NULL) return;
    if (getpid() != t->pid) {    /* a forked child: no workers, and the locks may be held */
        free(t->tid);
        free(t->slots);
        free(t);
        return;
    }
    if (t->started > 0) {
        pthread_mutex_lock(&t->mu);
        __atomic_store_n(&t->stop, 1, __ATOMIC_RELEASE);
        for (int i = 0; i < t->started; i++) pthread_cond_signal(&t->slots[i].cv);
        pthread_mutex_unlock(&t->mu);
        for (int i = 0; i < t->started; i++) pthread_join(t->tid[i], NULL);
    }
    for (int i = 0; i < t->started; i++) pthread_cond_destroy(&t->slots[i].cv);
    pthread_mutex_destroy(&t->mu);
    pthread_cond_destroy(&t->done);
    free(t->tid);
    free(t->slots);
    free(t);
}

/* Pins worker i (1-based) to the i-th CPU after the first the process may run on, if there are
 * as many; returns whether it did. */
static int fc_team_pin(pthread_t tid, int i) {
#ifdef __linux__
    cpu_set_t allowed, one;
    if (sched_getaffinity(0, sizeof allowed, &allowed) != 0) return 0;
    int seen = 0;
    for (int cpu = 0; cpu < CPU_SETSIZE; cpu++) {
        if (!CPU_ISSET(cpu, &allowed)) continue;
        if (seen++ == i) {
            CPU_ZERO(&one);
            CPU_SET(cpu, &one);
            return pthread_setaffinity_np(tid, sizeof one, &one) == 0;
        }
    }
    return 0;
#else
    (void)tid;
    (void)i;
    return 0;
#endif
}

/* nthreads - 1 workers (the caller is the first thread); NULL when memory or a thread cannot be
 * had. pin: pin the workers (when the process may run on at least nthreads CPUs). */
static fc_team *fc_team_new(int nthreads, int pin) {
    fc_team *t = (fc_team *)calloc(1, sizeof(fc_team));
    if (t == NULL) return NULL;
    pthread_mutex_init(&t->mu, NULL);
    pthread_cond_init(&t->done, NULL);
    t->pid = getpid();
    t->fault_at = -1;
    t->nthreads = nthreads > 1 ? nthreads : 1;
    int n = t->nthreads - 1;
    t->tid = (pthread_t *)calloc(n > 0 ? n : 1, sizeof(pthread_t));
    t->slots = (fc_team_slot *)calloc(n > 0 ? n : 1, sizeof(fc_team_slot));
    if (t->tid == NULL || t->slots == NULL) {
        fc_team_free(t);
        return NULL;
    }
    sigset_t all, old;
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &old);
    int ok = 1;
    for (int i = 0; i < n && ok; i++) {
        t->slots[i].t = t;
        t->slots[i].index = i + 1;
        pthread_cond_init(&t->slots[i].cv, NULL);
        if (pthread_create(&t->tid[i], NULL, fc_team_main, &t->slots[i]) == 0)
            t->started++;
        else {
            pthread_cond_destroy(&t->slots[i].cv);
            ok = 0;
        }
    }
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    if (!ok) {
        fc_team_free(t);
        return NULL;
    }
    if (pin) {
        t->pinned = 1;
        for (int i = 0; i < n; i++) t->pinned &= fc_team_pin(t->tid[i], i + 1);
    }
    return t;
}

/* Whether the team may run parts now: it has workers (not a forked child) and is not standing
 * down after a stall. */
static int fc_team_ready(fc_team *t) {
    if (t == NULL || t->started == 0 || getpid() != t->pid) return 0;
    return __atomic_load_n(&t->retry_ns, __ATOMIC_RELAXED) == 0
           || fc_now_ns() >= __atomic_load_n(&t->retry_ns, __ATOMIC_RELAXED);
}

/* Claims the team for one call: 1 if this call may run parts on the workers (it must then call
 * fc_team_leave), 0 if another call holds it, the team is standing down (fc_team_ready), or the
 * workers do not exist (a forked child). */
static int fc_team_enter(fc_team *t) {
    if (!fc_team_ready(t)) return 0;
    int expect = 0;
    return __atomic_compare_exchange_n(&t->busy, &expect, 1, 0, __ATOMIC_ACQUIRE,
                                       __ATOMIC_RELAXED);
}

static void fc_team_leave(fc_team *t) {
    __atomic_store_n(&t->busy, 0, __ATOMIC_RELEASE);
}

#define FC_TAKEOVER (1u << 16) /* in bar_count: the caller's part asks to go on alone */
#define FC_ARRIVED 0xFFFFu

/* The parts of the current run meet here: none leaves before all have come. Returns 0 to go on
 * as before; once the caller's part (part 0) has taken the run over at this barrier, 1 to part
 * 0 (every part's work is now its own) and -1 to the others (stop now, write nothing more). */
static int fc_team_meet(fc_team *t, int part) {
    if (t == NULL || t->nparts <= 1) return 0;
    if (part == t->fault_part && t->fault_at >= 0 && t->fault_at-- == 0) {
        usleep((useconds_t)t->fault_us);
        if (--t->fault_times > 0) t->fault_at = 0;
    }
    int stalled_before = __atomic_load_n(&t->stalled, __ATOMIC_RELAXED);
    unsigned epoch = __atomic_load_n(&t->bar_epoch, __ATOMIC_ACQUIRE);
    unsigned v = __atomic_add_fetch(&t->bar_count, 1, __ATOMIC_ACQ_REL);
    if ((v & FC_ARRIVED) == (unsigned)t->nparts) {
        t->alone = (v & FC_TAKEOVER) != 0;
        __atomic_store_n(&t->bar_count, 0, __ATOMIC_RELAXED);
        __atomic_store_n(&t->bar_epoch, epoch + 1, __ATOMIC_RELEASE);
    } else {
        long long since = 0;
        int asked = 0;
        for (int spins = 0; __atomic_load_n(&t->bar_epoch, __ATOMIC_ACQUIRE) == epoch;) {
            if (++spins == FC_BARRIER_SPIN) {
                /* long enough to look at the clock: a part that is not running stalls the run */
                long long now = fc_now_ns();
                if (since == 0) since = now;
                else if (now - since > FC_STALL_NS) {
                    __atomic_store_n(&t->stalled, 1, __ATOMIC_RELAXED);
                    if (part == 0 && stalled_before && !asked) {
                        asked = 1;
                        unsigned old = __atomic_fetch_or(&t->bar_count, FC_TAKEOVER,
                                                         __ATOMIC_ACQ_REL);
                        /* Count 0: this barrier completed and was reset meanwhile, so the bit
                         * went to the next one, which cannot complete before this part comes
                         * to it: take it back. (A full count: completed, not yet reset; the
                         * reset clears it.) Else the last arrival will see it. */
                        if ((old & FC_ARRIVED) == 0)
                            __atomic_fetch_and(&t->bar_count, ~FC_TAKEOVER, __ATOMIC_ACQ_REL);
                    }
                }
                sched_yield();
                spins = 0;
            }
            FC_RELAX();
        }
    }
    if (!t->alone) return 0;          /* written before the epoch's release: read after it */
    if (part != 0) return -1;
    t->nparts = 1;                    /* the others have stopped: no barrier waits any more */
    __atomic_add_fetch(&t->takeovers, 1, __ATOMIC_RELAXED);
    return 1;
}

/* After a run: a stalled one stands the team down.
 * The caller waited for late workers from wait_from (0: it did not), having run its own part
 * from start: a worker that finished more than FC_STALL_NS and more than the caller's own part
 * after the caller stalled (a long part of its own is no stall). */
static void fc_team_settle(fc_team *t, long long start, long long wait_from) {
    int stalled = __atomic_exchange_n(&t->stalled, 0, __ATOMIC_RELAXED);
    long long now = wait_from ? fc_now_ns() : 0;
    if (wait_from && now - wait_from > FC_STALL_NS && now - wait_from > wait_from - start)
        stalled = 1;
    if (stalled) {
        t->stalls++;
        if (!now) now = fc_now_ns();
        long long b = t->last_stall_ns && now - t->last_stall_ns < FC_RESTALL_NS
                          ? 2 * t->backoff_ns : FC_BACKOFF_NS;
        t->backoff_ns = b < FC_BACKOFF_MAX_NS ? b : FC_BACKOFF_MAX_NS;
        t->last_stall_ns = now;
        __atomic_store_n(&t->retry_ns, now + t->backoff_ns, __ATOMIC_RELAXED);
    } else if (__atomic_load_n(&t->retry_ns, __ATOMIC_RELAXED)) {
        __atomic_store_n(&t->retry_ns, 0, __ATOMIC_RELAXED);    /* spares ready() the clock */
    }
}

/* Runs nparts parts (at most the team's threads) and returns when every one is done; the team
 * must be entered (fc_team_enter), or nparts 1: then the part runs on the caller alone. Only the
 * workers of parts 1 .. nparts-1 are woken. */
static void fc_team_run(fc_team *t, fc_task fn, void *arg, int nparts) {
    if (nparts <= 1 || t == NULL || t->started == 0 || getpid() != t->pid) {
        if (t != NULL) t->nparts = 1;
        fn(arg, 0, 1);
        return;
    }
    if (nparts > t->started + 1) nparts = t->started + 1;
    t->fn = fn;
    t->arg = arg;
    t->nparts = nparts;
    t->alone = 0;
    __atomic_store_n(&t->stalled, 0, __ATOMIC_RELAXED);
    __atomic_store_n(&t->bar_count, 0, __ATOMIC_RELAXED);
    __atomic_store_n(&t->pending, nparts - 1, __ATOMIC_RELEASE);
    for (int i = 0; i < nparts - 1; i++) {
        fc_team_slot *s = &t->slots[i];
        __atomic_add_fetch(&s->go, 1, __ATOMIC_ACQ_REL);
        pthread_mutex_lock(&t->mu);
        if (s->sleeping) pthread_cond_signal(&s->cv);
        pthread_mutex_unlock(&t->mu);
    }
    long long start = fc_now_ns();
    fn(arg, 0, nparts);
    long long wait_from = 0;   /* when the caller began to wait for a late worker */
    for (int i = 0; __atomic_load_n(&t->pending, __ATOMIC_ACQUIRE) > 0; i++) {
        if (i == FC_BARRIER_SPIN) wait_from = fc_now_ns();
        if (i == FC_SPIN) break;
        FC_RELAX();
    }
    pthread_mutex_lock(&t->mu);
    while (__atomic_load_n(&t->pending, __ATOMIC_ACQUIRE) > 0) {
        t->waiting = 1;
        pthread_cond_wait(&t->done, &t->mu);
        t->waiting = 0;
    }
    pthread_mutex_unlock(&t->mu);
    fc_team_settle(t, start, wait_from);
}

#endif

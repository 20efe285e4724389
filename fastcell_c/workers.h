/* A fixed set of native threads that belongs to one StreamPool: fc_workers_run(w, fn, arg, n)
 * runs fn(arg, part, n) for part = 0..n-1, part 0 on the calling thread and the others on the
 * workers, and returns when all are done. Not BLAS's threads and not OpenMP's: the pool decides
 * how many exist (its `threads`), so nothing else in the process oversubscribes through it.
 *
 * Only the workers that have a part are woken: each has its own job counter and condition
 * variable, so a run of 2 parts on a pool of many threads touches one worker, not all of them.
 *
 * A worker spins briefly after a job before it sleeps on its condition variable: under load the
 * next tick comes within microseconds, and waking a sleeping thread costs about as much as a
 * small tick. The spin has no PAUSE instruction on purpose: in a virtual machine a loop of
 * PAUSEs makes the hypervisor take the vCPU away (pause-loop exiting), and measured on a 2-vCPU
 * guest that left the second thread out of every step that followed some Python work (1.05x one
 * thread, against 1.8x without PAUSE).
 * In a process forked from the one that started them the workers do not exist: runs there take
 * every part on the calling thread (the same bits, since a part's rows do not depend on it), and
 * nothing touches the workers' locks, which a worker may have held when the process forked.
 */
#ifndef FASTCELL_WORKERS_H
#define FASTCELL_WORKERS_H

#include <pthread.h>
#include <signal.h>
#include <stdlib.h>
#include <unistd.h>

typedef void (*fc_task)(void *arg, int part, int nparts);

#define FC_SPIN 200000   /* loads of the job counter, about 100 us, before a worker sleeps */
#define FC_PAUSE() __asm__ __volatile__("" ::: "memory")

struct fc_workers;

typedef struct {
    struct fc_workers *w;
    int index;                 /* this worker's part: 1 .. nthreads-1 */
    unsigned long go;          /* bumped once per job this worker has a part in (atomics) */
    int sleeping;              /* waiting on cv (under w->mu) */
    pthread_cond_t cv;
} fc_worker_slot;

typedef struct fc_workers {
    pthread_mutex_t mu;
    pthread_cond_t done;
    pid_t pid;                 /* the process whose threads these are */
    int started;               /* workers running (nthreads - 1 once started) */
    int pending;               /* workers still on the current job (atomics) */
    int waiting;               /* the caller waits on done (under mu) */
    int stop;
    fc_task fn;
    void *arg;
    int nparts;
    pthread_t *tid;
    fc_worker_slot *slots;
} fc_workers;

static void *fc_worker_main(void *p) {
    fc_worker_slot *s = (fc_worker_slot *)p;
    fc_workers *w = s->w;
    unsigned long seen = 0;
    for (;;) {
        for (int i = 0; i < FC_SPIN && __atomic_load_n(&s->go, __ATOMIC_ACQUIRE) == seen
                        && !__atomic_load_n(&w->stop, __ATOMIC_ACQUIRE); i++)
            FC_PAUSE();
        pthread_mutex_lock(&w->mu);
        while (__atomic_load_n(&s->go, __ATOMIC_ACQUIRE) == seen && !w->stop) {
            s->sleeping = 1;
            pthread_cond_wait(&s->cv, &w->mu);
            s->sleeping = 0;
        }
        if (w->stop) {
            pthread_mutex_unlock(&w->mu);
            return NULL;
        }
        pthread_mutex_unlock(&w->mu);
        seen = __atomic_load_n(&s->go, __ATOMIC_ACQUIRE);
        w->fn(w->arg, s->index, w->nparts);   /* set before go was bumped (release/acquire) */
        if (__atomic_sub_fetch(&w->pending, 1, __ATOMIC_ACQ_REL) == 0) {
            pthread_mutex_lock(&w->mu);
            if (w->waiting) pthread_cond_signal(&w->done);
            pthread_mutex_unlock(&w->mu);
        }
    }
}

static void fc_workers_free(fc_workers *w) {
    if (w == NULL) return;
    if (getpid() != w->pid) {    /* a forked child: no workers, and the locks may be held */
        free(w->tid);
        free(w->slots);
        free(w);
        return;
    }
    if (w->started > 0) {
        pthread_mutex_lock(&w->mu);
        __atomic_store_n(&w->stop, 1, __ATOMIC_RELEASE);
        for (int i = 0; i < w->started; i++) pthread_cond_signal(&w->slots[i].cv);
        pthread_mutex_unlock(&w->mu);
        for (int i = 0; i < w->started; i++) pthread_join(w->tid[i], NULL);
    }
    for (int i = 0; i < w->started; i++) pthread_cond_destroy(&w->slots[i].cv);
    pthread_mutex_destroy(&w->mu);
    pthread_cond_destroy(&w->done);
    free(w->tid);
    free(w->slots);
    free(w);
}

/* nthreads - 1 workers (the caller is the first thread); NULL when memory or a thread cannot be
 * had. Workers block every signal: Python handles signals on its main thread. */
static fc_workers *fc_workers_new(int nthreads) {
    fc_workers *w = (fc_workers *)calloc(1, sizeof(fc_workers));
    if (w == NULL) return NULL;
    pthread_mutex_init(&w->mu, NULL);
    pthread_cond_init(&w->done, NULL);
    w->pid = getpid();
    int n = nthreads > 1 ? nthreads - 1 : 0;
    w->tid = (pthread_t *)calloc(n > 0 ? n : 1, sizeof(pthread_t));
    w->slots = (fc_worker_slot *)calloc(n > 0 ? n : 1, sizeof(fc_worker_slot));
    if (w->tid == NULL || w->slots == NULL) {
        fc_workers_free(w);
        return NULL;
    }
    sigset_t all, old;
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &old);
    int ok = 1;
    for (int i = 0; i < n && ok; i++) {
        w->slots[i].w = w;
        w->slots[i].index = i + 1;
        pthread_cond_init(&w->slots[i].cv, NULL);
        if (pthread_create(&w->tid[i], NULL, fc_worker_main, &w->slots[i]) == 0)
            w->started++;
        else {
            pthread_cond_destroy(&w->slots[i].cv);
            ok = 0;
        }
    }
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    if (!ok) {
        fc_workers_free(w);
        return NULL;
    }
    return w;
}

/* Runs the nparts parts (nparts <= 1 + started) and returns when every one is done. Only the
 * workers of parts 1 .. nparts-1 are woken. */
static void fc_workers_run(fc_workers *w, fc_task fn, void *arg, int nparts) {
    if (nparts <= 1 || w == NULL || w->started == 0 || getpid() != w->pid) {
        for (int p = 0; p < nparts; p++) fn(arg, p, nparts);
        return;
    }
    if (nparts > w->started + 1) nparts = w->started + 1;   /* never a part nobody runs */
    w->fn = fn;
    w->arg = arg;
    w->nparts = nparts;
    __atomic_store_n(&w->pending, nparts - 1, __ATOMIC_RELEASE);
    for (int i = 0; i < nparts - 1; i++) {
        fc_worker_slot *s = &w->slots[i];
        __atomic_add_fetch(&s->go, 1, __ATOMIC_ACQ_REL);
        pthread_mutex_lock(&w->mu);
        if (s->sleeping) pthread_cond_signal(&s->cv);
        pthread_mutex_unlock(&w->mu);
    }
    fn(arg, 0, nparts);
    for (int i = 0; i < FC_SPIN && __atomic_load_n(&w->pending, __ATOMIC_ACQUIRE) > 0; i++)
        FC_PAUSE();
    pthread_mutex_lock(&w->mu);
    while (__atomic_load_n(&w->pending, __ATOMIC_ACQUIRE) > 0) {
        w->waiting = 1;
        pthread_cond_wait(&w->done, &w->mu);
        w->waiting = 0;
    }
    pthread_mutex_unlock(&w->mu);
}

#endif

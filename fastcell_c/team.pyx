# The thread team: fastcell's own native threads (team.h), made once for a model or a pool and
# reused by every call, never BLAS's or OpenMP's. A call enters the team, runs its parts on it
# (part 0 on the calling thread), and leaves; a call that finds the team taken by another call
# of the same model runs on its own thread alone (the same bits), so a team never has more busy
# threads than it was given and a call never waits. In a process forked from the one that made
# it, a team has no workers: every call runs on its caller.
import os


cdef extern from "team.h" nogil:
    ctypedef struct fc_team:
        int nthreads
        int started
        int pinned
        unsigned long takeovers, stalls
        int fault_part, fault_at, fault_times
        long fault_us
    ctypedef void (*fc_task)(void* arg, int part, int nparts) noexcept nogil
    fc_team* fc_team_new(int nthreads, int pin)
    void fc_team_free(fc_team* t)
    int fc_team_ready(fc_team* t)
    int fc_team_enter(fc_team* t)
    void fc_team_leave(fc_team* t)
    void fc_team_run(fc_team* t, fc_task fn, void* arg, int nparts)
    int fc_team_meet(fc_team* t, int part)


def max_threads():
    """The most threads a model or a pool may use: the CPUs this process may run on
    (os.sched_getaffinity where the OS has it, else os.cpu_count()). More threads than cores
    only wait for each other: every step waits for its slowest part. FASTCELL_MAX_THREADS (an
    integer) overrides it, e.g. to test oversubscription on a small machine."""
    env = os.environ.get("FASTCELL_MAX_THREADS")
    if env:
        try:
            n = int(env)
        except ValueError:
            n = 0
        if n < 1:
            raise ValueError(f"FASTCELL_MAX_THREADS: expected an integer >= 1, got {env!r}")
        return n
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def check_threads(threads, name="threads"):
    """threads as an int in [1, max_threads()], else TypeError or ValueError naming `name`."""
    from fastcell_c.kernel import as_int

    threads = as_int(threads, name)
    limit = max_threads()
    if threads > limit:
        raise ValueError(f"{name}: expected at most {limit} (the CPUs this process may run on; "
                         f"more only wait for each other), got {threads}")
    return threads


def team_of(threads, name="threads"):
    """(threads, a Team of them or None for one thread): how a model holds its `threads`."""
    threads = check_threads(threads, name)
    return threads, (Team(threads) if threads > 1 else None)


def unpickled_threads(threads):
    """A pickled model's threads in this process: at most the CPUs it may run on here."""
    return min(threads, max_threads())


cdef class Team:
    """Team(threads): the caller and threads - 1 workers, pinned to the CPUs the process may run
    on where the OS allows it and there are as many. threads is checked by check_threads."""

    def __init__(self, threads):
        threads = check_threads(threads)
        if self._t != NULL:
            raise RuntimeError("Team: already initialised")
        self.threads = threads
        if threads > 1:
            self._t = fc_team_new(threads, threads <= _cpus())
            if self._t == NULL:
                raise OSError(f"threads: cannot start {threads - 1} worker threads")
            self.pinned = (<fc_team*>self._t).pinned

    def __dealloc__(self):
        fc_team_free(<fc_team*>self._t)    # joins the workers (none in a forked child)

    def __reduce__(self):
        return (Team, (self.threads,))     # a new team of as many threads in the new process

    @property
    def takeovers(self):
        """Runs whose caller took over every part's work after a stalled barrier (team.h)."""
        return 0 if self._t == NULL else (<fc_team*>self._t).takeovers

    @property
    def stalls(self):
        """Runs that stalled, each of which stood the team down (team.h)."""
        return 0 if self._t == NULL else (<fc_team*>self._t).stalls

    def _fault(self, int part, int at, long microseconds, int times=1):
        """Fault injection for the tests: part `part` sleeps `microseconds` at its `at`-th
        barrier from now and at the times - 1 after it (a CPU taken away at the worst moment)."""
        if self._t != NULL:
            (<fc_team*>self._t).fault_part = part
            (<fc_team*>self._t).fault_us = microseconds
            (<fc_team*>self._t).fault_times = times
            (<fc_team*>self._t).fault_at = at

    @property
    def standing_down(self):
        """Whether calls now run on their caller alone after a stalled run (team.h)."""
        return self._t != NULL and not fc_team_ready(<fc_team*>self._t)

    def __repr__(self):
        return f"Team(threads={self.threads}{', pinned' if self.pinned else ''})"

    cdef bint ready(self) noexcept nogil:
        return self._t != NULL and fc_team_ready(<fc_team*>self._t)

    cdef bint enter(self) noexcept nogil:
        return self._t != NULL and fc_team_enter(<fc_team*>self._t)

    cdef void leave(self) noexcept nogil:
        fc_team_leave(<fc_team*>self._t)

    cdef void run(self, task_fn fn, void* arg, int nparts) noexcept nogil:
        fc_team_run(<fc_team*>self._t, <fc_task>fn, arg, nparts)


cdef int meet_at(void* team, int part) noexcept nogil:
    return fc_team_meet(<fc_team*>team, part)


def _cpus():
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1

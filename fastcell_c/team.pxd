# A thread team (team.h): fastcell's own threads for one model or one pool, made once and reused
# by every call. Its C code is compiled here only; the walks meet at its barrier through
# meet_at().

ctypedef void (*task_fn)(void* arg, int part, int nparts) noexcept nogil


cdef class Team:
    cdef void* _t                      # fc_team
    cdef readonly int threads          # the caller and threads - 1 workers
    cdef readonly bint pinned          # the workers are pinned to CPUs

    cdef bint ready(self) noexcept nogil     # has workers, and is not standing down (team.h)
    cdef bint enter(self) noexcept nogil
    cdef void leave(self) noexcept nogil
    cdef void run(self, task_fn fn, void* arg, int nparts) noexcept nogil


cdef int meet_at(void* team, int part) noexcept nogil   # fc_team_meet

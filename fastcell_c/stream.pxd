# Streaming: the state of one stream (or a fixed batch of them), and the stepper that advances it
# through a stack of layers. The stream pool takes a Stepper: the kernels and initial state of the
# model it serves.


from fastcell_c.team cimport Team


cdef class Stepper:
    cdef readonly tuple kernels
    cdef readonly Team team           # the threads of a step (None: the caller's alone)
    cdef readonly object family
    cdef readonly object initial      # None (zeros), or (h (L, H_out),) / (h, c (L, H)): where
                                      # new states start
    cdef readonly object dtype
    cdef readonly Py_ssize_t input_size, hidden_size, output_size
    cdef readonly bint has_cell_state
    cdef int typenum

    cdef object _coerce(self, x)


cdef class StreamState:
    cdef readonly object h, c
    cdef readonly Py_ssize_t batch
    cdef readonly Stepper owner
    cdef char* work
    cdef bint parity     # alternates the panel order of successive steps (cache reuse, same bits)

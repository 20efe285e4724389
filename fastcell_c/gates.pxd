# The fused gate passes (gates.h: C, restrict pointers, one per x86 level, the CPU's best picked
# once by fastcell_c.platform), over float and double for the cell walks. A kernel keeps the
# passes it calls (Kernel.passes, from platform.gate_pass): each call here is one indirect call.
from cython cimport floating

ctypedef void (*rnn_f)(Py_ssize_t, const float*, const float*, float*) noexcept nogil
ctypedef void (*rnn_d)(Py_ssize_t, const double*, const double*, double*) noexcept nogil
ctypedef void (*gru_ra_f)(Py_ssize_t, Py_ssize_t, const float*, const float*, const float*,
                          const float*, float*) noexcept nogil
ctypedef void (*gru_ra_d)(Py_ssize_t, Py_ssize_t, const double*, const double*, const double*,
                          const double*, double*) noexcept nogil
ctypedef void (*gru_rbg_f)(Py_ssize_t, Py_ssize_t, float*, const float*, const float*,
                           float*) noexcept nogil
ctypedef void (*gru_rbg_d)(Py_ssize_t, Py_ssize_t, double*, const double*, const double*,
                           double*) noexcept nogil
ctypedef void (*gru_rbu_f)(Py_ssize_t, Py_ssize_t, const float*, const float*, float*) noexcept nogil
ctypedef void (*gru_rbu_d)(Py_ssize_t, Py_ssize_t, const double*, const double*,
                           double*) noexcept nogil
ctypedef void (*lstm_f)(Py_ssize_t, Py_ssize_t, const float*, const float*, float*,
                        float*) noexcept nogil
ctypedef void (*lstm_d)(Py_ssize_t, Py_ssize_t, const double*, const double*, double*,
                        double*) noexcept nogil
ctypedef void (*peephole_f)(Py_ssize_t, Py_ssize_t, const float*, const float*, const float*,
                            float*, float*) noexcept nogil
ctypedef void (*peephole_d)(Py_ssize_t, Py_ssize_t, const double*, const double*, const double*,
                            double*, double*) noexcept nogil


cdef inline void rnn_update(const void* fn, Py_ssize_t H, const floating* g, const floating* b,
                            floating* h) noexcept nogil:
    """h = tanh or relu(g + b): fn is the kernel's FC_RNN_TANH or FC_RNN_RELU pass."""
    if floating is float:
        (<rnn_f>fn)(H, g, b, h)
    else:
        (<rnn_d>fn)(H, g, b, h)


cdef inline void gru_reset_after(const void* fn, Py_ssize_t H, Py_ssize_t S, const floating* g,
                                 const floating* r_h, const floating* b, const floating* b_hn,
                                 floating* h) noexcept nogil:
    if floating is float:
        (<gru_ra_f>fn)(H, S, g, r_h, b, b_hn, h)
    else:
        (<gru_ra_d>fn)(H, S, g, r_h, b, b_hn, h)


cdef inline void gru_reset_before_gates(const void* fn, Py_ssize_t H, Py_ssize_t S, floating* g,
                                        const floating* b, const floating* h,
                                        floating* rh) noexcept nogil:
    if floating is float:
        (<gru_rbg_f>fn)(H, S, g, b, h, rh)
    else:
        (<gru_rbg_d>fn)(H, S, g, b, h, rh)


cdef inline void gru_reset_before_update(const void* fn, Py_ssize_t H, Py_ssize_t S,
                                         const floating* g, const floating* b,
                                         floating* h) noexcept nogil:
    if floating is float:
        (<gru_rbu_f>fn)(H, S, g, b, h)
    else:
        (<gru_rbu_d>fn)(H, S, g, b, h)


cdef inline void lstm_gates(const void* fn, Py_ssize_t H, Py_ssize_t S, const floating* g,
                            const floating* b, const floating* p, floating* c,
                            floating* h) noexcept nogil:
    """p: the peepholes (3, S) with fn the FC_PEEPHOLE_GATES pass, or NULL with FC_LSTM_GATES."""
    if floating is float:
        if p == NULL:
            (<lstm_f>fn)(H, S, g, b, c, h)
        else:
            (<peephole_f>fn)(H, S, g, b, p, c, h)
    else:
        if p == NULL:
            (<lstm_d>fn)(H, S, g, b, c, h)
        else:
            (<peephole_d>fn)(H, S, g, b, p, c, h)

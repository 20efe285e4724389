# The fused gate passes of gates.h (C, restrict pointers, dispatched per x86 level), fused over
# float and double for the Cython kernels.
from cython cimport floating


cdef extern from "gates.h" nogil:
    void fc_rnn_tanh_f(Py_ssize_t H, const float* g, const float* b, float* h)
    void fc_rnn_tanh_d(Py_ssize_t H, const double* g, const double* b, double* h)
    void fc_rnn_relu_f(Py_ssize_t H, const float* g, const float* b, float* h)
    void fc_rnn_relu_d(Py_ssize_t H, const double* g, const double* b, double* h)
    void fc_gru_reset_after_f(Py_ssize_t H, Py_ssize_t Hp, const float* g, const float* r_h,
                              const float* b, const float* b_hn, float* h)
    void fc_gru_reset_after_d(Py_ssize_t H, Py_ssize_t Hp, const double* g, const double* r_h,
                              const double* b, const double* b_hn, double* h)
    void fc_gru_reset_before_gates_f(Py_ssize_t H, Py_ssize_t Hp, float* g, const float* b,
                                     const float* h, float* rh)
    void fc_gru_reset_before_gates_d(Py_ssize_t H, Py_ssize_t Hp, double* g, const double* b,
                                     const double* h, double* rh)
    void fc_gru_reset_before_update_f(Py_ssize_t H, Py_ssize_t Hp, const float* g,
                                      const float* b, float* h)
    void fc_gru_reset_before_update_d(Py_ssize_t H, Py_ssize_t Hp, const double* g,
                                      const double* b, double* h)
    void fc_lstm_gates_f(Py_ssize_t H, Py_ssize_t Hp, const float* g, const float* b, float* c,
                         float* h)
    void fc_lstm_gates_d(Py_ssize_t H, Py_ssize_t Hp, const double* g, const double* b,
                         double* c, double* h)
    void fc_peephole_gates_f(Py_ssize_t H, Py_ssize_t Hp, const float* g, const float* b,
                             const float* p, float* c, float* h)
    void fc_peephole_gates_d(Py_ssize_t H, Py_ssize_t Hp, const double* g, const double* b,
                             const double* p, double* c, double* h)


cdef inline void rnn_update(bint relu, Py_ssize_t H, const floating* g, const floating* b,
                            floating* h) noexcept nogil:
    if floating is float:
        (fc_rnn_relu_f if relu else fc_rnn_tanh_f)(H, g, b, h)
    else:
        (fc_rnn_relu_d if relu else fc_rnn_tanh_d)(H, g, b, h)


cdef inline void gru_reset_after(Py_ssize_t H, Py_ssize_t Hp, const floating* g,
                                 const floating* r_h, const floating* b, const floating* b_hn,
                                 floating* h) noexcept nogil:
    if floating is float:
        fc_gru_reset_after_f(H, Hp, g, r_h, b, b_hn, h)
    else:
        fc_gru_reset_after_d(H, Hp, g, r_h, b, b_hn, h)


cdef inline void gru_reset_before_gates(Py_ssize_t H, Py_ssize_t Hp, floating* g,
                                        const floating* b, const floating* h,
                                        floating* rh) noexcept nogil:
    if floating is float:
        fc_gru_reset_before_gates_f(H, Hp, g, b, h, rh)
    else:
        fc_gru_reset_before_gates_d(H, Hp, g, b, h, rh)


cdef inline void gru_reset_before_update(Py_ssize_t H, Py_ssize_t Hp, const floating* g,
                                         const floating* b, floating* h) noexcept nogil:
    if floating is float:
        fc_gru_reset_before_update_f(H, Hp, g, b, h)
    else:
        fc_gru_reset_before_update_d(H, Hp, g, b, h)


cdef inline void lstm_gates(Py_ssize_t H, Py_ssize_t Hp, const floating* g, const floating* b,
                            const floating* p, floating* c, floating* h) noexcept nogil:
    """p: the peepholes (3, Hp), or NULL for the plain LSTM."""
    if floating is float:
        if p == NULL:
            fc_lstm_gates_f(H, Hp, g, b, c, h)
        else:
            fc_peephole_gates_f(H, Hp, g, b, p, c, h)
    else:
        if p == NULL:
            fc_lstm_gates_d(H, Hp, g, b, c, h)
        else:
            fc_peephole_gates_d(H, Hp, g, b, p, c, h)

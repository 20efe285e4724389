# The vanilla RNN kernel (nn.RNN, tanh or relu). Per step: one GEMV/GEMM adds h W_hh^T into the
# pre-activation rows (beta = 1), one fused pass applies bias and nonlinearity. A single step
# (streaming) does x W_ih^T + h W_hh^T in one product instead (fused_step).
from cython cimport floating

from fastcell_c.packed cimport FC_RNN_RELU, FC_RNN_TANH, fc_mat
from fastcell_c.platform cimport gate_pass
from fastcell_c.walk cimport (Slice, Walk, carry_rows, input_products, meet, own_final,
                              own_inputs, own_step_product, step_product, write_outputs,
                              write_own_outputs)
from fastcell_c.gates cimport rnn_update
from fastcell_c.kernel cimport Kernel


cdef void rnn_walk(Walk* w, const floating* x, int I, int H, int width, const void* gates,
                   const fc_mat* wm, const floating* bias, floating* h, floating* out,
                   floating* G) noexcept nogil:
    cdef Py_ssize_t s, j, ldg
    cdef floating* g
    cdef floating* xp = G + w.T * w.B * width
    cdef bint fused = input_products(w, x, I, h, H, wm, width, G, xp)
    for s in range(w.T):
        g = step_product(w, s, fused, G, width, h, H, wm, I, &ldg)
        for j in range(w.n):
            rnn_update(gates, H, g + j * ldg, bias, h + j * H)
        write_outputs(w, s, h, H, out)


cdef void rnn_units(Walk* w, const floating* x, int I, int H, int S, int width,
                    const void* gates, const fc_mat* wm, const floating* bias, floating* h,
                    floating* out, floating* G, Slice* sl) noexcept nogil:
    """rnn_walk, one part's hidden units of it (walk.pxd "a step split by hidden units")."""
    cdef Py_ssize_t s, j, ldg
    cdef floating* g
    cdef floating* xp = G + w.T * w.B * width
    cdef floating* cur = h
    cdef floating* nxt = <floating*>sl.h_alt
    cdef floating* t
    cdef int fused = own_inputs(w, x, I, h, H, wm, 1, S, width, G, xp, sl)
    if fused < 0:
        return
    for s in range(w.T):
        g = own_step_product(w, s, fused, G, 1, S, width, cur, H, wm, I, &ldg, sl)
        for j in range(w.n):
            rnn_update(gates, sl.u1 - sl.u0, g + j * ldg + sl.u0, bias + sl.u0,
                       nxt + j * H + sl.u0)
        carry_rows(w, cur, nxt, H, sl.u0, sl.u1)
        write_own_outputs(w, s, nxt, H, sl.u0, sl.u1, out)
        if meet(sl) < 0:
            return
        t = cur
        cur = nxt
        nxt = t
    own_final(w, h, cur, H, sl.u0, sl.u1)


cdef class RNNKernel(Kernel):
    cdef readonly bint relu

    def __init__(self, weight_ih, weight_hh, bias, Py_ssize_t hidden_size, bint relu, **fmt):
        """fmt: the weight format's arguments of Kernel (weight_format, scale_ih, scale_hh)."""
        super().__init__(weight_ih, weight_hh, bias, hidden_size, 1, **fmt)
        self.relu = relu
        self.passes[0] = gate_pass(FC_RNN_RELU if relu else FC_RNN_TANH, self.is_double)

    cdef void run_walk(self, Walk* w, const char* x, char* h, char* c, char* out,
                       char* work) noexcept nogil:
        cdef int I = <int>self.input_size, H = <int>self.hidden_size, width = <int>self.width
        if self.is_double:
            rnn_walk(w, <const double*>x, I, H, width, self.passes[0], self.mats,
                     <const double*>self.bias, <double*>h, <double*>out, <double*>work)
        else:
            rnn_walk(w, <const float*>x, I, H, width, self.passes[0], self.mats,
                     <const float*>self.bias, <float*>h, <float*>out, <float*>work)

    cdef void run_units(self, Walk* w, const char* x, char* h, char* c, char* out, char* work,
                        Slice* sl) noexcept nogil:
        cdef int I = <int>self.input_size, H = <int>self.hidden_size, width = <int>self.width
        cdef int S = <int>self.stride
        if self.is_double:
            rnn_units(w, <const double*>x, I, H, S, width, self.passes[0], self.mats,
                      <const double*>self.bias, <double*>h, <double*>out, <double*>work, sl)
        else:
            rnn_units(w, <const float*>x, I, H, S, width, self.passes[0], self.mats,
                      <const float*>self.bias, <float*>h, <float*>out, <float*>work, sl)

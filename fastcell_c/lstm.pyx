# The LSTM kernel: nn.LSTM's cell, PyTorch's projection (LSTMP) and the diagonal peephole LSTM of
# docs/SPEC.md. Per step: one GEMV/GEMM adds h W_hh^T into the gate rows (beta = 1), one fused pass
# computes the gates and updates c and h in place. A single step (streaming) does x W_ih^T +
# h W_hh^T in one product instead (fused_step).
cimport numpy as cnp
from libc.string cimport memcpy
from cython cimport floating

from fastcell_c.packed cimport FC_LSTM_GATES, FC_PEEPHOLE_GATES, fc_mat
from fastcell_c.platform cimport gate_pass
from fastcell_c.products cimport matmul_p
from fastcell_c.walk cimport (Slice, Walk, backward, carry_rows, input_products, meet, own_final,
                              own_inputs, own_step_product, step_product, write_outputs,
                              write_own_outputs)
from fastcell_c.gates cimport lstm_gates
from fastcell_c.kernel import gate_layout
from fastcell_c.kernel cimport Kernel, buffer_of


cdef void lstm_walk(Walk* w, const floating* x, int I, int H, int S, int width, int P, int Pw,
                    const void* gates, const fc_mat* wm, const floating* bias, const fc_mat* w_hr,
                    const floating* w_ph, floating* h, floating* c, floating* out,
                    floating* work) noexcept nogil:
    """h (B, H_out) and c (B, H) hold the initial state and receive the final one. S: the gate
    blocks' stride in a gate row of `width`; Pw: the width of a row of m W_hr^T.

    work: G (T*B, width), then with P > 0 m = o * tanh(c) (B, H) and m W_hr^T (B, Pw), then the
    packing space."""
    cdef int hout = P if P > 0 else H
    cdef Py_ssize_t s, j, ldg
    cdef floating* g
    cdef floating* G = work
    cdef floating* m = G + w.T * w.B * width
    cdef floating* proj = m + w.B * H
    cdef floating* dst = m if P > 0 else h
    cdef floating* xp = proj + w.B * Pw if P > 0 else m
    cdef bint fused = input_products(w, x, I, h, hout, wm, width, G, xp)
    for s in range(w.T):
        g = step_product(w, s, fused, G, width, h, hout, wm, I, &ldg)
        for j in range(w.n):
            lstm_gates(gates, H, S, g + j * ldg, bias, w_ph, c + j * H, dst + j * H)
        if P > 0:                                                            # h = m W_hr^T
            matmul_p(<int>w.n, Pw, H, m, H, w_hr, 0, False, proj, Pw, backward(w, s), w.qwork)
            for j in range(w.n):
                memcpy(h + j * P, proj + j * Pw, P * sizeof(floating))
        write_outputs(w, s, h, hout, out)


cdef void lstm_units(Walk* w, const floating* x, int I, int H, int S, int width, int P, int Pw,
                     const void* gates, const fc_mat* wm, const floating* bias,
                     const fc_mat* w_hr, const floating* w_ph, floating* h, floating* c,
                     floating* out, floating* work, Slice* sl) noexcept nogil:
    """lstm_walk, one part's hidden units of it (walk.pxd "a step split by hidden units"). With
    a projection the part also makes its outputs of h = m W_hr^T, once every part's m is there:
    two barriers a step."""
    cdef int hout = P if P > 0 else H
    cdef int u0, o0, o1                 # its first unit; its columns of h [o0, o1)
    cdef const floating* ph
    cdef Py_ssize_t s, j, ldg
    cdef floating* g
    cdef floating* G = work
    cdef floating* m = G + w.T * w.B * width
    cdef floating* proj = m + w.B * H
    cdef floating* xp = proj + w.B * Pw if P > 0 else m
    cdef floating* cur = h
    cdef floating* nxt = <floating*>sl.h_alt
    cdef floating* t
    cdef int fused = own_inputs(w, x, I, h, hout, wm, 4, S, width, G, xp, sl)
    if fused < 0:
        return
    for s in range(w.T):
        u0 = sl.u0
        ph = w_ph + u0 if w_ph != NULL else NULL
        g = own_step_product(w, s, fused, G, 4, S, width, cur, hout, wm, I, &ldg, sl)
        for j in range(w.n):
            lstm_gates(gates, sl.u1 - u0, S, g + j * ldg + u0, bias + u0, ph, c + j * H + u0,
                       (m if P > 0 else nxt) + j * H + u0)
        if P > 0:
            if meet(sl) < 0:                                      # every unit of m is there
                return
            if sl.pc > sl.p0:                                     # h = m W_hr^T: its outputs
                w_hr.cols(<int>w.n, 1, 0, sl.p0, sl.pc, H, <const void*>m, H, w_hr, 0, False,
                          <void*>proj, Pw, backward(w, s), w.qwork)
                for j in range(w.n):
                    memcpy(nxt + j * P + sl.p0, proj + j * Pw + sl.p0,
                           (sl.p1 - sl.p0) * sizeof(floating))
        o0, o1 = (sl.p0, sl.p1) if P > 0 else (sl.u0, sl.u1)
        carry_rows(w, cur, nxt, hout, o0, o1)
        write_own_outputs(w, s, nxt, hout, o0, o1, out)
        if meet(sl) < 0:
            return
        t = cur
        cur = nxt
        nxt = t
    o0, o1 = (sl.p0, sl.p1) if P > 0 else (sl.u0, sl.u1)
    own_final(w, h, cur, hout, o0, o1)


cdef class LSTMKernel(Kernel):
    cdef readonly Py_ssize_t proj_size, proj_width
    cdef const char* w_ph

    def __init__(self, weight_ih, weight_hh, bias, Py_ssize_t hidden_size, weight_hr=None,
                 weight_ph=None, scale_hr=None, **fmt):
        """weight_hr: (P, H) W_hr in PyTorch's layout and the weight format (int8: with its
        per-row scale_hr), or None. weight_ph: (3, H) in the compute dtype, or None.
        fmt: the weight format's arguments of Kernel."""
        super().__init__(weight_ih, weight_hh, bias, hidden_size, 4, **fmt)
        self.has_cell_state = True
        self.w_ph = NULL
        if weight_hr is not None:
            self.proj_size = self.output_size
            # m = o * tanh(c) lies in (-1, 1): 8 bits serve it as they serve h
            stride, widths = gate_layout(1, self.proj_size)
            self.proj_width = self._pack(self.extra, 1, [(weight_hr, scale_hr, 8)],
                                         self.proj_size, stride, [(0, 1, widths[0])])
        if weight_ph is not None:
            self.w_ph = self._keep(self.laid_out(weight_ph, 1, self.stride), "weight_ph",
                                   (3, self.stride))
        self.passes[0] = gate_pass(FC_LSTM_GATES if weight_ph is None else FC_PEEPHOLE_GATES,
                                  self.is_double)

    cdef Py_ssize_t workspace(self, Py_ssize_t T, Py_ssize_t B, bint packed):
        return Kernel.workspace(self, T, B, packed) + (
            B * (self.hidden_size + self.proj_width) if self.proj_size else 0)

    cdef void run_walk(self, Walk* w, const char* x, char* h, char* c, char* out,
                       char* work) noexcept nogil:
        cdef int I = <int>self.input_size, H = <int>self.hidden_size, S = <int>self.stride
        cdef int width = <int>self.width, P = <int>self.proj_size, Pw = <int>self.proj_width
        if self.is_double:
            lstm_walk(w, <const double*>x, I, H, S, width, P, Pw, self.passes[0], self.mats,
                      <const double*>self.bias, self.extra, <const double*>self.w_ph,
                      <double*>h, <double*>c, <double*>out, <double*>work)
        else:
            lstm_walk(w, <const float*>x, I, H, S, width, P, Pw, self.passes[0], self.mats,
                      <const float*>self.bias, self.extra, <const float*>self.w_ph,
                      <float*>h, <float*>c, <float*>out, <float*>work)

    cdef void run_units(self, Walk* w, const char* x, char* h, char* c, char* out, char* work,
                        Slice* sl) noexcept nogil:
        cdef int I = <int>self.input_size, H = <int>self.hidden_size, S = <int>self.stride
        cdef int width = <int>self.width, P = <int>self.proj_size, Pw = <int>self.proj_width
        if self.is_double:
            lstm_units(w, <const double*>x, I, H, S, width, P, Pw, self.passes[0], self.mats,
                       <const double*>self.bias, self.extra, <const double*>self.w_ph,
                       <double*>h, <double*>c, <double*>out, <double*>work, sl)
        else:
            lstm_units(w, <const float*>x, I, H, S, width, P, Pw, self.passes[0], self.mats,
                       <const float*>self.bias, self.extra, <const float*>self.w_ph,
                       <float*>h, <float*>c, <float*>out, <float*>work, sl)

    cdef Py_ssize_t proj_outputs(self) noexcept nogil:
        return self.proj_size

# The GRU kernel, in PyTorch's reset-after form and the original reset-before form.
#
# reset_after: n needs W_hn h apart from the input part, so the step's one GEMV/GEMM writes
#   h W_hh^T into its own buffer R (beta = 0) and the fused pass reads G and R.
# reset_before: n needs W_hn (r * h), so a step is a product for r, z into G (beta = 1), a pass
#   that makes r * h, a product for n into G (beta = 1), and a pass that updates h.
from libc.string cimport memcpy
from cython cimport floating

from fastcell_c.packed cimport (FC_GRU_RESET_AFTER, FC_GRU_RESET_BEFORE_GATES,
                                FC_GRU_RESET_BEFORE_UPDATE, fc_mat)
from fastcell_c.platform cimport gate_pass
from fastcell_c.products cimport matmul_p
from fastcell_c.walk cimport (Slice, Walk, backward, begin_step, carry_rows, cols_product, meet,
                              own_final, project_inputs, project_own, write_outputs,
                              write_own_outputs)
from fastcell_c.gates cimport gru_reset_after, gru_reset_before_gates, gru_reset_before_update
from fastcell_c.kernel cimport Kernel


cdef void gru_walk(Walk* w, const floating* x, int I, int H, int S, int width,
                   bint reset_after, const void** gates, const fc_mat* wm, int split,
                   const floating* bias,
                   const floating* b_hn, floating* h, floating* out,
                   floating* work) noexcept nogil:
    """work: G (T*B, width), then R (B, width) for reset_after or r * h (B, H) for reset_before,
    then the packing space. S: the gate blocks' stride. split: where wm's columns are packed
    apart (the kernel's split: the r,z columns [0, 2S) in wm[0] and the n columns in wm[1] for
    reset_before, none for reset_after)."""
    cdef Py_ssize_t s, j, ldg
    cdef floating* g
    cdef floating* G = work
    cdef floating* R = G + w.T * w.B * width
    project_inputs(w, x, I, wm, split, width, G, R + w.B * width)
    for s in range(w.T):
        begin_step(w, s)
        g = G + w.g_row * width
        ldg = w.g_ld * width
        if reset_after:                                                      # R = h W_hh^T
            matmul_p(<int>w.n, width, H, h, H, wm, I, False, R, width, backward(w, s), w.qwork)
            for j in range(w.n):
                gru_reset_after(gates[0], H, S, g + j * ldg, R + j * width, bias, b_hn, h + j * H)
        else:                                                                # G_rz += h W_hrz^T
            matmul_p(<int>w.n, split, H, h, H, &wm[0], I, True, g, <int>ldg, backward(w, s),
                     w.qwork)
            for j in range(w.n):
                gru_reset_before_gates(gates[0], H, S, g + j * ldg, bias, h + j * H, R + j * H)
            matmul_p(<int>w.n, width - split, H, R, H, &wm[1], I, True, g + split, <int>ldg,
                     backward(w, s), w.qwork)                                # G_n += (r*h) W_hn^T
            for j in range(w.n):
                gru_reset_before_update(gates[1], H, S, g + j * ldg, bias, h + j * H)
        write_outputs(w, s, h, H, out)


cdef void gru_units(Walk* w, const floating* x, int I, int H, int S, int width,
                    bint reset_after, const void** gates, const fc_mat* wm, int split,
                    const floating* bias, const floating* b_hn, floating* h, floating* out,
                    floating* work, Slice* sl) noexcept nogil:
    """gru_walk, one part's hidden units of it (walk.pxd "a step split by hidden units"). The
    reset-before form's n product needs every unit's r * h: two barriers a step."""
    cdef Py_ssize_t s, j, ldg
    cdef int u0, nu
    cdef floating* g
    cdef floating* G = work
    cdef floating* R = G + w.T * w.B * width
    cdef floating* cur = h
    cdef floating* nxt = <floating*>sl.h_alt
    cdef floating* t
    if project_own(w, x, I, wm, 3 if reset_after else 2, 0 if reset_after else 1, S, split,
                   width, G, R + w.B * width, sl) < 0:
        return
    for s in range(w.T):
        begin_step(w, s)
        g = G + w.g_row * width
        ldg = w.g_ld * width
        u0, nu = sl.u0, sl.u1 - sl.u0
        for j in range(w.n):        # its units' old h, which the passes update in place
            memcpy(nxt + j * H + u0, cur + j * H + u0, nu * sizeof(floating))
        if reset_after:                                                      # R = h W_hh^T
            cols_product(<int>w.n, 3, S, sl, H, cur, H, wm, I, False, R, width, backward(w, s),
                         w.qwork)
            for j in range(w.n):
                gru_reset_after(gates[0], nu, S, g + j * ldg + u0, R + j * width + u0, bias + u0,
                                b_hn + u0, nxt + j * H + u0)
        else:                                                                # G_rz += h W_hrz^T
            cols_product(<int>w.n, 2, S, sl, H, cur, H, &wm[0], I, True, g, <int>ldg,
                         backward(w, s), w.qwork)
            for j in range(w.n):
                gru_reset_before_gates(gates[0], nu, S, g + j * ldg + u0, bias + u0,
                                       nxt + j * H + u0, R + j * H + u0)
            if meet(sl) < 0:                                                 # every unit's r*h
                return
            u0, nu = sl.u0, sl.u1 - sl.u0    # every unit, if this part took the rest over
            cols_product(<int>w.n, 1, S, sl, H, R, H, &wm[1], I, True, g + split, <int>ldg,
                         backward(w, s), w.qwork)                            # G_n += (r*h) W_hn^T
            for j in range(w.n):
                gru_reset_before_update(gates[1], nu, S, g + j * ldg + u0, bias + u0,
                                        nxt + j * H + u0)
        carry_rows(w, cur, nxt, H, sl.u0, sl.u1)
        write_own_outputs(w, s, nxt, H, sl.u0, sl.u1, out)
        if meet(sl) < 0:
            return
        t = cur
        cur = nxt
        nxt = t
    own_final(w, h, cur, H, sl.u0, sl.u1)


cdef class GRUKernel(Kernel):
    cdef readonly bint reset_after
    cdef const char* b_hn

    def __init__(self, weight_ih, weight_hh, bias, bias_hn, Py_ssize_t hidden_size,
                 bint reset_after, **fmt):
        """bias: b_ih + b_hh, except that with reset_after its n block is b_in alone and b_hn
        (H,) comes separately (ignored for reset_before)."""
        # Reset-before multiplies W_hh's r,z columns and its n columns apart: packed apart.
        super().__init__(weight_ih, weight_hh, bias, hidden_size, 3, 0 if reset_after else 2,
                         **fmt)
        self.reset_after = reset_after
        if reset_after:
            self.passes[0] = gate_pass(FC_GRU_RESET_AFTER, self.is_double)
        else:
            self.passes[0] = gate_pass(FC_GRU_RESET_BEFORE_GATES, self.is_double)
            self.passes[1] = gate_pass(FC_GRU_RESET_BEFORE_UPDATE, self.is_double)
        self.b_hn = self._keep(self.laid_out(bias_hn, 1, self.stride), "bias_hn", (self.stride,))

    cdef Py_ssize_t workspace(self, Py_ssize_t T, Py_ssize_t B, bint packed):
        return Kernel.workspace(self, T, B, packed) + B * self.width

    cdef void run_walk(self, Walk* w, const char* x, char* h, char* c, char* out,
                       char* work) noexcept nogil:
        cdef int I = <int>self.input_size, H = <int>self.hidden_size, S = <int>self.stride
        cdef int width = <int>self.width
        if self.is_double:
            gru_walk(w, <const double*>x, I, H, S, width, self.reset_after, self.passes, self.mats,
                     <int>self.split, <const double*>self.bias, <const double*>self.b_hn,
                     <double*>h, <double*>out, <double*>work)
        else:
            gru_walk(w, <const float*>x, I, H, S, width, self.reset_after, self.passes, self.mats,
                     <int>self.split, <const float*>self.bias, <const float*>self.b_hn,
                     <float*>h, <float*>out, <float*>work)

    cdef void run_units(self, Walk* w, const char* x, char* h, char* c, char* out, char* work,
                        Slice* sl) noexcept nogil:
        cdef int I = <int>self.input_size, H = <int>self.hidden_size, S = <int>self.stride
        cdef int width = <int>self.width
        if self.is_double:
            gru_units(w, <const double*>x, I, H, S, width, self.reset_after, self.passes,
                      self.mats, <int>self.split, <const double*>self.bias,
                      <const double*>self.b_hn, <double*>h, <double*>out, <double*>work, sl)
        else:
            gru_units(w, <const float*>x, I, H, S, width, self.reset_after, self.passes,
                      self.mats, <int>self.split, <const float*>self.bias,
                      <const float*>self.b_hn, <float*>h, <float*>out, <float*>work, sl)

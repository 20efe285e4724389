# The LSTM sequence kernel: nn.LSTM's cell, PyTorch's projection (LSTMP) and the diagonal
# peephole LSTM of SPEC.md. Per step: one GEMM/GEMV adds h W_hh^T into the gate rows
# (beta = 1), one fused pass computes the gates and updates c and h in place.
from libc.stdint cimport int64_t
from libc.stdlib cimport free, malloc
from cython cimport floating

from fastcell_c._blas cimport matmul_wt
from fastcell_c._steps cimport Walk, begin_step, make_walk, project_inputs, write_outputs
from fastcell_c._workspace cimport check_output, check_shape, check_walk
from fastcell_c.activations cimport sigmoid, tanh


cdef inline void lstm_gates(Py_ssize_t H, floating* g, const floating* b, floating* c,
                            floating* h) noexcept nogil:
    # g: the pre-activations i, f, g, o (without bias) of one row.
    cdef Py_ssize_t k
    cdef floating i, f, z, o, cn
    for k in range(H):
        i = sigmoid(g[k] + b[k])
        f = sigmoid(g[H + k] + b[H + k])
        z = tanh(g[2 * H + k] + b[2 * H + k])
        o = sigmoid(g[3 * H + k] + b[3 * H + k])
        cn = f * c[k] + i * z
        c[k] = cn
        h[k] = o * tanh(cn)


cdef inline void peephole_gates(Py_ssize_t H, floating* g, const floating* b, const floating* p,
                                floating* c, floating* h) noexcept nogil:
    # p: rows p_i, p_f, p_o; the input and forget gates see c_{t-1}, the output gate c_t.
    cdef Py_ssize_t k
    cdef floating i, f, z, o, cn
    for k in range(H):
        i = sigmoid(g[k] + b[k] + p[k] * c[k])
        f = sigmoid(g[H + k] + b[H + k] + p[H + k] * c[k])
        z = tanh(g[2 * H + k] + b[2 * H + k])
        cn = f * c[k] + i * z
        o = sigmoid(g[3 * H + k] + b[3 * H + k] + p[2 * H + k] * cn)
        c[k] = cn
        h[k] = o * tanh(cn)


cdef void lstm_run(Walk* w, const floating* x, int I, int H, int P,
                   const floating* w_ih, const floating* w_hh, const floating* bias,
                   const floating* w_hr, const floating* w_ph,
                   floating* h, floating* c, floating* out,
                   floating* G, floating* xp, floating* m) noexcept nogil:
    """Runs the walk; h (B, H_out) and c (B, H) hold the initial state and receive the final one.

    With P > 0, the gates write o * tanh(c) into m (B, H) and h = m W_hr^T.
    """
    cdef int gates = 4 * H
    cdef int hout = P if P > 0 else H
    cdef Py_ssize_t s, j, ldg
    cdef floating* g
    cdef floating* dst = m if P > 0 else h
    project_inputs(w, x, I, w_ih, gates, G, xp)
    for s in range(w.T):
        begin_step(w, s)
        g = G + w.g_row * gates
        ldg = w.g_ld * gates
        matmul_wt(<int>w.n, gates, hout, h, hout, w_hh, hout, 1, g, <int>ldg)  # G_t += h W_hh^T
        if w_ph == NULL:
            for j in range(w.n):
                lstm_gates(H, g + j * ldg, bias, c + j * H, dst + j * H)
        else:
            for j in range(w.n):
                peephole_gates(H, g + j * ldg, bias, w_ph, c + j * H, dst + j * H)
        if P > 0:
            matmul_wt(<int>w.n, P, H, m, H, w_hr, H, 0, h, P)                  # h = m W_hr^T
        write_outputs(w, s, h, hout, out)


def lstm_sequence(const floating[:, :, ::1] x, const floating[:, ::1] weight_ih,
                  const floating[:, ::1] weight_hh, const floating[::1] bias,
                  const floating[:, ::1] weight_hr, const floating[:, ::1] weight_ph,
                  floating[:, ::1] h, floating[:, ::1] c,
                  floating[:, :, ::1] out=None, Py_ssize_t out_col=0,
                  bint batch_first=False, bint reverse=False,
                  const int64_t[::1] lengths=None, const int64_t[::1] perm=None):
    """Runs one LSTM direction over x ((T, B, I), or (B, T, I) with batch_first).

    bias: b_ih + b_hh (4H,). weight_hr: (P, H) or None. weight_ph: (3, H) or None.
    h (B, H_out) and c (B, H): initial state in processing order, overwritten with the final one.
    out: None, or (T, B, W) (or (B, T, W)); H_out columns from out_col receive the outputs; rows past a
    sequence's length are not written. lengths/perm: see _steps.pxd.
    """
    cdef Py_ssize_t T = x.shape[1] if batch_first else x.shape[0]
    cdef Py_ssize_t B = x.shape[0] if batch_first else x.shape[1]
    cdef Py_ssize_t I = x.shape[2]
    cdef Py_ssize_t H = weight_ih.shape[0] // 4
    cdef Py_ssize_t P = 0 if weight_hr is None else weight_hr.shape[0]
    cdef Py_ssize_t hout = P if P > 0 else H
    check_walk(T, B, I, 4 * H, lengths, perm)
    check_shape("weight_ih", weight_ih.shape[0], weight_ih.shape[1], 4 * H, I)
    check_shape("weight_hh", weight_hh.shape[0], weight_hh.shape[1], 4 * H, hout)
    check_shape("bias", bias.shape[0], 1, 4 * H, 1)
    if P > 0:
        check_shape("weight_hr", weight_hr.shape[0], weight_hr.shape[1], P, H)
    if weight_ph is not None:
        check_shape("weight_ph", weight_ph.shape[0], weight_ph.shape[1], 3, H)
    check_shape("h", h.shape[0], h.shape[1], B, hout)
    check_shape("c", c.shape[0], c.shape[1], B, H)
    check_output(out, T, B, batch_first, out_col, hout)
    if T == 0 or B == 0:
        return
    cdef Walk w = make_walk(T, B, batch_first, 0 if out is None else out.shape[2],
                            NULL if lengths is None else &lengths[0],
                            NULL if perm is None else &perm[0], reverse)
    cdef floating* G = <floating*>malloc(T * B * 4 * H * sizeof(floating))
    cdef floating* xp = NULL
    cdef floating* m = NULL
    if lengths is not None:
        xp = <floating*>malloc(T * B * I * sizeof(floating))
    if P > 0:
        m = <floating*>malloc(B * H * sizeof(floating))
    try:
        if G == NULL or (lengths is not None and xp == NULL) or (P > 0 and m == NULL):
            raise MemoryError(f"LSTM workspace for T={T}, B={B}, H={H}")
        with nogil:
            lstm_run(&w, &x[0, 0, 0], <int>I, <int>H, <int>P, &weight_ih[0, 0], &weight_hh[0, 0],
                     &bias[0], NULL if P == 0 else &weight_hr[0, 0],
                     NULL if weight_ph is None else &weight_ph[0, 0],
                     &h[0, 0], &c[0, 0], NULL if out is None else &out[0, 0, out_col], G, xp, m)
    finally:
        free(G)
        free(xp)
        free(m)

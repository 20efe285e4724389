# The vanilla RNN sequence kernel (nn.RNN, tanh or relu). Per step: one GEMM/GEMV adds
# h W_hh^T into the pre-activation rows (beta = 1), one fused pass applies bias and nonlinearity.
from libc.stdint cimport int64_t
from libc.stdlib cimport free, malloc
from cython cimport floating

from fastcell_c._blas cimport matmul_wt
from fastcell_c._steps cimport Walk, begin_step, make_walk, project_inputs, write_outputs
from fastcell_c._workspace cimport check_output, check_shape, check_walk
from fastcell_c.activations cimport tanh


cdef inline void tanh_update(Py_ssize_t H, const floating* g, const floating* b,
                             floating* h) noexcept nogil:
    cdef Py_ssize_t k
    for k in range(H):
        h[k] = tanh(g[k] + b[k])


cdef inline void relu_update(Py_ssize_t H, const floating* g, const floating* b,
                             floating* h) noexcept nogil:
    cdef Py_ssize_t k
    cdef floating a
    for k in range(H):
        a = g[k] + b[k]
        h[k] = 0 if a < 0 else a    # NaN passes through, as in torch.relu


cdef void rnn_run(Walk* w, const floating* x, int I, int H, bint relu,
                  const floating* w_ih, const floating* w_hh, const floating* bias,
                  floating* h, floating* out, floating* G, floating* xp) noexcept nogil:
    cdef Py_ssize_t s, j, ldg
    cdef floating* g
    project_inputs(w, x, I, w_ih, H, G, xp)
    for s in range(w.T):
        begin_step(w, s)
        g = G + w.g_row * H
        ldg = w.g_ld * H
        matmul_wt(<int>w.n, H, H, h, H, w_hh, H, 1, g, <int>ldg)    # G_t += h W_hh^T
        if relu:
            for j in range(w.n):
                relu_update(H, g + j * ldg, bias, h + j * H)
        else:
            for j in range(w.n):
                tanh_update(H, g + j * ldg, bias, h + j * H)
        write_outputs(w, s, h, H, out)


def rnn_sequence(const floating[:, :, ::1] x, const floating[:, ::1] weight_ih,
                 const floating[:, ::1] weight_hh, const floating[::1] bias, bint relu,
                 floating[:, ::1] h, floating[:, :, ::1] out=None, Py_ssize_t out_col=0,
                 bint batch_first=False, bint reverse=False,
                 const int64_t[::1] lengths=None, const int64_t[::1] perm=None):
    """Runs one RNN direction over x ((T, B, I), or (B, T, I) with batch_first).

    bias: b_ih + b_hh (H,). h (B, H): initial state in processing order, overwritten with the
    final one. out, out_col, lengths, perm: as lstm_sequence.
    """
    cdef Py_ssize_t T = x.shape[1] if batch_first else x.shape[0]
    cdef Py_ssize_t B = x.shape[0] if batch_first else x.shape[1]
    cdef Py_ssize_t I = x.shape[2]
    cdef Py_ssize_t H = weight_ih.shape[0]
    check_walk(T, B, I, H, lengths, perm)
    check_shape("weight_ih", weight_ih.shape[0], weight_ih.shape[1], H, I)
    check_shape("weight_hh", weight_hh.shape[0], weight_hh.shape[1], H, H)
    check_shape("bias", bias.shape[0], 1, H, 1)
    check_shape("h", h.shape[0], h.shape[1], B, H)
    check_output(out, T, B, batch_first, out_col, H)
    if T == 0 or B == 0:
        return
    cdef Walk w = make_walk(T, B, batch_first, 0 if out is None else out.shape[2],
                            NULL if lengths is None else &lengths[0],
                            NULL if perm is None else &perm[0], reverse)
    cdef floating* G = <floating*>malloc(T * B * H * sizeof(floating))
    cdef floating* xp = NULL
    if lengths is not None:
        xp = <floating*>malloc(T * B * I * sizeof(floating))
    try:
        if G == NULL or (lengths is not None and xp == NULL):
            raise MemoryError(f"RNN workspace for T={T}, B={B}, H={H}")
        with nogil:
            rnn_run(&w, &x[0, 0, 0], <int>I, <int>H, relu, &weight_ih[0, 0], &weight_hh[0, 0],
                    &bias[0], &h[0, 0], NULL if out is None else &out[0, 0, out_col], G, xp)
    finally:
        free(G)
        free(xp)

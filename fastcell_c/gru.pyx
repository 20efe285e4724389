# The GRU sequence kernel, in PyTorch's reset-after form and the original reset-before form.
#
# reset_after: n needs W_hn h apart from the input part, so the step's one GEMM/GEMV writes
#   h W_hh^T into its own buffer R (beta = 0) and the fused pass reads G and R.
# reset_before: n needs W_hn (r * h), so a step is GEMM(r, z) into G (beta = 1), a pass that
#   makes r * h, GEMM(n) into G (beta = 1), and a pass that updates h.
from libc.stdint cimport int64_t
from libc.stdlib cimport free, malloc
from cython cimport floating

from fastcell_c._blas cimport matmul_wt
from fastcell_c._steps cimport Walk, begin_step, make_walk, project_inputs, write_outputs
from fastcell_c._workspace cimport check_output, check_shape, check_walk
from fastcell_c.activations cimport sigmoid, tanh


cdef inline void reset_after_update(Py_ssize_t H, const floating* g, const floating* r_h,
                                    const floating* b, const floating* b_hn,
                                    floating* h) noexcept nogil:
    # g: input parts of r, z, n; r_h: W_hh h of r, z, n; b: folded r, z biases and b_in.
    cdef Py_ssize_t k
    cdef floating r, z, n
    for k in range(H):
        r = sigmoid(g[k] + r_h[k] + b[k])
        z = sigmoid(g[H + k] + r_h[H + k] + b[H + k])
        n = tanh(g[2 * H + k] + b[2 * H + k] + r * (r_h[2 * H + k] + b_hn[k]))
        h[k] = n + z * (h[k] - n)


cdef inline void reset_before_gates(Py_ssize_t H, floating* g, const floating* b,
                                    const floating* h, floating* rh) noexcept nogil:
    # Leaves z in g's z block and r * h in rh.
    cdef Py_ssize_t k
    for k in range(H):
        rh[k] = sigmoid(g[k] + b[k]) * h[k]
        g[H + k] = sigmoid(g[H + k] + b[H + k])


cdef inline void reset_before_update(Py_ssize_t H, const floating* g, const floating* b,
                                     floating* h) noexcept nogil:
    cdef Py_ssize_t k
    cdef floating z, n
    for k in range(H):
        z = g[H + k]
        n = tanh(g[2 * H + k] + b[2 * H + k])
        h[k] = n + z * (h[k] - n)


cdef void gru_run(Walk* w, const floating* x, int I, int H, bint reset_after,
                  const floating* w_ih, const floating* w_hh, const floating* bias,
                  const floating* b_hn, floating* h, floating* out,
                  floating* G, floating* xp, floating* R) noexcept nogil:
    """R: (B, 3H) for reset_after, (B, H) holding r * h for reset_before."""
    cdef int gates = 3 * H
    cdef Py_ssize_t s, j, ldg
    cdef floating* g
    project_inputs(w, x, I, w_ih, gates, G, xp)
    for s in range(w.T):
        begin_step(w, s)
        g = G + w.g_row * gates
        ldg = w.g_ld * gates
        if reset_after:
            matmul_wt(<int>w.n, gates, H, h, H, w_hh, H, 0, R, gates)          # R = h W_hh^T
            for j in range(w.n):
                reset_after_update(H, g + j * ldg, R + j * gates, bias, b_hn, h + j * H)
        else:
            matmul_wt(<int>w.n, 2 * H, H, h, H, w_hh, H, 1, g, <int>ldg)      # G_rz += h W_hrz^T
            for j in range(w.n):
                reset_before_gates(H, g + j * ldg, bias, h + j * H, R + j * H)
            matmul_wt(<int>w.n, H, H, R, H, w_hh + 2 * H * H, H, 1, g + 2 * H, <int>ldg)
            for j in range(w.n):                                                # G_n += (r*h) W_hn^T
                reset_before_update(H, g + j * ldg, bias, h + j * H)
        write_outputs(w, s, h, H, out)


def gru_sequence(const floating[:, :, ::1] x, const floating[:, ::1] weight_ih,
                 const floating[:, ::1] weight_hh, const floating[::1] bias,
                 const floating[::1] bias_hn, bint reset_after,
                 floating[:, ::1] h, floating[:, :, ::1] out=None, Py_ssize_t out_col=0,
                 bint batch_first=False, bint reverse=False,
                 const int64_t[::1] lengths=None, const int64_t[::1] perm=None):
    """Runs one GRU direction over x ((T, B, I), or (B, T, I) with batch_first).

    bias (3H,): b_ih + b_hh, except that with reset_after its n block is b_in alone and b_hn
    (H,) is passed as bias_hn (ignored for reset_before). h (B, H): initial state in processing
    order, overwritten with the final one. out, out_col, lengths, perm: as lstm_sequence.
    """
    cdef Py_ssize_t T = x.shape[1] if batch_first else x.shape[0]
    cdef Py_ssize_t B = x.shape[0] if batch_first else x.shape[1]
    cdef Py_ssize_t I = x.shape[2]
    cdef Py_ssize_t H = weight_ih.shape[0] // 3
    check_walk(T, B, I, 3 * H, lengths, perm)
    check_shape("weight_ih", weight_ih.shape[0], weight_ih.shape[1], 3 * H, I)
    check_shape("weight_hh", weight_hh.shape[0], weight_hh.shape[1], 3 * H, H)
    check_shape("bias", bias.shape[0], 1, 3 * H, 1)
    check_shape("bias_hn", bias_hn.shape[0], 1, H, 1)
    check_shape("h", h.shape[0], h.shape[1], B, H)
    check_output(out, T, B, batch_first, out_col, H)
    if T == 0 or B == 0:
        return
    cdef Walk w = make_walk(T, B, batch_first, 0 if out is None else out.shape[2],
                            NULL if lengths is None else &lengths[0],
                            NULL if perm is None else &perm[0], reverse)
    cdef floating* G = <floating*>malloc(T * B * 3 * H * sizeof(floating))
    cdef floating* R = <floating*>malloc(B * 3 * H * sizeof(floating))
    cdef floating* xp = NULL
    if lengths is not None:
        xp = <floating*>malloc(T * B * I * sizeof(floating))
    try:
        if G == NULL or R == NULL or (lengths is not None and xp == NULL):
            raise MemoryError(f"GRU workspace for T={T}, B={B}, H={H}")
        with nogil:
            gru_run(&w, &x[0, 0, 0], <int>I, <int>H, reset_after, &weight_ih[0, 0],
                    &weight_hh[0, 0], &bias[0], &bias_hn[0], &h[0, 0],
                    NULL if out is None else &out[0, 0, out_col], G, xp, R)
    finally:
        free(G)
        free(R)
        free(xp)

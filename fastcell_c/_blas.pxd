# One thin row-major wrapper over scipy.linalg.cython_blas, fused over float and double.
# Row-major callers are served by swapping operands (C^T = W A^T in column-major), never by copying.
from cython cimport floating
from libc.stdint cimport int8_t, int32_t
from scipy.linalg.cython_blas cimport dgemm, dgemv, sgemm, sgemv


cdef inline void matmul_wt(int m, int n, int k,
                           const floating* a, int lda,
                           const floating* w, int ldw,
                           floating beta, floating* c, int ldc) noexcept nogil:
    """c[m, n] = a[m, k] @ w[n, k].T + beta * c, all row-major with leading dimensions lda, ldw, ldc."""
    cdef char trans = b'T'
    cdef char notrans = b'N'
    cdef floating one = 1
    cdef int inc = 1
    cdef Py_ssize_t i, j
    if m <= 0 or n <= 0:
        return
    if k <= 0:
        # BLAS rejects lda = 0; the product is empty, so only the beta scaling is left.
        for i in range(m):
            for j in range(n):
                c[i * ldc + j] = 0 if beta == 0 else beta * c[i * ldc + j]
        return
    if m == 1:
        # One row: GEMV over w's rows (w^T in column-major is w row-major).
        if floating is float:
            sgemv(&trans, &k, &n, &one, <float*>w, &ldw, <float*>a, &inc, &beta, c, &inc)
        else:
            dgemv(&trans, &k, &n, &one, <double*>w, &ldw, <double*>a, &inc, &beta, c, &inc)
    else:
        # c^T[n, m] = w[n, k] @ a^T[k, m] in column-major terms.
        if floating is float:
            sgemm(&trans, &notrans, &n, &m, &k, &one, <float*>w, &ldw, <float*>a, &lda,
                  &beta, c, &ldc)
        else:
            dgemm(&trans, &notrans, &n, &m, &k, &one, <double*>w, &ldw, <double*>a, &lda,
                  &beta, c, &ldc)


cdef extern from "matmul.h" nogil:
    enum: FC_LANES
    enum: FC_FMT_F32, FC_FMT_F64, FC_FMT_BF16, FC_FMT_I8
    ctypedef struct fc_i8_mat:
        int nseg
        int rows[2]
        int k4[2]
        int bits[2]
        int n
        const int8_t* wp
        const float* scale[2]
        const int32_t* colsum[2]
    ctypedef struct fc_mat:
        int fmt
        int ks
        int seg0, seg0p
        const void* wp
        fc_i8_mat i8
    enum: FC_LAYOUT_F32, FC_LAYOUT_F64, FC_LAYOUT_BF16, FC_LAYOUT_I8
    enum: FC_PANEL_BYTES
    enum: FC_I8_PW
    void fc_pack_rows(int layout, int unpack, void* rows, long ldw, int nr, int k, void* wp, int n,
                      int ks, int j0, int c0)
    long fc_i8_work_bytes(const fc_i8_mat* w, long m)
    int fc_i8_k4(const fc_i8_mat* w)
    enum: FC_I8_MC
    enum: FC_I8_MAX_ROWS
    void fc_matmul_f(int m, int n, int k, const float* a, int lda, const fc_mat* w, int j0,
                     int beta, float* c, int ldc, int backward, void* work)
    void fc_matmul_d(int m, int n, int k, const double* a, int lda, const fc_mat* w, int j0,
                     int beta, double* c, int ldc, int backward, void* work)


# fastcell's own GEMV/GEMM on packed weights (matmul_p) does every product: single-threaded it is as
# fast as OpenBLAS's SGEMM even for a projection of 3200 rows, and BLAS would pack the weights anew
# on every call (a third of a projection's time at T = 100, B = 1, H = 256). BLAS is called only
# for what its threads can speed up: an input projection of more than SMALL_M rows when the user
# gave fastcell more than one BLAS thread (kernel.pyx: set_blas_threads, blas_pays).
cdef enum:
    SMALL_M = 1024


cdef inline void matmul_t(int m, int n, int k,
                          const floating* a, int lda,
                          const floating* wt, int ldw,
                          bint accumulate, floating* c, int ldc) noexcept nogil:
    """c[m, n] (+)= a[m, k] @ wt[k, n] by BLAS GEMM, for weights stored transposed (row-major
    wt, k x n): c^T[n, m] = wt^T[n, k] @ a^T[k, m] in column-major terms, no transposes at all."""
    cdef char notrans = b'N'
    cdef floating one = 1
    cdef floating beta = 1 if accumulate else 0
    cdef Py_ssize_t i, j
    if m <= 0 or n <= 0:
        return
    if k <= 0:
        if not accumulate:
            for i in range(m):
                for j in range(n):
                    c[i * ldc + j] = 0
        return
    if floating is float:
        sgemm(&notrans, &notrans, &n, &m, &k, &one, <float*>wt, &ldw, <float*>a, &lda,
              &beta, c, &ldc)
    else:
        dgemm(&notrans, &notrans, &n, &m, &k, &one, <double*>wt, &ldw, <double*>a, &lda,
              &beta, c, &ldc)


cdef inline void matmul_p(int m, int n, int k, const floating* a, int lda, const fc_mat* w,
                          int j0, bint accumulate, floating* c, int ldc, bint backward,
                          void* work) noexcept nogil:
    """c[m, n] (+)= a[m, k] @ W[j0:j0 + k, 0:n] for a packed matrix in any weight format
    (matmul.h), any m (k >= 1). backward: one row's product takes its panels in reverse order
    (same bits); a sequence alternates it from step to step to reuse the cache. work: the int8
    format's scratch (Kernel.qwork_of)."""
    if floating is float:
        fc_matmul_f(m, n, k, a, lda, w, j0, accumulate, c, ldc, backward, work)
    else:
        fc_matmul_d(m, n, k, a, lda, w, j0, accumulate, c, ldc, backward, work)

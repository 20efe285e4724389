# One thin row-major wrapper over scipy.linalg.cython_blas, fused over float and double.
# Row-major callers are served by swapping operands (C^T = W A^T in column-major), never by copying.
from cython cimport floating
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


# fastcell's own GEMV/GEMM on packed weights (products.pxd: matmul_p) does every product: single-threaded it is as
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

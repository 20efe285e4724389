# The product over a packed matrix (the pointer it carries, fastcell_c.platform), over float and
# double for the cell walks.
from cython cimport floating

from fastcell_c.packed cimport fc_mat


cdef inline void matmul_p(int m, int n, int k, const floating* a, int lda, const fc_mat* w,
                          int j0, bint accumulate, floating* c, int ldc, bint backward,
                          void* work) noexcept nogil:
    """c[m, n] (+)= a[m, k] @ W[j0:j0 + k, 0:n] for a packed matrix in any weight format
    (products.h), any m (k >= 1). backward: one row's product takes its panels in reverse order
    (same bits); a sequence alternates it from step to step to reuse the cache. work: the int8
    format's scratch (Kernel.qwork_of)."""
    w.mm(m, n, k, <const void*>a, lda, w, j0, accumulate, <void*>c, ldc, backward, work)

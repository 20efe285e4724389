# The platform module: the packed products, the packing and the fused gate passes, compiled once
# for every SIMD level, the CPU's best picked into a table at import (platform.h). A kernel keeps
# the pointers it needs (a matrix's product in its fc_mat, its gate passes), so a call is one
# indirect call; products.pxd and gates.pxd call them over float and double.
from fastcell_c.packed cimport fc_cols_fn, fc_i8_mat, fc_mm_fn


cdef fc_mm_fn mm_for(int fmt) noexcept nogil
cdef fc_cols_fn cols_for(int fmt) noexcept nogil
cdef void* gate_pass(int which, bint is_double) noexcept nogil
cdef void pack_rows(int fmt, bint unpack, void* rows, long ldw, int nr, int k, void* wp, int n,
                    int ks, int j0, int c0) noexcept nogil
cdef long i8_work_bytes(const fc_i8_mat* w, long m) noexcept nogil

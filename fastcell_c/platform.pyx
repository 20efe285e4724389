# The platform module: the one compiled unit that holds the packed products (products.h,
# products_int8.h) and the fused gate passes (gates.h) for every SIMD level, and the table of
# the CPU's best of each, filled once at import (platform.h). Everything else reaches them through
# the functions below (cimported: one indirect call), so a kernel exists once in the process and
# no call tests the level again.
from fastcell_c.packed cimport fc_cols_fn, fc_i8_mat, fc_mm_fn


cdef extern from "platform.h" nogil:
    void fc_platform_init()
    int fc_platform_level()
    int fc_platform_int8_path()
    fc_mm_fn fc_platform_mm(int fmt)
    fc_cols_fn fc_platform_cols(int fmt)
    void* fc_gate_pass(int which, int is_double)
    void fc_pack_rows(int layout, int unpack, void* rows, long ldw, int nr, int k, void* wp,
                      int n, int ks, int j0, int c0)
    long fc_i8_work_bytes(const fc_i8_mat* w, long m)


fc_platform_init()


def simd_level():
    """The SIMD level the kernels run at: "v4" (AVX-512), "v3" (AVX2 + FMA) or "base", the CPU's
    best unless FASTCELL_ISA (base, v3 or v4) caps it."""
    return {4: "v4", 3: "v3"}.get(fc_platform_level(), "base")


def int8_path():
    """The int8 products' path: "amx" (AMX tiles for blocks of 16 rows of 8-bit activations,
    AVX-512 VNNI for the rest), "vnni512" (AVX-512 VNNI), "avxvnni", "avx2" or "base"."""
    return ("base", "avx2", "avxvnni", "vnni512", "amx")[fc_platform_int8_path()]


cdef fc_mm_fn mm_for(int fmt) noexcept nogil:
    """The product over a packed matrix of this weight format (FC_FMT_*), at the CPU's level."""
    return fc_platform_mm(fmt)


cdef fc_cols_fn cols_for(int fmt) noexcept nogil:
    """The product over some columns of a packed matrix of this weight format."""
    return fc_platform_cols(fmt)


cdef void* gate_pass(int which, bint is_double) noexcept nogil:
    """A fused gate pass (FC_RNN_TANH, ...) over float or double, at the CPU's level."""
    return fc_gate_pass(which, is_double)


cdef void pack_rows(int fmt, bint unpack, void* rows, long ldw, int nr, int k, void* wp, int n,
                    int ks, int j0, int c0) noexcept nogil:
    fc_pack_rows(fmt, unpack, rows, ldw, nr, k, wp, n, ks, j0, c0)


cdef long i8_work_bytes(const fc_i8_mat* w, long m) noexcept nogil:
    return fc_i8_work_bytes(w, m)

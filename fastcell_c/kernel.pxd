# The base of every cell kernel: weights laid out once, pointers cached, and one entry point for a
# walk over a batch of sequences that runs without the GIL.
cimport numpy as cnp
from libc.stdint cimport int8_t

from fastcell_c.packed cimport fc_mat
from fastcell_c.team cimport Team
from fastcell_c.walk cimport Slice, Walk


cdef extern from "stdlib.h" nogil:
    int posix_memalign(void** memptr, size_t alignment, size_t size)


cdef inline char* alloc_aligned(size_t nbytes) noexcept nogil:
    """Scratch memory on a 64-byte (cache line, AVX-512 vector) boundary, freed with free(); NULL
    when out of memory. A vector load that straddles two cache lines costs two: the gate rows
    (whose width is a multiple of 64 bytes) must start on a line for the kernels to run at
    full bandwidth."""
    cdef void* p = NULL
    if posix_memalign(&p, 64, nbytes if nbytes > 0 else 1) != 0:
        return NULL
    return <char*>p


cdef inline bint is_array(object a, int typenum, int ndim) noexcept:
    """a is a C-contiguous ndarray of that dtype number and rank."""
    return (cnp.PyArray_Check(a) and cnp.PyArray_TYPE(<cnp.ndarray>a) == typenum
            and cnp.PyArray_NDIM(<cnp.ndarray>a) == ndim
            and cnp.PyArray_IS_C_CONTIGUOUS(<cnp.ndarray>a))


cdef inline bint has_dims(object a, int typenum, int ndim, Py_ssize_t d0, Py_ssize_t d1,
                          Py_ssize_t d2, bint writable) noexcept:
    """a is a native-order C-contiguous ndarray of that dtype number, rank and dims (< 0: any
    size), writable if asked: the fast check, with no Python object made."""
    if not (is_array(a, typenum, ndim) and cnp.PyArray_ISNOTSWAPPED(<cnp.ndarray>a)):
        return False
    if writable and not cnp.PyArray_ISWRITEABLE(<cnp.ndarray>a):
        return False
    cdef cnp.npy_intp* dims = cnp.PyArray_DIMS(<cnp.ndarray>a)
    return ((d0 < 0 or dims[0] == d0) and (ndim < 2 or d1 < 0 or dims[1] == d1)
            and (ndim < 3 or d2 < 0 or dims[2] == d2))


cdef enum:
    ROWS = 1      # a walk split by rows
    UNITS = 2     # ... by hidden units
    MAX_PARTS = 1024


cdef struct Job:
    Walk w                   # every part's template
    const char* x
    char* h
    char* c
    char* out
    char* work               # units: the shared workspace (G ...); rows: the first part's own
    char* priv               # each part's own region, part_bytes apart
    Py_ssize_t part_bytes
    Py_ssize_t qoff          # the int8 scratch's offset in a part's region (-1: none)
    Py_ssize_t isz
    void* kernel
    void* team
    char* h_alt              # units: the second h buffer (B, H_out)
    int mode
    Py_ssize_t bounds[MAX_PARTS + 1]    # rows: part p's rows [bounds[p], bounds[p + 1])


cdef struct UnitsLayout:     # the buffer of a walk split by hidden units (Kernel.units_layout)
    char* buf                # made by Kernel.units_layout; the owner frees it
    Py_ssize_t shared        # bytes of the shared part: the workspace, then h's second buffer
    Py_ssize_t h_alt         # where h's second buffer starts
    Py_ssize_t part_bytes    # each part's own region after the shared one
    Py_ssize_t qoff          # the int8 scratch's offset in a part's region (-1: none)


cdef struct Call:            # one prepared Kernel.run
    Walk w
    const char* x
    char* h
    char* c
    char* out
    char* work               # its workspace (the caller frees it)
    void* kernel


cdef char* buffer_of(object a, str name, int typenum, tuple shape, bint writable) except NULL
cdef bint blas_pays(Py_ssize_t rows) noexcept nogil
cdef int enter_blas() noexcept nogil
cdef void leave_blas(int previous) noexcept nogil


cdef class Kernel:
    cdef readonly Py_ssize_t input_size, hidden_size, output_size, gates
    cdef readonly Py_ssize_t stride      # gate block g of a gate row starts at column g * stride
    cdef readonly Py_ssize_t width       # a gate row's width (its packed parts, each padded)
    cdef readonly bint is_double, has_cell_state
    cdef readonly object dtype           # what the kernel computes in: float32 or float64
    cdef readonly str weight_format      # float32, float64, bf16 or int8
    cdef list _arrays                    # keeps alive the memory the pointers point into
    cdef list _packings                  # per slot: where unpack() finds the weights
    cdef bint blas_ok                    # a float format: BLAS may read the packed panels
    cdef fc_mat mats[2]                  # W_ih^T over W_hh^T, packed (products.h): the columns
                                         # [0, split) and [split, width)
    cdef fc_mat extra[1]                 # slot 1: a subclass's own matrix (LSTM: W_hr^T)
    cdef readonly Py_ssize_t ks          # input_size + output_size
    cdef readonly Py_ssize_t split       # columns [0, split) and [split, width) packed apart
    cdef readonly Py_ssize_t packed_bytes  # bytes of every packed matrix
    cdef Py_ssize_t q_elems              # the int8 products' scratch, in elements of dtype
    cdef char* _owned[2]                 # packed copies, freed with the kernel
    cdef const char* bias                # (width,)
    cdef const void* passes[2]           # the gate passes the walk calls (platform.gate_pass)

    cdef const char* _keep(self, object a, str name, tuple shape) except NULL
    cdef Py_ssize_t _pack(self, fc_mat* mats, int slot, list segments, Py_ssize_t rows_per_gate,
                          Py_ssize_t stride, list parts) except -1
    cdef list _int8_part(self, fc_mat* m, list segments, list ks_of, list j0_of, Py_ssize_t g0,
                         Py_ssize_t g1, Py_ssize_t pw, Py_ssize_t rows_per_gate,
                         Py_ssize_t stride, const int8_t* wp)
    cdef Py_ssize_t workspace(self, Py_ssize_t T, Py_ssize_t B, bint packed)
    cdef Py_ssize_t work_elems(self, Py_ssize_t T, Py_ssize_t B, bint packed)
    cdef void* qwork_of(self, char* work, Py_ssize_t T, Py_ssize_t B, bint packed) noexcept
    cdef void run_walk(self, Walk* w, const char* x, char* h, char* c, char* out,
                       char* work) noexcept nogil
    cdef void run_units(self, Walk* w, const char* x, char* h, char* c, char* out, char* work,
                        Slice* sl) noexcept nogil
    cdef Py_ssize_t proj_outputs(self) noexcept nogil
    cdef int plan(self, Py_ssize_t T, Py_ssize_t B, int threads, int* nparts) noexcept
    cdef int unit_parts(self, Py_ssize_t B, int threads) noexcept nogil
    cdef int units_layout(self, Py_ssize_t T, Py_ssize_t B, bint packed, int nparts,
                          UnitsLayout* lay) except -1
    cdef void run_units_in(self, Walk* w, const char* x, char* h, char* c, char* out,
                           const UnitsLayout* lay, Team team, int nparts) noexcept nogil
    cdef int run_parts(self, Walk* w, const char* x, char* h, char* c, char* out,
                       Team team) except -1
    cdef int prepare(self, Call* call, x, h, c, out, Py_ssize_t out_col, bint batch_first,
                     bint reverse, lengths, perm) except -1
    cdef int finish(self, Call* call, Team team) except -1

# A packed weight matrix (packed.h): the types every compiled module shares. The products over it
# live in fastcell_c.platform, compiled once.
from libc.stdint cimport int8_t, int32_t


cdef extern from "packed.h" nogil:
    enum: FC_LANES
    enum: FC_PANEL_BYTES
    enum: FC_I8_PW
    enum: FC_I8_MC
    enum: FC_I8_MAX_ROWS
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
    enum: FC_RNN_TANH, FC_RNN_RELU, FC_GRU_RESET_AFTER, FC_GRU_RESET_BEFORE_GATES
    enum: FC_GRU_RESET_BEFORE_UPDATE, FC_LSTM_GATES, FC_PEEPHOLE_GATES
    ctypedef struct fc_mat
    ctypedef void (*fc_mm_fn)(int m, int n, int k, const void* a, int lda, const fc_mat* w,
                              int j0, int beta, void* c, int ldc, int backward, void* work)
    ctypedef void (*fc_cols_fn)(int m, int nblk, int S, int c0, int c1, int k, const void* a,
                                int lda,
                                const fc_mat* w, int j0, int beta, void* c, int ldc, int backward,
                                void* work)
    ctypedef struct fc_mat:
        int fmt
        int n
        int ks
        int seg0, seg0p
        const void* wp
        fc_i8_mat i8
        fc_mm_fn mm
        fc_cols_fn cols

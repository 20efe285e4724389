/* The platform table: per SIMD level and weight format, the packed products and the fused gate
 * passes, filled once (fc_platform_init, at import) from cpuid and FASTCELL_ISA, after ONNX
 * Runtime's MLAS platform table. Everything here is compiled once, in the platform module
 * (platform.pyx), which the cell walks, the streams and the pool call: no other module holds a
 * copy of a kernel, and no call branches on the level again. */
#ifndef FASTCELL_PLATFORM_H
#define FASTCELL_PLATFORM_H

#include <stdint.h>

#include "cpu.h"
#include "packed.h"

/* The rows of a product, as up to two runs (a segment each): inputs a[xo, xo + k) against the
 * packed rows from p on (bf16: from pair p on). */
typedef struct { int n, xo[2], p[2], k[2]; } fc_runs;

#define FC_GATE_FNS(T, S)                                                                      \
    void (*rnn_tanh##S)(ptrdiff_t H, const T *g, const T *b, T *h);                          \
    void (*rnn_relu##S)(ptrdiff_t H, const T *g, const T *b, T *h);                          \
    void (*gru_reset_after##S)(ptrdiff_t H, ptrdiff_t S_, const T *g, const T *r_h,           \
                               const T *b, const T *b_hn, T *h);                              \
    void (*gru_reset_before_gates##S)(ptrdiff_t H, ptrdiff_t S_, T *g, const T *b,            \
                                      const T *h, T *rh);                                     \
    void (*gru_reset_before_update##S)(ptrdiff_t H, ptrdiff_t S_, const T *g, const T *b,     \
                                       T *h);                                                 \
    void (*lstm_gates##S)(ptrdiff_t H, ptrdiff_t S_, const T *g, const T *b, T *c, T *h);     \
    void (*peephole_gates##S)(ptrdiff_t H, ptrdiff_t S_, const T *g, const T *b, const T *p,  \
                              T *c, T *h);

typedef struct {
    int level;          /* 4: AVX-512, 3: AVX2 + FMA, 1: baseline */
    int int8_path;      /* 3: AVX-512 VNNI, 2: AVX-VNNI, 1: AVX2, 0: baseline */
    /* the product over a packed matrix, and over some of its columns, per weight format
     * (FC_FMT_*; products.h) */
    fc_mm_fn mm[4];
    fc_cols_fn cols[4];
    /* int8: activations quantized per row, then one panel of one segment */
    int (*i8_quantize)(int m, int k, int k4, int bits, const float *a, long lda, uint8_t *qa,
                       float *scale);
    void (*i8_panel)(int m, int pw, int ldq, int nq, int bits, const uint8_t *qa, long lq,
                     const int8_t *w, const int32_t *cs, const float *sw, const float *sa,
                     int add, float *c, long ldc);
    void (*i8_panel_narrow)(int m, int pw, int ldq, int nq, int bits, const uint8_t *qa, long lq,
                            const int8_t *w, const int32_t *cs, const float *sw, const float *sa,
                            int add, float *c, long ldc);
    /* the fused gate passes (gates_impl.h) */
    FC_GATE_FNS(float, _f)
    FC_GATE_FNS(double, _d)
} fc_platform;

static fc_platform fc_table;

#include "products.h"
#include "gates.h"

/* Fills the table for the CPU's best level (capped by FASTCELL_ISA). */
#ifdef FC_DISPATCH
#define FC_PICK(NAME) (fc_table.level == 4 ? NAME##_v4 : fc_table.level == 3 ? NAME##_v3 : NAME##_base)
#else
#define FC_PICK(NAME) NAME##_base
#endif
#define FC_PICK_GATES(S)                                                                       \
    fc_table.rnn_tanh##S = FC_PICK(fc_rnn_tanh##S);                                          \
    fc_table.rnn_relu##S = FC_PICK(fc_rnn_relu##S);                                          \
    fc_table.gru_reset_after##S = FC_PICK(fc_gru_reset_after##S);                            \
    fc_table.gru_reset_before_gates##S = FC_PICK(fc_gru_reset_before_gates##S);              \
    fc_table.gru_reset_before_update##S = FC_PICK(fc_gru_reset_before_update##S);            \
    fc_table.lstm_gates##S = FC_PICK(fc_lstm_gates##S);                                      \
    fc_table.peephole_gates##S = FC_PICK(fc_peephole_gates##S);

static void fc_platform_init(void)
{
    fc_table.level = fc_cpu_level();
    fc_table.int8_path = fc_cpu_int8_path(fc_table.level);
    fc_table.mm[FC_FMT_F32] = FC_PICK(fc_mm_f32);
    fc_table.mm[FC_FMT_F64] = FC_PICK(fc_mm_f64);
    fc_table.mm[FC_FMT_BF16] = FC_PICK(fc_mm_bf16);
    fc_table.mm[FC_FMT_I8] = fc_mm_i8;     /* its panels through the table: one call per panel */
    fc_table.cols[FC_FMT_F32] = FC_PICK(fc_cols_f32);
    fc_table.cols[FC_FMT_F64] = FC_PICK(fc_cols_f64);
    fc_table.cols[FC_FMT_BF16] = FC_PICK(fc_cols_bf16);
    fc_table.cols[FC_FMT_I8] = fc_cols_i8;
    fc_i8_pick(fc_table.int8_path, &fc_table.i8_quantize, &fc_table.i8_panel,
               &fc_table.i8_panel_narrow);
    FC_PICK_GATES(_f)
    FC_PICK_GATES(_d)
}

/* The gate passes of the table, by pass and type, for the kernels to keep (platform.pyx). */
static void *fc_gate_pass(int which, int is_double)
{
#define FC_GATE_CASE(ENUM, NAME) \
    case ENUM: return is_double ? (void *)fc_table.NAME##_d : (void *)fc_table.NAME##_f;
    switch (which) {
    FC_GATE_CASE(FC_RNN_TANH, rnn_tanh)
    FC_GATE_CASE(FC_RNN_RELU, rnn_relu)
    FC_GATE_CASE(FC_GRU_RESET_AFTER, gru_reset_after)
    FC_GATE_CASE(FC_GRU_RESET_BEFORE_GATES, gru_reset_before_gates)
    FC_GATE_CASE(FC_GRU_RESET_BEFORE_UPDATE, gru_reset_before_update)
    FC_GATE_CASE(FC_LSTM_GATES, lstm_gates)
    FC_GATE_CASE(FC_PEEPHOLE_GATES, peephole_gates)
    }
#undef FC_GATE_CASE
    return NULL;
}

static inline fc_mm_fn fc_platform_mm(int fmt) { return fc_table.mm[fmt & 3]; }
static inline fc_cols_fn fc_platform_cols(int fmt) { return fc_table.cols[fmt & 3]; }
static inline int fc_platform_level(void) { return fc_table.level; }
static inline int fc_platform_int8_path(void) { return fc_table.int8_path; }

#endif

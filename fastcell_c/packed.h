/* A packed weight matrix, as every compiled module sees it: the types and sizes the cell walks,
 * the stream pool and the kernels' base class share. The products over it are compiled once,
 * in the platform unit (platform.pyx: products.h, products_int8.h). */
#ifndef FASTCELL_PACKED_H
#define FASTCELL_PACKED_H

#include <stdint.h>

#define FC_LANES 16          /* a packed part is a whole number of vectors of this many columns */
#define FC_PANEL_BYTES 256   /* float formats: panels of this many bytes of columns (products.h) */
#define FC_I8_PW 64          /* int8: panels of this many columns (products_int8.h) */
#define FC_I8_MC 64          /* int8: rows quantized and multiplied together */
#define FC_I8_MAX_ROWS 65536 /* int8: inputs per segment an int32 sum holds exactly */

/* The weight formats, which are also the packed layouts. */
enum { FC_FMT_F32 = 0, FC_FMT_F64 = 1, FC_FMT_BF16 = 2, FC_FMT_I8 = 3 };

/* An int8 matrix: one or two segments of rows (x's inputs, then h's), each with its activation
 * bits and its per-column weight scales and column sums. */
typedef struct {
    int nseg;                  /* 1 or 2 */
    int rows[2];               /* the segments' rows (inputs) */
    int k4[2];                 /* ... each padded to a multiple of 4 */
    int bits[2];               /* activation bits of each segment: 8 or 16 */
    int n;                     /* columns */
    const int8_t *wp;          /* the panels */
    const float *scale[2];     /* per column weight scale of each segment */
    const int32_t *colsum[2];  /* per column sum of each segment's int8 weights */
} fc_i8_mat;

/* One packed matrix in any weight format, and the product over it: c[0:m, 0:n] (+)= a[0:m, 0:k]
 * @ W[j0:j0 + k, 0:n], a and c float or double as the format computes (products.h). The product
 * is picked when the matrix is packed, for its format and the CPU's SIMD level, so a call is
 * one indirect call whatever the format (the MLAS way: kernel pointers chosen once). */
typedef struct fc_mat fc_mat;
typedef void (*fc_mm_fn)(int m, int n, int k, const void *a, int lda, const fc_mat *w, int j0,
                         int beta, void *c, int ldc, int backward, void *work);
/* The product over some columns only: [b * S + c0, b * S + c1) of each of nblk blocks S apart
 * (c0, c1 multiples of FC_LANES, or 0 and n with one block); c still points at column 0. A
 * thread that owns some hidden units computes their columns of every gate block alone (int8
 * quantizes a's rows once for all the blocks). */
typedef void (*fc_cols_fn)(int m, int nblk, int S, int c0, int c1, int k, const void *a, int lda,
                           const fc_mat *w, int j0, int beta, void *c, int ldc, int backward,
                           void *work);
struct fc_mat {
    int fmt;
    int n;              /* columns */
    int ks;             /* rows of the packing (bf16: each segment padded to even; int8: to 4) */
    int seg0, seg0p;    /* bf16: the first segment's rows, and its packed (padded) rows */
    const void *wp;     /* float formats: the panels */
    fc_i8_mat i8;       /* int8: the panels, scales and column sums */
    fc_mm_fn mm;        /* the product over this matrix */
    fc_cols_fn cols;    /* ... over some of its columns */
};

/* The fused gate passes, by name (platform.h's fc_gate_pass). */
enum { FC_RNN_TANH, FC_RNN_RELU, FC_GRU_RESET_AFTER, FC_GRU_RESET_BEFORE_GATES,
       FC_GRU_RESET_BEFORE_UPDATE, FC_LSTM_GATES, FC_PEEPHOLE_GATES };

#endif

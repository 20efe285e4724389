/* The recurrent products of one step, over weights stored transposed (row j of wt holds input j's
 * weight for every output), so the inner loop is a contiguous AXPY into register accumulators and
 * needs no horizontal sums:
 *   fc_gemv_t: y[0:n] = (beta ? y : 0) + x[0:k] @ wt[0:k, 0:n]                  (one row)
 *   fc_gemm_t: c[0:m, 0:n] = (beta ? c : 0) + a[0:m, 0:k] @ wt[0:k, 0:n]        (a few rows)
 * per x86 level; the kernels call them through the products over packed weights (fc_gemv_p,
 * fc_gemm_p: see "Packed weights" below), which run them on one panel at a time.
 * n must be a multiple of FC_LANES (a kernel pads each matrix to it, or calls the narrow products
 * below for a matrix of fewer columns). Each output sums its
 * k terms in order j = 0..k-1 whatever the vector width, the number of rows or the panel order,
 * so these never change the bits: the FMA levels (AVX2, AVX-512) agree exactly; the baseline level
 * (no FMA: each product rounded on its own) differs in the last bits.
 *
 * Why not BLAS: a BLAS GEMV call costs more than the whole product at H = 64, and a BLAS GEMM
 * packs the weight matrix again on every call, which at B = 16 costs more than the arithmetic;
 * these weights are laid out once, at load. With row blocks (FC_MC) the GEMM keeps up with
 * OpenBLAS even on projections of thousands of rows; BLAS is left only its threads (blas.pxd).
 *
 * One body (GCC vector extensions), instantiated per x86 level with that level's natural vector
 * width: x86-64-v4 (AVX-512, 16 floats), x86-64-v3 (AVX2 + FMA, 8), baseline (SSE2, 4); the
 * CPU's best is picked once, into platform.h's table, so the default build stays portable. For one row this beats a BLAS GEMV call
 * several times at H <= 256: no interface overhead, and up to 8 independent accumulators hide the
 * FMA latency.
 */
#ifndef FASTCELL_PRODUCTS_H
#define FASTCELL_PRODUCTS_H

#include <string.h>

#include "cpu.h"
#include "packed.h"


/* NB accumulators of W lanes over outputs [o, o + NB*W): one pass over the k rows of that panel;
 * NB = 8, then 4, 2, 1 for what is left, so a small n still makes one pass per panel. */
#define FC_PANEL(T, WT, LD, V, W, NB)                                                \
    for (; o + NB * W <= n; o += NB * W) {                                           \
        V a[NB];                                                                     \
        V *out = (V *)(y + o);                                                       \
        for (int b = 0; b < NB; b++) a[b] = beta ? out[b] : (V){0};                  \
        const WT *w = wt + o;                                                        \
        for (int j = 0; j < k; j++, w += ldw) {                                      \
            T s = x[j];                                                              \
            for (int b = 0; b < NB; b++) a[b] += s * LD(V, w + b * W);               \
        }                                                                            \
        for (int b = 0; b < NB; b++) out[b] = a[b];                                  \
    }

/* The GEMM tile: MB rows x NB vectors of accumulators over inputs [j0, j1); each weight vector
 * loaded once per j serves MB rows. NB is 4 where 32 vector registers hold the 4x4 tile
 * (AVX-512), else 2. The accumulators start from c (or 0 for the first chunk without beta) and
 * go back to c, so splitting k into chunks does not change the order of the additions. */
#define FC_TILE(T, WT, LD, V, W, MB, NB)                                             \
    {                                                                                \
        V acc[MB][NB];                                                               \
        for (int r = 0; r < MB; r++) {                                               \
            V *out = (V *)(c + (long)(i + r) * ldc + o);                             \
            for (int b = 0; b < NB; b++) acc[r][b] = (beta || j0) ? out[b] : (V){0}; \
        }                                                                            \
        const WT *w = wt + (long)j0 * ldw + o;                                       \
        const T *ai = a + (long)i * lda;                                             \
        for (int j = j0; j < j1; j++, w += ldw) {                                    \
            V wv[NB];                                                                \
            for (int b = 0; b < NB; b++) wv[b] = LD(V, w + b * W);                   \
            for (int r = 0; r < MB; r++) {                                           \
                T s = ai[(long)r * lda + j];                                         \
                for (int b = 0; b < NB; b++) acc[r][b] += s * wv[b];                 \
            }                                                                        \
        }                                                                            \
        for (int r = 0; r < MB; r++) {                                               \
            V *out = (V *)(c + (long)(i + r) * ldc + o);                             \
            for (int b = 0; b < NB; b++) out[b] = acc[r][b];                         \
        }                                                                            \
    }

/* A panel of NB vectors of outputs, in chunks of FC_KC inputs: the chunk of weights (FC_KC rows
 * of the panel, 32 KB for 64 floats) stays in L1 while every row block uses it. */
#define FC_KC 128
#define FC_PANEL_ROWS(T, WT, LD, V, W, NB)                                           \
    for (int j0 = 0; j0 < k; j0 += FC_KC) {                                          \
        int j1 = j0 + FC_KC < k ? j0 + FC_KC : k, i;                                 \
        for (i = 0; i + 4 <= m; i += 4) FC_TILE(T, WT, LD, V, W, 4, NB)              \
        for (; i < m; i++) FC_TILE(T, WT, LD, V, W, 1, NB)                           \
    }

#define FC_DEFINE_GEMM(NAME, T, WT, LD, V, W, NB, ATTR)                              \
    ATTR static void NAME(int m, int n, int k, const T *a, int lda, const WT *wt, int ldw,  \
                          int beta, T *c, int ldc)                                   \
    {                                                                                \
        int o = 0;                                                                   \
        for (; o + NB * W <= n; o += NB * W) FC_PANEL_ROWS(T, WT, LD, V, W, NB)      \
        for (; o + W <= n; o += W) FC_PANEL_ROWS(T, WT, LD, V, W, 1)                 \
    }

#define FC_DEFINE_GEMV(NAME, T, WT, LD, V, W, ATTR)                                  \
    ATTR static void NAME(int k, int n, const T *x, const WT *wt, int ldw, int beta, T *y) \
    {                                                                                \
        int o = 0;                                                                   \
        FC_PANEL(T, WT, LD, V, W, 8)                                                 \
        FC_PANEL(T, WT, LD, V, W, 4)                                                 \
        FC_PANEL(T, WT, LD, V, W, 2)                                                 \
        FC_PANEL(T, WT, LD, V, W, 1)                                                 \
    }

/* ---- Packed weights ----
 * The kernels' weights are packed once, at load, into column panels of FC_PANEL_BYTES: the panel
 * of columns [o, o + pw) (o a multiple of PW = FC_PANEL_BYTES / sizeof(T), pw = min(PW, n - o))
 * holds its ks rows of pw elements one after another, at wp + o * ks. A cell stacks W_ih^T and
 * W_hh^T in one packing (ks = I + H): a product over rows [j0, j0 + k) reads W_ih alone (the input
 * projection), W_hh alone (a step of a sequence) or both, with x and h side by side (a streaming
 * step: one pass instead of two).
 * Why: in the plain layout a row stride of 4 or 8 KB (a gate row at H = 256 or 512) maps a GEMM's
 * k-chunk of a panel onto a few L1 sets, which thrash (m = 16, H = 512: 61 -> 99 GFLOP/s packed);
 * and a packed panel is one sequential stream that the hardware prefetchers follow.
 *
 * fc_gemv_p's `backward` takes the panels in the opposite order (the bits do not change: each
 * output is one panel's own sum). A sequence alternates it from step to step, so that a step
 * starts on the panels the previous one ended with, which are still in cache: L1 keeps about a
 * third of a 64 KB W_hh (0.53 -> 0.39 us) and L2 half of a 4 MB one (161 -> 104 us), where a
 * cyclic sweep larger than the cache would find nothing in it (LRU). */

/* Where a panel is 4 vectors (AVX-512), two panels at once, so that 8 accumulators hide the FMA
 * latency as in fc_gemv_t; but one at a time when only one panel of the product fits in L1
 * (16 KB < k * panel bytes <= 32 KB), so that the alternating order reuses it. Elsewhere one
 * panel at a time through fc_gemv_t, whose 8-vector blocks fill a panel. */
#define FC_DEFINE_GEMV_P(NAME, GEMV, T, WT, LD, V, W, ATTR)                          \
    ATTR static void NAME(int k, int n, const T *x, const WT *wp, int ks, int j0, int beta, T *y, \
                          int backward)                                              \
    {                                                                                \
        const int PW = FC_PANEL_BYTES / (int)sizeof(T);                              \
        long bytes = (long)k * PW * (long)sizeof(WT);                                \
        int g = PW == 4 * W && !(bytes > 16384 && bytes <= 32768) ? 2 : 1;           \
        int np = (n + PW - 1) / PW, ng = (np + g - 1) / g;                           \
        for (int i = 0; i < ng; i++) {                                               \
            int p = (backward ? ng - 1 - i : i) * g, o = p * PW;                     \
            if (g == 2 && n - o >= 2 * PW) {                                         \
                V a[8];                                                              \
                V *out = (V *)(y + o);                                               \
                for (int b = 0; b < 8; b++) a[b] = beta ? out[b] : (V){0};           \
                const WT *w0 = wp + (long)o * ks + (long)j0 * PW;                    \
                const WT *w1 = w0 + (long)PW * ks;                                   \
                for (int j = 0; j < k; j++, w0 += PW, w1 += PW) {                    \
                    T s = x[j];                                                      \
                    for (int b = 0; b < 4; b++) a[b] += s * LD(V, w0 + b * W);       \
                    for (int b = 0; b < 4; b++) a[4 + b] += s * LD(V, w1 + b * W);   \
                }                                                                    \
                for (int b = 0; b < 8; b++) out[b] = a[b];                           \
                continue;                                                            \
            }                                                                        \
            for (int q = p; q < p + g && q < np; q++) {                              \
                int oq = q * PW, pw = n - oq < PW ? n - oq : PW;                     \
                GEMV(k, pw, x, wp + (long)oq * ks + (long)j0 * pw, pw, beta, y + oq);     \
            }                                                                        \
        }                                                                            \
    }

/* Blocks of FC_MC rows, each panel by panel through fc_gemm_t: a k-chunk of a panel is
 * FC_KC * FC_PANEL_BYTES = 32 KB of consecutive lines, which L1 holds while every row tile of the
 * block uses it, and the block's rows of a (FC_MC * k values) stay in L2 across the panels.
 * Without the row blocks, a projection of 3200 rows re-read all of a from L3 for every panel
 * (1.46x slower); with them it runs as fast as OpenBLAS's SGEMM. */
#define FC_MC 96
#define FC_DEFINE_GEMM_P(NAME, GEMM, T, WT, ATTR)                                    \
    ATTR static void NAME(int m, int n, int k, const T *a, int lda, const WT *wp, int ks, int j0, \
                          int beta, T *c, int ldc)                                   \
    {                                                                                \
        const int PW = FC_PANEL_BYTES / (int)sizeof(T);                              \
        for (int i0 = 0; i0 < m; i0 += FC_MC) {                                      \
            int mb = m - i0 < FC_MC ? m - i0 : FC_MC;                                \
            for (int o = 0; o < n; o += PW) {                                        \
                int pw = n - o < PW ? n - o : PW;                                    \
                GEMM(mb, pw, k, a + (long)i0 * lda, lda, wp + (long)o * ks + (long)j0 * pw, pw, \
                     beta, c + (long)i0 * ldc + o, ldc);                             \
            }                                                                        \
        }                                                                            \
    }

/* Weight loads: the vector as stored. */
#define FC_LD(V, p) (*(const V *)(p))
#include <immintrin.h>

/* aligned(sizeof(T)): the loads and stores may be unaligned. */
typedef float fc_vf4 __attribute__((vector_size(16), aligned(4)));
typedef double fc_vd2 __attribute__((vector_size(16), aligned(8)));
FC_DEFINE_GEMV(fc_gemv_t_f_base, float, float, FC_LD, fc_vf4, 4, )
FC_DEFINE_GEMV(fc_gemv_t_d_base, double, double, FC_LD, fc_vd2, 2, )
FC_DEFINE_GEMM(fc_gemm_t_f_base, float, float, FC_LD, fc_vf4, 4, 2, )
FC_DEFINE_GEMM(fc_gemm_t_d_base, double, double, FC_LD, fc_vd2, 2, 2, )
FC_DEFINE_GEMV_P(fc_gemv_p_f_base, fc_gemv_t_f_base, float, float, FC_LD, fc_vf4, 4, )
FC_DEFINE_GEMV_P(fc_gemv_p_d_base, fc_gemv_t_d_base, double, double, FC_LD, fc_vd2, 2, )
FC_DEFINE_GEMM_P(fc_gemm_p_f_base, fc_gemm_t_f_base, float, float, )
FC_DEFINE_GEMM_P(fc_gemm_p_d_base, fc_gemm_t_d_base, double, double, )

#ifdef FC_DISPATCH
typedef float fc_vf8 __attribute__((vector_size(32), aligned(4)));
typedef float fc_vf16 __attribute__((vector_size(64), aligned(4)));
typedef double fc_vd4 __attribute__((vector_size(32), aligned(8)));
typedef double fc_vd8 __attribute__((vector_size(64), aligned(8)));
FC_DEFINE_GEMV(fc_gemv_t_f_v3, float, float, FC_LD, fc_vf8, 8, FC_TARGET_V3)
FC_DEFINE_GEMV(fc_gemv_t_f_v4, float, float, FC_LD, fc_vf16, 16, FC_TARGET_V4)
FC_DEFINE_GEMV(fc_gemv_t_d_v3, double, double, FC_LD, fc_vd4, 4, FC_TARGET_V3)
FC_DEFINE_GEMV(fc_gemv_t_d_v4, double, double, FC_LD, fc_vd8, 8, FC_TARGET_V4)
FC_DEFINE_GEMM(fc_gemm_t_f_v3, float, float, FC_LD, fc_vf8, 8, 2, FC_TARGET_V3)
FC_DEFINE_GEMM(fc_gemm_t_f_v4, float, float, FC_LD, fc_vf16, 16, 4, FC_TARGET_V4)
FC_DEFINE_GEMM(fc_gemm_t_d_v3, double, double, FC_LD, fc_vd4, 4, 2, FC_TARGET_V3)
FC_DEFINE_GEMM(fc_gemm_t_d_v4, double, double, FC_LD, fc_vd8, 8, 4, FC_TARGET_V4)
FC_DEFINE_GEMV_P(fc_gemv_p_f_v3, fc_gemv_t_f_v3, float, float, FC_LD, fc_vf8, 8, FC_TARGET_V3)
FC_DEFINE_GEMV_P(fc_gemv_p_f_v4, fc_gemv_t_f_v4, float, float, FC_LD, fc_vf16, 16, FC_TARGET_V4)
FC_DEFINE_GEMV_P(fc_gemv_p_d_v3, fc_gemv_t_d_v3, double, double, FC_LD, fc_vd4, 4, FC_TARGET_V3)
FC_DEFINE_GEMV_P(fc_gemv_p_d_v4, fc_gemv_t_d_v4, double, double, FC_LD, fc_vd8, 8, FC_TARGET_V4)
FC_DEFINE_GEMM_P(fc_gemm_p_f_v3, fc_gemm_t_f_v3, float, float, FC_TARGET_V3)
FC_DEFINE_GEMM_P(fc_gemm_p_f_v4, fc_gemm_t_f_v4, float, float, FC_TARGET_V4)
FC_DEFINE_GEMM_P(fc_gemm_p_d_v3, fc_gemm_t_d_v3, double, double, FC_TARGET_V3)
FC_DEFINE_GEMM_P(fc_gemm_p_d_v4, fc_gemm_t_d_v4, double, double, FC_TARGET_V4)
#endif

/* ---- bf16 weights, packed in row pairs ----
 * Widened one row at a time (vpmovzxwd, a shuffle, per vector of weights), bf16 weights ran no
 * faster than float32: the shuffle, not the bytes, bounded the product. So a bf16 panel holds its
 * rows in pairs: the 32-bit lane of column c holds row 2p's weight in its low half and row 2p+1's
 * in its high half. One load gives a vector of columns for two rows, and (v << 16), (v & 0xFFFF0000)
 * are those rows as floats (a bf16 is a float's top 16 bits): two plain ALU operations, no
 * shuffle. Each output still adds its rows in order j = 0..k-1, one FMA (v3, v4) or multiply and
 * add (baseline) each, so the bits are those of float32 weights holding the bf16 values.
 * Panel o (columns [o, o + pw), as for float) starts at wp + o * ks in 16-bit units, ks the
 * packed rows; pair p of it at p * pw in 32-bit units. Each segment (W_ih's rows, W_hh's) starts
 * on a pair: one with an odd row count ends on a pair whose high half is a zero row. The products
 * take such a last row alone: a padding weight must never meet a value past the end of the
 * segment's inputs (0 * NaN is NaN, and even an added +0 turns a -0 sum into +0). */


#define FC_LO(V, v) ((V)((v) << 16))           /* row 2p of a pair, as floats */
#define FC_HI(V, v) ((V)((v) & 0xFFFF0000u))   /* row 2p + 1 */

/* A pair of rows, loaded once: else GCC folds the load into both the shift and the AND, and the
 * loads (two per vector of weights) bound the product along with the FMAs. */
#define FC_LD_PAIR(U, p) ({ U v_ = FC_LD(U, p); __asm__("" : "+v"(v_)); v_; })

/* acc[0:NB] += x's runs R times the pair rows from w0 on (ldp 32-bit lanes apart); block b's
 * weights at (ADDR), an expression in b, w and w2 = w + NEXT (a second panel, if any). */
#define FC_RUNS_H(V, U, NB, w0, ldp, NEXT, ADDR)                                     \
    for (int r = 0; r < R->n; r++) {                                                 \
        const float *xr = x + R->xo[r];                                              \
        const unsigned *w = (w0) + (long)R->p[r] * (ldp), *w2 = w + (NEXT);          \
        int kr = R->k[r], j = 0;                                                     \
        for (; j + 2 <= kr; j += 2, w += (ldp), w2 += (ldp)) {                       \
            float s0 = xr[j], s1 = xr[j + 1];                                        \
            _Pragma("GCC unroll 8")                                                  \
            for (int b = 0; b < NB; b++) {                                           \
                U v = FC_LD_PAIR(U, ADDR);                                           \
                acc[b] += s0 * FC_LO(V, v);                                          \
                acc[b] += s1 * FC_HI(V, v);                                          \
            }                                                                        \
        }                                                                            \
        if (j < kr)                                                                  \
            for (int b = 0; b < NB; b++) acc[b] += xr[j] * FC_LO(V, FC_LD(U, ADDR)); \
    }

/* FC_PANEL over pairs: NB accumulators of W lanes over outputs [o, o + NB*W) of one panel. */
#define FC_PANEL_H(V, U, W, NB)                                                      \
    for (; o + NB * W <= n; o += NB * W) {                                           \
        V acc[NB];                                                                   \
        V *out = (V *)(y + o);                                                       \
        for (int b = 0; b < NB; b++) acc[b] = beta ? out[b] : (V){0};                \
        FC_RUNS_H(V, U, NB, wt + o, ldp, 0, w + b * W)                               \
        for (int b = 0; b < NB; b++) out[b] = acc[b];                                \
    }

/* FC_TILE over pairs, on inputs [j0, j1) of one run (a, wt at its start; j0 even): each pair's
 * NB loads serve MB rows with 2 * NB weight vectors. acc starts from c when `ld`. */
#define FC_TILE_H(V, U, W, MB, NB)                                                   \
    {                                                                                \
        V acc[MB][NB], lo[NB], hi[NB];                                               \
        for (int r = 0; r < MB; r++) {                                               \
            V *out = (V *)(c + (long)(i + r) * ldc + o);                             \
            for (int b = 0; b < NB; b++) acc[r][b] = ld ? out[b] : (V){0};           \
        }                                                                            \
        const unsigned *w = wt + (long)(j0 / 2) * ldp + o;                           \
        const float *ai = a + (long)i * lda;                                         \
        int j = j0;                                                                  \
        for (; j + 2 <= j1; j += 2, w += ldp) {                                      \
            for (int b = 0; b < NB; b++) {                                           \
                U v = FC_LD(U, w + b * W);                                           \
                lo[b] = FC_LO(V, v);                                                 \
                hi[b] = FC_HI(V, v);                                                 \
            }                                                                        \
            for (int r = 0; r < MB; r++) {                                           \
                float s0 = ai[(long)r * lda + j], s1 = ai[(long)r * lda + j + 1];    \
                for (int b = 0; b < NB; b++) acc[r][b] += s0 * lo[b];                \
                for (int b = 0; b < NB; b++) acc[r][b] += s1 * hi[b];                \
            }                                                                        \
        }                                                                            \
        if (j < j1) {                                                                \
            for (int b = 0; b < NB; b++) lo[b] = FC_LO(V, FC_LD(U, w + b * W));      \
            for (int r = 0; r < MB; r++)                                             \
                for (int b = 0; b < NB; b++) acc[r][b] += ai[(long)r * lda + j] * lo[b]; \
        }                                                                            \
        for (int r = 0; r < MB; r++) {                                               \
            V *out = (V *)(c + (long)(i + r) * ldc + o);                             \
            for (int b = 0; b < NB; b++) out[b] = acc[r][b];                         \
        }                                                                            \
    }

/* FC_PANEL_ROWS over the runs: chunks of FC_KC (even) inputs of each run in turn; every chunk
 * but the product's first adds to c, so the order of the additions is the rows' order. */
#define FC_PANEL_ROWS_H(V, U, W, NB)                                                 \
    for (int q = 0; q < R->n; q++) {                                                 \
        const float *a = a0 + R->xo[q];                                              \
        const unsigned *wt = wt0 + (long)R->p[q] * ldp;                              \
        for (int j0 = 0; j0 < R->k[q]; j0 += FC_KC) {                                \
            int j1 = j0 + FC_KC < R->k[q] ? j0 + FC_KC : R->k[q], ld = beta || q || j0, i; \
            for (i = 0; i + 4 <= m; i += 4) FC_TILE_H(V, U, W, 4, NB)                \
            for (; i < m; i++) FC_TILE_H(V, U, W, 1, NB)                             \
        }                                                                            \
    }

/* The products over one panel (wt: its pair 0, ldp = its width). */
#define FC_DEFINE_GEMM_H(NAME, V, U, W, NB, ATTR)                                    \
    ATTR static void NAME(int m, int n, const fc_runs *R, const float *a0, int lda,  \
                          const unsigned *wt0, int ldp, int beta, float *c, int ldc) \
    {                                                                                \
        int o = 0;                                                                   \
        for (; o + NB * W <= n; o += NB * W) FC_PANEL_ROWS_H(V, U, W, NB)            \
        for (; o + W <= n; o += W) FC_PANEL_ROWS_H(V, U, W, 1)                       \
    }

#define FC_DEFINE_GEMV_H(NAME, V, U, W, ATTR)                                        \
    ATTR static void NAME(const fc_runs *R, int n, const float *x, const unsigned *wt, int ldp, \
                          int beta, float *y)                                        \
    {                                                                                \
        int o = 0;                                                                   \
        FC_PANEL_H(V, U, W, 8)                                                       \
        FC_PANEL_H(V, U, W, 4)                                                       \
        FC_PANEL_H(V, U, W, 2)                                                       \
        FC_PANEL_H(V, U, W, 1)                                                       \
    }

/* FC_DEFINE_GEMV_P and FC_DEFINE_GEMM_P over a pair packing of ks rows: the same panel orders
 * and blocks, but on AVX-512 always two panels at once: a pair chains two FMAs on each
 * accumulator, so one panel's 4 cannot keep the FMA unit busy, which costs more than the L1
 * reuse of one panel gains (H = 128 step, H = 256 sequence: 7-20% faster). */
#define FC_DEFINE_GEMV_P_H(NAME, GEMV, V, U, W, ATTR)                                \
    ATTR static void NAME(const fc_runs *R, int n, const float *x, const unsigned short *wp, \
                          int ks, int beta, float *y, int backward)                  \
    {                                                                                \
        const int PW = FC_PANEL_BYTES / (int)sizeof(float);                          \
        int g = PW == 4 * W ? 2 : 1;                                                 \
        int np = (n + PW - 1) / PW, ng = (np + g - 1) / g;                           \
        for (int i = 0; i < ng; i++) {                                               \
            int p = (backward ? ng - 1 - i : i) * g, o = p * PW;                     \
            if (g == 2 && n - o >= 2 * PW) {                                         \
                V acc[8];                                                            \
                V *out = (V *)(y + o);                                               \
                for (int b = 0; b < 8; b++) acc[b] = beta ? out[b] : (V){0};         \
                const unsigned *w0 = (const unsigned *)(wp + (long)o * ks);          \
                FC_RUNS_H(V, U, 8, w0, PW, (long)PW * ks / 2, (b < 4 ? w : w2) + (b & 3) * W) \
                for (int b = 0; b < 8; b++) out[b] = acc[b];                         \
                continue;                                                            \
            }                                                                        \
            for (int q = p; q < p + g && q < np; q++) {                              \
                int oq = q * PW, pw = n - oq < PW ? n - oq : PW;                     \
                GEMV(R, pw, x, (const unsigned *)(wp + (long)oq * ks), pw, beta, y + oq); \
            }                                                                        \
        }                                                                            \
    }

#define FC_DEFINE_GEMM_P_H(NAME, GEMM, ATTR)                                         \
    ATTR static void NAME(int m, int n, const fc_runs *R, const float *a, int lda,   \
                          const unsigned short *wp, int ks, int beta, float *c, int ldc) \
    {                                                                                \
        const int PW = FC_PANEL_BYTES / (int)sizeof(float);                          \
        for (int i0 = 0; i0 < m; i0 += FC_MC) {                                      \
            int mb = m - i0 < FC_MC ? m - i0 : FC_MC;                                \
            for (int o = 0; o < n; o += PW) {                                        \
                int pw = n - o < PW ? n - o : PW;                                    \
                GEMM(mb, pw, R, a + (long)i0 * lda, lda, (const unsigned *)(wp + (long)o * ks), \
                     pw, beta, c + (long)i0 * ldc + o, ldc);                         \
            }                                                                        \
        }                                                                            \
    }

typedef unsigned fc_vu4 __attribute__((vector_size(16), aligned(4)));
FC_DEFINE_GEMV_H(fc_gemv_t_h_base, fc_vf4, fc_vu4, 4, )
FC_DEFINE_GEMM_H(fc_gemm_t_h_base, fc_vf4, fc_vu4, 4, 2, )
FC_DEFINE_GEMV_P_H(fc_gemv_p_h_base, fc_gemv_t_h_base, fc_vf4, fc_vu4, 4, )
FC_DEFINE_GEMM_P_H(fc_gemm_p_h_base, fc_gemm_t_h_base, )
#ifdef FC_DISPATCH
typedef unsigned fc_vu8 __attribute__((vector_size(32), aligned(4)));
typedef unsigned fc_vu16 __attribute__((vector_size(64), aligned(4)));
FC_DEFINE_GEMV_H(fc_gemv_t_h_v3, fc_vf8, fc_vu8, 8, FC_TARGET_V3)
FC_DEFINE_GEMV_H(fc_gemv_t_h_v4, fc_vf16, fc_vu16, 16, FC_TARGET_V4)
FC_DEFINE_GEMM_H(fc_gemm_t_h_v3, fc_vf8, fc_vu8, 8, 2, FC_TARGET_V3)
FC_DEFINE_GEMM_H(fc_gemm_t_h_v4, fc_vf16, fc_vu16, 16, 4, FC_TARGET_V4)
FC_DEFINE_GEMV_P_H(fc_gemv_p_h_v3, fc_gemv_t_h_v3, fc_vf8, fc_vu8, 8, FC_TARGET_V3)
FC_DEFINE_GEMV_P_H(fc_gemv_p_h_v4, fc_gemv_t_h_v4, fc_vf16, fc_vu16, 16, FC_TARGET_V4)
FC_DEFINE_GEMM_P_H(fc_gemm_p_h_v3, fc_gemm_t_h_v3, FC_TARGET_V3)
FC_DEFINE_GEMM_P_H(fc_gemm_p_h_v4, fc_gemm_t_h_v4, FC_TARGET_V4)
#endif

#include "products_int8.h"

/* ---- Packing and unpacking ----
 * Where input row j and output column c of a packed matrix of n columns live, in elements of the
 * stored type: float formats in panels of PW columns, rows one after another (above); bf16 in
 * panels of FC_PANEL_BYTES / 4 columns holding row pairs (above); int8 in panels of FC_I8_PW
 * columns holding row quads (products_int8.h). ks: the packing's rows (bf16: even; int8: K4). */
static inline long fc_packed_at(int layout, int n, int ks, int j, int c)
{
    int PW = layout == FC_FMT_F64 ? FC_PANEL_BYTES / 8
           : layout == FC_FMT_I8 ? FC_I8_PW : FC_PANEL_BYTES / 4;
    int o = c / PW * PW, pw = n - o < PW ? n - o : PW;
    if (layout == FC_FMT_BF16) return (long)o * ks + (long)(j >> 1) * 2 * pw + 2 * (c - o) + (j & 1);
    if (layout == FC_FMT_I8) return (long)o * ks + (long)(j >> 2) * pw * 4 + (c - o) * 4 + (j & 3);
    return (long)o * ks + (long)j * pw + (c - o);
}

/* Packs nr rows of a matrix in PyTorch's layout (row r: one output's k weights, row stride ldw
 * elements) as the columns c0 .. c0 + nr - 1, packed rows j0 .. j0 + k - 1, of a packing of n
 * columns and ks rows (of elements of esize bytes: 4, 8, 2 or 1). unpack does the reverse. The
 * packing starts zeroed: what no row fills (padding) stays zero. */
#define FC_PACK_LOOP(T)                                                                  \
    for (int r = 0; r < nr; r++) {                                                       \
        T *row = (T *)rows + (long)r * ldw;                                              \
        for (int j = 0; j < k; j++) {                                                    \
            long at = fc_packed_at(layout, n, ks, j0 + j, c0 + r);                       \
            if (unpack) row[j] = ((const T *)wp)[at];                                    \
            else ((T *)wp)[at] = row[j];                                                 \
        }                                                                                \
    }
static void fc_pack_rows(int layout, int unpack, void *rows, long ldw, int nr, int k, void *wp,
                         int n, int ks, int j0, int c0)
{
    switch (layout) {
    case FC_FMT_F64: FC_PACK_LOOP(double) break;
    case FC_FMT_F32: FC_PACK_LOOP(float) break;
    case FC_FMT_BF16: FC_PACK_LOOP(unsigned short) break;
    default: FC_PACK_LOOP(int8_t) break;
    }
}

/* ---- Narrow matrices ----
 * A matrix of fewer than FC_LANES columns (a tiny hidden size) is packed unpadded, as one panel
 * of n columns, and multiplied here in plain C: padded to a vector, an RNN of hidden size 1
 * would keep 16 times its weights. Each output sums its k terms in order, with FMA at the FMA
 * levels and a rounded product and sum at the baseline, as the vector products do. */
#define FC_DEFINE_NARROW(NAME, T, WT, WEIGHT, MADD, ATTR)                                     ATTR static void NAME(int m, int n, const fc_runs *R, const T *a, int lda, const WT *wp,                            int ks, int beta, T *c, int ldc)                               {                                                                                        for (int i = 0; i < m; i++) {                                                            T acc[FC_LANES];                                                                     T *ci = c + (long)i * ldc;                                                           for (int o = 0; o < n; o++) acc[o] = beta ? ci[o] : (T)0;                            for (int q = 0; q < R->n; q++) {                                                         const T *ai = a + (long)i * lda + R->xo[q];                                          for (int j = 0; j < R->k[q]; j++) {                                                      int jr = R->p[q] + j;      /* the packed row */                                      for (int o = 0; o < n; o++) acc[o] = MADD(ai[j], WEIGHT, acc[o]);                 }                                                                                }                                                                                    for (int o = 0; o < n; o++) ci[o] = acc[o];                                      }                                                                                    (void)ks;                                                                        }
#define FC_MADD_ROUNDED(x, w, acc) ((acc) + (x) * (w))
#define FC_W_PLAIN (wp[(long)jr * n + o])
#define FC_W_BF16 ({ unsigned u_ = (unsigned)wp[(long)(jr >> 1) * 2 * n + 2 * o + (jr & 1)] << 16; \
                     float f_; memcpy(&f_, &u_, 4); f_; })
FC_DEFINE_NARROW(fc_narrow_f_base, float, float, FC_W_PLAIN, FC_MADD_ROUNDED, )
FC_DEFINE_NARROW(fc_narrow_d_base, double, double, FC_W_PLAIN, FC_MADD_ROUNDED, )
FC_DEFINE_NARROW(fc_narrow_h_base, float, unsigned short, FC_W_BF16, FC_MADD_ROUNDED, )
#ifdef FC_DISPATCH
#define FC_MADD_F(x, w, acc) __builtin_fmaf((x), (w), (acc))
#define FC_MADD_D(x, w, acc) __builtin_fma((x), (w), (acc))
FC_DEFINE_NARROW(fc_narrow_f_v3, float, float, FC_W_PLAIN, FC_MADD_F, FC_TARGET_V3)
FC_DEFINE_NARROW(fc_narrow_d_v3, double, double, FC_W_PLAIN, FC_MADD_D, FC_TARGET_V3)
FC_DEFINE_NARROW(fc_narrow_h_v3, float, unsigned short, FC_W_BF16, FC_MADD_F, FC_TARGET_V3)
#define fc_narrow_f_v4 fc_narrow_f_v3
#define fc_narrow_d_v4 fc_narrow_d_v3
#define fc_narrow_h_v4 fc_narrow_h_v3
#endif

/* ---- One packed matrix in any weight format, and the products over it ----
 * The cell walks see only this (through platform.pyx): which format a matrix holds is decided at
 * load (fastcell_c/kernel.pyx) and switched on here, once per product. */

/* Rows [j0, j0 + k) of a bf16 pair packing as runs: j0 is 0 or the second segment's first row
 * (rows count unpadded, as in a); a product from 0 past the first segment spans both. */
static inline fc_runs fc_bf16_runs(const fc_mat *w, int j0, int k)
{
    fc_runs R = {0};
    if (j0 < w->seg0) {
        int k0 = k < w->seg0 - j0 ? k : w->seg0 - j0;
        R.xo[0] = 0, R.p[0] = j0 / 2, R.k[0] = k0, R.n = 1;
        j0 += k0, k -= k0;
    }
    if (k > 0) {
        R.xo[R.n] = R.n ? R.k[0] : 0, R.p[R.n] = (j0 - w->seg0 + w->seg0p) / 2, R.k[R.n] = k;
        R.n++;
    }
    return R;
}

/* The product over one packed matrix, per format and level: a matrix narrower than a vector
 * through the narrow products, one row through the GEMV, more through the GEMM, each called
 * directly. For int8, rows [j0, j0 + k) are whole segments; work: its scratch. */
/* The float32 (S = f) and float64 (S = d) products, one definition for both. */
#define FC_DEFINE_MM_FLOAT(LVL, FMT, T, S)                                               \
    static void fc_mm_##FMT##_##LVL(int m, int n, int k, const void *a_, int lda,         \
                                    const fc_mat *w, int j0, int beta, void *c_, int ldc, \
                                    int backward, void *work)                            \
    {                                                                                    \
        const T *a = (const T *)a_, *wp = (const T *)w->wp;                              \
        T *c = (T *)c_;                                                                  \
        (void)work;                                                                      \
        if (m <= 0 || n <= 0) return;                                                    \
        if (n < FC_LANES) {                                                              \
            fc_runs R = {1, {0, 0}, {j0, 0}, {k, 0}};                                    \
            fc_narrow_##S##_##LVL(m, n, &R, a, lda, wp, w->ks, beta, c, ldc);            \
        } else if (m == 1) fc_gemv_p_##S##_##LVL(k, n, a, wp, w->ks, j0, beta, c, backward); \
        else fc_gemm_p_##S##_##LVL(m, n, k, a, lda, wp, w->ks, j0, beta, c, ldc);        \
    }
#define FC_DEFINE_MM(LVL)                                                                \
    FC_DEFINE_MM_FLOAT(LVL, f32, float, f)                                               \
    FC_DEFINE_MM_FLOAT(LVL, f64, double, d)                                              \
    static void fc_mm_bf16_##LVL(int m, int n, int k, const void *a_, int lda, const fc_mat *w, \
                                 int j0, int beta, void *c_, int ldc, int backward, void *work) \
    {                                                                                    \
        const float *a = (const float *)a_;                                              \
        const unsigned short *wp = (const unsigned short *)w->wp;                        \
        float *c = (float *)c_;                                                          \
        (void)work;                                                                      \
        if (m <= 0 || n <= 0) return;                                                    \
        fc_runs R = fc_bf16_runs(w, j0, k);                                              \
        if (n < FC_LANES) {                                                              \
            for (int q = 0; q < R.n; q++) R.p[q] *= 2;   /* pairs -> packed rows */      \
            fc_narrow_h_##LVL(m, n, &R, a, lda, wp, w->ks, beta, c, ldc);                \
        } else if (m == 1) fc_gemv_p_h_##LVL(&R, n, a, wp, w->ks, beta, c, backward);     \
        else fc_gemm_p_h_##LVL(m, n, &R, a, lda, wp, w->ks, beta, c, ldc);               \
    }
FC_DEFINE_MM(base)
#ifdef FC_DISPATCH
FC_DEFINE_MM(v3)
FC_DEFINE_MM(v4)
#endif

static void fc_cols_i8(int m, int nblk, int S, int c0, int c1, int k, const void *a, int lda,
                       const fc_mat *w, int j0, int beta, void *c, int ldc, int backward,
                       void *work)
{
    if (m <= 0 || c1 <= c0) return;
    int s0 = j0 == 0 ? 0 : 1;
    int s1 = j0 + k > w->i8.rows[0] && w->i8.nseg > 1 ? 2 : 1;
    fc_i8_matmul(m, s0, s1, nblk, S, c0, c1, (const float *)a, lda, &w->i8, beta, (float *)c,
                 ldc, backward, (uint8_t *)work);
}

static void fc_mm_i8(int m, int n, int k, const void *a, int lda, const fc_mat *w, int j0,
                     int beta, void *c, int ldc, int backward, void *work)
{
    fc_cols_i8(m, 1, 0, 0, n, k, a, lda, w, j0, beta, c, ldc, backward, work);
}

/* The products over columns [c0, c1) of a float or bf16 matrix (c0, c1 multiples of FC_LANES,
 * or 0 and n): the whole panels between them by the products above, a panel the range cuts
 * through by the unpacked ones (fc_gemv_t, fc_gemm_t: its columns, the panel's row stride).
 * Each output's sum is the same, so a range gives the bits of the whole product. */
#define FC_COLS_PLAN(PW)                                                                 \
    int n = w->n;                                                                        \
    if (m <= 0 || c1 <= c0) return;                                                      \
    if (n < FC_LANES || (c0 == 0 && c1 == n)) {                                          \
        w->mm(m, n, k, a_, lda, w, j0, beta, c_, ldc, backward, work);                    \
        return;                                                                          \
    }                                                                                    \
    int fa = (c0 + PW - 1) / PW * PW;                  /* whole panels: [fa, fb) */      \
    int fb = c1 == n ? c1 : c1 / PW * PW;                                                \
    /* the cut panels: [c0, head) before them, [tail, c1) after (a range inside one        \
     * panel is all head) */                                                               \
    int head = fa < c1 ? fa : c1, tail = fb > fa ? fb : fa;
/* fc_cols_fn over a one-range product: the blocks one after the other (backward: last first,
 * as the panels within a range). */
#define FC_BLOCKS(NAME, RANGE)                                                           \
    static void NAME(int m, int nblk, int S, int c0, int c1, int k, const void *a,       \
                     int lda, const fc_mat *w, int j0, int beta, void *c, int ldc,       \
                     int backward, void *work)                                           \
    {                                                                                    \
        for (int i = 0; i < nblk; i++) {                                                 \
            int b = backward ? nblk - 1 - i : i;                                         \
            RANGE(m, b * S + c0, b * S + c1, k, a, lda, w, j0, beta, c, ldc, backward,   \
                  work);                                                                 \
        }                                                                                \
    }
/* The float32 (S = f) and float64 (S = d) ranges, one definition for both. */
#define FC_DEFINE_RANGE_FLOAT(LVL, FMT, T, S)                                            \
    static void fc_range_##FMT##_##LVL(int m, int c0, int c1, int k, const void *a_,      \
                                       int lda, const fc_mat *w, int j0, int beta,       \
                                       void *c_, int ldc, int backward, void *work)      \
    {                                                                                    \
        const int PW = FC_PANEL_BYTES / (int)sizeof(T);                                  \
        FC_COLS_PLAN(PW)                                                                 \
        const T *a = (const T *)a_, *wp = (const T *)w->wp;                              \
        T *c = (T *)c_;                                                                  \
        if (fb > fa) {                                                                   \
            if (m == 1) fc_gemv_p_##S##_##LVL(k, fb - fa, a, wp + (long)fa * w->ks, w->ks, \
                                              j0, beta, c + fa, backward);              \
            else fc_gemm_p_##S##_##LVL(m, fb - fa, k, a, lda, wp + (long)fa * w->ks,      \
                                       w->ks, j0, beta, c + fa, ldc);                    \
        }                                                                                \
        for (int e = 0; e < 2; e++) {                  /* the cut panels at each end */  \
            int lo = e ? tail : c0, hi = e ? c1 : head;                                  \
            if (hi <= lo) continue;                                                      \
            int o = lo / PW * PW, pw = n - o < PW ? n - o : PW;                          \
            const T *wt = wp + (long)o * w->ks + (long)j0 * pw + (lo - o);               \
            if (m == 1) fc_gemv_t_##S##_##LVL(k, hi - lo, a, wt, pw, beta, c + lo);      \
            else fc_gemm_t_##S##_##LVL(m, hi - lo, k, a, lda, wt, pw, beta, c + lo, ldc); \
        }                                                                                \
    }
#define FC_DEFINE_COLS(LVL)                                                              \
    FC_DEFINE_RANGE_FLOAT(LVL, f32, float, f)                                            \
    FC_DEFINE_RANGE_FLOAT(LVL, f64, double, d)                                           \
    static void fc_range_bf16_##LVL(int m, int c0, int c1, int k, const void *a_, int lda,\
                                   const fc_mat *w, int j0, int beta, void *c_, int ldc, \
                                   int backward, void *work)                             \
    {                                                                                    \
        const int PW = FC_PANEL_BYTES / 4;                                               \
        FC_COLS_PLAN(PW)                                                                 \
        const float *a = (const float *)a_;                                              \
        const unsigned short *wp = (const unsigned short *)w->wp;                        \
        float *c = (float *)c_;                                                          \
        fc_runs R = fc_bf16_runs(w, j0, k);                                              \
        if (fb > fa) {                                                                   \
            if (m == 1) fc_gemv_p_h_##LVL(&R, fb - fa, a, wp + (long)fa * w->ks, w->ks,   \
                                          beta, c + fa, backward);                      \
            else fc_gemm_p_h_##LVL(m, fb - fa, &R, a, lda, wp + (long)fa * w->ks, w->ks,  \
                                   beta, c + fa, ldc);                                  \
        }                                                                                \
        for (int e = 0; e < 2; e++) {                                                    \
            int lo = e ? tail : c0, hi = e ? c1 : head;                                  \
            if (hi <= lo) continue;                                                      \
            int o = lo / PW * PW, pw = n - o < PW ? n - o : PW;                          \
            const unsigned *wt = (const unsigned *)(wp + (long)o * w->ks) + (lo - o);    \
            if (m == 1) fc_gemv_t_h_##LVL(&R, hi - lo, a, wt, pw, beta, c + lo);         \
            else fc_gemm_t_h_##LVL(m, hi - lo, &R, a, lda, wt, pw, beta, c + lo, ldc);   \
        }                                                                                \
    }                                                                                    \
    FC_BLOCKS(fc_cols_f32_##LVL, fc_range_f32_##LVL)                                     \
    FC_BLOCKS(fc_cols_f64_##LVL, fc_range_f64_##LVL)                                     \
    FC_BLOCKS(fc_cols_bf16_##LVL, fc_range_bf16_##LVL)
FC_DEFINE_COLS(base)
#ifdef FC_DISPATCH
FC_DEFINE_COLS(v3)
FC_DEFINE_COLS(v4)
#endif

#endif

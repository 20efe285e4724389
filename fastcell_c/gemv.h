/* y[0:n] = (beta ? y : 0) + x[0:k] @ wt[0:k, 0:n]: a matrix-vector product over weights stored
 * transposed (row j of wt holds input j's weight for every output), so the inner loop is a
 * contiguous AXPY into register accumulators and needs no horizontal sums. n must be a multiple of
 * FC_LANES (the kernels pad every gate block to it). Each output sums its k terms in order
 * j = 0..k-1 whatever the vector width, so every build and every CPU gives the same bits.
 *
 * One body (GCC vector extensions), instantiated per x86 level with that level's natural vector
 * width: x86-64-v4 (AVX-512, 16 floats), x86-64-v3 (AVX2 + FMA, 8), baseline (SSE2, 4); picked
 * at run time (dispatch.h), so the default build stays portable. For one row this beats a BLAS GEMV call
 * several times at H <= 256: no interface overhead, and up to 8 independent accumulators hide the
 * FMA latency.
 */
#ifndef FASTCELL_GEMV_H
#define FASTCELL_GEMV_H

#include "dispatch.h"

#define FC_LANES 16   /* gate blocks are padded to a multiple of this many elements */

/* NB accumulators of W lanes over outputs [o, o + NB*W): one pass over the k rows of that panel;
 * NB = 8, then 4, 2, 1 for what is left, so a small n still makes one pass per panel. */
#define FC_PANEL(T, V, W, NB)                                                        \
    for (; o + NB * W <= n; o += NB * W) {                                           \
        V a[NB];                                                                     \
        for (int b = 0; b < NB; b++) a[b] = (V){0};                                  \
        const T *w = wt + o;                                                         \
        for (int j = 0; j < k; j++, w += ldw) {                                      \
            T s = x[j];                                                              \
            for (int b = 0; b < NB; b++) a[b] += s * *(const V *)(w + b * W);        \
        }                                                                            \
        V *out = (V *)(y + o);                                                       \
        for (int b = 0; b < NB; b++) out[b] = beta ? out[b] + a[b] : a[b];           \
    }

#define FC_DEFINE_GEMV(NAME, T, V, W, ATTR)                                          \
    ATTR static void NAME(int k, int n, const T *x, const T *wt, int ldw, int beta, T *y) \
    {                                                                                \
        int o = 0;                                                                   \
        FC_PANEL(T, V, W, 8)                                                         \
        FC_PANEL(T, V, W, 4)                                                         \
        FC_PANEL(T, V, W, 2)                                                         \
        FC_PANEL(T, V, W, 1)                                                         \
    }

/* aligned(sizeof(T)): the loads and stores may be unaligned. */
typedef float fc_vf4 __attribute__((vector_size(16), aligned(4)));
typedef double fc_vd2 __attribute__((vector_size(16), aligned(8)));
FC_DEFINE_GEMV(fc_gemv_t_f_base, float, fc_vf4, 4, )
FC_DEFINE_GEMV(fc_gemv_t_d_base, double, fc_vd2, 2, )

#ifdef FC_DISPATCH
typedef float fc_vf8 __attribute__((vector_size(32), aligned(4)));
typedef float fc_vf16 __attribute__((vector_size(64), aligned(4)));
typedef double fc_vd4 __attribute__((vector_size(32), aligned(8)));
typedef double fc_vd8 __attribute__((vector_size(64), aligned(8)));
FC_DEFINE_GEMV(fc_gemv_t_f_v3, float, fc_vf8, 8, FC_TARGET_V3)
FC_DEFINE_GEMV(fc_gemv_t_f_v4, float, fc_vf16, 16, FC_TARGET_V4)
FC_DEFINE_GEMV(fc_gemv_t_d_v3, double, fc_vd4, 4, FC_TARGET_V3)
FC_DEFINE_GEMV(fc_gemv_t_d_v4, double, fc_vd8, 8, FC_TARGET_V4)
#endif

static inline void fc_gemv_t_f(int k, int n, const float *x, const float *wt, int ldw, int beta,
                               float *y)
{
    FC_CALL_BEST(fc_gemv_t_f, (k, n, x, wt, ldw, beta, y));
}

static inline void fc_gemv_t_d(int k, int n, const double *x, const double *wt, int ldw, int beta,
                               double *y)
{
    FC_CALL_BEST(fc_gemv_t_d, (k, n, x, wt, ldw, beta, y));
}

#endif

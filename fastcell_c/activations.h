/* Sigmoid and tanh that GCC vectorizes: no libm call, no branch, only +-*÷, compares and
 * integer bit tricks, so a loop over a gate block becomes SIMD code.
 *
 * Both reduce to exp(y) or expm1(y) for y = -|x| <= 0, computed as 2^n * (1 + q(r)) with
 * y = n*ln2 + r, |r| <= ln2/2, and q(r) = expm1(r) as a Taylor polynomial (degree 13 in double,
 * 7 in float: truncation below half an ulp). expm1 keeps tanh accurate near zero, where
 * 1 - exp(-2|x|) would cancel. Accuracy: a few ulp in both precisions (tests/exactness/test_activations.py).
 * NaN propagates; +-inf saturate to the exact limits.
 */
#ifndef FASTCELL_ACTIVATIONS_H
#define FASTCELL_ACTIVATIONS_H

#include <stdint.h>
#include <string.h>

/* ---- double ---- */

#define FC_LOG2E_D 1.4426950408889634
#define FC_LN2HI_D 6.93147180369123816490e-01 /* fdlibm split: n*LN2HI is exact */
#define FC_LN2LO_D 1.90821492927058770002e-10
#define FC_SHIFT_D 6755399441055744.0         /* 1.5 * 2^52: adding it rounds to an integer */
#define FC_YMIN_D (-708.0)                    /* 2^n stays a normal number above this */

/* q = expm1(r) for |r| <= ln2/2, s = 2^n, so that exp(y) = s + s*q and expm1(y) = s*q + (s-1). */
static inline void fc_reduce_d(double y, double *s, double *q)
{
    double yc = y < FC_YMIN_D ? FC_YMIN_D : y;
    double kd = yc * FC_LOG2E_D + FC_SHIFT_D;
    double n = kd - FC_SHIFT_D;
    double r = (yc - n * FC_LN2HI_D) - n * FC_LN2LO_D;
    double p = 1.0 / 6227020800.0;            /* 1/13! */
    p = p * r + 1.0 / 479001600.0;
    p = p * r + 1.0 / 39916800.0;
    p = p * r + 1.0 / 3628800.0;
    p = p * r + 1.0 / 362880.0;
    p = p * r + 1.0 / 40320.0;
    p = p * r + 1.0 / 5040.0;
    p = p * r + 1.0 / 720.0;
    p = p * r + 1.0 / 120.0;
    p = p * r + 1.0 / 24.0;
    p = p * r + 1.0 / 6.0;
    p = p * r + 0.5;
    *q = r + (r * r) * p;
    /* The low mantissa bits of kd hold n; shifted into the exponent field they make 2^n. */
    uint64_t bits;
    memcpy(&bits, &kd, sizeof bits);
    bits = (bits << 52) + ((uint64_t)1023 << 52);
    memcpy(s, &bits, sizeof bits);
}

static inline double fc_sigmoid_d(double x)
{
    double ax = __builtin_fabs(x);                   /* one AND, not a compare and a blend */
    double s, q;
    fc_reduce_d(-ax, &s, &q);
    double e = -ax < FC_YMIN_D ? 0.0 : s + s * q;   /* exp(-|x|), exactly 0 far out */
    double p = 1.0 / (1.0 + e);
    return x < 0 ? e * p : p;                        /* NaN takes the second branch: NaN */
}

static inline double fc_tanh_d(double x)
{
    double ax = __builtin_fabs(x);
    double s, q;
    fc_reduce_d(-2.0 * ax, &s, &q);
    double m = s * q + (s - 1.0);                    /* expm1(-2|x|) in (-1, 0] */
    double t = (0.0 - m) / (2.0 + m);                /* |tanh x|: +0, not -0, at x = +-0 */
    return __builtin_copysign(t, x);                 /* tanh(-0) = -0, as in PyTorch */
}

/* ---- float ---- */

#define FC_LOG2E_F 1.44269504f
#define FC_LN2HI_F 0.693359375f                  /* Cephes split */
#define FC_LN2LO_F (-2.12194440e-4f)
#define FC_SHIFT_F 12582912.0f                   /* 1.5 * 2^23 */
#define FC_YMIN_F (-87.0f)

static inline void fc_reduce_f(float y, float *s, float *q)
{
    float yc = y < FC_YMIN_F ? FC_YMIN_F : y;
    float kd = yc * FC_LOG2E_F + FC_SHIFT_F;
    float n = kd - FC_SHIFT_F;
    float r = (yc - n * FC_LN2HI_F) - n * FC_LN2LO_F;
    float p = 1.0f / 5040.0f;
    p = p * r + 1.0f / 720.0f;
    p = p * r + 1.0f / 120.0f;
    p = p * r + 1.0f / 24.0f;
    p = p * r + 1.0f / 6.0f;
    p = p * r + 0.5f;
    *q = r + (r * r) * p;
    uint32_t bits;
    memcpy(&bits, &kd, sizeof bits);
    bits = (bits << 23) + ((uint32_t)127 << 23);
    memcpy(s, &bits, sizeof bits);
}

static inline float fc_sigmoid_f(float x)
{
    float ax = __builtin_fabsf(x);
    float s, q;
    fc_reduce_f(-ax, &s, &q);
    float e = -ax < FC_YMIN_F ? 0.0f : s + s * q;
    float p = 1.0f / (1.0f + e);
    return x < 0 ? e * p : p;
}

static inline float fc_tanh_f(float x)
{
    float ax = __builtin_fabsf(x);
    float s, q;
    fc_reduce_f(-2.0f * ax, &s, &q);
    float m = s * q + (s - 1.0f);
    float t = (0.0f - m) / (2.0f + m);
    return __builtin_copysignf(t, x);
}

#endif

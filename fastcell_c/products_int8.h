/* The int8 weight format's products: c[0:m, 0:n] (+)= a[0:m, rows] @ W[rows, 0:n], with W stored
 * as int8 with one float scale per column (output) and segment, and a quantized to 8-bit unsigned
 * integers row by row on every call: u8 x s8 dot products of 4 bytes (AVX-512 VNNI / AVX-VNNI
 * vpdpbusd, AMX tdpbusd for blocks of 16 8-bit rows), summed exactly in int32, then one
 * dequantizing pass per output.
 *
 * Segments. The rows of a packing are one or two segments (the input rows of W_ih, then the
 * recurrent rows of W_hh: a streaming step multiplies [x h] in one call), each with its own
 * activation scale per row and its own weight scales, since x and h have different ranges.
 * A segment quantizes its activations to 8 bits or, for the input segment, to 16 bits as two bytes
 * (hi, lo) taken as two rows of the same product: x's range (unit Gaussian features reach 3 to 4)
 * costs 8 bits more than its share of the error, h in (-1, 1) does not (tests/exactness/test_reduced_formats.py).
 *
 * Activation quantization of one row v of a segment (k values), the same on every level:
 *   amax = max |v_i| over the finite v_i; a row with amax < FC_I8_TINY is all zeros (scale 0);
 *   8 bits:  s = amax / 127,   q_i = rint(v_i * (127 / amax)) in [-127, 127],   byte q_i + 128
 *   16 bits: s = amax / 32767, q_i = rint(v_i * (32767 / amax)), q_i + 32768 = 256 hi + lo
 * and the sum over the segment, with sw_j the column's weight scale and cs_j its column sum:
 *   8 bits:  t_j = (float)(acc_j - 128 cs_j)
 *   16 bits: t_j = 256 (float)(acc_hi_j - 128 cs_j) + (float)acc_lo_j
 *   c_j = (first segment without beta ? 0 : c_j) + t_j * (sw_j * s)
 * The integer sums are exact in any order, so every path (AMX tiles, VNNI in 512 or 256 bits, widened
 * weights times activation words with vpmaddwd, plain C) gives the same bits; the float steps
 * are the same everywhere but the baseline level, which has no FMA (the SIMD paths dequantize
 * in registers, the baseline in a pass over an int32 buffer). A non-finite v_i quantizes to 0 and then adds v_i times its
 * dequantized weights to each output (NaN and infinities spread as in float32, never a finite
 * result from a poisoned scale).
 *
 * Int32 overflow: |acc| <= 255 * 128 * k, safe for k <= 65536 rows per segment (checked at load).
 *
 * Layout: panels of FC_I8_PW columns (the last one narrower, a multiple of 16, or for a narrow
 * matrix of fewer than 16 columns its one unpadded panel), each panel the
 * rows' quads one after another: quad q of the panel of columns [o, o + pw) is pw * 4 bytes at
 * wp + o * K4 + q * pw * 4, column j's 4 bytes (rows 4q..4q+3) at offset (j - o) * 4. One
 * 64-byte load gives 16 columns x 4 rows, what vpdpbusd multiplies by 4 broadcast activation
 * bytes. K4: the rows of all segments, each padded with zero rows to a multiple of 4.
 */
#ifndef FASTCELL_MATMUL_INT8_H
#define FASTCELL_MATMUL_INT8_H

#include <math.h>
#include <stdint.h>
#include <string.h>

#include "cpu.h"
#include "packed.h"

#ifdef FC_DISPATCH
#include <immintrin.h>
#define FC_TARGET_VNNI512 __attribute__((target("arch=x86-64-v4,avx512vnni")))
#define FC_TARGET_AVXVNNI __attribute__((target("arch=x86-64-v3,avxvnni")))
#endif

#define FC_I8_TINY 1e-30f   /* a row below this is zero: 127 / amax would overflow near FLT_MIN */

static inline int fc_i8_k4(const fc_i8_mat *w) { return w->k4[0] + (w->nseg > 1 ? w->k4[1] : 0); }

/* ---- activation quantization (scalar C: k values per row, a small part of the work) ---- */

/* Quantizes m rows of k floats (row stride lda) into bytes: 8 bits, one row of k4 bytes per
 * input row; 16 bits, two (hi, then lo). scale[r]: the row's scale s. Returns whether any value
 * was not finite (those are left to fc_i8_nonfinite). Branch-free, so that it vectorizes at
 * every level; rounding to nearest even by adding and subtracting 1.5 * 2^23 (exact for
 * |x| <= 32767), which, unlike rintf, needs no SSE4.1. The same bits at every level.
 * WORDS (the AVX2 path's layout): the same q_i as int16 words instead, rows of k4 words, for
 * 8-bit rows and 16-bit rows of k4 <= FC_I8_MW_ROWS (longer 16-bit rows stay hi and lo bytes). */
#define FC_I8_MW_ROWS 512
/* Stores nw quantized values qi of a row from its value i: as words (WORDS), bytes q + 128 (8
 * bits), or hi and lo bytes of q + 32768 (16 bits, the lo row k4 bytes after the hi one). A
 * constant nw (whole vectors) stores from registers; memcpy of a variable one is the row's end. */
#define FC_I8_PUT(vi, vh, vb, q, k4, words, bits, i, qi, nw)                           \
    do {                                                                                 \
        if (words) {                                                                     \
            vh h_ = __builtin_convertvector(qi, vh);                                     \
            memcpy(q + 2 * (i), &h_, 2 * (nw));                                          \
        } else if (bits == 8) {                                                          \
            vb b_ = __builtin_convertvector(qi + 128, vb);                               \
            memcpy(q + (i), &b_, nw);                                                    \
        } else {                                                                         \
            vi u_ = qi + 32768;                                                          \
            vb hi_ = __builtin_convertvector(u_ >> 8, vb);                               \
            vb lo_ = __builtin_convertvector(u_ & 255, vb);                              \
            memcpy(q + (i), &hi_, nw);                                                   \
            memcpy(q + k4 + (i), &lo_, nw);                                              \
        }                                                                                \
    } while (0)
#define FC_I8_QUANTIZE(ATTR, NAME, W, WORDS)                                             \
    ATTR static int NAME(int m, int k, int k4, int bits, const float *a, long lda, uint8_t *qa, \
                         float *scale)                                                   \
    {                                                                                    \
        typedef float vf __attribute__((vector_size(4 * W), aligned(4)));                \
        typedef int32_t vi __attribute__((vector_size(4 * W), aligned(4)));              \
        typedef uint8_t vb __attribute__((vector_size(W), aligned(1)));                  \
        int bad = 0;                                                                     \
        typedef int16_t vh __attribute__((vector_size(2 * W), aligned(2)));              \
        const int words = WORDS && (bits == 8 || k4 <= FC_I8_MW_ROWS);                   \
        long qrow = (long)k4 * (words ? 2 : bits / 8);                                   \
        const float lim = bits == 8 ? 127.0f : 32767.0f, big = 3.4028235e38f;            \
        const float magic = 12582912.0f;                                                 \
        const vi absmask = (vi){} + 0x7fffffff;                                          \
        int kv = k / W * W;                                                              \
        for (int r = 0; r < m; r++) {                                                    \
            const float *v = a + (long)r * lda;                                          \
            uint8_t *q = qa + r * qrow;                                                  \
            vi vmax = (vi){}, vbad = (vi){};                                             \
            for (int i = 0; i < kv; i += W) {                                            \
                vi x = *(const vi *)(v + i) & absmask;        /* |v| as bits */          \
                vi fin = (vf)x <= big;                                                   \
                vbad |= ~fin;                                                            \
                x &= fin;                                                                \
                vi gt = x > vmax;                /* non-negative floats order as ints */ \
                vmax = (x & gt) | (vmax & ~gt);                                          \
            }                                                                            \
            /* the lanes' max and or, halving (exact in any order) */                    \
            int32_t lm[W], lb[W];                                                        \
            memcpy(lm, &vmax, sizeof lm);                                                \
            memcpy(lb, &vbad, sizeof lb);                                                \
            for (int n = W / 2; n >= 1; n /= 2)                                          \
                for (int j = 0; j < n; j++) {                                            \
                    lm[j] = lm[j + n] > lm[j] ? lm[j + n] : lm[j];                       \
                    lb[j] |= lb[j + n];                                                  \
                }                                                                        \
            int32_t imax = lm[0], nonfinite = lb[0];                                     \
            float amax;                                                                  \
            memcpy(&amax, &imax, 4);                                                     \
            for (int i = kv; i < k; i++) {                                               \
                float x = __builtin_fabsf(v[i]);                                         \
                nonfinite |= !(x <= big);                                                \
                amax = x <= big && x > amax ? x : amax;                                  \
            }                                                                            \
            bad |= nonfinite != 0;                                                       \
            int zero = amax < FC_I8_TINY;                                                \
            float inv = zero ? 0.0f : lim / amax;                                        \
            scale[r] = zero ? 0.0f : amax / lim;                                         \
            /* x * inv, non-finite -> 0, rounded to nearest even, as integers; whole      \
             * vectors stored straight from registers, then the row's last lanes (clamped \
             * there too). No clamp is needed: |v_i| <= amax, so |v_i * inv| <= lim (1 +   \
             * 2^-24)^2 < lim + 1/2, which rounds to at most lim. */                       \
            for (int i = 0; i < kv; i += W) {                                            \
                vf x = *(const vf *)(v + i);                                             \
                vi fin = ((vi)x & absmask) <= 0x7f7fffff;                                \
                vf y = (vf)((vi)(x * inv) & fin);                                        \
                vi qi = __builtin_convertvector((y + magic) - magic, vi);                \
                FC_I8_PUT(vi, vh, vb, q, k4, words, bits, i, qi, W);                     \
            }                                                                            \
            if (kv < k) {                                                                \
                vi qi;                                                                   \
                for (int j = 0; j < W; j++) {                                            \
                    float x = kv + j < k ? v[kv + j] * inv : 0.0f;                       \
                    x = kv + j < k && __builtin_fabsf(v[kv + j]) <= big ? x : 0.0f;      \
                    x = x < -lim ? -lim : x > lim ? lim : x;                             \
                    qi[j] = (int32_t)((x + magic) - magic);                              \
                }                                                                        \
                FC_I8_PUT(vi, vh, vb, q, k4, words, bits, kv, qi, k - kv);               \
            }                                                                            \
            for (int i = k; i < k4; i++) {                                               \
                if (words) { q[2 * i] = 0; q[2 * i + 1] = 0; continue; }                 \
                q[i] = 128;                                                              \
                if (bits == 16) q[k4 + i] = 0;                                           \
            }                                                                            \
        }                                                                                \
        return bad;                                                                      \
    }
FC_I8_QUANTIZE(, fc_i8_quantize_base, 4, 0)

/* Adds v_i * dequantized W[i, :] for every non-finite v_i of the m rows: the spread of NaN and
 * infinities that float32 would give (the quantized row holds 0 there). */
static void fc_i8_nonfinite(int m, int k, const float *a, long lda, const fc_i8_mat *w, int seg,
                            int r0, int c0, int c1, float *c, long ldc)
{
    int K4 = fc_i8_k4(w);
    for (int r = 0; r < m; r++) {
        const float *v = a + (long)r * lda;
        for (int i = 0; i < k; i++) {
            if (fabsf(v[i]) <= 3.4028235e38f) continue;
            int row = r0 + i;
            for (int col = c0; col < c1; col++) {
                int o = col / FC_I8_PW * FC_I8_PW;
                int pw = w->n - o < FC_I8_PW ? w->n - o : FC_I8_PW;
                int8_t q = w->wp[(long)o * K4 + (long)(row >> 2) * pw * 4 + (col - o) * 4 + (row & 3)];
                c[(long)r * ldc + col] += v[i] * ((float)q * w->scale[seg][col]);
            }
        }
    }
}

/* ---- the baseline (plain C): the integer tile into an int32 buffer, then a dequantizing pass.
 * The SIMD paths below fuse both in registers; the float steps are the same. */

/* acc[vr][0:pw] = sum over nq quads of qa row vr . panel column (row stride FC_I8_PW): the
 * virtual rows are the input rows, or for 16 bits their hi and lo rows side by side. qa: their
 * bytes (row stride lq), w: the first column's first quad of the segment, quads ldq columns
 * apart (the panel's width). GCC may vectorize it with SSE2's pmaddwd. */
static void fc_i8_tile_base(int vrows, int pw, int ldq, int nq, const uint8_t *qa, long lq,
                            const int8_t *w, int32_t *acc)
{
    for (int r = 0; r < vrows; r++) {
        int32_t *out = acc + (long)r * FC_I8_PW;
        memset(out, 0, sizeof(int32_t) * pw);
        const uint8_t *x = qa + r * lq;
        for (int q = 0; q < nq; q++) {
            const int8_t *wq = w + (long)q * ldq * 4;
            int x0 = x[4 * q], x1 = x[4 * q + 1], x2 = x[4 * q + 2], x3 = x[4 * q + 3];
            for (int j = 0; j < pw; j++)
                out[j] += x0 * wq[4 * j] + x1 * wq[4 * j + 1] + x2 * wq[4 * j + 2] + x3 * wq[4 * j + 3];
        }
    }
}

/* c[0:rows, 0:pw] (+)= the dequantized tile: t (* 256 + lo), times sw * s. */
static void fc_i8_dequant_base(int rows, int pw, int bits, const int32_t *acc, const int32_t *cs,
                               const float *sw, const float *sa, int add, float *c, long ldc)
{
    for (int r = 0; r < rows; r++) {
        const int32_t *hi = acc + (long)r * (bits / 8) * FC_I8_PW;
        const int32_t *lo = hi + FC_I8_PW;
        float s = sa[r];
        float *out = c + (long)r * ldc;
        for (int j = 0; j < pw; j++) {
            float t = (float)(hi[j] - 128 * cs[j]);
            if (bits == 16) t = t * 256.0f + (float)lo[j];
            float p = sw[j] * s;
            out[j] = add ? out[j] + t * p : t * p;
        }
    }
}

/* c[0:m, 0:pw] (+)= dequantized (qa rows . panel columns) for one panel and segment, m <= FC_I8_MC:
 * the same interface as the SIMD paths' fused panels. */
static void fc_i8_panel_base(int m, int pw, int ldq, int nq, int bits, const uint8_t *qa,
                             long lq, const int8_t *w, const int32_t *cs, const float *sw,
                             const float *sa, int add, float *c, long ldc)
{
    int32_t acc[2 * FC_I8_MC * FC_I8_PW] __attribute__((aligned(64)));
    fc_i8_tile_base(m * (bits / 8), pw, ldq, nq, qa, lq, w, acc);
    fc_i8_dequant_base(m, pw, bits, acc, cs, sw, sa, add, c, ldc);
}

#ifdef FC_DISPATCH
/* fc_i8_panel_base with the FMA levels' float steps (fc_i8_kernel512's): for a narrow matrix
 * (fewer than 16 columns, packed unpadded) at those levels. */
FC_TARGET_V3 static void fc_i8_dequant_fma(int rows, int pw, int bits, const int32_t *acc,
                                           const int32_t *cs, const float *sw, const float *sa,
                                           int add, float *c, long ldc)
{
    for (int r = 0; r < rows; r++) {
        const int32_t *hi = acc + (long)r * (bits / 8) * FC_I8_PW;
        const int32_t *lo = hi + FC_I8_PW;
        float s = sa[r];
        float *out = c + (long)r * ldc;
        for (int j = 0; j < pw; j++) {
            float t = (float)(hi[j] - 128 * cs[j]);
            if (bits == 16) t = __builtin_fmaf(t, 256.0f, (float)lo[j]);
            float p = sw[j] * s;
            out[j] = add ? __builtin_fmaf(t, p, out[j]) : t * p;
        }
    }
}

static void fc_i8_panel_narrow_fma(int m, int pw, int ldq, int nq, int bits, const uint8_t *qa,
                                   long lq, const int8_t *w, const int32_t *cs, const float *sw,
                                   const float *sa, int add, float *c, long ldc)
{
    int32_t acc[2 * FC_I8_MC * FC_I8_PW] __attribute__((aligned(64)));
    fc_i8_tile_base(m * (bits / 8), pw, ldq, nq, qa, lq, w, acc);
    fc_i8_dequant_fma(m, pw, bits, acc, cs, sw, sa, add, c, ldc);
}

static inline int32_t fc_i8_quad(const uint8_t *p) { int32_t v; memcpy(&v, p, 4); return v; }

/* acc += x . w in place: as an intrinsic, GCC 12 copies the accumulators between registers
 * around every vpdpbusd of these tiles (a third of the tile's instructions); tied in asm it
 * does not. */
#define FC_DPBUSD512(acc, x, w) __asm__("vpdpbusd %2, %1, %0" : "+v"(acc) : "v"(x), "v"(w))

/* The same tiles with the dequantizing pass done in registers (no int32 buffer), the path every
 * AVX-512 VNNI CPU takes: MB real rows (16 bits: MB hi rows and MB lo rows), NB vectors. The
 * float steps are those of fc_i8_dequant_base: t * 256 + lo, p = sw * s, then t * p or fma(t, p, c).
 * Constant MB, NB and every small loop unrolled, so the accumulators live in registers (a loop
 * left rolled kept them on the stack: a store and a load around every vpdpbusd). With fewer than
 * 8 accumulators, the quads alternate between two sets (KS = 2) so that 8 or more vpdpbusd
 * chains hide its latency; the integer sums are exact, so the bits do not change. */
#define FC_UNROLL _Pragma("GCC unroll 16")
FC_TARGET_VNNI512 static inline __attribute__((always_inline)) void
fc_i8_kernel512(const int MB, const int NB, const int SIXTEEN, int r, int nq, int ldq,
                const uint8_t *qa, long lq, const int8_t *w, const int32_t *cs, const float *sw,
                const float *sa, int add, float *c, long ldc)
{
    const int V = SIXTEEN ? 2 * MB : MB;
    const int KS = V * NB < 8 ? 2 : 1;
    __m512i acc[2][6][4];
    FC_UNROLL for (int k = 0; k < KS; k++)
        FC_UNROLL for (int i = 0; i < V; i++)
            FC_UNROLL for (int b = 0; b < NB; b++) acc[k][i][b] = _mm512_setzero_si512();
    const int8_t *wq = w;
    const uint8_t *x0 = qa + (long)r * (SIXTEEN ? 2 : 1) * lq;
    int q = 0;
    for (; q + KS <= nq; q += KS) {
        FC_UNROLL for (int k = 0; k < KS; k++, wq += ldq * 4) {
            __m512i wv[4];
            FC_UNROLL for (int b = 0; b < NB; b++) wv[b] = _mm512_loadu_si512(wq + b * 64);
            FC_UNROLL for (int i = 0; i < V; i++) {
                __m512i x = _mm512_set1_epi32(fc_i8_quad(x0 + (long)i * lq + 4 * (q + k)));
                FC_UNROLL for (int b = 0; b < NB; b++) FC_DPBUSD512(acc[k][i][b], x, wv[b]);
            }
        }
    }
    for (; q < nq; q++, wq += ldq * 4) {      /* KS = 2 and nq odd: the last quad */
        __m512i wv[4];
        FC_UNROLL for (int b = 0; b < NB; b++) wv[b] = _mm512_loadu_si512(wq + b * 64);
        FC_UNROLL for (int i = 0; i < V; i++) {
            __m512i x = _mm512_set1_epi32(fc_i8_quad(x0 + (long)i * lq + 4 * q));
            FC_UNROLL for (int b = 0; b < NB; b++) FC_DPBUSD512(acc[0][i][b], x, wv[b]);
        }
    }
    if (KS == 2)
        FC_UNROLL for (int i = 0; i < V; i++)
            FC_UNROLL for (int b = 0; b < NB; b++)
                acc[0][i][b] = _mm512_add_epi32(acc[0][i][b], acc[1][i][b]);
    FC_UNROLL for (int b = 0; b < NB; b++) {
        __m512i zc = _mm512_slli_epi32(_mm512_loadu_si512(cs + b * 16), 7);   /* 128 cs */
        __m512 swv = _mm512_loadu_ps(sw + b * 16);
        FC_UNROLL for (int i = 0; i < MB; i++) {
            int hi = SIXTEEN ? 2 * i : i;
            __m512 t = _mm512_cvtepi32_ps(_mm512_sub_epi32(acc[0][hi][b], zc));
            if (SIXTEEN)
                t = _mm512_fmadd_ps(t, _mm512_set1_ps(256.0f), _mm512_cvtepi32_ps(acc[0][hi + 1][b]));
            __m512 pv = _mm512_mul_ps(swv, _mm512_set1_ps(sa[r + i]));
            float *out = c + (long)(r + i) * ldc + b * 16;
            __m512 y = add ? _mm512_fmadd_ps(t, pv, _mm512_loadu_ps(out)) : _mm512_mul_ps(t, pv);
            _mm512_storeu_ps(out, y);
        }
    }
}

#define FC_I8_KERNEL512_NB(MB, SIXTEEN)                                                  \
    if (nb == 4) fc_i8_kernel512(MB, 4, SIXTEEN, r, nq, ldq, qa, lq, w, cs, sw, sa, add, c, ldc); \
    else if (nb == 3) fc_i8_kernel512(MB, 3, SIXTEEN, r, nq, ldq, qa, lq, w, cs, sw, sa, add, c, ldc); \
    else if (nb == 2) fc_i8_kernel512(MB, 2, SIXTEEN, r, nq, ldq, qa, lq, w, cs, sw, sa, add, c, ldc); \
    else fc_i8_kernel512(MB, 1, SIXTEEN, r, nq, ldq, qa, lq, w, cs, sw, sa, add, c, ldc);

/* c[0:m, 0:pw] (+)= dequantized (qa rows . panel columns) for one panel and segment. */
FC_TARGET_VNNI512 static void fc_i8_panel_vnni512(int m, int pw, int ldq, int nq, int bits,
                                                  const uint8_t *qa, long lq, const int8_t *w,
                                                  const int32_t *cs, const float *sw,
                                                  const float *sa, int add, float *c, long ldc)
{
    int nb = pw / 16, r = 0;
    if (bits == 8) {   /* 6 rows: 24 accumulators, 10 loads per 24 vpdpbusd (4 rows: 8 per 16) */
        for (; r + 6 <= m; r += 6) FC_I8_KERNEL512_NB(6, 0)
        for (; r + 4 <= m; r += 4) FC_I8_KERNEL512_NB(4, 0)
        for (; r < m; r++) FC_I8_KERNEL512_NB(1, 0)
    } else {
        for (; r + 2 <= m; r += 2) FC_I8_KERNEL512_NB(2, 1)
        for (; r < m; r++) FC_I8_KERNEL512_NB(1, 1)
    }
}

FC_I8_QUANTIZE(FC_TARGET_VNNI512, fc_i8_quantize_vnni512, 16, 0)

/* ---- AMX (path 4): blocks of 16 rows of 8-bit activations by tiles, the rest as above ----
 * tdpbusd sums u8 x s8 products of 4 bytes into int32 as vpdpbusd does, exactly, so the sums are
 * the same; the B tile is the panel itself (16 quads of 16 columns, one quad a row: rows
 * ldq * 4 bytes apart). The quads past the last whole 16 are added in C, then the block is
 * dequantized with fc_i8_kernel512's float steps (t = acc - 128 cs, p = sw * s, t * p or
 * fma(t, p, c)): the same bits. Each call checks the tile configuration (sttilecfg) and loads
 * its own where it differs (another library in the process may have loaded its own, or released
 * the tiles); the tiles stay configured between calls, since ldtilecfg costs more than a panel. */
#define FC_TARGET_AMX __attribute__((target("arch=x86-64-v4,avx512vnni,amx-tile,amx-int8")))
typedef struct {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} fc_amx_cfg;

#define FC_AMX_COLS(B)                                                                   \
    if (nb > B) {                                                                        \
        _tile_loadd(5, w + (long)q * ldq * 4 + B * 64, ldq * 4);                         \
        _tile_dpbusd(B, 4, 5);                                                           \
    }
FC_TARGET_AMX static void fc_i8_panel_amx(int m, int pw, int ldq, int nq, int bits,
                                          const uint8_t *qa, long lq, const int8_t *w,
                                          const int32_t *cs, const float *sw, const float *sa,
                                          int add, float *c, long ldc)
{
    int r = 0;
    if (bits == 8 && m >= 16 && nq >= 16) {
        int nb = pw / 16, nk = nq / 16 * 16;
        fc_amx_cfg cfg;
        memset(&cfg, 0, sizeof cfg);
        cfg.palette = 1;
        for (int t = 0; t < 6; t++) {            /* 0-3: C (16 x 16 int32), 4: A, 5: B */
            cfg.rows[t] = 16;
            cfg.colsb[t] = 64;
        }
        fc_amx_cfg now;                          /* ldtilecfg costs more than checking */
        _tile_storeconfig(&now);
        if (memcmp(&now, &cfg, sizeof cfg) != 0) _tile_loadconfig(&cfg);
        int32_t acc[16 * 64] __attribute__((aligned(64)));
        for (; r + 16 <= m; r += 16) {
            _tile_zero(0);
            _tile_zero(1);
            _tile_zero(2);
            _tile_zero(3);
            const uint8_t *x0 = qa + (long)r * lq;
            for (int q = 0; q < nk; q += 16) {
                _tile_loadd(4, x0 + 4 * q, lq);
                FC_AMX_COLS(0) FC_AMX_COLS(1) FC_AMX_COLS(2) FC_AMX_COLS(3)
            }
            _tile_stored(0, acc, 256);
            _tile_stored(1, acc + 16, 256);
            _tile_stored(2, acc + 32, 256);
            _tile_stored(3, acc + 48, 256);
            for (int q = nk; q < nq; q++) {         /* the last quads, exactly in int32 */
                const int8_t *wq = w + (long)q * ldq * 4;
                for (int i = 0; i < 16; i++) {
                    const uint8_t *x = x0 + (long)i * lq + 4 * q;
                    for (int j = 0; j < pw; j++)
                        acc[i * 64 + j] += x[0] * wq[4 * j] + x[1] * wq[4 * j + 1] +
                                           x[2] * wq[4 * j + 2] + x[3] * wq[4 * j + 3];
                }
            }
            for (int b = 0; b < nb; b++) {
                __m512i zc = _mm512_slli_epi32(_mm512_loadu_si512(cs + b * 16), 7);   /* 128 cs */
                __m512 swv = _mm512_loadu_ps(sw + b * 16);
                for (int i = 0; i < 16; i++) {
                    __m512 t = _mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_load_si512(acc + i * 64 + b * 16), zc));
                    __m512 pv = _mm512_mul_ps(swv, _mm512_set1_ps(sa[r + i]));
                    float *out = c + (long)(r + i) * ldc + b * 16;
                    __m512 y = add ? _mm512_fmadd_ps(t, pv, _mm512_loadu_ps(out)) : _mm512_mul_ps(t, pv);
                    _mm512_storeu_ps(out, y);
                }
            }
        }
    }
    if (r < m)
        fc_i8_panel_vnni512(m - r, pw, ldq, nq, bits, qa + (long)r * lq * (bits / 8), lq, w, cs,
                            sw, sa + r, add, c + (long)r * ldc, ldc);
}

/* ---- 256-bit paths (AVX-VNNI and AVX2), dequantizing in registers like fc_i8_kernel512 ----
 * Both end with int32 sums of 8 consecutive columns per ymm and share this last step, the float
 * steps of fc_i8_dequant_base. MODE: FC_I8_M8, 8-bit rows as bytes: t = (float)(acc - 128 cs);
 * FC_I8_MHL, 16-bit rows as hi and lo bytes: t = 256 (float)(acc_hi - 128 cs) + (float)acc_lo;
 * FC_I8_MW, rows as words q_i (AVX2 only, below): t = (float)acc, acc = sum q_i w_i, which is
 * acc - 128 cs of M8 and 256 (acc_hi - 128 cs) + acc_lo of MHL, exactly. */
#define FC_I8_M8 0
#define FC_I8_MHL 1
#define FC_I8_MW 2
FC_TARGET_V3 static inline __attribute__((always_inline)) void
fc_i8_dequant8(const int MODE, __m256i hi, __m256i lo, __m256i zc, __m256 swv, float s, int add,
               float *out)
{
    __m256 t = _mm256_cvtepi32_ps(MODE == FC_I8_MW ? hi : _mm256_sub_epi32(hi, zc));
    if (MODE == FC_I8_MHL) t = _mm256_fmadd_ps(t, _mm256_set1_ps(256.0f), _mm256_cvtepi32_ps(lo));
    __m256 pv = _mm256_mul_ps(swv, _mm256_set1_ps(s));
    __m256 y = add ? _mm256_fmadd_ps(t, pv, _mm256_loadu_ps(out)) : _mm256_mul_ps(t, pv);
    _mm256_storeu_ps(out, y);
}

/* AVX-VNNI: fc_i8_kernel512 in ymm registers: MB real rows, NB vectors of 8 columns (the
 * columns [o, o + 8 NB) of the panel), 16 registers. vpdpbusd in its VEX form ({vex}: the
 * assembler would otherwise pick the AVX-512 encoding), tied in asm as FC_DPBUSD512. */
#ifndef FC_I8_VEX
#define FC_I8_VEX "%{vex%} "   /* %{ %}: braces are special in asm templates */
#endif
#define FC_DPBUSD256(acc, x, w) __asm__(FC_I8_VEX "vpdpbusd %2, %1, %0" : "+x"(acc) : "x"(x), "x"(w))
FC_TARGET_AVXVNNI static inline __attribute__((always_inline)) void
fc_i8_kernel_avxvnni(const int MB, const int NB, const int SIXTEEN, int r, int o, int nq, int ldq,
                     const uint8_t *qa, long lq, const int8_t *w, const int32_t *cs,
                     const float *sw, const float *sa, int add, float *c, long ldc)
{
    const int V = SIXTEEN ? 2 * MB : MB;
    const int KS = V * NB < 8 ? 2 : 1;
    __m256i acc[2][4][4];
    FC_UNROLL for (int k = 0; k < KS; k++)
        FC_UNROLL for (int i = 0; i < V; i++)
            FC_UNROLL for (int b = 0; b < NB; b++) acc[k][i][b] = _mm256_setzero_si256();
    const int8_t *wq = w + o * 4;
    const uint8_t *x0 = qa + (long)r * (SIXTEEN ? 2 : 1) * lq;
    int q = 0;
    for (; q + KS <= nq; q += KS) {
        FC_UNROLL for (int k = 0; k < KS; k++, wq += ldq * 4) {
            __m256i wv[4];
            FC_UNROLL for (int b = 0; b < NB; b++)
                wv[b] = _mm256_loadu_si256((const __m256i *)(wq + b * 32));
            FC_UNROLL for (int i = 0; i < V; i++) {
                __m256i x = _mm256_set1_epi32(fc_i8_quad(x0 + (long)i * lq + 4 * (q + k)));
                FC_UNROLL for (int b = 0; b < NB; b++) FC_DPBUSD256(acc[k][i][b], x, wv[b]);
            }
        }
    }
    for (; q < nq; q++, wq += ldq * 4) {      /* KS = 2 and nq odd: the last quad */
        __m256i wv[4];
        FC_UNROLL for (int b = 0; b < NB; b++)
            wv[b] = _mm256_loadu_si256((const __m256i *)(wq + b * 32));
        FC_UNROLL for (int i = 0; i < V; i++) {
            __m256i x = _mm256_set1_epi32(fc_i8_quad(x0 + (long)i * lq + 4 * q));
            FC_UNROLL for (int b = 0; b < NB; b++) FC_DPBUSD256(acc[0][i][b], x, wv[b]);
        }
    }
    if (KS == 2)
        FC_UNROLL for (int i = 0; i < V; i++)
            FC_UNROLL for (int b = 0; b < NB; b++)
                acc[0][i][b] = _mm256_add_epi32(acc[0][i][b], acc[1][i][b]);
    FC_UNROLL for (int b = 0; b < NB; b++) {
        __m256i zc = _mm256_slli_epi32(_mm256_loadu_si256((const __m256i *)(cs + o + b * 8)), 7);
        __m256 swv = _mm256_loadu_ps(sw + o + b * 8);
        FC_UNROLL for (int i = 0; i < MB; i++) {
            int hi = SIXTEEN ? 2 * i : i;
            fc_i8_dequant8(SIXTEEN ? FC_I8_MHL : FC_I8_M8, acc[0][hi][b],
                           acc[0][SIXTEEN ? hi + 1 : hi][b], zc, swv, sa[r + i], add,
                           c + (long)(r + i) * ldc + o + b * 8);
        }
    }
}

#define FC_I8_KVNNI_NB(MB, SIXTEEN)                                                      \
    for (int o = 0; o < pw; o += 32) {                                                   \
        if (pw - o >= 32) fc_i8_kernel_avxvnni(MB, 4, SIXTEEN, r, o, nq, ldq, qa, lq, w, cs, sw, sa, add, c, ldc); \
        else fc_i8_kernel_avxvnni(MB, 2, SIXTEEN, r, o, nq, ldq, qa, lq, w, cs, sw, sa, add, c, ldc); \
    }

FC_TARGET_AVXVNNI static void fc_i8_panel_avxvnni(int m, int pw, int ldq, int nq, int bits,
                                                  const uint8_t *qa, long lq, const int8_t *w,
                                                  const int32_t *cs, const float *sw,
                                                  const float *sa, int add, float *c, long ldc)
{
    int r = 0;
    if (bits == 8) {
        for (; r + 2 <= m; r += 2) FC_I8_KVNNI_NB(2, 0)
        for (; r < m; r++) FC_I8_KVNNI_NB(1, 0)
    } else {
        for (; r < m; r++) FC_I8_KVNNI_NB(1, 1)
    }
}
FC_I8_QUANTIZE(FC_TARGET_AVXVNNI, fc_i8_quantize_avxvnni, 8, 0)

/* AVX2 without VNNI: weights widened to 16 bits (vpmovsxbw) and multiplied by vpmaddwd with
 * activations as 16-bit words, exact whatever the weights, -128 included (vpmaddubsw's pairs
 * would saturate: 2 x 255 x 128 > 32767; its sign trick wraps on -128 and costs the same
 * vpmaddwd after it). A 16-byte load is 4 columns x 4 rows; widened and multiplied by a row's
 * 4 words it gives 8 int32 lanes, two partial sums per column, added pairwise at the end.
 * Activations (fc_i8_quantize_avx2, WORDS): the quantized q_i themselves as int16, a row of k4
 * words, for 8-bit rows (t = (float)sum q_i w_i = (float)(acc - 128 cs), the same integer) and
 * for 16-bit rows of a segment of k4 <= FC_I8_MW_ROWS: one product where VNNI makes two (hi,
 * lo), and t = (float)sum q_i w_i has the bits of the other paths' 256 (float)(acc_hi - 128 cs)
 * + (float)acc_lo, which is the same integer rounded once (256 x is exact, FMA or not), as long
 * as acc_hi - 128 cs and acc_lo are exact in float, |.| <= 255 * 128 * k4 <= 2^24, and
 * sum q_i w_i fits int32, 32767 * 128 * k4 < 2^31: both hold for k4 <= 512. Longer 16-bit
 * segments keep the hi and lo rows as bytes (mode MHL: two rows widened on the fly).
 * MB real rows (V virtual ones), NG groups of 4 columns (the columns [o, o + 4 NG)); the
 * weights in registers for V > 2 (then MB = 6, NG = 2: 12 accumulators + 2 weight vectors),
 * else the rows. */
/* acc += v in place (asm for the reason of FC_DPBUSD512: GCC 12 copies and spills otherwise) */
#define FC_ADD32_256(acc, v) __asm__("vpaddd %1, %0, %0" : "+x"(acc) : "x"(v))
FC_TARGET_V3 static inline __attribute__((always_inline)) void
fc_i8_kernel_avx2(const int MB, const int NG, const int MODE, int r, int o, int nq, int ldq,
                  const uint8_t *qa, long lq, const int8_t *w, const int32_t *cs,
                  const float *sw, const float *sa, int add, float *c, long ldc)
{
    const int V = MODE == FC_I8_MHL ? 2 * MB : MB;
    const int WHELD = V > 2;
    __m256i acc[8][8];
    FC_UNROLL for (int i = 0; i < V; i++)
        FC_UNROLL for (int g = 0; g < NG; g++) acc[i][g] = _mm256_setzero_si256();
    const int8_t *wq = w + o * 4;
    /* virtual row i: bytes at x0 + i lq (M8: rows of lq bytes; MHL: hi, lo, hi, ...), or
     * words at x0 + 2 i lq (MW: rows of lq words) */
    const uint8_t *x0 = qa + (long)r * (MODE == FC_I8_M8 ? 1 : 2) * lq;
    for (int q = 0; q < nq; q++, wq += ldq * 4) {
        __m256i x[8], wv[8];
        FC_UNROLL for (int i = 0; i < V; i++) {
            if (MODE == FC_I8_MW) {
                int64_t v;
                memcpy(&v, x0 + 2 * (long)i * lq + 8 * q, 8);
                x[i] = _mm256_set1_epi64x(v);
            } else {
                float f;   /* a broadcast load (vbroadcastss), not a load, a move and a shuffle */
                memcpy(&f, x0 + (long)i * lq + 4 * q, 4);
                x[i] = _mm256_cvtepu8_epi16(_mm_castps_si128(_mm_set1_ps(f)));
            }
            if (WHELD) {   /* the weights in registers, a row at a time */
                if (i == 0)
                    FC_UNROLL for (int g = 0; g < NG; g++)
                        wv[g] = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(wq + g * 16)));
                FC_UNROLL for (int g = 0; g < NG; g++)
                    FC_ADD32_256(acc[i][g], _mm256_madd_epi16(x[i], wv[g]));
            }
        }
        if (!WHELD)        /* the rows in registers, a weight vector at a time */
            FC_UNROLL for (int g = 0; g < NG; g++) {
                __m256i w1 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(wq + g * 16)));
                FC_UNROLL for (int i = 0; i < V; i++)
                    FC_ADD32_256(acc[i][g], _mm256_madd_epi16(x[i], w1));
            }
    }
    /* lanes (column, half) -> per column: pairwise sums, then back in column order */
    FC_UNROLL for (int i = 0; i < V; i++)
        FC_UNROLL for (int h = 0; h < NG / 2; h++)
            acc[i][h] = _mm256_permute4x64_epi64(_mm256_hadd_epi32(acc[i][2 * h], acc[i][2 * h + 1]),
                                                 0xD8);
    FC_UNROLL for (int h = 0; h < NG / 2; h++) {
        __m256i zc = _mm256_slli_epi32(_mm256_loadu_si256((const __m256i *)(cs + o + h * 8)), 7);
        __m256 swv = _mm256_loadu_ps(sw + o + h * 8);
        FC_UNROLL for (int i = 0; i < MB; i++) {
            int hi = MODE == FC_I8_MHL ? 2 * i : i;
            fc_i8_dequant8(MODE, acc[hi][h], acc[MODE == FC_I8_MHL ? hi + 1 : hi][h], zc, swv,
                           sa[r + i], add, c + (long)(r + i) * ldc + o + h * 8);
        }
    }
}

/* One tile row: 4 NG columns at a time, NG = 2, 4 or 8 (then 16 columns at the end of a panel
 * of 16 odd: pw is a multiple of 16). */
#define FC_I8_KAVX2_NG(MB, NG, MODE)                                                     \
    for (int o = 0; o < pw; o += 4 * NG) {                                               \
        if (NG > 4 && pw - o < 4 * NG) {                                                 \
            fc_i8_kernel_avx2(MB, 4, MODE, r, o, nq, ldq, qa, lq, w, cs, sw, sa, add, c, ldc); \
            break;                                                                       \
        }                                                                                \
        fc_i8_kernel_avx2(MB, NG, MODE, r, o, nq, ldq, qa, lq, w, cs, sw, sa, add, c, ldc); \
    }

FC_TARGET_V3 static void fc_i8_panel_avx2(int m, int pw, int ldq, int nq, int bits,
                                          const uint8_t *qa, long lq, const int8_t *w,
                                          const int32_t *cs, const float *sw, const float *sa,
                                          int add, float *c, long ldc)
{
    int r = 0;
    if (bits == 8 || lq <= FC_I8_MW_ROWS) {
        for (; r + 6 <= m; r += 6) FC_I8_KAVX2_NG(6, 2, FC_I8_MW)
        for (; r + 2 <= m; r += 2) FC_I8_KAVX2_NG(2, 4, FC_I8_MW)
        for (; r < m; r++) FC_I8_KAVX2_NG(1, 8, FC_I8_MW)
    } else {
        for (; r < m; r++) FC_I8_KAVX2_NG(1, 4, FC_I8_MHL)
    }
}
FC_I8_QUANTIZE(FC_TARGET_V3, fc_i8_quantize_avx2, 8, 1)
#endif

typedef int (*fc_i8_quantize_fn)(int, int, int, int, const float *, long, uint8_t *, float *);
typedef void (*fc_i8_panel_fn)(int, int, int, int, int, const uint8_t *, long, const int8_t *,
                               const int32_t *, const float *, const float *, int, float *, long);

/* The int8 path's functions, for platform.h's table. */
static void fc_i8_pick(int path, fc_i8_quantize_fn *quantize, fc_i8_panel_fn *panel,
                       fc_i8_panel_fn *narrow)
{
    *quantize = fc_i8_quantize_base;
    *panel = *narrow = fc_i8_panel_base;
#ifdef FC_DISPATCH
    if (path > 0) *narrow = fc_i8_panel_narrow_fma;
    switch (path) {
    case 4: *panel = fc_i8_panel_amx; *quantize = fc_i8_quantize_vnni512; break;
    case 3: *panel = fc_i8_panel_vnni512; *quantize = fc_i8_quantize_vnni512; break;
    case 2: *panel = fc_i8_panel_avxvnni; *quantize = fc_i8_quantize_avxvnni; break;
    case 1: *panel = fc_i8_panel_avx2; *quantize = fc_i8_quantize_avx2; break;
    }
#else
    (void)path;
#endif
}

/* Scratch bytes a product of m rows needs (fc_i8_matmul's `work`): room for 2 bytes per
 * activation (the AVX2 path's words; the other paths use k4 of them per 8-bit row). */
static inline long fc_i8_work_bytes(const fc_i8_mat *w, long m)
{
    long bytes = 0;
    for (int s = 0; s < w->nseg; s++)
        bytes += (m * (long)sizeof(float) + 63) / 64 * 64 + m * (long)w->k4[s] * 2;   /* words */
    return bytes;
}


/* c[0:m, cols] (+)= a[0:m, segments] @ W[segments, cols] over the segments [s0, s1) of w (a's
 * first column is segment s0's first row), cols [b * S + c0, b * S + c1) for each of nblk
 * blocks; c0, c1 multiples of 16 (or 0 and n). a's rows are quantized once for every block.
 * backward: the panels in reverse order (the same bits). work: fc_i8_work_bytes(w, min(m,
 * FC_I8_MC)). */
static void fc_i8_matmul(int m, int s0, int s1, int nblk, int S, int c0, int c1, const float *a,
                         long lda, const fc_i8_mat *w, int beta, float *c, long ldc, int backward,
                         uint8_t *work)
{
    /* narrow: packed unpadded, the SIMD panels take whole vectors; the bytes of the baseline
     * quantizer are those of every level's */
    int narrow = w->n < FC_LANES;
    fc_i8_quantize_fn quantize = narrow ? fc_i8_quantize_base : fc_table.i8_quantize;
    fc_i8_panel_fn panel_fn = narrow ? fc_table.i8_panel_narrow : fc_table.i8_panel;
    int K4 = fc_i8_k4(w), n = w->n;
    for (int i0 = 0; i0 < m; i0 += FC_I8_MC) {
        int mb = m - i0 < FC_I8_MC ? m - i0 : FC_I8_MC;
        /* This block's rows of every segment, quantized once for all the panels. */
        uint8_t *q[2] = {NULL, NULL};
        float *sa[2] = {NULL, NULL};
        int bad[2] = {0, 0}, col[2] = {0, 0};
        uint8_t *p = work;
        for (int s = s0, x0 = 0; s < s1; x0 += w->rows[s], s++) {
            sa[s] = (float *)p;
            p += ((mb * sizeof(float)) + 63) / 64 * 64;
            q[s] = p;
            p += mb * (long)w->k4[s] * 2;
            col[s] = x0;
            bad[s] = quantize(mb, w->rows[s], w->k4[s], w->bits[s], a + (long)i0 * lda + x0,
                              lda, q[s], sa[s]);
        }
        for (int bi = 0; bi < nblk; bi++) {
            int b = backward ? nblk - 1 - bi : bi;
            int b0 = b * S + c0, b1 = b * S + c1;
            /* the panels that hold columns [b0, b1), each cut to them */
            int p0 = b0 / FC_I8_PW, p1 = (b1 + FC_I8_PW - 1) / FC_I8_PW, np = p1 - p0;
            for (int pi = 0; pi < np; pi++) {
                int o = (backward ? p1 - 1 - pi : p0 + pi) * FC_I8_PW;
                int pw = n - o < FC_I8_PW ? n - o : FC_I8_PW;
                int lo = b0 > o ? b0 : o, hi = b1 < o + pw ? b1 : o + pw;
                const int8_t *panel = w->wp + (long)o * K4 + (lo - o) * 4;
                for (int s = s0; s < s1; s++) {
                    int qoff = s == 0 ? 0 : w->k4[0] / 4;
                    const int8_t *wseg = panel + (long)qoff * pw * 4;
                    panel_fn(mb, hi - lo, pw, w->k4[s] / 4, w->bits[s], q[s], w->k4[s], wseg,
                             w->colsum[s] + lo, w->scale[s] + lo, sa[s], beta || s > s0,
                             c + (long)i0 * ldc + lo, ldc);
                }
            }
            for (int s = s0; s < s1; s++)
                if (bad[s])
                    fc_i8_nonfinite(mb, w->rows[s], a + (long)i0 * lda + col[s], lda, w, s,
                                    s == 0 ? 0 : w->k4[0], b0, b1, c + (long)i0 * ldc, ldc);
        }
    }
}

#endif

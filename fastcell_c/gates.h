/* The fused gate passes of gates_impl.h, instantiated for float and double at every x86 level of
 * dispatch.h, and one entry point per pass and type that calls the CPU's best. */
#ifndef FASTCELL_GATES_H
#define FASTCELL_GATES_H

#include <stddef.h>

#include "activations.h"
#include "dispatch.h"

#define FC_CAT_(a, b) a##b
#define FC_CAT(a, b) FC_CAT_(a, b)
#define FC_FN(x) FC_CAT(FC_CAT(fc_, x), FC_SUFFIX)

#define FC_ATTR
#define FC_T float
#define FC_SIG fc_sigmoid_f
#define FC_TANH fc_tanh_f
#define FC_SUFFIX _f_base
#include "gates_impl.h"
#undef FC_SUFFIX
#ifdef FC_DISPATCH
#undef FC_ATTR
#define FC_ATTR FC_TARGET_V3
#define FC_SUFFIX _f_v3
#include "gates_impl.h"
#undef FC_SUFFIX
#undef FC_ATTR
#define FC_ATTR FC_TARGET_V4
#define FC_SUFFIX _f_v4
#include "gates_impl.h"
#undef FC_SUFFIX
#undef FC_ATTR
#define FC_ATTR
#endif
#undef FC_T
#undef FC_SIG
#undef FC_TANH

#define FC_T double
#define FC_SIG fc_sigmoid_d
#define FC_TANH fc_tanh_d
#define FC_SUFFIX _d_base
#include "gates_impl.h"
#undef FC_SUFFIX
#ifdef FC_DISPATCH
#undef FC_ATTR
#define FC_ATTR FC_TARGET_V3
#define FC_SUFFIX _d_v3
#include "gates_impl.h"
#undef FC_SUFFIX
#undef FC_ATTR
#define FC_ATTR FC_TARGET_V4
#define FC_SUFFIX _d_v4
#include "gates_impl.h"
#undef FC_SUFFIX
#endif
#undef FC_T
#undef FC_SIG
#undef FC_TANH
#undef FC_ATTR

/* The entry points: fc_<pass>_f and fc_<pass>_d. */
#define FC_ENTRY(NAME, PARAMS, ARGS) \
    static inline void NAME PARAMS { FC_CALL_BEST(NAME, ARGS); }
#define FC_ENTRIES(T, S)                                                                       \
    FC_ENTRY(fc_rnn_tanh##S, (ptrdiff_t H, const T *g, const T *b, T *h), (H, g, b, h))        \
    FC_ENTRY(fc_rnn_relu##S, (ptrdiff_t H, const T *g, const T *b, T *h), (H, g, b, h))        \
    FC_ENTRY(fc_gru_reset_after##S, (ptrdiff_t H, ptrdiff_t Hp, const T *g, const T *r_h,      \
             const T *b, const T *b_hn, T *h), (H, Hp, g, r_h, b, b_hn, h))                    \
    FC_ENTRY(fc_gru_reset_before_gates##S, (ptrdiff_t H, ptrdiff_t Hp, T *g, const T *b,       \
             const T *h, T *rh), (H, Hp, g, b, h, rh))                                         \
    FC_ENTRY(fc_gru_reset_before_update##S, (ptrdiff_t H, ptrdiff_t Hp, const T *g,            \
             const T *b, T *h), (H, Hp, g, b, h))                                              \
    FC_ENTRY(fc_lstm_gates##S, (ptrdiff_t H, ptrdiff_t Hp, const T *g, const T *b, T *c,       \
             T *h), (H, Hp, g, b, c, h))                                                       \
    FC_ENTRY(fc_peephole_gates##S, (ptrdiff_t H, ptrdiff_t Hp, const T *g, const T *b,         \
             const T *p, T *c, T *h), (H, Hp, g, b, p, c, h))
FC_ENTRIES(float, _f)
FC_ENTRIES(double, _d)

#endif

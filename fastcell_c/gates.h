/* The fused gate passes of gates_impl.h, instantiated for float and double at every x86 level of
 * cpu.h; platform.h's table holds the CPU's best of each. */
#ifndef FASTCELL_GATES_H
#define FASTCELL_GATES_H

#include <stddef.h>

#include "activations.h"
#include "cpu.h"

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

#endif

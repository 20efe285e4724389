/* Run-time choice of x86 level for the hand-vectorized kernels (matmul.h, gates.h): each is
 * compiled once per level and the CPU's best is called, so the default build stays portable. */
#ifndef FASTCELL_DISPATCH_H
#define FASTCELL_DISPATCH_H

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && !defined(FASTCELL_NO_DISPATCH)
#include <stdlib.h>
#include <string.h>

#define FC_DISPATCH 1
#define FC_TARGET_V3 __attribute__((target("arch=x86-64-v3")))   /* AVX2 + FMA */
#define FC_TARGET_V4 __attribute__((target("arch=x86-64-v4")))   /* AVX-512 */

/* 4: AVX-512, 3: AVX2 + FMA, 1: baseline. Read once: __builtin_cpu_supports is cheap, not free.
 * FASTCELL_ISA=base|v3|v4 in the environment caps it, so that one machine can run (and the tests
 * compare) every level its CPU supports. */
static int fc_x86_level(void)
{
    static int level = 0;
    if (level == 0) {
        __builtin_cpu_init();
        int best = __builtin_cpu_supports("x86-64-v4") ? 4 : __builtin_cpu_supports("x86-64-v3") ? 3 : 1;
        const char *cap = getenv("FASTCELL_ISA");
        if (cap != NULL) {
            int c = strcmp(cap, "base") == 0 ? 1 : strcmp(cap, "v3") == 0 ? 3 : 4;
            best = c < best ? c : best;
        }
        level = best;
    }
    return level;
}

/* Calls NAME_v4, NAME_v3 or NAME_base with ARGS. */
#define FC_CALL_BEST(NAME, ARGS)                                                     \
    do {                                                                             \
        int fc_level_ = fc_x86_level();                                              \
        if (fc_level_ == 4) NAME##_v4 ARGS;                                          \
        else if (fc_level_ == 3) NAME##_v3 ARGS;                                     \
        else NAME##_base ARGS;                                                       \
    } while (0)
#else
#define FC_CALL_BEST(NAME, ARGS) NAME##_base ARGS
static int fc_x86_level(void) { return 1; }
#endif

#endif

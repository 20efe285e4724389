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

/* The FASTCELL_ISA setting: a level (base, v3, v4) that caps the CPU's, then optional ",novnni"
 * (no VNNI dot products: the int8 products widen instead, matmul_int8.h). An unknown word is
 * ignored (the level stays the CPU's best). So one machine can run, and the tests compare, every
 * path its CPU supports. */
static int fc_isa_cap(void)
{
    const char *cap = getenv("FASTCELL_ISA");
    if (cap == NULL) return 4;
    if (strncmp(cap, "base", 4) == 0) return 1;
    if (strncmp(cap, "v3", 2) == 0) return 3;
    return 4;
}

/* 4: AVX-512, 3: AVX2 + FMA, 1: baseline. Read once: __builtin_cpu_supports is cheap, not free. */
static int fc_x86_level(void)
{
    static int level = 0;
    if (level == 0) {
        __builtin_cpu_init();
        int best = __builtin_cpu_supports("x86-64-v4") ? 4 : __builtin_cpu_supports("x86-64-v3") ? 3 : 1;
        int c = fc_isa_cap();
        level = c < best ? c : best;
    }
    return level;
}

/* The int8 products' path: 3: AVX-512 VNNI (512-bit vpdpbusd), 2: AVX-VNNI (256-bit),
 * 1: AVX2 (vpmaddwd on widened bytes), 0: baseline C. All give the same integer sums. */
static int fc_int8_path(void)
{
    static int path = -1;
    if (path < 0) {
        const char *isa = getenv("FASTCELL_ISA");
        int vnni = isa == NULL || strstr(isa, "novnni") == NULL;
        int level = fc_x86_level();
        path = level >= 4 && vnni && __builtin_cpu_supports("avx512vnni") ? 3
             : level >= 3 && vnni && __builtin_cpu_supports("avxvnni") ? 2
             : level >= 3 ? 1 : 0;
    }
    return path;
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
static int fc_int8_path(void) { return 0; }
#endif

#endif

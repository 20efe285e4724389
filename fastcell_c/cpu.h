/* Which x86 level the hand-vectorized kernels run at. Each kernel is compiled once per level
 * (products.h, products_int8.h, gates.h) and platform.h's table holds the CPU's best, so the
 * default build stays portable. */
#ifndef FASTCELL_CPU_H
#define FASTCELL_CPU_H

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && !defined(FASTCELL_NO_DISPATCH)
#include <stdlib.h>
#include <string.h>

#define FC_DISPATCH 1
#define FC_TARGET_V3 __attribute__((target("arch=x86-64-v3")))   /* AVX2 + FMA */
#define FC_TARGET_V4 __attribute__((target("arch=x86-64-v4")))   /* AVX-512 */

/* The FASTCELL_ISA setting: a level (base, v3, v4) that caps the CPU's, then optional ",novnni"
 * (no VNNI dot products: the int8 products widen instead, products_int8.h) or ",noamx" (no AMX
 * tiles: VNNI only). An unknown word is
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

/* 4: AVX-512, 3: AVX2 + FMA, 1: baseline. */
static int fc_cpu_level(void)
{
    __builtin_cpu_init();
    int best = __builtin_cpu_supports("x86-64-v4") ? 4 : __builtin_cpu_supports("x86-64-v3") ? 3 : 1;
    int c = fc_isa_cap();
    return c < best ? c : best;
}

/* Whether this CPU has AMX tiles with int8 dot products and the OS lets this process use them
 * (Linux asks each process to request the tile data state once: arch_prctl ARCH_REQ_XCOMP_PERM). */
#include <cpuid.h>
#include <sys/syscall.h>
#include <unistd.h>
static int fc_cpu_amx_int8(void)
{
    unsigned a, b, c, d;
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return 0;
    if (!(d & (1u << 24)) || !(d & (1u << 25))) return 0;          /* AMX-TILE, AMX-INT8 */
    if (!__get_cpuid(1, &a, &b, &c, &d) || !(c & (1u << 27))) return 0;   /* OSXSAVE */
#ifdef SYS_arch_prctl
    if (syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XTILEDATA */) != 0)
        return 0;
#else
    return 0;
#endif
    unsigned lo, hi;
    __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
    return (lo & (3u << 17)) == (3u << 17);                         /* XCR0: TILECFG, TILEDATA */
}

/* The int8 products' path at a level: 4: AMX tiles for blocks of 16 rows of 8-bit activations,
 * AVX-512 VNNI for the rest; 3: AVX-512 VNNI (512-bit vpdpbusd), 2: AVX-VNNI (256-bit), 1: AVX2
 * (vpmaddwd on widened bytes), 0: baseline C. All give the same integer sums. FASTCELL_ISA's
 * ",noamx" keeps level 4 at VNNI (path 3). */
static int fc_cpu_int8_path(int level)
{
    const char *isa = getenv("FASTCELL_ISA");
    int vnni = isa == NULL || strstr(isa, "novnni") == NULL;
    int amx = isa == NULL || strstr(isa, "noamx") == NULL;
    return level >= 4 && vnni && __builtin_cpu_supports("avx512vnni") ? (amx && fc_cpu_amx_int8() ? 4 : 3)
         : level >= 3 && vnni && __builtin_cpu_supports("avxvnni") ? 2
         : level >= 3 ? 1 : 0;
}
#else
static int fc_cpu_level(void) { return 1; }
static int fc_cpu_int8_path(int level) { (void)level; return 0; }
#endif

#endif

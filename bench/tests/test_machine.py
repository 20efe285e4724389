"""The benchmark's machine line names Intel and AMD CPUs correctly (bench/machine.py): both
vendors' /proc/cpuinfo, as each really writes it."""

from bench import machine

# A 2-vCPU AMD EPYC (Zen 4) cloud guest, first processor (flags shortened to the SIMD ones and
# their neighbours; AMD lists no avx_vnni, and says "TLB size" and "power management" its way).
AMD_ZEN4 = """processor	: 0
vendor_id	: AuthenticAMD
cpu family	: 25
model		: 17
model name	: AMD EPYC 9R14 96-Core Processor
stepping	: 1
microcode	: 0xa10113e
cpu MHz		: 2600.000
cache size	: 1024 KB
flags		: fpu vme de pse tsc msr pae mce cx8 sse sse2 ht syscall nx mmxext fxsr_opt pdpe1gb rdtscp lm constant_tsc rep_good nopl nonstop_tsc cpuid extd_apicid aperfmperf tsc_known_freq pni pclmulqdq ssse3 fma cx16 pcid sse4_1 sse4_2 x2apic movbe popcnt aes xsave avx f16c rdrand hypervisor lahf_lm cmp_legacy cr8_legacy abm sse4a misalignsse 3dnowprefetch topoext perfctr_core invpcid_single ssbd ibrs ibpb stibp vmmcall fsgsbase bmi1 avx2 smep bmi2 invpcid avx512f avx512dq rdseed adx smap avx512ifma clflushopt clwb avx512cd sha_ni avx512bw avx512vl xsaveopt xsavec xgetbv1 xsaves avx512_bf16 clzero xsaveerptr rdpru wbnoinvd arat avx512vbmi pku ospke avx512_vbmi2 gfni vaes vpclmulqdq avx512_vnni avx512_bitalg avx512_vpopcntdq rdpid fsrm
bugs		: sysret_ss_attrs spectre_v1 spectre_v2 spec_store_bypass srso
bogomips	: 5200.00
TLB size	: 3584 4K pages
clflush size	: 64
cache_alignment	: 64
address sizes	: 48 bits physical, 48 bits virtual
power management:

processor	: 1
vendor_id	: AuthenticAMD
model name	: not the first processor
"""

# A 2-vCPU Intel Xeon (Sapphire Rapids) KVM guest: the name says only "Intel(R) Xeon(R) Processor".
INTEL_SPR = """processor	: 0
vendor_id	: GenuineIntel
cpu family	: 6
model		: 143
model name	: Intel(R) Xeon(R) Processor
stepping	: 8
flags		: fpu sse sse2 ssse3 fma sse4_1 sse4_2 avx f16c avx2 avx512f avx512dq avx512cd avx512bw avx512vl avx_vnni avx512_bf16 avx512vbmi avx512_vnni amx_bf16 avx512_fp16 amx_tile amx_int8
power management:
"""

# An older CPU without AVX at all, and a file with nothing we know.
OLD = "processor : 0\nvendor_id : GenuineIntel\ncpu family : 6\nmodel : 15\nmodel name : Intel(R) Core(TM)2 CPU\nflags : fpu sse sse2 ssse3\n"


def test_amd_zen4_is_named_amd_with_its_own_flags():
    info = machine.parse_cpuinfo(AMD_ZEN4)
    assert info["vendor"] == "AMD" and info["family"] == 25 and info["model"] == 17
    assert machine.describe(info) == "AMD EPYC 9R14 96-Core Processor (AMD family 0x19 model 0x11)"
    assert machine.simd_flags(info) == ["avx2", "fma", "avx512f", "avx512bw", "avx512vl",
                                        "avx512_vnni", "avx512_bf16"]   # no AVX-VNNI, no AMX


def test_intel_is_named_intel():
    info = machine.parse_cpuinfo(INTEL_SPR)
    assert machine.describe(info) == "Intel(R) Xeon(R) Processor (Intel family 0x6 model 0x8f)"
    assert machine.simd_flags(info) == ["avx2", "fma", "avx512f", "avx512bw", "avx512vl",
                                        "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_tile"]


def test_old_and_unknown_cpus():
    assert machine.simd_flags(machine.parse_cpuinfo(OLD)) == []
    empty = machine.parse_cpuinfo("")
    assert machine.describe(empty) == "unknown CPU (unknown vendor)" and machine.simd_flags(empty) == []
    odd = machine.parse_cpuinfo("vendor_id : SomeVendorId\nmodel name : X\n")
    assert machine.describe(odd) == "X (SomeVendorId)"


def test_this_machine_is_described():
    info = machine.read_cpuinfo()
    assert machine.describe(info)  # never raises, whatever the CPU (or no /proc/cpuinfo)
    assert machine.read_cpuinfo("/nonexistent/cpuinfo")["flags"] == set()

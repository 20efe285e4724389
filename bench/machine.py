"""The machine line of bench/RESULTS.md: which CPU ran the benchmark, read from /proc/cpuinfo.

Intel and AMD both fill /proc/cpuinfo's "vendor_id", "model name", "cpu family", "model" and
"flags", but their names say different things (a KVM guest on Intel often reports only
"Intel(R) Xeon(R) Processor"; AMD's name carries the part number), and the SIMD extensions that
matter to fastcell differ between them (Zen 4 has AVX-512 with VNNI and BF16 but not AVX-VNNI).
So the line names the vendor, the family and model numbers, and the flags one by one, and never
infers one vendor's features from the other's.
"""

from pathlib import Path

VENDORS = {"GenuineIntel": "Intel", "AuthenticAMD": "AMD", "HygonGenuine": "Hygon"}

# The flags that decide which of fastcell's kernels run (cpu.h), in /proc/cpuinfo's spelling.
SIMD_FLAGS = ("avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx_vnni",
              "avx512_bf16", "amx_tile")


def parse_cpuinfo(text):
    """{vendor, name, family, model, flags} of the first processor in a /proc/cpuinfo text;
    missing fields are None (flags: an empty set)."""
    fields = {}
    for line in text.splitlines():
        if not line.strip():
            if fields:
                break           # the end of the first processor's block
            continue
        key, sep, value = line.partition(":")
        if sep:
            fields.setdefault(key.strip(), value.strip())
    vendor_id = fields.get("vendor_id")

    def number(key):
        v = fields.get(key)
        return int(v) if v is not None and v.isdigit() else None

    return {"vendor": VENDORS.get(vendor_id, vendor_id), "name": fields.get("model name"),
            "family": number("cpu family"), "model": number("model"),
            "flags": set(fields.get("flags", "").split())}


def describe(info):
    """'AMD EPYC 9R14 96-Core Processor (AMD family 0x19 model 0x11)': the name as the CPU
    gives it, then the vendor and the numbers that identify its microarchitecture."""
    name = info["name"] or "unknown CPU"
    ids = [info["vendor"] or "unknown vendor"]
    if info["family"] is not None:
        ids.append(f"family {info['family']:#x}")
    if info["model"] is not None:
        ids.append(f"model {info['model']:#x}")
    return f"{name} ({' '.join(ids)})"


def simd_flags(info):
    return [f for f in SIMD_FLAGS if f in info["flags"]]


def read_cpuinfo(path="/proc/cpuinfo"):
    """parse_cpuinfo of this machine, or an all-unknown record where there is no such file."""
    try:
        return parse_cpuinfo(Path(path).read_text())
    except OSError:
        return parse_cpuinfo("")

"""The machine of bench/RESULTS.md (machine_info: the CPU, the cores, the BLAS and the versions
of every library timed), and which CPU that is, read from /proc/cpuinfo.

Intel and AMD both fill /proc/cpuinfo's "vendor_id", "model name", "cpu family", "model" and
"flags", but their names say different things (a KVM guest on Intel often reports only
"Intel(R) Xeon(R) Processor"; AMD's name carries the part number), and the SIMD extensions that
matter to fastcell differ between them (Zen 4 has AVX-512 with VNNI and BF16 but not AVX-VNNI).
So the line names the vendor, the family and model numbers, and the flags one by one, and never
infers one vendor's features from the other's.
"""

import os
import platform
from pathlib import Path

import numpy as np
import scipy

import fastcell
from bench.models import optional_import
from fastcell_c.platform import simd_level

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


def machine_info():
    """{cpu, simd, cores, usable_cores, versions, blas, os, load} of this machine and process; load
    is the load average now (the report calls it at the end of a run)."""
    from threadpoolctl import threadpool_info

    cpu = read_cpuinfo()
    simd = simd_flags(cpu) + [f"fastcell kernels: {simd_level()}"]
    versions = {"python": platform.python_version(), "fastcell": fastcell.__version__,
                "numpy": np.__version__, "scipy": scipy.__version__}
    for name in ("torch", "onnxruntime", "onnx", "threadpoolctl"):
        mod = optional_import(name)
        versions[name] = getattr(mod, "__version__", "not installed") if mod else "not installed"
    blas = []
    for lib in threadpool_info():
        if lib.get("user_api") != "blas":
            continue
        path = lib.get("filepath", "")
        owner = next((p for p in ("scipy", "numpy", "torch") if f"/{p}" in path), "?")
        blas.append(f"{lib.get('internal_api')} {lib.get('version')} "
                    f"({lib.get('architecture', '?')} kernels, from {owner}: {os.path.basename(path)})")
    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:
        affinity = os.cpu_count()
    try:
        load = "%.2f %.2f %.2f" % os.getloadavg()
    except OSError:
        load = "?"
    return {"cpu": describe(cpu), "simd": simd, "cores": os.cpu_count(), "usable_cores": affinity,
            "versions": versions, "blas": blas, "os": platform.platform(), "load": load}

"""A node's CPU as /proc/cpuinfo describes it: the features llama.cpp's kernels (and its crashes) depend on."""

from __future__ import annotations

from pathlib import Path

CPUINFO = "/proc/cpuinfo"
# The flags that decide which llama.cpp kernels run, in the order a report names them, with the names
# llama.cpp's own system info uses.
NOTABLE = (("avx2", "AVX2"), ("avx512f", "AVX512"), ("avx512_vnni", "AVX512_VNNI"), ("avx512_bf16", "AVX512_BF16"),
           ("amx_int8", "AMX_INT8"), ("amx_bf16", "AMX_BF16"), ("asimd", "NEON"), ("sve", "SVE"), ("i8mm", "I8MM"))


def cpu_flags(cpuinfo: str | None = None) -> frozenset[str]:
    """The CPU's feature flags: x86's `flags` line or ARM's `Features` line of the first processor in
    `cpuinfo` (the text of /proc/cpuinfo; read from this machine when None). Empty where there is no
    /proc/cpuinfo (macOS): no x86 feature is then assumed."""
    if cpuinfo is None:
        try:
            cpuinfo = Path(CPUINFO).read_text(errors="replace")
        except OSError:
            return frozenset()
    for line in cpuinfo.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip().lower() in ("flags", "features"):
            return frozenset(value.split())
    return frozenset()


def has_amx(flags: frozenset[str]) -> bool:
    """Intel AMX (Sapphire Rapids and later): the kernel lists amx_tile with amx_int8 and/or amx_bf16."""
    return bool(flags & {"amx_int8", "amx_tile", "amx_bf16"})


def describe_cpu(flags: frozenset[str]) -> str:
    """The notable features, as a crash report names them: `AVX2 AVX512 AMX_INT8`; `unknown` without flags."""
    names = [name for flag, name in NOTABLE if flag in flags]
    return " ".join(names) if names else ("no AVX2" if flags else "unknown")

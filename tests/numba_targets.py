"""numba compile targets for the tests that compare floats, or check a kernel, across CPUs.

`NUMBA_CPU_NAME` alone changes only the CPU model numba tunes for: it keeps the host's feature
list, so a "haswell" process on an AVX-512 machine compiled AVX-512 code, and the tests that
meant to cover AVX2 and SSE2 compiled the host's code three times (found in stop 33: the
assembly of every target had zmm registers). The name goes with a feature list here.
"""

from __future__ import annotations

# AVX2 + FMA, without AVX-512: Intel's Haswell and what followed it on desktops, AMD's Zen 1–3
HASWELL = ("+64bit,+avx,+avx2,+bmi,+bmi2,+cmov,+cx16,+f16c,+fma,+fsgsbase,+lzcnt,+movbe,+pclmul,+popcnt,"
           "+sse,+sse2,+sse3,+sse4.1,+sse4.2,+ssse3,+xsave")
FEATURES = {"x86-64": "", "haswell": HASWELL}  # "": the name's own baseline (SSE2 for x86-64)


def runs_here(cpu: str | None) -> bool:
    """Whether this machine can run code compiled for `cpu` (None: its own)."""
    if cpu is None or not FEATURES[cpu]:
        return True
    from llvmlite import binding

    host = binding.get_host_cpu_features()
    return all(host.get(name[1:], False) for name in FEATURES[cpu].split(",") if name != "+64bit")


def target_env(env: dict[str, str], cpu: str | None) -> dict[str, str]:
    """`env` compiling numba's kernels for `cpu` (None: this machine's own CPU and features)."""
    env = {k: v for k, v in env.items() if k not in ("NUMBA_CPU_NAME", "NUMBA_CPU_FEATURES")}
    if cpu is not None:
        env["NUMBA_CPU_NAME"], env["NUMBA_CPU_FEATURES"] = cpu, FEATURES[cpu]
    return env

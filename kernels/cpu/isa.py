"""The instruction-set features Numba compiles the kernels for.

Numba targets the host CPU unless ``NUMBA_CPU_NAME`` and ``NUMBA_CPU_FEATURES`` name another (to build
a cache for other machines, or to try a laptop's AVX2-only code on a bigger CPU). The kernels choose
their instructions from the same features, so code that needs AVX-512 is never asked of a target
without it. ``NUMBA_CPU_FEATURES`` is LLVM's list (``+avx2,+fma,-avx512f,...``); with only
``NUMBA_CPU_NAME`` set, the features are not known here and only the portable kernels run.
"""
from __future__ import annotations

import functools

import llvmlite.binding as llvm
from llvmlite import ir
from numba.core import cgutils, config


def parse_features(text: str) -> dict[str, bool]:
    """LLVM's ``+name,-name`` feature list as a dict."""
    out: dict[str, bool] = {}
    for item in text.split(","):
        item = item.strip()
        if item[:1] in "+-" and len(item) > 1:
            out[item[1:]] = item[0] == "+"
    return out


@functools.cache
def features() -> dict[str, bool]:
    """The features Numba compiles for: ``NUMBA_CPU_FEATURES`` if set, none when only ``NUMBA_CPU_NAME``
    names another CPU, else the host's."""
    if config.CPU_FEATURES is not None:
        return parse_features(config.CPU_FEATURES)
    if config.CPU_NAME is not None and config.CPU_NAME != llvm.get_host_cpu_name():
        return {}
    return {name: bool(on) for name, on in llvm.get_host_cpu_features().items()}


def has(*names: str) -> bool:
    """Whether the compile target has every one of ``names`` (LLVM's spelling: ``avx512vnni``)."""
    f = features()
    return all(f.get(n, False) for n in names)


def dot_i16_pairs(builder, acc, w, x):
    """For intrinsics' codegen: ``acc + pairwise(w * x)`` on ``<16 x i32>`` values that each hold 16
    pairs of int16: ``vpdpwssd`` where the target has AVX512-VNNI, else two AVX2 ``vpmaddwd`` on the
    halves (one add each). The sums are exact int32 either way: the same numbers."""
    i16, i32 = ir.IntType(16), ir.IntType(32)
    v16i = ir.VectorType(i32, 16)
    if has("avx512vnni", "avx512bw"):
        dp = cgutils.get_or_insert_function(builder.module, ir.FunctionType(v16i, [v16i, v16i, v16i]),
                                            "llvm.x86.avx512.vpdpwssd.512")
        return builder.call(dp, [acc, w, x])
    v8i, v16s, v32s = ir.VectorType(i32, 8), ir.VectorType(i16, 16), ir.VectorType(i16, 32)
    madd = cgutils.get_or_insert_function(builder.module, ir.FunctionType(v8i, [v16s, v16s]),
                                          "llvm.x86.avx2.pmadd.wd")
    ws, xs = builder.bitcast(w, v32s), builder.bitcast(x, v32s)

    def half(v, h):
        return builder.shuffle_vector(v, v, ir.Constant(ir.VectorType(i32, 16), list(range(16 * h, 16 * h + 16))))

    lo, hi = (builder.call(madd, [half(ws, h), half(xs, h)]) for h in range(2))
    return builder.add(acc, builder.shuffle_vector(lo, hi, ir.Constant(ir.VectorType(i32, 16), list(range(16)))))


def int16_dots() -> str | None:
    """The int16 dot products ``dot_i16_pairs`` compiles to: ``"avx512"`` (AVX512-VNNI), ``"avx2"``, or
    None (neither: the kernels built on it do not compile)."""
    if has("avx512vnni", "avx512bw"):
        return "avx512"
    return "avx2" if has("avx2") else None

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
    """For intrinsics' codegen: ``acc + pairwise(w * x)``, ``acc`` ``<8 x i32>`` or ``<16 x i32>`` and
    ``w``, ``x`` vectors of as many bits holding int16 pairs: ``vpdpwssd`` for 16 lanes where the target
    has AVX512-VNNI, else AVX2 ``vpmaddwd`` on each 8-lane half (one add each). The sums are exact
    int32 either way: the same numbers."""
    i16, i32 = ir.IntType(16), ir.IntType(32)
    lanes = acc.type.count
    if lanes == 16 and has("avx512vnni", "avx512bw"):
        v16i = ir.VectorType(i32, 16)
        dp = cgutils.get_or_insert_function(builder.module, ir.FunctionType(v16i, [v16i, v16i, v16i]),
                                            "llvm.x86.avx512.vpdpwssd.512")
        return builder.call(dp, [acc, *(v if v.type == v16i else builder.bitcast(v, v16i) for v in (w, x))])
    v8i, v16s, vs = ir.VectorType(i32, 8), ir.VectorType(i16, 16), ir.VectorType(i16, 2 * lanes)
    madd = cgutils.get_or_insert_function(builder.module, ir.FunctionType(v8i, [v16s, v16s]),
                                          "llvm.x86.avx2.pmadd.wd")
    ws, xs = builder.bitcast(w, vs), builder.bitcast(x, vs)

    def half(v, h):
        return builder.shuffle_vector(v, v, ir.Constant(ir.VectorType(i32, 16), list(range(16 * h, 16 * h + 16))))

    sums = [builder.call(madd, [half(ws, h), half(xs, h)]) for h in range(lanes // 8)]
    if len(sums) == 2:
        sums = [builder.shuffle_vector(*sums, ir.Constant(ir.VectorType(i32, 16), list(range(16))))]
    return builder.add(acc, sums[0])


def int16_dots() -> str | None:
    """The int16 dot products ``dot_i16_pairs`` compiles to: ``"avx512"`` (AVX512-VNNI), ``"avx2"``, or
    None (neither: the kernels built on it do not compile)."""
    if has("avx512vnni", "avx512bw"):
        return "avx512"
    return "avx2" if has("avx2") else None

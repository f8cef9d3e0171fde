"""Builds the native kernels (src/kernels/*.cpp) with the package; everything else is in pyproject.toml.

The kernels are one extension, compiled without -march flags: each ISA file enables its own
instructions with `#pragma GCC target`, and the module picks the best one the CPU has at import
(see qk.cpp). The quantizer (quantize.cpp, for synthetic models) is a second, scalar one, built
without fused multiply-adds so that its bytes equal the numpy reference's on any machine.
"""

from setuptools import Extension, setup

KERNELS = "src/kernels/"

setup(
    ext_modules=[
        Extension(
            "pipeserve.kernels._qk",
            sources=[
                KERNELS + f
                for f in (
                    *("qk.cpp", "qk_avx2.cpp", "qk_avx512.cpp", "qk_generic.cpp"),
                    *("qk_q8.cpp", "qk_q8_avx2.cpp", "qk_q8_avx512.cpp"),  # the opt-in int8 mode
                )
            ],
            depends=[KERNELS + f for f in ("qk_types.h", "qk_pool.h", "qk_simd.h", "qk_lanes256.h", "qk_q8.h", "qk_q8_simd.h", "qk_q8_rows8.h", "qk_q8_rows.h")],
            extra_compile_args=["-O3", "-std=c++17", "-fno-math-errno", "-Wno-uninitialized", "-Wno-maybe-uninitialized"],
            language="c++",
        ),
        Extension(
            "pipeserve.kernels._qk_quant",
            sources=[KERNELS + "quantize.cpp"],
            depends=[KERNELS + "qk_types.h"],
            extra_compile_args=["-O2", "-std=c++17", "-ffp-contract=off"],
            language="c++",
        ),
    ]
)

"""Builds gxpo_kernels._C (csrc/) when torch is importable at build time.

Install with `pip install --no-build-isolation -e .` so the build sees the environment's torch
(the Makefile does). The C++ (OpenMP) flat ops are always built; the CUDA ones (csrc/flat_ops_cuda.cu)
too when torch has CUDA and a CUDA toolkit is found (GXPO_NO_CUDA_EXT=1 skips them). Without torch,
or with GXPO_NO_EXT=1, the package is pure Python and the CPU path falls back to torch ops.
"""

import importlib.util
import os
from pathlib import Path

from setuptools import setup

HERE = Path(__file__).parent


def write_extrapolation_header():
    """csrc/extrapolation.h from gxpo_kernels/extrapolation.py, the constants' one home (loaded by path:
    the package's __init__ needs torch and triton)."""
    spec = importlib.util.spec_from_file_location("extrapolation", HERE / "gxpo_kernels" / "extrapolation.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    header = HERE / "csrc" / "extrapolation.h"
    if not header.exists() or header.read_text() != module.c_header():
        header.write_text(module.c_header())


def extensions():
    if os.environ.get("GXPO_NO_EXT") == "1":
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
    except ImportError:
        return [], {}
    # no FP traps lets the branch-free loops vectorize; reassociation lets the sums vectorize (NaN and inf
    # keep their IEEE meaning: no -ffinite-math-only)
    cxx = ["-O3", "-fopenmp", "-fno-trapping-math", "-fno-signed-zeros", "-fassociative-math"]
    cmdclass = {"build_ext": BuildExtension.with_options(use_ninja=False)}
    if torch.version.cuda and CUDA_HOME and os.environ.get("GXPO_NO_CUDA_EXT") != "1":
        ext = CUDAExtension("gxpo_kernels._C", ["csrc/flat_ops.cpp", "csrc/flat_ops_cuda.cu"],
                            define_macros=[("WITH_CUDA", None)], extra_link_args=["-fopenmp"],
                            extra_compile_args={"cxx": cxx, "nvcc": ["-O3"]})
    else:
        ext = CppExtension("gxpo_kernels._C", ["csrc/flat_ops.cpp"], extra_compile_args=cxx,
                           extra_link_args=["-fopenmp"])
    return [ext], cmdclass


write_extrapolation_header()
ext_modules, cmdclass = extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)

"""Builds gxpo_kernels.optim.flat._C (gxpo_kernels/optim/flat/csrc/) when torch is importable at build time.

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
FLAT = Path("gxpo_kernels") / "optim" / "flat"  # the update rules' flat-buffer ops, csrc/ within
CSRC = FLAT / "csrc"
EXTENSION = "gxpo_kernels.optim.flat._C"


def write_extrapolation_header():
    """csrc/extrapolation.h from extrapolation.py beside it, the constants' one home (loaded by path:
    the package's __init__ needs torch and triton)."""
    spec = importlib.util.spec_from_file_location("extrapolation", HERE / FLAT / "extrapolation.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    header = HERE / CSRC / "extrapolation.h"
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
        ext = CUDAExtension(EXTENSION, [str(CSRC / "flat_ops.cpp"), str(CSRC / "flat_ops_cuda.cu")],
                            define_macros=[("WITH_CUDA", None)], extra_link_args=["-fopenmp"],
                            extra_compile_args={"cxx": cxx, "nvcc": ["-O3"]})
    else:
        ext = CppExtension(EXTENSION, [str(CSRC / "flat_ops.cpp")], extra_compile_args=cxx,
                           extra_link_args=["-fopenmp"])
    return [ext], cmdclass


write_extrapolation_header()
ext_modules, cmdclass = extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)

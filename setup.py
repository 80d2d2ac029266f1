"""Builds gxpo_kernels._C (csrc/, C++ with OpenMP) when torch is importable at build time.

Install with `pip install --no-build-isolation -e .` so the build sees the environment's torch
(the Makefile does). Without torch, or if the build fails, the package is pure Python and the CPU
path falls back to torch ops.
"""

import os

from setuptools import setup

ext_modules, cmdclass = [], {}
if os.environ.get("GXPO_NO_EXT") != "1":
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension

        ext_modules = [CppExtension("gxpo_kernels._C", ["csrc/flat_ops.cpp"],
                                    extra_compile_args=["-O3", "-fopenmp"], extra_link_args=["-fopenmp"])]
        cmdclass = {"build_ext": BuildExtension.with_options(use_ninja=False)}
    except ImportError:
        pass

setup(ext_modules=ext_modules, cmdclass=cmdclass)

from setuptools import setup

# Compiled extensions (gxpo_kernels._C from csrc/) are added here by the update-rule work;
# until then the package is pure Python.
setup()

"""The package is described in pyproject.toml; this file only adds aligna's one C extension,
`aligna._kernels` (`aligna/kernels.py`). It is optional: where it cannot be compiled, aligna
installs without it and computes the same with torch's operators."""

from setuptools import Extension, setup

setup(ext_modules=[Extension("aligna._kernels", ["aligna/_kernels.c"], extra_compile_args=["-O2"], optional=True)])

"""Packaging: the Python packages, and the CUDA C++ extension when nvcc is found (see csrc/README.md).

``python/`` installs as ``lpa_programs`` (training programs) and ``benchmarks/`` as ``lpa_bench``.
"""

from setuptools import find_packages, setup

packages = find_packages(include=["lpa_kernels", "lpa_kernels.*"]) + ["lpa_programs", "lpa_bench"]

setup(
    packages=packages,
    package_dir={"lpa_programs": "python", "lpa_bench": "benchmarks"},
)

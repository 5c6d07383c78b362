"""head_pgd: reference (naive.py), Triton kernels (triton_kernels.py), the PGD loop both fast backends
share (loop.py), public op and custom ops (op.py); the CUDA C++ kernel is csrc/head_pgd.cu."""

"""pgd: reference (naive.py), Triton kernels (triton_kernels.py), public op and custom ops (op.py)."""

"""head_pgd: reference (naive.py), launcher contract (backends.py), the PGD loop both fast backends share
(loop.py), Triton and CUDA C++ launchers (triton_kernels.py, cuda_kernels.py; csrc/head_pgd.cu), public op
and custom ops (op.py)."""

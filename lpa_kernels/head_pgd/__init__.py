"""head_pgd: the definition (naive.py, the autograd loop), launcher contract (backends.py), the PGD loop every
backend shares (loop.py), its kernels in PyTorch for the reference backend (torch_kernels.py), Triton and
CUDA C++ launchers (triton_kernels.py, cuda_kernels.py; csrc/head_pgd.cu), public op and custom ops (op.py)."""

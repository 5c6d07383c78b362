"""perturb: reference (naive.py), launcher contract (backends.py), Triton and CUDA C++
launchers (triton_kernels.py, cuda_kernels.py), public op and custom ops (op.py)."""

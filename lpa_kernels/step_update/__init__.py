"""step_update: the fused per-step pieces of the LPA training step (issue 12): the device-side label
check with the step's label plan, the class statistics, and the direction/radius policy with the
loss-trend state. Reference (naive.py), launcher contract (backends.py), Triton and CUDA C++ launchers
(triton_kernels.py, cuda_kernels.py), custom ops and entry points (op.py)."""

"""What every op's CUDA C++ launchers (``lpa_kernels/<op>/cuda_kernels.py``) share: the call into the
extension module ``lpa_kernels._lpa_cuda`` (``csrc/``), its dtype and option codes, and the split of
the deterministic per-class reductions.

Launchers allocate their outputs with ``new_output``, convert tensors to device pointers and codes,
and call :func:`launch`, which runs on the tensor's device and current stream. Inputs arrive contiguous
from the ops; labels are passed to the kernels as int64.

Per-class reductions are deterministic (no atomics): samples are ordered by a stable argsort of the
labels (``_common.class_order``) and each class is summed in that order. When classes x group tiles
give too few blocks to fill the GPU, each class's samples are split into ``splits`` shares
(:func:`reduce_splits`) whose partial sums :func:`finish_class_sums` adds in a fixed order.
"""

from __future__ import annotations

import functools
import math

import torch

from lpa_kernels import _cuda_ext
from lpa_kernels._common import compute_dtype

DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.float64: 3}
MODE_CODES = {"add": 0, "scale": 1}
NORM_CODES = {"linf": 0, "l2": 1}
ACTIVATION_CODES = {"none": 0, "relu": 1, "gelu": 2, "gelu_tanh": 3, "silu": 4}


def code(dtype: torch.dtype) -> int:
    """The extension's code for ``dtype`` (``DTYPE_CODES``, ``csrc/common.cuh``)."""
    if dtype not in DTYPE_CODES:
        raise TypeError(f"the CUDA kernels take float32, float16, bfloat16 or float64 tensors, got {dtype}")
    return DTYPE_CODES[dtype]


def ptr(t: torch.Tensor | None) -> int:
    """``t``'s device pointer, 0 for None."""
    return 0 if t is None else t.data_ptr()


def launch(name: str, device: torch.device, *args) -> None:
    """Calls extension function ``name`` with ``args`` and the current stream of ``device``."""
    if device.type != "cuda":
        raise ValueError(f"the CUDA C++ kernels need CUDA tensors, got a {device.type} tensor")
    with torch.cuda.device(device):
        getattr(_cuda_ext.module(), name)(*args, torch.cuda.current_stream(device).cuda_stream)


def as_dtype(t: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """``t`` contiguous in ``dtype`` (None stays None)."""
    return None if t is None else t.to(dtype).contiguous()


def delta_for(delta: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """delta as the kernels read it: in the data's dtype, or else in its accumulation dtype."""
    return delta.contiguous() if delta.dtype == dtype else as_dtype(delta, compute_dtype(dtype))


def _multiprocessors(device: torch.device) -> int:
    return _multiprocessors_of(device.index if device.index is not None else torch.cuda.current_device())


@functools.lru_cache(maxsize=None)
def _multiprocessors_of(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def reduce_splits(device: torch.device, num_classes: int, groups: int, inner: int, samples: int, itemsize: int) -> int:
    """Sample shares per class so that the class-reduction grid has about 4 blocks per SM (a block
    covers up to 32 groups, each thread 16 bytes of them when inner == 1, and up to 8 groups of short
    runs when inner > 1; mirrors reduce_block in csrc/class_reduce.cuh)."""
    vector = 16 // itemsize if groups % (16 // itemsize) == 0 else 1
    if inner == 1:
        group_tile = min(32, 1 << max(math.ceil(groups / vector) - 1, 0).bit_length()) * vector
    else:
        run_vector = 16 // itemsize if inner % (16 // itemsize) == 0 else 1
        group_tile = 1
        while group_tile < 8 and (256 // (2 * group_tile)) * run_vector >= inner:
            group_tile *= 2
    blocks = num_classes * math.ceil(groups / group_tile)
    wanted = 4 * _multiprocessors(device)
    return max(1, min(math.ceil(wanted / blocks), samples, 65535))


def finish_class_sums(part: torch.Tensor, out: torch.Tensor) -> None:
    """``out (n,) = part (S, n).sum(0)`` in a fixed order, rounded once to ``out.dtype`` (nothing to do
    when the reduction wrote ``out`` itself)."""
    if part.data_ptr() != out.data_ptr():
        launch("sum_partials", out.device, part.data_ptr(), code(part.dtype), part.shape[0], out.numel(),
               out.data_ptr(), code(out.dtype))

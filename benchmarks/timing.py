"""Timing and the device's own limits, measured in the same run as the kernels.

On a GPU every time is the median of ``triton.testing.do_bench`` (which synchronises and flushes the
L2 cache between runs). ``do_bench`` needs a GPU driver, so on the CPU a plain loop of
``time.perf_counter`` calls after a warm-up stands in for it, and rows say so (timer "cpu-timer").
"""

from __future__ import annotations

import glob
import statistics
import time
from pathlib import Path
from typing import Callable, Iterable

import torch

GPU_TIMER = "do_bench"
CPU_TIMER = "cpu-timer"


def timer_name(device: torch.device) -> str:
    return GPU_TIMER if device.type == "cuda" else CPU_TIMER


def median_ms(fn: Callable[[], object], device: torch.device, quick: bool = False) -> float:
    """Median wall time of one call of ``fn`` in milliseconds."""
    if device.type == "cuda":
        from triton.testing import do_bench

        return float(do_bench(fn, warmup=5 if quick else 10, rep=20 if quick else 50, return_mode="median"))
    return _cpu_medians_ms((fn,), warmup=1 if quick else 3, budget_s=0.05 if quick else 0.5)[0]


def paired_median_ms(fn: Callable[[], object], reference: Callable[[], object], device: torch.device,
                     quick: bool = False) -> tuple[float, float]:
    """Median milliseconds of ``fn`` and of ``reference``, timed together for their ratio: on the CPU one call
    of each per round, in alternation, so that a drift of the machine's speed weighs on both alike (two
    medians taken one after the other carry it into the ratio); on a GPU ``median_ms`` of each, back to back."""
    if device.type == "cuda":
        return median_ms(fn, device, quick), median_ms(reference, device, quick)
    # 3 s and at least 15 rounds: a step of tens of ms (the ResNet's) needs them for a median stable to ~1%
    fn_ms, reference_ms = _cpu_medians_ms((fn, reference), warmup=1 if quick else 3, budget_s=0.1 if quick else 3.0,
                                          min_reps=3 if quick else 15, max_reps=400)
    return fn_ms, reference_ms


def _cpu_medians_ms(fns: tuple[Callable[[], object], ...], warmup: int, budget_s: float, min_reps: int = 3,
                    max_reps: int = 200) -> list[float]:
    """Each of ``fns``' median milliseconds over rounds that call every one of them once, in order."""
    for _ in range(warmup):
        for fn in fns:
            fn()
    times: list[list[float]] = [[] for _ in fns]
    start = time.perf_counter()
    while len(times[0]) < min_reps or (len(times[0]) < max_reps and time.perf_counter() - start < budget_s):
        for fn, fn_times in zip(fns, times):
            t0 = time.perf_counter()
            fn()
            fn_times.append(time.perf_counter() - t0)
    return [statistics.median(fn_times) * 1e3 for fn_times in times]


CACHE_SIZES = "/sys/devices/system/cpu/cpu0/cache/index*/size"
CPU_COPY_MIN = 256 << 20  # also the size when the cache cannot be read
CPU_COPY_MAX = 1 << 30  # src and dst together take twice this: 2 GiB of host memory at most


def last_level_cache_bytes(pattern: str = CACHE_SIZES) -> int | None:
    """The largest CPU cache in bytes, from Linux's sysfs ("491520K"), or None where it cannot be read."""
    sizes = []
    for path in glob.glob(pattern):
        try:
            text = Path(path).read_text().strip().upper()
            sizes.append(int(text[:-1]) << {"K": 10, "M": 20, "G": 30}[text[-1]] if text[-1] in "KMG" else int(text))
        except (OSError, ValueError, IndexError):
            continue
    return max(sizes, default=None)


def copy_bytes(device: torch.device, quick: bool = False) -> int:
    """The size of the copy that measures the memory bandwidth: 1 GiB on a GPU; on the CPU four times the
    last-level cache (a copy that fits in it measures the cache: with a 480 MiB L3, 32 MiB gives about twice
    the GB/s of 256 MiB), between ``CPU_COPY_MIN`` and ``CPU_COPY_MAX``. ``--quick`` takes a quarter on a
    GPU and an eighth on the CPU, for speed."""
    if device.type == "cuda":
        return (1 << 30) >> (2 if quick else 0)
    nbytes = min(max(4 * (last_level_cache_bytes() or 0), CPU_COPY_MIN), CPU_COPY_MAX)
    return nbytes >> (3 if quick else 0)


def copy_bandwidth_gbps(device: torch.device, nbytes: int, quick: bool = False) -> float:
    """GB/s of ``dst.copy_(src)`` on ``nbytes`` (``copy_bytes``: far larger than the caches; bytes counted
    = read + write)."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    ms = median_ms(lambda: dst.copy_(src), device, quick)
    return 2 * nbytes / ms / 1e6


def matmul_tflops(device: torch.device, dtype: torch.dtype, quick: bool = False) -> float:
    """TFLOP/s of one large square ``torch.matmul`` in ``dtype`` (default backend settings: no TF32)."""
    n = (8192 if device.type == "cuda" else 512) // (2 if quick else 1)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    ms = median_ms(lambda: torch.matmul(a, b), device, quick)
    return 2 * n**3 / ms / 1e9


def device_peaks(device: torch.device, dtypes: Iterable[torch.dtype], quick: bool = False) -> dict:
    """``{"copy_gbps": float, "copy_bytes": int, "matmul_tflops": {dtype name: float}}`` measured now on
    ``device`` (``copy_bytes``: the size of the copy measured)."""
    nbytes = copy_bytes(device, quick)
    return {
        "copy_gbps": copy_bandwidth_gbps(device, nbytes, quick),
        "copy_bytes": nbytes,
        "matmul_tflops": {str(dt).replace("torch.", ""): matmul_tflops(device, dt, quick) for dt in dtypes},
    }

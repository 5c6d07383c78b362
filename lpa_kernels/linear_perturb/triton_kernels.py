"""Triton kernels for ``linear_perturb``: a GEMM with a fused activation + class-perturbation epilogue,
and the one-pass backward epilogue.

Shapes (the launchers take contiguous 2-D tensors): ``x (M, IN)``, ``weight (N, IN)``, ``bias (N,)``,
``labels (B,)``, ``delta (K, N)``. Row ``m`` belongs to sample ``m // rows_per_label`` (``T`` for a
``(B, T, IN)`` input, 1 for ``(B, IN)``) and reads ``delta[labels[m // rows_per_label]]``.

Forward: ``z = x @ weight.T + bias`` accumulated in float32 (float64 for float64 input), then in
registers ``a = act(z)`` and ``out = a + delta[y]`` (add) or ``a * (1 + delta[y])`` (scale); ``out`` is
written once, ``z`` too when the backward needs it (``save_preact``).

Backward epilogue: one pass over ``grad_out`` gives ``grad_preact = dL/dz``, ``grad_bias`` and the
per-class ``grad_delta``. The weight and input gradients are two plain GEMMs on ``grad_preact``, done by
the caller (``op.py``), shared with the CUDA backend. The launchers ``linear_perturb_forward`` and
``linear_perturb_backward_epilogue`` provide ``backends.LinearPerturbLaunchers``, as ``cuda_kernels.py`` does.

Determinism: the backward never uses atomics. Rows are visited in class order (a stable sort of the
labels) and cut into *pieces*: runs of at most ``rows_per_piece`` rows of one class. One program sums
one piece (times one column block) in registers and writes the partial sums; a second small kernel adds
each class's partials in piece order, and ``grad_bias`` is a ``torch.sum`` of its partials. The result
is the same from run to run.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from lpa_kernels._common import class_order, compute_dtype, new_output
from lpa_kernels._triton_common import accumulator, kernel_dtype_view
from lpa_kernels.backend import interpreting

# constexpr: a compiled (GPU) kernel may read only constexpr globals (the interpreter reads any). A
# constexpr times a tensor stays a constexpr under the interpreter, so the kernels write tensor * constant.
SQRT1_2 = tl.constexpr(0.7071067811865476)  # 1 / sqrt(2)
INV_SQRT_2PI = tl.constexpr(0.3989422804014327)  # 1 / sqrt(2 pi)
SQRT_2_OVER_PI = tl.constexpr(0.7978845608028654)  # sqrt(2 / pi)
GELU_TANH_CUBIC = tl.constexpr(0.044715)


@triton.jit
def _activation(z, ACTIVATION: tl.constexpr):
    """act(z) in z's (float32/float64) precision. tanh(u) is written as 2 sigmoid(2u) - 1, so
    gelu_tanh(z) = 0.5 z (1 + tanh(u)) = z sigmoid(2u); no libdevice call (the interpreter has none)."""
    if ACTIVATION == "relu":
        a = tl.where(z < 0, 0.0, z)  # keeps NaN, as torch.relu does (tl.maximum would drop it)
    elif ACTIVATION == "gelu":
        a = 0.5 * z * (1.0 + tl.math.erf(z * SQRT1_2))
    elif ACTIVATION == "gelu_tanh":
        a = z * tl.sigmoid((z + z * z * z * GELU_TANH_CUBIC) * (2.0 * SQRT_2_OVER_PI))
    elif ACTIVATION == "silu":
        a = z * tl.sigmoid(z)
    else:
        a = z
    return a


@triton.jit
def _activation_derivative(z, ACTIVATION: tl.constexpr):
    """d act(z) / dz, matching PyTorch's backward formulas."""
    if ACTIVATION == "relu":
        d = tl.where(z <= 0, 0.0, 1.0)
    elif ACTIVATION == "gelu":
        d = 0.5 * (1.0 + tl.math.erf(z * SQRT1_2)) + z * INV_SQRT_2PI * tl.exp(-0.5 * z * z)
    elif ACTIVATION == "gelu_tanh":
        # with s = sigmoid(2u): d/dz [z s] = s + 2 z s (1 - s) u'(z); 1 - s = sigmoid(-2u) without cancellation
        two_u = (z + z * z * z * GELU_TANH_CUBIC) * (2.0 * SQRT_2_OVER_PI)
        s = tl.sigmoid(two_u)
        du = (1.0 + z * z * (3.0 * GELU_TANH_CUBIC)) * SQRT_2_OVER_PI
        d = s + 2.0 * z * s * tl.sigmoid(-two_u) * du
    elif ACTIVATION == "silu":
        s = tl.sigmoid(z)
        d = s * (1.0 + z * (1.0 - s))
    else:
        d = tl.full(z.shape, 1.0, z.dtype)
    return d


@triton.jit
def _tile_of_program(pid, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """``(pid_m, pid_n)`` of program ``pid``: programs walk the (M, N) tiles in groups of GROUP_M row tiles, so consecutive
    programs reuse the same weight columns and x rows while they are in L2 (the Triton matmul
    tutorial's ordering)."""
    tiles_m = tl.cdiv(M, BLOCK_M)
    tiles_n = tl.cdiv(N, BLOCK_N)
    tiles_per_group = GROUP_M * tiles_n
    first_m = (pid // tiles_per_group) * GROUP_M
    group_rows = tl.minimum(tiles_m - first_m, GROUP_M)
    return first_m + (pid % tiles_per_group) % group_rows, (pid % tiles_per_group) // group_rows


@triton.jit
def _epilogue_columns(
    acc, rows, cols, M, N, bias_ptr, labels_ptr, delta_ptr, out_ptr, preact_ptr, rows_per_label,
    HAS_BIAS: tl.constexpr, SAVE_PREACT: tl.constexpr, ACTIVATION: tl.constexpr, MODE: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
):
    """Everything after the product for the tile ``acc (len(rows), len(cols))``, in registers: bias,
    (saved) pre-activation, activation, class perturbation; ``out`` (and ``preact``) stored once."""
    row_ok = rows < M
    col_ok = cols < N
    z = acc
    if HAS_BIAS:
        z += tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(ACC_DTYPE)[None, :]
    tile_ok = row_ok[:, None] & col_ok[None, :]
    offsets = rows.to(tl.int64)[:, None] * N + cols[None, :]
    if SAVE_PREACT:
        tl.store(preact_ptr + offsets, z.to(preact_ptr.dtype.element_ty), mask=tile_ok)
    a = _activation(z, ACTIVATION)
    labels = tl.load(labels_ptr + rows // rows_per_label, mask=row_ok, other=0).to(tl.int64)
    d = tl.load(delta_ptr + labels[:, None] * N + cols[None, :], mask=tile_ok, other=0.0).to(ACC_DTYPE)
    if MODE == "add":
        out = a + d
    else:
        out = a * (1.0 + d)
    tl.store(out_ptr + offsets, out.to(out_ptr.dtype.element_ty), mask=tile_ok)


@triton.jit
def _epilogue(
    acc, rows, first_col, M, N, bias_ptr, labels_ptr, delta_ptr, out_ptr, preact_ptr, rows_per_label,
    HAS_BIAS: tl.constexpr, SAVE_PREACT: tl.constexpr, ACTIVATION: tl.constexpr, MODE: tl.constexpr,
    ACC_DTYPE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, EPILOGUE_HALVES: tl.constexpr,
):
    """The epilogue of one ``(BLOCK_M, BLOCK_N)`` accumulator tile whose columns start at ``first_col``.
    With ``EPILOGUE_HALVES`` it runs on the left and then the right half of the columns, so the bias,
    gathered delta and activation temporaries of only half a tile are live at once (large tiles)."""
    if EPILOGUE_HALVES:
        HALF: tl.constexpr = BLOCK_N // 2
        left, right = tl.split(tl.permute(tl.reshape(acc, (BLOCK_M, 2, HALF)), (0, 2, 1)))
        cols = first_col + tl.arange(0, HALF)
        _epilogue_columns(left, rows, cols, M, N, bias_ptr, labels_ptr, delta_ptr, out_ptr, preact_ptr,
                          rows_per_label, HAS_BIAS, SAVE_PREACT, ACTIVATION, MODE, ACC_DTYPE)
        _epilogue_columns(right, rows, cols + HALF, M, N, bias_ptr, labels_ptr, delta_ptr, out_ptr, preact_ptr,
                          rows_per_label, HAS_BIAS, SAVE_PREACT, ACTIVATION, MODE, ACC_DTYPE)
    else:
        _epilogue_columns(acc, rows, first_col + tl.arange(0, BLOCK_N), M, N, bias_ptr, labels_ptr, delta_ptr,
                          out_ptr, preact_ptr, rows_per_label, HAS_BIAS, SAVE_PREACT, ACTIVATION, MODE, ACC_DTYPE)


@triton.jit
def _linear_perturb_forward_kernel(
    x_ptr, weight_ptr, bias_ptr, labels_ptr, delta_ptr, out_ptr, preact_ptr,
    M, N, IN, rows_per_label,
    HAS_BIAS: tl.constexpr, SAVE_PREACT: tl.constexpr, ACTIVATION: tl.constexpr, MODE: tl.constexpr,
    ACC_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    EPILOGUE_HALVES: tl.constexpr,
):
    pid_m, pid_n = _tile_of_program(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = tl.arange(0, BLOCK_K)
    # Out-of-range rows/columns read a valid row/column (wrapped) instead of being masked: their
    # results are never stored, and the loads in the K loop stay unmasked along M and N.
    x_ptrs = x_ptr + (rows % M).to(tl.int64)[:, None] * IN + ks[None, :]
    w_ptrs = weight_ptr + (cols % N).to(tl.int64)[None, :] * IN + ks[:, None]  # (BLOCK_K, BLOCK_N) of weight.T

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC_DTYPE)
    for k in range(0, IN, BLOCK_K):
        k_ok = (k + ks) < IN
        x_tile = tl.load(x_ptrs, mask=k_ok[None, :], other=0.0)
        w_tile = tl.load(w_ptrs, mask=k_ok[:, None], other=0.0)
        acc = tl.dot(x_tile, w_tile, acc, input_precision=INPUT_PRECISION, out_dtype=ACC_DTYPE)
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    _epilogue(acc, rows, pid_n * BLOCK_N, M, N, bias_ptr, labels_ptr, delta_ptr, out_ptr, preact_ptr, rows_per_label,
              HAS_BIAS, SAVE_PREACT, ACTIVATION, MODE, ACC_DTYPE, BLOCK_M, BLOCK_N, EPILOGUE_HALVES)


@triton.jit
def _linear_perturb_forward_tma_kernel(
    x_desc, weight_desc, bias_ptr, labels_ptr, delta_ptr, out_ptr, preact_ptr,
    M, N, IN, rows_per_label,
    HAS_BIAS: tl.constexpr, SAVE_PREACT: tl.constexpr, ACTIVATION: tl.constexpr, MODE: tl.constexpr,
    ACC_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    EPILOGUE_HALVES: tl.constexpr,
):
    """The same GEMM with x and weight tiles fetched by tensor descriptors (TMA on sm_90+): the copy
    engine fills shared memory and zero-fills whatever lies past M, N or IN, so no address or mask
    math is left in the loop and its registers go to the accumulator."""
    pid_m, pid_n = _tile_of_program(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    first_row = pid_m * BLOCK_M
    first_col = pid_n * BLOCK_N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC_DTYPE)
    for k in range(0, IN, BLOCK_K):
        x_tile = x_desc.load([first_row, k])
        w_tile = weight_desc.load([first_col, k])
        acc = tl.dot(x_tile, w_tile.T, acc, input_precision=INPUT_PRECISION, out_dtype=ACC_DTYPE)
    _epilogue(acc, first_row + tl.arange(0, BLOCK_M), first_col, M, N, bias_ptr, labels_ptr, delta_ptr, out_ptr,
              preact_ptr, rows_per_label, HAS_BIAS, SAVE_PREACT, ACTIVATION, MODE, ACC_DTYPE, BLOCK_M, BLOCK_N,
              EPILOGUE_HALVES)


@triton.jit
def _backward_epilogue_kernel(
    grad_out_ptr, preact_ptr, delta_ptr, grad_preact_ptr, bias_partial_ptr, delta_partial_ptr,
    sorted_samples_ptr, piece_class_ptr, class_first_piece_ptr, class_first_row_ptr, class_rows_ptr,
    N, K, rows_per_label, rows_per_piece, col_blocks,
    HAS_PREACT: tl.constexpr, ACTIVATION: tl.constexpr, MODE: tl.constexpr, ACC_DTYPE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # Program (piece, column block), numbered piece-major on a 1-D grid (a second grid axis would cap the
    # column blocks at 65,535): the piece is rows [begin, end) of the class-sorted row order, all of one
    # class; pieces past the last real one (the grid is sized by a bound) have begin == end and write zero
    # partials.
    piece = tl.program_id(0) // col_blocks
    cols = (tl.program_id(0) % col_blocks) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    cls = tl.load(piece_class_ptr + piece)
    real = cls < K
    cls = tl.minimum(cls, K - 1).to(tl.int64)
    class_begin = tl.load(class_first_row_ptr + cls)
    class_end = class_begin + tl.load(class_rows_ptr + cls)
    begin = class_begin + (piece - tl.load(class_first_piece_ptr + cls)) * rows_per_piece
    end = tl.where(real, tl.minimum(begin + rows_per_piece, class_end), begin)

    d = tl.load(delta_ptr + cls * N + cols, mask=col_ok, other=0.0).to(ACC_DTYPE)
    bias_sum = tl.zeros((BLOCK_N,), dtype=ACC_DTYPE)
    delta_sum = tl.zeros((BLOCK_N,), dtype=ACC_DTYPE)
    for start in range(begin, end, BLOCK_M):
        sorted_rows = start + tl.arange(0, BLOCK_M)
        row_ok = sorted_rows < end
        sample = tl.load(sorted_samples_ptr + sorted_rows // rows_per_label, mask=row_ok, other=0)
        rows = sample.to(tl.int64) * rows_per_label + sorted_rows % rows_per_label
        tile_ok = row_ok[:, None] & col_ok[None, :]
        offsets = rows[:, None] * N + cols[None, :]
        g = tl.load(grad_out_ptr + offsets, mask=tile_ok, other=0.0).to(ACC_DTYPE)
        if HAS_PREACT:
            z = tl.load(preact_ptr + offsets, mask=tile_ok, other=0.0).to(ACC_DTYPE)
        else:
            z = g  # activation "none" in add mode: neither derivative reads z
        if MODE == "add":
            delta_sum += tl.sum(g, axis=0)
        else:  # d out / d delta = act(z); d out / d act = 1 + delta
            delta_sum += tl.sum(g * _activation(z, ACTIVATION), axis=0)
            g = g * (1.0 + d[None, :])
        g = g * _activation_derivative(z, ACTIVATION)  # masked cells: g == 0 and z == 0, so g stays 0
        tl.store(grad_preact_ptr + offsets, g.to(grad_preact_ptr.dtype.element_ty), mask=tile_ok)
        bias_sum += tl.sum(g, axis=0)
    partial = piece.to(tl.int64) * N + cols
    tl.store(bias_partial_ptr + partial, bias_sum, mask=col_ok)
    tl.store(delta_partial_ptr + partial, delta_sum, mask=col_ok)


@triton.jit
def _class_sum_kernel(partial_ptr, class_first_piece_ptr, class_pieces_ptr, out_ptr, N, col_blocks,
                      BLOCK_N: tl.constexpr):
    """out[c] = sum of the partial rows of class c's pieces, added in piece order; program (class, column
    block), class-major on a 1-D grid."""
    cls = (tl.program_id(0) // col_blocks).to(tl.int64)
    cols = (tl.program_id(0) % col_blocks) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    first = tl.load(class_first_piece_ptr + cls)
    total = tl.zeros((BLOCK_N,), dtype=partial_ptr.dtype.element_ty)
    for piece in range(first, first + tl.load(class_pieces_ptr + cls)):  # int64 bounds: piece * N cannot overflow
        total += tl.load(partial_ptr + piece * N + cols, mask=col_ok, other=0.0)
    tl.store(out_ptr + cls * N + cols, total, mask=col_ok)


def _block(size: int, smallest: int, largest: int) -> int:
    return max(smallest, min(largest, triton.next_power_of_2(max(size, 1))))


def _gemm_config(M: int, N: int, IN: int) -> dict:
    """Block sizes for the interpreter, where each program costs Python time: tiles that cover the
    (small) test shapes in few programs. tl.dot needs every block dimension >= 16."""
    return dict(BLOCK_M=_block(M, 16, 64), BLOCK_N=_block(N, 16, 64), BLOCK_K=_block(IN, 16, 64), GROUP_M=8,
                EPILOGUE_HALVES=False, num_warps=4, num_stages=1)


def _gpu_config(block_m, block_n, block_k, num_warps, num_stages, halves=False, pre_hook=None):
    meta = dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, GROUP_M=8, EPILOGUE_HALVES=halves)
    return triton.Config(meta, num_warps=num_warps, num_stages=num_stages, pre_hook=pre_hook)


def _prune_gemm_configs(configs, named_args, **kwargs):
    """Drop tiles much larger than the problem and pipelines that do not fit in shared memory, so that
    small shapes and 4-byte dtypes compile and time only the configs that can win."""
    largest_m = max(32, triton.next_power_of_2(named_args["M"]))
    largest_n = max(64, triton.next_power_of_2(named_args["N"]))
    itemsize = named_args["out_ptr"].element_size()

    def fits(c):
        block_m, block_n, block_k = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"]
        shared_memory = (block_m + block_n) * block_k * itemsize * c.num_stages
        return block_m <= largest_m and block_n <= largest_n and shared_memory <= 200 * 1024

    return [c for c in configs if fits(c)] or configs[-1:]


# On a GPU the forward GEMM is autotuned per (M, N, IN) and dtype, never per class count (the epilogue's
# cost does not depend on it). No config may spill registers on sm_90 or sm_80 (checked by
# tests/benchmarks/test_static_budgets.py). The epilogue is what drives register use: with the fp32
# accumulator live, the bias, gathered delta and activation temporaries of a whole tile pushed 128x64
# with 4 warps to 248 registers on sm_80, and 128x256 / 128x128 tiles with 8 / 4 warps to 255 with
# 170-280 B of spills per thread; running the epilogue on half the columns at a time
# (EPILOGUE_HALVES) brings them to 160, 228 and 224 registers without spills (triton 3.9).
# With pointer loads 128x128 on 4 warps still spills 16 B on sm_80 even so; it is offered only with TMA.
_forward_kernel_autotuned = triton.autotune(
    configs=[
        _gpu_config(128, 128, 64, 8, 3),
        _gpu_config(128, 64, 64, 4, 4, halves=True),
        _gpu_config(64, 128, 64, 4, 4),
        _gpu_config(64, 64, 32, 4, 4),
        _gpu_config(32, 64, 32, 4, 4),
    ],
    key=["M", "N", "IN"],
    prune_configs_by={"early_config_prune": _prune_gemm_configs},
)(_linear_perturb_forward_kernel)


def _set_tma_blocks(meta: dict) -> None:
    """Autotune pre-hook: the descriptors' block shapes follow the config being run."""
    meta["x_desc"].block_shape = [meta["BLOCK_M"], meta["BLOCK_K"]]
    meta["weight_desc"].block_shape = [meta["BLOCK_N"], meta["BLOCK_K"]]


def _tma_config(block_m, block_n, num_warps, num_stages, halves=False):
    return _gpu_config(block_m, block_n, 64, num_warps, num_stages, halves, pre_hook=_set_tma_blocks)


# Hopper configs of the tensor-descriptor kernel (host-side descriptors: triton >= 3.4, so 3.6 and
# 3.9), under the same no-spill budget; the large tiles need EPILOGUE_HALVES to fit (see above).
_forward_tma_kernel_autotuned = triton.autotune(
    configs=[
        _tma_config(128, 256, 8, 3, halves=True),
        _tma_config(256, 128, 8, 3, halves=True),
        _tma_config(128, 128, 8, 4),
        _tma_config(128, 128, 4, 4, halves=True),
        _tma_config(128, 64, 4, 4),
        _tma_config(64, 128, 4, 4),
        _tma_config(64, 64, 4, 4),
    ],
    key=["M", "N", "IN"],
    prune_configs_by={"early_config_prune": _prune_gemm_configs},
)(_linear_perturb_forward_tma_kernel)


def tma_capable(device: torch.device) -> bool:
    """Whether the device has the tensor memory accelerator (sm_90 and newer)."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 9


def _use_tma(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """The descriptor kernel serves 2-byte GEMMs on TMA devices when TMA can address the operands:
    16-byte aligned bases and row strides, unit column strides, IN > 0 (a one-row view may keep another
    row stride through ``.contiguous()``). The pointer kernel does the rest."""
    return (x.dtype in (torch.float16, torch.bfloat16) and x.shape[1] > 0 and tma_capable(x.device)
            and all(t.stride(1) == 1 and (t.stride(0) * t.element_size()) % 16 == 0 and t.data_ptr() % 16 == 0
                    for t in (x, weight)))


def _input_precision(dtype: torch.dtype) -> str:
    """float32 GEMMs honour torch's TF32 switch (off by default, as for torch.matmul); ignored otherwise."""
    return "tf32" if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32 and not interpreting() else "ieee"


def linear_perturb_forward(x, weight, bias, labels, rows_per_label, delta, activation, mode, save_preact):
    """``LinearPerturbLaunchers.linear_perturb_forward``."""
    M, IN = x.shape
    N = weight.shape[0]
    kx, kweight, kbias, kdelta = (kernel_dtype_view(t) for t in (x, weight, bias, delta))
    out = new_output((M, N), x.dtype, x.device)
    preact = new_output((M, N), x.dtype, x.device) if save_preact else x.new_empty(0)
    if M == 0 or N == 0:
        return out, preact
    upcast = kx.dtype != x.dtype  # bfloat16 under the interpreter: kernel outputs in float32, rounded after
    kout = new_output((M, N), kx.dtype, x.device) if upcast else out
    kpreact = new_output((M, N), kx.dtype, x.device) if upcast and save_preact else preact
    operands = (kx, kweight)
    if interpreting():
        kernel, config = _linear_perturb_forward_kernel, _gemm_config(M, N, IN)
    elif _use_tma(x, weight):
        # Block shapes are placeholders until the autotuner's pre-hook sets the chosen config's.
        kernel, config = _forward_tma_kernel_autotuned, {}
        operands = (TensorDescriptor.from_tensor(kx, [1, 1]), TensorDescriptor.from_tensor(kweight, [1, 1]))
    else:
        kernel, config = _forward_kernel_autotuned, {}
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)  # noqa: E731
    kernel[grid](
        *operands, kbias if kbias is not None else kx, labels, kdelta, kout, kpreact,
        M, N, IN, rows_per_label,
        HAS_BIAS=kbias is not None, SAVE_PREACT=save_preact, ACTIVATION=activation, MODE=mode,
        ACC_DTYPE=accumulator(kx), INPUT_PRECISION=_input_precision(kx.dtype),
        **config,
    )
    if upcast:
        out.copy_(kout)
        if save_preact:
            preact.copy_(kpreact)
    return out, preact


def _epilogue_config(M: int, N: int) -> dict:
    """A (BLOCK_M, BLOCK_N) tile per loop step, and ``rows_per_piece`` (a multiple of BLOCK_M) chosen so
    that there are about 512 pieces beside the one-per-class ones: enough programs to fill a GPU even
    when one class holds most rows, few enough that the partials stay small next to ``grad_out``."""
    if interpreting():
        block_m, block_n = 16, _block(N, 16, 64)
    else:
        block_m, block_n = 32, _block(N, 16, 128)
    rows_per_piece = block_m * max(1, triton.cdiv(M, block_m * 512))
    return dict(BLOCK_M=block_m, BLOCK_N=block_n, rows_per_piece=rows_per_piece)


def linear_perturb_backward_epilogue(grad_out, preact, labels, rows_per_label, delta, activation, mode):
    """``LinearPerturbLaunchers.linear_perturb_backward_epilogue``."""
    M, N = grad_out.shape
    K = delta.shape[0]
    acc_dtype = compute_dtype(grad_out.dtype)
    grad_preact = new_output((M, N), grad_out.dtype, grad_out.device)
    if M == 0 or N == 0:
        zeros = lambda *shape: torch.zeros(shape, dtype=acc_dtype, device=grad_out.device)  # noqa: E731
        return grad_preact, zeros(N), zeros(K, N)
    kgrad_out, kdelta = kernel_dtype_view(grad_out), kernel_dtype_view(delta)
    has_preact = preact.numel() > 0
    kpreact = kernel_dtype_view(preact) if has_preact else kgrad_out
    upcast = kgrad_out.dtype != grad_out.dtype
    kgrad_preact = new_output((M, N), kgrad_out.dtype, grad_out.device) if upcast else grad_preact
    config = _epilogue_config(M, N)
    rows_per_piece = config.pop("rows_per_piece")

    # Class-sorted row order and its pieces, all on the device (no host sync): class c owns sorted rows
    # [class_first_row[c], + class_rows[c]) and pieces [class_first_piece[c], + class_pieces[c]).
    sorted_samples, class_starts = class_order(labels, K)
    class_first_row = class_starts[:-1] * rows_per_label
    class_rows = class_starts[1:] * rows_per_label - class_first_row
    class_pieces = (class_rows + rows_per_piece - 1) // rows_per_piece
    class_piece_end = torch.cumsum(class_pieces, 0)
    class_first_piece = class_piece_end - class_pieces
    # Each present class has at most one piece that is not full, so this bounds the piece count.
    num_pieces = min(K, labels.shape[0]) + triton.cdiv(M, rows_per_piece)
    pieces = torch.arange(num_pieces, device=grad_out.device)
    piece_class = torch.searchsorted(class_piece_end, pieces, right=True)  # K for the pieces past the last

    bias_partial = new_output((num_pieces, N), acc_dtype, grad_out.device)
    delta_partial = new_output((num_pieces, N), acc_dtype, grad_out.device)
    col_blocks = triton.cdiv(N, config["BLOCK_N"])
    _backward_epilogue_kernel[(num_pieces * col_blocks,)](
        kgrad_out, kpreact, kdelta, kgrad_preact, bias_partial, delta_partial,
        sorted_samples, piece_class, class_first_piece, class_first_row, class_rows,
        N, K, rows_per_label, rows_per_piece, col_blocks,
        HAS_PREACT=has_preact, ACTIVATION=activation, MODE=mode, ACC_DTYPE=accumulator(kgrad_out), **config,
    )
    grad_delta = new_output((K, N), acc_dtype, grad_out.device)
    _class_sum_kernel[(K * col_blocks,)](
        delta_partial, class_first_piece, class_pieces, grad_delta, N, col_blocks, BLOCK_N=config["BLOCK_N"])
    if upcast:
        grad_preact.copy_(kgrad_preact)
    return grad_preact, bias_partial.sum(0), grad_delta

"""The host C++ kernels of the reference backend (``lpa_kernels._lpa_host``, built from ``csrc/host/``).

On small CPU problems the reference backend's cost is PyTorch's per-op dispatch (a few us per ATen op;
a ``head_pgd_`` call with T = 3 is ~200 ops), so its hot paths have single-threaded C++ kernels:
the whole ``head_pgd_`` call and ``pgd_step_`` (guarded or not); the single-pass step's class statistics
and built-in policy (``step_update``), the policy and the guarded PGD step also as one call
(``policy_pgd_step``); ``perturb``'s forward and class gradient (``serves_perturb``, ``perturb``,
``perturb_class_grad``, which return tensors); the range of CPU labels for the ops' label check
(``label_range``). They compute exactly what
``head_pgd/naive.py``, ``pgd/naive.py``, ``step_update/naive.py`` and ``perturb/naive.py`` define,
accumulating in the data's dtype (float32 or float64). The module takes raw pointers (``data_ptr()``)
and sizes, so it has no tie to torch's C++ ABI.

Each launcher here returns False (``policy``, ``head_pgd``, ``class_stats`` and ``policy_pgd_step``: None),
doing nothing, when the kernels do not serve the call; the caller then runs its PyTorch ops. ``head_pgd``,
``class_stats`` and ``policy_pgd_step`` return the call they made as a ``BoundCall``, which the training step
repeats on the same state tensors (every step makes the same calls) without the checks. They serve
contiguous CPU float32/float64 tensors of one dtype (labels int32 or int64, the loss-trend state float64),
outside ``torch.compile`` tracing, torch.func transforms, tensor subclasses and dispatch modes (which must
see the PyTorch ops), when the extension is built and ``LPA_HOST_KERNELS`` is not ``0``. Writing through a
pointer does not tell autograd, so the version counters of what a kernel writes (``delta``, the
statistics, the trend state) are bumped by hand, as an in-place PyTorch op would.
"""

from __future__ import annotations

import functools
import os

import torch

from lpa_kernels._common import l2_radius_margin, under_transform
from lpa_kernels.step_update import naive as step_naive

_DTYPE_CODES = {torch.float32: 0, torch.float64: 1}
_LABEL_BYTES = {torch.int32: 4, torch.int64: 8}


@functools.lru_cache(maxsize=None)
def _load():
    """(module, error message); exactly one of them is None."""
    try:
        from lpa_kernels import _lpa_host  # type: ignore[attr-defined]

        return _lpa_host, None
    except ImportError as exc:
        return None, (f"the host C++ extension is not built ({exc}); reinstall (pip install -e .) with a C++ "
                      "compiler, LPA_BUILD_HOST=1 makes a failed build an error")


def is_built() -> bool:
    return _load()[0] is not None


def _switched_off() -> bool:
    return os.environ.get("LPA_HOST_KERNELS", "").strip() == "0"  # may_run asks the extension instead


def unavailable_reason() -> str:
    """Why the reference backend runs its PyTorch ops instead of the host kernels ("" when it need not)."""
    if _switched_off():
        return "disabled by LPA_HOST_KERNELS=0"
    return _load()[1] or ""


def _plain(t: torch.Tensor, dtype: torch.dtype) -> bool:
    return type(t) is torch.Tensor and t.dtype == dtype and t.is_cpu and t.is_contiguous()


def may_run() -> bool:
    """Whether the kernels may run here at all: built and switched on, outside ``torch.compile`` tracing,
    dispatch modes, torch.func transforms and forward-mode AD (which must see the PyTorch ops)."""
    if torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack() > 0:
        return False  # first: Dynamo traces what runs before it returns
    module = _load()[0]
    # the switch read through the C environment (the extension's getenv: os.environ writes reach it), which
    # costs a fraction of os.environ.get; every launcher call pays it
    return module is not None and not module.switched_off() and not under_transform()


def _serves(*tensors: torch.Tensor | None, dtype: torch.dtype) -> bool:
    """Whether the kernels may run on these tensors (None entries are absent optionals)."""
    if dtype not in _DTYPE_CODES or not may_run():
        return False
    for t in tensors:  # _plain inlined: each launcher call checks several tensors
        if t is not None and not (type(t) is torch.Tensor and t.dtype == dtype and t.is_cpu and t.is_contiguous()):
            return False
    return True


def _address(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.data_ptr()


def _pgd_arguments(delta, grad, step, eps, direction, norm: str, ok, skipped) -> tuple | None:
    """``(grad, arguments)``: ``grad`` contiguous (a copy when it was not: the caller keeps it alive until the
    kernel has run, the arguments hold only its address) and ``pgd_step``'s arguments after ``dtype``; or
    None when the kernels do not serve these tensors."""
    if grad.shape != delta.shape or grad.dtype != delta.dtype:
        return None
    grad = grad.detach().contiguous()  # no copy when it already is
    if not _serves(delta, grad, step, eps, direction, dtype=delta.dtype):
        return None
    if ok is not None and not (_plain(ok, torch.bool) and _plain(skipped, torch.int64)):
        return None
    k = delta.shape[0]
    n = delta.numel() // k if k else 0
    return grad, (delta.data_ptr(), grad.data_ptr(), step.data_ptr(), eps.data_ptr(), direction.data_ptr(), k, n,
                  norm == "l2", l2_radius_margin(delta.dtype), _address(ok), _address(skipped))


def _written(*tensors: torch.Tensor | None) -> None:
    """Bump the version counters of what a kernel wrote (None entries: absent), in one call."""
    torch.autograd.graph.increment_version([t for t in tensors if t is not None])


def pgd_step(delta, grad, step, eps, direction, norm: str, ok=None, skipped=None) -> bool:
    """``pgd/naive.pgd_step_`` (``guarded_pgd_step_`` with ``ok`` and ``skipped``) on a contiguous
    ``delta (K, *P)`` in place, ``grad`` of its shape and dtype (any layout); False (nothing done) when
    the kernels do not serve these tensors."""
    prepared = _pgd_arguments(delta, grad, step, eps, direction, norm, ok, skipped)
    if prepared is None:
        return False
    grad, arguments = prepared  # grad: alive until the kernel has read it
    _load()[0].pgd_step(_DTYPE_CODES[delta.dtype], *arguments)
    _written(delta, skipped)
    return True


def head_pgd(h, labels, weight, bias, delta, steps: int, step, eps, direction, norm: str, mode: str,
             class_space: bool, ok=None, skipped=None) -> BoundCall | None:
    """``head_pgd/naive.head_pgd_`` on ``delta (K, D)`` in place (``direction`` None: the confidence rule);
    ``class_space``: ``loop.use_class_space``'s choice (add only); with ``skipped`` (0-d int64), the
    training step's guard on the result (``head_pgd.loop.guarded``; ``ok`` 0-d bool or None). Returns the
    call bound to ``weight``, ``bias``, ``delta``, ``step``, ``eps``, ``direction``, ``ok`` and ``skipped``
    (``BoundCall``, varying ``h`` and ``labels``), or None (nothing done) when the kernels do not serve
    these tensors."""
    if labels.dtype not in _LABEL_BYTES or not _plain(labels, labels.dtype):
        return None
    if not _serves(h, weight, bias, delta, step, eps, direction, dtype=delta.dtype):
        return None
    if skipped is not None and not (_plain(skipped, torch.int64) and (ok is None or _plain(ok, torch.bool))):
        return None
    (batch, features), classes = h.shape, delta.shape[0]
    arguments = (_DTYPE_CODES[delta.dtype], _LABEL_BYTES[labels.dtype], h.data_ptr(), labels.data_ptr(),
                 weight.data_ptr(), _address(bias), delta.data_ptr(), batch, features, classes, steps, step.data_ptr(),
                 eps.data_ptr(), _address(direction), norm == "l2", mode == "scale", class_space,
                 l2_radius_margin(delta.dtype), _address(ok), _address(skipped))
    _load()[0].head_pgd(*arguments)
    _written(delta, skipped)
    return BoundCall("head_pgd", arguments, (2, 3), (h, labels),
                     (weight, bias, delta, step, eps, direction, ok, skipped), (delta, skipped))


def class_stats(stats, log_probs, labels, ok, accumulate: bool) -> BoundCall | None:
    """``step_update/naive.class_stats_`` into ``stats (3, K)`` in place from ``log_probs (B, K)`` of its
    dtype and ``labels (B,)`` (``ok`` 0-d bool or None). Returns the call bound to ``stats`` and ``ok``
    (``BoundCall``, varying ``log_probs`` and ``labels``), or None (nothing done) when the kernels do not
    serve these tensors or a label is outside ``[0, K)`` (the PyTorch ops then raise)."""
    if not _serves(stats, log_probs, dtype=stats.dtype) or log_probs.dim() != 2:
        return None
    batch, classes = log_probs.shape
    if (labels.dtype not in _LABEL_BYTES or not _plain(labels, labels.dtype) or labels.shape != (batch,)
            or stats.shape != (3, classes) or not (ok is None or _plain(ok, torch.bool))):
        return None
    arguments = (_DTYPE_CODES[stats.dtype], _LABEL_BYTES[labels.dtype], stats.data_ptr(), log_probs.data_ptr(),
                 labels.data_ptr(), batch, classes, _address(ok), accumulate)
    if not _load()[0].class_stats(*arguments):
        return None
    _written(stats)
    return BoundCall("class_stats", arguments, (3, 4), (log_probs, labels), (stats, ok), (stats,))


def _vector(t: torch.Tensor | None, dtype: torch.dtype, length: int) -> bool:
    return t is not None and _plain(t, dtype) and t.shape == (length,)


def _policy_arguments(stats, fixed_direction, fixed_eps, loss_ema, fall_ema, skipped, params, direction: str,
                      radius: str, observe: bool, dtype: torch.dtype):
    """``(arguments after dtype and before clear, direction (K,), eps (K,))`` of ``policy`` (the outputs made
    here, or the fixed tensors), or None when the kernels do not serve these tensors."""
    if not _serves(stats, fixed_direction, fixed_eps, dtype=dtype):  # stats of the output dtype
        return None
    direction_kind, radius_kind = step_naive.DIRECTIONS.get(direction), step_naive.RADII.get(radius)
    classes = stats.shape[-1]
    if direction_kind is None or radius_kind is None or stats.shape != (3, classes):
        return None
    for fixed, kind in ((fixed_direction, direction), (fixed_eps, radius)):
        if kind == "fixed" and (fixed is None or fixed.shape != (classes,)):
            return None
    trend = direction == "loss_trend" or observe
    if trend and not (_vector(loss_ema, torch.float64, classes) and _vector(fall_ema, torch.float64, classes)):
        return None
    if observe and not (skipped is not None and _plain(skipped, torch.int64) and skipped.dim() == 0):
        return None
    chosen = fixed_direction if direction == "fixed" else stats.new_empty((classes,), dtype=dtype)
    radii = fixed_eps if radius == "fixed" else stats.new_empty((classes,), dtype=dtype)
    eps, delta_eps, min_radius, momentum = params
    arguments = (stats.data_ptr(), classes, loss_ema.data_ptr() if trend else 0, fall_ema.data_ptr() if trend else 0,
                 skipped.data_ptr() if observe else 0, float(eps), float(delta_eps), float(min_radius),
                 float(momentum), direction_kind, radius_kind, observe)
    return arguments, chosen, radii


def _policy_written(stats, loss_ema, fall_ema, skipped, observe: bool, clear: bool) -> tuple:
    """What ``policy`` wrote, for ``_written``: the statistics when it cleared them, the trend state when it observed."""
    return (stats if clear else None,) + ((loss_ema, fall_ema, skipped) if observe else ())


def policy(stats, fixed_direction, fixed_eps, loss_ema, fall_ema, skipped, params, direction: str, radius: str,
           observe: bool, clear: bool, dtype: torch.dtype):
    """``step_update/naive.policy_``: ``(direction (K,), eps (K,))`` in ``dtype`` (a fixed kind returns
    its fixed tensor itself, as the definition does), the trend state and ``stats (3, K)`` (of ``dtype``)
    updated in place; None (nothing done) when the kernels do not serve these tensors."""
    prepared = _policy_arguments(stats, fixed_direction, fixed_eps, loss_ema, fall_ema, skipped, params, direction,
                                 radius, observe, dtype)
    if prepared is None:
        return None
    arguments, chosen, radii = prepared
    _load()[0].policy(_DTYPE_CODES[dtype], *arguments, clear, 0 if direction == "fixed" else chosen.data_ptr(),
                      0 if radius == "fixed" else radii.data_ptr())
    _written(*_policy_written(stats, loss_ema, fall_ema, skipped, observe, clear))
    return chosen, radii


class BoundCall:
    """A launcher's kernel call kept with the arguments it checked, to repeat on the same tensors with new
    ``varying`` ones (``repeat``). The single-pass training step makes the same statistics and update calls on
    the same state every step, and on a small CPU step the Python that checks and assembles their arguments
    (in the launcher and its callers) cost more than the kernels: ~50 us against ~10 for the update, in a
    1.6 ms MLP step where caches are cold for it (measured). ``slots``: where the varying tensors' addresses
    go in ``arguments``; ``tensors``: the caller's other tensor arguments (None for an absent one), compared
    by identity and address; ``written``: what the kernel writes, whose versions each run bumps; ``owned``:
    the launcher's own buffers whose addresses the arguments hold (kept alive here)."""

    def __init__(self, kernel: str, arguments: tuple, slots: tuple, varying: tuple, tensors: tuple,
                 written: tuple, owned: tuple = ()):
        self.kernel, self.arguments, self.slots = kernel, arguments, slots
        self.varying_meta = tuple((t.dtype, t.shape) for t in varying)
        self.tensors, self.addresses = tensors, tuple(_address(t) for t in tensors)
        self.written, self.owned = written, owned

    def repeat(self, tensors: tuple, *varying: torch.Tensor) -> bool:
        """Run the call again with ``varying`` in its slots when ``tensors`` are the bound ones (the same
        objects at the same addresses), each varying tensor has its bound one's dtype and shape (contiguous,
        on the CPU) and the kernels may run here; False (nothing done) otherwise, or when the kernel declines
        (its False): the caller then takes its full path."""
        if len(tensors) != len(self.tensors) or not may_run():
            return False
        for t, bound, address in zip(tensors, self.tensors, self.addresses):
            if t is not bound or (t is not None and t.data_ptr() != address):
                return False
        arguments = list(self.arguments)
        for t, slot, meta in zip(varying, self.slots, self.varying_meta, strict=True):
            if not (type(t) is torch.Tensor and (t.dtype, t.shape) == meta and t.is_cpu and t.is_contiguous()):
                return False
            arguments[slot] = t.data_ptr()
        if getattr(_load()[0], self.kernel)(*arguments) is False:
            return False
        _written(*self.written)
        return True

    def keyed(self, keys: tuple) -> BoundCall | None:
        """This call bound to ``keys`` instead of the launcher's tensors: what the caller will present to
        ``repeat`` (e.g. a module's parameter where the launcher got its ``detach()``), one key per bound
        tensor at that tensor's address (None where it is None); None when they are not."""
        if len(keys) != len(self.tensors) or any(_address(k) != a or (k is None) != (t is None)
                                                 for k, t, a in zip(keys, self.tensors, self.addresses)):
            return None
        call = object.__new__(BoundCall)  # not copy.copy: __reduce__ makes copies that never repeat
        call.__dict__.update(self.__dict__, tensors=keys)
        return call

    def __reduce__(self):
        # a copy (deepcopy, pickle) would hold the addresses of the original's tensors: it becomes a call bound
        # to no tensor, which no caller's tensors match
        return BoundCall, ("", (), (), (), (), ())


def policy_pgd_step(stats, fixed_direction, fixed_eps, loss_ema, fall_ema, stat_skipped, params, direction: str,
                    radius: str, observe: bool, clear: bool, delta, grad, step, norm: str, ok,
                    skipped) -> BoundCall | None:
    """``policy`` (its first eleven arguments; ``stat_skipped`` is its ``skipped``), then the guarded
    ``pgd_step`` of ``delta`` with the direction and radii it gives (``ok`` 0-d bool, ``skipped`` 0-d int64),
    in one call: the single-pass step's update. Returns the call bound to these tensors (``BoundCall``, its
    varying tensor ``grad``; ``params``, the kinds, ``observe``, ``clear`` and ``norm`` are in it too), or
    None (nothing done) when the kernels do not serve."""
    if ok is None:  # the training step's update is always guarded
        return None
    dtype = delta.dtype
    prepared = _policy_arguments(stats, fixed_direction, fixed_eps, loss_ema, fall_ema, stat_skipped, params,
                                 direction, radius, observe, dtype)
    if prepared is None:
        return None
    policy_arguments, chosen, radii = prepared
    pgd_prepared = _pgd_arguments(delta, grad, step, radii, chosen, norm, ok, skipped)
    if pgd_prepared is None:
        return None
    grad, pgd_arguments = pgd_prepared  # grad: alive until the kernel has read it
    arguments = (_DTYPE_CODES[dtype], *policy_arguments, clear, *pgd_arguments)
    _load()[0].policy_pgd_step(*arguments)
    written = (*_policy_written(stats, loss_ema, fall_ema, stat_skipped, observe, clear), delta, skipped)
    _written(*written)
    slot = 3 + len(policy_arguments)  # dtype, the policy's arguments, clear and delta come before grad
    return BoundCall("policy_pgd_step", arguments, (slot,), (grad,),
                     (stats, fixed_direction, fixed_eps, loss_ema, fall_ema, stat_skipped, delta, step, ok, skipped),
                     written, (chosen, radii))


def label_range(labels: torch.Tensor) -> tuple[int, int] | None:
    """``(min, max)`` of non-empty 1-D int32/int64 CPU ``labels``, one C++ pass; None when the kernel does
    not serve them (then ``torch.aminmax``)."""
    if not (labels.dtype in _LABEL_BYTES and _plain(labels, labels.dtype) and labels.dim() == 1 and labels.numel()
            and may_run()):
        return None
    return _load()[0].label_range(_LABEL_BYTES[labels.dtype], labels.data_ptr(), labels.shape[0])


def serves_perturb(labels: torch.Tensor | None, *tensors: torch.Tensor | None) -> bool:
    """Whether ``perturb`` and ``perturb_class_grad`` below may run on these tensors (one float dtype, the
    first's; None entries are absent optionals; ``labels`` None: checked before, by the same caller).
    Those two launchers do not check it themselves: the caller decides between them and the PyTorch ops
    once, before it builds its autograd node."""
    return (_serves(*tensors, dtype=tensors[0].dtype)
            and (labels is None or labels.dtype in _LABEL_BYTES and _plain(labels, labels.dtype)))


def perturb(h: torch.Tensor, labels: torch.Tensor, delta: torch.Tensor, inner: int, mode: str) -> torch.Tensor:
    """``perturb/naive.perturb`` of ``h (B, *F)`` with ``delta (K, *P)`` on the kernels' layout (feature
    ``f`` reads ``delta[y, (f // inner) % D]``, ``D = prod(P)``; ``_common.delta_layout``), a new tensor
    shaped like ``h``. Only where ``serves_perturb(labels, h, delta)``."""
    out = torch.empty_like(h)
    batch, features = h.shape[0], h.shape[1:].numel()
    _load()[0].perturb_forward(_DTYPE_CODES[h.dtype], _LABEL_BYTES[labels.dtype], h.data_ptr(), labels.data_ptr(),
                               delta.data_ptr(), out.data_ptr(), batch, features, delta.numel() // delta.shape[0], inner,
                               mode == "scale")
    return out


def perturb_class_grad(grad_out: torch.Tensor, h: torch.Tensor | None, labels: torch.Tensor, delta_shape,
                       inner: int, mode: str, grad_scale: float = 1) -> torch.Tensor:
    """``perturb/naive.class_grad`` of ``grad_out (B, *F)`` (``h`` of its shape for ``scale``) on the same
    layout as ``perturb``, times ``grad_scale``: a new ``(K, *P) = delta_shape`` tensor of grad_out's dtype,
    summed in sample order in double. Only where ``serves_perturb(labels, grad_out, h)``."""
    grad_delta = grad_out.new_empty(tuple(delta_shape))
    batch, features = grad_out.shape[0], grad_out.shape[1:].numel()
    classes = delta_shape[0]
    _load()[0].perturb_class_grad(_DTYPE_CODES[grad_out.dtype], _LABEL_BYTES[labels.dtype], grad_out.data_ptr(),
                                  _address(h if mode == "scale" else None), labels.data_ptr(), grad_delta.data_ptr(),
                                  batch, features, classes, grad_delta.numel() // classes, inner, mode == "scale",
                                  float(grad_scale))
    return grad_delta


def serves_head_loss(logits0: torch.Tensor, labels: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor,
                     shift: torch.Tensor | None, stats: torch.Tensor | None) -> bool:
    """Whether ``head_loss_forward`` / ``_backward`` below may run: ``logits0 (B, K)`` with B, K >= 1, int32/int64
    ``labels (B,)``, ``delta`` and ``weight (K, D)`` (parameters too: the kernels only read them), ``shift (K,)``
    and ``stats (3, K)`` (None: absent), plain contiguous CPU tensors of logits0's dtype."""
    if logits0.dim() != 2 or not logits0.numel():
        return False
    (batch, classes), dtype = logits0.shape, logits0.dtype
    return (labels.dtype in _LABEL_BYTES and _plain(labels, labels.dtype) and labels.shape == (batch,)
            and delta.dim() == 2 and delta.shape == weight.shape and delta.shape[0] == classes
            and (shift is None or shift.shape == (classes,)) and (stats is None or stats.shape == (3, classes))
            and _serves(logits0, shift, stats, dtype=dtype)
            and all(type(t) in (torch.Tensor, torch.nn.Parameter) and t.dtype == dtype and t.is_cpu
                    and t.is_contiguous() for t in (delta, weight)))


def head_loss_forward(logits0, labels, delta, weight, shift, stats) -> tuple[torch.Tensor, ...]:
    """``(loss, z, probs, delta_copy)`` of ``lpa/head_loss.py``'s class-space loss (``probs``: the softmax, and
    ``delta_copy``: delta's values, which the backward reads), ``stats (3, K)`` (or None) increased by the class
    statistics. ``ValueError`` for a label outside ``[0, K)``, nothing written. Only where
    ``serves_head_loss(logits0, labels, delta, weight, shift, stats)``."""
    z, probs, delta_copy = torch.empty_like(logits0), torch.empty_like(logits0), torch.empty_like(delta)
    loss = logits0.new_empty(())
    (batch, classes), features = logits0.shape, delta.shape[1]
    _load()[0].head_loss_forward(_DTYPE_CODES[logits0.dtype], _LABEL_BYTES[labels.dtype], logits0.data_ptr(),
                                 labels.data_ptr(), delta.data_ptr(), weight.data_ptr(), _address(shift), z.data_ptr(),
                                 probs.data_ptr(), loss.data_ptr(), _address(stats), delta_copy.data_ptr(), batch,
                                 classes, features)
    if stats is not None:
        _written(stats)
    return loss, z, probs, delta_copy


def head_loss_backward(probs, labels, delta, weight, grad_loss, grad_z, need_delta: bool, need_weight: bool,
                       grad_scale: float) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """``(grad_logits0, grad_delta or None, grad_weight or None)`` of ``head_loss_forward`` from its ``probs`` and
    ``delta_copy`` (passed as ``delta``); ``grad_loss`` 0-d, ``grad_z`` (B, K) or None. Only where the forward
    served, ``grad_loss`` and ``grad_z`` of its dtype, contiguous."""
    grad_logits0 = torch.empty_like(probs)
    grad_delta = torch.empty_like(delta) if need_delta else None
    grad_weight = torch.empty_like(weight) if need_weight else None
    (batch, classes), features = probs.shape, delta.shape[1]
    _load()[0].head_loss_backward(_DTYPE_CODES[probs.dtype], _LABEL_BYTES[labels.dtype], probs.data_ptr(),
                                  labels.data_ptr(), delta.data_ptr(), weight.data_ptr(), grad_loss.data_ptr(),
                                  _address(grad_z), grad_logits0.data_ptr(), _address(grad_delta),
                                  _address(grad_weight), batch, classes, features, float(grad_scale))
    return grad_logits0, grad_delta, grad_weight

"""Count, around any piece of code, the GPU kernel launches and host synchronisations it would make:
``with LaunchCounter() as counts: ...``; then ``counts.summary()``.

Works on the CPU (Triton under its interpreter), so tests and ``lpa-bench static`` can hold a
training step to a budget without a GPU. What is counted, and why it stands for the GPU:

- ``aten``: every ATen op reaching the dispatcher (a ``TorchDispatchMode``) except those that launch
  no kernel on a GPU (views, ``empty*``, ``detach``, and the host reads below). An eager op is one
  kernel launch, give or take (a few ops launch two). An op that may return its input or a copy
  (``to``, ``contiguous``, ``reshape``) counts when it copies.
- Our own custom ops (``lpa_kernels::``) are not kernels themselves: their Python bodies run with the
  counter on, so the ATen ops and Triton kernels inside them count.
- ``triton``: every call of a ``kernel[grid]`` launcher (``KernelInterface.__getitem__``; a launcher
  kept and called twice counts twice); an autotuned or heuristics-wrapped kernel counts once per call, as
  it launches once per call on a GPU once tuned. ``kernel.run(..., grid=...)`` is not seen (the library
  launches only through ``kernel[grid]``).
- ``host_reads``: calls that make the host wait for the device: ``.item()``, ``bool()``/``int()``/
  ``float()`` of a tensor (``_local_scalar_dense``), ``.cpu()``, ``.tolist()``, ``.numpy()``,
  ``nonzero``, ``torch.where(cond)``, ``argwhere``, indexing with a boolean mask (read or write),
  ``unique``, ``masked_select``, ``repeat_interleave`` without ``output_size`` (output sizes known only
  from data), ``equal``, ``allclose``, ``histc`` with ``min == max`` (it reads the data's range), and
  ``bincount``, counted twice: the CUDA implementation reads the input's min and max back with
  ``.item()`` before allocating. Inside our custom ops' bodies such composite calls reach the counter
  undecomposed (``item``, ``is_nonzero``, ``where``, ``argwhere``) and count the same. ``.to("cpu")`` is
  not seen on CPU tensors (it returns its input without dispatching); write ``.cpu()``. Reads of a tensor
  that a counted ``.cpu()`` returned are on the host already and are not counted again.
"""

from __future__ import annotations

import weakref
from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode

# ATen ops that launch no kernel on a GPU (metadata only, or allocation without a fill).
NO_KERNEL_OPS = frozenset({
    "empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "detach", "alias", "lift_fresh",
    "resize_", "set_", "sym_size", "sym_stride", "sym_numel", "sym_storage_offset", "is_same_size",
    "_local_scalar_dense", "_to_copy_cpu_noop", "record_stream", "is_nonzero", "item",
})
# ATen ops whose output depends on data the host must read first: {op: host reads on a GPU}.
HOST_READ_OPS = {"_local_scalar_dense": 1, "item": 1, "is_nonzero": 1, "nonzero": 1, "argwhere": 1, "bincount": 2,
                 "_unique": 1, "_unique2": 1, "unique_dim": 1, "unique_consecutive": 1, "masked_select": 1,
                 "equal": 1, "allclose": 1}
INDEX_OPS = frozenset({"index", "index_put", "index_put_", "_index_put_impl_"})
HOST_READ_METHODS = ("cpu", "tolist", "numpy")


class _AtenCounter(TorchDispatchMode):
    def __init__(self, counts: "LaunchCounter"):
        super().__init__()
        self.counts = counts

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.counts.in_triton_launch:
            return func(*args, **kwargs)
        name = func.overloadpacket.__name__
        definition = _custom_op(func)
        if definition is not None:
            # one of our custom ops: its launches are the ATen ops and Triton kernels its Python body runs
            # (the mode is off while this handler runs, so re-enter it for the body)
            with self:
                return definition._init_fn(*args, **kwargs)
        reads = _host_reads(func, name, args, kwargs)
        if reads and args and isinstance(args[0], torch.Tensor) and self.counts.is_on_host(args[0]):
            reads = 0
        if reads:
            self.counts.host_reads[name] += reads
        out = func(*args, **kwargs)
        # An op whose schema lets it alias its input (``to``, ``contiguous``, ``reshape``: seen undecomposed
        # inside our custom ops' bodies) launches a copy exactly when its result does not alias it.
        if name not in NO_KERNEL_OPS and not (func.is_view and _aliases_an_input(out, args)):
            self.counts.aten[name] += 1
        return out


class LaunchCounter:
    """Context manager counting ATen kernel launches, Triton launches and host reads (see module doc).
    Re-entrant use is not supported; counters keep adding up across uses of one instance."""

    def __init__(self):
        self.aten, self.triton, self.host_reads = Counter(), Counter(), Counter()
        self._undo = []
        self.in_triton_launch = 0  # > 0 while a Triton kernel runs (under the interpreter: its own ATen ops)
        self.on_host = weakref.WeakValueDictionary()  # id -> tensor: what a counted .cpu() returned: later reads of it are free

    def __enter__(self):
        from triton.runtime.jit import KernelInterface

        counts = self
        getitem = KernelInterface.__getitem__

        def counting_getitem(kernel, grid):
            launch = getitem(kernel, grid)

            def launching(*args, **kwargs):
                counts.triton[_kernel_name(kernel)] += 1
                # under TRITON_INTERPRET=1 the launch itself runs ATen ops (copies to and from the
                # interpreter's buffers); on a GPU it is one kernel, counted above
                counts.in_triton_launch += 1
                try:
                    return launch(*args, **kwargs)
                finally:
                    counts.in_triton_launch -= 1

            return launching

        KernelInterface.__getitem__ = counting_getitem
        self._undo.append(lambda: setattr(KernelInterface, "__getitem__", getitem))
        for method in HOST_READ_METHODS:
            original = getattr(torch.Tensor, method)

            def counting(tensor, *args, _original=original, _method=method, **kwargs):
                if not counts.is_on_host(tensor):
                    counts.host_reads[_method] += 1
                result = _original(tensor, *args, **kwargs)
                if _method == "cpu":
                    counts.on_host[id(result)] = result
                return result

            setattr(torch.Tensor, method, counting)
            self._undo.append(lambda m=method, o=original: setattr(torch.Tensor, m, o))
        self._mode = _AtenCounter(self)
        self._mode.__enter__()
        return self

    def __exit__(self, *exc):
        self._mode.__exit__(*exc)
        while self._undo:
            self._undo.pop()()
        return False

    def is_on_host(self, tensor) -> bool:
        return self.on_host.get(id(tensor)) is tensor

    def summary(self) -> dict:
        """Totals and the per-op / per-kernel / per-kind breakdowns (plain dicts, JSON-ready)."""
        return {"aten_launches": sum(self.aten.values()), "triton_launches": sum(self.triton.values()),
                "host_reads": sum(self.host_reads.values()), "aten": dict(self.aten.most_common()),
                "triton": dict(self.triton.most_common()), "host_read_kinds": dict(self.host_reads)}


def _host_reads(func, name: str, args, kwargs) -> int:
    """How many times ``func(*args, **kwargs)`` makes the host wait for the device (module doc)."""
    if name == "repeat_interleave":  # the output length is the sum of the repeats, read back to allocate
        return int(kwargs.get("output_size") is None and func._overloadname != "self_int")
    if name == "where":  # torch.where(condition) is nonzero; the three-argument where is elementwise
        return int(len(args) + len(kwargs) == 1)
    if name in INDEX_OPS:  # a boolean mask among the indices: nonzero first
        indices = args[1] if len(args) > 1 else kwargs.get("indices", ())
        return int(any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in indices))
    if name == "histc":  # min == max (both 0 by default): the range is read from the data
        bounds = [kwargs.get(k, args[i] if len(args) > i else 0) for i, k in ((2, "min"), (3, "max"))]
        return int(bounds[0] == bounds[1])
    return HOST_READ_OPS.get(name, 0)


def _aliases_an_input(out, args) -> bool:
    """Whether ``out`` (a tensor or a sequence of them) shares storage with a tensor in ``args``."""
    outs = out if isinstance(out, (tuple, list)) else (out,)
    storages = {a.untyped_storage().data_ptr() for a in args if isinstance(a, torch.Tensor)}
    return any(isinstance(o, torch.Tensor) and o.untyped_storage().data_ptr() in storages for o in outs)


def _custom_op(func):
    """The ``torch.library.custom_op`` definition of a ``lpa_kernels::`` op, else None."""
    if func.namespace != "lpa_kernels":
        return None
    from torch._library.custom_ops import _maybe_get_opdef

    return _maybe_get_opdef(func._name)


def _kernel_name(kernel) -> str:
    fn = kernel
    while hasattr(fn, "fn") and not hasattr(fn, "__name__"):
        fn = fn.fn
    inner = getattr(fn, "fn", fn)
    module = getattr(inner, "__module__", "") or ""
    name = getattr(fn, "__name__", None) or getattr(inner, "__name__", repr(fn))
    return f"{module.split('.')[1]}.{name}" if module.startswith("lpa_kernels.") else name

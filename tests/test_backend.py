"""Backend selection: resolve() rules, the LPA_BACKEND override, and backend_info()."""

from __future__ import annotations

import pytest
import torch

from lpa_kernels import backend, backend_info
from lpa_kernels._cuda_ext import unavailable_reason
from lpa_kernels.backend import _old_interpreter_reason, interpreting

CPU = torch.device("cpu")


@pytest.fixture
def no_override(monkeypatch):
    monkeypatch.delenv("LPA_BACKEND", raising=False)


@pytest.fixture
def any_interpreter(monkeypatch):
    """These tests check the resolve rules, not the interpreter's version (which has its own test)."""
    monkeypatch.setattr(backend, "_old_interpreter_reason", lambda: "")


def test_auto_on_cpu_is_the_reference(no_override):
    assert backend.resolve("auto", CPU) == "reference"


def test_explicit_reference_always_resolves(no_override):
    assert backend.resolve("reference", CPU) == "reference"


def test_auto_on_a_cuda_device_prefers_triton(no_override, monkeypatch):
    # A torch.device("cuda") object exists without a GPU; resolve() only asks what can run on it.
    monkeypatch.setattr(backend, "interpreting", lambda: False)
    assert backend.resolve("auto", torch.device("cuda")) == "triton"


def test_auto_on_a_cuda_device_falls_back_to_the_reference_when_nothing_runs(no_override, monkeypatch):
    monkeypatch.setattr(backend, "interpreting", lambda: True)  # Triton then refuses CUDA tensors
    expected = "reference" if unavailable_reason() else "cuda"
    assert backend.resolve("auto", torch.device("cuda")) == expected


def test_lpa_backend_overrides_auto(monkeypatch, any_interpreter):
    monkeypatch.setenv("LPA_BACKEND", "reference")
    monkeypatch.setattr(backend, "interpreting", lambda: True)
    assert backend.resolve("auto", CPU) == "reference"
    monkeypatch.setenv("LPA_BACKEND", "triton")
    assert backend.resolve("auto", CPU) == "triton"


def test_lpa_backend_does_not_override_an_explicit_backend(monkeypatch):
    monkeypatch.setenv("LPA_BACKEND", "triton")
    assert backend.resolve("reference", CPU) == "reference"


def test_lpa_backend_auto_or_empty_means_auto(monkeypatch):
    for value in ("auto", "", "  "):
        monkeypatch.setenv("LPA_BACKEND", value)
        assert backend.resolve("auto", CPU) == "reference", f"LPA_BACKEND={value!r}"


def test_invalid_lpa_backend_is_named_in_the_error(monkeypatch):
    monkeypatch.setenv("LPA_BACKEND", "fastest")
    with pytest.raises(ValueError, match="LPA_BACKEND.*'fastest'"):
        backend.resolve("auto", CPU)


@pytest.mark.parametrize("name, error", [("Triton", ValueError), ("GPU", ValueError), ("", ValueError),
                                         (None, TypeError), (1, TypeError)])
def test_unknown_backend_name_raises(no_override, name, error):
    with pytest.raises(error, match="backend must be one of"):
        backend.resolve(name, CPU)


def test_triton_on_cpu_without_the_interpreter_says_why(monkeypatch):
    monkeypatch.setattr(backend, "interpreting", lambda: False)
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        backend.resolve("triton", CPU)


def test_triton_on_cpu_reads_the_triton_interpret_variable(monkeypatch, any_interpreter):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="backend='triton' is not available for a cpu tensor"):
        backend.resolve("triton", CPU)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert backend.resolve("triton", CPU) == "triton"


def test_triton_under_the_interpreter_refuses_cuda_tensors(monkeypatch):
    monkeypatch.setattr(backend, "interpreting", lambda: True)
    with pytest.raises(ValueError, match="CPU tensors only"):
        backend.resolve("triton", torch.device("cuda"))


def test_cuda_backend_unavailable_raises_a_clear_error():
    # On a CPU tensor the CUDA kernels never run: the extension is missing, there is no GPU, or the
    # tensor is not on one; the message says which.
    with pytest.raises(ValueError, match="backend='cuda' is not available for a cpu tensor: .*(not built|no CUDA GPU|CUDA tensors)"):
        backend.resolve("cuda", CPU)


def test_backend_info_reports_every_backend_and_the_versions():
    info = backend_info()
    for name in ("reference", "triton", "cuda"):
        extra = {"host_kernels", "host_kernels_reason"} if name == "reference" else set()
        assert set(info[name]) == {"available", "reason"} | extra, name
        assert info[name]["available"] == (info[name]["reason"] == ""), f"{name}: available iff no reason"
    assert info["reference"]["available"]
    assert isinstance(info["cuda_extension_built"], bool)
    assert info["versions"]["torch"] == torch.__version__
    assert {"triton", "cuda_runtime", "lpa_kernels"} <= set(info["versions"])
    if not torch.cuda.is_available():
        assert not info["cuda"]["available"] and info["cuda"]["reason"]


def test_triton_interpreter_older_than_3_9_is_refused_with_the_reason(monkeypatch):
    """triton 3.6's CPU interpreter cannot run loops with loaded bounds: the backend says so instead of
    failing inside a kernel."""
    import triton

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(triton, "__version__", "3.6.0")
    backend._old_interpreter_reason.cache_clear()
    try:
        with pytest.raises(ValueError, match=r"triton 3\.6\.0 is too old for TRITON_INTERPRET=1 .*; install triton>=3\.9"):
            backend.resolve("triton", CPU)
    finally:
        monkeypatch.undo()
        backend._old_interpreter_reason.cache_clear()


def test_triton_older_than_3_6_is_refused_for_gpu_tensors_with_the_reason(monkeypatch):
    import triton

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(triton, "__version__", "3.5.1")
    backend._old_compiler_reason.cache_clear()
    try:
        reason = backend._triton_reason(torch.device("cuda"))
    finally:
        monkeypatch.undo()
        backend._old_compiler_reason.cache_clear()
    assert reason.startswith("triton 3.5.1 is too old for the GPU kernels") and reason.endswith("install triton>=3.6")


@pytest.mark.skipif(not interpreting() or bool(_old_interpreter_reason()),
                    reason="the lock serialises Triton's CPU interpreter (TRITON_INTERPRET=1, triton>=3.9)")
def test_triton_interpreter_launches_from_two_threads_are_serialised_and_correct():
    """Triton's interpreter is not thread-safe; ``backend.INTERPRETER_LOCK`` serialises its launches, so two
    threads running perturb (forward and backward) and pgd_step_ both finish with the reference's results."""
    import threading

    from lpa_kernels import perturb, pgd_step_

    def work(seed: int, backend: str):
        gen = torch.Generator().manual_seed(seed)
        h = torch.randn(9, 2, 37, generator=gen, requires_grad=True)
        labels, delta = torch.randint(0, 5, (9,), generator=gen), torch.randn(5, 2, 37, generator=gen)
        out = perturb(h, labels, delta, "scale", backend=backend)
        (grad_h,) = torch.autograd.grad(out.square().sum(), h)
        for _ in range(3):
            pgd_step_(delta, torch.randn(5, 2, 37, generator=gen), 0.1, 0.5, 1.0, "l2", backend=backend)
        return out.detach(), grad_h, delta

    results, errors = {}, []

    def run(seed):
        try:
            results[seed] = work(seed, "triton")
        except Exception as exc:  # reported below: an exception in a thread would otherwise vanish
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(seed,)) for seed in (1, 2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, f"a thread failed: {errors[0]!r}"
    for seed, got in results.items():
        for actual, expected in zip(got, work(seed, "reference")):
            torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6)

"""Fixtures of the host-kernel tests."""

from types import SimpleNamespace

import pytest

from lpa_kernels import _host_ext


@pytest.fixture(params=["host", "torch"])
def reference_path(request, monkeypatch):
    """Runs a test on both paths of the reference backend: the host C++ kernels (a spy records their
    calls, and the test fails if none ran) and, with ``LPA_HOST_KERNELS=0``, its PyTorch ops. Yields
    ``SimpleNamespace(name, calls)``."""
    path = SimpleNamespace(name=request.param, calls=[])
    if request.param == "torch":
        monkeypatch.setenv("LPA_HOST_KERNELS", "0")
        yield path
        return
    module, error = _host_ext._load()
    if module is None:
        pytest.fail(f"the host extension is not built: {error}")

    def recorded(name):
        def call(*args):
            path.calls.append(name)
            return getattr(module, name)(*args)
        return call

    class Spy:  # every kernel of the module, recorded (not the LPA_HOST_KERNELS query every launcher makes)
        def __getattr__(self, name):
            return getattr(module, name) if name == "switched_off" else recorded(name)

    monkeypatch.setattr(_host_ext, "_load", lambda: (Spy(), None))
    yield path
    assert path.calls, "the host kernels never ran: the test checked the PyTorch path twice"

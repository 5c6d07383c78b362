"""ClassPerturbation and LPALinear against the op references (reference backend on CPU)."""

import pytest
import torch
import torch.nn.functional as F

from lpa_kernels.linear_perturb import naive as linear_naive
from lpa_kernels.nn import ClassPerturbation, LPALinear
from lpa_kernels.perturb import naive as perturb_naive
from lpa_kernels.pgd import naive as pgd_naive
from tests.helpers import make_labels

FEATURES = (3, 5, 4)
LAYOUTS = {"full": FEATURES, "channel": (3, 1, 1), "last": (1, 1, 4)}


def _per_class(value, k):
    return torch.full((k,), float(value), dtype=torch.float64)


@pytest.mark.parametrize("mode", ["add", "scale"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_class_perturbation_forward_backward_and_step_match_the_op_references(mode, layout):
    k, batch = 3, 7
    module = ClassPerturbation(k, LAYOUTS[layout], mode=mode, eps=0.7, step_size=0.2, norm="l2", dtype=torch.float64)
    with torch.no_grad():
        module.delta.uniform_(-0.3, 0.3)
    start = module.delta.clone()
    h = torch.randn(batch, *FEATURES, dtype=torch.float64, requires_grad=True)
    labels = make_labels(batch, k)
    weights = torch.randn(batch, *FEATURES, dtype=torch.float64)

    out = module(h, labels)
    expected = perturb_naive.perturb(h.detach(), labels, start, mode)
    assert torch.allclose(out, expected, rtol=1e-12, atol=0), "training forward differs from perturb's reference"
    (out * weights).sum().backward()
    grad_h = weights if mode == "add" else weights * (1 + start.expand(k, *FEATURES)[labels])
    assert torch.allclose(h.grad, grad_h, rtol=1e-12, atol=1e-14), "grad_h differs from the hand-derived gradient"
    class_grad = perturb_naive.class_grad(weights, labels, k, start.shape, h=h.detach(), mode=mode)

    assert module.step(), "step() found no class gradient after a training backward"
    reference = start.clone()
    pgd_naive.pgd_step_(reference, class_grad, _per_class(0.2, k), _per_class(0.7, k), _per_class(1.0, k), "l2")
    assert torch.allclose(module.delta, reference, rtol=1e-12, atol=1e-14), "single-pass step differs from pgd_step_'s reference"
    assert not module.step(), "a second step() without a new backward must do nothing"


def test_class_perturbation_is_identity_in_eval_and_without_labels():
    module = ClassPerturbation(2, (4,), eps=1.0)
    with torch.no_grad():
        module.delta.fill_(0.5)
    h, labels = torch.randn(3, 4), torch.tensor([0, 1, 1])
    assert torch.equal(module(h), h), "forward without labels must be the identity"
    module.eval()
    assert torch.equal(module(h, labels), h), "eval-mode forward must be the identity"


def test_class_perturbation_step_takes_overrides_and_reset_clears_delta_and_the_pending_gradient():
    k = 3
    module = ClassPerturbation(k, (4,), eps=0.5, step_size=0.1, direction=1.0, norm="l2", dtype=torch.float64)
    grad = torch.randn(k, 4, dtype=torch.float64)
    step, eps, direction = torch.tensor([0.2, 0.4, 0.6], dtype=torch.float64), 5.0, -0.5
    assert module.step(grad, step_size=step, eps=eps, direction=direction)
    reference = torch.zeros(k, 4, dtype=torch.float64)
    pgd_naive.pgd_step_(reference, grad, step, _per_class(eps, k), _per_class(direction, k), "l2")
    assert torch.allclose(module.delta, reference, rtol=1e-12, atol=1e-15), "step's overrides were not used"
    assert module.eps == 0.5 and module.step_size == 0.1 and module.direction == 1.0, "an override must not stick"

    module(torch.randn(2, 4, dtype=torch.float64), torch.tensor([0, 2])).sum().backward()
    assert module.live_delta().grad is not None
    module.reset()
    assert not module.delta.any(), "reset must zero delta"
    assert not module.step(), "reset must drop the pending class gradient"
    assert module.live_delta().data_ptr() == module.delta.data_ptr(), "the leaf must still share delta's storage"


@pytest.mark.parametrize("module_type", ["ClassPerturbation", "LPALinear"])
@pytest.mark.parametrize("bad", [dict(eps=-1.0), dict(step_size=float("nan")), dict(direction=torch.ones(5)),
                                 dict(grad=torch.ones(2, 2))], ids=["eps", "step_size", "direction", "grad"])
def test_a_refused_step_keeps_delta_and_the_pending_gradient(module_type, bad):
    """A bad override raises before anything changes: the gradient stays pending, so the next step uses it."""
    if module_type == "ClassPerturbation":
        module = ClassPerturbation(3, (4,), eps=0.5, step_size=0.1, dtype=torch.float64)
        module(torch.randn(5, 4, dtype=torch.float64), torch.tensor([0, 1, 2, 0, 1])).square().sum().backward()
    else:
        module = LPALinear(6, 4, num_classes=3, eps=0.5, step_size=0.1, dtype=torch.float64)
        module(torch.randn(5, 6, dtype=torch.float64), torch.tensor([0, 1, 2, 0, 1])).square().sum().backward()
    perturbation = module if module_type == "ClassPerturbation" else module.perturbation
    pending = perturbation.live_delta().grad.clone()
    with pytest.raises((ValueError, TypeError)):
        module.step(**bad)
    assert not perturbation.delta.any(), "the refused step changed delta"
    assert torch.equal(perturbation.live_delta().grad, pending), "the refused step dropped the pending gradient"
    reference = torch.zeros(3, 4, dtype=torch.float64)
    pgd_naive.pgd_step_(reference, pending, _per_class(0.1, 3), _per_class(0.5, 3), _per_class(1.0, 3),
                        perturbation.norm)
    assert module.step() and perturbation.live_delta().grad is None
    torch.testing.assert_close(perturbation.delta, reference, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("assign", [False, True])
def test_class_perturbation_trains_the_delta_it_loaded(assign):
    """load_state_dict, also with assign=True (meta-device loading replaces the buffer): the forward
    applies the loaded delta and step() updates it."""
    source = ClassPerturbation(2, (4,), eps=5.0, dtype=torch.float64)
    with torch.no_grad():
        source.delta.uniform_(-1, 1)
    loaded = source.delta.clone()  # assign=True hands source's own tensor over
    module = ClassPerturbation(2, (4,), eps=5.0, dtype=torch.float64)
    module.load_state_dict(source.state_dict(), assign=assign)
    h, labels = torch.randn(3, 4, dtype=torch.float64), torch.tensor([0, 1, 1])
    out = module(h, labels)
    torch.testing.assert_close(out, perturb_naive.perturb(h, labels, loaded, "add"))
    out.sum().backward()
    assert module.step()
    assert not torch.equal(module.delta, loaded), "step() did not update the loaded delta"
    torch.testing.assert_close(module(h, labels), perturb_naive.perturb(h, labels, module.delta, "add"))


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(num_classes=0), ValueError, "num_classes must be an int >= 1"),
    (dict(num_classes=2.0), TypeError, "num_classes must be an int >= 1"),
    (dict(mode="mul"), ValueError, "mode must be one of"),
    (dict(norm="l1"), ValueError, "norm must be one of"),
    (dict(eps=0.0), ValueError, "eps must be > 0"),
    (dict(eps=float("inf")), ValueError, "eps must be > 0 and finite"),
    (dict(step_size=-0.1), ValueError, "step_size must be >= 0"),
    (dict(direction=1.5), ValueError, r"direction must be in \[-1.0, 1.0\]"),
    (dict(direction=torch.tensor([1.0, -2.0])), ValueError, r"direction must be in \[-1.0, 1.0\]"),
    (dict(direction=float("nan")), ValueError, "direction must be in"),
    (dict(eps=torch.ones(3)), ValueError, r"eps must be a float or a tensor of shape \(2,\)"),
    (dict(backend="bogus"), ValueError, "backend must be one of"),
    (dict(backend=1), TypeError, "backend must be one of"),
    (dict(dtype=torch.int64), TypeError, "dtype must be a floating-point torch.dtype"),
    (dict(shape=4), TypeError, "shape must be a tuple of ints"),
    (dict(shape=(-4,)), ValueError, "shape must not have negative sizes"),
])
def test_class_perturbation_refuses_bad_settings_on_construction(kwargs, error, match):
    args = dict(num_classes=2, shape=(4,))
    args.update(kwargs)
    with pytest.raises(error, match=match):
        ClassPerturbation(**args)


def test_lpa_linear_refuses_an_out_of_range_direction_on_construction():
    with pytest.raises(ValueError, match=r"direction must be in \[-1.0, 1.0\]"):
        LPALinear(4, 4, 3, direction=2.0)


@pytest.mark.parametrize("activation", ["relu", "gelu", "silu", "none"])
@pytest.mark.parametrize("mode", ["add", "scale"])
@pytest.mark.parametrize("rows", [(), (3,)], ids=["2d", "3d"])
def test_lpa_linear_forward_backward_match_linear_perturb_reference(activation, mode, rows):
    k, batch, d_in, d_out = 4, 5, 6, 7
    layer = LPALinear(d_in, d_out, k, activation=activation, mode=mode, eps=2.0, step_size=0.1, norm="linf",
                      dtype=torch.float64)
    with torch.no_grad():
        layer.perturbation.delta.uniform_(-0.5, 0.5)
    delta = layer.perturbation.delta.clone().double().requires_grad_(True)
    x = torch.randn(batch, *rows, d_in, dtype=torch.float64, requires_grad=True)
    labels = make_labels(batch, k)
    weights = torch.randn(batch, *rows, d_out, dtype=torch.float64)

    out = layer(x, labels)
    w_ref, b_ref = (p.detach().clone().requires_grad_(True) for p in (layer.weight, layer.bias))
    x_ref = x.detach().clone().requires_grad_(True)
    expected = linear_naive.linear_perturb(x_ref, w_ref, b_ref, labels, delta, activation, mode)
    assert torch.allclose(out, expected, rtol=1e-12, atol=1e-14), "training forward differs from linear_perturb's reference"
    (out * weights).sum().backward()
    (expected * weights).sum().backward()
    for name, got, want in (("x", x.grad, x_ref.grad), ("weight", layer.weight.grad, w_ref.grad),
                            ("bias", layer.bias.grad, b_ref.grad)):
        assert torch.allclose(got, want, rtol=1e-10, atol=1e-12), f"grad of {name} differs from the reference"
    assert torch.allclose(layer.perturbation._live.grad, delta.grad, rtol=1e-10, atol=1e-12), "class gradient differs"

    assert layer.step()
    reference = delta.detach().clone()
    pgd_naive.pgd_step_(reference, delta.grad, _per_class(0.1, k), _per_class(2.0, k), _per_class(1.0, k), "linf")
    assert torch.allclose(layer.perturbation.delta.double(), reference, rtol=1e-6, atol=1e-7), "step differs from pgd_step_"

    layer.eval()
    with torch.no_grad():
        plain = linear_naive.ACTIVATION_FNS[activation](F.linear(x, layer.weight, layer.bias))
        assert torch.allclose(layer(x, labels), plain, rtol=1e-12, atol=1e-14), "eval forward must be act(linear(x))"


def _trained_once(module, h, y):
    module.train()
    module(h, y).square().sum().backward()
    return module


@pytest.mark.parametrize("make", [lambda: ClassPerturbation(3, (5,)), lambda: LPALinear(5, 5, 3)],
                         ids=["ClassPerturbation", "LPALinear"])
def test_modules_pickle_and_train_on_after_unpickling(make):
    """torch.save(model) pickles the module: no lambda hook, and the unpickled leaf is delta's view again."""
    import io
    import pickle

    h, y = torch.randn(4, 5), torch.tensor([0, 1, 2, 1])
    module = pickle.loads(pickle.dumps(make()))
    torch.save(module, io.BytesIO())
    _trained_once(module, h, y)
    perturbation = module if isinstance(module, ClassPerturbation) else module.perturbation
    before = perturbation.delta.clone()
    assert module.step() and not torch.equal(perturbation.delta, before)


@pytest.mark.parametrize("copy_with", ["deepcopy", "pickle"])
def test_a_copy_keeps_the_pending_class_gradient(copy_with):
    import copy
    import pickle

    module = _trained_once(LPALinear(5, 5, 3), torch.randn(4, 5), torch.tensor([0, 1, 2, 1]))
    twin = copy.deepcopy(module) if copy_with == "deepcopy" else pickle.loads(pickle.dumps(module))
    torch.testing.assert_close(twin.perturbation.live_delta().grad, module.perturbation.live_delta().grad)
    assert twin.step() and module.step()
    torch.testing.assert_close(twin.perturbation.delta, module.perturbation.delta)


def test_a_delta_may_be_set_to_none_like_any_buffer():
    module = ClassPerturbation(3, (5,))
    module.delta = None
    assert module.delta is None


def test_functional_call_and_torch_func_use_the_substituted_delta():
    from torch.func import functional_call

    module, h, y = ClassPerturbation(3, (5,)).train(), torch.zeros(2, 5), torch.tensor([0, 2])
    torch.testing.assert_close(functional_call(module, {"delta": torch.ones(3, 5)}, (h, y)), torch.ones(2, 5))
    grad = torch.func.grad(lambda d: functional_call(module, {"delta": d}, (h, y)).sum())(torch.zeros(3, 5))
    torch.testing.assert_close(grad, torch.tensor([[1.0] * 5, [0.0] * 5, [1.0] * 5]))
    torch.testing.assert_close(module(h, y), torch.zeros(2, 5))  # the buffer itself again afterwards


def test_an_assigned_delta_is_the_one_trained():
    module, h, y = ClassPerturbation(3, (5,)).train(), torch.zeros(2, 5), torch.tensor([0, 2])
    module.delta = torch.full((3, 5), 0.5)
    torch.testing.assert_close(module(h, y), torch.full((2, 5), 0.5))
    module(h, y).sum().backward()
    assert module.step() and module.delta[1].eq(0.5).all() and not module.delta[0].eq(0.5).all()


@pytest.mark.parametrize("move", ["same dtype", "double"])
def test_a_move_keeps_the_pending_class_gradient(move):
    module = _trained_once(ClassPerturbation(3, (5,)), torch.randn(4, 5), torch.tensor([0, 1, 2, 1]))
    expected = module.live_delta().grad.clone()
    module.to(torch.float32) if move == "same dtype" else module.double()
    torch.testing.assert_close(module.live_delta().grad, expected.to(module.delta.dtype))
    assert module.step()


def test_delta_stays_in_its_dtype_when_the_model_goes_16_bit_and_follows_float64():
    layer = LPALinear(4, 5, 3).half()
    assert (layer.weight.dtype, layer.perturbation.delta.dtype) == (torch.float16, torch.float32)
    assert layer.to(torch.bfloat16).perturbation.delta.dtype == torch.float32
    assert layer.double().perturbation.delta.dtype == torch.float64
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        assert LPALinear(4, 5, 3).perturbation.delta.dtype == torch.float64  # a float64 layer by default
    finally:
        torch.set_default_dtype(default)

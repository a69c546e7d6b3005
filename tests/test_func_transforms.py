"""Under torch.func transforms (vmap, grad, jvp) and forward-mode AD a fused model gives what
the eager one gives: the fused ops support neither, so the modules call their submodules
while one is active (unfused.differentiation_transform), with a warning. Before, vmap,
per-sample gradients and jvp over a converted model raised PyTorch's "must override the
setup_context staticmethod", and under forward_ad with grad mode off the triton kernels
dropped the tangent without a word. An op called with a dual tensor says so.
"""

import copy
import warnings

import pytest
import torch
from torch import nn
from torch.autograd import forward_ad

import fused_preact as fp
from fused_preact import ops
from fused_preact.testing import PreActBlock as EagerBlock
from fused_preact.testing import WideBasicBlock, randomize_bn
from helpers import TOL, assert_close, use_backend_or_skip

F64 = torch.float64


def model_pair(dtype, backend="reference"):
    """(eager, converted) copies of a small stage: a projection block, an identity block and
    a wide ResNet block (its in-place ReLU modules), BatchNorms with trained statistics."""
    torch.manual_seed(0)
    eager = nn.Sequential(EagerBlock(4, 6, 2), EagerBlock(6, 6), WideBasicBlock(6, 6, 1)).to(dtype)
    randomize_bn(eager)
    ours = fp.convert(copy.deepcopy(eager), backend=backend)
    assert isinstance(ours, fp.nn.FusedSequential)
    return eager, ours


def assert_fused_again(ours, x):
    """Outside the transform the blocks run fused: no warning of ours that they do not
    (other libraries' warnings, the Triton interpreter's numpy deprecations say, are not ours)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="fused_preact")
        ours(x)


def test_vmap_runs_the_submodules():
    eager, ours = model_pair(F64)
    eager.eval(), ours.eval()
    xs = torch.randn(3, 2, 4, 7, 7, dtype=F64)  # 3 batches of 2 images
    with pytest.warns(UserWarning, match="torch.func transform"):
        batched = torch.func.vmap(ours)(xs)
    assert_close(batched, torch.func.vmap(eager)(xs), F64, "vmap")
    assert_fused_again(ours, xs[0])


def test_per_sample_gradients_run_the_submodules():
    """The functorch recipe: vmap of grad over functional_call, each image its own batch (eval
    mode, as BatchNorm needs under vmap)."""
    eager, ours = model_pair(F64)
    eager.eval(), ours.eval()
    x = torch.randn(4, 4, 7, 7, dtype=F64)

    def per_sample_grads(model):
        params = {name: p.detach() for name, p in model.named_parameters()}

        def loss(p, image):
            out = torch.func.functional_call(model, p, (image[None],))
            return (out * torch.linspace(-1, 1, out.numel(), dtype=F64).view_as(out)).sum()
        return torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0))(params, x)
    with pytest.warns(UserWarning, match="torch.func transform"):
        ours_grads = per_sample_grads(ours)
    eager_grads = per_sample_grads(eager)
    assert ours_grads.keys() == eager_grads.keys()
    for name, grad in eager_grads.items():
        assert_close(ours_grads[name], grad, F64, name)


def test_func_jvp_runs_the_submodules():
    eager, ours = model_pair(F64)
    eager.eval(), ours.eval()
    x, tangent = torch.randn(2, 4, 7, 7, dtype=F64), torch.randn(2, 4, 7, 7, dtype=F64)
    with pytest.warns(UserWarning, match="torch.func transform"):
        out, derivative = torch.func.jvp(ours, (x,), (tangent,))
    ref_out, ref_derivative = torch.func.jvp(eager, (x,), (tangent,))
    assert_close(out, ref_out, F64, "output")
    assert_close(derivative, ref_derivative, F64, "jvp")


def test_func_transforms_in_train_mode_fail_as_eager():
    """In train mode a BatchNorm updates its buffers in place, which torch.func refuses:
    the same error as eager's, raised before any buffer changed."""
    eager, ours = model_pair(F64)
    x = torch.randn(2, 4, 7, 7, dtype=F64)
    for model in (ours, eager):
        with pytest.raises(RuntimeError, match="mutate a captured Tensor"), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.func.jvp(model, (x,), (torch.ones_like(x),))
    for (name, a), b in zip(ours.state_dict().items(), eager.state_dict().values()):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("grad_enabled", [False, True])
@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_forward_mode_ad_runs_the_submodules(backend, grad_enabled, monkeypatch):
    """A dual input's tangent comes out as eager's, in train mode (the running statistics as
    eager's too), with grad mode on (before: PyTorch's "implement the jvp function") or off
    (before: the triton backend's output had no tangent)."""
    dtype = torch.float32
    eager, ours = model_pair(dtype, backend)
    x, tangent = torch.randn(2, 4, 7, 7, dtype=dtype), torch.randn(2, 4, 7, 7, dtype=dtype)
    use_backend_or_skip(backend, monkeypatch, x)
    results = []
    for model in (ours, eager):
        with forward_ad.dual_level(), torch.set_grad_enabled(grad_enabled), warnings.catch_warnings(record=True) as got:
            warnings.simplefilter("always")
            out, derivative = forward_ad.unpack_dual(model(forward_ad.make_dual(x, tangent)))
        assert derivative is not None, "the tangent was dropped"
        results.append((out.detach(), derivative.detach(), [str(w.message) for w in got]))
    (out, derivative, warned), (ref_out, ref_derivative, _) = results
    assert any("forward-mode AD" in message for message in warned), warned
    assert_close(out, ref_out, dtype, "output")
    assert_close(derivative, ref_derivative, dtype, "tangent")
    for (name, a), b in zip(ours.state_dict().items(), eager.state_dict().values()):
        assert_close(a.double(), b.double(), F64, name, *TOL[dtype])
    assert_fused_again(ours, x)


def test_an_op_refuses_a_dual_tensor():
    x, w = torch.randn(2, 4, 5, 5), torch.randn(6, 4, 3, 3)
    with forward_ad.dual_level():
        dual = forward_ad.make_dual(x, torch.randn_like(x))
        with pytest.raises(RuntimeError, match="fused_preact::bn_relu_conv has no forward-mode derivative"):
            ops.bn_relu_conv(dual, None, None, None, None, w, None, [1, 1], [1, 1], 0.0, False, False,
                             None, None, None, None, "reference", 0)
        # A plain tensor inside a dual level is no reason to refuse.
        plain = ops.bn_relu_conv(x, None, None, None, None, w, None, [1, 1], [1, 1], 0.0, False, False,
                                 None, None, None, None, "reference", 0)
    assert plain[0].shape == (2, 6, 5, 5)

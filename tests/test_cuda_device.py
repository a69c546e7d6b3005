"""The ops launch on their tensors' device, as PyTorch's own ops do: Triton launches on the
current device, and a model on cuda:1 with cuda:0 current (DDP scripts that never call
torch.cuda.set_device) must not have its kernels launched on cuda:0.

Without two GPUs the wiring is checked on the CPU: another CUDA device is faked
(ops.other_cuda_device says one differs, torch.cuda.device records that it was entered), and
every Triton launch of a forward, recorded or replayed, and of a direct op call must come
while it is entered. The backward runs in autograd's thread for the gradients' device,
where that device is current already."""
import contextlib

import pytest
import torch

import fused_preact as fp
from fused_preact import block_autograd, ops
from fused_preact.backends.triton import launch
from fused_preact.testing import randomize_bn
from helpers import use_backend_or_skip

OTHER = torch.device("cuda", 1)


@pytest.fixture
def faked_device(monkeypatch):
    """(state, launches): state.entered while the faked torch.cuda.device(OTHER) is entered;
    launches, one entry per Triton launch, whether it came while it was."""
    use_backend_or_skip("triton", monkeypatch, torch.empty(0))
    block_autograd.PLANS.programs.clear()
    state = type("State", (), {"entered": False})()
    launches = []

    def other_cuda_device(t):
        return None if state.entered else OTHER

    @contextlib.contextmanager
    def device(which):
        assert which == OTHER and not state.entered
        state.entered = True
        try:
            yield
        finally:
            state.entered = False
    monkeypatch.setattr(ops, "other_cuda_device", other_cuda_device)
    monkeypatch.setattr(torch.cuda, "device", device)
    for name in ("launch", "launch_values"):
        real = getattr(launch.KernelLauncher, name)

        def noting(self, *args, real=real):
            launches.append(state.entered)
            return real(self, *args)
        monkeypatch.setattr(launch.KernelLauncher, name, noting)
    yield state, launches
    block_autograd.PLANS.programs.clear()


def test_a_block_forward_launches_on_its_inputs_device(faked_device):
    _state, launches = faked_device
    torch.manual_seed(0)
    block = fp.PreActBlock(5, 7, 2, backend="triton")
    randomize_bn(block)
    for mode in ("record", "replay", "replay"):
        launches.clear()
        x = torch.randn(2, 5, 6, 6, requires_grad=True)
        out = block(x)
        assert launches and all(launches), mode  # forward: the statistics pass and three units
        out.sum().backward()
    block.eval()
    for mode in ("record", "replay"):
        launches.clear()
        with torch.no_grad():
            block(torch.randn(2, 5, 6, 6))
        assert launches and all(launches), f"eval {mode}"


def test_a_direct_op_call_launches_on_its_inputs_device(faked_device):
    _state, launches = faked_device
    x = torch.randn(2, 4, 5, 5)
    ops.batch_stats(x, None, None, None, 0.1, "triton")
    assert launches and all(launches)


def test_the_backward_runs_where_autograd_puts_it():
    """What the module docstring relies on for the backward: autograd's engine runs a CUDA
    node's backward with the gradients' device current (checked where two GPUs are)."""
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs")
    seen = []

    class Note(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x.clone()

        @staticmethod
        def backward(ctx, grad):
            seen.append(torch.cuda.current_device())
            return grad
    x = torch.randn(4, device="cuda:1", requires_grad=True)
    with torch.cuda.device(0):
        Note.apply(x).sum().backward()
    assert seen == [1]


@pytest.mark.gpu
def test_a_model_on_another_gpu_trains_as_on_the_current_one():
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs")
    import copy
    torch.manual_seed(0)
    model = fp.models.preact_resnet18(num_classes=10, backend="triton")
    randomize_bn(model)
    results = []
    for device in ("cuda:0", "cuda:1"):
        ours = copy.deepcopy(model).to(device)
        x = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(1)).to(device)
        with torch.cuda.device(0):
            out = ours(x)
            out.square().mean().backward()
        results.append([out.cpu()] + [p.grad.cpu() for p in ours.parameters()])
    for a, b in zip(*results):  # (the stem conv and the classifier are cuDNN's and cuBLAS's)
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)

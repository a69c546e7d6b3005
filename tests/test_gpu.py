"""GPU-only checks at real sizes (run where CUDA exists; skipped elsewhere).

Tolerance is earned: the Triton block's error against an fp64 reference may be at most
a small multiple of eager PyTorch's own error in the same dtype.
"""
import pytest
import torch

import fused_preact as fp
from fused_preact.testing import PreActBlock as EagerBlock
from fused_preact.testing import PreActBottleneck as EagerBottleneck
from fused_preact.testing import randomize_bn

pytestmark = pytest.mark.gpu

REAL_CASES = [  # (kind, in_planes, planes, stride, batch, hw)
    ("basic", 64, 64, 1, 128, 32), ("basic", 64, 128, 2, 128, 32), ("basic", 256, 256, 1, 128, 8),
    ("bottleneck", 64, 16, 1, 128, 32), ("bottleneck", 256, 64, 1, 64, 56), ("bottleneck", 1024, 256, 2, 64, 14),
]


def pair(kind, in_planes, planes, stride):
    eager = (EagerBlock if kind == "basic" else EagerBottleneck)(in_planes, planes, stride)
    randomize_bn(eager)
    ours = (fp.PreActBlock if kind == "basic" else fp.PreActBottleneck)(in_planes, planes, stride, backend="triton")
    ours.load_state_dict(eager.state_dict())
    return ours.cuda().to(memory_format=torch.channels_last), eager.cuda().to(memory_format=torch.channels_last)


def grads(model, x, dtype):
    x = x.clone().requires_grad_(True)
    with torch.autocast("cuda", dtype=dtype, enabled=dtype != torch.float32):
        out = model(x)
    out.float().square().mean().backward()
    return [out.float(), x.grad.float()] + [p.grad.float() for p in model.parameters()]


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


# Known failures of the Triton float32 kernels on an H100 (triton 3.6, 2026-11-22), the
# reason exact float32 convolutions are declined on GPUs unless FUSED_PREACT_TRITON_FP32=1.
FP32_BLOCK_FAILURES = {
    ("bottleneck", 1024, 256, 2, 64, 14): "input gradient 1.3e-3 off vs eager's 1.5e-6",
    ("bottleneck", 256, 64, 1, 64, 56): "weight/BN gradients 3-4x eager's fp32 error (4e-5 to 8e-5)",
}


# Relative L2 error that tf32's rounding of both conv operands (10 mantissa bits) allows.
TF32_BOUND = 3e-3
# (dtype, tf32 allowed for convolutions, on both sides): float32 exact and as tf32 (PyTorch's default).
BLOCK_PRECISIONS = [(torch.bfloat16, False), (torch.float16, False), (torch.float32, False), (torch.float32, True)]


@pytest.mark.parametrize("precision", BLOCK_PRECISIONS, ids=["bf16", "fp16", "fp32", "tf32"])
@pytest.mark.parametrize("case", REAL_CASES)
def test_real_size_block_gradients_earned_tolerance(case, precision, request, monkeypatch):
    dtype, tf32 = precision
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", tf32)
    if dtype == torch.float32 and not tf32 and case in FP32_BLOCK_FAILURES:
        request.applymarker(pytest.mark.xfail(reason=f"triton fp32 on H100: {FP32_BLOCK_FAILURES[case]}"))
    kind, cin, planes, stride, batch, hw = case
    torch.manual_seed(0)
    ours, eager = pair(kind, cin, planes, stride)
    x = torch.randn(batch, cin, hw, hw, device="cuda").contiguous(memory_format=torch.channels_last)
    truth_model = (EagerBlock if kind == "basic" else EagerBottleneck)(cin, planes, stride).cuda().double()
    truth_model.load_state_dict(eager.state_dict())
    truth = grads(truth_model, x.double(), torch.float32)
    got = grads(ours, x, dtype)
    ref = grads(eager, x, dtype)
    # Exact float32 errors are tiny on both sides. tf32 rounds both conv operands to 10
    # mantissa bits (unit roundoff 2^-11): on an H100 our weight/BN gradients came out at
    # 1.3-1.5e-3 where cuDNN, free to pick fp32 kernels under allow_tf32, was at 0.5-4.5e-4. So
    # with tf32 the floor is tf32's own rounding, as in the op-level test, not eager's error.
    floor = TF32_BOUND if tf32 else 1e-5
    errors = [(rel_err(g, t), rel_err(r, t)) for g, r, t in zip(got, ref, truth)]
    bad = {i: f"{ours:.2e} vs eager {theirs:.2e}" for i, (ours, theirs) in enumerate(errors)
           if not ours <= 3 * theirs + floor}
    assert not bad, f"tensors (output, input grad, parameter grads) over 3x eager + {floor:.0e}: {bad}"


def timm_d_stage_models(device):
    """timm-layout blocks as a "d" model's stage boundary with drop_path_rate has them: a
    pooled avg_down projection (fused as a 2x2 stride-2 conv), a DropPath, then a pooled
    bottleneck projection. (eager, its float64 copy: the truth, fused on the triton backend)."""
    import copy

    import timm_like
    torch.manual_seed(0)
    eager = torch.nn.Sequential(
        timm_like.PreActBasic(64, 128, 2, avg_down=True),
        timm_like.PreActBasic(128, 128, drop_path=timm_like.DropPath(0.3)),
        timm_like.PreActBottleneck(128, 256, 2, avg_down=True, drop_path=timm_like.DropPath(0.3)))
    randomize_bn(eager)
    eager = eager.to(device, memory_format=torch.channels_last)
    ours, report = fp.convert(copy.deepcopy(eager), backend="triton", return_report=True)
    assert len(report.swapped) == 3 and not report.left, report
    return eager, copy.deepcopy(eager).double(), ours


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_timm_pooled_projection_and_drop_path_blocks_earned_tolerance(dtype):
    """The avg_down and drop-path blocks compiled for the GPU (the CPU tests run them in the
    interpreter, in float32 only): under autocast against the float64 truth, within 3x eager's
    own error plus 1e-5, as the real-size blocks. Each model draws its drop masks from the
    same seed."""
    eager, truth_model, ours = timm_d_stage_models("cuda")
    x = torch.randn(64, 64, 32, 32, device="cuda").contiguous(memory_format=torch.channels_last)
    results = []
    for model, run_dtype, source in ((truth_model, torch.float32, x.double()), (eager, dtype, x), (ours, dtype, x)):
        torch.manual_seed(1)
        results.append(grads(model, source, run_dtype))
    truth, ref, got = results
    errors = [(rel_err(g, t), rel_err(r, t)) for g, r, t in zip(got, ref, truth)]
    bad = {i: f"{o:.2e} vs eager {e:.2e}" for i, (o, e) in enumerate(errors) if not o <= 3 * e + 1e-5}
    assert not bad, f"tensors (output, input grad, parameter grads) over 3x eager + 1e-05: {bad}"


def kernel_names(fn):
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]


@pytest.mark.parametrize("amp", [False, True], ids=["fp32", "amp-bf16"])
def test_launch_budget_forward_basic_block_identity(amp):
    """Training forward of a chained identity basic block: 2 conv launches of ours, nothing else
    (each conv's last programs merge the next BatchNorm's statistics; under autocast the
    kernels cast the float32 weights and add the float32 identity stream themselves). The
    model is channels_last, as README advises (a default-layout 3x3 weight is copied into the
    kernels' layout before each forward and dgrad launch: one more small kernel each)."""
    block = fp.PreActBlock(64, 64, backend="triton").cuda().to(memory_format=torch.channels_last)
    consumer = fp.PreActBlock(64, 64, backend="triton").cuda().consumer()
    x = torch.randn(128, 64, 32, 32, device="cuda").contiguous(memory_format=torch.channels_last)
    moments = fp.ops.batch_stats(x, None, None, None, None, "triton")

    def forward():
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
            return block.forward_with_stats(x, moments, consumer)
    forward()  # warm-up: autotuning, compilation
    names = kernel_names(forward)
    print("\n".join(names))
    assert sum("bn_relu_conv_fwd_kernel" in n for n in names) == 2
    assert len(names) == 2, names


@pytest.mark.parametrize("planes,stride,convs", [(64, 1, 2), (128, 2, 3)], ids=["identity", "projection"])
@pytest.mark.parametrize("amp", [False, True], ids=["fp32", "amp-bf16"])
def test_launch_budget_backward_basic_block(amp, planes, stride, convs):
    """Backward: a dgrad and a wgrad per conv, a BN-backward pass per BatchNorm, nothing else
    (the identity gradient is added in the first unit's BN-backward pass; a projection's
    gradient joins conv1's dgrad, so bn1's backward runs once; no weight-gradient cast under
    autocast). Channels_last model, as in the forward's budget."""
    block = fp.PreActBlock(64, planes, stride, backend="triton").cuda().to(memory_format=torch.channels_last)
    # channels_last, as the kernels write dx: a leaf of another layout gets its gradient
    # copied into that layout by autograd (one more kernel, PyTorch's, eager's too).
    x = torch.randn(128, 64, 32, 32, device="cuda").contiguous(memory_format=torch.channels_last).requires_grad_()

    def forward():
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
            return block(x)
    forward().sum().backward()  # warm-up
    out = forward()
    grad = torch.ones_like(out)
    block.zero_grad(set_to_none=True)  # accumulating into existing gradients would add kernels
    x.grad = None
    names = kernel_names(lambda: out.backward(grad))
    print("\n".join(names))
    assert sum("dgrad_kernel" in n for n in names) == convs
    assert sum("wgrad_kernel" in n for n in names) == convs
    assert sum("bn_backward_apply_kernel" in n for n in names) == 2
    assert len(names) == 2 * convs + 2, names


def test_cuda_graph_capture_of_a_training_step():
    """No host synchronisation inside the ops: a training step captures into a CUDA graph."""
    block = fp.PreActBlock(32, 32, backend="triton").cuda()
    x = torch.randn(16, 32, 16, 16, device="cuda", requires_grad=True)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            block(x).sum().backward()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        block(x).sum().backward()
    graph.replay()
    torch.cuda.synchronize()
    assert torch.isfinite(x.grad).all()


def test_gradscaler_fp16_training_step():
    model = torch.nn.Sequential(fp.PreActBlock(16, 32, 2, backend="triton"), fp.PreActBlock(32, 32, backend="triton")).cuda()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cuda")
    x = torch.randn(8, 16, 16, 16, device="cuda")
    for _ in range(3):
        opt.zero_grad()
        with torch.autocast("cuda", dtype=torch.float16):
            loss = model(x).float().square().mean()
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_compile_reduce_overhead_matches_eager():
    torch.manual_seed(0)
    model = torch.nn.Sequential(fp.PreActBlock(16, 16, backend="triton"), fp.PreActBlock(16, 16, backend="triton")).cuda().eval()
    compiled = torch.compile(model, mode="reduce-overhead", fullgraph=True)
    x = torch.randn(8, 16, 16, 16, device="cuda")
    for _ in range(3):
        out = compiled(x)
    torch.testing.assert_close(out, model(x), atol=1e-4, rtol=1e-4)


@pytest.fixture
def cuda_kernels(monkeypatch):
    monkeypatch.setenv("FUSED_PREACT_ENABLE_CUDA_BACKEND", "1")
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", True)


def test_triton_declines_exact_float32_convolutions_by_default(monkeypatch):
    """Without the opt-in, exact float32 on the GPU never reaches the failing kernels: forcing
    triton raises with the reason, auto falls back to the reference backend; as tf32 (PyTorch's
    default for convolutions) triton runs them."""
    monkeypatch.delenv("FUSED_PREACT_TRITON_FP32")
    monkeypatch.delenv("FUSED_PREACT_BACKEND")  # conftest's "reference": let auto choose
    monkeypatch.delenv("FUSED_PREACT_ENABLE_CUDA_BACKEND", raising=False)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    x = torch.randn(4, 16, 8, 8, device="cuda").contiguous(memory_format=torch.channels_last)
    with pytest.raises(fp.BackendNotSupported, match="exact float32 convolutions"):
        fp.PreActBlock(16, 32, 2, backend="triton").cuda()(x)
    w = torch.randn(32, 16, 1, 1, device="cuda")
    assert fp.dispatch.select("bn_relu_conv", [x, w], conv_dtype=torch.float32).name == "reference"
    assert fp.dispatch.select("bn_relu_conv", [x, w.bfloat16()], conv_dtype=torch.bfloat16).name == "triton"
    with torch.autocast("cuda", dtype=torch.bfloat16):
        fp.PreActBlock(16, 32, 2, backend="triton").cuda()(x)  # bf16 convolutions still run on triton
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", True)
    assert fp.dispatch.select("bn_relu_conv", [x, w], conv_dtype=torch.float32).name == "triton"
    fp.PreActBlock(16, 32, 2, backend="triton").cuda()(x)


def test_a_gpu_with_less_shared_memory_runs_the_float32_forward_shallower(monkeypatch):
    """A GPU of compute capability 8.6 / 8.9 (RTX 30xx / 40xx) has 99 KB of shared memory per
    block. Reported so here (Triton checks it before a launch), the tf32 forward's three
    pipeline stages do not fit: it runs with fewer, and computes what the reference backend does."""
    import triton.compiler.compiler as triton_compiler
    from fused_preact import ops
    from fused_preact.backends.triton import conv_fwd
    from fused_preact.backends.triton.launch import capturing
    monkeypatch.setattr(triton_compiler, "max_shared_mem", lambda device: 101376)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", True)
    c, k = 72, 136  # tiles no other test compiles: Triton loads the kernel afresh, and checks it
    x = (torch.randn(4, c, 20, 20, device="cuda") + 0.5).contiguous(memory_format=torch.channels_last)
    w = torch.randn(k, c, 3, 3, device="cuda") * (2 / (9 * c)) ** 0.5
    mean, var = x.mean((0, 2, 3)), x.var((0, 2, 3), unbiased=False)
    gamma, beta = torch.rand(c, device="cuda") + 0.5, torch.randn(c, device="cuda")
    args = (x, mean, var, gamma, beta, w, None, [1, 1], [1, 1], 1e-5, True, True, None, None, None, None)
    with capturing() as capture:
        y, *_ = ops.bn_relu_conv(*args, "triton")
    stages = [launch.compiled.metadata.num_stages for launch in capture.launches
              if launch.launcher is conv_fwd.bn_relu_conv_fwd_kernel]
    assert stages and all(s < 3 for s in stages), stages
    truth, *_ = ops.bn_relu_conv(*[a.double() if isinstance(a, torch.Tensor) else a for a in args], "reference")
    assert rel_err(y, truth) < 2e-3  # tf32 operands: about 3e-4


def test_cuda_backend_block_training_step(cuda_kernels):
    torch.manual_seed(0)
    ours, eager = pair("bottleneck", 64, 32, 2)
    ours.backend = "cuda"
    x = torch.randn(32, 64, 16, 16, device="cuda").contiguous(memory_format=torch.channels_last)
    got = grads(ours, x, torch.bfloat16)
    ref = grads(eager, x, torch.bfloat16)
    for i, (g, r) in enumerate(zip(got, ref)):
        assert rel_err(g, r) < 3e-2, f"tensor {i}: {rel_err(g, r):.2e}"


def test_autotuning_updates_running_statistics_once():
    """With autotuning on, the first launch of a shape times every config by running the
    kernel: the running statistics the forward conv updates are restored after each trial,
    so the real launch counts the batch once (a subprocess: the configs are fixed at import)."""
    import os
    import subprocess
    import sys
    code = """
import torch, fused_preact as fp
x = torch.randn(8, 16, 12, 12, device="cuda")
w = torch.randn(24, 16, 3, 3, device="cuda", dtype=torch.bfloat16)
rm, rv, nbt = torch.zeros(24, device="cuda"), torch.ones(24, device="cuda"), torch.zeros((), device="cuda", dtype=torch.long)
y, mean, var = fp.ops.bn_relu_conv(x.bfloat16(), None, None, None, None, w, None, [1, 1], [1, 1], 1e-5, False, True,
                                   rm, rv, nbt, 0.5, "triton")
n = mean.new_tensor(y.numel() // y.shape[1])
assert nbt.item() == 1, nbt.item()
torch.testing.assert_close(rm, 0.5 * mean)
torch.testing.assert_close(rv, 0.5 + 0.5 * var * n / (n - 1))
print("ok")
"""
    env = dict(os.environ, FUSED_PREACT_TRITON_AUTOTUNE="1")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr[-3000:]


def test_two_level_merges_are_bitwise_repeatable_and_right_at_real_size():
    """At a real size the in-kernel merges run both levels with programs truly concurrent
    (hundreds of tiles per channel block, groups of tens): three runs bitwise equal, and the
    merged statistics and sums against float64."""
    from fused_preact.backends.triton.common import stats_tiles
    from fused_preact.backends.triton.merge import merge_block, merge_group
    torch.manual_seed(0)
    n, c, k, hw = 64, 64, 64, 32
    tiles = stats_tiles(n * hw * hw)
    assert tiles > merge_group(tiles, merge_block(tiles, c))  # more than one group
    x = (torch.randn(n, c, hw, hw, device="cuda") * 2 + 3).bfloat16().contiguous(memory_format=torch.channels_last)
    w = (torch.randn(k, c, 3, 3, device="cuda") * 0.05).bfloat16().contiguous(memory_format=torch.channels_last)
    mean, var = x.float().mean((0, 2, 3)), x.float().var((0, 2, 3), unbiased=False)
    gamma, beta = torch.rand(c, device="cuda") + 0.5, torch.randn(c, device="cuda")
    dy = torch.randn(n, k, hw, hw, device="cuda").bfloat16().contiguous(memory_format=torch.channels_last)
    conf = ([1, 1], [1, 1], 1e-5)

    def run():
        stats = fp.ops.batch_stats(x, None, None, None, None, "triton")
        y, y_mean, y_var = fp.ops.bn_relu_conv(x, mean, var, gamma, beta, w, None, *conf[:2], 1e-5, True, True,
                                               None, None, None, None, "triton")
        g, sums = fp.ops.bn_relu_conv_dgrad(dy, w, x, mean, var, gamma, beta, *conf, "triton")
        dw = fp.ops.bn_relu_conv_wgrad(dy, x, mean, var, gamma, beta, list(w.shape), *conf, "triton", torch.float32)
        return [*stats, y, y_mean, y_var, g, sums, dw]
    first = run()
    for again in (run(), run()):
        assert all(torch.equal(a, b) for a, b in zip(first, again))
    x_mean, x_var, y, y_mean, y_var, g, sums, dw = first
    xd = x.double()
    assert rel_err(x_mean, xd.mean((0, 2, 3))) < 1e-5 and rel_err(x_var, xd.var((0, 2, 3), unbiased=False)) < 1e-5
    yd = y.double()  # the statistics are those of the stored y
    assert rel_err(y_mean, yd.mean((0, 2, 3))) < 1e-5 and rel_err(y_var, yd.var((0, 2, 3), unbiased=False)) < 1e-5
    gd = g.double()
    xhat = (xd - mean.double()[:, None, None]) / (var.double()[:, None, None] + 1e-5).sqrt()
    ref_sums = torch.stack([gd.sum((0, 2, 3)), (gd * xhat).sum((0, 2, 3))])
    assert rel_err(sums, ref_sums) < 1e-5
    act = torch.relu(xhat * gamma.double()[:, None, None] + beta.double()[:, None, None]).bfloat16().double()
    ref_dw = torch.nn.grad.conv2d_weight(act, list(w.shape), dy.double(), 1, 1)
    assert rel_err(dw, ref_dw) < 1e-2  # bf16 operands (the activation rounded as the kernel rounds it)


def test_blocks_on_two_streams_at_once_keep_their_merges_apart():
    """The merge counters and partials are kept per stream (merge.merge_buffers): two blocks
    training at the same time on two streams give bitwise what each gives alone."""
    import copy
    torch.manual_seed(0)
    blocks = [pair("basic", 64, 64, 1)[0] for _ in range(2)]
    alone_blocks = [copy.deepcopy(b) for b in blocks]
    xs = [torch.randn(128, 64, 32, 32, device="cuda").contiguous(memory_format=torch.channels_last) for _ in blocks]

    def step(block, x):
        x = x.clone().requires_grad_(True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = block(x)
        out.float().square().mean().backward()
        return [out.detach().clone(), x.grad.clone()] + [p.grad.clone() for p in block.parameters()]
    alone = [step(b, x) for b, x in zip(alone_blocks, xs)]
    streams = [torch.cuda.Stream() for _ in blocks]
    torch.cuda.synchronize()
    together = []
    for stream, block, x in zip(streams, blocks, xs):
        with torch.cuda.stream(stream):  # queued without waiting: the two streams' kernels overlap
            together.append(step(block, x))
    torch.cuda.synchronize()
    for ours, reference in zip(together, alone):
        assert all(torch.equal(a, b) for a, b in zip(ours, reference))


def test_bound_replays_equal_the_wrappers_step_after_step(monkeypatch):
    """A block's plan replayed from bound calls (backends/triton/replay.py: the kept compiled
    kernels launched with the launch arguments of the first call) gives bitwise what replaying
    it through the wrappers gives, over training steps with channels_last and NCHW inputs and
    an input 4 bytes off a 16-byte boundary (plans of their own), forward and backward."""
    import copy

    from fused_preact import block_autograd
    from fused_preact.backends.base import Backend
    from fused_preact.backends.triton.backend import TritonBackend
    torch.manual_seed(0)
    bound_block = pair("basic", 64, 64, 1)[0]
    wrapper_block = copy.deepcopy(bound_block)
    inputs = []
    for layout in ("cl", "cl", "unaligned", "nchw", "cl"):
        x = torch.randn(32, 64, 16, 16, device="cuda")
        if layout == "unaligned":
            x = torch.empty(x.numel() + 1, device="cuda")[1:].view(32, 16, 16, 64).permute(0, 3, 1, 2).copy_(x)
        inputs.append(x.contiguous(memory_format=torch.channels_last) if layout == "cl" else x)

    def steps(block):
        results = []
        for x in inputs:
            x = x.detach().requires_grad_(True)
            with torch.autocast("cuda", dtype=torch.bfloat16):
                out = block(x)
            out.float().square().mean().backward()
            results.append([out.detach().clone(), x.grad.clone()] + [p.grad.clone() for p in block.parameters()]
                           + [b.clone() for b in block.buffers()])
        return results
    block_autograd.PLANS.programs.clear()
    bound = steps(bound_block)
    assert any(type(call.impl).__name__ == "BoundCall" for p in block_autograd.PLANS.programs.values()
               for call in p.calls)
    block_autograd.PLANS.programs.clear()
    monkeypatch.setattr(TritonBackend, "bind", Backend.bind)
    through_wrappers = steps(wrapper_block)
    block_autograd.PLANS.programs.clear()
    for i, (ours, reference) in enumerate(zip(bound, through_wrappers)):
        assert all(torch.equal(a, b) for a, b in zip(ours, reference)), f"step {i}"

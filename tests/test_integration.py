"""Ecosystem: torch.compile, autocast, checkpoints / pickling / deepcopy, .to(), determinism,
nn.DataParallel's replicas."""
import copy
import io
import pickle

import pytest
import torch
from torch import nn

import fused_preact as fp
from fused_preact import ops
from fused_preact.entry import OpEntry, dynamo_traces_the_ops
from fused_preact.testing import PreActBlock as EagerBlock
from fused_preact.testing import PreActBottleneck as EagerBottleneck
from fused_preact.testing import RawShortcutPreActBlock
from fused_preact.testing import randomize_bn
from helpers import DEVICE, assert_close, assert_step_within_eager_error, node_names, use_backend_or_skip


def small_pair(dtype=torch.float32):
    torch.manual_seed(0)
    # projection, identity (its first unit carries x for the shortcut), projection bottleneck
    eager = nn.Sequential(EagerBlock(3, 4, 2), EagerBlock(4, 4, 1), EagerBottleneck(4, 2, 1)).to(dtype)
    randomize_bn(eager)
    ours = nn.Sequential(fp.PreActBlock(3, 4, 2), fp.PreActBlock(4, 4, 1), fp.PreActBottleneck(4, 2, 1)).to(dtype)
    ours.load_state_dict(eager.state_dict())
    return ours, eager


def step(model, x):
    x = x.clone().requires_grad_(True)
    out = model(x)
    out.square().mean().backward()
    return out, x.grad


@pytest.mark.parametrize("training,compiler", [(True, "aot_eager"), (False, "aot_eager"), (True, "inductor")])
def test_torch_compile_fullgraph(training, compiler):
    """No graph breaks (custom ops with fake implementations, real strides = fake strides);
    same numbers as eager, running statistics included."""
    ours, eager = small_pair()
    ours.train(training), eager.train(training)
    assert_compiled_steps_match_eager(torch.compile(ours, fullgraph=True, backend=compiler), ours, eager)


def assert_compiled_steps_match_eager(compiled, ours, eager):
    """Two training steps of `compiled` (of `ours`) against `eager`: outputs, input gradients,
    then state (running statistics) and parameter gradients."""
    for _ in range(2):  # second call: the running-stat mutations replay correctly
        x = torch.randn(2, 3, 8, 8)
        out, dx = step(compiled, x)
        ref, ref_dx = step(eager, x)
        assert_close(out, ref, torch.float32, "compiled output")
        assert_close(dx, ref_dx, torch.float32, "compiled grad x")
    for (name, a), (_, b) in zip(ours.state_dict().items(), eager.state_dict().items()):
        assert_close(a.double(), b.double(), torch.float64, name, atol=1e-5, rtol=1e-5)
    for (name, p), (_, q) in zip(ours.named_parameters(), eager.named_parameters()):
        assert_close(p.grad, q.grad, torch.float32, f"grad {name}", atol=1e-4, rtol=1e-3)


@pytest.mark.parametrize("version,traces", [("2.5.1+cu124", False), ("2.6.0", False), ("2.7.1+cu126", True),
                                            ("2.13.0+cpu", True), ("2.10.0a0+git1234", True)])
def test_dynamo_traces_the_ops_from_torch_2_7(version, traces):
    assert dynamo_traces_the_ops(version) is traces


def test_a_compiled_model_runs_ops_left_to_eager_like_eager(monkeypatch):
    """Where Dynamo cannot trace the ops (torch < 2.7) each op call is a graph break: the
    compiled model (not fullgraph) still computes what eager does, state and gradients included."""
    for entry in [v for v in vars(ops).values() if isinstance(v, OpEntry)]:
        monkeypatch.setattr(entry, "call", entry.call)  # put back after the test
        entry.leave_to_eager_under_compile()
    ours, eager = small_pair()
    assert_compiled_steps_match_eager(torch.compile(ours, backend="aot_eager"), ours, eager)


def test_autocast_bf16_cpu_matches_eager_autocast():
    """Conv in bf16, BN statistics and parameters in fp32, fp32 parameter gradients."""
    ours, eager = small_pair()
    x = torch.randn(4, 3, 8, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, dx = step(ours, x)
        ref, ref_dx = step(eager, x)
    assert out.dtype == ref.dtype == torch.bfloat16
    assert_close(out.float(), ref.float(), torch.bfloat16, "output")
    for (name, p), (_, q) in zip(ours.named_parameters(), eager.named_parameters()):
        assert p.grad.dtype == torch.float32, name
        scale = q.grad.abs().max().item()
        assert_close(p.grad, q.grad, torch.bfloat16, f"grad {name}", atol=0.05 * scale, rtol=0.05)
    for (name, a), (_, b) in zip(ours.named_buffers(), eager.named_buffers()):
        assert a.dtype == b.dtype, name
        if a.is_floating_point():
            assert_close(a, b, torch.bfloat16, name)


@pytest.mark.parametrize("backend", fp.dispatch.BACKEND_NAMES)
def test_autocast_float32_stream_matches_eager(backend, monkeypatch):
    """Blocks fed float32 under autocast: eager's `conv(...) + shortcut` promotes, so the
    residual stream stays float32 from block to block; ours adds the float32 shortcut in the
    epilogue (y float32, statistics for the next block from the same pass) and the backward
    casts the float32 dy tile by tile. Projection blocks too: a raw-input projection conv
    reads the float32 x itself (tiles cast in the kernel), and both projections' dx join
    the first unit's."""
    dtype = torch.float16 if DEVICE == "cpu" else torch.bfloat16  # the CPU interpreter declines bf16
    x = torch.randn(3, 8, 6, 6, device=DEVICE)
    use_backend_or_skip(backend, monkeypatch, x, conv_dtype=dtype)
    torch.manual_seed(0)
    eager = nn.Sequential(EagerBlock(8, 8), EagerBlock(8, 8), RawShortcutPreActBlock(8, 12, 2),
                          EagerBlock(12, 16)).to(DEVICE)
    randomize_bn(eager)
    ours = fp.convert(copy.deepcopy(eager), backend=backend)
    assert sum(isinstance(m, fp.PreActBlock) for m in ours.modules()) == 4  # convert's probe took every block
    truth = copy.deepcopy(eager).double()
    truth_out, truth_dx = step(truth, x.double())
    with torch.autocast(DEVICE, dtype=dtype):
        out, dx = step(ours, x)
        ref, ref_dx = step(eager, x)
    assert out.dtype == ref.dtype == dtype  # a projection's conv output ends the float32 stream

    def assert_as_close_as_eager(ours_t, eager_t, true_t, what):
        """Within twice eager's own error against float64, plus one rounding step of the
        autocast dtype at the tensor's largest value (eager's error can be near 0 by luck)."""
        err = lambda t: (t.double() - true_t).abs().max().item()  # noqa: E731
        floor = torch.finfo(dtype).eps * true_t.abs().max().item()
        assert err(ours_t) <= 2 * err(eager_t) + floor, f"{what}: ours {err(ours_t):.2e}, eager {err(eager_t):.2e}"
    assert_as_close_as_eager(out, ref, truth_out, "output")
    assert_as_close_as_eager(dx, ref_dx, truth_dx, "grad x")
    for (name, p), (_, q), (_, t) in zip(ours.named_parameters(), eager.named_parameters(), truth.named_parameters()):
        assert p.grad.dtype == torch.float32, name
        assert_as_close_as_eager(p.grad, q.grad, t.grad, f"grad {name}")
    for (name, a), (_, b) in zip(ours.named_buffers(), eager.named_buffers()):
        assert a.dtype == b.dtype, name
        if a.is_floating_point():
            assert_close(a, b, dtype, name)


def test_checkpoint_pickle_deepcopy_round_trips():
    ours, _ = small_pair()
    ours(torch.randn(2, 3, 8, 8))  # non-default running statistics
    ours.eval()
    x = torch.randn(2, 3, 8, 8)
    expected = ours(x)
    buffer = io.BytesIO()
    torch.save(ours, buffer)
    buffer.seek(0)
    for clone in (torch.load(buffer, weights_only=False), pickle.loads(pickle.dumps(ours)), copy.deepcopy(ours)):
        assert torch.equal(clone(x), expected)
    fresh = small_pair()[0].eval()
    buffer = io.BytesIO()
    torch.save(ours.state_dict(), buffer)
    buffer.seek(0)
    fresh.load_state_dict(torch.load(buffer))
    assert torch.equal(fresh(x), expected)


def checkpointed(model: nn.Sequential, how: str):
    """model's forward under activation checkpointing as memory-bound training recipes use it
    (timm's set_grad_checkpointing calls checkpoint_seq, which calls checkpoint per segment)."""
    from torch.utils.checkpoint import checkpoint, checkpoint_sequential
    if how == "sequential":
        return lambda x: checkpoint_sequential(model, 2, x, use_reentrant=False)
    return lambda x: model[2](checkpoint(model[:2], x, use_reentrant=how == "reentrant"))


@pytest.mark.parametrize("how", ["reentrant", "non-reentrant", "sequential"])
@pytest.mark.parametrize("backend", fp.dispatch.BACKEND_NAMES)
def test_activation_checkpointing_gives_eagers_training_step(backend, how, monkeypatch):
    """torch.utils.checkpoint runs a segment's forward again in backward (the blocks' saved
    tensors then come from the recomputation), and its BatchNorms count the batch twice, as
    eager ones do. float32 against the float64 truth under the same checkpointing, within
    twice eager float32's error (plus the float32 floor); the running statistics and
    num_batches_tracked as eager's."""
    x = torch.randn(3, 3, 8, 8, device=DEVICE)
    use_backend_or_skip(backend, monkeypatch, x)
    eager = small_pair()[1].to(DEVICE)
    eager(torch.randn(4, 3, 8, 8, device=DEVICE))  # trained running statistics, num_batches_tracked 1
    truth = copy.deepcopy(eager).double()
    ours = fp.convert(copy.deepcopy(eager), backend=backend)
    results = []
    for model, dtype in ((truth, torch.float64), (eager, torch.float32), (ours, torch.float32)):
        xd = x.to(dtype).requires_grad_(True)
        out = checkpointed(model, how)(xd)
        (out * torch.linspace(-1, 1, out.numel(), dtype=dtype, device=DEVICE).view_as(out)).sum().backward()
        results.append([out, xd.grad, *(p.grad for p in model.parameters()), *model.buffers()])
    counted = [b.item() for n, b in ours.named_buffers() if n.endswith("num_batches_tracked")]
    assert counted[:2] == [3, 3], counted  # the first block was recomputed: counted twice (the loop: as eager)
    assert_step_within_eager_error(eager, *results, how)


def data_parallel_replica(network: nn.Module) -> nn.Module:
    """What nn.parallel.replicate makes of `network` for its first device, following its code
    (replicate itself needs CUDA devices): each module a _replicate_for_data_parallel() shallow
    copy holding its children's replicas, the buffers themselves, and its parameters as non-leaf
    copies set as plain attributes (Broadcast's outputs; nn.DataParallel replicates on every
    forward, so they are new tensors each time)."""
    modules = list(network.modules())
    index = {module: i for i, module in enumerate(modules)}
    replicas = [module._replicate_for_data_parallel() for module in modules]
    for module, replica in zip(modules, replicas):
        for name, child in module._modules.items():
            if child is None:
                replica._modules[name] = None
            else:
                setattr(replica, name, replicas[index[child]])
        for name, param in module._parameters.items():
            if param is None:
                replica._parameters[name] = None
            else:
                setattr(replica, name, param.clone())
    return replicas[0]


@pytest.mark.parametrize("backend", fp.dispatch.BACKEND_NAMES)
def test_data_parallel_replicas_are_one_node_per_block_and_train_like_eager(backend, monkeypatch):
    """nn.DataParallel's replicas hold the parameters as non-leaf tensors (a replica's threads
    run on one GPU each, under the GIL: host time counts twice there): their blocks are one
    autograd node each, the next step's replica replays the plans, and the gradients reach
    the model's parameters. Two steps, float32 against the float64 truth replicated the same
    way, within twice eager float32's error (plus the float32 floor)."""
    x = torch.randn(3, 3, 8, 8, device=DEVICE)
    use_backend_or_skip(backend, monkeypatch, x)
    eager = small_pair()[1].to(DEVICE)
    truth = copy.deepcopy(eager).double()
    ours = fp.convert(copy.deepcopy(eager), backend=backend)
    monkeypatch.setattr(fp.block_autograd.PLANS, "programs", {})  # (those of convert's probe)
    for step_index in range(2):
        if step_index == 1:
            monkeypatch.setattr(ops, "check_unit_args", lambda *_, **__: pytest.fail("a replica ran the glue"))
        results = []
        for model, dtype in ((truth, torch.float64), (eager, torch.float32), (ours, torch.float32)):
            model.zero_grad(set_to_none=True)
            xd = x.to(dtype).clone().requires_grad_(True)
            out = data_parallel_replica(model)(xd)
            (out * torch.linspace(-1, 1, out.numel(), dtype=dtype, device=DEVICE).view_as(out)).sum().backward()
            results.append([out, xd.grad, *(p.grad for p in model.parameters()), *model.buffers()])
        assert node_names(results[2][0])["BlockFunctionBackward"] == len(ours)
        assert_step_within_eager_error(eager, *results, f"step {step_index}")


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")  # the shape checks, constant for a trace
def test_jit_trace_records_the_registered_ops_and_saves(tmp_path):
    """torch.jit.trace of a converted model in eval mode, grad mode on (parameters require
    grad, as a deployment script traces): its own check passes (it re-traces under no_grad),
    the graph holds the registered ops and no Python call, and it saves, loads and runs
    another batch size as eager does. A backward through it says the op has no formula."""
    ours, eager = small_pair(torch.float64)
    ours.eval(), eager.eval()
    traced = torch.jit.trace(ours, torch.randn(2, 3, 9, 9, dtype=torch.float64))
    graph = str(traced.inlined_graph)
    units = 3 + 2 + 4  # projection block, identity block, projection bottleneck (small_pair)
    assert graph.count("fused_preact::bn_relu_conv") == units and "PythonOp" not in graph
    torch.jit.save(traced, tmp_path / "traced.pt")
    loaded = torch.jit.load(tmp_path / "traced.pt")
    x = torch.randn(5, 3, 9, 9, dtype=torch.float64, requires_grad=True)
    assert_close(loaded(x), eager(x), torch.float64, "traced, saved and loaded")
    with pytest.raises(RuntimeError, match="no autograd formula"):
        loaded(x).sum().backward()


@pytest.mark.parametrize("training", [False, True])
def test_torch_export_records_the_registered_ops(training):
    """torch.export (the deployment path after TorchScript): the exported program holds the
    registered ops and computes what eager does, running statistics included."""
    ours, eager = small_pair(torch.float64)
    ours.train(training), eager.train(training)
    x = torch.randn(2, 3, 9, 9, dtype=torch.float64)
    exported = torch.export.export(ours, (x,))
    # In the graph or in its subgraphs (torch 2.7 wraps grad-mode regions in higher-order ops).
    graphs = "".join(str(module.graph) for module in exported.graph_module.modules() if hasattr(module, "graph"))
    assert graphs.count("fused_preact.bn_relu_conv") == 3 + 2 + 4  # as in small_pair
    assert_close(exported.module()(x), eager(x), torch.float64, "exported program")
    if training:  # the exported module updates the running statistics it holds, as eager does
        buffers = dict(exported.module().named_buffers())
        for name, value in eager.named_buffers():
            assert_close(buffers[name], value, torch.float64, name)


def test_jit_script_says_what_to_use_instead():
    ours, _ = small_pair()
    for module in (ours, fp.FusedBNReLUConv2d(4, 4)):
        with pytest.raises(RuntimeError, match="torch.jit.script cannot compile .* use torch.compile, torch.export "
                                               "or torch.jit.trace"):
            torch.jit.script(module)


def test_to_dtype_and_channels_last():
    ours, eager = small_pair()
    ours.to(torch.float64).to(memory_format=torch.channels_last)
    eager.to(torch.float64)
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    out, dx = step(ours, x)
    ref, ref_dx = step(eager, x)
    assert_close(out, ref, torch.float64, "float64 channels_last")
    assert_close(dx, ref_dx, torch.float64, "float64 grad")


@pytest.mark.parametrize("backend", fp.dispatch.BACKEND_NAMES)
def test_deterministic_algorithms_mode(backend, monkeypatch):
    """torch.use_deterministic_algorithms(True) never meets a non-deterministic kernel of
    ours: a training step runs, and two runs agree bitwise."""
    use_backend_or_skip(backend, monkeypatch, torch.empty(0, device=DEVICE))
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        results = []
        for _ in range(2):
            torch.manual_seed(0)
            block = fp.PreActBlock(4, 5, 2, backend=backend).to(DEVICE)
            x = torch.randn(2, 4, 7, 7, device=DEVICE, requires_grad=True)
            block(x).square().sum().backward()
            results.append([x.grad] + [p.grad for p in block.parameters()])
        for a, b in zip(*results):
            assert torch.equal(a, b)
    finally:
        torch.use_deterministic_algorithms(previous)


def test_dynamic_batch_compiles_once_on_triton():
    """mark_dynamic on the batch: batch sizes on both sides of one statistics tile (64 rows
    here) reuse one graph, and each matches eager."""
    torch._dynamo.reset()
    ours = fp.PreActBlock(4, 4, backend="triton").to(DEVICE)
    eager = EagerBlock(4, 4).to(DEVICE)
    eager.load_state_dict(ours.state_dict())
    compiled = torch.compile(ours, backend="aot_eager", fullgraph=True)
    with torch._dynamo.config.patch(error_on_recompile=True):
        for batch in (2, 3, 5):
            x = torch.randn(batch, 4, 4, 4, device=DEVICE)
            torch._dynamo.mark_dynamic(x, 0)
            assert_close(compiled(x), eager(x), torch.float32, f"batch {batch}", atol=1e-4, rtol=1e-4)

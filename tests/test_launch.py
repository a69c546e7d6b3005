"""The Triton kernels' direct launch (fused_preact/backends/triton/launch.py) hands Triton's
launcher exactly what kernel[grid](...) would: the same compiled kernel, grid and arguments,
for every kernel of the triton backend, through changes of alignment and shape.

Checked without a GPU: a subprocess (compiled kernels, not the interpreter) makes the
stand-in driver of benchmarks/stand_in_driver.py active, so Triton compiles for sm_90 and
each launch is recorded instead of made; it runs the same sequence of launches through
kernel[grid] and through the direct path and writes both records for this test to compare.
In process, a stand-in kernel checks when the direct path must not be taken.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent


def describe(value):
    """A launch argument as comparable data: tensors by what a kernel's launch depends on
    (outputs are allocated afresh by each run), everything else by type and value."""
    if isinstance(value, torch.Tensor):
        return ["tensor", str(value.dtype), list(value.shape), list(value.stride()), value.data_ptr() % 16 == 0]
    return [type(value).__name__, repr(value)]


def launch_sequence(x_by_case: dict) -> None:
    """One launch of every triton-backend kernel for each input x (a unit's forward,
    backward and statistics; with and without the identity gradient)."""
    from fused_preact.backends.triton import bn_backward, conv_dgrad, conv_fwd, conv_wgrad, stats
    for x in x_by_case.values():
        n, c = x.shape[:2]
        w = torch.randn(24, c, 3, 3)
        v = torch.rand(c) + 0.5
        running = (torch.zeros(24), torch.ones(24), torch.zeros((), dtype=torch.long), 0.1)
        y, *_ = conv_fwd.bn_relu_conv(x, v, v, v, v, w, None, [1, 1], [1, 1], 1e-5, True, *running, torch.float32)
        conv_fwd.bn_relu_conv(x, v, v, None, None, w, y, [1, 1], [1, 1], 1e-5, False, None, None, None, 0.1,
                              torch.float32)
        dy = torch.randn_like(y)
        g, sums = conv_dgrad.bn_relu_conv_dgrad(dy, w, x, v, v, v, v, [1, 1], [1, 1], 1e-5, torch.float32)
        conv_wgrad.bn_relu_conv_wgrad(dy, x, v, v, v, v, list(w.shape), [1, 1], [1, 1], 1e-5, torch.float32,
                                      torch.float32)
        stats.batch_stats(x, v.clone(), v.clone(), None, 0.1)
        stats.bn_finalize(torch.rand(4, 3, c), v.clone(), v.clone(), torch.zeros((), dtype=torch.long), None)
        for dx_other in (None, torch.randn_like(x)):
            bn_backward.bn_backward_apply(g, x, v, v, v, sums, n * 49, 1e-5, True, dx_other)


def record(out: Path, autotune: str) -> None:
    """Run in the subprocess: both paths over the same inputs, records written to `out`.
    autotune "1": the conv kernels are triton.autotune'd (the stand-in's timer makes it
    choose the last config), "0": one fixed config."""
    os.environ["FUSED_PREACT_TRITON_AUTOTUNE"] = autotune
    from benchmarks import stand_in_driver
    launches: list = []
    stand_in_driver.install(90, launches)
    import triton
    from fused_preact.backends.triton import launch
    triton_runs = []  # kernel[grid] launches that went through JITFunction.run
    real_run = triton.runtime.jit.JITFunction.run

    def counted_run(self, *args, grid, warmup, **kwargs):
        if not warmup:
            triton_runs.append(self.__name__)
        return real_run(self, *args, grid=grid, warmup=warmup, **kwargs)
    triton.runtime.jit.JITFunction.run = counted_run

    torch.manual_seed(0)
    base = torch.randn(3 * 16 * 7 * 7 + 1)
    aligned = base[:3 * 16 * 7 * 7].view(3, 7, 7, 16).permute(0, 3, 1, 2)  # channels_last
    x_by_case = {"aligned": aligned,
                 "unaligned": base[1:].view(3, 7, 7, 16).permute(0, 3, 1, 2),  # 4 bytes past a 16-byte boundary
                 "aligned again": aligned.clone(memory_format=torch.channels_last),
                 "another batch": torch.randn(2, 16, 7, 7).contiguous(memory_format=torch.channels_last)}
    result = {}
    launch.DIRECT = False
    launch_sequence(x_by_case)  # compiles, and autotunes: trial launches not compared
    for path, direct in (("kernel[grid]", False), ("direct", True), ("direct, kept", True)):
        launch.DIRECT = direct
        launches.clear()
        triton_runs.clear()
        launch_sequence(x_by_case)
        result[path] = {"launches": [[r.name, r.kernel_hash, list(r.grid), [describe(a) for a in r.args]]
                                     for r in launches], "triton_runs": len(triton_runs)}
    result["launches_per_case"] = len(launches) // len(x_by_case)
    out.write_text(json.dumps(result))


def record_block_steps(out: Path) -> None:
    """Run in the subprocess: training steps of a basic and a bottleneck block in channels_last
    and a basic block with default-layout weights (CPU tensors standing for CUDA ones, as in
    benchmarks.launch_cost), their plans replayed from bound calls (replay.py) or through the
    wrappers, with inputs and gradients aligned to 16 bytes or not, the kept kernels launched
    directly or not; the launches of each step written to `out`."""
    from benchmarks import stand_in_driver
    launches: list = []
    stand_in_driver.install(90, launches)
    import fused_preact as fp
    from fused_preact import block_autograd
    from fused_preact.backends.base import Backend
    from fused_preact.backends.triton import backend as triton_backend
    from fused_preact.backends.triton import launch
    from fused_preact.backends.triton.replay import BoundCall
    fp.dispatch.get_backend("triton").interpreted = True  # CPU tensors stand for CUDA ones
    triton_backend.interpreter_reason = lambda: None

    def at(t, aligned):  # t's values and strides, 16-byte aligned or 4 bytes past
        flat = torch.empty(t.numel() + 1)
        view = flat[0 if aligned else 1:][:t.numel()].as_strided(t.shape, t.stride())
        return view.copy_(t)
    result = {}
    for path in ("bound", "wrappers"):
        if path == "wrappers":
            triton_backend.TritonBackend.bind = Backend.bind
        block_autograd.PLANS.programs.clear()
        torch.manual_seed(0)
        blocks = [fp.PreActBlock(16, 16, 1, backend="triton").to(memory_format=torch.channels_last),
                  fp.PreActBottleneck(16, 4, 1, backend="triton").to(memory_format=torch.channels_last),
                  fp.PreActBlock(16, 16, 1, backend="triton")]  # default-layout weights: copied per call
        steps = []
        for aligned, direct in ((True, True), (True, True), (False, True), (True, True), (True, False)):
            launch.DIRECT = direct  # False: kept kernels are launched through kernel[grid]
            for block in blocks:
                x = at(torch.randn(2, 16, 8, 8).contiguous(memory_format=torch.channels_last), aligned)
                launches.clear()
                y = block(x.requires_grad_(True))
                y.backward(at(torch.randn_like(y), aligned))
                steps.append([[r.name, r.kernel_hash, list(r.grid), [describe(a) for a in r.args]] for r in launches])
        programs = list(block_autograd.PLANS.programs.values())
        replays = [c.impl for p in programs for c in p.calls] + [
            c.impl for p in programs for recorded in p.requests.values() for c in recorded.calls]
        result[path] = {"steps": steps, "bound_calls": sum(isinstance(r, BoundCall) and all(
            launch.compiled is not None for launch in r.launches) for r in replays)}
    out.write_text(json.dumps(result))


def record_shallower(out: Path, autotune: str) -> None:
    """Run in the subprocess: a float32 (tf32) forward whose three pipeline stages take more
    shared memory than a GPU of compute capability 8.6 has (99 KB), launched twice on one
    compiled for it; the launches (stages, shared memory) and the kernel kept written to
    `out`."""
    os.environ["FUSED_PREACT_TRITON_AUTOTUNE"] = autotune
    from benchmarks import stand_in_driver
    launches: list = []
    stand_in_driver.install(86, launches)
    from fused_preact.backends.triton import conv_fwd
    torch.backends.cudnn.allow_tf32 = True
    x = torch.randn(2, 64, 8, 8).contiguous(memory_format=torch.channels_last)
    w = torch.randn(128, 64, 3, 3)
    v = torch.rand(64) + 0.5
    for _ in range(2):
        launches.clear()
        conv_fwd.bn_relu_conv(x, v, v, v, v, w, None, [1, 1], [1, 1], 1e-5, False, None, None, None, 0.1,
                              torch.float32)
        recorded = [[r.name, r.num_stages, r.shared] for r in launches]
    kept = list(conv_fwd.bn_relu_conv_fwd_kernel.kept.values())
    out.write_text(json.dumps({"launches": recorded, "limit": stand_in_driver.MAX_SHARED_MEM[86],
                               "kept_stages": [k.metadata.num_stages for k in kept]}))


class FakeKernel:
    """Stands for a JITFunction (its launches and warmup recorded) in the in-process tests."""
    arg_names = ["x_ptr", "n", "FLAG"]

    def __init__(self):
        self.calls = []

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.calls.append(("kernel[grid]", grid, args, kwargs))

    def warmup(self, *args, grid, **kwargs):
        calls = self.calls

        class Compiled:
            def __getitem__(self, grid):
                return lambda *values: calls.append(("direct", grid, values))
        return Compiled()


def test_direct_launch_only_for_a_signature_seen_and_complete(monkeypatch):
    """In process, with a stand-in kernel: the kept kernel is launched with every parameter
    in order and a 3-d grid; an alignment change, True for 1, a launch option among the
    keywords, a parameter left to its default, or the switch off go through kernel[grid]."""
    from fused_preact.backends.triton import launch

    class Device:
        active = type("Active", (), {"get_current_device": staticmethod(lambda: 0)})()
    monkeypatch.setattr(launch, "driver", Device)
    monkeypatch.setattr(launch, "DIRECT", True)
    kernel = FakeKernel()
    launcher = launch.KernelLauncher(kernel, {"num_warps": 4})
    base = torch.zeros(8)
    aligned, unaligned = base[:4], base[1:5]

    def paths(*calls):
        kernel.calls.clear()
        for args, kwargs in calls:
            launcher[(2,)](*args, **kwargs)
        return [c[0] for c in kernel.calls]
    assert paths(((aligned, 5), {"FLAG": True}), ((aligned, 5), {"FLAG": True})) == ["kernel[grid]", "direct"]
    assert kernel.calls[-1] == ("direct", (2, 1, 1), (aligned, 5, True))
    assert paths(((unaligned, 5), {"FLAG": True}), ((unaligned, 5), {"FLAG": True})) == ["kernel[grid]", "direct"]
    assert paths(((aligned, 5), {"FLAG": 1})) == ["kernel[grid]"]  # True == 1, but not to Triton
    assert kernel.calls[0][3] == {"FLAG": 1, "num_warps": 4}
    assert paths(*[((aligned, 5), {"FLAG": True, "num_stages": 2})] * 2) == ["kernel[grid]"] * 2
    assert paths(((aligned,), {"FLAG": True}), ((aligned,), {"FLAG": True})) == ["kernel[grid]"] * 2
    monkeypatch.setattr(launch, "DIRECT", False)
    assert paths(((aligned, 5), {"FLAG": True})) == ["kernel[grid]"]


def test_no_direct_launch_before_triton_3_3(monkeypatch):
    """Triton 3.0-3.2's own launch hands a compiled kernel's launcher only the parameters that
    are not constexprs, the direct launch every parameter (as 3.3 and later do): off there."""
    from fused_preact.backends.triton import launch
    monkeypatch.setattr(launch, "interpreter_on", lambda: False)
    monkeypatch.delenv("FUSED_PREACT_TRITON_DIRECT_LAUNCH", raising=False)
    for version, wanted in (("3.0.0", False), ("3.2.0", False), ("3.3.1", True), ("3.6.0", True), ("3.10.0", True)):
        monkeypatch.setattr(launch.triton, "__version__", version)
        assert launch.direct_launch_wanted() is wanted, version
    monkeypatch.setenv("FUSED_PREACT_TRITON_DIRECT_LAUNCH", "0")
    assert not launch.direct_launch_wanted()


@pytest.mark.slow
@pytest.mark.parametrize("autotune", ["0", "1"])
def test_direct_launch_hands_over_what_kernel_grid_would(autotune, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # compiled, not interpreted
    env["PYTHONPATH"] = str(ROOT)
    out = tmp_path / "launches.json"
    subprocess.run([sys.executable, __file__, str(out), autotune], cwd=ROOT, env=env, check=True,
                   capture_output=True)
    result = json.loads(out.read_text())
    through_triton, direct, kept = (result[p]["launches"] for p in ("kernel[grid]", "direct", "direct, kept"))
    per_case = result["launches_per_case"]
    assert per_case == 8 and len(through_triton) == 4 * per_case
    assert direct == through_triton  # first sight of each signature: Triton launches, the kernel is kept
    assert kept == through_triton  # from the kept kernels: the same kernels, grids and arguments
    assert result["direct, kept"]["triton_runs"] == 0 and result["kernel[grid]"]["triton_runs"] == 4 * per_case
    # The test means something: Triton compiled other kernels for the unaligned input.
    hashes = [[launch[1] for launch in through_triton[i * per_case:(i + 1) * per_case]] for i in range(4)]
    assert hashes[0] == hashes[2] and hashes[0] != hashes[1]


@pytest.mark.slow
def test_bound_replays_launch_what_their_wrappers_would(tmp_path):
    """A block's plan replayed from bound calls hands Triton's launcher the same compiled
    kernels, grids and arguments as replaying it through the wrappers, step after step, with
    the direct launch on or off; an input and gradient off a 16-byte boundary are launched
    as their wrappers would (another specialisation), not with the aligned ones' kernels."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # compiled, not interpreted
    env["PYTHONPATH"] = str(ROOT)
    out = tmp_path / "steps.json"
    subprocess.run([sys.executable, __file__, str(out), "block"], cwd=ROOT, env=env, check=True,
                   capture_output=True)
    result = json.loads(out.read_text())
    # Each block's first step records (and autotunes: trial launches); the replays follow.
    bound, wrappers = result["bound"]["steps"][3:], result["wrappers"]["steps"][3:]
    assert [len(step) for step in bound] == [9, 13, 9] * 4
    assert bound == wrappers
    # Per block a plan for aligned and one for unaligned tensors (the key has the alignment),
    # each bound: the statistics pass and the convs forward, wgrad, dgrad and BN-backward per unit.
    assert result["bound"]["bound_calls"] == 2 * ((3 + 2 * 3) + (4 + 3 * 3) + (3 + 2 * 3))
    assert result["wrappers"]["bound_calls"] == 0
    # The test means something: the unaligned steps were specialised otherwise.
    assert [launch[1] for launch in bound[3]] != [launch[1] for launch in bound[0]]


@pytest.mark.slow
@pytest.mark.parametrize("autotune", ["0", "1"])
def test_a_kernel_over_the_gpus_shared_memory_runs_with_fewer_stages(autotune, tmp_path):
    """Compiled for compute capability 8.6 (99 KB of shared memory per block): the float32
    forward's configured depth (every config, when autotuned) does not fit, so it is launched
    with the deepest pipeline that does, and that kernel is kept for the next launch."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # compiled, not interpreted
    env["PYTHONPATH"] = str(ROOT)
    out = tmp_path / "shallower.json"
    subprocess.run([sys.executable, __file__, str(out), "shallower", autotune], cwd=ROOT, env=env, check=True,
                   capture_output=True)
    result = json.loads(out.read_text())
    [(name, stages, shared)] = result["launches"]  # the second launch: one, with the kept kernel
    assert name == "bn_relu_conv_fwd_kernel" and stages == 2 and shared <= result["limit"]
    assert result["kept_stages"] == [2]


def test_no_depth_that_fits_is_a_clear_error(monkeypatch):
    """Where even one stage is over the GPU's shared memory: an error naming the kernel, the
    bytes and what to do, raised before anything ran."""
    from triton.runtime.errors import OutOfResources
    from fused_preact.backends.triton import launch

    class OverKernel(FakeKernel):
        __name__ = "over_kernel"

        def __getitem__(self, grid):
            raise OutOfResources(300000, 101376, "shared memory")

        def warmup(self, *args, grid, **kwargs):
            self.calls.append(("warmup", kwargs["num_stages"]))
            return type("Compiled", (), {"metadata": type("Metadata", (), {"shared": 200000})})()
    monkeypatch.setattr(launch, "DIRECT", False)
    kernel = OverKernel()
    with pytest.raises(RuntimeError, match="over_kernel needs 200000 bytes of shared memory .* 101376 per block; "
                                           "use backend='reference'"):
        launch.KernelLauncher(kernel, {"num_warps": 4, "num_stages": 3})[(2,)](torch.zeros(4), 5, FLAG=True)
    assert kernel.calls == [("warmup", 2), ("warmup", 1)]


if __name__ == "__main__":
    if sys.argv[2] == "block":
        record_block_steps(Path(sys.argv[1]))
    elif sys.argv[2] == "shallower":
        record_shallower(Path(sys.argv[1]), sys.argv[3])
    else:
        record(Path(sys.argv[1]), sys.argv[2])

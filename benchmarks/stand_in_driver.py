"""A Triton driver for a machine without a GPU: it names a CUDA target, so Triton's JIT
compiles our kernels for it (benchmarks.sass reads their SASS), and it "launches" a
compiled kernel by handing the launch to a recorder instead of the CUDA driver
(benchmarks.host_cost times Triton's whole host path with it, tests/test_launch.py
compares what two launch paths hand over). Nothing runs: outputs stay unwritten.

    install(arch=90, launches=None)   # before the first launch; launches: a list to record into
"""
from __future__ import annotations

from triton.backends.compiler import GPUTarget
from triton.runtime import driver

# Shared memory per block a kernel may use (the device property Triton checks before a launch):
# A100, RTX 30xx / 40xx (8.6, 8.9: 99 KB), H100.
MAX_SHARED_MEM = {80: 166912, 86: 101376, 89: 101376, 90: 232448}


class Launch:
    """One recorded launch: the compiled kernel (name, hash, pipeline stages, shared memory)
    and what its launcher got."""

    def __init__(self, metadata, grid: tuple, stream, args: tuple):
        self.name, self.kernel_hash = metadata.name, metadata.hash
        self.num_stages, self.shared = metadata.num_stages, metadata.shared
        self.grid, self.stream, self.args = grid, stream, args


class StandInDriver:
    """What Triton asks of the active driver to compile and launch: target, device,
    stream, device properties, a loaded binary, a launcher (here: a recorder) and the
    autotuner's timer."""

    def __init__(self, arch: int, launches: list | None):
        self.target = GPUTarget("cuda", arch, 32)
        self.launches = launches  # None: record nothing
        stand_in = self

        class Recorder:
            """Triton's launcher for one compiled kernel: records instead of launching."""

            def __init__(self, src, metadata):
                self.metadata = metadata

            def __call__(self, grid_x, grid_y, grid_z, stream, function, *args):
                if stand_in.launches is not None:
                    # args: packed metadata, launch metadata, enter / exit hooks, the kernel's arguments
                    stand_in.launches.append(Launch(self.metadata, (grid_x, grid_y, grid_z), stream, args[4:]))

        self.launcher_cls = Recorder
        self.utils = self

    def get_current_target(self):
        return self.target

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_device_properties(self, device):
        return {"max_shared_mem": MAX_SHARED_MEM[self.target.arch]}

    def get_benchmarker(self):
        """triton.autotune's timer: runs each trial once and reports it faster than the one
        before, so the last config tried wins (a choice other than the first)."""
        trials = []

        def time_trial(kernel_call, quantiles=None, **_):
            kernel_call()
            trials.append(None)
            return [1.0 / len(trials)] * (len(quantiles) if quantiles else 1)
        return time_trial

    def load_binary(self, name, kernel, shared, device):
        """(module, function, registers, spills, max threads per block) of a loaded binary."""
        return object(), object(), 0, 0, 1024


def install(arch: int = 90, launches: list | None = None) -> StandInDriver:
    """Make the stand-in the active Triton driver (for good: run in its own process)."""
    stand_in = StandInDriver(arch, launches)
    driver.set_active(stand_in)
    return stand_in

"""Launching a compiled Triton kernel with less host work than kernel[grid](...).

kernel[grid](...) (JITFunction.run) binds and specialises every argument on every call
(our conv kernels have up to 61 parameters, constexprs included): more host time than
anything else one launch of ours costs (python -m benchmarks.launch_cost measures both
paths without a GPU; benchmarks/results/ has what it measured). What it decides depends only on the arguments' types, the
values of the integer, boolean and constexpr ones, whether each tensor is 16-byte aligned,
the launch options and the current device. So the first launch of each such *signature*
goes through Triton (which compiles or finds the kernel, and autotunes where configured),
and the CompiledKernel Triton chose for it is kept; later launches with the same signature
call it directly with CompiledKernel[grid](*args), Triton's own launcher of a compiled
kernel (on the current stream, so CUDA graphs capture it as before).

The signature is a superset of Triton's specialisation key (exact integer values where
Triton only asks "divisible by 16?"), so a kept kernel is never launched with arguments it
was not compiled for; it only means one entry per layer shape. Every launch goes through
kernel[grid] in the interpreter (nothing is compiled there), with a Triton before 3.3 (whose
compiled kernels take other arguments) or whose compiled kernels cannot be launched that way,
or with FUSED_PREACT_TRITON_DIRECT_LAUNCH=0.
Inside `capturing()` each launch is also handed back with its values and compiled kernel,
and what `derived` made for it (replay.py keeps them to launch again without the wrapper).
"""
from __future__ import annotations

import contextlib
import operator
import os
import threading
from typing import Callable, Iterator, NamedTuple

import torch
import triton
from triton.runtime import driver
from triton.runtime.errors import OutOfResources

from ..base import major_minor
from .common import interpreter_on
from .merge import zero_counters


def direct_launch_wanted() -> bool:
    """The direct launch, unless switched off (FUSED_PREACT_TRITON_DIRECT_LAUNCH=0), in the
    interpreter (nothing is compiled) or with a Triton before 3.3: its own launch hands a
    compiled kernel's launcher only the parameters that are not constexprs, where the direct
    launch hands it every one, as Triton 3.3 and later do (under triton 3.1 the launcher got
    14 values for bn_finalize_kernel's 9, benchmarks/results/2026-12-07-cpu-old-triton-*)."""
    return (os.environ.get("FUSED_PREACT_TRITON_DIRECT_LAUNCH", "1") != "0" and not interpreter_on()
            and major_minor(triton.__version__) >= (3, 3))


# Read at import; benchmarks.launch_cost and the fused-triton-jit-launch provider flip it to
# time both paths in one run.
DIRECT = direct_launch_wanted()
MAX_KEPT = 1024  # signatures kept per kernel (a new shape every step must not grow it without end)


class Launched(NamedTuple):
    """One launch as `capturing` saw it."""
    launcher: "KernelLauncher"
    grid: tuple
    values: tuple | None  # every parameter's value in order (None: one was left to its default)
    compiled: object  # the CompiledKernel launched (or kept for this signature), None if none


class Capture(NamedTuple):
    """What `capturing` saw."""
    launches: list[Launched]
    derived: dict  # id(a tensor `derived` made) -> (the tensor it was made from, the function)


_captured = threading.local()


@contextlib.contextmanager
def capturing() -> Iterator[Capture]:
    """Collect the launches this thread makes inside the `with` statement, and the tensors
    made for them by `derived` (replay.bind watches a wrapper call with it)."""
    previous = getattr(_captured, "value", None)
    _captured.value = capture = Capture([], {})
    try:
        yield capture
    finally:
        _captured.value = previous


def derived(make: Callable, tensor: torch.Tensor) -> torch.Tensor:
    """make(tensor), a tensor a wrapper makes from an argument to launch with (a weight in
    the kernels' layout); noted where a call is captured, so that a replay makes it again."""
    made = make(tensor)
    capture = getattr(_captured, "value", None)
    if capture is not None and made is not tensor:
        capture.derived[id(made)] = (tensor, make)
    return made


# With one config, a BM x BN tile larger than this gets 8 warps instead of the config's 4:
# at 4 warps (128 threads) its float32 accumulator alone is over 64 registers per thread, and
# at 128 x 128 sm_90 spilled up to 2.5 KB per thread (dgrad, 1x1 forward; the 3x3 forward
# 20-60 B) where 8 warps spill 0-232 B (benchmarks/results/2026-11-25-cpu-sass-dc1ea69-warps).
WIDE_TILE = 128 * 64


def warp_configs() -> list[triton.Config]:
    """Autotune space: warps and pipeline depth (tile shapes are fixed by the launcher).
    The interpreter takes exactly one config; FUSED_PREACT_TRITON_AUTOTUNE=0 (the GPU test
    runs) keeps only the first, which skips the compile-and-time of the others, but for
    wider tiles (KernelLauncher.options_for)."""
    if interpreter_on():
        return [triton.Config({}, num_warps=4, num_stages=1)]
    configs = [triton.Config({}, num_warps=w, num_stages=s) for w in (4, 8) for s in (3, 4)]
    return configs if os.environ.get("FUSED_PREACT_TRITON_AUTOTUNE", "1") != "0" else configs[:1]


def autotune_warps(key: list[str], restore: tuple[str, ...] = ()):
    """Decorator: a KernelLauncher of triton.autotune over warp_configs(), keyed on the
    argument names `key`; `restore` names the arguments a launch updates in place (running
    statistics), put back after each timed trial so that only the real launch counts. With
    one config there is nothing to choose, so no autotuner (its bookkeeping is host time on
    every launch): the kernel launches with that config's warps and stages."""
    configs = warp_configs()
    if len(configs) > 1:
        return lambda kernel: KernelLauncher(triton.autotune(configs=configs, key=key,
                                                             restore_value=list(restore))(kernel))
    return lambda kernel: KernelLauncher(kernel, dict(num_warps=configs[0].num_warps,
                                                      num_stages=configs[0].num_stages))


def compile_for(jit, grid: tuple, args: tuple, kwargs: dict, options: dict):
    """The CompiledKernel Triton's JIT has (or makes) for this launch: compiled, not launched."""
    compiled = jit.warmup(*args, grid=grid, **kwargs, **options)
    return compiled.result() if hasattr(compiled, "result") else compiled  # async compile mode


def launcher(**options):
    """Decorator: a KernelLauncher of a kernel launched with these launch options (num_warps,
    ...; Triton's defaults for the others)."""
    return lambda kernel: KernelLauncher(kernel, options)


def picker(keys):
    """f(container) -> the tuple of its items at `keys` (operator.itemgetter: C speed, but
    a bare item for a single key)."""
    if len(keys) == 1:
        return lambda container, key=keys[0]: (container[key],)
    return operator.itemgetter(*keys) if keys else lambda container: ()


class KernelLauncher:
    """kernel[grid](*args, **kwargs) for a JITFunction launched with fixed `options`
    (num_warps, num_stages), or for a triton.autotune Autotuner (options None: the config
    it chose), launching the kept CompiledKernel directly where the signature was seen."""

    def __init__(self, kernel, options: dict | None = None):
        self.kernel = kernel
        self.options = options or {}
        self.autotuned = options is None  # a triton.autotune Autotuner chooses the options
        self.jit = kernel.fn if self.autotuned else kernel  # the JITFunction
        self.arg_names = tuple(self.jit.arg_names)
        # The positions of a kernel's tile constexprs BM and BN where the options are fixed
        # (no autotuner to choose the warps): see options_for.
        tiled = not self.autotuned and "num_warps" in options and {"BM", "BN"} <= set(self.arg_names)
        self.tile = (self.arg_names.index("BM"), self.arg_names.index("BN")) if tiled else None
        self.kept: dict[tuple, object] = {}  # signature -> CompiledKernel
        self.rest_by_count: dict[int, Callable] = {}  # positional count -> picks the other parameters from kwargs
        self.layouts: dict[tuple, tuple[Callable, Callable]] = {}  # argument types -> picks tensors, the others

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.launch(tuple(grid), args, kwargs)

    def launch(self, grid: tuple, args: tuple, kwargs: dict) -> None:
        captured = getattr(_captured, "value", None)
        values = self.parameter_values(args, kwargs) if DIRECT or captured is not None else None
        key = self.signature(values) if DIRECT and values is not None else None
        compiled = self.kept.get(key) if key is not None else None
        if compiled is not None:
            compiled[grid + (1,) * (3 - len(grid))](*values)
        else:
            compiled = self.launch_through_triton(grid, args, kwargs, key)
        if captured is not None:
            captured.launches.append(Launched(self, grid, values, compiled))

    def options_for(self, bm: int, bn: int) -> dict:
        """The launch options of a launch with tile BM x BN: the fixed ones, with 8 warps
        where the tile is wider than WIDE_TILE (where an autotuner chooses, {})."""
        if self.tile is None or bm * bn <= WIDE_TILE:
            return self.options
        return dict(self.options, num_warps=max(8, self.options["num_warps"]))

    def launch_through_triton(self, grid: tuple, args: tuple, kwargs: dict, key: tuple | None):
        """kernel[grid](...), which compiles, autotunes and launches; returns the
        CompiledKernel Triton chose, kept under `key` (None: nothing kept, returns None)."""
        tile = (kwargs.get("BM", 0), kwargs.get("BN", 0))  # our wrappers pass tiles by name
        options = self.run_through_triton(grid, args, kwargs, tile)
        if key is None:
            return None
        compiled = compile_for(self.jit, grid, args, kwargs, options)  # Triton's cached choice
        if not hasattr(compiled, "__getitem__"):
            return None
        if len(self.kept) >= MAX_KEPT:
            self.kept.clear()
        self.kept[key] = compiled
        return compiled

    def launch_values(self, grid: tuple, values: tuple, compiled) -> None:
        """Launch with every parameter's value in order: `compiled` (the CompiledKernel kept
        for these values' signature) directly where the direct launch is on, else through
        kernel[grid]."""
        if compiled is not None and DIRECT:
            compiled[grid + (1,) * (3 - len(grid))](*values)
        else:
            tile = (values[self.tile[0]], values[self.tile[1]]) if self.tile else (0, 0)
            self.run_through_triton(grid, values, {}, tile)

    def run_through_triton(self, grid: tuple, args: tuple, kwargs: dict, tile: tuple[int, int]) -> dict:
        """kernel[grid](...) with the options of a BM x BN `tile`; returns the options it
        launched with (an autotuner's choice). Where the kernel needs more shared memory than
        the GPU has (with every config an autotuner tried), launched with fewer pipeline
        stages: GPUs of compute capability 8.6 and 8.9 (RTX 30xx, 40xx) have 99 KB per block where
        an A100 has 163 KB and an H100 227 KB, and a float32 forward's three stages of 128 x 64
        and 64 x 64 tiles take 128 KB (triton 3.6, sm_86). Triton raises before the kernel runs,
        so nothing was written. (The kept kernel is the shallower one; where launches go through
        Triton every time, each finds the depth again, from Triton's cache of compiled kernels.)"""
        options = self.options_for(*tile)
        try:
            self.kernel[grid](*args, **kwargs, **options)
        except OutOfResources as error:
            if error.name != "shared memory":
                raise
            tried = self.kernel.configs[0].all_kwargs() if self.autotuned else options
            return self.run_shallower(grid, args, kwargs, tried, error)
        except BaseException:
            if interpreter_on():  # some programs ran: their tickets must not outlive the launch
                zero_counters()
            raise
        return self.kernel.best_config.all_kwargs() if self.autotuned else options

    def run_shallower(self, grid: tuple, args: tuple, kwargs: dict, options: dict, error: OutOfResources) -> dict:
        """Launch with the deepest pipeline under `options`' depth whose shared memory fits
        `error.limit`; returns the options launched with."""
        shared = error.required
        for stages in range(options.get("num_stages", 3) - 1, 0, -1):
            shallower = dict(options, num_stages=stages)
            shared = compile_for(self.jit, grid, args, kwargs, shallower).metadata.shared
            if shared <= error.limit:
                self.jit[grid](*args, **kwargs, **shallower)
                return shallower
        raise RuntimeError(
            f"fused_preact.triton: {self.jit.__name__} needs {shared} bytes of shared memory even without a "
            f"software pipeline, and this GPU has {error.limit} per block; use backend='reference'") from error

    def parameter_values(self, args: tuple, kwargs: dict) -> tuple | None:
        """Every parameter's value in order (constexprs too: what a CompiledKernel's launcher
        takes); None where one is left to its default or a keyword is not a parameter (a
        launch option: Triton's path decides what it changes)."""
        if len(args) + len(kwargs) != len(self.arg_names):
            return None
        rest = self.rest_by_count.get(len(args))
        if rest is None:
            rest = self.rest_by_count[len(args)] = picker(self.arg_names[len(args):])
        try:
            return args + rest(kwargs)
        except KeyError:
            return None

    def signature(self, values: tuple) -> tuple:
        """What Triton's specialisation of these values can depend on, and more."""
        types = tuple(map(type, values))  # True == 1, but Triton types them i1 and i32
        layout = self.layouts.get(types)
        if layout is None:
            tensors = [i for i, t in enumerate(types) if issubclass(t, torch.Tensor)]
            others = [i for i, t in enumerate(types) if not issubclass(t, torch.Tensor)]
            layout = self.layouts[types] = (picker(tensors), picker(others))
        return (driver.active.get_current_device(), types, layout[1](values),
                *[(t.dtype, t.data_ptr() % 16 == 0) for t in layout[0](values)])

"""The implementations compared in one run, each building a block or model from a case.

eager-fp32-nchw     eager PyTorch blocks (kuangliu definitions), fp32, NCHW
eager-cl-amp        eager, channels_last, under autocast to the case dtype
compile             torch.compile of the eager block (default mode), channels_last + autocast
compile-max         torch.compile(mode="max-autotune-no-cudagraphs") (GPU, when asked for): the
                    autotuned kernels without CUDA graphs, which no other provider uses
                    (with them the timed loop also failed: graph outputs overwritten by the next replay)
fused-<backend>     fused_preact blocks on one backend, channels_last + autocast
compile-fused-triton  torch.compile (default mode) of the fused blocks / of the eager model after
                    fp.convert (a user's model, converted): our custom ops inside an Inductor
                    graph, beside `compile` of the eager ones (GPU)
<provider>-graph    eager-cl-amp and fused-triton with each timed step (block fwd, fwd+bwd, a
                    model's training step) captured whole in one CUDA graph and replayed: the
                    same GPU work without the host work (GPU)
fused-triton-jit-launch  fused-triton with every Triton launch through kernel[grid] (the direct
                    launch of kept compiled kernels off): what that launch saves, same run (GPU)
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable

import torch

import fused_preact as fp
from fused_preact import testing  # the same eager definitions the tests use as oracles


@dataclass
class Provider:
    name: str
    fused_backend: str | None      # None: an eager model
    channels_last: bool
    autocast: bool                 # run under autocast to the case dtype
    compile_mode: str | None = None
    cuda_graph: bool = False       # each timed step captured in a CUDA graph and replayed
    direct_launch: bool = True     # False: every Triton launch through kernel[grid]

    def autocast_context(self, device: str, dtype: torch.dtype):
        if self.autocast and dtype != torch.float32:
            # A captured graph must not keep autocast's cached weight casts from the warm-up
            # (torch.cuda.graphs: autocast with cache_enabled=False).
            return torch.autocast(device, dtype=dtype, cache_enabled=not self.cuda_graph)
        return contextlib.nullcontext()

    def launch_context(self):
        """Around a whole timed step (forward and backward): the Triton launch path asked for."""
        return contextlib.nullcontext() if self.direct_launch else kernel_grid_launches()

    def block_input(self, x32: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """x32 as a block inside a network receives it: under autocast, the previous
        block's output is already in the autocast dtype (conv output + residual)."""
        x = x32.to(dtype) if self.autocast else x32
        return x.contiguous(memory_format=torch.channels_last if self.channels_last else torch.contiguous_format)


@contextlib.contextmanager
def kernel_grid_launches():
    """Every Triton launch through kernel[grid] inside (fused_preact/backends/triton/launch.py)."""
    from fused_preact.backends.triton import launch
    previous, launch.DIRECT = launch.DIRECT, False
    try:
        yield
    finally:
        launch.DIRECT = previous


def providers(device: str, max_autotune: bool) -> list[Provider]:
    out = [Provider("eager-fp32-nchw", None, False, False),
           Provider("eager-cl-amp", None, True, True)]
    if device == "cuda":
        out.append(Provider("compile", None, True, True, "default"))
        if max_autotune:
            out.append(Provider("compile-max", None, True, True, "max-autotune-no-cudagraphs"))
        backends = list(fp.dispatch.BACKEND_NAMES)
    else:
        backends = ["reference"]
    out += [Provider(f"fused-{b}", b, True, True) for b in backends]
    if device == "cuda":
        out += [Provider("compile-fused-triton", "triton", True, True, "default"),
                Provider("eager-cl-amp-graph", None, True, True, cuda_graph=True),
                Provider("fused-triton-graph", "triton", True, True, cuda_graph=True),
                Provider("fused-triton-jit-launch", "triton", True, True, direct_launch=False)]
    return out


def eager_block(case):
    cls = testing.PreActBlock if case.kind == "basic" else testing.PreActBottleneck
    return cls(case.in_planes, case.planes, case.stride)


def build_block(provider: Provider, case, reference_state: dict, device: str) -> Callable:
    """The module for `provider`, loaded with the same weights as the eager one."""
    if provider.fused_backend is None:
        module = eager_block(case)
    else:
        cls = fp.PreActBlock if case.kind == "basic" else fp.PreActBottleneck
        module = cls(case.in_planes, case.planes, case.stride, backend=provider.fused_backend)
    module.load_state_dict(reference_state)
    return prepare(provider, module, device)


def prepare(provider: Provider, module, device: str):
    """Device, memory format and compilation as the provider asks."""
    module = module.to(device)
    if provider.channels_last:
        module = module.to(memory_format=torch.channels_last)
    if provider.compile_mode:
        module = torch.compile(module, mode=provider.compile_mode)
    return module


def build_model(provider: Provider, name: str, device: str):
    backend = provider.fused_backend
    torch.manual_seed(0)
    if backend is None:
        model = eager_model(name)
    elif provider.compile_mode:  # what a user compiles: their own model, converted
        model = fp.convert(eager_model(name), backend=backend)
    else:
        model = getattr(fp.models, name)(backend=backend)
    return prepare(provider, model, device)


EAGER_MODELS = {
    "preact_resnet18": lambda: testing.PreActResNet(testing.PreActBlock, [2, 2, 2, 2]),
    "preact_resnet164": lambda: testing.PreActResNetCifar(testing.PreActBottleneck, 18),
    "preact_resnet1001": lambda: testing.PreActResNetCifar(testing.PreActBottleneck, 111),
}


def eager_model(name: str):
    return EAGER_MODELS[name]()

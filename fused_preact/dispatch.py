"""Backend selection: cuda > triton > reference, each backend declaring its limits.

A backend answers `not_supported_reasons(op, tensors)` with a list of plain sentences
("triton: dtype torch.float64 not supported (supported: float32, float16, bfloat16)").
`select` walks the priority list and returns the first backend with no reasons; when
none fits, or a forced backend declines, the error lists every reason. It remembers each
choice: reasons may depend only on the op, the tensors' devices and dtypes,
torch.backends.cudnn.allow_tf32 and the environment variables a backend names in
`env_flags` (a block makes about ten op calls per step; walking the reasons every time
was a tenth of its host time).

The backend is chosen per call, from (most specific first): the `backend` argument of
a module / op, the `use_backend(name)` context manager, the FUSED_PREACT_BACKEND
environment variable, else "auto".
"""
from __future__ import annotations

import contextlib
import os
import threading
from typing import Callable, Iterable, Sequence

import torch

BACKEND_NAMES = ("cuda", "triton", "reference")
# Which tensor of each conv op carries the conv's dtype (the order ops.py passes them in).
CONV_DTYPE_ARG = {"bn_relu_conv": 1, "bn_relu_conv_dgrad": 0, "bn_relu_conv_wgrad": 0}


def conv_tensor(op: str, tensors: Sequence[torch.Tensor | None]) -> torch.Tensor | None:
    """The tensor whose dtype the conv of `op` computes in; None for non-conv ops (or a
    shorter probe list, as `report` passes)."""
    index = CONV_DTYPE_ARG.get(op)
    return tensors[index] if index is not None and index < len(tensors) else None
_choice = threading.local()


class BackendNotSupported(RuntimeError):
    """No backend (or not the forced one) can run an op on the given inputs."""


class Backend:
    """A set of op implementations plus the limits under which they are valid."""

    name: str = ""
    dtypes: tuple[torch.dtype, ...] = ()
    env_flags: tuple[str, ...] = ()  # environment variables the reasons read

    def __init__(self) -> None:
        self.impls: dict[str, Callable] = {}

    def availability_reason(self) -> str | None:
        """Why this backend cannot run at all here (not built, not installed), else None."""
        return None

    def device_reason(self, device: torch.device) -> str | None:
        """Why tensors on `device` are not accepted, else None."""
        return None

    def not_supported_reasons(self, op: str, tensors: Iterable[torch.Tensor | None]) -> list[str]:
        reasons: list[str] = []
        unavailable = self.availability_reason()
        if unavailable:
            return [f"{self.name}: {unavailable}"]
        if op not in self.impls:
            reasons.append(f"{self.name}: op '{op}' is not implemented")
        present = [t for t in tensors if t is not None]
        for device in sorted({t.device for t in present}, key=str):
            why = self.device_reason(device)
            if why:
                reasons.append(f"{self.name}: {why}")
        for dtype in sorted({t.dtype for t in present if t.is_floating_point()}, key=str):
            if dtype not in self.dtypes:
                supported = ", ".join(str(d).replace("torch.", "") for d in self.dtypes)
                hint = "; float64 runs on backend='reference'" if dtype == torch.float64 else ""
                reasons.append(f"{self.name}: dtype {dtype} not supported (supported: {supported}){hint}")
        return reasons

    def stats_tiles(self, rows: int, channels: int) -> int:
        """How many row tiles of partial statistics this backend writes for `rows` rows."""
        raise NotImplementedError

    def register(self, op: str) -> Callable[[Callable], Callable]:
        def wrap(fn: Callable) -> Callable:
            self.impls[op] = fn
            return fn
        return wrap


_registry: dict[str, Backend] = {}
_chosen: dict[tuple, Backend] = {}  # select()'s answers, by the key it builds


def register_backend(backend: Backend) -> Backend:
    assert backend.name in BACKEND_NAMES, backend.name
    _registry[backend.name] = backend
    return backend


def get_backend(name: str) -> Backend:
    _load_backends()
    if name not in _registry:
        raise ValueError(f"backend must be one of {BACKEND_NAMES + ('auto',)}, got {name!r}")
    return _registry[name]


def _load_backends() -> None:
    # Imported lazily: the triton package is imported only when its backend is asked for.
    if len(_registry) < len(BACKEND_NAMES):
        from . import cuda, reference  # noqa: F401
        from .triton import backend  # noqa: F401


ENV_VAR = "FUSED_PREACT_BACKEND"


def check_backend_name(name: str | None, where: str = "backend") -> None:
    if name is not None and name not in BACKEND_NAMES + ("auto",):
        raise ValueError(f"fused_preact: {where} must be one of {BACKEND_NAMES + ('auto',)} or None, got {name!r}")


def requested_backend(explicit: str = "auto") -> str:
    """The backend asked for: explicit argument > use_backend() > FUSED_PREACT_BACKEND > auto."""
    if explicit != "auto":
        return explicit
    scoped = getattr(_choice, "name", None)
    if scoped is not None:
        return scoped
    env = os.environ.get(ENV_VAR, "auto") or "auto"
    check_backend_name(env, f"the environment variable {ENV_VAR}")
    return env


@contextlib.contextmanager
def use_backend(name: str):
    """Run the ops inside the block on backend `name` ("cuda", "triton", "reference", "auto")."""
    check_backend_name(name)
    previous = getattr(_choice, "name", None)
    _choice.name = name
    try:
        yield
    finally:
        _choice.name = previous


def select(op: str, tensors: Sequence[torch.Tensor | None], backend: str = "auto") -> Backend:
    """The backend that runs `op` on `tensors`; raises BackendNotSupported with all reasons."""
    _load_backends()
    name = requested_backend(backend)
    key = (op, name, torch.backends.cudnn.allow_tf32,
           tuple(os.environ.get(flag) for b in _registry.values() for flag in b.env_flags),
           tuple(None if t is None else (t.device, t.dtype) for t in tensors))
    chosen = _chosen.get(key)
    if chosen is None:
        chosen = _chosen[key] = _walk_reasons(op, tensors, name)
    return chosen


def _walk_reasons(op: str, tensors: Sequence[torch.Tensor | None], name: str) -> Backend:
    if name != "auto":
        chosen = get_backend(name)
        reasons = chosen.not_supported_reasons(op, tensors)
        if reasons:
            raise BackendNotSupported(
                f"fused_preact: backend '{name}' was requested but declines:\n  " + "\n  ".join(reasons))
        return chosen
    all_reasons: list[str] = []
    for candidate in BACKEND_NAMES:
        reasons = _registry[candidate].not_supported_reasons(op, tensors)
        if not reasons:
            return _registry[candidate]
        all_reasons.extend(reasons)
    raise BackendNotSupported(f"fused_preact: no backend can run op '{op}':\n  " + "\n  ".join(all_reasons))


def report(device: torch.device | str) -> dict[str, list[str]]:
    """For `python -m fused_preact.info`: each backend and why it declines (empty = usable)."""
    probe = torch.empty(0, device=device)
    return {name: get_backend(name).not_supported_reasons("bn_relu_conv", [probe])
            for name in BACKEND_NAMES}

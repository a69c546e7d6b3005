"""Backend selection: cuda > triton > reference, each backend declaring its limits.

A backend (fused_preact.backends) answers `not_supported_reasons(op, tensors, conv_dtype)`
with a list of plain sentences ("triton: dtype torch.float64 not supported (supported:
float32, float16, bfloat16)"). `select` walks the priority list and returns the first
backend with no reasons; when none fits, or a forced backend declines, the error lists
every reason. It remembers each choice: reasons may depend only on the op, the dtype its
convolution computes in, the tensors' devices and dtypes,
whether float32 convolutions may run as tf32 (base.tf32_convolutions) and the environment variables a backend names in
`env_flags` (a block makes about ten op calls per step; walking the reasons every time
was a tenth of its host time).

The backend is chosen per call, from (most specific first): the `backend` argument of
a module / op, the `use_backend(name)` context manager, the FUSED_PREACT_BACKEND
environment variable, else "auto".
"""
from __future__ import annotations

import contextlib
import importlib
import os
import threading
from typing import Sequence

import torch

from .backends.base import Backend, BackendNotSupported, tf32_convolutions

# Priority order of "auto", and the module of each backend (imported when first asked for:
# the triton package only then).
BACKEND_MODULES = {"cuda": "fused_preact.backends.cuda", "triton": "fused_preact.backends.triton.backend",
                   "reference": "fused_preact.backends.reference"}
BACKEND_NAMES = tuple(BACKEND_MODULES)
_choice = threading.local()
_chosen: dict[tuple, Backend] = {}  # select()'s answers, by the key it builds
_loaded: dict[str, Backend] = {}    # get_backend()'s, by name


def get_backend(name: str) -> Backend:
    """The backend called `name` (its module's BACKEND)."""
    backend = _loaded.get(name)
    if backend is None:
        if name not in BACKEND_MODULES:
            raise ValueError(f"backend must be one of {BACKEND_NAMES + ('auto',)}, got {name!r}")
        backend = _loaded[name] = importlib.import_module(BACKEND_MODULES[name]).BACKEND
    return backend


ENV_VAR = "FUSED_PREACT_BACKEND"


def check_backend_name(name: str | None, where: str = "backend") -> None:
    if name is not None and name not in REQUESTABLE:
        raise ValueError(f"fused_preact: {where} must be one of {REQUESTABLE} or None, got {name!r}")


REQUESTABLE = BACKEND_NAMES + ("auto",)


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


def select(op: str, tensors: Sequence[torch.Tensor | None], backend: str = "auto",
           conv_dtype: torch.dtype | None = None) -> Backend:
    """The backend that runs `op` on `tensors` (conv_dtype: the dtype its convolution computes
    in, None for ops without one); raises BackendNotSupported with all reasons."""
    state = selection_state(backend)
    key = (op, state, conv_dtype, tuple(None if t is None else (t.device, t.dtype) for t in tensors))
    chosen = _chosen.get(key)
    if chosen is None:
        chosen = _chosen[key] = _walk_reasons(op, tensors, state[0], conv_dtype)
    return chosen


def selection_state(backend: str = "auto") -> tuple:
    """Everything a choice depends on besides the op, conv_dtype and the tensors' devices
    and dtypes: the backend asked for (requested_backend, first), tf32, the backends'
    environment flags."""
    return (requested_backend(backend), tf32_convolutions(),
            tuple(os.environ.get(flag) for flag in _env_flags()))


def _env_flags() -> tuple[str, ...]:
    """The environment variables any backend's reasons read (found once)."""
    global _env_flag_names
    if _env_flag_names is None:
        _env_flag_names = tuple(flag for name in BACKEND_NAMES for flag in get_backend(name).env_flags)
    return _env_flag_names


_env_flag_names: tuple[str, ...] | None = None


def _walk_reasons(op: str, tensors: Sequence[torch.Tensor | None], name: str,
                  conv_dtype: torch.dtype | None) -> Backend:
    if name != "auto":
        chosen = get_backend(name)
        reasons = chosen.not_supported_reasons(op, tensors, conv_dtype)
        if reasons:
            raise BackendNotSupported(
                f"fused_preact: backend '{name}' was requested but declines:\n  " + "\n  ".join(reasons))
        return chosen
    all_reasons: list[str] = []
    for candidate in BACKEND_NAMES:
        reasons = get_backend(candidate).not_supported_reasons(op, tensors, conv_dtype)
        if not reasons:
            return get_backend(candidate)
        all_reasons.extend(reasons)
    raise BackendNotSupported(f"fused_preact: no backend can run op '{op}':\n  " + "\n  ".join(all_reasons))


def report(device: torch.device | str) -> dict[str, list[str]]:
    """For `python -m fused_preact.info`: each backend and why it declines (empty = usable)."""
    probe = torch.empty(0, device=device)
    return {name: get_backend(name).not_supported_reasons("bn_relu_conv", [probe], probe.dtype)
            for name in BACKEND_NAMES}

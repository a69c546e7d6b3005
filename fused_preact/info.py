"""`python -m fused_preact.info`: versions, the CUDA extension, and which backends run here."""
from __future__ import annotations

import os
import platform

import torch

from . import __version__, dispatch
from .backends.cuda import load_extension


def backend_variable() -> str:
    """FUSED_PREACT_BACKEND as set here, and whether it is valid."""
    value = os.environ.get(dispatch.ENV_VAR)
    if value is None:
        return "unset (auto)"
    try:
        dispatch.check_backend_name(value or None)
    except ValueError as e:
        return f"{value!r} INVALID: {e}"
    return repr(value)


def collect() -> dict:
    ext, why = load_extension()
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    devices = ["cpu"] + [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    return {
        "fused_preact": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch cuda": torch.version.cuda,
        "triton": triton_version,
        "_C built": ext is not None,
        "_C archs": ext.built_archs if ext else why,
        "_C cuda runtime": ext.runtime_version() if ext else None,
        "_C devices": (ext.device_count() or f"none (no GPU here; the CUDA runtime says: {ext.device_error()})")
                      if ext else None,
        dispatch.ENV_VAR: backend_variable(),
        "backends": {device: dispatch.report(device) for device in devices},
    }


def main() -> None:
    info = collect()
    for key, value in info.items():
        if key != "backends":
            print(f"{key:>16}: {value}")
    for device, reasons in info["backends"].items():
        print(f"backends on {device}:")
        for name, why in reasons.items():
            print(f"  {name:>9}: " + ("usable" if not why else "no - " + "; ".join(w.split(': ', 1)[1] for w in why)))


if __name__ == "__main__":
    main()

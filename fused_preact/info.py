"""`python -m fused_preact.info`: versions, the CUDA extension, and which backends run here."""
from __future__ import annotations

import platform

import torch

from . import __version__, dispatch
from .cuda import load_extension


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
        "_C devices": (ext.device_count() or ext.device_error()) if ext else None,
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

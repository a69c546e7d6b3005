"""The CUDA extension builds and imports without a GPU, and says why it cannot run."""
import shutil

import pytest
import torch


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not on PATH: the extension is skipped by design")
def test_extension_built_and_reports_devices():
    from fused_preact import _C
    assert set(_C.built_archs.split(";")) >= {"80", "90"}
    assert _C.runtime_version() >= 11000
    if not torch.cuda.is_available():
        assert _C.device_count() == 0
        assert _C.device_error() != ""
    else:
        assert _C.device_count() == torch.cuda.device_count()

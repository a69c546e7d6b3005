"""The CUDA extension builds and imports without a GPU, and says why it cannot run; a
source distribution holds what that build reads."""
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent


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


def test_source_distribution_holds_every_file_of_csrc(tmp_path):
    """pip builds the wheel from the sdist (a PyPI install, `python -m build`): setup.py names
    only the .cu / .cpp files it compiles, and they include csrc's headers. Built through the
    PEP 517 hook pip calls, in a subprocess (it runs setup.py)."""
    hook = "import sys; from setuptools import build_meta; print(build_meta.build_sdist(sys.argv[1]))"
    name = subprocess.run([sys.executable, "-c", hook, str(tmp_path)], cwd=ROOT, check=True,
                          capture_output=True, text=True).stdout.split()[-1]
    with tarfile.open(tmp_path / name) as sdist:
        packed = {Path(*Path(member).parts[1:]) for member in sdist.getnames()}
    csrc = {path.relative_to(ROOT) for path in (ROOT / "csrc").rglob("*") if path.is_file()}
    assert csrc and csrc <= packed, f"not in the sdist: {sorted(map(str, csrc - packed))}"
    assert {Path("setup.py"), Path("pyproject.toml"), Path("fused_preact/__init__.py")} <= packed

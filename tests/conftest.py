import os

# The Triton interpreter must be switched on before triton is imported anywhere.
os.environ.setdefault("TRITON_INTERPRET", "1")
# Module/model tests run on the reference backend unless a test asks for another one
# (under TRITON_INTERPRET=1 "auto" would pick the slow interpreted Triton kernels).
os.environ.setdefault("FUSED_PREACT_BACKEND", "reference")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.backends.cudnn.allow_tf32 = False
torch.backends.cuda.matmul.allow_tf32 = False


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)

import os
import random
import sys

import torch

# Without a GPU the Triton kernels run in the interpreter, which must be switched on
# before triton is first used. With a GPU the same tests run the compiled kernels.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# Module/model tests run on the reference backend unless a test asks for another one
# (under TRITON_INTERPRET=1 "auto" would pick the slow interpreted Triton kernels).
os.environ.setdefault("FUSED_PREACT_BACKEND", "reference")
# On a GPU, one launch config per Triton kernel: the tests check numerics, and autotuning
# every test shape over all configs would cost minutes of compiling and timing.
os.environ.setdefault("FUSED_PREACT_TRITON_AUTOTUNE", "0")
# The Triton float32 conv kernels are declined on GPUs by default (they failed there);
# the tests run them anyway, to keep checking them (known failures are marked xfail).
os.environ.setdefault("FUSED_PREACT_TRITON_FP32", "1")

import pytest  # noqa: E402

torch.backends.cudnn.allow_tf32 = False
torch.backends.cuda.matmul.allow_tf32 = False


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def poisoned(monkeypatch):
    """torch.empty, empty_like and empty_strided return NaN-filled float tensors inside the
    `with` block, and the partials the Triton kernels keep between launches hold NaN on entry."""
    allocators = {name: getattr(torch, name) for name in ("empty", "empty_like", "empty_strided")}

    def poisoning(allocate):
        def allocate_nan(*args, **kwargs):
            t = allocate(*args, **kwargs)
            return t.fill_(float("nan")) if t.is_floating_point() else t
        return allocate_nan

    class Poison:
        def __enter__(self):
            for name, allocate in allocators.items():
                monkeypatch.setattr(torch, name, poisoning(allocate))
            merge = sys.modules.get("fused_preact.backends.triton.merge")  # loaded with the triton backend
            for _counters, partials in merge._kept.values() if merge is not None else ():
                partials.fill_(float("nan"))

        def __exit__(self, *exc):
            for name, allocate in allocators.items():
                monkeypatch.setattr(torch, name, allocate)
    return Poison()


@pytest.fixture
def program_order(monkeypatch):
    """`program_order(order, seed=0)`: the Triton launches after it run their programs in
    another order, "reversed" or "shuffled" (seeded, a new order per launch). The interpreter
    runs a launch's programs one after another in program-id order, so the last program always
    draws the last merge ticket there; a GPU runs them concurrently and finishes them in any
    order, different run after run. On a GPU this changes nothing: the hardware picks the order."""
    def reorder(order: str, seed: int = 0) -> None:
        assert order in ("reversed", "shuffled"), order
        if torch.cuda.is_available():
            return
        from triton.runtime import interpreter  # the interpreter's grid loop calls these two per program
        builder = interpreter.InterpreterBuilder
        set_grid_dim, set_grid_idx = builder.set_grid_dim, builder.set_grid_idx
        rng = random.Random(seed)

        def set_grid_dim_and_order(self, nx, ny, nz):
            set_grid_dim(self, nx, ny, nz)
            self.program_order = list(range(nx * ny * nz))
            if order == "reversed":
                self.program_order.reverse()
            else:
                rng.shuffle(self.program_order)

        def set_grid_idx_in_order(self, x, y, z):
            _, ny, nz = self.grid_dim
            program = self.program_order[(x * ny + y) * nz + z]
            set_grid_idx(self, program // (ny * nz), program // nz % ny, program % nz)
        monkeypatch.setattr(builder, "set_grid_dim", set_grid_dim_and_order)
        monkeypatch.setattr(builder, "set_grid_idx", set_grid_idx_in_order)
    return reorder

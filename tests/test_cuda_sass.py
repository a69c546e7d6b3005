"""What the GPU will run of the cuda backend, checked without one (benchmarks.cuda_sass):
the tensor-core kernels (csrc/*_sm80.cuh) of the built extension, for
every arch it was built for and both of their dtypes, have a main loop of mma.sync
m16n8k16 (HMMA.16816), fed by cp.async (LDGSTS) and ldmatrix (LDSM), and no local memory."""
import pytest

from benchmarks import cuda_sass
from fused_preact.backends import cuda

ext, why_not_built = cuda.load_extension()
tool = cuda_sass.cuobjdump()


@pytest.fixture(scope="module")
def rows():
    return cuda_sass.kernels(cuda_sass.extension_path(), tool)


@pytest.mark.skipif(ext is None, reason=f"fused_preact._C not built: {why_not_built}")
@pytest.mark.skipif(tool is None, reason="no cuobjdump (CUDA toolkit or Triton wheel)")
@pytest.mark.parametrize("kernel", ["fprop_kernel", "dgrad_kernel", "wgrad_kernel"])
def test_sm80_kernels_are_pipelined_tensor_core_loops_without_local_memory(kernel, rows):
    archs = sorted(int(a) for a in ext.built_archs.split(";") if a)
    mangled = f"4sm80{len(kernel)}{kernel}I"  # fused_preact::sm80::<kernel><...>, as the symbol spells it
    for dtype in ("half_t", "bfloat16_t"):
        for arch in archs:
            found = [r for r in rows if r["arch"] == arch and mangled in r["mangled"] and dtype in r["mangled"]]
            assert len(found) == 1, (arch, dtype, [r["kernel"] for r in rows if r["arch"] == arch])
            r = found[0]
            facts = {"HMMA.16816": r["hmma_16816"] > 0, "LDGSTS": r["ldgsts"] > 0, "LDSM": r["ldsm"] > 0,
                     "no LDL/STL": r["local"] == 0}
            assert all(facts.values()), (arch, dtype, facts, r)

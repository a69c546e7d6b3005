"""What the GPU will run of the cuda backend, checked without one (benchmarks.cuda_sass):
the tensor-core kernels (csrc/*_sm80.cuh) of the built extension, for every arch it was
built for and each of their dtypes, have a main loop of mma.sync (HMMA.16816 for fp16 /
bf16, HMMA.1688 tf32 for fp32), fed by cp.async (LDGSTS) and ldmatrix (LDSM), and no local
memory. ldmatrix transposes 16-bit elements only, so the fp32 wgrad (both operands
MN-major) reads shared memory without it."""
import pytest

from benchmarks import cuda_sass
from fused_preact.backends import cuda

ext, why_not_built = cuda.load_extension()
tool = cuda_sass.cuobjdump()


# How the kernel's symbol spells each dtype, and the mma.sync its main loop must run.
DTYPES = {"fp16": ("N7cutlass6half_tE", "hmma_16816"), "bf16": ("N7cutlass10bfloat16_tE", "hmma_16816"),
          "fp32": ("f", "hmma_1688_tf32")}


@pytest.fixture(scope="module")
def rows():
    return cuda_sass.kernels(cuda_sass.extension_path(), tool)


@pytest.mark.skipif(ext is None, reason=f"fused_preact._C not built: {why_not_built}")
@pytest.mark.skipif(tool is None, reason="no cuobjdump (CUDA toolkit or Triton wheel)")
@pytest.mark.parametrize("kernel", ["fprop_kernel", "dgrad_kernel", "wgrad_kernel"])
def test_sm80_kernels_are_pipelined_tensor_core_loops_without_local_memory(kernel, rows):
    archs = sorted(int(a) for a in ext.built_archs.split(";") if a)
    for dtype, (spelled, mma) in DTYPES.items():
        symbol = f"_ZN12fused_preact4sm80{len(kernel)}{kernel}I{spelled}"  # fused_preact::sm80::<kernel><dtype>
        for arch in archs:
            found = [r for r in rows if r["arch"] == arch and r["mangled"].startswith(symbol)]
            assert len(found) == 1, (arch, dtype, [r["kernel"] for r in rows if r["arch"] == arch])
            r = found[0]
            facts = {mma: r[mma] > 0, "LDGSTS": r["ldgsts"] > 0, "no LDL/STL": r["local"] == 0}
            if not (kernel == "wgrad_kernel" and dtype == "fp32"):
                facts["LDSM"] = r["ldsm"] > 0
            assert all(facts.values()), (arch, dtype, facts, r)

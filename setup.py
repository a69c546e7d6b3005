"""Build fused_preact._C (csrc/) with nvcc directly; torch is not needed to build.

The CUDA library is torch-free and links the CUDA runtime statically, so the module
builds on a machine with nvcc and no GPU, and imports there. The tensor-core kernels are
written with CuTe: its headers come from the nvidia-cutlass wheel, a build requirement
pinned in pyproject.toml (found on disk, never imported). Environment:
  FUSED_PREACT_CUDA_ARCHS      e.g. "80;90" (default); gencode flags for each
  FUSED_PREACT_SKIP_CUDA_BUILD=1  skip the extension (pure-Python install)
  MAX_JOBS                     parallel nvcc processes (default: cores, memory permitting)
  CUDA_HOME / CUDA_PATH        where nvcc lives (else nvcc on PATH)
"""
import importlib.util
import os
import shutil
import subprocess
import sysconfig
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).parent.resolve()
SOURCES = sorted(str(p.relative_to(ROOT)) for pattern in ("*.cu", "*.cpp") for p in (ROOT / "csrc").glob(pattern))


def find_nvcc():
    for var in ("CUDA_HOME", "CUDA_PATH"):
        home = os.environ.get(var)
        if home and (Path(home) / "bin" / "nvcc").exists():
            return str(Path(home) / "bin" / "nvcc")
    return shutil.which("nvcc")


CUTLASS_PIN = "nvidia-cutlass==4.2.0.0"  # as in pyproject.toml's build requirements


def cutlass_include() -> Path:
    """The CUTLASS / CuTe headers the nvidia-cutlass wheel ships (cutlass_library/source/include)."""
    spec = importlib.util.find_spec("cutlass_library")
    include = Path(list(spec.submodule_search_locations)[0]) / "source" / "include" if spec else None
    if include is None or not (include / "cute" / "tensor.hpp").exists():
        raise RuntimeError(
            f"fused_preact: the CUDA extension needs the CUTLASS headers of {CUTLASS_PIN}: pip installs it as a "
            "build requirement; with --no-build-isolation install it first (pip install --no-deps "
            f"{CUTLASS_PIN}), or skip the extension with FUSED_PREACT_SKIP_CUDA_BUILD=1")
    return include


def cuda_archs():
    archs = [a.strip() for a in os.environ.get("FUSED_PREACT_CUDA_ARCHS", "80;90").replace(",", ";").split(";")]
    return [a for a in archs if a]


def max_jobs():
    if os.environ.get("MAX_JOBS"):
        return max(1, int(os.environ["MAX_JOBS"]))
    try:  # ~2 GB per nvcc process
        mem_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError):
        mem_gb = 8
    return max(1, min(os.cpu_count() or 1, int(mem_gb // 2)))


class NvccBuildExt(build_ext):
    """Compile each csrc/ file with nvcc in parallel, link one shared object."""

    def run(self):
        nvcc = find_nvcc()
        skip = os.environ.get("FUSED_PREACT_SKIP_CUDA_BUILD", "0") == "1"
        if skip or nvcc is None:
            why = "FUSED_PREACT_SKIP_CUDA_BUILD=1" if skip else "nvcc not found (CUDA_HOME, CUDA_PATH, PATH)"
            print(f"fused_preact: skipping the CUDA extension fused_preact._C: {why}; "
                  "the triton and reference backends still work")
            self.extensions = []
            return
        self.nvcc = nvcc
        super().run()

    def build_extension(self, ext):
        import pybind11

        archs = cuda_archs()
        build_dir = Path(self.build_temp) / "csrc"
        build_dir.mkdir(parents=True, exist_ok=True)
        gencode = []
        for arch in archs:
            gencode += [f"-gencode=arch=compute_{arch},code=sm_{arch}"]
        common = ["-std=c++17", "-O3", "--expt-relaxed-constexpr", "-Xcompiler", "-fPIC", "-Xcompiler",
                  "-fvisibility=hidden", f"-I{ROOT / 'csrc'}", f"-I{cutlass_include()}",
                  f"-I{pybind11.get_include()}", f"-I{sysconfig.get_paths()['include']}",
                  f'-DFUSED_PREACT_ARCHS="{";".join(archs)}"']

        def compile_one(source):
            obj = build_dir / (Path(source).name + ".o")
            cmd = [self.nvcc, *common, *gencode, "-c", str(ROOT / source), "-o", str(obj)]
            if source.endswith(".cpp"):
                cmd = [self.nvcc, *common, "-x", "cu", "-c", str(ROOT / source), "-o", str(obj)]
            print(" ".join(cmd))
            subprocess.run(cmd, check=True)
            return str(obj)

        with ThreadPoolExecutor(max_jobs()) as pool:
            objects = list(pool.map(compile_one, ext.sources))
        out = Path(self.get_ext_fullpath(ext.name))
        out.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run([self.nvcc, "-shared", "--cudart", "static", *gencode, *objects, "-o", str(out)],
                       check=True)


setup(ext_modules=[Extension("fused_preact._C", SOURCES)], cmdclass={"build_ext": NvccBuildExt})

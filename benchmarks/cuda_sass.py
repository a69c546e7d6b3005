"""What a GPU will run of the cuda backend, read from the built extension on any machine:
per kernel and arch of fused_preact._C, its registers, local memory, and the instructions
that tell a tensor-core main loop from a naive one: HMMA.16816 (mma.sync m16n8k16),
HMMA.1688.F32.TF32 (its tf32 form, m16n8k8), LDGSTS (cp.async, global -> shared without
registers) and LDSM (ldmatrix).

    python -m benchmarks.cuda_sass                  # a table of every kernel
    python -m benchmarks.cuda_sass --json out.json

cuobjdump comes from the CUDA toolkit on PATH, else from the Triton wheel (found on disk,
not imported).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import re
import shutil
import subprocess
from pathlib import Path

INSTRUCTIONS = {"hmma_16816": r"\bHMMA\.16816\.", "hmma_1688_tf32": r"\bHMMA\.1688\.F32\.TF32\b",
                "ldgsts": r"\bLDGSTS\b", "ldsm": r"\bLDSM\b", "local": r"\b(?:LDL|STL)\b"}


def cuobjdump() -> str | None:
    found = shutil.which("cuobjdump")
    if found:
        return found
    spec = importlib.util.find_spec("triton")
    if spec and spec.submodule_search_locations:
        wheel = Path(list(spec.submodule_search_locations)[0]) / "backends" / "nvidia" / "bin" / "cuobjdump"
        if wheel.exists():
            return str(wheel)
    return None


def extension_path() -> Path | None:
    spec = importlib.util.find_spec("fused_preact._C")
    return Path(spec.origin) if spec and spec.origin else None


def short_names(mangled: list[str]) -> list[str]:
    """`sm80::fprop_kernel<cutlass::half_t>` for each mangled name (c++filt where it is
    installed, else the mangled names)."""
    if not shutil.which("c++filt"):
        return mangled
    out = subprocess.run(["c++filt"], input="\n".join(mangled), capture_output=True, text=True, check=True).stdout
    names = [re.sub(r"fused_preact::|\(anonymous namespace\)::|cutlass::", "", name) for name in out.splitlines()]
    return [re.sub(r"^void |\([^()]*\)$", "", name) for name in names]


def kernels(binary: Path, tool: str) -> list[dict]:
    """One row per (arch, kernel): counts of INSTRUCTIONS in its SASS and its registers."""
    sass = subprocess.run([tool, "-sass", str(binary)], capture_output=True, text=True, check=True).stdout
    usage = subprocess.run([tool, "-res-usage", str(binary)], capture_output=True, text=True, check=True).stdout
    registers = {}
    arch = None
    for line in usage.splitlines():
        if m := re.search(r"arch = sm_(\d+)", line):
            arch = int(m.group(1))
        if m := re.search(r"Function (\S+):", line):
            name = m.group(1)
        if m := re.search(r"REG:(\d+)", line):
            registers[(arch, name)] = int(m.group(1))
    rows, row = [], None
    for line in sass.splitlines():
        if m := re.search(r"code for sm_(\d+)", line):
            arch = int(m.group(1))
        elif m := re.search(r"Function : (\S+)", line):
            row = {"arch": arch, "mangled": m.group(1),
                   "registers": registers.get((arch, m.group(1))), **{k: 0 for k in INSTRUCTIONS}}
            rows.append(row)
        elif row is not None:
            for key, pattern in INSTRUCTIONS.items():
                row[key] += len(re.findall(pattern, line))
    for row, name in zip(rows, short_names([r["mangled"] for r in rows])):
        row["kernel"] = name
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", default=None, help="also write the rows to this file")
    args = parser.parse_args(argv)
    binary, tool = extension_path(), cuobjdump()
    if binary is None or tool is None:
        raise SystemExit("needs the built extension fused_preact._C and cuobjdump")
    rows = kernels(binary, tool)
    print(f"{'arch':>4} {'kernel':48s} {'regs':>4} {'HMMA.16816':>10} {'HMMA.1688.TF32':>14} {'LDGSTS':>6} "
          f"{'LDSM':>5} {'LDL/STL':>7}")
    for r in rows:
        print(f"{r['arch']:>4} {r['kernel'][:48]:48s} {r['registers'] or '-':>4} {r['hmma_16816']:>10} "
              f"{r['hmma_1688_tf32']:>14} {r['ldgsts']:>6} {r['ldsm']:>5} {r['local']:>7}")
    if args.json:
        Path(args.json).write_text(json.dumps({"extension": str(binary), "kernels": rows}, indent=2))


if __name__ == "__main__":
    main()

"""Writes README.md's results section from GPU result folders, between its two markers, so
that the README's numbers are the result files' and never typed by hand. It keeps it short:
per folder the run line, the headline block's rows and the model training steps, and a
link to the folder's full tables (results.md).

    python -m benchmarks.readme benchmarks/results/FOLDER [FOLDER ...]
"""
from __future__ import annotations

import sys
from pathlib import Path

from .cases import GPU_BLOCKS

START, END = "<!-- results:start -->", "<!-- results:end -->"
README = Path(__file__).resolve().parent.parent / "README.md"
HEADLINE = GPU_BLOCKS[0].name


def tables(lines: list[str]) -> dict[str, list[str]]:
    """The markdown tables of results.md by the heading above them ("## Blocks ...")."""
    found, heading = {}, None
    for line in lines:
        if line.startswith("## "):
            heading = line[3:]
        elif line.startswith("|") and heading is not None:
            found.setdefault(heading, []).append(line)
    return found


def section(folder: Path, readme: Path) -> list[str]:
    """The run line, the headline case's block rows (header kept), the model steps, a link."""
    title, *body = (folder / "results.md").read_text().rstrip("\n").split("\n")
    device = title.removeprefix("# Benchmark results: ")
    run_line = next((line for line in body if line.strip()), "")
    found = tables(body)
    blocks = next((rows for heading, rows in found.items() if heading.startswith("Blocks (")), [])
    headline = blocks[:2] + [row for row in blocks[2:] if row.startswith(f"| {HEADLINE} |")]
    models = next((rows for heading, rows in found.items() if heading.startswith("Model training")), [])
    link = (folder / "results.md").resolve().relative_to(readme.resolve().parent).as_posix()
    lines = [f"#### {device}: `{folder.name}`", "", run_line, ""]
    if len(headline) > 2:
        lines += [f"Headline block `{HEADLINE}` (median ms; speedup = baseline time / fused time):", ""] + headline + [""]
    if models:
        lines += ["Model training steps:", ""] + models + [""]
    return lines + [f"All cases, floors and what was not timed: [{link}]({link})."]


def main(argv=None, readme: Path = README) -> None:
    folders = [Path(a) for a in (argv or sys.argv[1:])]
    if not folders:
        sys.exit(__doc__)
    text = readme.read_text()
    if text.count(START) != 1 or text.count(END) != 1:
        sys.exit(f"{readme}: needs one {START} and one {END}")
    before, rest = text.split(START)
    after = rest.split(END)[1]
    lines = [START, ""]
    for folder in folders:
        lines += section(folder, readme) + [""]
    readme.write_text(before + "\n".join(lines + [END]) + after)
    print(f"wrote {len(folders)} result sections into {readme}")


if __name__ == "__main__":
    main()

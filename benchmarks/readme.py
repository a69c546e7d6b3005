"""Copies the results.md of GPU result folders into README.md, between its two result
markers, so that the README's numbers are the result files' and never typed by hand.

    python -m benchmarks.readme benchmarks/results/FOLDER [FOLDER ...]
"""
from __future__ import annotations

import sys
from pathlib import Path

START, END = "<!-- results:start -->", "<!-- results:end -->"
README = Path(__file__).resolve().parent.parent / "README.md"


def section(folder: Path) -> list[str]:
    """results.md with its title naming the folder, its headings under the README's, and
    the cases a time budget left out counted instead of listed."""
    title, *body = (folder / "results.md").read_text().rstrip("\n").split("\n")
    device = title.removeprefix("# Benchmark results: ")
    kept = [line for line in body if not (line.startswith("- ") and "skipped --budget-s" in line)]
    skipped = len(body) - len(kept)
    lines = [f"#### `{folder.as_posix()}` ({device})"]
    for i, line in enumerate(kept):
        if line == "Not timed:":
            if skipped:
                lines.append(f"{skipped} case/dtype pairs were not reached within the run's time budget.")
            if i + 1 < len(kept) and kept[i + 1].startswith("- "):
                lines.append("Not timed:")
        else:
            lines.append(("###" + line) if line.startswith("## ") else line)
    return lines


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
        lines += section(folder) + [""]
    readme.write_text(before + "\n".join(lines + [END]) + after)
    print(f"wrote {len(folders)} result sections into {readme}")


if __name__ == "__main__":
    main()

"""README's Python code blocks run as written (in order, sharing one namespace as a reader's
session would), and CI runs the two commands README states."""
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def test_readme_python_blocks_run():
    blocks = re.findall(r"^ *```python\n(.*?)^ *```", README, re.S | re.M)
    assert blocks, "README has no python blocks"
    namespace: dict = {}
    for block in blocks:
        lines = block.splitlines()
        indent = min(len(line) - len(line.lstrip()) for line in lines if line.strip())
        exec(compile("\n".join(line[indent:] for line in lines), "README.md", "exec"), namespace)


def test_ci_runs_the_readme_commands():
    ci = (ROOT / ".ci" / "run").read_text()
    for marker, program in (("test-command", "pytest"), ("main-job-command", "benchmarks.run")):
        command = README.split(f"<!-- {marker} -->", 1)[1].split("```bash\n", 1)[1].split("\n```", 1)[0]
        assert program in command and "\n" not in command
        assert f"readme_command {marker}" in ci

"""The README's Python examples run as written."""
import re
from pathlib import Path

README = Path(__file__).resolve().parents[2] / "README.md"


def test_readme_python_blocks_run():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "README has no python examples"
    namespace = {}
    for block in blocks:  # later blocks use names from earlier ones
        exec(compile(block, str(README), "exec"), namespace)

"""The README's example runs as written."""

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_example_runs(capsys):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    assert blocks, "README has no python example"
    namespace: dict = {}
    for block in blocks:  # every python block runs, in order
        exec(compile(block, str(README), "exec"), namespace)
    losses = namespace["result"].losses
    assert losses[-1] < losses[0]
    assert "negative log-likelihood per image" in capsys.readouterr().out

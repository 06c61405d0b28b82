"""The README's Python snippets run as written (on the tiny models they name), in a scratch folder."""
import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"
SNIPPETS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_the_readme_has_python_snippets():
    assert len(SNIPPETS) >= 2


@pytest.mark.parametrize("index", range(len(SNIPPETS)))
def test_readme_snippet_runs(index, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # the ONNX snippet writes its file here
    exec(compile(SNIPPETS[index], f"README.md python snippet {index + 1}", "exec"), {"__name__": "__readme__"})
    out = capsys.readouterr().out
    if "target_flops=0.5" in SNIPPETS[index]:
        share = int(re.search(r"(\d+)% of the dense FLOPs", out).group(1))
        assert 45 <= share <= 55  # the budget's target, met within a few percent
    if "export(" in SNIPPETS[index]:
        assert out.startswith("True")

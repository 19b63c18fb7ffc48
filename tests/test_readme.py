"""The README's Python examples run as written (the study one with a tiny budget and sample count)."""

import re
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def _blocks() -> list[str]:
    text = README.read_text()
    section = text[text.index("## Python API") :]
    return re.findall(r"```python\n(.*?)```", section, re.S)


def test_study_example_runs(tmp_path, monkeypatch):
    code = _blocks()[0]
    assert "Budget(evaluations=48)" in code and 'preset="quick")' in code
    code = code.replace("Budget(evaluations=48)", "Budget(evaluations=4)")
    code = code.replace('preset="quick")', f'preset="quick", samples=4, cache_dir={str(tmp_path / "cache")!r}, '
                        'strategy_options={"population": 4}, progress=False)')
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    assert len(namespace["df"]) >= 4
    assert namespace["knee"]["heldout_metrics"] is not None  # the front was re-scored on held-out seeds
    assert namespace["images"].shape == (3, 1, 28, 28)


def test_sampling_example_runs():
    namespace: dict = {}
    exec(compile(_blocks()[1], "README.md", "exec"), namespace)
    assert namespace["images"].shape == (3, 1, 28, 28)
    assert namespace["cached"].shape == (3, 1, 28, 28)

"""examples/: the README's selector snippet is examples/selector_quickstart.py, and it runs."""

import importlib.util
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "examples" / "selector_quickstart.py"


def _load(path: Path):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_selector_quickstart_runs_scores_one_rm_per_prompt_and_resumes(tmp_path, capsys):
    quickstart = _load(QUICKSTART)
    checkpoint = tmp_path / "laser.pt"
    metrics = quickstart.main(steps=2, n=3, checkpoint=str(checkpoint))
    prompts = len(quickstart.DATA)
    assert metrics["laser/rm_passes"] == prompts * 3  # one RM pass per sample, not K
    assert abs(sum(v for k, v in metrics.items() if k.startswith("laser/arm_frac/")) - 1.0) < 1e-6
    assert checkpoint.exists() and "saved and resumed" in capsys.readouterr().out


def test_readme_quotes_the_quickstart():
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Using the selector", 1)[1]
    block = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    source = QUICKSTART.read_text()
    quoted = [line.strip() for line in block.splitlines() if line.strip() and line.strip() != "..."]
    assert len(quoted) >= 10
    missing = [line for line in quoted if line not in source]
    assert not missing, f"README lines not in {QUICKSTART.name}: {missing}"

"""The README's quick start runs as written (examples/quickstart.py), on the path a user's CPU takes."""

import subprocess
import sys
from pathlib import Path

from helpers import uninterpreted_env

ROOT = Path(__file__).resolve().parents[1]


def test_quickstart_runs_and_gxpo_takes_three_passes_per_step():
    proc = subprocess.run([sys.executable, "examples/quickstart.py"], cwd=ROOT, capture_output=True, text=True,
                          env=uninterpreted_env(PYTHONPATH=str(ROOT)), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "step 2: closure calls so far 9," in proc.stdout


def test_readme_quick_start_is_the_example():
    readme = (ROOT / "README.md").read_text()
    code = (ROOT / "examples/quickstart.py").read_text().split('"""', 2)[2].strip()
    assert code in readme

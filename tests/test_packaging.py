"""The declared support range in its three homes agrees: pyproject.toml's lower bounds (what `make compat`
installs, tools/lower_bounds.py), constraints.txt's newest versions (what `make install` installs) and the
README's table of tested versions."""

import re
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
import lower_bounds  # noqa: E402


def requirements() -> dict:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = [Requirement(r) for r in project["dependencies"]]
    reqs += [Requirement(r) for extra in project["optional-dependencies"].values() for r in extra]
    out = {}
    for r in reqs:
        out.setdefault(r.name.lower(), []).append(r)
    return out


def constraints() -> dict:
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, version = line.split("==")
            pins[name.lower()] = version
    return pins


def readme_table() -> dict:
    """package -> (newest, lowest) from the README's 'Tested versions' table."""
    text = (ROOT / "README.md").read_text()
    section = text[text.index("### Tested versions"):]
    rows = {}
    for line in section.splitlines()[1:]:
        if line.startswith("#"):
            break
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 3 and cells[0] not in ("package", "---") and not set(cells[0]) <= {"-"}:
            rows[cells[0].strip("`").lower()] = (cells[1], cells[2])
    return rows


def test_lower_bounds_are_pinnable():
    pins = lower_bounds.lower_bounds(ROOT / "pyproject.toml")
    assert [p.split("==")[0] for p in pins] == ["torch", "triton", "numpy"]
    assert "torch==2.11.0" in pins and "triton==3.6.0" in pins  # the GPU machines' stack, at least


def test_lower_bounds_refuse_an_unbounded_dependency(tmp_path):
    (tmp_path / "pyproject.toml").write_text('[project]\ndependencies = ["torch>=2.11.0", "numpy"]\n')
    with pytest.raises(SystemExit, match="numpy"):
        lower_bounds.lower_bounds(tmp_path / "pyproject.toml")


def test_constraints_lie_within_the_declared_range():
    reqs = requirements()
    for name, version in constraints().items():
        assert name in reqs, f"constraints.txt pins {name}, which pyproject.toml does not ask for"
        for r in reqs[name]:
            assert r.specifier.contains(version, prereleases=True), (name, version, str(r.specifier))


def test_readme_states_the_tested_versions():
    table = readme_table()
    for name, version in constraints().items():
        assert name in table, f"README's tested versions have no row for {name}"
        assert version in table[name][0], (name, version, table[name])
    for pin in lower_bounds.lower_bounds(ROOT / "pyproject.toml"):
        name, version = pin.split("==")
        assert version in table[name][1], (name, version, table[name])
    vllm = re.search(r"VLLM_CONTRACT := (\S+)", (ROOT / "Makefile").read_text())[1]
    assert vllm in table["vllm"][0], table["vllm"]

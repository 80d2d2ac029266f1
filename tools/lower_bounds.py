"""pyproject.toml's core dependencies pinned at their lower bounds (`name>=v` -> `name==v`), one a line: the
constraints `make compat` installs, so the range pyproject declares is the range tested. With --check: exit 1
unless this Python's installed versions are those."""

import re
import sys
import tomllib
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path


def lower_bounds(pyproject: Path) -> list[str]:
    deps = tomllib.loads(pyproject.read_text())["project"]["dependencies"]
    pins = []
    for dep in deps:
        match = re.fullmatch(r"([A-Za-z0-9_.-]+)\s*>=\s*([0-9][0-9A-Za-z.]*)(\s*,.*)?", dep)
        if match is None:
            raise SystemExit(f"pyproject.toml: dependency {dep!r} has no '>=' lower bound to test")
        pins.append(f"{match[1]}=={match[2]}")
    return pins


def installed_mismatches(pins: list[str]) -> list[str]:
    out = []
    for pin in pins:
        name, wanted = pin.split("==")
        try:
            have = version(name)
        except PackageNotFoundError:
            have = None
        if have is None or have.split("+")[0] != wanted:
            out.append(f"{name}: {have or 'not installed'}, the lower bound is {wanted}")
    return out


if __name__ == "__main__":
    pins = lower_bounds(Path(__file__).resolve().parents[1] / "pyproject.toml")
    if "--check" in sys.argv[1:]:
        bad = installed_mismatches(pins)
        print("\n".join(bad) if bad else "at the lower bounds: " + ", ".join(pins))
        sys.exit(1 if bad else 0)
    print("\n".join(pins))

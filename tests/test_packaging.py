"""environment.yml (conda) and pyproject.toml (pip) must install the same pinned packages."""

from __future__ import annotations

import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def _pins(requirements: list[str]) -> dict[str, str]:
    pins = {}
    for req in requirements:
        if "==" in req:
            name, version = req.split("==", 1)
            pins[name.strip().lower()] = version.strip()
    return pins


def test_conda_environment_pins_equal_pyproject_pins() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = _pins(project["dependencies"] + [r for extra in project["optional-dependencies"].values() for r in extra])
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip_section = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict) and "pip" in d)
    assert _pins(pip_section) == wanted
    assert any(str(item).startswith("-e .") for item in pip_section), "the conda env must install this package"

"""pyproject.toml and environment.yml name the same dependencies (conda names mapped)."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
# pip name -> conda-forge name, where they differ
CONDA_NAMES = {"torch": "pytorch", "matplotlib": "matplotlib-base", "dask[array]": "dask"}
# conda-only packages (the GDAL stack and the installer)
CONDA_ONLY = {"python", "gdal", "pip"}


def _name(req: str) -> str:
    return re.split(r"[<>=!~ ;]", req, maxsplit=1)[0].strip().lower()


def test_environment_yml_matches_pyproject() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pip_deps = {CONDA_NAMES.get(_name(r), _name(r)) for r in project["dependencies"]}
    pip_deps |= {_name(r) for r in project["optional-dependencies"]["test"]}
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    conda_deps = {_name(d) for d in env["dependencies"] if isinstance(d, str)} - CONDA_ONLY
    assert pip_deps == conda_deps, (
        f"only in pyproject: {sorted(pip_deps - conda_deps)}; only in environment.yml: {sorted(conda_deps - pip_deps)}"
    )


def test_embedded_sample_is_packaged() -> None:
    from lcmap.geodata.sample import sample_paths

    paths = sample_paths()
    for key in ("imagery", "labels", "reference"):
        assert len(paths[key]) == 8 and all(p.is_file() for p in paths[key])
    assert paths["aoi_train"].is_file() and paths["aoi_heldout"].is_file()


def test_ci_runs_the_readme_test_command() -> None:
    readme = (ROOT / "README.md").read_text()
    block = readme.split("```bash", 1)[1].split("```", 1)[0]
    commands = [line.strip() for line in block.splitlines() if line.strip() and not line.startswith("#")]
    assert len(commands) == 2 and "lcmap demo" in commands[0] and "pytest" in commands[1]
    ci = (ROOT / ".ci" / "run").read_text()
    assert commands[1] in ci.splitlines()


def test_cli_help_lists_subcommands_with_units() -> None:
    from typer.testing import CliRunner

    from lcmap.cli import app

    runner = CliRunner()
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for cmd in ("train", "predict", "evaluate", "demo"):
        assert cmd in result.output
    text = runner.invoke(app, ["predict", "--help"], env={"COLUMNS": "200"}).output
    assert "pixels" in text and "CRS" in text
    text = runner.invoke(app, ["train", "--help"], env={"COLUMNS": "200"}).output
    assert "pixels" in text and "--bbox-crs" in text

"""Every ``--help`` reads in an 80-column terminal and when piped: no line cut with an ellipsis,
none wider than 80, every option's whole help text shown in a column of at least 30 characters."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import typer.main
from typer.testing import CliRunner

from lcmap.cli import app

ROOT = Path(__file__).resolve().parents[1]
WIDTH = 80
MIN_HELP_COLUMN = 30
COMMANDS = sorted(typer.main.get_command(app).commands)  # type: ignore[attr-defined]


def _words(text: str) -> str:
    """Whitespace-insensitive form; a word wrapped after a hyphen ("paraformer-\\n tiny") rejoined."""
    return re.sub(r"-\s+", "-", " ".join(text.split()))


def _problems(text: str) -> list[str]:
    """What makes a help text unreadable at WIDTH columns (empty when it reads)."""
    problems = []
    in_options = False
    for number, line in enumerate(text.splitlines(), 1):
        where = f"line {number} {line!r}"
        if len(line) > WIDTH:
            problems.append(f"{where}: {len(line)} > {WIDTH} columns")
        if "…" in line or re.search(r"\w\.\.\.$", line):  # rich's cut, click's cut summary
            problems.append(f"{where}: cut with an ellipsis")
        if line and not line[0].isspace():
            in_options = line.startswith(("Options", "Commands"))
            continue
        if not in_options or not line.strip():
            continue
        # an option row "  --flag META   help..." or a continuation line "        help..."
        row = re.match(r"^  \S.*?\s{2,}(?=\S)", line)
        start = row.end() if row else len(line) - len(line.lstrip())
        if start > 4 and WIDTH - start < MIN_HELP_COLUMN:
            problems.append(f"{where}: help column {WIDTH - start} < {MIN_HELP_COLUMN} characters")
    return problems


def _help(args: list[str]) -> str:
    result = CliRunner().invoke(app, [*args, "--help"], env={"COLUMNS": str(WIDTH)})
    assert result.exit_code == 0, result.output
    return result.output


@pytest.mark.parametrize("command", ["", *COMMANDS])
def test_help_reads_at_80_columns(command: str) -> None:
    args = [command] if command else []
    text = _help(args)
    assert not _problems(text), "\n".join(_problems(text))
    # every option's whole help text is there (nothing cut, nothing hidden)
    click_command = typer.main.get_command(app)
    if command:
        click_command = click_command.commands[command]  # type: ignore[attr-defined]
    helps = [p.help for p in click_command.params if getattr(p, "help", None)]
    assert helps
    for help_text in helps:
        assert _words(help_text) in _words(text), help_text


def test_help_reads_when_piped() -> None:
    """Through a pipe, without COLUMNS (what ``lcmap train --help | less`` sees)."""
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    for command in ("train", "predict"):
        out = subprocess.run(
            [sys.executable, "-m", "lcmap.cli", command, "--help"],
            capture_output=True,
            text=True,
            env=env,
            check=True,
            cwd=ROOT,
        ).stdout
        assert "--images" in out and not _problems(out), "\n".join(_problems(out))


def test_the_check_catches_typer_rich_panels() -> None:
    """The check itself fails on what typer's rich help printed at 80 columns (before this test)."""
    cut = (
        "│ --legend                                 <str>             Legend of         │\n"
        "│ --reference-lege… <str> Legend                                               │\n"
    )
    assert _problems("Options:\n" + cut.replace("│", " "))
    narrow = "Options:\n  --epochs                                                   <int>  Number of\n"
    assert any("help column" in p for p in _problems(narrow))

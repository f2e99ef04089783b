"""Reading the user's YAML files (legends, training configs) with errors that name the file."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from lcmap.errors import LcmapInputError


def read_yaml(path: str | Path, what: str) -> Any:
    """Parsed content of a YAML file (None when empty).

    Args:
        path: the file.
        what: what the file is, for messages (``legend file``, ``config file``).

    Raises:
        LcmapInputError: if the file does not exist, cannot be read, is not UTF-8 text or is not valid
            YAML; the message is one line naming the file (and the line of a syntax error).
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise LcmapInputError(f"{what} {path} does not exist") from exc
    except UnicodeDecodeError as exc:
        raise LcmapInputError(
            f"{what} {path} is not UTF-8 text (byte 0x{exc.object[exc.start]:02x} at offset {exc.start}): "
            "save it as UTF-8"
        ) from exc
    except OSError as exc:
        raise LcmapInputError(f"{what} {path} cannot be read ({exc.strerror or exc})") from exc
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or " ".join(str(exc).split())
        raise LcmapInputError(f"{what} {path} is not valid YAML{where}: {problem}") from exc

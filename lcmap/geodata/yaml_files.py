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
        LcmapInputError: if the file does not exist or is not valid YAML.
    """
    path = Path(path)
    try:
        return yaml.safe_load(path.read_text())
    except FileNotFoundError as exc:
        raise LcmapInputError(f"{what} {path} does not exist") from exc
    except yaml.YAMLError as exc:
        raise LcmapInputError(f"{what} {path} is not valid YAML: {exc}") from exc

"""How one training option is declared and how its values are read.

:class:`Option` (attached to a dataclass field by :func:`option`) says how a field is given in a
config file and on the command line; the parsers below turn a YAML or flag value into the field's
type, raising ValueError/TypeError with a message that names the expected form. Used by
:class:`lcmap.pipeline.config.TrainConfig`; :mod:`lcmap.cli_options` builds flags from it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import MISSING, dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["Option", "option"]


def as_list(value: Any) -> list[str]:
    if isinstance(value, (str, Path)):
        return [str(value)]
    return [str(v) for v in value]


def text(value: Any) -> str:
    return str(value)


def lower(value: Any) -> str:
    return str(value).strip().lower()


def whole(value: Any) -> int:
    if isinstance(value, bool) or float(value) != int(float(value)):
        raise ValueError("not a whole number")
    return int(float(value))


def boolean(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("true", "yes", "on", "1"):
        return True
    if text in ("false", "no", "off", "0"):
        return False
    raise ValueError("not true/false")


def bbox4(value: Any) -> list[float]:
    return [float(v) for v in (value.replace(",", " ").split() if isinstance(value, str) else value)]


def devices(value: Any) -> int | str:
    if isinstance(value, str) and value.strip().lower() == "auto":
        return "auto"
    return int(value)


def precision(value: Any) -> str:
    text = str(value).strip().lower()
    return {"32": "32", "32-true": "32", "bf16": "bf16-mixed", "16": "16-mixed"}.get(text, text)


def label_products(value: Any) -> list[dict[str, Any]]:
    """Label products -> ``[{"labels": [paths], "legend": name}, ...]`` (in order).

    Each product is a mapping ``{labels: PATH or [PATHS], legend: NAME}`` (config file) or the text
    ``PATHS=LEGEND`` (``--label-product``; several paths of one product joined by ``,``).
    """
    items = [value] if isinstance(value, (str, dict)) else list(value)
    products = []
    for item in items:
        if isinstance(item, dict):
            unknown = sorted(set(map(str, item)) - {"labels", "legend"})
            if unknown or "labels" not in item:
                raise ValueError(f"a label product is {{labels: [PATHS], legend: NAME}}, not {item!r}")
            paths, legend = as_list(item["labels"]), str(item.get("legend", "nlcd"))
        else:
            text, sep, legend = str(item).rpartition("=")
            if not sep or not text.strip() or not legend.strip():
                raise ValueError(f"{item!r} is not PATHS=LEGEND")
            paths = [p.strip() for p in text.split(",") if p.strip()]
        if not paths:
            raise ValueError(f"label product {item!r} names no file")
        products.append({"labels": paths, "legend": legend.strip()})
    return products


def label_trust(value: Any) -> dict[int, float]:
    """``{21: 0.2}``, ``"21=0.2,22=0.5"`` or ``["21=0.2", ...]`` -> ``{code: factor}`` (factors in [0, 1])."""
    if isinstance(value, dict):
        items = list(value.items())
    else:
        parts = [value] if isinstance(value, str) else list(value)
        items = []
        for part in parts:
            for item in str(part).replace(",", " ").split():
                code, sep, factor = item.partition("=")
                if not sep:
                    raise ValueError(f"{item!r} is not CODE=FACTOR")
                items.append((code, factor))
    trust = {}
    for code, factor in items:
        code_i, factor_f = int(code), float(factor)
        if not 0.0 <= factor_f <= 1.0:
            raise ValueError(f"trust of class {code_i} must be between 0 and 1, got {factor_f}")
        trust[code_i] = factor_f
    return trust


def mixed_classes(value: Any) -> dict[int, list[str]]:
    """``{21: [built-up, low vegetation]}``, ``"21=built-up,low vegetation"`` (several joined by
    ``;``) or a list of such strings -> ``{code: [target names]}``."""
    if isinstance(value, dict):
        items = [(k, v if isinstance(v, (list, tuple)) else str(v).split(",")) for k, v in value.items()]
    else:
        parts = [value] if isinstance(value, str) else list(value)
        items = []
        for part in parts:
            for item in str(part).split(";"):
                if not item.strip():
                    continue
                code, sep, names = item.partition("=")
                if not sep:
                    raise ValueError(f"{item!r} is not CODE=TARGET[,TARGET...]")
                items.append((code, names.split(",")))
    mixed = {}
    for code, target_names in items:
        clean = [str(n).strip() for n in target_names if str(n).strip()]
        if not clean:
            raise ValueError(f"mixed class {code} names no target class")
        mixed[int(code)] = clean
    return mixed


# ------------------------------------------------------------------------------ declaration
@dataclass(frozen=True)
class Option:
    """How one :class:`TrainConfig` field is given in a config file and on the command line.

    Attributes:
        help: the flag's help text (with units).
        parse: turns a YAML or flag value into the field's type (raises ValueError/TypeError).
        cli_type: the flag's value type for the command line (``list[str]`` for a repeatable
            flag, ``bool`` for an on/off switch).
        flag: the flag's name (default ``--`` + the field name with ``-``).
        switch: for a ``bool``: the flag is ``--x/--no-x`` (True) or only ``--x`` (False).
        metavar: the value's placeholder in ``--help``.
    """

    help: str
    parse: Callable[[Any], Any]
    cli_type: Any
    flag: str | None = None
    switch: bool = True
    metavar: str | None = None


def option(
    default: Any = MISSING,
    *,
    help: str,
    parse: Callable[[Any], Any],
    cli_type: Any,
    default_factory: Any = MISSING,
    flag: str | None = None,
    switch: bool = True,
    metavar: str | None = None,
) -> Any:
    """A dataclass field carrying its :class:`Option` in ``metadata["option"]``."""
    meta = {"option": Option(help, parse, cli_type, flag, switch, metavar)}
    if default_factory is not MISSING:
        return field(default_factory=default_factory, metadata=meta)
    return field(default=default, metadata=meta)

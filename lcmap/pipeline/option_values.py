"""How a command's options are declared once, and how their values are read.

:class:`Option` (attached to a dataclass field by :func:`option`) says how a field is given in a
config file and on the command line; the parsers below turn a YAML or flag value into the field's
type, raising ValueError/TypeError with a message that names the expected form.
:class:`DeclaredOptions` is what such a dataclass can do with its declaration: read a YAML config
file (:func:`yaml.safe_load` only: a config is data), merge the flags given on the command line
(they win), refuse an unknown key or a bad value in one line naming it, and write itself as YAML.
Used by :class:`lcmap.pipeline.training.config.TrainConfig` and
:class:`lcmap.pipeline.prediction.predict_config.PredictConfig`; :mod:`lcmap.cli_options` builds the flags.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from dataclasses import MISSING, dataclass, field
from pathlib import Path
from typing import Any, Self

import yaml

from lcmap.errors import LcmapInputError
from lcmap.geodata.yaml_files import read_yaml

__all__ = ["DeclaredOptions", "Option", "option"]


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
    """How one option field (of a :class:`DeclaredOptions` dataclass) is given in a config file and on the command line.

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


class DeclaredOptions:
    """Base of a dataclass whose every field is declared with :func:`option` (config-file keys =
    the field names, with ``_`` or ``-``, or the flags' names).

    ``cls.from_yaml(path).merged(**flags)``: the file's options, then the flags given (not None)
    win. Unknown keys and values the field's parser refuses raise :class:`LcmapInputError`, one line
    naming the key and where it came from.
    """

    # ---------------------------------------------------------------- declaration access
    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]  # type: ignore[arg-type]

    @classmethod
    def option_of(cls, name: str) -> Option:
        """The :class:`Option` declared for field ``name``."""
        return next(f.metadata["option"] for f in dataclasses.fields(cls) if f.name == name)  # type: ignore[arg-type]

    @classmethod
    def flag_of(cls, name: str) -> str:
        """The command-line flag of field ``name`` (``--patch-px``)."""
        return cls.option_of(name).flag or "--" + name.replace("_", "-")

    # ---------------------------------------------------------------- construction
    @classmethod
    def _normalise_keys(cls, data: dict[str, Any], source: str) -> dict[str, Any]:
        known = set(cls.field_names())
        # a key may also be spelled as its flag (mixed_class / mixed-class for mixed_classes)
        by_flag = {cls.flag_of(n)[2:].replace("-", "_"): n for n in known}
        out: dict[str, Any] = {}
        unknown = []
        for key, value in data.items():
            name = str(key).replace("-", "_")
            name = name if name in known else by_flag.get(name, name)
            if name not in known:
                unknown.append(str(key))
            else:
                out[name] = value
        if unknown:
            raise LcmapInputError(
                f"{source}: unknown option(s) {', '.join(sorted(unknown))}. Valid options: "
                f"{', '.join(cls.field_names())}"
            )
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "<dict>") -> Self:
        return cls()._replace(cls._normalise_keys(data, source), source)

    @classmethod
    def from_yaml(cls, path: str | Path) -> Self:
        """Read a YAML config file (keys: the field names or the flags' names); unknown keys are an error."""
        path = Path(path)
        data = read_yaml(path, "config file")
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise LcmapInputError(f"config file {path} must hold a mapping of option: value")
        return cls.from_dict(data, source=str(path))

    def merged(self, **flags: Any) -> Self:
        """A copy with ``flags`` applied; None values mean "not given" and are skipped."""
        given = {k: v for k, v in flags.items() if v is not None}
        return self._replace(self._normalise_keys(given, "command line"), "command line")

    def _replace(self, values: dict[str, Any], source: str) -> Self:
        coerced: dict[str, Any] = {}
        for name, value in values.items():
            try:
                coerced[name] = None if value is None else self.option_of(name).parse(value)
            except (TypeError, ValueError) as exc:
                raise LcmapInputError(f"{source}: option {name} = {value!r} is invalid ({exc})") from exc
        return dataclasses.replace(self, **coerced)  # type: ignore[type-var]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)  # type: ignore[call-overload]

    def to_yaml(self, path: str | Path) -> None:
        """Write the options as YAML, atomically (a temporary file renamed)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))
        os.replace(tmp, path)

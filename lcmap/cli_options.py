"""Command-line flags generated from a dataclass whose fields carry an :class:`~lcmap.pipeline.option_values.Option`.

``lcmap train`` takes one flag per :class:`~lcmap.pipeline.training.config.TrainConfig` field (name, type
and help from the field's declaration) plus ``--config FILE``; ``lcmap predict`` the same from
:class:`~lcmap.pipeline.prediction.predict_config.PredictConfig`. A flag counts only when it was
given on the command line (click's parameter source), so a flag's default never overrides the
config file.

It also holds the command line's one convention for lists: every raster list option accepts
several values after one flag as well as the flag repeated (:class:`ListOptionsGroup`), and the
commands' shared checks: an output folder that can be written (:func:`check_writable`, before any
work) and which process of a DDP run speaks (:func:`is_rank_zero`).
"""

from __future__ import annotations

import dataclasses
import inspect
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from typer.core import TyperGroup

from lcmap.errors import LcmapInputError

__all__ = [
    "check_writable",
    "is_rank_zero",
    "LIST_HELP",
    "LIST_OPTIONS",
    "REMOTE_HELP",
    "REMOTE_OPTIONS",
    "ListOptionsGroup",
    "command_from_options",
    "expand_list_options",
]

#: Raster list options of every command: several values may follow one flag
#: (``--reference a.tif b.tif``), as well as the flag repeated (``--reference a.tif --reference b.tif``).
LIST_OPTIONS = frozenset({"--images", "--labels", "--reference", "--baseline", "--old"})
#: What a raster list option accepts (appended to its help text).
LIST_HELP = (
    " Several after one flag or the flag repeated; each a file, a folder, a quoted glob "
    '("tiles/*.tif"), a .txt list of paths or a .vrt.'
)
#: Raster list options that also read remote rasters and STAC files (:mod:`lcmap.geodata.remote`).
REMOTE_OPTIONS = frozenset({"--images", "--labels", "--reference", "--baseline"})
#: What those accept besides local files (appended to their help after :data:`LIST_HELP`).
REMOTE_HELP = (
    " Also an http(s) URL of a (cloud-optimized) GeoTIFF, read with range requests, or a STAC Item or "
    "ItemCollection JSON file (see --stac-asset)."
)


#: Characters of a command's summary in ``lcmap --help``: all of it (``write_dl`` wraps it).
_NO_LIMIT = 10_000


def expand_list_options(args: list[str], names: frozenset[str] = LIST_OPTIONS) -> list[str]:
    """``--opt a b c`` -> ``--opt a --opt b --opt c`` for the list options ``names``.

    The values of a list option run up to the next token starting with ``-`` (or ``--``, after
    which nothing is touched). Click has no variadic options; this turns them into repeated ones.
    """
    out: list[str] = []
    current: str | None = None  # the list option whose values are being read
    count = 0  # values read after it so far
    for i, token in enumerate(args):
        if token == "--":
            out.extend(args[i:])
            break
        if token.startswith("-"):
            name, eq, _ = token.partition("=")
            current = name if name in names else None
            count = 1 if eq else 0
        elif current is not None:
            if count:
                out.append(current)
            count += 1
        out.append(token)
    return out


class ListOptionsGroup(TyperGroup):
    """The ``lcmap`` command group: expands several values after one list option (see
    :func:`expand_list_options`) before Click parses them (console script and CliRunner alike),
    and lists each command's whole first sentence in ``lcmap --help`` (wrapped, not cut with "...")."""

    def parse_args(self, ctx, args: list[str]) -> list[str]:
        return super().parse_args(ctx, expand_list_options(list(args)))

    def format_commands(self, ctx, formatter) -> None:
        rows = []
        for name in self.list_commands(ctx):
            cmd = self.get_command(ctx, name)
            if cmd is not None and not cmd.hidden:
                rows.append((name, cmd.get_short_help_str(limit=_NO_LIMIT)))
        if rows:
            with formatter.section("Commands"):
                formatter.write_dl(rows)


def _parameter(f: dataclasses.Field) -> inspect.Parameter:
    opt = f.metadata["option"]
    flag = opt.flag or "--" + f.name.replace("_", "-")
    if opt.cli_type is bool:
        decls = [f"{flag}/--no-{flag[2:]}"] if opt.switch else [flag]
    else:
        decls = [flag]
    default = f.default if f.default is not dataclasses.MISSING else None
    if isinstance(default, (list, dict)):
        default = None
    help_text = opt.help + (LIST_HELP if flag in LIST_OPTIONS else "") + (REMOTE_HELP if flag in REMOTE_OPTIONS else "")
    info = typer.Option(*decls, help=help_text, metavar=opt.metavar, show_default=default is not None)
    annotation = Annotated[Optional[opt.cli_type], info]  # type: ignore[name-defined]  # noqa: UP045 - built at run time
    return inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=annotation)


def _from_command_line(ctx: Any, name: str) -> bool:
    """Whether parameter ``name`` was given on the command line (not a default or an environment variable).

    Compared by name: typer ships its own copy of click, whose ``ParameterSource`` is another class.
    """
    source = ctx.get_parameter_source(name)
    return source is not None and source.name == "COMMANDLINE"


def command_from_options(cls: type, config_help: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator: turn ``body(config_file, given)`` into a typer command with one flag per field of ``cls``.

    ``config_file`` is the ``--config`` path (or None); ``given`` maps field names to the values of
    the flags given on the command line (flags left out are absent, whatever their default).
    """
    names = [f.name for f in dataclasses.fields(cls)]

    def decorator(body: Callable[..., Any]) -> Callable[..., Any]:
        def command(**kwargs: Any) -> Any:
            ctx: typer.Context = kwargs.pop("ctx")
            config_file = kwargs.pop("config")
            given = {name: kwargs[name] for name in names if _from_command_line(ctx, name)}
            return body(config_file, given)

        params = [
            inspect.Parameter("ctx", inspect.Parameter.KEYWORD_ONLY, annotation=typer.Context),
            inspect.Parameter(
                "config",
                inspect.Parameter.KEYWORD_ONLY,
                default=None,
                annotation=Annotated[Optional[Path], typer.Option("--config", help=config_help)],  # noqa: UP045
            ),
        ]
        params += [_parameter(f) for f in dataclasses.fields(cls)]
        command.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
        command.__annotations__ = {p.name: p.annotation for p in params}
        command.__name__ = body.__name__
        command.__qualname__ = body.__qualname__
        command.__doc__ = body.__doc__
        command.__module__ = body.__module__
        return command

    return decorator


def check_writable(path: Path, what: str) -> None:
    """Refuse, before any work, an output whose folder (or nearest existing parent) cannot be
    written: read-only, immutable, or no permission."""
    folder = path if path.is_dir() else path.parent
    while not folder.exists() and folder.parent != folder:
        folder = folder.parent
    if folder.is_dir() and not os.access(folder, os.W_OK | os.X_OK):
        raise LcmapInputError(
            f"{what} {path}: {folder} cannot be written (read-only or no permission). Choose a folder you can write to."
        )


def is_rank_zero() -> bool:
    """False in the other processes of a DDP training run (they run the same command; rank 0 reports)."""
    if "lightning" not in sys.modules:
        return True
    from lightning.pytorch.utilities import rank_zero_only

    return getattr(rank_zero_only, "rank", 0) == 0

"""The ``lcmap`` command: train, predict, evaluate, demo.

Heavy imports (torch, torchgeo, dask) happen inside each command so that ``--help`` is instant.
Bad input (:class:`~lcmap.errors.LcmapInputError`) prints one clear message and exits 2.
"""

from __future__ import annotations

import errno
import logging
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape

from lcmap import __version__
from lcmap.cli_options import (
    LIST_HELP,
    REMOTE_HELP,
    ListOptionsGroup,
    check_writable,
    command_from_options,
    is_rank_zero,
)
from lcmap.errors import EXIT_INPUT, EXIT_INTERRUPTED, Interrupted, LcmapInputError
from lcmap.geodata.stac_inputs import ASSET_HELP, choose_asset
from lcmap.pipeline.prediction.predict_config import PredictConfig
from lcmap.pipeline.training.config import TrainConfig

app = typer.Typer(
    cls=ListOptionsGroup,
    name="lcmap",
    help=(
        "Update high-resolution (~1 m) land-cover maps from low-resolution (10-30 m) historical "
        "labels with Paraformer (L2HNet v2, CVPR 2024) on TorchGeo. Distances are in the units "
        "named by each option: px = pixels of the imagery grid, m = metres; bounding boxes are "
        "in --bbox-crs (default EPSG:4326 longitude/latitude)."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    # click's plain help (as rio's and GDAL's): wraps every option's help in a column of 44+
    # characters at 80 columns and when piped; typer's rich panels cut it to ~18 with ellipses.
    rich_markup_mode=None,
)
# messages are never broken inside a word or path (the terminal wraps them); text from errors is
# printed as is, never read as rich markup (a path may hold "[...]")
console = Console(stderr=True, soft_wrap=True)

AOIOpt = Annotated[
    Path | None,
    typer.Option("--aoi", help="Area of interest: GeoJSON, GeoPackage or Shapefile polygons, in any CRS."),
]


def _choose_stac_asset(ctx: typer.Context, key: str | None) -> str | None:
    """``--stac-asset``'s callback: the STAC inputs of this command read asset ``key`` (until it ends)."""
    choose_asset(key)
    ctx.call_on_close(lambda: choose_asset(None))
    return key


StacAsset = Annotated[
    str | None, typer.Option("--stac-asset", metavar="KEY", help=ASSET_HELP, callback=_choose_stac_asset)
]


def _setup_logging(verbose: bool) -> None:
    """lcmap's own lines at INFO (DEBUG with --verbose); other libraries' only from WARNING (with
    --verbose, everything): rasterio's per-tile "Skipping source" lines and Dask's start-up chatter
    are not for users. Libraries that set their own level keep it (Lightning; Dask, which
    :func:`lcmap.pipeline.prediction.execution.dask_client` quiets itself)."""
    from rich.logging import RichHandler

    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.WARNING,
        format="%(message)s",
        datefmt="[%X]",
        handlers=[RichHandler(console=console, show_path=False)],
        force=True,
    )
    logging.getLogger("lcmap").setLevel(logging.DEBUG if verbose else logging.INFO)


def _run(fn, *args, **kwargs):
    """Call ``fn``; turn bad input into a one-line message and exit status 2, an interrupt (Ctrl-C,
    SIGTERM) into what was kept and exit status 130 (click would swallow the message). A file the
    system refused (read-only folder, no permission, full disk) that no command turned into a
    message of its own is said in one line too (exit 2: the user can fix it)."""
    try:
        return fn(*args, **kwargs)
    except LcmapInputError as exc:
        console.print(f"[bold red]error:[/] {escape(str(exc))}")
        raise typer.Exit(code=EXIT_INPUT) from None
    except Interrupted as exc:
        if is_rank_zero():  # DDP: rank 0 says what was kept
            console.print(f"[yellow]interrupted[/]{': ' + escape(str(exc)) if str(exc) else ''}")
        raise typer.Exit(code=EXIT_INTERRUPTED) from None
    except OSError as exc:
        if exc.filename is None:
            raise
        fix = "free some space" if exc.errno == errno.ENOSPC else "check the path and its permissions"
        said = escape(f"{exc.filename}: {exc.strerror or exc}. {fix.capitalize()} and run again.")
        console.print(f"[bold red]error:[/] {said}")
        raise typer.Exit(code=EXIT_INPUT) from None


@app.callback()
def _main(
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Debug logging.")] = False,
    version: Annotated[bool, typer.Option("--version", help="Print the version and exit.")] = False,
) -> None:
    if version:
        typer.echo(f"lcmap {__version__}")
        raise typer.Exit()
    _setup_logging(verbose)


@app.command()
@command_from_options(
    TrainConfig,
    config_help=(
        "YAML file with the same options as these flags (keys: the flag names); flags given on the command line win."
    ),
)
def train(config_file: Path | None, given: dict) -> None:
    """Train Paraformer (or the U-Net baseline) on HR imagery with LR labels inside an AOI."""
    from lcmap.pipeline.training.train import run_train

    def go():
        cfg = TrainConfig.from_yaml(config_file) if config_file else TrainConfig()
        run_dir = run_train(cfg.merged(**given), config_file=config_file)
        if is_rank_zero():
            console.print(f"[green]run written to[/] {run_dir}")

    _run(go)


@app.command()
@command_from_options(
    PredictConfig,
    config_help=(
        "YAML file with the same options as these flags (keys: the flag names); flags given on the command line "
        "win. A map's LCMAP_PREDICT_OPTIONS tag holds such a file's options (as JSON)."
    ),
)
def predict(config_file: Path | None, given: dict) -> None:
    """Predict a seamless 1 m map over --bbox/--aoi into a QGIS-ready COG (Dask-tiled, blended)."""

    def go():
        from lcmap.pipeline.prediction.run_lock import check_not_locked
        from lcmap.pipeline.prediction.scheduler_check import check_scheduler

        cfg = (PredictConfig.from_yaml(config_file) if config_file else PredictConfig()).merged(**given)
        if cfg.out:  # another run on --out, and a --scheduler that is not Dask: refused in seconds, before torch
            check_not_locked(cfg.out)
        scheduler = cfg.scheduler
        if scheduler and scheduler not in ("synchronous", "local") and ":" in scheduler:
            check_scheduler(scheduler)
        from lcmap.pipeline.prediction.predict import predict_map

        return predict_map(cfg)  # checks the options first (PredictConfig.check)

    result = _run(go)
    console.print(f"[green]map written to[/] {result.path}")


@app.command()
def evaluate(
    map_path: Annotated[Path, typer.Option("--map", help="Map GeoTIFF written by 'lcmap predict'.")],
    reference: Annotated[
        list[str],
        typer.Option(
            "--reference",
            help=(
                "HR reference land cover (any CRS/resolution; brought onto the map grid by nearest neighbour; where "
                "files overlap, the first in sorted path order holding a label wins)."
            )
            + LIST_HELP
            + REMOTE_HELP,
        ),
    ],
    reference_legend: Annotated[
        str, typer.Option("--reference-legend", help="Legend of --reference (e.g. chesapeake, or a YAML file).")
    ],
    out: Annotated[Path, typer.Option("--out", help="REPORT_DIR for metrics.json, report.md, confusion.png.")],
    baseline: Annotated[
        list[str] | None,
        typer.Option(
            "--baseline",
            help="LR product to score on the same pixels (e.g. the NLCD used for training)." + LIST_HELP + REMOTE_HELP,
        ),
    ] = None,
    baseline_legend: Annotated[str | None, typer.Option("--baseline-legend", help="Legend of --baseline.")] = None,
    aoi: AOIOpt = None,
    stac_asset: StacAsset = None,  # applied by its callback
) -> None:
    """Score a map against an HR reference: OA, mIoU, kappa, per-class IoU/precision/recall/F1."""
    from lcmap.geodata.legends import get_legend
    from lcmap.pipeline.analysis.evaluate import evaluate_map
    from lcmap.pipeline.analysis.evaluate_report import format_score as fmt

    def go():
        if baseline and not baseline_legend:
            raise LcmapInputError("--baseline needs --baseline-legend")
        check_writable(out, "--out")
        metrics = evaluate_map(
            map_path,
            reference,
            get_legend(reference_legend),
            out,
            baseline=baseline or None,
            baseline_legend=get_legend(baseline_legend) if baseline_legend else None,
            aoi=aoi,
        )
        line = f"OA {fmt(metrics['oa'])}  mIoU {fmt(metrics['miou'])}  kappa {fmt(metrics['kappa'])}"
        if "baseline" in metrics:
            b = metrics["baseline"]
            line += f"   (baseline OA {fmt(b['oa'])}  mIoU {fmt(b['miou'])}  kappa {fmt(b['kappa'])})"
        console.print(line)
        console.print(f"[green]report written to[/] {out}")

    _run(go)


@app.command()
def demo(
    out: Annotated[
        Path,
        typer.Option(
            "--out",
            help=(
                "Folder for the map, report, quicklook and the training run: a new or empty folder, or one an "
                "earlier lcmap demo made (it holds a .lcmap-demo file; its files are replaced). A folder holding "
                "other files is refused, never overwritten."
            ),
        ),
    ] = Path("lcmap-demo"),
    epochs: Annotated[
        int | None, typer.Option("--epochs", help="Override the demo's number of epochs (for a quicker look).")
    ] = None,
    resume: Annotated[
        bool, typer.Option("--resume", help="Continue the interrupted training in OUT/run, then map and score.")
    ] = False,
    seed: Annotated[
        int | None,
        typer.Option("--seed", help="Random seed of the training (default: lcmap train's, 1234); scores move with it."),
    ] = None,
) -> None:
    """Train paraformer-tiny on the embedded real sample (NAIP 1 m + NLCD 30 m), map it, score it."""
    from lcmap.pipeline.demo import run_demo

    _run(run_demo, out, epochs=epochs, resume=resume, **({"seed": seed} if seed is not None else {}))


@app.command()
def stats(
    map_path: Annotated[
        Path,
        typer.Option(
            "--map",
            help="Class map GeoTIFF (e.g. from 'lcmap predict'; any CRS) with an LCMAP_LEGEND tag or category names.",
        ),
    ],
    zones: Annotated[
        Path, typer.Option("--zones", help="Zone polygons (GeoPackage, GeoJSON, Shapefile; any CRS), e.g. districts.")
    ],
    field: Annotated[
        str, typer.Option("--field", help="Zone name field of --zones (features sharing a name are one zone).")
    ],
    out: Annotated[
        Path,
        typer.Option(
            "--out",
            help=(
                "STATS_DIR for stats.csv (zone, class, pixels, km2, percent) and stats.gpkg (zones with one km2 "
                "column per class)."
            ),
        ),
    ],
    block_px: Annotated[
        int,
        typer.Option("--block-px", help="Side of one counting block, pixels (memory per thread: ~12 bytes per pixel)."),
    ] = 2048,
) -> None:
    """Area per class and zone: pixels, km2 and percent of the zone's classified area (nodata not counted)."""
    from lcmap.geodata.io import check_not_an_input
    from lcmap.pipeline.analysis.zone_stats import write_stats, zone_stats

    def go():
        if block_px < 1:
            raise LcmapInputError(f"--block-px must be a positive number of pixels, got {block_px}")
        outputs = {"--out": out, "--out's stats.csv": out / "stats.csv", "--out's stats.gpkg": out / "stats.gpkg"}
        check_not_an_input(outputs, [map_path, zones])
        check_writable(out, "--out")
        result, zone_frame = zone_stats(map_path, zones, field, block_px=block_px, progress=True)
        csv_path, gpkg_path = write_stats(result, zone_frame, out)
        console.print(
            f"{len(result.zone_names)} zones x {len(result.class_codes)} classes, "
            f"{result.area_km2.sum():.3f} km2 classified (summed over the zones; overlaps count in each)"
        )
        console.print(f"[green]statistics written to[/] {csv_path} and {gpkg_path}")

    _run(go)


@app.command()
def changes(
    map_path: Annotated[
        Path,
        typer.Option(
            "--map", help="New map GeoTIFF written by 'lcmap predict' (its 1 m grid is the change map's grid)."
        ),
    ],
    old: Annotated[
        list[Path],
        typer.Option(
            "--old",
            help=(
                "Older land-cover product, any CRS/resolution (resampled nearest onto the map grid). Where files "
                "overlap, the first in sorted path order holding a class wins."
            )
            + LIST_HELP,
        ),
    ],
    old_legend: Annotated[
        str,
        typer.Option(
            "--old-legend",
            help="Legend of --old: nlcd, worldcover, esri, fromglc10, glc_fcs30, chesapeake, 4class, or a YAML file.",
        ),
    ],
    out: Annotated[
        Path,
        typer.Option(
            "--out",
            help=(
                "Change map COG (CHANGES.tif); CHANGES.qml, .csv (pixels, km2), .md and .stac.json are written "
                "beside it."
            ),
        ),
    ],
    map_legend: Annotated[
        str | None,
        typer.Option(
            "--map-legend",
            help="Legend of the map's codes when it has no LCMAP_LEGEND tag (e.g. 4class for codes 1-4).",
        ),
    ] = None,
    block_px: Annotated[
        int,
        typer.Option(
            "--block-px",
            help="Side of the square window read at a time, pixels of the map grid (memory; rounded up to 512).",
        ),
    ] = 2048,
) -> None:
    """Map from -> to transitions on the target classes between an older product and a new map."""
    from lcmap.pipeline.analysis.changes import map_changes

    _run(check_writable, out, "--out")
    result = _run(map_changes, map_path, old, old_legend, out, map_legend_override=map_legend, block_px=block_px)
    changed = sum(t.km2 for t in result.transitions if t.changed)
    total = sum(t.km2 for t in result.transitions)
    console.print(f"changed {changed:.4f} km2 of {total:.4f} km2 compared ({len(result.transitions)} from -> to pairs)")
    console.print(f"[green]change map written to[/] {result.out} (table {result.csv.name}, STAC {result.stac.name})")


@app.command()
def stac(
    map_path: Annotated[
        Path, typer.Option("--map", help="Map or change map COG; MAP.stac.json is (re)written beside it.")
    ],
    imagery_datetime: Annotated[
        str | None,
        typer.Option(
            "--datetime",
            help=(
                "Imagery date, ISO 8601 (2020-04-15) or START/END (UTC when no zone); default: the map's "
                "LCMAP_IMAGERY_DATETIME tag, else the file's time."
            ),
        ),
    ] = None,
    report: Annotated[
        list[Path] | None,
        typer.Option(
            "--report", help="Further files to list as metadata assets (e.g. an evaluation report.md); repeatable."
        ),
    ] = None,
) -> None:
    """Write the STAC Item (MAP.stac.json) of an existing map: footprint, projection, classes, assets."""
    from lcmap.pipeline.analysis.stac import write_stac_item

    _run(check_writable, map_path.with_name(map_path.stem + ".stac.json"), "the STAC Item")
    path = _run(write_stac_item, map_path, imagery_datetime=imagery_datetime, reports=report or ())
    console.print(f"[green]STAC Item written to[/] {path}")


def main() -> None:
    """Console-script entry point."""
    try:
        app()
    except KeyboardInterrupt as exc:  # TrainingInterrupted says where last.ckpt is and how to resume
        console.print(f"[yellow]interrupted[/]{': ' + escape(str(exc)) if str(exc) else ''}")
        sys.exit(EXIT_INTERRUPTED)


if __name__ == "__main__":
    main()

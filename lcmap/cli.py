"""The ``lcmap`` command: train, predict, evaluate, demo.

Heavy imports (torch, torchgeo, dask) happen inside each command so that ``--help`` is instant.
Bad input (:class:`~lcmap.errors.LcmapInputError`) prints one clear message and exits 2.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

from lcmap import __version__
from lcmap.errors import EXIT_INPUT, EXIT_INTERRUPTED, LcmapInputError

app = typer.Typer(
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
)
console = Console(stderr=True)

BBox = Annotated[
    Optional[tuple[float, float, float, float]],
    typer.Option("--bbox", help="Area as W S E N, in --bbox-crs units (degrees for EPSG:4326, metres for UTM)."),
]
BBoxCRS = Annotated[str, typer.Option("--bbox-crs", help="CRS of --bbox, e.g. EPSG:4326 (default) or EPSG:26917.")]
AOIOpt = Annotated[
    Optional[Path],
    typer.Option("--aoi", help="Area of interest: GeoJSON, GeoPackage or Shapefile polygons, in any CRS."),
]


def _setup_logging(verbose: bool) -> None:
    from rich.logging import RichHandler

    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(message)s",
        datefmt="[%X]",
        handlers=[RichHandler(console=console, show_path=False)],
        force=True,
    )


def _run(fn, *args, **kwargs):
    """Call ``fn``; turn bad input into a one-line message and exit status 2."""
    try:
        return fn(*args, **kwargs)
    except LcmapInputError as exc:
        console.print(f"[bold red]error:[/] {exc}")
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
def train(
    out: Annotated[Path, typer.Option("--out", help="RUN_DIR to write checkpoints, config, legend, stats, metrics, loss plot.")],
    images: Annotated[Optional[list[Path]], typer.Option("--images", help="HR imagery files or folders (GeoTIFF; any band count; imagery CRS and resolution define the grid).")] = None,
    labels: Annotated[Optional[list[Path]], typer.Option("--labels", help="LR label rasters (e.g. NLCD 30 m, WorldCover 10 m), any CRS; resampled nearest onto the imagery grid.")] = None,
    legend: Annotated[Optional[str], typer.Option("--legend", help="Legend of --labels: nlcd, worldcover, esri, fromglc10, glc_fcs30, chesapeake, or a YAML file.")] = None,
    aoi: AOIOpt = None,
    bbox: BBox = None,
    bbox_crs: BBoxCRS = "EPSG:4326",
    model: Annotated[Optional[str], typer.Option("--model", help="paraformer (paper size, GPU), paraformer-tiny (CPU) or unet (baseline).")] = None,
    config: Annotated[Optional[Path], typer.Option("--config", help="YAML file with the same options as these flags (flags win).")] = None,
    epochs: Annotated[Optional[int], typer.Option("--epochs", help="Number of epochs.")] = None,
    steps_per_epoch: Annotated[Optional[int], typer.Option("--steps-per-epoch", help="Optimizer steps (batches) per epoch.")] = None,
    batch_size: Annotated[Optional[int], typer.Option("--batch-size", help="Patches per batch (per device).")] = None,
    patch_px: Annotated[Optional[int], typer.Option("--patch-px", help="Training patch side in pixels of the imagery grid (multiple of 32).")] = None,
    lr: Annotated[Optional[float], typer.Option("--lr", help="Learning rate.")] = None,
    devices: Annotated[Optional[int], typer.Option("--devices", help="Number of devices (GPUs: DDP when > 1).")] = None,
    accelerator: Annotated[Optional[str], typer.Option("--accelerator", help="auto, cpu or gpu.")] = None,
    precision: Annotated[Optional[str], typer.Option("--precision", help="32, bf16-mixed or 16-mixed (mixed precision on GPU only).")] = None,
    vit_weights: Annotated[Optional[Path], typer.Option("--vit-weights", help="Local pretrained ViT weights (timm .pth/.safetensors or Google ImageNet-21k .npz). Without it the ViT trains from scratch.")] = None,
    reference: Annotated[Optional[list[Path]], typer.Option("--reference", help="Optional HR reference land cover for validation (mIoU over target classes).")] = None,
    reference_legend: Annotated[Optional[str], typer.Option("--reference-legend", help="Legend of --reference.")] = None,
    class_weighting: Annotated[Optional[str], typer.Option("--class-weighting", help="Loss weight per LR class: inv_sqrt_freq (1/sqrt(label frequency), default), inv_freq or none.")] = None,
    label_trust: Annotated[Optional[list[str]], typer.Option("--label-trust", help="CODE=FACTOR (0..1, repeatable): scale the loss weight of an LR class that is mixed at 1 m, e.g. --label-trust 21=0.2 for NLCD 'Developed, Open Space' (mostly lawn). 0 ignores the class.")] = None,
    mixed_class: Annotated[Optional[list[str]], typer.Option("--mixed-class", help="CODE=TARGET[,TARGET] (repeatable): an LR class that is a mixture at 1 m, trained as 'one of the classes of these target classes' (partial-label loss), e.g. --mixed-class '21=built-up,low vegetation' for NLCD 'Developed, Open Space'.")] = None,
    seed: Annotated[Optional[int], typer.Option("--seed", help="Random seed.")] = None,
    num_workers: Annotated[Optional[int], typer.Option("--num-workers", help="DataLoader worker processes.")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue an interrupted run from RUN_DIR/checkpoints/last.ckpt.")] = False,
) -> None:
    """Train Paraformer (or the U-Net baseline) on HR imagery with LR labels inside an AOI."""
    from lcmap.pipeline.train import TrainConfig, run_train

    flags = {
        "out": out, "images": images, "labels": labels, "legend": legend, "aoi": aoi, "bbox": bbox,
        "bbox_crs": bbox_crs, "model": model, "epochs": epochs, "steps_per_epoch": steps_per_epoch,
        "batch_size": batch_size, "patch_px": patch_px, "lr": lr, "devices": devices,
        "accelerator": accelerator, "precision": precision, "vit_weights": vit_weights,
        "reference": reference, "reference_legend": reference_legend, "seed": seed,
        "class_weighting": class_weighting, "label_trust": label_trust, "mixed_classes": mixed_class,
        "num_workers": num_workers, "resume": resume or None,
    }
    flags = {k: v for k, v in flags.items() if v is not None and v != []}

    def go():
        cfg = TrainConfig.from_yaml(config) if config else TrainConfig()
        cfg = cfg.merged(**flags)
        run_dir = run_train(cfg)
        console.print(f"[green]run written to[/] {run_dir}")

    _run(go)


@app.command()
def predict(
    model: Annotated[Path, typer.Option("--model", help="RUN_DIR from 'lcmap train' or a .ckpt file.")],
    images: Annotated[list[Path], typer.Option("--images", help="HR imagery files or folders (same bands as the model's training imagery).")],
    out: Annotated[Path, typer.Option("--out", help="Output Cloud-Optimized GeoTIFF (MAP.tif); MAP.qml is written beside it.")],
    bbox: BBox = None,
    bbox_crs: BBoxCRS = "EPSG:4326",
    aoi: AOIOpt = None,
    tile_px: Annotated[int, typer.Option("--tile-px", help="Model window side, pixels (multiple of 32).")] = 512,
    overlap_px: Annotated[int, typer.Option("--overlap-px", help="Overlap between neighbouring windows, pixels (blended).")] = 64,
    block_px: Annotated[int, typer.Option("--block-px", help="Side of one Dask task's block, pixels (memory per task).")] = 4096,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Windows per model call.")] = 4,
    device: Annotated[str, typer.Option("--device", help="auto, cpu or cuda.")] = "auto",
    scheduler: Annotated[Optional[str], typer.Option("--scheduler", help="dask.distributed scheduler address (tcp://host:8786); default: a local cluster sized to this machine; 'synchronous' runs in this process.")] = None,
    confidence: Annotated[bool, typer.Option("--confidence", help="Also write MAP_confidence.tif: max class probability in percent.")] = False,
    legend: Annotated[str, typer.Option("--legend", help="target: the 4 common classes (water, tree canopy, low vegetation, built-up); native: the model's LR legend codes.")] = "target",
    precision: Annotated[str, typer.Option("--precision", help="32 (float32) or bf16 (bfloat16 on CUDA GPUs; refused on CPU).")] = "32",
    devices: Annotated[Optional[int], typer.Option("--devices", help="GPUs to use with a local cluster (one worker per GPU; default: all visible).")] = None,
) -> None:
    """Predict a seamless 1 m map over --bbox/--aoi into a QGIS-ready COG (Dask-tiled, blended)."""
    from lcmap.errors import Interrupted
    from lcmap.pipeline.predict import predict_map

    try:  # Typer would turn Ctrl-C into exit 130 before main() could say what was kept
        result = _run(
            predict_map, model, images, out, bbox=bbox, bbox_crs=bbox_crs, aoi=aoi, tile_px=tile_px,
            overlap_px=overlap_px, block_px=block_px, batch_size=batch_size, device=device,
            scheduler=scheduler, confidence=confidence, legend=legend, precision=precision, devices=devices,
        )
    except Interrupted as exc:
        console.print(f"[yellow]interrupted[/]: {exc}")
        raise typer.Exit(code=EXIT_INTERRUPTED) from None
    console.print(f"[green]map written to[/] {result.path}")


@app.command()
def evaluate(
    map_path: Annotated[Path, typer.Option("--map", help="Map GeoTIFF written by 'lcmap predict'.")],
    reference: Annotated[list[Path], typer.Option("--reference", help="HR reference land cover (any CRS/resolution; brought onto the map grid by nearest neighbour).")],
    reference_legend: Annotated[str, typer.Option("--reference-legend", help="Legend of --reference (e.g. chesapeake, or a YAML file).")],
    out: Annotated[Path, typer.Option("--out", help="REPORT_DIR for metrics.json, report.md, confusion.png.")],
    baseline: Annotated[Optional[list[Path]], typer.Option("--baseline", help="LR product to score on the same pixels (e.g. the NLCD used for training).")] = None,
    baseline_legend: Annotated[Optional[str], typer.Option("--baseline-legend", help="Legend of --baseline.")] = None,
    aoi: AOIOpt = None,
) -> None:
    """Score a map against an HR reference: OA, mIoU, kappa, per-class IoU/precision/recall/F1."""
    from lcmap.geodata.legends import get_legend
    from lcmap.pipeline.evaluate import evaluate_map

    def go():
        if baseline and not baseline_legend:
            raise LcmapInputError("--baseline needs --baseline-legend")
        metrics = evaluate_map(
            map_path, reference, get_legend(reference_legend), out,
            baseline=baseline or None,
            baseline_legend=get_legend(baseline_legend) if baseline_legend else None,
            aoi=aoi,
        )
        line = f"OA {metrics['oa']:.3f}  mIoU {metrics['miou']:.3f}  kappa {metrics['kappa']:.3f}"
        if "baseline" in metrics:
            b = metrics["baseline"]
            line += f"   (baseline OA {b['oa']:.3f}  mIoU {b['miou']:.3f})"
        console.print(line)
        console.print(f"[green]report written to[/] {out}")

    _run(go)


@app.command()
def demo(
    out: Annotated[Path, typer.Option("--out", help="Folder for the map, report, quicklook and the training run.")] = Path("lcmap-demo"),
    epochs: Annotated[Optional[int], typer.Option("--epochs", help="Override the demo's number of epochs (for a quicker look).")] = None,
) -> None:
    """Train paraformer-tiny on the embedded real sample (NAIP 1 m + NLCD 30 m), map it, score it."""
    from lcmap.pipeline.demo import run_demo

    _run(run_demo, out, epochs=epochs)


@app.command()
def stats(
    map_path: Annotated[Path, typer.Option("--map", help="Class map GeoTIFF (e.g. from 'lcmap predict'; any CRS) with an LCMAP_LEGEND tag or category names.")],
    zones: Annotated[Path, typer.Option("--zones", help="Zone polygons (GeoPackage, GeoJSON, Shapefile; any CRS), e.g. districts.")],
    field: Annotated[str, typer.Option("--field", help="Zone name field of --zones (features sharing a name are one zone).")],
    out: Annotated[Path, typer.Option("--out", help="STATS_DIR for stats.csv (zone, class, pixels, km2, percent) and stats.gpkg (zones with one km2 column per class).")],
    block_px: Annotated[int, typer.Option("--block-px", help="Side of one counting block, pixels (memory per thread: ~12 bytes per pixel).")] = 2048,
) -> None:
    """Area per class and zone: pixels, km2 and percent of the zone's classified area (nodata not counted)."""
    from lcmap.pipeline.zone_stats import write_stats, zone_stats

    def go():
        if block_px < 1:
            raise LcmapInputError(f"--block-px must be a positive number of pixels, got {block_px}")
        result, zone_frame = zone_stats(map_path, zones, field, block_px=block_px, progress=True)
        csv_path, gpkg_path = write_stats(result, zone_frame, out)
        console.print(f"{len(result.zone_names)} zones x {len(result.class_codes)} classes, "
                      f"{result.area_km2.sum():.3f} km2 classified")
        console.print(f"[green]statistics written to[/] {csv_path} and {gpkg_path}")

    _run(go)


def main() -> None:
    """Console-script entry point."""
    try:
        app()
    except KeyboardInterrupt as exc:  # TrainingInterrupted says where last.ckpt is and how to resume
        console.print(f"[yellow]interrupted[/]{': ' + str(exc) if str(exc) else ''}")
        sys.exit(EXIT_INTERRUPTED)


if __name__ == "__main__":
    main()

"""``lcmap predict``: a seamless land-cover map over any area, as a QGIS-ready COG.

This module checks the inputs and works out the grids (:func:`plan_prediction`), then runs the
steps (:func:`predict_map`); each step is documented in its own module:

- :mod:`lcmap.pipeline.tiling`: the output grid (imagery grid ∩ AOI bounds; pixels outside the
  AOI polygon or without imagery are nodata), the global grid of overlapping model windows,
  the Hann taper and the blending of window probabilities, the cut into blocks;
- :mod:`lcmap.pipeline.inference`: one block task: read its imagery, run the model in padded
  batches, sum LR-class probabilities per target class (``--legend target``), blend; the
  per-worker model cache;
- :mod:`lcmap.pipeline.execution`: the tasks (groups of blocks) in this process or on Dask (a
  local cluster or a scheduler address), the worker plugin that loads the model, and the
  progress bar;
- :mod:`lcmap.pipeline.mapfile` (and :mod:`lcmap.pipeline.cog`): block files written
  atomically, the manifest that lets a re-run resume, the final COG with its legend tag,
  category names and ``MAP.qml``.

Only blocks that touch the imagery's footprint inside the AOI are planned (imagery with gaps
costs only where it lies); the others are nodata in the COG. The map is bit-identical for any
``block_px``, grouping of blocks into tasks, and scheduler.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import shutil
import time
import uuid
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, cast

import shapely
import torch
from rasterio.crs import CRS

from lcmap.errors import ImageryMismatchError, Interrupted, LcmapInputError
from lcmap.geodata.aoi import AOI, resolve_aoi
from lcmap.geodata.datasets import HRImagery, open_imagery
from lcmap.geodata.io import check_not_an_input
from lcmap.geodata.legends import MAP_NODATA, Legend, target_legend
from lcmap.geodata.mapcrs import grid_res, output_crs
from lcmap.geodata.normalization import imagery_mismatch, sample_imagery_range
from lcmap.models.tta import TTA_MODES, tta_transforms
from lcmap.pipeline import execution, mapfile, stac
from lcmap.pipeline.inference import PRECISIONS, PredictJob
from lcmap.pipeline.runs import TrainedModel, load_trained_model, resolve_checkpoint, training_imagery_range
from lcmap.pipeline.tiling import Block, WindowGrid, block_groups, block_side_px, group_shape, output_grid

__all__ = ["predict_map", "plan_prediction", "Plan", "PredictResult", "TILE_MULTIPLE"]

log = logging.getLogger(__name__)

#: ``tile_px`` must be a multiple of this (U-Net: 32; Paraformer-tiny: 16).
TILE_MULTIPLE = 32


@dataclass
class Plan:
    """A checked prediction: the job, the legend of the output codes, and where things go."""

    job: PredictJob
    out: Path
    partial: Path
    out_legend: Legend
    model_legend: Legend
    fingerprint: dict[str, Any]
    model: TrainedModel | None = field(default=None, repr=False)
    imagery: HRImagery | None = field(default=None, repr=False)
    #: the imagery's footprint inside the AOI, in the output CRS (WKB)
    area_wkb: bytes | None = field(default=None, repr=False)

    def blocks(self) -> list[Block]:
        """The blocks to predict: those that touch the imagery's footprint inside the AOI."""
        blocks = self.job.blocks()
        if self.area_wkb is None:
            return blocks
        area = shapely.from_wkb(self.area_wkb)
        shapely.prepare(area)
        g = self.job.grid
        return [
            b for b in blocks if area.intersects(shapely.box(*g.bounds(b.r0, b.c0, b.r0 + b.height, b.c0 + b.width)))
        ]


@dataclass(frozen=True)
class PredictResult:
    """What :func:`predict_map` made, and how.

    ``blocks``: blocks in the map, of which ``blocks_resumed`` were already done in
    ``MAP.tif.partial`` and ``blocks_run`` were run now; ``windows``: model windows run;
    ``seconds_forward``: time inside the model (meaningful on CPU, synchronous only: summed over
    workers otherwise); ``block_px``: the block side used (whole window strides); ``width`` x
    ``height``: the map in pixels; ``seconds_predict``: planning and the blocks;
    ``seconds_write``: the COG(s).
    """

    path: Path
    confidence_path: Path | None
    blocks: int
    blocks_resumed: int
    blocks_run: int
    windows: int
    seconds_forward: float
    block_px: int
    width: int
    height: int
    seconds_predict: float
    seconds_write: float

    def stats(self) -> dict[str, int | float]:
        """The run statistics (every field but the paths)."""
        return {k: v for k, v in asdict(self).items() if k not in ("path", "confidence_path")}


# ------------------------------------------------------------------------------ planning
def _check_output_folder(out: Path) -> None:
    if out.exists() and out.is_dir():
        raise LcmapInputError(f"--out {out} is a folder: give the map's file name, e.g. {out / 'map.tif'}")
    folder = out.parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".lcmap-write-test-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise LcmapInputError(
            f"cannot write to the output folder {folder} ({exc.strerror or exc}). Choose another --out "
            "in a folder you can write to."
        ) from exc


def _code_lut(legend: Legend, mode: str) -> tuple[tuple[int, ...], tuple[int, ...] | None, Legend, str]:
    """Map channels and their codes for ``--legend target|native``.

    Returns:
        ``(code_lut, class_group, out_legend, dtype)``: ``code_lut[c]`` is the code written for map
        channel ``c``; ``class_group[k]`` the map channel that model channel ``k`` adds its
        probability to (None: one map channel per model channel). With ``target``, the map
        channels are the target classes, plus one channel (written as nodata) for LR classes
        without a target: each pixel gets the target class of highest summed probability.
    """
    if mode == "target":
        scheme = legend.target
        group = tuple(int(v) for v in legend.index_to_target_group())
        lut = tuple(c.code for c in scheme.classes) + ((MAP_NODATA,) if len(scheme) in group else ())
        out_legend = target_legend(scheme)
    elif mode == "native":
        if MAP_NODATA in legend.codes:
            raise LcmapInputError(
                f"legend {legend.name!r} has a class coded {MAP_NODATA}, which is the map's nodata "
                "value: write the map with --legend target instead"
            )
        lut = tuple(legend.codes)
        group = None
        out_legend = legend
    else:
        raise LcmapInputError(f"--legend {mode!r}: choose 'target' (common classes) or 'native' (the model's legend)")
    dtype = "uint8" if max(lut + (MAP_NODATA,)) <= 255 else "uint16"
    return lut, group, out_legend, dtype


def _resolve_device(device: str) -> str:
    d = str(device).lower()
    if d == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if d not in ("cpu", "cuda") and not d.startswith("cuda:"):
        raise LcmapInputError(f"--device {device!r}: choose auto, cpu or cuda")
    if d.startswith("cuda") and not torch.cuda.is_available():
        raise LcmapInputError("--device cuda: no CUDA GPU is visible to PyTorch here; use --device cpu")
    return d


def _blocks_on_disk(blocks_dir: Path) -> int:
    try:
        return sum(1 for _ in blocks_dir.glob("r*_c*.tif"))
    except OSError:
        return 0


def _check_imagery_kind(tm: TrainedModel, ds: HRImagery, input_scale: float | None) -> None:
    """Refuse imagery whose data type or value range is not that of the model's training imagery.

    Raises:
        ImageryMismatchError: naming the difference and ``--input-scale``.
    """
    trained = training_imagery_range(tm)
    if trained is None:
        log.info(
            "model %s does not record its training imagery's data type and range (trained by an older "
            "lcmap): the imagery is not checked against it",
            tm.checkpoint,
        )
        return
    dtype, high = sample_imagery_range(ds.files, ds.nodata)
    problem = imagery_mismatch(trained, dtype, high, input_scale)
    if problem is None:
        return
    t_high = max(trained["high"])
    hint = ""
    if math.isfinite(float(max(high))) and float(max(high)) > 0:
        hint = f" (here about --input-scale {t_high / float(max(high)):.3g})"
    raise ImageryMismatchError(
        f"the imagery ({ds.files[0]}{' ...' if len(ds.files) > 1 else ''}) is not like model {tm.checkpoint}'s "
        f"training imagery: {problem}. The map would be wrong. Use imagery of the same kind as the training "
        f"imagery, or, if it is the same imagery scaled differently, give --input-scale FACTOR: the imagery's "
        f"values are multiplied by FACTOR before the model sees them{hint}."
    )


def plan_prediction(
    model: str | Path,
    images: str | Path | Sequence[str | Path],
    out: str | Path,
    *,
    bbox: Sequence[float] | None = None,
    bbox_crs: str = "EPSG:4326",
    aoi: str | Path | AOI | None = None,
    tile_px: int = 512,
    overlap_px: int = 64,
    block_px: int = 4096,
    batch_size: int = 4,
    device: str = "auto",
    confidence: bool = False,
    legend: str = "target",
    torch_threads: int | None = None,
    precision: str = "32",
    input_scale: float | None = None,
    tta: str = "none",
    crs: str | None = None,
) -> Plan:
    """Check every input and work out the grids; writes nothing but a probe file.

    ``crs``: the map's CRS (imagery in other CRSs is warped onto it); None: see :func:`output_crs`.

    Raises:
        LcmapInputError: on any bad input (see :func:`predict_map`).
    """
    if not isinstance(tile_px, int) or tile_px < TILE_MULTIPLE or tile_px % TILE_MULTIPLE:
        raise LcmapInputError(
            f"--tile-px {tile_px}: the window side must be a positive multiple of {TILE_MULTIPLE} px "
            f"(the networks downsample by {TILE_MULTIPLE}), e.g. 256, 512 or 1024"
        )
    if not isinstance(overlap_px, int) or overlap_px < 0 or 2 * overlap_px > tile_px:
        raise LcmapInputError(
            f"--overlap-px {overlap_px}: must be between 0 and half of --tile-px ({tile_px // 2}); "
            "64 px per side is a good default for 512 px windows"
        )
    if not isinstance(batch_size, int) or batch_size < 1:
        raise LcmapInputError(f"--batch-size {batch_size}: must be at least 1")
    if not isinstance(block_px, int) or block_px < 1:
        raise LcmapInputError(f"--block-px {block_px}: must be a positive number of pixels")
    if legend not in ("target", "native"):
        raise LcmapInputError(f"--legend {legend!r}: choose 'target' (common classes) or 'native' (the model's legend)")
    if input_scale is not None and not (math.isfinite(input_scale) and input_scale > 0):
        raise LcmapInputError(f"--input-scale {input_scale}: must be a positive number, e.g. 0.025")
    if tta not in TTA_MODES:
        raise LcmapInputError(
            f"--tta {tta!r}: choose none, flips (4 flips, ~4x the model time) or d4 (8 flips and rotations, ~8x)"
        )
    dev = _resolve_device(device)
    if precision not in PRECISIONS:
        raise LcmapInputError(f"--precision {precision!r}: choose 32 or bf16 (bfloat16 on CUDA GPUs)")
    if precision == "bf16" and not dev.startswith("cuda"):
        raise LcmapInputError(
            "--precision bf16 runs the model in bfloat16 on CUDA GPUs only; this run is on the CPU "
            "(--device cpu, or no GPU visible): leave --precision out (float32)"
        )

    out = Path(out).expanduser().absolute()
    _check_output_folder(out)

    checkpoint = resolve_checkpoint(model)
    tm = load_trained_model(checkpoint, "cpu")
    ds = open_imagery(images)
    if ds.count != tm.in_channels:
        raise LcmapInputError(
            f"the imagery has {ds.count} band(s) ({', '.join(ds.files[:3])}{' ...' if len(ds.files) > 3 else ''}) "
            f"but model {checkpoint} was trained on {tm.in_channels}: use imagery with the same bands, "
            "in the same order, as the training imagery"
        )
    outputs = {"--out": out, "the map's .partial folder": out.with_name(out.name + ".partial")}
    if confidence:
        outputs["the confidence map"] = mapfile.confidence_path(out)
    check_not_an_input(outputs, [*ds.files, str(checkpoint)])
    _check_imagery_kind(tm, ds, input_scale)
    bbox4 = cast("tuple[float, float, float, float]", tuple(bbox)) if bbox is not None else None
    if isinstance(aoi, (str, Path)):
        aoi_obj = resolve_aoi(aoi, bbox4, bbox_crs)
    elif isinstance(aoi, AOI):
        if bbox is not None:
            raise LcmapInputError("give either --aoi or --bbox, not both")
        aoi_obj = aoi
    else:
        aoi_obj = resolve_aoi(None, bbox4, bbox_crs)
    out_crs, why = output_crs(ds, crs, aoi_obj)
    if out_crs != CRS.from_user_input(ds.crs):  # read every file onto the map's CRS
        ds = open_imagery(images, crs=out_crs, res=grid_res(ds, out_crs))
    log.info("map CRS: %s (%s)", out_crs.to_string(), why)
    crs = out_crs
    x, y, _ = ds.bounds
    img_bounds = (float(x.start), float(y.start), float(x.stop), float(y.stop))
    geom = None
    if aoi_obj is not None:
        aoi_obj.check_overlap(img_bounds, crs, f"the imagery ({ds.files[0]}{' ...' if len(ds.files) > 1 else ''})")
        geom = aoi_obj.to_crs(crs)
    grid = output_grid(
        ds.crs.to_wkt(), img_bounds, (float(ds.res[0]), float(ds.res[1])), geom.bounds if geom is not None else None
    )
    if grid.width <= 0 or grid.height <= 0:
        raise LcmapInputError(
            f"the AOI ({aoi_obj.source if aoi_obj else ''}) only touches the imagery's edge: nothing to predict"
        )
    lut, group, out_legend, dtype = _code_lut(tm.legend, legend)
    wg = WindowGrid(tile_px, overlap_px, grid.height, grid.width)
    block_size = block_side_px(block_px, wg)
    partial = out.with_name(out.name + ".partial")
    aoi_wkb = shapely.to_wkb(geom) if geom is not None else None
    footprint = shapely.union_all(list(ds.index.geometry.values))  # the files' extents, imagery CRS
    area = footprint.intersection(geom) if geom is not None else footprint
    job = PredictJob(
        checkpoint=str(checkpoint.absolute()),
        image_files=tuple(os.path.abspath(f) for f in ds.files),
        device=dev,
        torch_threads=torch_threads,
        grid=grid,
        windows=wg,
        block_size=block_size,
        batch_size=batch_size,
        code_lut=lut,
        class_group=group,
        dtype=dtype,
        confidence=bool(confidence),
        aoi_wkb=aoi_wkb,
        blocks_dir=str(partial / "blocks"),
        precision=precision,
        input_scale=float(input_scale) if input_scale is not None else 1.0,
        tta=tta,
    )
    fingerprint = mapfile.fingerprint(job)
    # the per-process model cache must not serve an older checkpoint saved at the same path
    model_key = json.dumps([fingerprint["checkpoint"], fingerprint["images"]])
    job = replace(job, cache_key=hashlib.sha256(model_key.encode()).hexdigest()[:16])
    return Plan(
        job=job,
        out=out,
        partial=partial,
        out_legend=out_legend,
        model_legend=tm.legend,
        fingerprint=fingerprint,
        model=tm,
        imagery=ds,
        area_wkb=shapely.to_wkb(area),
    )


# ------------------------------------------------------------------------------ running
def predict_map(
    model: str | Path,
    images: str | Path | Sequence[str | Path],
    out: str | Path,
    *,
    bbox: Sequence[float] | None = None,
    bbox_crs: str = "EPSG:4326",
    aoi: str | Path | AOI | None = None,
    tile_px: int = 512,
    overlap_px: int = 64,
    block_px: int = 4096,
    batch_size: int = 4,
    device: str = "auto",
    scheduler: str | None = None,
    confidence: bool = False,
    legend: str = "target",
    progress: bool = True,
    precision: str = "32",
    devices: int | None = None,
    input_scale: float | None = None,
    tta: str = "none",
    crs: str | None = None,
) -> PredictResult:
    """Predict a land-cover map over the imagery (or part of it) and write it as a COG.

    Args:
        model: RUN_DIR written by ``lcmap train`` (checkpoint chosen by
            :func:`lcmap.pipeline.runs.resolve_checkpoint`) or a ``.ckpt``.
        images: imagery files and/or folders (searched recursively); one mosaic, with the bands the
            model was trained on. The map has the imagery's CRS and pixel size (e.g. 1 m).
        out: the map to write (``MAP.tif``, a COG). Also written: ``MAP.tif.aux.xml`` (category
            names), ``MAP.qml`` (QGIS style), ``MAP.stac.json`` (STAC Item, dated by the imagery's
            date tags when present: :func:`lcmap.pipeline.stac.imagery_datetime_of`) and, with
            ``confidence``, ``MAP_confidence.tif``.
            ``MAP.tif.partial/`` holds finished blocks while running (kept on failure, to resume).
        bbox: area to map, ``(west, south, east, north)`` in ``bbox_crs`` units (degrees for the
            default EPSG:4326); not with ``aoi``. Default: the whole imagery extent.
        bbox_crs: CRS of ``bbox`` (any string rasterio understands, e.g. ``EPSG:32617``).
        aoi: polygon file (GeoJSON/GeoPackage/Shapefile, any CRS) or an :class:`AOI`; the map
            covers its bounding box (snapped to the imagery's pixel grid) and pixels whose centre
            lies outside the polygon are nodata.
        tile_px: model window side in pixels (multiple of 32).
        overlap_px: pixels shared by neighbouring windows (0 to ``tile_px / 2``); the window
            stride is ``tile_px - overlap_px`` and probabilities are blended with a Hann taper
            inside the overlap. Costs about ``(tile / stride)²`` in compute (1.31x at 512/64).
        block_px: side of one task's block in pixels, rounded to a whole number of window strides
            (4096 -> 4032 with the defaults). Bigger blocks recompute fewer halo windows (~23% at
            4032 px, ~11% at 8064 px); memory per task hardly depends on it.
        batch_size: windows per model call (every call is padded to this many windows).
        device: ``auto`` (CUDA if available), ``cpu`` or ``cuda``.
        scheduler: ``None``: a local Dask cluster sized to this machine (one process per GPU; on
            CPU one per core up to 4 cores, else one per 4 cores; 1 task thread each, torch
            threads = cores / processes; its workers are spawned processes, so a script that
            calls this needs the usual ``if __name__ == "__main__":`` guard);
            ``"tcp://host:8786"``: an existing Dask cluster (with ``cuda``, tasks ask for the
            worker resource ``GPU=1``); ``"synchronous"``: in this process, no Dask.
        confidence: also write ``MAP_confidence.tif``: the blended probability of the chosen
            class in percent (uint8 0-100, nodata 255).
        legend: ``target``: codes 1..N of the target classes (1 water, 2 tree canopy, 3 low
            vegetation, 4 built-up by default), the target class of highest summed LR-class
            probability; where LR classes without a target win, 0; ``native``: the
            codes of the model's own (LR) legend. 0 is nodata either way.
        progress: show a progress bar (blocks and km² with imagery inside the AOI).
        precision: ``32`` (float32) or ``bf16`` (the model in bfloat16 autocast; CUDA only).
        devices: with ``cuda`` and a local cluster, how many GPUs to use (one worker each;
            default: all visible).
        crs: the map's CRS, e.g. ``EPSG:32617`` (imagery in other CRSs is warped onto it); None:
            the imagery's when its files share one, else the UTM zone of the AOI's centroid.
        input_scale: multiply the imagery's values by this factor before the model sees them
            (e.g. 0.025 for 16-bit imagery holding 40x the 8-bit values the model was trained
            on). Without it, imagery whose data type differs from the training imagery's, or
            whose values go far above the training range, is refused; with it, only the range
            (after scaling) is checked.
        tta: test-time augmentation (:mod:`lcmap.models.tta`): ``none``; ``flips`` (identity,
            horizontal, vertical, both: ~4x the model time) or ``d4`` (the 8 flips and rotations:
            ~8x); each window's class probabilities are averaged over the transforms before the
            taper and blending (so also in ``MAP_confidence.tif``). Recorded in the map's
            ``LCMAP_TTA`` tag and in the resume manifest.

    Returns:
        The map's path (and the confidence map's) and the run's statistics.

    Raises:
        LcmapInputError: bad input (checkpoint missing/corrupt, band count different from the
            model's, AOI/bbox outside the imagery, bad tile/overlap/legend/device, output folder
            not writable, scheduler unreachable, ``bf16`` on CPU, ``out`` one of the inputs, imagery
            of another data type or range than the training imagery's), another process writing
            ``out`` (:class:`~lcmap.errors.OutputLockedError`), a full disk (with the space needed),
            or the scheduler went away mid-run (finished blocks kept: run again to resume). Nothing
            is written at ``out`` in that case.
        Interrupted: Ctrl-C; the message says what was kept and how to resume.
    """
    t0 = time.perf_counter()
    plan = plan_prediction(
        model,
        images,
        out,
        bbox=bbox,
        bbox_crs=bbox_crs,
        aoi=aoi,
        tile_px=tile_px,
        overlap_px=overlap_px,
        block_px=block_px,
        batch_size=batch_size,
        device=device,
        confidence=confidence,
        legend=legend,
        precision=precision,
        input_scale=input_scale,
        tta=tta,
        crs=crs,
    )
    if devices is not None and devices < 1:
        raise LcmapInputError(f"--devices {devices}: must be at least 1")
    log.info("test-time augmentation (--tta): %s, %d transform(s) per window", tta, len(tta_transforms(tta)))
    sched = None if scheduler in (None, "", "local") else str(scheduler)
    if sched is not None and sched != "synchronous" and "://" not in sched and ":" not in sched:
        raise LcmapInputError(
            f"--scheduler {scheduler!r}: give a Dask scheduler address (tcp://host:8786), 'synchronous', "
            "or nothing for a local cluster"
        )
    job = plan.job
    blocks = plan.blocks()
    n_rows = max((b.row for b in blocks), default=0) + 1
    n_cols = max((b.col for b in blocks), default=0) + 1
    locked = contextlib.ExitStack()  # the partial folder's lock, held until the map is written
    with locked, contextlib.ExitStack() as stack:
        client = None
        if sched != "synchronous":  # connect first: an unreachable scheduler leaves nothing behind
            client = stack.enter_context(execution.dask_client(sched, job, len(blocks), devices))
        locked.enter_context(mapfile.lock_partial(plan.partial, plan.out))
        done = mapfile.prepare_partial(plan.partial, plan.fingerprint, Path(job.blocks_dir), 2 if job.confidence else 1)
        todo_blocks = [b for b in blocks if b.name not in done]
        slots = max(1, sum(client.nthreads().values())) if client is not None else 1
        shape = group_shape(n_rows, n_cols, 2 * slots if slots > 1 else 1)
        job = replace(job, group=shape)
        todo = block_groups(todo_blocks, *shape)
        console = None
        if progress:
            from rich.console import Console

            console = Console(stderr=True)
            if done:
                console.print(
                    f"resuming: {len(blocks) - len(todo_blocks)} of {len(blocks)} blocks already done in {plan.partial}"
                )
        bar = execution.Progress(
            progress, blocks, {b.name for b in blocks if b.name in done}, job.grid, plan.area_wkb if progress else None
        )
        counts = execution.RunCounts()
        try:
            if todo:
                if client is None:
                    execution.run_synchronous(job, todo, bar, counts, model=plan.model, imagery=plan.imagery)
                else:
                    plan.model = plan.imagery = None  # the workers load their own; free this process's copy
                    execution.run_distributed(client, job, todo, bar, counts)
        except execution.SchedulerLost:
            kept = len(blocks) - len(todo_blocks) + counts.blocks_run
            raise LcmapInputError(
                f"the Dask scheduler {sched} went away (or the connection to it broke) while predicting; "
                f"{kept} of {len(blocks)} blocks finished are kept in {plan.partial}. Start the scheduler "
                "and workers again (or leave --scheduler out) and run the same command to resume."
            ) from None
        except KeyboardInterrupt as exc:
            if isinstance(exc, Interrupted):
                raise
            kept = len(blocks) - len(todo_blocks) + counts.blocks_run
            kept = max(kept, _blocks_on_disk(Path(job.blocks_dir)))
            raise Interrupted(
                f"prediction stopped; {kept} of {len(blocks)} blocks finished are kept in {plan.partial}. "
                "Run the same command again to resume from there."
            ) from None
        except BaseException as exc:
            if mapfile.is_enospc(exc, (), plan.partial):
                raise mapfile.space_error(job, plan.out, plan.partial, exc) from exc
            raise
        finally:
            bar.close()
        stack.close()  # the Dask client (and a local cluster) go; the lock stays
        t1 = time.perf_counter()
        with mapfile.GdalErrors() as gdal_errors:
            try:
                mapfile.write_map(job, blocks, plan.out, plan.partial, plan.out_legend, plan.model_legend, console)
            except BaseException as exc:
                if mapfile.is_enospc(exc, gdal_errors.messages, plan.out.parent):
                    raise mapfile.space_error(job, plan.out, plan.partial, exc) from exc
                for message in gdal_errors.messages:
                    log.warning("GDAL: %s", message)
                raise
        shutil.rmtree(plan.partial, ignore_errors=True)
    plan.model = None
    stac.write_stac_item(plan.out, imagery_datetime=stac.imagery_datetime_of(job.image_files))  # MAP.stac.json
    return PredictResult(
        path=plan.out,
        confidence_path=mapfile.confidence_path(plan.out) if job.confidence else None,
        blocks=len(blocks),
        blocks_resumed=len(blocks) - len(todo_blocks),
        blocks_run=counts.blocks_run,
        windows=counts.windows,
        seconds_forward=counts.seconds_forward,
        block_px=job.block_size,
        width=job.grid.width,
        height=job.grid.height,
        seconds_predict=t1 - t0,
        seconds_write=time.perf_counter() - t1,
    )

"""``lcmap predict``: a seamless land-cover map over any area, as a QGIS-ready COG.

This module runs a plan (:func:`predict_map`); :mod:`lcmap.pipeline.prediction.planning` checks the inputs and
works out the grids (:func:`~lcmap.pipeline.prediction.planning.plan_prediction`). Each step is documented in
its own module:

- :mod:`lcmap.pipeline.prediction.tiling`: the output grid (imagery grid ∩ AOI bounds; pixels outside the
  AOI polygon or without imagery are nodata), the global grid of overlapping model windows,
  the Hann taper and the blending of window probabilities, the cut into blocks;
- :mod:`lcmap.pipeline.prediction.inference`: one block task: read its imagery, run the model in padded
  batches, sum LR-class probabilities per target class (``--legend target``), blend; the
  per-worker model cache;
- :mod:`lcmap.pipeline.prediction.seams`: the windows that two or more tasks touch, run once by seam
  tasks whose files those tasks read;
- :mod:`lcmap.pipeline.prediction.execution`: the tasks (groups of blocks) in this process or on Dask (a
  local cluster or a scheduler address), the worker plugin that loads the model, and the
  progress bar;
- :mod:`lcmap.pipeline.prediction.mapfile` (and :mod:`lcmap.pipeline.prediction.cog`): block files written
  atomically, the manifest that lets a re-run resume, the final COG with its legend tag,
  category names and ``MAP.qml``;
- :mod:`lcmap.pipeline.prediction.tiled_output` (``tile_km``): a folder of COG tiles instead, each written
  by the task that computed its blocks, with a VRT mosaic and a STAC Collection.

Only blocks that touch the imagery's footprint inside the AOI are planned (imagery with gaps
costs only where it lies); the others are nodata in the COG. The map is bit-identical for any
``block_px``, grouping of blocks into tasks, and scheduler.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from lcmap.errors import Interrupted, LcmapInputError
from lcmap.models.tta import tta_transforms
from lcmap.pipeline.analysis import stac
from lcmap.pipeline.prediction import execution, mapfile, preview, seams, tiled_output
from lcmap.pipeline.prediction.inference import PredictJob
from lcmap.pipeline.prediction.planning import plan_prediction
from lcmap.pipeline.prediction.predict_config import PredictConfig
from lcmap.pipeline.prediction.run_lock import check_not_locked
from lcmap.pipeline.prediction.scheduler_check import check_scheduler
from lcmap.pipeline.prediction.tiling import block_groups, group_region, task_shape

__all__ = ["PredictConfig", "PredictResult", "predict_map"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PredictResult:
    """What :func:`predict_map` made, and how.

    ``blocks``: blocks in the map, of which ``blocks_resumed`` were already done in
    ``MAP.tif.partial`` and ``blocks_run`` were run now; ``windows``: model windows run;
    ``seconds_forward``: time inside the model (meaningful on CPU, synchronous only: summed over
    workers otherwise); ``block_px``: the block side used (whole window strides); ``width`` x
    ``height``: the map in pixels; ``seconds_predict``: planning and the blocks, of which
    ``seconds_plan`` planning (inputs checked, model loaded, grids); ``seconds_write``: the COG(s)
    (with tiles: the VRT, preview and STAC Collection); ``tiles``: tiles in the output folder
    (``tile_km``; 0 without), of which ``tiles_resumed`` were already written.
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
    seconds_plan: float = 0.0
    tiles: int = 0
    tiles_resumed: int = 0

    def stats(self) -> dict[str, int | float]:
        """The run statistics (every field but the paths)."""
        return {k: v for k, v in asdict(self).items() if k not in ("path", "confidence_path")}


def _by_ctrl_c(exc: BaseException) -> bool:
    """``exc`` is Ctrl-C, or an error raised while Ctrl-C unwound the stack (e.g. rasterio's
    ``Env.__exit__`` finding no GDAL environment when the interrupt landed inside a nested one)."""
    seen: BaseException | None = exc
    for _ in range(16):
        if seen is None:
            return False
        if isinstance(seen, KeyboardInterrupt):
            return True
        seen = seen.__context__
    return False


#: Map pixels above which one COG is slow to finish (its assembly is one process after the last
#: block: ~30 s at 2 Gpx, docs/scale.md "Serial share"): ``--out FOLDER`` then gets COG tiles of
#: :data:`DEFAULT_TILE_KM`, and ``--out MAP.tif`` a warning that suggests ``--tile-km``.
SINGLE_COG_MAX_PX = 2e9
#: ``--tile-km`` of a large map written to ``--out FOLDER`` without ``--tile-km``.
DEFAULT_TILE_KM = 10.0
#: One COG's assembly rate (GDAL's COG driver, mode overviews), Mpx/s: measured at 256 km² on
#: the 2-core development machine (benchmarks/scale.py --serial-km2); used for the estimate only.
COG_ASSEMBLY_MPX_S = 71.0


def _note_single_cog(map_px: int) -> None:
    """Say, above :data:`SINGLE_COG_MAX_PX`, how long one COG's assembly will take and what tiles give."""
    if map_px <= SINGLE_COG_MAX_PX:
        return
    minutes = map_px / 1e6 / COG_ASSEMBLY_MPX_S / 60
    log.warning(
        "this map has %.1f Gpx: one COG is assembled by ONE process after the last block, about %.0f min "
        "(at ~%.0f Mpx/s), however many workers run the blocks. For an area this large, --out FOLDER "
        "--tile-km 10 writes COG tiles in the workers and finishes in seconds (docs/scale.md).",
        map_px / 1e9, max(minutes, 1), COG_ASSEMBLY_MPX_S,
    )  # fmt: skip


def _folder_out(config: PredictConfig) -> Path | None:
    """``--out`` as a folder without ``--tile-km`` (an existing folder, a path ending in ``/``, or a
    new path without a suffix): the folder (its map is ``FOLDER/FOLDER.tif``, or COG tiles above
    :data:`SINGLE_COG_MAX_PX`); else None (a file: the map itself, e.g. ``MAP.tif``)."""
    text = str(config.out)
    out = Path(text).expanduser()
    if config.tile_km is not None:
        return None
    if out.is_dir() or text.endswith(("/", os.sep)) or (not out.exists() and not out.suffix):
        return out.absolute()
    return None


def _share_borders(job: PredictJob, todo: list, seams_dir: Path, manifest: str) -> tuple[list, seams.SeamPlan | None]:
    """The tasks ``todo`` (groups of blocks, or tiles' tasks) with the windows they share planned
    into seam tasks (:mod:`lcmap.pipeline.prediction.seams`): each such window runs once. ``manifest``:
    the run's manifest (JSON), part of the seam files' names."""
    if len(todo) < 2 and not any(len(t.groups()) > 1 for t in todo if isinstance(t, tiled_output.TileTask)):
        return todo, None
    regions = [
        [group_region(g) for g in t.groups()] if isinstance(t, tiled_output.TileTask) else [group_region(t)]
        for t in todo
    ]
    plan = seams.plan_seams(job.windows, regions, seams_dir, len(job.code_lut), salt=manifest)
    if not plan.seams:
        return todo, None
    seams_dir.mkdir(parents=True, exist_ok=True)
    for p in seams_dir.glob(".seam_*"):  # a seam file cut short by a crash
        p.unlink()
    log.info("%d border windows shared by the tasks run once, in %d seam tasks", plan.windows, len(plan.seams))
    tasks = [
        replace(t, given=g) if isinstance(t, tiled_output.TileTask) else execution.GroupTask(tuple(t), g)
        for t, g in zip(todo, plan.given, strict=True)
    ]
    return tasks, plan


def predict_map(config: PredictConfig, *, progress: bool = True) -> PredictResult:
    """Predict a land-cover map over the imagery (or part of it) and write it as a COG.

    Args:
        config: the options (:class:`~lcmap.pipeline.prediction.predict_config.PredictConfig`, e.g.
            ``PredictConfig.of(model, images, out, tile_px=256)``), each as follows. They are
            recorded in the map's ``LCMAP_PREDICT_OPTIONS`` tag (JSON; every option but ``out``)
            and the checkpoint used in its ``LCMAP_CHECKPOINT`` tag, both also in the STAC Item.
            model: RUN_DIR written by ``lcmap train`` (checkpoint chosen by
                :func:`lcmap.pipeline.runs.resolve_checkpoint`) or a ``.ckpt``.
            images: imagery files and/or folders (searched recursively); one mosaic, with the bands the
                model was trained on. The map has the imagery's CRS and pixel size (e.g. 1 m).
            out: the map to write (``MAP.tif``, a COG). Also written: ``MAP.tif.aux.xml`` (category
                names), ``MAP.qml`` (QGIS style), ``MAP.preview.png`` (a small picture with the legend:
                :mod:`lcmap.pipeline.prediction.preview`), ``MAP.stac.json`` (STAC Item, dated by the imagery's
                date tags when present: :func:`lcmap.pipeline.analysis.stac.imagery_datetime_of`) and, with
                ``confidence``, ``MAP_confidence.tif``.
                ``MAP.tif.partial/`` holds finished blocks while running (kept on failure, to resume).
            bbox: area to map, ``(west, south, east, north)`` in ``bbox_crs`` units (degrees for the
                default EPSG:4326); not with ``aoi``. Default: the whole imagery extent.
            bbox_crs: CRS of ``bbox`` (any string rasterio understands, e.g. ``EPSG:32617``).
            aoi: polygon file (GeoJSON/GeoPackage/Shapefile, any CRS); the map covers its bounding
                box (snapped to the imagery's pixel grid) and pixels whose centre lies outside the
                polygon are nodata.
            tile_px: model window side in pixels (multiple of 32).
            overlap_px: pixels shared by neighbouring windows (0 to ``tile_px / 2``); the window
                stride is ``tile_px - overlap_px`` and probabilities are blended with a Hann taper
                inside the overlap. Costs about ``(tile / stride)²`` in compute (1.31x at 512/64).
            block_px: side of one task's block in pixels, rounded to a whole number of window strides
                (4096 -> 4032 with the defaults). Windows shared by two tasks run once (seam tasks,
                through a file in ``MAP.tif.partial/seams``); memory per task hardly depends on it.
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
            stac_asset: the asset of STAC Items given as ``images`` (:mod:`lcmap.geodata.stac_inputs`).
            label_prior: the LR labels the model was trained on (same legend): each pixel's class is
                the network's combined with its label by Bayes' rule
                (:mod:`lcmap.pipeline.prediction.prediction_prior`); recorded in the ``LCMAP_LABEL_PRIOR`` tag
                and the resume manifest. Empty: the network alone.
            tile_km: write ``out`` as a folder of COG tiles of about this many km a side (in whole
                blocks; :mod:`lcmap.pipeline.prediction.tiled_output`), each with its overviews, colours, category
                names and ``.qml``, plus ``FOLDER.vrt`` (the mosaic, with ``FOLDER.qml``),
                ``FOLDER.preview.png`` and ``collection.json`` (STAC; the tiles are its Items). For
                province-size areas; None: one COG.
        progress: show a progress bar (blocks and km² with imagery inside the AOI).

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
    config.check()
    scheduler = config.scheduler
    sched = None if scheduler in (None, "", "local") else str(scheduler)
    if sched is not None and sched != "synchronous":
        if "://" not in sched and ":" not in sched:
            raise LcmapInputError(
                f"--scheduler {scheduler!r}: give a Dask scheduler address (tcp://host:8786), 'synchronous', "
                "or nothing for a local cluster"
            )
        check_scheduler(sched)  # in seconds, before the model and the imagery are read
    folder = _folder_out(config)
    if folder is not None:  # one COG FOLDER/FOLDER.tif, or tiles if the map is large (below)
        check_not_locked(str(folder))
        config = replace(config, out=str(folder / f"{folder.name}.tif"))
    check_not_locked(str(config.out))  # another run on --out: refused before anything is loaded
    plan = plan_prediction(config)
    blocks = plan.blocks()
    map_px = sum(b.height * b.width for b in blocks)
    if folder is not None and map_px > SINGLE_COG_MAX_PX:
        log.info(
            "--out %s is a folder and the map has %.1f Gpx (more than %.1f): writing COG tiles of ~%g km "
            "(--tile-km) instead of one COG", folder, map_px / 1e9, SINGLE_COG_MAX_PX / 1e9, DEFAULT_TILE_KM,
        )  # fmt: skip
        config = replace(config, out=str(folder), tile_km=DEFAULT_TILE_KM)
        plan = plan_prediction(config)
        blocks = plan.blocks()
    t_plan = time.perf_counter() - t0
    log.info(
        "test-time augmentation (--tta): %s, %d transform(s) per window", config.tta, len(tta_transforms(config.tta))
    )
    job = plan.job
    tiles = None
    if config.tile_km is None:
        _note_single_cog(map_px)
    else:
        legends = (plan.out_legend, plan.model_legend)
        tiles = tiled_output.TiledOutput.plan(job, plan.out, blocks, config.tile_km, legends, plan.fingerprint)
    locked = contextlib.ExitStack()  # the partial folder's lock, held until the map is written
    partial_existed = plan.partial.exists()
    with locked, contextlib.ExitStack() as stack:
        # the lock first: a second run on the same --out is refused at once, not after a cluster
        # started or a scheduler answered (25-40 s)
        run_lock = locked.enter_context(mapfile.lock_partial(plan.partial, plan.out))
        client = None
        if sched != "synchronous":
            try:
                client = stack.enter_context(execution.dask_client(sched, job, len(blocks), config.devices))
            except BaseException:
                if not partial_existed:  # an unreachable scheduler leaves nothing behind
                    shutil.rmtree(plan.partial, ignore_errors=True)
                raise
        done = mapfile.prepare_partial(plan.partial, plan.fingerprint, Path(job.blocks_dir), 2 if job.confidence else 1)
        if tiles is not None:
            tiles.made_tags = dict(plan.tags)
            done |= tiles.prepare(job)  # the blocks of tiles already written
        todo_blocks = [b for b in blocks if b.name not in done]
        slots = max(1, sum(client.nthreads().values())) if client is not None else 1
        shape = task_shape(blocks, slots, job.block_size, job.windows)
        job = replace(job, group=shape)
        todo = block_groups(todo_blocks, *shape) if tiles is None else tiles.tasks(job, todo_blocks)
        work = None if tiles is None else tiled_output.run_tile  # a task per tile, which writes it
        todo, seam_plan = _share_borders(job, todo, plan.partial / "seams", json.dumps(plan.fingerprint))
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
                    execution.run_synchronous(
                        job, todo, bar, counts, model=plan.model, imagery=plan.imagery, work=work, seams=seam_plan
                    )
                else:
                    plan.model = plan.imagery = None  # the workers load their own; free this process's copy
                    execution.run_distributed(
                        client, job, todo, bar, counts, owner=run_lock.owner, work=work, seams=seam_plan
                    )
        except execution.SchedulerLost:
            run_lock.revoke()  # its workers may still be running: they write no further block
            kept = mapfile.finished_blocks(job.blocks_dir, (b.name for b in blocks))
            raise LcmapInputError(
                f"the Dask scheduler {sched} went away (or the connection to it broke) while predicting; "
                f"{kept} of {len(blocks)} blocks finished are kept in {plan.partial}{tiled_output.kept(tiles)}. "
                "Start the scheduler and workers again (or leave --scheduler out) and run the same command to resume."
            ) from None
        except BaseException as exc:
            if isinstance(exc, Interrupted):
                raise
            if _by_ctrl_c(exc):
                run_lock.revoke()
                kept = mapfile.finished_blocks(job.blocks_dir, (b.name for b in blocks))
                raise Interrupted(
                    f"prediction stopped; {kept} of {len(blocks)} blocks finished are kept in {plan.partial}"
                    f"{tiled_output.kept(tiles)}. Run the same command again to resume from there."
                ) from None
            if mapfile.is_enospc(exc, (), plan.partial):
                raise mapfile.space_error(job, plan.out, plan.partial, exc) from exc
            raise
        finally:
            bar.close()
        stack.close()  # the Dask client (and a local cluster) go; the lock stays
        t1 = time.perf_counter()
        with mapfile.GdalErrors() as gdal_errors:
            try:
                if tiles is None:
                    mapfile.write_map(
                        job, blocks, plan.out, plan.partial, plan.out_legend, plan.model_legend, console, tags=plan.tags
                    )
                else:
                    tiles.finish(job, console)  # the tiles are written: VRT, .qml, preview, STAC Collection
            except BaseException as exc:
                if mapfile.is_enospc(exc, gdal_errors.messages, plan.out.parent):
                    raise mapfile.space_error(job, plan.out, plan.partial, exc) from exc
                for message in gdal_errors.messages:
                    log.warning("GDAL: %s", message)
                raise
        shutil.rmtree(plan.partial, ignore_errors=True)
    plan.model = None
    if tiles is None:
        preview.write_preview(plan.out)  # MAP.preview.png, before the STAC Item that lists it
        stac.write_stac_item(plan.out, imagery_datetime=stac.imagery_datetime_of(job.image_files))  # MAP.stac.json
    path = plan.out if tiles is None else tiles.vrt
    return PredictResult(
        path=path,
        confidence_path=mapfile.confidence_path(path) if job.confidence else None,
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
        seconds_plan=t_plan,
        tiles=len(tiles.tiles) if tiles is not None else 0,
        tiles_resumed=len(tiles.complete) if tiles is not None else 0,
    )

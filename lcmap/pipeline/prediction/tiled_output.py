"""Tiled output for large areas: ``lcmap predict --out FOLDER/ --tile-km N``.

One COG for a province is assembled at the end by one process from every block file; with
``--tile-km`` the map is a folder of COG tiles instead, each written by the task that computed
its blocks, as soon as they are done:

- **The tile grid** (:func:`lcmap.pipeline.prediction.tiling.tile_side_blocks`,
  :func:`~lcmap.pipeline.prediction.tiling.plan_tiles`). A tile is ``m`` x ``m`` blocks
  of the map's block grid (:func:`lcmap.pipeline.prediction.tiling.cut_blocks`), ``m`` = ``N`` km over the
  block side in metres, rounded, at least 1: tile edges are block edges on the output grid, and
  the first and last tiles are cut at the map's edges like the blocks. Tile ``(row, col)`` holds
  block rows ``[row * m, (row + 1) * m)`` and block columns likewise; it is
  ``tile_r{row:03d}_c{col:03d}.tif``. Only tiles with a planned block (imagery inside the AOI) exist.
- **One task per tile** (:func:`run_tile`, run by :mod:`lcmap.pipeline.prediction.execution` in this process
  or on Dask): it predicts the tile's blocks not done yet (in groups, as for one COG), then writes
  the tile with the single map's writer (:func:`lcmap.pipeline.prediction.mapfile.write_map`: COG with
  ``mode`` overviews, colour table, category names in ``.tif.aux.xml``, ``.qml``; with
  ``--confidence`` also ``_confidence.tif``) under a temporary name, validated, then renamed (a
  tile's file appears only when complete); then its STAC Item, and its block files are removed.
- **Resume.** A tile is done when its COG and sidecars are there, of its size, tagged
  :data:`TILE_TAG` with this run's fingerprint (the block manifest's and the tile side). A re-run
  skips done tiles and their blocks, removes every other ``tile_*`` file of the folder (a tile cut
  short, or made with other parameters) and redoes those tiles from the block files kept in
  ``FOLDER.partial`` (beside the folder; its lock is the output's, as ``MAP.tif.partial``'s).
- **Last, in this process** (:meth:`TiledOutput.finish`, cheap): ``FOLDER/FOLDER.vrt`` over the
  tiles (colour table, category names, tags: one layer with the legend in QGIS) with
  ``FOLDER.qml`` beside it, ``FOLDER_confidence.vrt``, ``FOLDER.preview.png`` (read through the
  VRT from the tiles' overviews) and the STAC Collection ``collection.json``, whose Items are the
  tiles. Those appear only once every tile is written.

Read through the VRT, the mosaic equals the single COG of the same prediction bit for bit: both
are made of the same block files, which do not depend on how blocks are grouped into tasks.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import rasterio

from lcmap.errors import DiskFullError, LcmapInputError
from lcmap.geodata.io import check_not_an_input
from lcmap.geodata.legends import MAP_NODATA, Legend
from lcmap.pipeline.analysis import stac
from lcmap.pipeline.prediction import cog, execution, job_tags, mapfile, preview
from lcmap.pipeline.prediction.inference import PredictJob, WorkerState
from lcmap.pipeline.prediction.run_lock import RunOver, check_run
from lcmap.pipeline.prediction.seams import Given
from lcmap.pipeline.prediction.tiling import (
    CONFIDENCE_NODATA,
    Block,
    Tile,
    block_groups,
    group_shape,
    plan_tiles,
    tile_grid,
    tile_side_blocks,
)

__all__ = [
    "COLLECTION_NAME",
    "TILE_TAG",
    "TileTask",
    "TiledOutput",
    "check_tiles_out",
    "kept",
    "mosaic_path",
    "planned_outputs",
    "run_tile",
]

log = logging.getLogger(__name__)

#: GDAL dataset tag of a tile: the fingerprint of the parameters it was made with.
TILE_TAG = "LCMAP_TILE_FINGERPRINT"
#: The STAC Collection in the output folder.
COLLECTION_NAME = "collection.json"
#: A tile's files (COG, sidecars, STAC Item, confidence) and their temporary files.
_TILE_FILE = re.compile(r"^\.?(tile_r\d+_c\d+)(_confidence)?\.(tif|qml|stac\.json|tif\.aux\.xml)(\.tmp.*)?$")
_JSON = "application/json"


# ------------------------------------------------------------------------------ options, paths
def check_tiles_out(out: Path, tile_km: float) -> None:
    """Refuse a bad ``--tile-km`` or an ``--out`` that is a file (no I/O).

    Raises:
        LcmapInputError: ``tile_km`` not a positive number; ``out`` a ``.tif`` or an existing file.
    """
    number = isinstance(tile_km, (int, float)) and not isinstance(tile_km, bool)
    if not (number and math.isfinite(tile_km) and tile_km > 0):
        raise LcmapInputError(f"--tile-km {tile_km}: the tile side must be a positive number of km, e.g. 10")
    if out.suffix.lower() in (".tif", ".tiff") or (out.exists() and not out.is_dir()):
        raise LcmapInputError(
            f"--out {out} with --tile-km: give a folder for the tiles (e.g. {out.with_suffix('')}), not a file; "
            "or leave --tile-km out to write one COG"
        )


def mosaic_path(folder: Path) -> Path:
    """``FOLDER/FOLDER.vrt``: the mosaic of the tiles (named after the folder: the QGIS layer's name)."""
    return folder / f"{folder.name}.vrt"


def planned_outputs(folder: Path, confidence: bool) -> dict[str, Path]:
    """The fixed outputs of a tiled map, ``{what: path}`` (the tiles' own are checked by :meth:`TiledOutput.plan`)."""
    vrt = mosaic_path(folder)
    found = {
        "the tiles' mosaic": vrt,
        "the mosaic's style": cog.qml_path(vrt),
        "the STAC Collection": folder / COLLECTION_NAME,
        "the tiles' .partial folder": folder.with_name(folder.name + ".partial"),
    }
    if confidence:
        found["the confidence mosaic"] = mapfile.confidence_path(vrt)
    return found


# ------------------------------------------------------------------------------ one tile's task
@dataclass(frozen=True)
class TileTask:
    """What a worker needs to make one tile (:func:`run_tile`); small, pickled per task."""

    tile: Tile
    #: the tile's blocks not finished yet
    todo: tuple[Block, ...]
    folder: str
    out_legend: Legend
    model_legend: Legend
    fingerprint: str
    #: blocks per group inside the tile (rows, columns)
    group: tuple[int, int]
    imagery_datetime: str | None
    collection_id: str
    #: further GDAL tags of the tile (how the map was made: its options and checkpoint)
    made_tags: tuple[tuple[str, str], ...] = ()
    #: windows taken from seam files (:mod:`lcmap.pipeline.prediction.seams`), None: all run here
    given: Given | None = None

    def groups(self) -> list[list[Block]]:
        """The task's groups of blocks, run one after the other."""
        return block_groups(list(self.todo), *self.group)

    @property
    def name(self) -> str:
        return self.tile.name

    @property
    def path(self) -> Path:
        return self.tile.file(self.folder)


def run_tile(st: WorkerState, job: PredictJob, task: TileTask, owner: Any = None) -> dict[str, Any]:
    """Predict the tile's unfinished blocks (:func:`lcmap.pipeline.prediction.execution.run_group`), then write
    the tile (:func:`write_tile`). Returns ``run_group``'s statistics, with ``tile`` (its name, or
    None when the run ended first: see :func:`~lcmap.pipeline.prediction.run_lock.run_is_over`)."""
    t0 = time.perf_counter()
    stats: dict[str, Any] = {"blocks": [], "windows": 0, "seconds_forward": 0.0, "tile": None}
    for group in task.groups():
        res = execution.run_group(st, job, group, owner, task.given)
        stats["blocks"] += res["blocks"]
        stats["windows"] += res["windows"]
        stats["seconds_forward"] += res["seconds_forward"]
        if len(res["blocks"]) < len(group):  # the run is over: no tile
            stats["seconds"] = time.perf_counter() - t0
            return stats
    try:
        write_tile(job, task, owner)
        stats["tile"] = task.name
    except RunOver as exc:
        log.info("%s; this task stops", exc)
    stats["seconds"] = time.perf_counter() - t0
    return stats


def write_tile(job: PredictJob, task: TileTask, owner: Any = None) -> Path:
    """Write one tile from its block files (the single map's writer on the tile's grid), then its
    STAC Item, then remove its block files. ``owner``: as for
    :func:`~lcmap.pipeline.prediction.mapfile.write_block` (None: no check).

    Raises:
        DiskFullError: no space left (the temporary files are removed).
        RunOver: the run ``owner`` has ended; nothing was written.
    """
    t, path = task.tile, task.path
    scratch = Path(job.blocks_dir).parent / "tiles" / t.name  # the tile's mosaic VRTs
    scratch.mkdir(parents=True, exist_ok=True)
    local = [replace(b, r0=b.r0 - t.r0, c0=b.c0 - t.c0) for b in t.blocks]
    check_run(owner, f"tile {path.name}")
    with mapfile.GdalErrors() as gdal_errors:
        try:
            mapfile.write_map(
                replace(job, grid=tile_grid(job.grid, t)),
                local,
                path,
                scratch,
                task.out_legend,
                task.model_legend,
                tags={**dict(task.made_tags), TILE_TAG: task.fingerprint},
            )
        except Exception as exc:
            if mapfile.is_enospc(exc, gdal_errors.messages, path.parent):
                raise DiskFullError(f"No space left on device writing {path}") from exc
            raise
    _write_item(task)
    for b in t.blocks:
        mapfile.remove_block(job.blocks_dir, b)
    shutil.rmtree(scratch, ignore_errors=True)
    return path


def _write_item(task: TileTask) -> Path:
    """The tile's STAC Item (:func:`lcmap.pipeline.analysis.stac.build_stac_item`), in the Collection."""
    import pystac

    item = stac.build_stac_item(
        task.path, imagery_datetime=task.imagery_datetime, properties={"lcmap:tile": [task.tile.row, task.tile.col]}
    )
    item.collection_id = task.collection_id
    for rel in ("collection", "parent", "root"):
        item.add_link(pystac.Link(rel=rel, target=f"./{COLLECTION_NAME}", media_type=_JSON))
    return stac.save_stac(item, stac.stac_item_path(task.path))


# ------------------------------------------------------------------------------- the driver
@dataclass
class TiledOutput:
    """The tiles of one run, as :func:`lcmap.pipeline.prediction.predict.predict_map` drives them."""

    folder: Path
    tiles: list[Tile]
    side_blocks: int
    fingerprint: str
    out_legend: Legend
    model_legend: Legend
    imagery_datetime: str | None
    #: names of the tiles found done (:meth:`prepare`)
    complete: set[str] = field(default_factory=set)
    #: further GDAL tags of every tile and the mosaic (:func:`lcmap.pipeline.prediction.predict_config.map_tags`)
    made_tags: dict[str, str] = field(default_factory=dict)

    @classmethod
    def plan(
        cls,
        job: PredictJob,
        folder: Path,
        blocks: list[Block],
        tile_km: float,
        legends: tuple[Legend, Legend],
        fingerprint: dict[str, Any],
    ) -> TiledOutput:
        """The tiles of ``--tile-km`` over the planned ``blocks``; ``legends``: the map's and the model's.

        Raises:
            LcmapInputError: the map's CRS is not projected, or a tile's file is an input.
        """
        import hashlib

        m = tile_side_blocks(tile_km, job.grid, job.block_size)
        tiles = plan_tiles(job.blocks(), blocks, m)
        check_not_an_input({f"tile {t.name}": t.file(folder) for t in tiles}, [*job.image_files, job.checkpoint])
        side_m = m * job.block_size * job.grid.res_x * job.grid.crs.linear_units_factor[1]
        log.info(
            "tiles of %d x %d blocks (%d px, %.3g km a side; --tile-km %g in whole blocks): %d tile(s) in %s",
            m, m, m * job.block_size, side_m / 1000, tile_km, len(tiles), folder,
        )  # fmt: skip
        key = json.dumps({"blocks": fingerprint, "tile_blocks": m}, sort_keys=True)
        return cls(
            folder=folder,
            tiles=tiles,
            side_blocks=m,
            fingerprint=hashlib.sha256(key.encode()).hexdigest(),
            out_legend=legends[0],
            model_legend=legends[1],
            imagery_datetime=stac.imagery_datetime_of(job.image_files),
        )

    @property
    def vrt(self) -> Path:
        return mosaic_path(self.folder)

    def _done(self, tile: Tile, confidence: bool) -> bool:
        path = tile.file(self.folder)
        needed = [path, cog.qml_path(path), Path(f"{path}.aux.xml")]
        if confidence:
            needed.append(mapfile.confidence_path(path))
        if not all(p.is_file() for p in needed):
            return False
        try:
            with rasterio.open(path) as src:
                return src.tags().get(TILE_TAG) == self.fingerprint and src.shape == (tile.height, tile.width)
        except rasterio.errors.RasterioError:
            return False

    def prepare(self, job: PredictJob) -> set[str]:
        """Find the tiles done; remove the mosaic, the Collection and every other tile file (cut
        short, or from other parameters), each said in the log. Call it holding the lock.

        Returns:
            The names of the blocks of the tiles done (not to be run).
        """
        self.folder.mkdir(parents=True, exist_ok=True)
        self.complete = {t.name for t in self.tiles if self._done(t, job.confidence)}
        vrt = self.vrt
        for p in (vrt, mapfile.confidence_path(vrt), self.folder / COLLECTION_NAME):
            p.unlink(missing_ok=True)  # they appear again once every tile is written
        for p in sorted(self.folder.iterdir()):
            found = _TILE_FILE.match(p.name)
            if found and (found.group(1) not in self.complete or p.name.startswith(".")) and not p.is_dir():
                log.info("removed %s: not a finished tile of this run (it is written again if needed)", p.name)
                p.unlink()
        if self.complete:
            log.info("%d of %d tiles already written in %s", len(self.complete), len(self.tiles), self.folder)
        return {b.name for t in self.tiles if t.name in self.complete for b in t.blocks}

    def tasks(self, job: PredictJob, todo_blocks: list[Block]) -> list[TileTask]:
        """One :class:`TileTask` per tile not done (with its blocks of ``todo_blocks``)."""
        todo = {b.name for b in todo_blocks}
        tiles = [t for t in self.tiles if t.name not in self.complete]
        return [self._task(job, t, [b for b in t.blocks if b.name in todo]) for t in tiles]

    def _task(self, job: PredictJob, tile: Tile, todo: list[Block]) -> TileTask:
        n = self.side_blocks
        return TileTask(
            tile=tile,
            todo=tuple(todo),
            folder=str(self.folder),
            out_legend=self.out_legend,
            model_legend=self.model_legend,
            fingerprint=self.fingerprint,
            group=group_shape(n, n, 1, job.block_size // job.windows.stride),
            imagery_datetime=self.imagery_datetime,
            collection_id=self.folder.name,
            made_tags=tuple(sorted(self.made_tags.items())),
        )

    def finish(self, job: PredictJob, console: Any | None = None) -> Path:
        """Once every tile is written: the VRT mosaic(s), ``.qml``, preview and STAC Collection.

        Returns:
            The mosaic ``FOLDER/FOLDER.vrt``.

        Raises:
            RuntimeError: a tile is missing (a task ended without writing it).
        """
        paths = [t.file(self.folder) for t in self.tiles]
        missing = [p.name for p in paths if not p.is_file()]
        if missing:
            raise RuntimeError(f"tiles not written: {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
        for t in self.tiles:  # a task stopped between its tile and its Item
            if not stac.stac_item_path(t.file(self.folder)).is_file():
                _write_item(self._task(job, t, []))
        g, vrt = job.grid, self.vrt
        colormap, names, entries = cog.map_categories(self.out_legend)
        sources = [cog.VrtSource(str(t.file(self.folder)), 1, t.c0, t.r0, t.width, t.height) for t in self.tiles]

        def mosaic(path: Path, srcs: list[cog.VrtSource], **kw: Any) -> None:
            grid = dict(width=g.width, height=g.height, crs=g.crs, transform=g.transform)
            _atomic(path, lambda tmp: cog.write_mosaic_vrt(tmp, sources=srcs, **grid, **kw))

        _atomic(cog.qml_path(vrt), lambda tmp: tmp.write_text(cog.write_qml(entries)))
        if job.confidence:
            csources = [replace(s, path=str(mapfile.confidence_path(Path(s.path)))) for s in sources]
            ctags = job_tags.confidence_tags(job)
            cvrt = mapfile.confidence_path(vrt)
            mosaic(cvrt, csources, dtype="uint8", nodata=CONFIDENCE_NODATA, tags=ctags, description="confidence (%)")
        if console:
            console.print(f"writing {vrt.name} (VRT over {len(paths)} COG tiles), its preview and STAC Collection")
        tags = {**job_tags.map_tags(job, self.out_legend, self.model_legend), **self.made_tags}
        categories = dict(colormap=colormap, category_names=names, description="land cover class")
        mosaic(vrt, sources, dtype=job.dtype, nodata=MAP_NODATA, tags=tags, **categories)
        preview.write_preview(vrt)
        self._write_collection(paths)
        return vrt

    def _write_collection(self, paths: list[Path]) -> Path:
        """``collection.json``: the tiles' Items (links), the mosaic, its style and preview (assets)."""
        import pystac

        items = [json.loads(stac.stac_item_path(p).read_text()) for p in paths]
        boxes = [i["bbox"] for i in items]
        bbox = [min(b[0] for b in boxes), min(b[1] for b in boxes), max(b[2] for b in boxes), max(b[3] for b in boxes)]
        times = [
            (i["properties"].get("start_datetime") or i["properties"]["datetime"],
             i["properties"].get("end_datetime") or i["properties"]["datetime"])
            for i in items
        ]  # fmt: skip
        start = pystac.utils.str_to_datetime(min(a for a, _ in times))
        end = pystac.utils.str_to_datetime(max(b for _, b in times))
        cid = self.folder.name
        collection = pystac.Collection(
            id=cid,
            title=f"lcmap land-cover map {cid}",
            description=f"lcmap land-cover map {cid}: {len(items)} COG tile(s) of up to "
            f"{self.side_blocks} x {self.side_blocks} blocks; {self.vrt.name} mosaics them.",
            extent=pystac.Extent(pystac.SpatialExtent([bbox]), pystac.TemporalExtent([[start, end]])),
        )
        for item, p in zip(items, paths, strict=True):
            name = stac.stac_item_path(p).name
            collection.add_link(pystac.Link("item", f"./{name}", media_type="application/geo+json", title=item["id"]))
        vrt = self.vrt
        for key, path, roles, media in (
            ("mosaic", vrt, ["data"], "application/xml"),
            ("style", cog.qml_path(vrt), ["style"], "application/xml"),
            ("thumbnail", preview.preview_path(vrt), ["thumbnail"], "image/png"),
        ):
            collection.add_asset(key, pystac.Asset(href=f"./{path.name}", media_type=media, roles=roles))
        return stac.save_stac(collection, self.folder / COLLECTION_NAME)


def kept(tiles: TiledOutput | None) -> str:
    """What an interrupted run kept besides block files: ``", and N of M tiles in FOLDER"`` (or "")."""
    if tiles is None:
        return ""
    written = sum((t.file(tiles.folder)).is_file() for t in tiles.tiles)
    return f", and {written} of {len(tiles.tiles)} tiles in {tiles.folder}"


def _atomic(path: Path, write: Callable[[Path], object]) -> None:
    """``write`` a temporary file in ``path``'s folder (a VRT's relative source paths stay right),
    then rename it to ``path``."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)

"""``lcmap stats``: area of each class of a land-cover map per zone (district, province ...).

The map (a class raster such as ``lcmap predict`` writes, any CRS) is read in blocks through
``rioxarray``/dask; the zones (polygons with a name field, any CRS and vector format) are
reprojected to the map's CRS and rasterised block by block onto its grid (pixel centres); the
blockwise pair counting of :mod:`lcmap.pipeline.analysis.zonal` gives pixels and km² per zone and class.

- Class codes and names come from the map's ``LCMAP_LEGEND`` tag, else from its GDAL category
  names (``MAP.tif.aux.xml``); a map with neither is refused (exit 2).
- Nodata pixels (the raster's nodata value and the legend's nodata codes) are not counted; codes
  outside the legend are not counted either (logged with their pixel count).
- ``percent`` is a class's share of the zone's classified area (km²), nodata left out.
- Features that share a name in ``--field`` are one zone; a zone without any classified pixel
  (outside the map, or all nodata) is listed with 0 km². Zones that overlap each count the pixels
  they share (so zones' areas may add up to more than the map's).

Outputs (each written under a temporary name and renamed into place): ``STATS_DIR/stats.csv``
(zone, class_code, class_name, pixels, km2, percent: one row per zone and legend class) and
``STATS_DIR/stats.gpkg`` (the zones in their own CRS with ``km2_<class>`` columns, ``km2_classified``).
"""

from __future__ import annotations

import csv
import io
import logging
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
from rasterio.crs import CRS
from rasterio.errors import NotGeoreferencedWarning

from lcmap.errors import LcmapInputError
from lcmap.geodata.io import check_raster_file, open_raster
from lcmap.pipeline.analysis.evaluate import map_legend
from lcmap.pipeline.analysis.zonal import (
    DEFAULT_BLOCK_PX,
    count_pairs,
    overlap_layers,
    pixel_area_m2_per_row,
    zone_index_raster,
)
from lcmap.pipeline.prediction.cog import LEGEND_TAG, read_category_names

__all__ = ["MapClasses", "ZoneStats", "Zones", "map_classes", "read_zones", "write_stats", "zone_stats"]

log = logging.getLogger(__name__)

CSV_COLUMNS = ("zone", "class_code", "class_name", "pixels", "km2", "percent")
#: Maps with at least this many blocks show a progress bar.
_PROGRESS_MIN_BLOCKS = 8
#: GDAL's block cache while counting, bytes.
_GDAL_CACHE_BYTES = 64 * 2**20


@dataclass(frozen=True)
class MapClasses:
    """The classes of a map: ``codes`` and ``names`` (same order) and the codes that mean nodata."""

    codes: list[int]
    names: list[str]
    nodata: set[int]


@dataclass(frozen=True)
class Zones:
    """Zone polygons: ``frame`` (GeoDataFrame, own CRS, one row per zone, column ``field``) and
    ``names`` (``frame[field]`` as text, in the same order)."""

    frame: Any
    field: str
    names: list[str]


@dataclass(frozen=True)
class ZoneStats:
    """Per zone (rows, ``zone_names`` order) and class (columns, ``class_codes`` order).

    Attributes:
        pixels: int64 ``(zones, classes)``.
        area_km2: float64 ``(zones, classes)``.
    """

    zone_names: list[str]
    class_codes: list[int]
    class_names: list[str]
    pixels: np.ndarray
    area_km2: np.ndarray

    @property
    def percent(self) -> np.ndarray:
        """float64 ``(zones, classes)``: share of the zone's classified km², 0 for empty zones."""
        total = self.area_km2.sum(axis=1, keepdims=True)
        return np.divide(self.area_km2 * 100.0, total, out=np.zeros_like(self.area_km2), where=total > 0)


# ---------------------------------------------------------------------------------------- inputs
def map_classes(src: rasterio.DatasetReader, path: str | Path) -> MapClasses:
    """Codes, names and nodata codes of the map open as ``src`` (``LCMAP_LEGEND`` tag, else categories)."""
    nodata = {int(src.nodata)} if src.nodata is not None and float(src.nodata).is_integer() else set()
    if src.tags().get(LEGEND_TAG):
        legend = map_legend(src, path)
        return MapClasses(legend.codes, legend.names, nodata | set(legend.nodata))
    names = read_category_names(path)
    classes = [
        (code, name) for code, name in enumerate(names) if name and code not in nodata and name.lower() != "nodata"
    ]
    if not classes:
        raise LcmapInputError(
            f"map {path} has no {LEGEND_TAG} tag and no category names, so its class codes have no "
            "names. Use a map written by 'lcmap predict', or add category names (e.g. in QGIS or "
            f"with gdal_edit.py) or the {LEGEND_TAG} tag."
        )
    return MapClasses([c for c, _ in classes], [n for _, n in classes], nodata)


def read_zones(path: str | Path, field: str) -> Zones:
    """Read zone polygons (any format and CRS), one zone per distinct value of ``field``."""
    import geopandas as gpd

    path = Path(path)
    if not path.exists():
        raise LcmapInputError(f"zones file {path} does not exist")
    try:
        frame = gpd.read_file(path)
    except Exception as exc:
        raise LcmapInputError(f"zones file {path} could not be read as vector data: {exc}") from exc
    if field not in frame.columns or field == frame.geometry.name:
        fields = ", ".join(c for c in frame.columns if c != frame.geometry.name) or "none"
        raise LcmapInputError(f"zones file {path} has no field {field!r}; its fields: {fields}")
    if frame.crs is None:
        raise LcmapInputError(f"zones file {path} has no CRS. Save it with one (GeoJSON is EPSG:4326).")
    frame = frame[frame.geometry.notna() & frame.geometry.geom_type.isin(["Polygon", "MultiPolygon"])]
    if frame.empty:
        raise LcmapInputError(f"zones file {path} holds no polygon")
    if frame[field].isna().any():
        raise LcmapInputError(
            f"zones file {path}: {int(frame[field].isna().sum())} polygon(s) have no value in field "
            f"{field!r}; give every zone a name"
        )
    frame = frame[[field, frame.geometry.name]].copy()
    frame["geometry"] = frame.geometry.make_valid()
    if frame[field].duplicated().any():
        frame = frame.dissolve(by=field, sort=False, as_index=False)
    frame = frame.reset_index(drop=True)
    return Zones(frame=frame, field=field, names=[str(v) for v in frame[field]])


def _zones_on_map(zones: Zones, crs: CRS, bounds: tuple[float, float, float, float], source: Path) -> list:
    """The zones' geometries in the map CRS (edges densified); raises if none meets the map."""
    import shapely

    geoms = zones.frame.geometry
    if CRS.from_user_input(zones.frame.crs.to_wkt()) != crs:
        extent = np.maximum(geoms.bounds["maxx"] - geoms.bounds["minx"], geoms.bounds["maxy"] - geoms.bounds["miny"])
        geoms = geoms.segmentize(np.maximum(extent.to_numpy() / 64, 1e-9)).to_crs(crs.to_wkt())
    out = list(geoms.values)
    box = shapely.box(*bounds)
    if not any(g is not None and g.intersects(box) for g in out):
        zb = tuple(round(v, 3) for v in geoms.total_bounds)
        raise LcmapInputError(
            f"no zone overlaps the map {source}: zone bounds {zb} vs map bounds "
            f"{tuple(round(v, 3) for v in bounds)} in {crs.to_string()}. Check the zones' CRS and area."
        )
    return out


# ---------------------------------------------------------------------------------------- compute
def zone_stats(
    map_path: str | Path,
    zones_path: str | Path,
    field: str,
    block_px: int = DEFAULT_BLOCK_PX,
    progress: bool = False,
) -> tuple[ZoneStats, Zones]:
    """Pixels, km² and percent of each map class in each zone (see the module docstring)."""
    import rioxarray
    import xarray

    map_path = Path(map_path)
    check_raster_file(map_path, "map")  # exists, readable to its last block, has a CRS: before the zones
    with open_raster(map_path, "map") as src:
        zones = read_zones(zones_path, field)
        if np.dtype(src.dtypes[0]) not in (np.dtype("uint8"), np.dtype("uint16")):
            raise LcmapInputError(f"map {map_path} is {src.dtypes[0]}; a class map is uint8 or uint16")
        classes = map_classes(src, map_path)
        crs, transform, shape = src.crs, src.transform, (src.height, src.width)
        geoms = _zones_on_map(zones, crs, tuple(src.bounds), map_path)
        max_code = np.iinfo(src.dtypes[0]).max

    # class index: legend classes 0..C-1, C = code outside the legend, C+1 = nodata (dropped)
    n_cls = len(classes.codes)
    lut = np.full(max_code + 1, n_cls, dtype=np.int32)
    lut[[c for c in classes.nodata if 0 <= c <= max_code]] = n_cls + 1
    lut[classes.codes] = np.arange(n_cls, dtype=np.int32)
    n_zones = len(zones.names)
    raster = rioxarray.open_rasterio(
        map_path, chunks={"band": 1, "y": block_px, "x": block_px}, lock=False, cache=False, masked=False
    )
    if not isinstance(raster, xarray.DataArray):
        raise LcmapInputError(f"map {map_path} holds several subdatasets; pass one class raster")
    codes = raster.isel(band=0).data
    class_index = codes.map_blocks(lambda block: lut[block], dtype=np.int32)
    on_map = [(g, i + 1) for i, g in enumerate(geoms) if g is not None and not g.is_empty]
    zone_dtype = "uint16" if n_zones < 65535 else "int32"
    zone_layers = [  # zones that overlap go to different layers: each counts the shared pixels
        zone_index_raster([on_map[k] for k in layer], transform, shape, block_px, dtype=zone_dtype)
        for layer in overlap_layers([g for g, _ in on_map])
    ]
    row_area_m2 = pixel_area_m2_per_row(crs, transform, shape[0])
    n_blocks = len(codes.chunks[0]) * len(codes.chunks[1])
    # each map block is read once: a small GDAL block cache keeps memory flat (default: 5 % of RAM)
    with (
        rasterio.Env(GDAL_CACHEMAX=_GDAL_CACHE_BYTES),
        _progress(progress and n_blocks >= _PROGRESS_MIN_BLOCKS, shape[0] * shape[1] * len(zone_layers)) as advance,
        warnings.catch_warnings(),
    ):
        # rasterize() on a georeferenced window from dask's threads sometimes warns "no geotransform"
        warnings.filterwarnings("ignore", category=NotGeoreferencedWarning)
        counts = count_pairs(
            zone_layers, class_index, n_zones + 1, n_cls + 2, row_area_m2, on_block=advance, source=f"map {map_path}"
        )
    unknown = int(counts.pixels[1:, n_cls].sum())
    if unknown:
        log.warning("%s: %d pixel(s) in the zones hold codes outside the map's legend; not counted", map_path, unknown)
    stats = ZoneStats(
        zone_names=zones.names,
        class_codes=classes.codes,
        class_names=classes.names,
        pixels=counts.pixels[1:, :n_cls],
        area_km2=counts.area_m2[1:, :n_cls] / 1e6,
    )
    return stats, zones


class _progress:
    """Context manager yielding ``advance(pixels)``; a rich bar over the map's pixels when enabled."""

    def __init__(self, enabled: bool, total_px: int) -> None:
        self.enabled, self.total_px, self.bar = enabled, total_px, None

    def __enter__(self):
        if not self.enabled:
            return None
        from rich.console import Console
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        self.bar = Progress(
            TextColumn("[bold]counting Mpx"),
            BarColumn(),
            TextColumn("{task.percentage:>3.0f}%"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=Console(stderr=True),
        )
        self.bar.start()
        task = self.bar.add_task("count", total=self.total_px)
        return lambda px: self.bar.advance(task, px)

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.stop()


# ---------------------------------------------------------------------------------------- outputs
def _column_names(names: list[str], codes: list[int]) -> list[str]:
    pairs = list(zip(names, codes, strict=True))
    slugs = [re.sub(r"[^0-9a-z]+", "_", n.lower()).strip("_") or f"class_{c}" for n, c in pairs]
    return [f"km2_{s}" if slugs.count(s) == 1 else f"km2_{s}_{c}" for s, c in zip(slugs, codes, strict=True)]


def _replace_atomically(tmp: Path, path: Path) -> None:
    try:
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_stats(stats: ZoneStats, zones: Zones, out_dir: str | Path) -> tuple[Path, Path]:
    """Write ``stats.csv`` and ``stats.gpkg`` into ``out_dir`` (created); returns their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    percent = stats.percent
    for z, zone in enumerate(stats.zone_names):
        for c, (code, name) in enumerate(zip(stats.class_codes, stats.class_names, strict=True)):
            writer.writerow(
                [zone, code, name, int(stats.pixels[z, c]), f"{stats.area_km2[z, c]:.6f}", f"{percent[z, c]:.4f}"]
            )
    csv_path, gpkg_path = out / "stats.csv", out / "stats.gpkg"
    tmp = out / f".stats.csv.{os.getpid()}.tmp"
    tmp.write_text(buf.getvalue())
    _replace_atomically(tmp, csv_path)

    frame = zones.frame.copy()
    for c, column in enumerate(_column_names(stats.class_names, stats.class_codes)):
        frame[column] = stats.area_km2[:, c]
    frame["km2_classified"] = stats.area_km2.sum(axis=1)
    tmp = out / f".stats.{os.getpid()}.tmp.gpkg"
    try:
        frame.to_file(tmp, driver="GPKG", layer="stats")
    except BaseException:
        if tmp.exists():
            tmp.unlink()
        raise
    _replace_atomically(tmp, gpkg_path)
    return csv_path, gpkg_path

"""The map's CRS: one for imagery spanning UTM zones (``lcmap predict --crs``, else a default).

Imagery folders of a province often mix UTM zones (and some Web Mercator files); a map has one
grid. :func:`output_crs` picks its CRS, :func:`grid_res` its pixel size; the imagery is then
opened with that CRS (:func:`lcmap.geodata.datasets.open_imagery`), which warps the other files.
"""

from __future__ import annotations

import math

import rasterio.errors
from rasterio.crs import CRS
from rasterio.warp import calculate_default_transform, transform_bounds

from lcmap.errors import LcmapInputError
from lcmap.geodata.aoi import AOI
from lcmap.geodata.datasets import HRImagery

__all__ = ["utm_crs", "output_crs", "grid_res"]


def utm_crs(lon: float, lat: float) -> CRS:
    """The WGS 84 / UTM zone CRS (EPSG:326zz north, 327zz south) containing ``(lon, lat)`` degrees."""
    zone = min(60, max(1, int(math.floor((lon + 180.0) / 6.0)) + 1))
    return CRS.from_epsg((32600 if lat >= 0 else 32700) + zone)


def output_crs(ds: HRImagery, crs: str | None, aoi_obj: AOI | None) -> tuple[CRS, str]:
    """The map's CRS and why: ``crs`` when given; else the imagery's when all its files share one;
    else the UTM zone of the AOI's centroid (of the imagery footprint's centre without an AOI).

    Raises:
        LcmapInputError: ``crs`` is not a CRS, or a geographic one (the map's pixels are metres).
    """
    if crs is not None:
        try:
            chosen = CRS.from_user_input(crs)
        except (rasterio.errors.CRSError, ValueError) as exc:
            raise LcmapInputError(f"--crs {crs!r}: not a CRS rasterio knows, e.g. EPSG:32617 ({exc})") from exc
        if not chosen.is_projected:
            raise LcmapInputError(f"--crs {crs}: a projected CRS in metres is needed (e.g. a UTM zone, EPSG:326zz)")
        return chosen, "--crs"
    if len(ds.file_crs) <= 1:
        return CRS.from_user_input(ds.crs), "the imagery's CRS"
    if aoi_obj is not None:
        c = aoi_obj.to_crs("EPSG:4326").centroid
        lon, lat, where = c.x, c.y, "the AOI's centroid"
    else:
        x, y, _ = ds.bounds
        w, s, e, n = transform_bounds(ds.crs, "EPSG:4326", x.start, y.start, x.stop, y.stop)
        lon, lat, where = (w + e) / 2, (s + n) / 2, "the imagery's centre"
    chosen = utm_crs(lon, lat)
    names = ", ".join(c.to_string() for c in ds.file_crs[:4])
    return chosen, f"the UTM zone of {where} ({lon:.3f}, {lat:.3f}); the imagery is in {names}"


def grid_res(ds: HRImagery, out_crs: CRS) -> tuple[float, float] | None:
    """The map's pixel size on ``out_crs`` (its units): the finest of the files already in
    ``out_crs``; without any, the first file's pixel as a warp onto ``out_crs`` sizes it at the
    file's centre (GDAL's rule), so a Web Mercator file's 1.22 "m" at 35 N stays 1 m on the ground.
    None when no file has a CRS (TorchGeo decides)."""
    same = [res for crs, res, _ in ds.file_grids if crs is not None and crs == out_crs]
    if same:
        return min(r[0] for r in same), min(r[1] for r in same)
    for crs, res, bounds in ds.file_grids:
        if crs is None:
            continue
        x = (bounds[0] + bounds[2]) / 2
        y = (bounds[1] + bounds[3]) / 2
        # one pixel at the file's centre, warped: its size on out_crs (square pixels, as GDAL's default)
        tf, _, _ = calculate_default_transform(crs, out_crs, 1, 1, x, y - res[1], x + res[0], y)
        side = float(abs(tf.a))
        return side, side
    return None

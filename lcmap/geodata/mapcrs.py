"""The map's CRS: one for imagery spanning UTM zones (``lcmap predict --crs``, else a default).

Imagery folders of a province often mix UTM zones (and some Web Mercator files); a map has one
grid. :func:`output_crs` picks its CRS, :func:`grid_res` its pixel size; the imagery is then
opened with that CRS (:func:`lcmap.geodata.datasets.open_imagery`), which warps the other files.
"""

from __future__ import annotations

import math

import rasterio.errors
from rasterio.crs import CRS
from rasterio.warp import transform_bounds

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
    """Pixel size on ``out_crs``: the first file's when both are in metres (1 m stays 1 m), else None."""
    first = ds.file_crs[0] if ds.file_crs else None
    if first is not None and first.is_projected and out_crs.is_projected:
        if first.linear_units_factor[1] == out_crs.linear_units_factor[1]:
            return float(ds.res[0]), float(ds.res[1])
    return None

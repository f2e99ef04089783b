"""Areas of interest: a polygon file (GeoJSON, GeoPackage, Shapefile, any CRS) or a bbox.

The AOI keeps its own CRS; :meth:`AOI.to_crs` reprojects it into the imagery's CRS, where
sampling, masking and prediction happen. Multi-polygons and files with several features are
dissolved into one geometry.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import shapely
from rasterio.crs import CRS
from rasterio.features import rasterize
from rasterio.transform import Affine

from lcmap.errors import LcmapInputError

__all__ = ["AOI", "aoi_from_file", "aoi_from_bbox", "resolve_aoi", "rasterize_aoi"]


@dataclass(frozen=True)
class AOI:
    """A (multi)polygon area of interest in its own CRS.

    Attributes:
        geometry: shapely Polygon or MultiPolygon, in ``crs`` coordinates.
        crs: the CRS of ``geometry``.
        source: where it came from (file path or ``bbox ...``), for messages.
    """

    geometry: shapely.Geometry
    crs: CRS
    source: str

    def to_crs(self, crs: CRS | str) -> shapely.Geometry:
        """The geometry reprojected into ``crs`` (densified so that edges bend correctly).

        An AOI reaching beyond where ``crs`` is defined (a whole-world ``--bbox`` into a UTM zone)
        is first cut to the CRS's area of use.

        Raises:
            LcmapInputError: the AOI cannot be projected into ``crs`` even so.
        """
        crs = CRS.from_user_input(crs)
        if crs == self.crs:
            return self.geometry
        out = _project(self.geometry, self.crs, crs)
        if out is None:
            use = _area_of_use(crs, self.crs)
            out = _project(self.geometry.intersection(use), self.crs, crs) if use is not None else None
        if out is None:
            raise LcmapInputError(
                f"the AOI ({self.source}) cannot be projected into {crs.to_string()}: it reaches beyond where "
                "that CRS is defined. Give an AOI (or --bbox) around the imagery."
            )
        return out

    def check_overlap(self, bounds: tuple[float, float, float, float], crs: CRS | str, what: str) -> None:
        """Raise a clear error if the AOI misses ``bounds`` (xmin, ymin, xmax, ymax in ``crs``)."""
        geom = self.to_crs(crs)
        if not geom.intersects(shapely.box(*bounds)):
            raise LcmapInputError(
                f"the AOI ({self.source}) does not overlap {what}: AOI bounds "
                f"{tuple(round(v, 3) for v in geom.bounds)} vs data bounds "
                f"{tuple(round(v, 3) for v in bounds)} in {CRS.from_user_input(crs).to_string()}. "
                "Check the AOI's CRS (for --bbox, --bbox-crs) and that it covers the imagery."
            )


def _project(geom: shapely.Geometry, src: CRS, dst: CRS) -> shapely.Geometry | None:
    """``geom`` (densified) from ``src`` into ``dst``; None where a coordinate does not project (inf, NaN)."""
    import geopandas as gpd

    if geom.is_empty:
        return None
    dense = geom.segmentize(_segment_length(geom))
    out = gpd.GeoSeries([dense], crs=src.to_wkt()).to_crs(dst.to_wkt()).iloc[0]
    if out is None or out.is_empty or not np.isfinite(shapely.get_coordinates(out)).all():
        return None
    return shapely.make_valid(out)


def _area_of_use(crs: CRS, in_crs: CRS) -> shapely.Geometry | None:
    """The area of use of ``crs`` (from the EPSG database), as a polygon in ``in_crs``; None if unknown."""
    from pyproj import CRS as ProjCRS

    epsg = crs.to_epsg()  # rasterio's WKT carries no area of use; the EPSG database does
    area = (ProjCRS.from_epsg(epsg) if epsg else ProjCRS.from_wkt(crs.to_wkt())).area_of_use
    if area is None:
        return None
    box = shapely.box(area.west, area.south, area.east, area.north)
    return _project(box, CRS.from_epsg(4326), in_crs)


def _segment_length(geom: shapely.Geometry) -> float:
    xmin, ymin, xmax, ymax = geom.bounds
    return max(xmax - xmin, ymax - ymin, 1e-9) / 64


def aoi_from_file(path: str | Path) -> AOI:
    """Read a polygon file (any format and CRS GDAL/pyogrio reads) into one dissolved AOI."""
    import geopandas as gpd

    path = Path(path)
    if not path.exists():
        raise LcmapInputError(f"AOI file {path} does not exist")
    try:
        frame = gpd.read_file(path)
    except Exception as exc:
        raise LcmapInputError(f"AOI file {path} could not be read as vector data: {exc}") from exc
    if frame.crs is None:
        raise LcmapInputError(f"AOI file {path} has no CRS. Save it with one (GeoJSON is EPSG:4326 by standard).")
    polys = frame.geometry[frame.geometry.notna()]
    polys = polys[polys.geom_type.isin(["Polygon", "MultiPolygon"])]
    if polys.empty:
        raise LcmapInputError(f"AOI file {path} holds no polygon: draw the area as a polygon")
    geometry = shapely.make_valid(shapely.union_all(polys.values))
    geometry = shapely.union_all([g for g in shapely.get_parts(geometry) if g.area > 0])
    return AOI(geometry=geometry, crs=CRS.from_user_input(frame.crs.to_wkt()), source=str(path))


def aoi_from_bbox(west: float, south: float, east: float, north: float, crs: str | CRS = "EPSG:4326") -> AOI:
    """A rectangular AOI from bounds in ``crs`` (default longitude/latitude, EPSG:4326)."""
    if not (east > west and north > south):
        raise LcmapInputError(f"--bbox {west} {south} {east} {north}: expected W S E N with E > W and N > S")
    try:
        crs = CRS.from_user_input(crs)
    except Exception as exc:
        raise LcmapInputError(f"--bbox-crs {crs!r} is not a CRS rasterio knows: {exc}") from exc
    return AOI(shapely.box(west, south, east, north), crs, f"bbox {west} {south} {east} {north} ({crs.to_string()})")


def resolve_aoi(
    aoi_path: str | Path | None,
    bbox: tuple[float, float, float, float] | None,
    bbox_crs: str | CRS = "EPSG:4326",
) -> AOI | None:
    """The AOI from ``--aoi`` or ``--bbox`` (not both); None when neither is given."""
    if aoi_path is not None and bbox is not None:
        raise LcmapInputError("give either --aoi or --bbox, not both")
    if aoi_path is not None:
        return aoi_from_file(aoi_path)
    if bbox is not None:
        return aoi_from_bbox(*bbox, crs=bbox_crs)
    return None


def rasterize_aoi(geometry: shapely.Geometry | None, transform: Affine, shape: tuple[int, int]) -> np.ndarray:
    """Boolean mask ``(height, width)``: True for pixels whose centre lies inside ``geometry``.

    ``geometry`` must be in the CRS of ``transform``; None means "everything inside".
    """
    if geometry is None:
        return np.ones(shape, dtype=bool)
    if geometry.is_empty:
        return np.zeros(shape, dtype=bool)
    return rasterize([(geometry, 1)], out_shape=shape, transform=transform, fill=0, dtype="uint8").astype(bool)

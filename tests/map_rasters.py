"""Hand-made land-cover maps written like ``lcmap predict`` writes them (COG, colour table, category
names, LCMAP_LEGEND tag, .qml), for the change-map and STAC tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import rasterio
from rasterio.crs import CRS
from rasterio.transform import Affine

from lcmap.geodata.legends import MAP_NODATA, Legend, target_legend
from lcmap.pipeline.prediction import cog


def write_map_cog(
    path: Path,
    codes: np.ndarray,
    crs: str,
    transform: Affine,
    legend: Legend | None = None,
    tags: dict[str, str] | None = None,
    legend_tag: bool = True,
) -> Path:
    """Write ``codes`` (uint8, 0 = nodata) as a map COG in ``legend``'s codes (default: 4 target classes)."""
    legend = legend or target_legend()
    codes = np.asarray(codes, dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    raw = path.with_name(path.stem + "-raw.tif")
    h, w = codes.shape
    with rasterio.open(
        raw,
        "w",
        driver="GTiff",
        width=w,
        height=h,
        count=1,
        dtype="uint8",
        crs=crs,
        transform=transform,
        nodata=MAP_NODATA,
    ) as dst:
        dst.write(codes, 1)
    colormap, names, entries = cog.map_categories(legend)
    all_tags = {"LCMAP_LEGEND": cog.legend_tag(legend)} if legend_tag else {}
    all_tags.update(tags or {})
    vrt = cog.write_mosaic_vrt(
        path.with_name(path.stem + ".vrt"),
        width=w,
        height=h,
        crs=CRS.from_user_input(crs),
        transform=transform,
        dtype="uint8",
        nodata=MAP_NODATA,
        sources=[cog.VrtSource(str(raw), 1, 0, 0, w, h)],
        colormap=colormap,
        category_names=names,
        tags=all_tags,
    )
    cog.write_cog(vrt, path, sidecars={".qml": cog.write_qml(entries)})
    vrt.unlink()
    raw.unlink()
    return path

"""Build lcmap's embedded real sample from the Chesapeake Land Cover patches.

Input: the eight 256 x 256 patches of NAIP tile ``m_3708020_sw_17_1`` (West Virginia, 2014) in
``shared/data/chesapeake-wv-1m`` (``.npz`` arrays + ``patches.csv`` with each patch's pixel offset
in the tile). Output, in ``lcmap/geodata/sample/`` (EPSG:26917, UTM 17N):

- ``naip/patch-K.tif``: NAIP 2014 R, G, B, NIR, uint8, 1 m (channels 0-3).
- ``nlcd/patch-K.tif``: NLCD 2011 as a real 30 m raster: each 30 m cell of a grid anchored at
  multiples of 30 m takes the majority code of the 1 m NLCD pixels (channel 9) it covers; code 0
  (no data) where it covers none.
- ``reference/patch-K.tif``: Chesapeake Conservancy 1 m land cover (channel 8), 0 = no data.
- ``aoi_train.geojson`` / ``aoi_heldout.geojson`` / ``aoi_all.geojson``: patch footprints.
- ``sample.json``: patches, offsets, split.

The patches carry no georeference: the tile's origin is placed at an approximate UTM position of
the quarter quad's north-west corner, and patches at their pixel offsets from it.

Run: ``python tools/make_sample.py /work/shared/data/chesapeake-wv-1m``
"""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import numpy as np
import rasterio
from pyproj import Transformer
from rasterio.transform import from_origin

OUT = Path(__file__).resolve().parents[1] / "lcmap" / "geodata" / "sample"
CRS = "EPSG:26917"
#: Patches kept out of training, for the held-out (generalisation) figure: one mixed, one forest.
HELD_OUT = (3, 6)
NLCD_RES_M = 30

# Quarter quad m_3708020_sw: 7.5' quad 20 of the 37N/80W one-degree block (row 2, column 3 from
# the NW corner) spans 37.625-37.75 N, 80.625-80.5 W; its SW quarter's NW corner is
# (37.6875 N, 80.625 W). NAIP tiles add a ~300 m buffer: origin shifted by it. Approximate.
_lon, _lat = -80.625, 37.6875
_x, _y = Transformer.from_crs("EPSG:4326", CRS, always_xy=True).transform(_lon, _lat)
TILE_ORIGIN_X = float(round(_x - 300))
TILE_ORIGIN_Y = float(round(_y + 300))


def write(path: Path, data: np.ndarray, transform, nodata, **tags) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    count = data.shape[0]
    with rasterio.open(
        path,
        "w",
        driver="GTiff",
        width=data.shape[2],
        height=data.shape[1],
        count=count,
        dtype=data.dtype,
        crs=CRS,
        transform=transform,
        nodata=nodata,
        compress="deflate",
        predictor=2,
        tiled=True,
        blockxsize=256,
        blockysize=256,
    ) as dst:
        dst.write(data)
        dst.update_tags(**tags)


def majority_30m(nlcd_1m: np.ndarray, x0: float, y0: float) -> tuple[np.ndarray, float, float]:
    """Majority code per 30 m cell of a grid anchored at multiples of 30 m (code 0 ignored)."""
    h, w = nlcd_1m.shape
    gx0 = np.floor(x0 / NLCD_RES_M) * NLCD_RES_M
    gy0 = np.ceil(y0 / NLCD_RES_M) * NLCD_RES_M
    cols = int(np.ceil((x0 + w - gx0) / NLCD_RES_M))
    rows = int(np.ceil((gy0 - (y0 - h)) / NLCD_RES_M))
    out = np.zeros((rows, cols), np.uint8)
    # pixel (r, c) of the patch has its centre at x0 + c + 0.5, y0 - r - 0.5
    cc = ((x0 + np.arange(w) + 0.5 - gx0) // NLCD_RES_M).astype(int)
    rr = ((gy0 - (y0 - np.arange(h) - 0.5)) // NLCD_RES_M).astype(int)
    for i in range(rows):
        for j in range(cols):
            block = nlcd_1m[np.ix_(rr == i, cc == j)].ravel()
            block = block[block > 0]
            if block.size:
                values, counts = np.unique(block, return_counts=True)
                out[i, j] = values[np.argmax(counts)]
    return out, gx0, gy0


def main(src: Path) -> None:
    rows = list(csv.DictReader(open(src / "patches.csv")))
    provenance = (
        "Chesapeake Land Cover dataset (Robinson et al., CVPR 2019), NAIP tile m_3708020_sw_17_1, "
        "West Virginia; georeference APPROXIMATE (patch offsets in the tile, tile origin estimated)"
    )
    features = {"train": [], "heldout": []}
    meta = []
    for row in rows:
        k = int(row["patch_id"])
        arr = np.load(src / row["patch_fn"])["arr_0"][0]
        h, w = arr.shape[1:]
        x0 = TILE_ORIGIN_X + int(row["x_coord"])
        y0 = TILE_ORIGIN_Y - int(row["y_coord"])
        transform = from_origin(x0, y0, 1.0, 1.0)
        naip = np.clip(np.round(arr[0:4]), 0, 255).astype(np.uint8)
        write(
            OUT / "naip" / f"patch-{k}.tif",
            naip,
            transform,
            None,
            SOURCE=provenance,
            BANDS="red,green,blue,nir",
            YEAR="2014",
        )
        lc = arr[8].astype(np.uint8)
        lc[lc == 15] = 0
        write(OUT / "reference" / f"patch-{k}.tif", lc[None], transform, 0, SOURCE=provenance, LEGEND="chesapeake")
        nlcd30, gx0, gy0 = majority_30m(arr[9].astype(np.uint8), x0, y0)
        write(
            OUT / "nlcd" / f"patch-{k}.tif",
            nlcd30[None],
            from_origin(gx0, gy0, NLCD_RES_M, NLCD_RES_M),
            0,
            SOURCE=provenance + "; NLCD 2011 aggregated to 30 m cells by majority",
            LEGEND="nlcd",
        )
        split = "heldout" if k in HELD_OUT else "train"
        poly = [[x0, y0 - h], [x0 + w, y0 - h], [x0 + w, y0], [x0, y0], [x0, y0 - h]]
        features[split].append(
            {
                "type": "Feature",
                "properties": {"patch": k, "split": split},
                "geometry": {"type": "Polygon", "coordinates": [poly]},
            }
        )
        meta.append(
            {
                "patch": k,
                "split": split,
                "x_offset_px": int(row["x_coord"]),
                "y_offset_px": int(row["y_coord"]),
                "bounds": [x0, y0 - h, x0 + w, y0],
            }
        )
    crs_member = {"type": "name", "properties": {"name": "urn:ogc:def:crs:EPSG::26917"}}
    for name, feats in (
        ("train", features["train"]),
        ("heldout", features["heldout"]),
        ("all", features["train"] + features["heldout"]),
    ):
        (OUT / f"aoi_{name}.geojson").write_text(
            json.dumps({"type": "FeatureCollection", "crs": crs_member, "features": feats}, indent=1)
        )
    (OUT / "sample.json").write_text(
        json.dumps(
            {
                "crs": CRS,
                "tile": "m_3708020_sw_17_1",
                "location_is_approximate": True,
                "tile_origin_utm": [TILE_ORIGIN_X, TILE_ORIGIN_Y],
                "held_out": list(HELD_OUT),
                "imagery": "naip",
                "labels": "nlcd",
                "labels_legend": "nlcd",
                "reference": "reference",
                "reference_legend": "chesapeake",
                "patches": meta,
            },
            indent=1,
        )
    )
    print(f"wrote {len(rows)} patches to {OUT}")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "../shared/data/chesapeake-wv-1m"))

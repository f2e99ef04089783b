"""End to end part of ``benchmarks/scale.py``: a test area as provinces come, ``lcmap train --aoi``
and ``lcmap predict --aoi`` through the CLI (subprocesses), and what they cost.

The area (``km2``, square, centred on 84 W 35 N: the boundary of UTM zones 16 and 17):

- imagery: 1 m GeoTIFFs of :data:`common.FILE_PX` px from the embedded NAIP patches, the west
  part in EPSG:32616, the east part in EPSG:32617 (files straddling the boundary exist in both
  zones: they overlap, no gap), and the northern band also as EPSG:3857 files (pixel size
  1 / cos(lat) m, about 1 m on the ground; sorted first, so they win where they overlap);
- an NLCD-like label: ONE EPSG:5070 raster, 30 m, reaching :data:`NLCD_MARGIN_M` beyond the area
  (a product much larger than the area, as a CONUS NLCD is, so that reading it whole would show);
- a WorldCover-like label: EPSG:4326 tiles of 0.02 deg, 1/12000 deg (~10 m), over the area and
  :data:`WORLDCOVER_MARGIN_M` around it (many tiles the AOI does not touch);
- the AOI: a GeoJSON polygon (EPSG:4326) inset from the area.

Besides the CLI runs, :mod:`scale_reads` measures in this process the bytes read from files per km²
(labels as training reads them, imagery as ``predict_map`` reads it).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import rasterio
from rasterio.transform import from_origin
from rasterio.warp import transform, transform_bounds

sys.path.insert(0, str(Path(__file__).resolve().parent))
import scale_common as common  # noqa: E402

LON0, LAT0 = -84.0, 35.0
NLCD_CODES = (11, 21, 22, 23, 24, 41, 42, 43, 52, 71, 81, 82, 90, 95)
WORLDCOVER_CODES = (10, 20, 30, 40, 50, 60, 80, 90)
NLCD_MARGIN_M = 30_000  # the NLCD-like raster reaches this far beyond the area (m)
WORLDCOVER_MARGIN_M = 5_000  # the WorldCover-like tiles cover this much around the area (m)
READ_PATCHES = 64  # training patches drawn for the bytes-read measurement
READ_PATCH_PX = 224
READ_MAP_M = 1200  # side of the bbox predicted for the imagery bytes-read measurement (m)


def _blobs(h: int, w: int, codes: tuple[int, ...], cell: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    small = rng.choice(np.array(codes, np.uint8), size=(h // cell + 1, w // cell + 1))
    return np.repeat(np.repeat(small, cell, 0), cell, 1)[:h, :w]


def _area_in(crs: str, side_m: float, margin_m: float = 0.0) -> tuple[float, float, float, float]:
    """The area's square in zone-17 metres, as bounds in ``crs``."""
    xs, ys = transform("EPSG:4326", "EPSG:32617", [LON0], [LAT0])
    h = side_m / 2 + margin_m
    return transform_bounds("EPSG:32617", crs, xs[0] - h, ys[0] - h, xs[0] + h, ys[0] + h)


def _write(path: Path, data: np.ndarray, crs: str, tf, nodata: float) -> None:
    profile = dict(
        driver="GTiff", width=data.shape[-1], height=data.shape[-2], count=data.shape[0] if data.ndim == 3 else 1,
        dtype=data.dtype.name, crs=crs, transform=tf, nodata=nodata, tiled=True, blockxsize=512, blockysize=512,
        compress="deflate", zlevel=1,
    )  # fmt: skip
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(data if data.ndim == 3 else data[None])


def build_area(root: Path, km2: float) -> dict:
    """Write the imagery, the two label products and the AOI; return their paths and counts."""
    side = math.sqrt(km2) * 1000
    patches = common.sample_patches()
    img = root / "imagery"
    img.mkdir(parents=True, exist_ok=True)
    F = common.FILE_PX
    n_files = {"EPSG:32616": 0, "EPSG:32617": 0, "EPSG:3857": 0}
    for crs in ("EPSG:32616", "EPSG:32617"):
        x0, y0, x1, y1 = _area_in(crs, side)
        x0, y1 = math.floor(x0), math.ceil(y1)
        for r0 in range(0, int(math.ceil(y1 - y0)), F):
            for c0 in range(0, int(math.ceil(x1 - x0)), F):
                cx, cy = x0 + c0 + F / 2, y1 - r0 - F / 2
                lon = transform(crs, "EPSG:4326", [cx], [cy])[0][0]
                half_deg = F / 2 / (111_320 * math.cos(math.radians(LAT0)))
                if (crs == "EPSG:32616" and lon > LON0 + half_deg) or (crs == "EPSG:32617" and lon < LON0 - half_deg):
                    continue  # wholly in the other zone
                data = common.texture(r0, c0, F, F, patches)
                _write(img / f"b_{crs[5:]}_{r0 // F:03d}_{c0 // F:03d}.tif", data, crs,
                       from_origin(x0 + c0, y1 - r0, 1.0, 1.0), 0)  # fmt: skip
                n_files[crs] += 1
    # the northern band (one file row) also in Web Mercator
    mx0, my0, mx1, my1 = _area_in("EPSG:3857", side)
    k = 1 / math.cos(math.radians(LAT0))  # 3857 metres per ground metre
    band = F * k
    for c0 in range(0, int(math.ceil((mx1 - mx0) / k)), F):
        data = common.texture(0, c0, F, F, patches)
        _write(img / f"a_3857_{c0 // F:03d}.tif", data, "EPSG:3857", from_origin(mx0 + c0 * k, my1, k, k), 0)
        n_files["EPSG:3857"] += 1
    del band
    # NLCD-like: one EPSG:5070 raster, 30 m, much larger than the area
    lx0, ly0, lx1, ly1 = _area_in("EPSG:5070", side, NLCD_MARGIN_M)
    w, h = int(math.ceil((lx1 - lx0) / 30)), int(math.ceil((ly1 - ly0) / 30))
    nlcd = root / "nlcd_5070.tif"
    _write(nlcd, _blobs(h, w, NLCD_CODES, 6, 1), "EPSG:5070", from_origin(lx0, ly1, 30, 30), 0)
    # WorldCover-like: EPSG:4326 tiles of 0.02 deg at 1/12000 deg
    wc = root / "worldcover"
    wc.mkdir(exist_ok=True)
    gx0, gy0, gx1, gy1 = _area_in("EPSG:4326", side, WORLDCOVER_MARGIN_M)
    step, res = 0.02, 1 / 12000
    n_wc = 0
    for ty in np.arange(math.floor(gy0 / step) * step, gy1, step):
        for tx in np.arange(math.floor(gx0 / step) * step, gx1, step):
            n = int(round(step / res))
            _write(wc / f"wc_{tx:+09.3f}_{ty:+08.3f}.tif", _blobs(n, n, WORLDCOVER_CODES, 10, n_wc), "EPSG:4326",
                   from_origin(tx, ty + step, res, res), 0)  # fmt: skip
            n_wc += 1
    # AOI: an octagon inset 5 % from the area, EPSG:4326
    ax0, ay0, ax1, ay1 = _area_in("EPSG:4326", side * 0.9)
    cx, cy, rx, ry = (ax0 + ax1) / 2, (ay0 + ay1) / 2, (ax1 - ax0) / 2, (ay1 - ay0) / 2
    ring = [[cx + rx * math.cos(a) / math.cos(math.pi / 8), cy + ry * math.sin(a) / math.cos(math.pi / 8)]
            for a in np.linspace(math.pi / 8, 2 * math.pi + math.pi / 8, 9)]  # fmt: skip
    ring = [[min(max(x, ax0), ax1), min(max(y, ay0), ay1)] for x, y in ring]
    ring[-1] = ring[0]
    aoi = root / "aoi.geojson"
    geom = {"type": "Polygon", "coordinates": [ring]}
    aoi.write_text(json.dumps({"type": "FeatureCollection", "features": [
        {"type": "Feature", "properties": {}, "geometry": geom}]}))  # fmt: skip
    import shapely
    from shapely.geometry import shape
    from shapely.ops import transform as stransform

    def to_utm(x, y):
        return transform("EPSG:4326", "EPSG:32617", list(np.atleast_1d(x)), list(np.atleast_1d(y)))

    aoi_km2 = shapely.area(stransform(lambda x, y: to_utm(x, y), shape(geom))) / 1e6
    return {"images": img, "nlcd": nlcd, "worldcover": wc, "aoi": aoi, "aoi_km2": float(aoi_km2),
            "files": n_files, "worldcover_tiles": n_wc}  # fmt: skip


def run_cli(args: list[str], log: Path) -> dict:
    """``python -m lcmap.cli ARGS``: wall seconds and peak RSS (GB; the process or any process it waited for)."""
    env = {**os.environ, "PYTHONPATH": str(common.REPO), "COLUMNS": "200"}
    t0 = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.Popen([sys.executable, "-m", "lcmap.cli", *args], stdout=f, stderr=subprocess.STDOUT, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - t0
    if proc.returncode:
        raise SystemExit(f"lcmap {args[0]} failed ({proc.returncode}):\n{log.read_text()[-3000:]}")
    return {"wall_s": wall, "peak_rss_gb": usage.ru_maxrss / 1024**2}


def seam_disagreement(a_path: Path, b_path: Path, near_px: int = 128) -> dict:
    """Disagreement between two maps of one area, within ``near_px`` of 84 W and elsewhere."""
    with rasterio.open(a_path) as a, rasterio.open(b_path) as b:
        assert a.crs == b.crs and a.transform == b.transform and a.shape == b.shape
        ca, cb = a.read(1), b.read(1)
        rows = np.arange(a.height)
        xc = a.transform.c + a.transform.a * a.width / 2
        ys = a.transform.f + a.transform.e * (rows + 0.5)
        _, lats = transform(a.crs, "EPSG:4326", [xc] * len(rows), list(ys))
        xs, _ = transform("EPSG:4326", a.crs, [LON0] * len(rows), list(lats))
        seam_col = (np.array(xs) - a.transform.c) / a.transform.a
    cols = np.arange(ca.shape[1])[None, :]
    near = np.abs(cols - seam_col[:, None]) <= near_px
    valid = (ca > 0) & (cb > 0)
    diff = ca != cb
    out = {}
    for name, m in (("near_seam", near & valid), ("interior", ~near & valid)):
        out[name] = float(diff[m].mean()) if m.any() else float("nan")
        out[name + "_px"] = int(m.sum())
        out[name + "_differ_px"] = int(diff[m].sum())  # a percentage rounds a few pixels away
    return out


def bytes_read(tmp: Path, area: dict, km2: float) -> dict:
    """Bytes read from files per km², in this process (:mod:`scale_reads`): each label product by
    :data:`READ_PATCHES` training patches, the imagery by ``predict_map`` over a bbox of
    :data:`READ_MAP_M` m (at most 90 % of the area's side) at the area's centre (the zone seam)."""
    import scale_reads as reads

    out: dict = {}
    details: dict = {}
    for name, legend in (("nlcd", "nlcd"), ("worldcover", "worldcover")):
        r = reads.label_reads(area["images"], area[name], legend, area["aoi"], READ_PATCHES, READ_PATCH_PX)
        reads.print_label_reads(f"{name}-like", r)
        out[f"bytes_read_per_km2_labels_{name}"] = r["bytes_per_km2"]
        details[f"labels_{name}"] = r
    side = math.sqrt(km2) * 1000
    x0, y0, x1, y1 = _area_in("EPSG:32617", side)
    bbox = list(_area_in("EPSG:32617", min(READ_MAP_M, 0.9 * side)))
    warm = [x0 + 0.1 * side, y0 + 0.1 * side, x0 + 0.1 * side + 256, y0 + 0.1 * side + 256]
    r = reads.imagery_reads(tmp, area["images"], bbox, warm)
    reads.print_imagery_reads(r)
    out["bytes_read_per_km2_imagery"] = r["bytes_per_km2"]
    details["imagery"] = r
    out["bytes_read"] = details
    return out


def end_to_end(tmp: Path, km2: float) -> dict:
    from rio_cogeo.cogeo import cog_validate

    root = tmp / "e2e"
    t0 = time.perf_counter()
    area = build_area(root, km2)
    print(f"test area: {km2:g} km² ({area['aoi_km2']:.2f} km² AOI), imagery files {area['files']}, "
          f"NLCD-like 1 raster EPSG:5070 30 m, WorldCover-like {area['worldcover_tiles']} tiles EPSG:4326 "
          f"({time.perf_counter() - t0:.0f} s to build)")  # fmt: skip
    reads = bytes_read(root, area, km2)
    run = root / "run"
    train = run_cli(["train", "--images", str(area["images"]), "--labels", str(area["nlcd"]), "--legend", "nlcd",
                     "--aoi", str(area["aoi"]), "--model", "paraformer-tiny", "--epochs", "1", "--steps-per-epoch",
                     "3", "--num-workers", "0", "--no-progress-bar", "--out", str(run)],
                    root / "train.log")  # fmt: skip
    print(
        f"lcmap train --aoi (paraformer-tiny, 3 steps): {train['wall_s']:.0f} s, peak RSS {train['peak_rss_gb']:.2f} GB"
    )
    train_wc = run_cli(["train", "--images", str(area["images"]), "--labels", str(area["worldcover"]), "--legend",
                        "worldcover", "--aoi", str(area["aoi"]), "--model", "paraformer-tiny", "--epochs", "1",
                        "--steps-per-epoch", "3", "--num-workers", "0", "--no-progress-bar", "--out",
                        str(root / "run_wc")], root / "train_wc.log")  # fmt: skip
    print(f"lcmap train --aoi on the WorldCover-like tiles: {train_wc['wall_s']:.0f} s, "
          f"peak RSS {train_wc['peak_rss_gb']:.2f} GB")  # fmt: skip
    out = root / "map" / "map.tif"
    pred = run_cli(["predict", "--model", str(run), "--images", str(area["images"]), "--aoi", str(area["aoi"]),
                    "--out", str(out), "--device", "cpu"], root / "predict.log")  # fmt: skip
    km2_h = area["aoi_km2"] / (pred["wall_s"] / 3600)
    print(f"lcmap predict --aoi (local cluster): {pred['wall_s']:.0f} s for {area['aoi_km2']:.2f} km²: "
          f"{km2_h:.1f} km²/hour, peak RSS {pred['peak_rss_gb']:.2f} GB")  # fmt: skip
    crs_line = next((ln for ln in (root / "predict.log").read_text().splitlines() if "map CRS" in ln), "")
    valid, errors, _ = cog_validate(str(out), quiet=True)
    with rasterio.open(out) as src:
        crs, map_res = src.crs.to_string(), src.res[0]
    print(f"COG valid (rio-cogeo): {valid} {errors or ''}; CRS {crs}, {map_res:.4f} m pixels {crs_line.strip()}")
    out2 = root / "map2" / "map.tif"
    pred2 = run_cli(["predict", "--model", str(run), "--images", str(area["images"]), "--aoi", str(area["aoi"]),
                     "--out", str(out2), "--device", "cpu", "--block-px", "1536", "--scheduler", "synchronous"],
                    root / "predict2.log")  # fmt: skip
    seam = seam_disagreement(out, out2)
    print(
        f"zone seam (84 W), map vs a map with --block-px 1536 --scheduler synchronous: {seam['near_seam_differ_px']} "
        f"of {seam['near_seam_px']} px differ within 128 px of the seam, {seam['interior_differ_px']} of "
        f"{seam['interior_px']} elsewhere"
    )
    return {
        "km2_per_hour": km2_h,
        "aoi_km2": area["aoi_km2"],
        "predict_wall_s": pred["wall_s"],
        "predict_sync_wall_s": pred2["wall_s"],
        "train_wall_s": train["wall_s"],
        "peak_rss_gb_train": max(train["peak_rss_gb"], train_wc["peak_rss_gb"]),
        "peak_rss_gb_predict": pred["peak_rss_gb"],
        "cog_valid": bool(valid),
        "map_crs": crs,
        "map_res_m": map_res,
        "seam_disagreement": seam,
        **reads,
    }

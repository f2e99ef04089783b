"""Zonal statistics throughput and memory: ``lcmap stats``' engine on maps of growing size.

For each size (default 16, 64, 256 Mpx) a uint8 class map (4 classes + nodata stripes, 512 px
tiles, DEFLATE, UTM 17N, 2 m pixels, ``LCMAP_LEGEND`` tag) and ~50 zone polygons (Voronoi cells
of random points, in EPSG:4326) are generated, then :func:`lcmap.pipeline.analysis.zone_stats.zone_stats`
runs in this process. Prints seconds, Mpx/s and the peak RSS *during that run* (sampled every
10 ms, so sizes are comparable within one process) and one JSON line. With
``--compare-exactextract`` the 64 Mpx map (or the largest below it) is also summarised with
exactextract (``unique`` + ``frac`` + ``count``, feature-sequential) and the largest relative
difference of a zone's class area is printed.

    python benchmarks/zonal.py [--sizes-mpx 16 64 256] [--zones 50] [--block-px 2048] [--compare-exactextract]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import rasterio
import shapely
from rasterio.transform import from_origin
from rasterio.windows import Window

from lcmap.geodata.legends import target_legend
from lcmap.pipeline.analysis.zone_stats import zone_stats
from lcmap.pipeline.prediction.cog import legend_tag

RES_M = 2.0
X0, Y0 = 500_000.0, 4_300_000.0


def make_map(path: Path, side_px: int, seed: int = 0) -> None:
    """A ``side_px``² uint8 map: 4 classes in patches of ~40-200 px, nodata (0) stripes."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(1, 5, size=(side_px // 64 + 2, side_px // 64 + 2)).astype(np.uint8)
    profile = dict(
        driver="GTiff",
        width=side_px,
        height=side_px,
        count=1,
        dtype="uint8",
        crs="EPSG:32617",
        transform=from_origin(X0, Y0, RES_M, RES_M),
        nodata=0,
        tiled=True,
        blockxsize=512,
        blockysize=512,
        compress="deflate",
    )
    with rasterio.open(path, "w", **profile) as dst:
        dst.update_tags(LCMAP_LEGEND=legend_tag(target_legend()))
        step = 1024
        cols = np.arange(side_px)
        for r0 in range(0, side_px, step):
            rows = np.arange(r0, min(side_px, r0 + step))
            block = coarse[(rows // 64)[:, None], (cols // 64)[None, :]]
            noise = rng.random(block.shape, dtype=np.float32) < 0.05
            block = np.where(noise, (block % 4) + 1, block).astype(np.uint8)
            block[(rows % 997 < 20), :] = 0
            dst.write(block, 1, window=Window(0, r0, side_px, len(rows)))


def make_zones(path: Path, side_px: int, n_zones: int, seed: int = 1) -> None:
    """~``n_zones`` Voronoi polygons covering the map (edges densified), written in EPSG:4326."""
    import geopandas as gpd

    rng = np.random.default_rng(seed)
    size_m = side_px * RES_M
    box = shapely.box(X0, Y0 - size_m, X0 + size_m, Y0)
    points = shapely.multipoints(
        np.column_stack([X0 + rng.random(n_zones) * size_m, Y0 - rng.random(n_zones) * size_m])
    )
    cells = [c.intersection(box) for c in shapely.get_parts(shapely.voronoi_polygons(points, extend_to=box))]
    cells = [shapely.segmentize(c, size_m / 200) for c in cells if not c.is_empty]
    frame = gpd.GeoDataFrame(
        {"name": [f"district {i:02d}" for i in range(len(cells))]}, geometry=cells, crs="EPSG:32617"
    )
    frame.to_crs("EPSG:4326").to_file(path, driver="GPKG")


class PeakRSS:
    """Peak resident memory (MB) of this process while the ``with`` block runs (10 ms sampling)."""

    def __enter__(self):
        import psutil

        self.proc, self.peak, self.stop = psutil.Process(), 0, threading.Event()
        self.base = self.proc.memory_info().rss / 2**20
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self) -> None:
        while not self.stop.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss / 2**20)
            time.sleep(0.01)

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join()


def exactextract_areas_km2(map_path: Path, zones_path: Path, names: list[str], codes: list[int]) -> np.ndarray:
    """Class areas (km², ``(zones, classes)``) from exactextract's coverage-weighted fractions."""
    import geopandas as gpd
    from exactextract import exact_extract

    zones = gpd.read_file(zones_path).to_crs("EPSG:32617")
    rows = exact_extract(str(map_path), zones, ["unique", "frac", "count"], include_cols=["name"], output="pandas")
    out = np.zeros((len(names), len(codes)))
    for _, row in rows.iterrows():
        z = names.index(row["name"])
        for value, frac in zip(row["unique"], row["frac"], strict=True):
            if int(value) in codes:
                out[z, codes.index(int(value))] = frac * row["count"] * RES_M**2 / 1e6
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes-mpx", type=int, nargs="+", default=[16, 64, 256])
    parser.add_argument("--zones", type=int, default=50)
    parser.add_argument("--block-px", type=int, default=2048)
    parser.add_argument("--compare-exactextract", action="store_true")
    args = parser.parse_args()

    results = []
    with tempfile.TemporaryDirectory(prefix="lcmap-zonal-bench-") as folder:
        maps = []  # generate every map first, so that the measured runs follow one another
        for mpx in args.sizes_mpx:
            side = int(round(np.sqrt(mpx * 1e6) / 512)) * 512
            map_path, zones_path = Path(folder) / f"map_{mpx}.tif", Path(folder) / f"zones_{mpx}.gpkg"
            t0 = time.perf_counter()
            make_map(map_path, side)
            make_zones(zones_path, side, args.zones)
            maps.append((mpx, side, map_path, zones_path, time.perf_counter() - t0))
        for mpx, side, map_path, zones_path, made_s in maps:
            with PeakRSS() as rss:
                t0 = time.perf_counter()
                stats, _ = zone_stats(map_path, zones_path, "name", block_px=args.block_px)
                seconds = time.perf_counter() - t0
            px = side * side
            row = {
                "mpx": round(px / 1e6, 1), "side_px": side, "seconds": round(seconds, 2),
                "mpx_per_s": round(px / 1e6 / seconds, 1), "peak_rss_mb": round(rss.peak),
                "rss_before_mb": round(rss.base), "zones": len(stats.zone_names),
                "classified_km2": round(float(stats.area_km2.sum()), 3), "generate_s": round(made_s, 1),
            }  # fmt: skip
            print(
                f"{row['mpx']:7.1f} Mpx  {seconds:7.2f} s  {row['mpx_per_s']:6.1f} Mpx/s  "
                f"peak RSS {row['peak_rss_mb']} MB (before {row['rss_before_mb']} MB)",
                flush=True,
            )
            if args.compare_exactextract and mpx == max(m for m in args.sizes_mpx if m <= 64):
                t0 = time.perf_counter()
                ee = exactextract_areas_km2(map_path, zones_path, stats.zone_names, stats.class_codes)
                ee_s = time.perf_counter() - t0
                rel = np.abs(ee - stats.area_km2) / np.maximum(stats.area_km2, 1e-9)
                row.update(
                    exactextract_seconds=round(ee_s, 2),
                    exactextract_mpx_per_s=round(px / 1e6 / ee_s, 1),
                    max_rel_area_diff=float(rel.max()),
                )
                print(
                    f"         exactextract {ee_s:7.2f} s  {px / 1e6 / ee_s:6.1f} Mpx/s  largest relative "
                    f"difference of a zone's class area {rel.max():.2e}",
                    flush=True,
                )
            results.append(row)
    print(json.dumps({"benchmark": "zonal", "block_px": args.block_px, "runs": results}))


if __name__ == "__main__":
    main()

"""Bytes transferred over HTTP per km² mapped, vs the files' size (issue #20, imagery behind HTTP).

Four 2048 x 2048 px COGs (a 2 x 2 mosaic, 16.8 km² at 1 m; 512 px tiles, deflate, overviews, as
``gdal_translate -of COG`` writes them) made of the embedded sample's NAIP patches are served by
the tests' HTTP server on 127.0.0.1 (range requests, bytes counted: :mod:`tests.http_server`);
``lcmap predict`` (``predict_map``, synchronous, a random U-Net) maps square bboxes of each size
from their URLs. A fresh server (fresh URLs) per run: GDAL caches what it read, by URL.

    python benchmarks/remote_reads.py [--sides 256 1024]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import rasterio
import rasterio.shutil
import torch
from rasterio.transform import from_origin

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests.http_server

from lcmap.geodata.legends import target_legend  # noqa: E402
from lcmap.geodata.sample import sample_paths  # noqa: E402
from lcmap.models import build_model  # noqa: E402
from lcmap.pipeline.prediction.predict import PredictConfig, predict_map  # noqa: E402
from lcmap.pipeline.runs import save_checkpoint  # noqa: E402
from tests.http_server import RangeServer  # noqa: E402

SIDE_PX = 2048
X0, Y0 = 535_000.0, 4_170_000.0


def make_cogs(folder: Path) -> list[Path]:
    """The 2 x 2 mosaic of COGs; returns their paths."""
    patches = [rasterio.open(p).read() for p in sample_paths()["imagery"]]
    quad = np.zeros((4, SIDE_PX, SIDE_PX), np.uint8)
    for k, (r, c) in enumerate((r, c) for r in range(0, SIDE_PX, 256) for c in range(0, SIDE_PX, 256)):
        quad[:, r : r + 256, c : c + 256] = patches[k % 8][:, :: 1 if (r // 256) % 2 == 0 else -1, :]
    paths = []
    for i, (r, c) in enumerate([(0, 0), (0, SIDE_PX), (SIDE_PX, 0), (SIDE_PX, SIDE_PX)]):
        raw = folder / f"raw-{i}.tif"
        profile = dict(driver="GTiff", width=SIDE_PX, height=SIDE_PX, count=4, dtype="uint8", crs="EPSG:26917")
        with rasterio.open(raw, "w", transform=from_origin(X0 + c, Y0 - r, 1, 1), **profile) as dst:
            dst.write(np.roll(quad, 512 * i, axis=2))
        paths.append(folder / f"quad-{i}.tif")
        rasterio.shutil.copy(raw, paths[-1], driver="COG", blocksize=512, compress="deflate")
        raw.unlink()
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sides", type=int, nargs="+", default=[256, 1024], help="bbox sides, px (= m)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "naip").mkdir()
        files = make_cogs(root / "naip")
        total = sum(p.stat().st_size for p in files)
        files_km2 = len(files) * SIDE_PX * SIDE_PX / 1e6
        print(
            f"files: {len(files)} COGs, {total / 1e6:.1f} MB, {files_km2:.1f} km2: {total / files_km2 / 1e6:.2f} MB/km2"
        )
        torch.manual_seed(0)
        ckpt = save_checkpoint(
            root / "m.ckpt", build_model("unet", 4, 4), "unet", target_legend(), [128.0] * 4, [60.0] * 4
        )
        for side in args.sides:
            bbox = (X0 + 300, Y0 - 300 - side, X0 + 300 + side, Y0 - 300)  # 300 m inside the first quad
            with RangeServer(root) as server:
                urls = [server.url(f"naip/{p.name}") for p in files]
                t0 = time.perf_counter()
                predict_map(
                    PredictConfig.of(
                        ckpt,
                        urls,
                        root / f"map-{side}.tif",
                        bbox=bbox,
                        bbox_crs="EPSG:26917",
                        tile_px=256,
                        overlap_px=32,
                        scheduler="synchronous",
                    ),
                    progress=False,
                )
                seconds = time.perf_counter() - t0
                stats = server.stats()
            km2 = side * side / 1e6
            sent = stats["bytes_sent"]
            print(
                f"bbox {side} px ({km2:.3f} km2): {sent / 1e6:.2f} MB in {len(stats['requests'])} requests, "
                f"{sent / total:.1%} of the files, {sent / km2 / 1e6:.2f} MB per km2 mapped ({seconds:.0f} s)"
            )


if __name__ == "__main__":
    main()

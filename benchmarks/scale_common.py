"""Helpers shared by the scale benchmarks (``scale.py``, ``scale_e2e.py``, ``scale_reads.py``):
test imagery textured from the embedded NAIP patches, a stand-in checkpoint, one pipeline run.

The three benchmark scripts import this module; it imports none of them (no import circle).
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import rasterio
from rasterio.transform import from_origin

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "lcmap" / "geodata" / "sample"
FILE_PX = 2048  # side of one imagery GeoTIFF


# --------------------------------------------------------------------------------- inputs
def sample_patches() -> list[np.ndarray]:
    out = []
    for p in sorted((SAMPLE / "naip").glob("patch-*.tif")):
        with rasterio.open(p) as src:
            out.append(src.read())
    return out


def texture(r0: int, c0: int, h: int, w: int, patches: list[np.ndarray]) -> np.ndarray:
    """``(4, h, w)`` uint8 imagery at global pixel (r0, c0): the NAIP patches tiled with flips."""
    ps = patches[0].shape[1]
    n = len(patches)
    out = np.empty((4, h, w), np.uint8)
    for rr in range(r0 // ps * ps, r0 + h, ps):
        for cc in range(c0 // ps * ps, c0 + w, ps):
            k = (rr // ps * 7 + cc // ps * 3) % n
            tile = patches[k]
            if (rr // ps + cc // ps) % 2:
                tile = tile[:, :, ::-1]
            if (rr // ps) % 3 == 1:
                tile = tile[:, ::-1]
            a, b = max(rr, r0), min(rr + ps, r0 + h)
            c, d = max(cc, c0), min(cc + ps, c0 + w)
            out[:, a - r0 : b - r0, c - c0 : d - c0] = tile[:, a - rr : b - rr, c - cc : d - cc]
    return np.maximum(out, 1)  # 0 is the imagery's nodata


def write_tiles(folder: Path, side_px: int, crs: str, x0: float, y0: float, tag: str = "img") -> list[Path]:
    """A ``side_px`` x ``side_px`` 1 m mosaic as GeoTIFFs of :data:`FILE_PX` px (tiled, deflate)."""
    folder.mkdir(parents=True, exist_ok=True)
    patches = sample_patches()
    paths = []
    for r0 in range(0, side_px, FILE_PX):
        for c0 in range(0, side_px, FILE_PX):
            h, w = min(FILE_PX, side_px - r0), min(FILE_PX, side_px - c0)
            path = folder / f"{tag}_{r0 // FILE_PX:03d}_{c0 // FILE_PX:03d}.tif"
            profile = dict(
                driver="GTiff", width=w, height=h, count=4, dtype="uint8", crs=crs, nodata=0,
                transform=from_origin(x0 + c0, y0 - r0, 1.0, 1.0), tiled=True, blockxsize=512,
                blockysize=512, compress="deflate", zlevel=1,
            )  # fmt: skip
            with rasterio.open(path, "w", **profile) as dst:
                dst.write(texture(r0, c0, h, w, patches))
            paths.append(path)
    return paths


def standin_checkpoint(path: Path) -> Path:
    """A small U-Net checkpoint (4 bands, the 4 target classes); its forward is replaced anyway."""
    import torch

    from lcmap.geodata.legends import target_legend
    from lcmap.models import build_model
    from lcmap.pipeline.runs import save_checkpoint

    torch.manual_seed(0)
    legend = target_legend()
    model = build_model("unet", 4, len(legend))
    return save_checkpoint(path, model, "unet", legend, [120.0] * 4, [50.0] * 4)


# --------------------------------------------------------------------------- pipeline only
def peak_rss_mb() -> float:
    """This process's peak RSS (MB), from VmHWM (reset by exec)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def pipeline_run(
    images: Path,
    ckpt: Path,
    out: Path,
    block_px: int,
    tile_px: int,
    overlap_px: int,
    bbox: list | None = None,
    tile_km: float | None = None,
) -> dict:
    """``predict_map`` with a stand-in model (fixed probabilities, its time measured and excluded);
    ``tile_km``: a folder of COG tiles at ``out`` instead of one COG. ``serial_s``: seconds from the
    last block file written to the finished product (one COG: its assembly; tiles: the last tile,
    the VRT, preview and STAC Collection)."""
    import torch

    import lcmap.pipeline.prediction.inference as inference
    import lcmap.pipeline.prediction.mapfile as mapfile
    from lcmap.pipeline.prediction.predict import PredictConfig, predict_map

    torch.set_num_threads(1)
    cache: dict = {}
    c0 = time.process_time()

    def standin(model, x):  # fixed probabilities varying over space: the blending has work to do
        key = (tuple(x.shape), x.device)
        p = cache.get(key)
        if p is None:
            g = torch.Generator().manual_seed(0)
            logits = torch.randn((x.shape[0], 4, x.shape[2] // 32, x.shape[3] // 32), generator=g)
            p = torch.softmax(torch.nn.functional.interpolate(logits, scale_factor=32), dim=1).to(x.device)
            cache[key] = p
        return p

    inference.predict_proba = standin
    real_write, last_block = mapfile.write_block, [0.0]

    def timed_write(*args, **kwargs):  # when the last block file was written
        made = real_write(*args, **kwargs)
        last_block[0] = time.perf_counter()
        return made

    mapfile.write_block = timed_write
    t0 = time.perf_counter()
    res = predict_map(
        PredictConfig.of(
            ckpt,
            [images],
            out,
            tile_px=tile_px,
            overlap_px=overlap_px,
            block_px=block_px,
            scheduler="synchronous",
            device="cpu",
            bbox=bbox,
            bbox_crs="EPSG:32617",
            tile_km=tile_km,
        ),
        progress=False,
    )
    wall = time.perf_counter() - t0
    serial = time.perf_counter() - last_block[0]
    mapfile.write_block = real_write
    cpu = time.process_time() - c0  # all threads (the strip reader's, GDAL's), the stand-in's too
    px = res.width * res.height
    return {
        "map_px": px,
        "wall_s": wall,
        "standin_s": res.seconds_forward,
        "mpx_s": px / 1e6 / (wall - res.seconds_forward),
        "mpx_per_cpu_s": px / 1e6 / max(cpu - res.seconds_forward, 1e-9),
        "model_px_per_map_px": res.windows * tile_px * tile_px / px,
        "plan_s": res.seconds_plan,
        "blocks_s": res.seconds_predict - res.seconds_plan,
        "cog_s": res.seconds_write,
        "blocks_mpx_s": px / 1e6 / max(res.seconds_predict - res.seconds_plan - res.seconds_forward, 1e-9),
        "windows": res.windows,
        "blocks": res.blocks,
        "serial_s": serial,
        "tiles": res.tiles,
        "peak_rss_mb": peak_rss_mb(),
    }

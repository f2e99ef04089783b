"""Bytes read from files per km², measured in this process (part of ``benchmarks/scale_e2e.py``).

Issue #12: a label product given as one huge file (a CONUS NLCD) or as hundreds of tiles must be
read only where needed. Measured here with the kernel's I/O accounting:

- ``rchar`` (``/proc/self/io``: all threads of this process; ``/proc/thread-self/io``: the calling
  thread only) is the sum of the byte counts returned by ``read``/``pread``/``readv`` system calls:
  every read through a file descriptor (GDAL's ``VSI`` reads included), whether the page cache or
  the disk served it. Not counted: memory-mapped reads (GDAL does not map GeoTIFFs by default), and
  blocks GDAL serves from its own block cache (no system call). Also counted: any other read of the
  process, e.g. Python modules imported on first use, ``proj.db``, ``/proc`` files; so each
  measured code path runs once before (a warm-up on other handles: GDAL caches blocks per open
  dataset, and the measured run opens its files afresh).
- Labels, as ``lcmap train`` reads them: imagery and label product paired as training pairs them
  (:func:`lcmap.geodata.datasets.open_imagery` / ``open_labels``, ``LabelledImagery``, imagery
  first), ``n`` random patches inside the AOI from the training sampler
  (:func:`lcmap.pipeline.training.datamodule.make_random_sampler`), each read with the dataset's
  ``__getitem__``; the label part is the calling thread's ``rchar`` inside
  ``LabelRaster.__getitem__``. Compared with the product's size on disk, and with the compressed
  bytes of the product's blocks (GeoTIFF tiles) that the patches touch: a reader that reads only
  where needed reads about those blocks (plus file headers); a whole-file read reads the file.
- Imagery, as ``lcmap predict`` reads it: :func:`common.pipeline_run` (``predict_map``,
  ``scheduler="synchronous"``, ``device="cpu"``, the stand-in model) over a bbox; the process's
  ``rchar`` (everything: checkpoint, imagery, block files read back, COG assembly) and the
  imagery part (the calling thread's ``rchar`` inside ``StripReader.read``), per km² of map.

Areas are computed in EPSG:5070 (equal-area Albers; the test area lies in CONUS).
"""

from __future__ import annotations

import contextlib
import gc
import io
import math
import os
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
import shapely
import torch
from rasterio.errors import NodataShadowWarning
from rasterio.warp import transform, transform_bounds
from rasterio.windows import from_bounds
from shapely.ops import transform as transform_geometry

sys.path.insert(0, str(Path(__file__).resolve().parent))
import scale_common as common  # noqa: E402

EQUAL_AREA = "EPSG:5070"


# ------------------------------------------------------------------------------ counting
def rchar(thread: bool = False) -> int:
    """``rchar`` of this process (all threads) or of the calling thread (bytes, see module docs)."""
    with open("/proc/thread-self/io" if thread else "/proc/self/io") as f:
        for line in f:
            if line.startswith("rchar:"):
                return int(line.split()[1])
    raise RuntimeError("no rchar in /proc/self/io")


@contextlib.contextmanager
def counting(cls: type, name: str, calls: list | None = None) -> Iterator[list[int]]:
    """While open, ``cls.name`` adds the calling thread's ``rchar`` delta of each call to ``total[0]``
    (and appends ``(self, args)`` of each call to ``calls`` when given)."""
    original = getattr(cls, name)
    total = [0]

    def counted(self: Any, *args: Any, **kwargs: Any) -> Any:
        if calls is not None:
            calls.append((self, args))
        before = rchar(thread=True)
        try:
            return original(self, *args, **kwargs)
        finally:
            total[0] += rchar(thread=True) - before

    setattr(cls, name, counted)
    try:
        yield total
    finally:
        setattr(cls, name, original)


# ------------------------------------------------------------------------------ areas, blocks
def km2(geom: shapely.Geometry, crs: Any) -> float:
    """Area of ``geom`` (in ``crs``) in km², edges densified and projected to EPSG:5070."""
    if str(crs) != EQUAL_AREA:
        minx, miny, maxx, maxy = geom.bounds
        geom = shapely.segmentize(geom, max(maxx - minx, maxy - miny) / 32)

        def to_ea(x: np.ndarray, y: np.ndarray) -> tuple[list[float], list[float]]:
            return transform(crs, EQUAL_AREA, list(np.atleast_1d(x)), list(np.atleast_1d(y)))

        geom = transform_geometry(to_ea, geom)
    return float(geom.area) / 1e6


def files_on_disk(files: list[str]) -> dict:
    """Total bytes of ``files`` and the km² of their footprints (summed)."""
    size, area = 0, 0.0
    for f in files:
        size += os.path.getsize(f)
        with rasterio.open(f) as src:
            area += km2(shapely.box(*src.bounds), src.crs)
    return {"bytes": size, "km2": area, "files": len(files)}


def block_bytes_under(files: list[str], boxes: list[tuple[float, float, float, float]], crs: Any) -> tuple[int, int]:
    """Compressed bytes of the blocks (GeoTIFF tiles or strips) of ``files`` under ``boxes`` (in
    ``crs``; each block counted once), and the number of files with such blocks."""
    total, touched = 0, 0
    for f in files:
        with rasterio.open(f) as src:
            bh, bw = src.block_shapes[0]
            seen: set[tuple[int, int]] = set()
            for box in boxes:
                x0, y0, x1, y1 = transform_bounds(crs, src.crs, *box, densify_pts=21)
                left, bottom, right, top = src.bounds
                x0, y0, x1, y1 = max(x0, left), max(y0, bottom), min(x1, right), min(y1, top)
                if x1 <= x0 or y1 <= y0:
                    continue
                win = from_bounds(x0, y0, x1, y1, transform=src.transform)
                r0, c0 = max(0, math.floor(win.row_off)), max(0, math.floor(win.col_off))
                r1 = min(src.height, math.ceil(win.row_off + win.height))
                c1 = min(src.width, math.ceil(win.col_off + win.width))
                for i in range(r0 // bh, (r1 - 1) // bh + 1):
                    for j in range(c0 // bw, (c1 - 1) // bw + 1):
                        seen.add((i, j))
            total += sum(src.block_size(1, i, j) for i, j in seen)
            touched += bool(seen)
    return total, touched


def _mb(n: float) -> str:
    return f"{n / 1e6:.2f} MB" if n >= 1e5 else f"{n / 1e3:.1f} kB"


# ------------------------------------------------------------------------------ labels
def _pairing(images: Path, labels: Path, legend: str, aoi: Path) -> tuple[Any, Any, int]:
    """Imagery and labels paired as ``lcmap train`` pairs them; the label open's own ``rchar``."""
    from lcmap.geodata.aoi import resolve_aoi
    from lcmap.geodata.datasets import LabelledImagery, open_imagery, open_labels
    from lcmap.geodata.legends import get_legend

    imagery = open_imagery([str(images)])
    aoi_ = resolve_aoi(str(aoi), None)
    assert aoi_ is not None
    roi = aoi_.to_crs(imagery.crs)
    before = rchar(thread=True)
    label_ds = open_labels([str(labels)], get_legend(legend))
    opened = rchar(thread=True) - before
    with contextlib.redirect_stdout(io.StringIO()):  # TorchGeo prints the CRS conversion
        return LabelledImagery(imagery, label_ds, aoi=roi), roi, opened


def label_reads(images: Path, labels: Path, legend: str, aoi: Path, n: int = 64, patch_px: int = 224,
                seed: int = 1234) -> dict:  # fmt: skip
    """Bytes read from one label product by ``n`` training patches (see the module docs)."""
    from lcmap.compat import query_bounds
    from lcmap.geodata.datasets import LabelRaster
    from lcmap.pipeline.training.datamodule import make_random_sampler

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NodataShadowWarning)  # the imagery's band 4 is tagged alpha
        warm, roi, _ = _pairing(images, labels, legend, aoi)  # imports, proj.db, first calls; other handles
        warm[next(iter(make_random_sampler(warm, patch_px, 1, roi, seed + 1)))]
        warm.labels.mosaic.close()
        del warm
        gc.collect()

        ds, roi, opened = _pairing(images, labels, legend, aoi)
        with torch.random.fork_rng():
            torch.manual_seed(seed)  # lcmap train seeds the global RNG (seed_everything); TorchGeo 0.8 uses it
            queries = list(make_random_sampler(ds, patch_px, n, roi, seed))
        total0 = rchar()
        with counting(LabelRaster, "__getitem__") as label_bytes:
            for q in queries:
                ds[q]
        total = rchar() - total0
    ds.labels.mosaic.close()
    boxes = [query_bounds(q) for q in queries]
    crs = ds.imagery.crs
    patches_km2 = sum(km2(shapely.box(*b), crs) for b in boxes)
    distinct_km2 = km2(shapely.union_all([shapely.box(*b) for b in boxes]), crs)
    files = list(ds.labels.mosaic.paths)
    disk = files_on_disk(files)
    under, touched = block_bytes_under(files, boxes, crs)
    read = label_bytes[0]
    return {
        "patches": len(queries), "patch_px": patch_px, "patches_km2": patches_km2, "distinct_km2": distinct_km2,
        "bytes_read": read, "bytes_per_km2": read / patches_km2, "bytes_per_distinct_km2": read / distinct_km2,
        "block_bytes_under_patches": under, "files_under_patches": touched, "file_bytes": disk["bytes"],
        "files": disk["files"], "product_km2": disk["km2"], "file_bytes_per_km2": disk["bytes"] / disk["km2"],
        "fraction_of_files_read": read / disk["bytes"], "open_bytes": opened,
        "imagery_bytes_read": total - read, "imagery_crs": crs.to_string(),
    }  # fmt: skip


def print_label_reads(name: str, r: dict) -> None:
    print(
        f"bytes read, labels {name} ({r['files']} file(s), {_mb(r['file_bytes'])} for {r['product_km2']:.0f} km²: "
        f"{_mb(r['file_bytes_per_km2'])}/km² on disk): {r['patches']} training patches of {r['patch_px']} px "
        f"({r['patches_km2']:.2f} km², {r['distinct_km2']:.2f} km² distinct) read {_mb(r['bytes_read'])} = "
        f"{_mb(r['bytes_per_km2'])}/km² of patches, {100 * r['fraction_of_files_read']:.1f} % of the product "
        f"(its blocks under the patches: {_mb(r['block_bytes_under_patches'])} in {r['files_under_patches']} "
        f"file(s)); opening it (checks, index): {_mb(r['open_bytes'])}"
    )


# ------------------------------------------------------------------------------ imagery
def imagery_reads(tmp: Path, images: Path, bbox: list[float], warm_bbox: list[float]) -> dict:
    """Bytes read by ``predict_map`` over ``bbox`` (EPSG:32617 metres) with the stand-in model."""
    import lcmap.pipeline.prediction.predict  # noqa: F401  (imported before measuring)
    import lcmap.pipeline.prediction.strips as strips

    ckpt = common.standin_checkpoint(tmp / "reads_standin.ckpt")
    calls: list = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NodataShadowWarning)  # the imagery's band 4 is tagged alpha
        common.pipeline_run(images, ckpt, tmp / "reads_warm" / "map.tif", 4096, 512, 64, bbox=warm_bbox)
        gc.collect()
        out = tmp / "reads_map" / "map.tif"
        total0 = rchar()
        with counting(strips.StripReader, "read", calls) as imagery_bytes:
            res = common.pipeline_run(images, ckpt, out, 4096, 512, 64, bbox=bbox)
        total = rchar() - total0
    with rasterio.open(out) as src:
        map_km2 = res["map_px"] * abs(src.res[0] * src.res[1]) / 1e6
        map_crs, map_res = src.crs, src.res[0]
    regions = []  # what the strips asked for (the map, its windows' halo), clipped as StripReader.read clips
    for reader, (r0, r1, c0, c1, _) in calls:
        g = reader.grid
        r0, r1, c0, c1 = max(r0, g.img_r0), min(r1, g.img_r1), max(c0, g.img_c0), min(c1, g.img_c1)
        regions.append(tuple(g.bounds(r0, c0, r1, c1)))
    regions_km2 = km2(shapely.union_all([shapely.box(*b) for b in regions]), map_crs)
    files = sorted(str(p) for p in images.glob("*.tif"))
    disk = files_on_disk(files)
    under, touched = block_bytes_under(files, regions, map_crs)
    read = imagery_bytes[0]
    return {
        "map_km2": map_km2, "map_crs": map_crs.to_string(), "map_res": map_res, "bytes_read_total": total,
        "bytes_read": read, "bytes_per_km2": read / map_km2, "total_bytes_per_km2": total / map_km2,
        "strips_km2": regions_km2, "block_bytes_under_strips": under, "files_under_strips": touched,
        "file_bytes": disk["bytes"], "files": disk["files"], "file_km2": disk["km2"],
        "file_bytes_per_km2": disk["bytes"] / disk["km2"], "fraction_of_files_read": read / disk["bytes"],
        "checkpoint_bytes": os.path.getsize(ckpt),
    }  # fmt: skip


def print_imagery_reads(r: dict) -> None:
    print(
        f"bytes read, imagery by predict_map (synchronous, stand-in model) over {r['map_km2']:.2f} km² of map "
        f"({r['map_crs']}, {r['map_res']:.3f} m pixels): {_mb(r['bytes_read'])} = {_mb(r['bytes_per_km2'])}/km² "
        f"of map vs {_mb(r['file_bytes_per_km2'])}/km² on disk ({r['files']} files, {_mb(r['file_bytes'])} for "
        f"{r['file_km2']:.1f} km², overlapping), {100 * r['fraction_of_files_read']:.1f} % of the imagery (its "
        f"blocks under the {r['strips_km2']:.2f} km² the strips asked for, halo included: "
        f"{_mb(r['block_bytes_under_strips'])} in {r['files_under_strips']} files)"
    )
    print(
        f"  the whole predict_map process read {_mb(r['total_bytes_per_km2'])}/km² of map (also the checkpoint, "
        f"{_mb(r['checkpoint_bytes'])}, the block files read back and the COG assembly)"
    )

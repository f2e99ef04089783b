"""The map on disk: block files, the resume manifest, and the final COG with its legend.

1. **Block files.** Each finished block is a small GeoTIFF ``MAP.tif.partial/blocks/rRRRRR_cCCCCC.tif``
   (band 1 class codes, band 2 confidence), written under a temporary name and renamed
   (:func:`write_block`): each block has its own file, so no file is written by two processes.
2. **Resume.** ``MAP.tif.partial/manifest.json`` records the parameters (:func:`fingerprint`:
   checkpoint and imagery files with size and mtime, grid, windows, block size, codes, AOI hash).
   Re-running the same command skips finished blocks (:func:`prepare_partial`); different
   parameters start over.
3. **COG.** The blocks are mosaicked (GDAL VRT) and copied to a COG with internal ``mode``
   overviews, a colour table, category names (``MAP.tif.aux.xml``), the :data:`LEGEND_TAG` tag,
   and ``MAP.qml`` for QGIS (:func:`write_map`; the GDAL side is :mod:`lcmap.pipeline.cog`).
   ``MAP.tif`` appears only when done; with confidence, ``MAP_confidence.tif`` too.
4. **A full disk** is recognised by errno (or GDAL's message, which has no errno) and reported
   with the space a map of this size needs (:func:`space_error`).
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
import rasterio.errors
from rasterio.transform import Affine

from lcmap.errors import DiskFullError, LcmapInputError
from lcmap.geodata.legends import MAP_NODATA, Legend
from lcmap.pipeline import cog
from lcmap.pipeline.inference import PredictJob
from lcmap.pipeline.tiling import CONFIDENCE_NODATA, Block, OutputGrid

log = logging.getLogger(__name__)

__all__ = [
    "LEGEND_TAG",
    "MANIFEST_VERSION",
    "GDAL_CACHE_BYTES",
    "confidence_path",
    "block_path",
    "write_block",
    "fingerprint",
    "prepare_partial",
    "write_map",
    "is_enospc",
    "space_error",
]

LEGEND_TAG = cog.LEGEND_TAG
MANIFEST_VERSION = 2  # 2: --legend target sums LR-class probabilities per target class
#: GDAL block cache while predicting blocks and writing the COG (bytes).
GDAL_CACHE_BYTES = 64 * 1024 * 1024


def confidence_path(out: Path) -> Path:
    """``MAP_confidence.tif`` for ``MAP.tif``."""
    return out.with_name(out.stem + "_confidence" + out.suffix)


# ------------------------------------------------------------------------------ block files
def block_path(blocks_dir: str | Path, block: Block) -> Path:
    """The file of one finished block."""
    return Path(blocks_dir) / f"{block.name}.tif"


def write_block(path: Path, grid: OutputGrid, block: Block, codes: np.ndarray, conf: np.ndarray | None) -> Path:
    """Write one finished block atomically: band 1 ``codes`` (h, w), band 2 ``conf`` (h, w) if given,
    both in ``codes``' dtype.

    Raises:
        DiskFullError: no space left (the temporary file is removed).
    """
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.tif")
    g = grid
    profile = {
        "driver": "GTiff",
        "width": block.width,
        "height": block.height,
        "count": 2 if conf is not None else 1,
        "dtype": codes.dtype.name,
        "crs": g.crs,
        "transform": g.transform * Affine.translation(block.c0, block.r0),
        "compress": "ZSTD",
        "zstd_level": 1,
    }
    if block.width >= 256 and block.height >= 256:
        profile.update(tiled=True, blockxsize=256, blockysize=256)
    try:
        with rasterio.open(tmp, "w", **profile) as dst:
            dst.write(codes, 1)
            if conf is not None:
                dst.write(conf.astype(codes.dtype), 2)
        os.replace(tmp, path)
    except Exception as exc:
        if tmp.exists():
            tmp.unlink()
        if is_enospc(exc):
            raise DiskFullError(f"No space left on device writing {path}") from exc
        raise
    return path


# ------------------------------------------------------------------------- manifest, resume
def _files_fingerprint(files: Sequence[str]) -> list[list]:
    out = []
    for f in files:
        s = os.stat(f)
        out.append([os.path.abspath(f), s.st_size, s.st_mtime_ns])
    return out


def fingerprint(job: PredictJob) -> dict[str, Any]:
    """The manifest: everything that makes a block file valid for ``job`` (JSON types only)."""
    grid, lut, group = job.grid, job.code_lut, job.class_group
    found = {
        "version": MANIFEST_VERSION,
        "checkpoint": _files_fingerprint([job.checkpoint])[0],
        "images": _files_fingerprint(job.image_files),
        "grid": [grid.crs_wkt, grid.x0, grid.y0, grid.res_x, grid.res_y, grid.width, grid.height],
        "tile_px": job.windows.tile,
        "overlap_px": job.windows.overlap,
        "block_size": job.block_size,
        "code_lut": list(lut),
        "class_group": list(group) if group is not None else None,
        "dtype": job.dtype,
        "confidence": bool(job.confidence),
        "aoi_sha256": hashlib.sha256(job.aoi_wkb).hexdigest() if job.aoi_wkb else None,
        "tta": job.tta,
    }
    return json.loads(json.dumps(found))


def prepare_partial(partial: Path, manifest_data: dict[str, Any], blocks_dir: Path, bands: int) -> set[str]:
    """Create/reuse ``MAP.tif.partial``; return the names of blocks already finished.

    A folder made with another manifest is removed; block files that do not open with ``bands``
    bands (cut short) and temporary files are deleted.

    Raises:
        LcmapInputError: ``partial`` exists but is not an unfinished lcmap map.
    """
    manifest = partial / "manifest.json"
    if partial.exists():
        old = None
        if manifest.is_file():
            try:
                old = json.loads(manifest.read_text())
            except (OSError, json.JSONDecodeError):
                old = None
        elif any(p for p in partial.iterdir() if p.name != "blocks"):
            raise LcmapInputError(
                f"{partial} exists and is not an unfinished lcmap map (no manifest.json): move it away "
                "or choose another --out"
            )
        if old != manifest_data:
            log.info("%s was made with other parameters: starting over", partial)
            shutil.rmtree(partial)
    blocks_dir.mkdir(parents=True, exist_ok=True)
    if not manifest.is_file():
        tmp = manifest.with_name(".manifest.json.tmp")
        tmp.write_text(json.dumps(manifest_data, indent=1))
        os.replace(tmp, manifest)
    done = set()
    for p in blocks_dir.glob("r*_c*.tif"):
        try:
            with rasterio.open(p) as src:
                if src.count == bands:
                    done.add(p.stem)
                    continue
        except rasterio.errors.RasterioError:
            pass
        p.unlink()
    for p in blocks_dir.glob(".*.tmp.tif"):
        p.unlink()
    return done


# ----------------------------------------------------------------------------------- COG
def write_map(
    job: PredictJob,
    blocks: list[Block],
    out: Path,
    partial: Path,
    out_legend: Legend,
    model_legend: Legend,
    console: Any | None = None,
) -> None:
    """Mosaic the block files into ``out`` (COG, mode overviews, colours, category names, tags,
    ``MAP.qml``) and, with ``job.confidence``, ``MAP_confidence.tif`` (average overviews).

    ``console``: a rich console to say what is being written, or None.
    """
    g = job.grid
    colormap, names, entries = cog.map_categories(out_legend)
    tags = {
        LEGEND_TAG: cog.legend_tag(out_legend),
        "LCMAP_MODEL": Path(job.checkpoint).name,
        "LCMAP_MODEL_LEGEND": model_legend.name,
        "LCMAP_TILE_PX": str(job.windows.tile),
        "LCMAP_OVERLAP_PX": str(job.windows.overlap),
        "LCMAP_TTA": job.tta,
    }
    sources = [cog.VrtSource(str(block_path(job.blocks_dir, b)), 1, b.c0, b.r0, b.width, b.height) for b in blocks]
    common: dict[str, Any] = dict(width=g.width, height=g.height, crs=g.crs, transform=g.transform)
    vrt = cog.write_mosaic_vrt(
        partial / "map.vrt",
        dtype=job.dtype,
        nodata=MAP_NODATA,
        sources=sources,
        colormap=colormap,
        category_names=names,
        tags=tags,
        description="land cover class",
        **common,
    )
    if job.confidence:
        conf_out = confidence_path(out)
        csources = [cog.VrtSource(s.path, 2, s.xoff, s.yoff, s.width, s.height) for s in sources]
        cvrt = cog.write_mosaic_vrt(
            partial / "confidence.vrt",
            dtype="uint8",
            nodata=CONFIDENCE_NODATA,
            sources=csources,
            tags={
                "LCMAP_CONFIDENCE": "maximum blended class probability, percent (0-100); 255 = nodata",
                "LCMAP_MODEL": Path(job.checkpoint).name,
                "LCMAP_TTA": job.tta,
            },
            description="confidence (%)",
            **common,
        )
        if console:
            console.print(f"writing {conf_out.name} (COG, average overviews)")
        cog.write_cog(cvrt, conf_out, resampling="average", predictor=True)
    if console:
        console.print(f"writing {out.name} (COG, mode overviews)")
    cog.write_cog(vrt, out, resampling="mode", sidecars={".qml": cog.write_qml(entries)})


# ------------------------------------------------------------------------------ full disk
def is_enospc(exc: BaseException | None) -> bool:
    """Whether ``exc`` (or an exception it was raised from) means "no space left on device"."""
    seen = 0
    while exc is not None and seen < 10:
        if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
            return True
        # GDAL reports a full disk as a CPLE_FileIO error without errno: its message is all there is
        text = str(exc)
        if "No space left on device" in text or "Free disk space available" in text:
            return True
        exc = exc.__cause__ or exc.__context__
        seen += 1
    return False


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1024 or unit == "TB":
            return f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"


def space_error(job: PredictJob, out: Path, partial: Path, exc: BaseException) -> DiskFullError:
    """The error to raise when the disk filled up while making ``out``: how much space is needed."""
    g = job.grid
    per_px = np.dtype(job.dtype).itemsize * (2 if job.confidence else 1)
    raw = g.width * g.height * per_px
    upper = raw * (1 + 4 / 3 + 1 / 3)  # block files + COG with overviews + GDAL's overview temp
    try:
        free: float = shutil.disk_usage(out.parent).free
    except OSError:
        free = float("nan")
    return DiskFullError(
        f"the disk is full while writing {out} ({exc}). A {g.width} x {g.height} px map needs at "
        f"most about {_fmt_bytes(upper)} free in {out.parent} (uncompressed: block files, the COG with "
        f"overviews and GDAL's temporary overview file; compressed it is usually 3-10x less); "
        f"{_fmt_bytes(free)} is free now. Free some space (or choose another --out) and run the same "
        f"command again: finished blocks in {partial} are kept."
    )

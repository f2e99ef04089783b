"""``lcmap predict``: a seamless land-cover map over any area, as a QGIS-ready COG.

How a map is made
-----------------
1. **Output grid.** The imagery's CRS and pixel size; extent = imagery extent ∩ AOI bounds,
   snapped outwards to the imagery's pixel grid. Pixels outside the AOI polygon (pixel centre
   test) or where the imagery is nodata / not covered are written as nodata (0).
2. **Windows.** One global grid of model windows anchored at the output's top-left pixel:
   windows of ``tile_px`` at a stride of ``tile_px - overlap_px``, so neighbours share exactly
   ``overlap_px`` rows/columns. Windows that overhang the imagery's extent are filled by mirror
   reflection so the model always sees ``tile_px`` x ``tile_px``.
3. **Blending.** Softmax probabilities (mean of the model's heads) are averaged with a weight that
   is 1 except inside the overlap, where it follows a Hann (sin²) ramp whose two halves add up to
   exactly 1, floored at :data:`TAPER_FLOOR` (never 0); a window side on the output raster's own
   edge is not tapered. The blended probabilities give the class (argmax) and the confidence.
   With ``legend="target"`` a target class's probability is the sum of its LR classes' (e.g.
   NLCD 52 + 71 + 81 + 82 + ... for low vegetation), so the map holds the most probable *target*
   class, not the target of the most probable LR class.
4. **Blocks.** The output is cut into square blocks of a whole number of window strides (about
   ``block_px``); each block is one task (Dask ``client.submit``, no ``map_overlap``): it lists
   the global windows that touch it, reads their imagery itself (its halo included), runs the
   model in batches of ``batch_size`` windows and blends in a rolling buffer of ``tile_px`` rows
   (memory does not grow with the block or the area). Every pixel sums the same windows in the
   same global order whatever the block size or the schedule, and batches are always padded to
   ``batch_size``, so the map is bit-identical for any ``block_px`` and any scheduler.
5. **Resume.** Each finished block is a small GeoTIFF in ``MAP.tif.partial/blocks/``, written
   under a temporary name and renamed; ``MAP.tif.partial/manifest.json`` records the parameters.
   Re-running the same command skips finished blocks; different parameters start over.
6. **COG.** The blocks are mosaicked (GDAL VRT) and copied to a COG with internal ``mode``
   overviews, a colour table, category names (``MAP.tif.aux.xml``), the ``LCMAP_LEGEND`` tag,
   and ``MAP.qml`` for QGIS (see :mod:`lcmap.pipeline.cog`). ``MAP.tif`` appears only when done.

The model is loaded once per worker process (a per-process cache keyed by checkpoint, device and
imagery), never shipped inside tasks. The imagery and checkpoint paths must be readable by every
worker, and the output folder writable by them (block files are written by the workers; each
block has its own file, so no file is ever written by two processes).
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import math
import os
import shutil
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
import shapely
import torch
from rasterio.crs import CRS
from rasterio.transform import Affine, from_origin

from lcmap.geodata.aoi import AOI, resolve_aoi
from lcmap.geodata.datasets import HRImagery, open_imagery, read_imagery
from lcmap.errors import DiskFullError, LcmapInputError
from lcmap.geodata.legends import IGNORE_INDEX, MAP_NODATA, Legend, target_legend
from lcmap.models import predict_proba, sum_probabilities
from lcmap.pipeline import cog
from lcmap.pipeline.runs import TrainedModel, load_trained_model, resolve_checkpoint

log = logging.getLogger(__name__)

__all__ = [
    "predict_map",
    "OutputGrid",
    "WindowGrid",
    "Block",
    "PredictJob",
    "plan_prediction",
    "predict_block",
    "CONFIDENCE_NODATA",
    "TAPER_FLOOR",
    "LEGEND_TAG",
    "LAST_RUN",
]

#: Nodata of the confidence map (valid values are 0-100, percent).
CONFIDENCE_NODATA = 255
#: Smallest blending weight (the taper never reaches 0).
TAPER_FLOOR = 1e-3
#: ``tile_px`` must be a multiple of this (U-Net: 32; Paraformer-tiny: 16).
TILE_MULTIPLE = 32
#: Dataset tag holding the legend the map's codes are in (JSON of ``Legend.to_dict()``).
LEGEND_TAG = "LCMAP_LEGEND"
MANIFEST_VERSION = 2  # 2: --legend target sums LR-class probabilities per target class
#: GDAL block cache while predicting blocks and writing the COG (bytes).
GDAL_CACHE_BYTES = 64 * 1024 * 1024

#: Statistics of the last :func:`predict_map` call in this process (blocks, windows, seconds).
LAST_RUN: dict[str, Any] = {}


# ----------------------------------------------------------------------------------- grids
@dataclass(frozen=True)
class OutputGrid:
    """The output raster: CRS, top-left corner, pixel size (CRS units) and size (pixels).

    ``img_*``: the imagery's extent in output pixel coordinates (columns/rows from the output's
    top-left pixel; ``img_c0``/``img_r0`` <= 0), used to clip reads and mirror-pad beyond it.
    """

    crs_wkt: str
    x0: float
    y0: float
    res_x: float
    res_y: float
    width: int
    height: int
    img_c0: int
    img_r0: int
    img_c1: int
    img_r1: int

    @property
    def transform(self) -> Affine:
        return from_origin(self.x0, self.y0, self.res_x, self.res_y)

    @property
    def crs(self) -> CRS:
        return CRS.from_wkt(self.crs_wkt)

    def bounds(self, r0: int, c0: int, r1: int, c1: int) -> tuple[float, float, float, float]:
        """(xmin, ymin, xmax, ymax) in CRS units of output pixel rows [r0, r1) and cols [c0, c1)."""
        return (self.x0 + c0 * self.res_x, self.y0 - r1 * self.res_y,
                self.x0 + c1 * self.res_x, self.y0 - r0 * self.res_y)


@dataclass(frozen=True)
class WindowGrid:
    """The global grid of model windows over an output of ``height`` x ``width`` pixels.

    Window ``(i, j)`` covers rows ``[i*stride, i*stride + tile)`` and columns
    ``[j*stride, j*stride + tile)``; ``stride = tile - overlap``. There are just enough windows
    to cover the output; the last ones may overhang it.
    """

    tile: int
    overlap: int
    height: int
    width: int

    @property
    def stride(self) -> int:
        return self.tile - self.overlap

    def count(self, length: int) -> int:
        if length <= self.tile:
            return 1
        return math.ceil((length - self.tile) / self.stride) + 1

    @property
    def n_rows(self) -> int:
        return self.count(self.height)

    @property
    def n_cols(self) -> int:
        return self.count(self.width)

    def touching(self, lo: int, hi: int, n: int) -> range:
        """Indices of the windows (along one axis, ``n`` in all) that touch pixels [lo, hi)."""
        first = max(0, (lo - self.tile) // self.stride + 1)
        last = min(n - 1, (hi - 1) // self.stride)
        return range(first, last + 1)

    def taper(self, index: int, n: int) -> np.ndarray:
        """1-D blending weight of window ``index`` of ``n`` (float32, length ``tile``).

        1 in the middle; a sin² ramp over the ``overlap`` pixels shared with a neighbour (the
        two neighbours' ramps add up to 1), floored at :data:`TAPER_FLOOR`; no ramp on a side
        that is the raster's own edge (first/last window).
        """
        w = np.ones(self.tile, np.float64)
        o = self.overlap
        if o > 0:
            t = (np.arange(o) + 0.5) / o
            ramp = np.maximum(np.sin(0.5 * np.pi * t) ** 2, TAPER_FLOOR)
            if index > 0:
                w[:o] = ramp
            if index < n - 1:
                w[-o:] = ramp[::-1]
        return w.astype(np.float32)


@dataclass(frozen=True)
class Block:
    """One task: output rows ``[r0, r0 + height)`` and columns ``[c0, c0 + width)``."""

    row: int
    col: int
    r0: int
    c0: int
    height: int
    width: int

    @property
    def name(self) -> str:
        return f"r{self.row:05d}_c{self.col:05d}"


@dataclass(frozen=True)
class PredictJob:
    """Everything a worker needs for any block (small: broadcast once to every worker)."""

    checkpoint: str
    image_files: tuple[str, ...]
    device: str
    torch_threads: int | None
    grid: OutputGrid
    windows: WindowGrid
    block_size: int
    batch_size: int
    code_lut: tuple[int, ...]
    dtype: str
    #: model output channel -> map channel whose probability it adds to (``--legend target``: the
    #: channel of its target class); None keeps the model's channels (``--legend native``).
    class_group: tuple[int, ...] | None
    confidence: bool
    aoi_wkb: bytes | None
    blocks_dir: str
    cache_key: str = ""

    def blocks(self) -> list[Block]:
        g, b = self.grid, self.block_size
        out = []
        for bi, r0 in enumerate(range(0, g.height, b)):
            for bj, c0 in enumerate(range(0, g.width, b)):
                out.append(Block(bi, bj, r0, c0, min(b, g.height - r0), min(b, g.width - c0)))
        return out

    def block_path(self, block: Block) -> Path:
        return Path(self.blocks_dir) / f"{block.name}.tif"


@dataclass
class Plan:
    """A checked prediction: the job, the legend of the output codes, and where things go."""

    job: PredictJob
    out: Path
    partial: Path
    out_legend: Legend
    model_legend: Legend
    fingerprint: dict[str, Any]
    model: TrainedModel | None = field(default=None, repr=False)
    imagery: HRImagery | None = field(default=None, repr=False)


# ------------------------------------------------------------------------- worker state
@dataclass
class _State:
    model: torch.nn.Module
    device: torch.device
    mean: np.ndarray  # (C, 1, 1) float32
    std: np.ndarray
    imagery: HRImagery
    aoi: shapely.Geometry | None = None
    aoi_key: bytes | None = None


_STATE: dict[tuple, _State] = {}
_STATE_LOCK = threading.Lock()


def _worker_device(device: str) -> torch.device:
    if device == "cuda" and torch.cuda.device_count() > 1:
        try:  # one GPU per worker of a LocalCluster (worker names 0..n-1)
            from distributed import get_worker

            return torch.device(f"cuda:{int(get_worker().name) % torch.cuda.device_count()}")
        except (ImportError, ValueError, TypeError):
            pass
    return torch.device(device)


def _state(job: PredictJob, preloaded: TrainedModel | None = None, imagery: HRImagery | None = None) -> _State:
    """This process's model and imagery for ``job`` (loaded on first use, then cached)."""
    key = (job.checkpoint, job.device, job.image_files, job.cache_key)
    with _STATE_LOCK:
        st = _STATE.get(key)
        if st is None:
            if job.torch_threads:
                torch.set_num_threads(job.torch_threads)
            device = _worker_device(job.device)
            tm = preloaded if preloaded is not None else load_trained_model(job.checkpoint, "cpu")
            model = tm.model.to(device).eval()
            ds = imagery if imagery is not None else open_imagery(list(job.image_files))
            _STATE.clear()  # one job per process at a time: free the previous model
            st = _State(model=model, device=device, mean=tm.mean.reshape(-1, 1, 1).astype(np.float32),
                        std=tm.std.reshape(-1, 1, 1).astype(np.float32), imagery=ds)
            _STATE[key] = st
        if st.aoi_key != job.aoi_wkb:
            st.aoi = shapely.from_wkb(job.aoi_wkb) if job.aoi_wkb else None
            if st.aoi is not None:
                shapely.prepare(st.aoi)
            st.aoi_key = job.aoi_wkb
    return st


# --------------------------------------------------------------------------- one block
def _block_aoi_mask(st: _State, job: PredictJob, block: Block) -> np.ndarray:
    from lcmap.geodata.aoi import rasterize_aoi

    g = job.grid
    shape = (block.height, block.width)
    if st.aoi is None:
        return np.ones(shape, bool)
    xmin, ymin, xmax, ymax = g.bounds(block.r0, block.c0, block.r0 + block.height, block.c0 + block.width)
    box = shapely.box(xmin, ymin, xmax, ymax)
    if st.aoi.contains(box):
        return np.ones(shape, bool)
    if not st.aoi.intersects(box):
        return np.zeros(shape, bool)
    part = shapely.clip_by_rect(st.aoi, xmin - g.res_x, ymin - g.res_y, xmax + g.res_x, ymax + g.res_y)
    return rasterize_aoi(part, from_origin(xmin, ymax, g.res_x, g.res_y), shape)


def _read_strip(st: _State, job: PredictJob, r0: int, r1: int, c0: int, c1: int) -> tuple[np.ndarray, np.ndarray, int, int]:
    """Normalised imagery and validity for output rows [r0, r1) x cols [c0, c1), clipped to the
    imagery extent; returns ``(image (C,h,w), valid (h,w), row0, col0)`` of what was read."""
    g = job.grid
    r0, r1 = max(r0, g.img_r0), min(r1, g.img_r1)
    c0, c1 = max(c0, g.img_c0), min(c1, g.img_c1)
    image, valid = read_imagery(st.imagery, *g.bounds(r0, c0, r1, c1))
    h, w = r1 - r0, c1 - c0
    if image.shape[1:] != (h, w):  # defensive: rounding in the reader
        fixed = np.full((image.shape[0], h, w), st.imagery.nodata, np.float32)
        fv = np.zeros((h, w), bool)
        hh, ww = min(h, image.shape[1]), min(w, image.shape[2])
        fixed[:, :hh, :ww] = image[:, :hh, :ww]
        fv[:hh, :ww] = valid[:hh, :ww]
        image, valid = fixed, fv
    image = (image - st.mean) / st.std
    # imagery nodata inside the extent (gaps between mosaic files, nodata holes) -> the band mean,
    # i.e. 0 after normalisation, not the raw nodata value (~ -3 sigma: an input never seen on land)
    image = np.where(valid[None], image, 0.0)
    return image.astype(np.float32, copy=False), valid, r0, c0


def _window_tile(job: PredictJob, strip: np.ndarray, sr0: int, sc0: int, i: int, j: int) -> np.ndarray:
    """Window (i, j) cut from a strip, mirror-padded beyond the imagery extent to tile x tile."""
    g, wg = job.grid, job.windows
    T, S = wg.tile, wg.stride
    wr0, wc0 = i * S, j * S
    ra, rb = max(wr0, g.img_r0), min(wr0 + T, g.img_r1)
    ca, cb = max(wc0, g.img_c0), min(wc0 + T, g.img_c1)
    tile = strip[:, ra - sr0:rb - sr0, ca - sc0:cb - sc0]
    pads = ((0, 0), (ra - wr0, wr0 + T - rb), (ca - wc0, wc0 + T - cb))
    if any(p for pair in pads for p in pair):
        tile = np.pad(tile, pads, mode="reflect" if min(tile.shape[1:]) > 1 else "edge")
    return np.ascontiguousarray(tile)


class _Blender:
    """Rolling accumulator of weighted probabilities over a block, ``tile`` rows at a time."""

    def __init__(self, job: PredictJob, block: Block, need: np.ndarray, device: torch.device, n_classes: int):
        self.job, self.block, self.need = job, block, need
        self.T = job.windows.tile
        self.device = device
        self.acc = torch.zeros((n_classes, self.T, block.width), dtype=torch.float32, device=device)
        self.wsum = torch.zeros((self.T, block.width), dtype=torch.float32, device=device)
        self.buf_r: int | None = None  # output row of buffer row 0
        self.fin = block.r0  # next output row to finalise
        self.lut = torch.tensor(job.code_lut, dtype=torch.int64, device=device)
        self.codes = np.full((block.height, block.width), MAP_NODATA, dtype=job.dtype)
        self.conf = (np.full((block.height, block.width), CONFIDENCE_NODATA, np.uint8)
                     if job.confidence else None)
        self._weights: dict[tuple[int, int], torch.Tensor] = {}
        self.n_rows, self.n_cols = job.windows.n_rows, job.windows.n_cols

    def _weight(self, i: int, j: int) -> torch.Tensor:
        wg = self.job.windows
        key = (0 if i == 0 else 1) + (2 if i == self.n_rows - 1 else 0), (0 if j == 0 else 1) + (2 if j == self.n_cols - 1 else 0)
        w = self._weights.get(key)
        if w is None:
            wy = wg.taper(i, self.n_rows)
            wx = wg.taper(j, self.n_cols)
            w = torch.from_numpy(np.outer(wy, wx).astype(np.float32)).to(self.device)
            self._weights[key] = w
        return w

    def _finalise(self, upto: int) -> None:
        """Write output rows [fin, upto) (those in the buffer; others are not needed)."""
        b = self.block
        end = min(upto, b.r0 + b.height)
        if self.buf_r is not None:
            a = max(self.fin, self.buf_r)
            z = min(end, self.buf_r + self.T)
            if z > a:
                acc = self.acc[:, a - self.buf_r:z - self.buf_r]
                top, arg = acc.max(dim=0)
                rows = slice(a - b.r0, z - b.r0)
                need = self.need[rows]
                codes = self.lut[arg].cpu().numpy().astype(self.job.dtype)
                self.codes[rows] = np.where(need, codes, MAP_NODATA)
                if self.conf is not None:
                    wsum = self.wsum[a - self.buf_r:z - self.buf_r].clamp_min(1e-12)
                    pct = torch.round(top / wsum * 100.0).clamp(0, 100).to(torch.uint8).cpu().numpy()
                    self.conf[rows] = np.where(need, pct, CONFIDENCE_NODATA)
        self.fin = max(self.fin, end)

    def add(self, i: int, j: int, probs: torch.Tensor) -> None:
        """Blend window (i, j)'s probabilities ``(K, T, T)``; windows must come in (i, j) order."""
        T, S = self.T, self.job.windows.stride
        b = self.block
        wr0, wc0 = i * S, j * S
        if self.buf_r is None or wr0 != self.buf_r:
            self._finalise(wr0)
            shift = T if self.buf_r is None else wr0 - self.buf_r
            if shift < T:
                self.acc[:, :T - shift] = self.acc[:, shift:].clone()
                self.wsum[:T - shift] = self.wsum[shift:].clone()
                self.acc[:, T - shift:] = 0
                self.wsum[T - shift:] = 0
            else:
                self.acc.zero_()
                self.wsum.zero_()
            self.buf_r = wr0
        ra, rb = max(wr0, b.r0), min(wr0 + T, b.r0 + b.height)
        ca, cb = max(wc0, b.c0), min(wc0 + T, b.c0 + b.width)
        w = self._weight(i, j)[ra - wr0:rb - wr0, ca - wc0:cb - wc0]
        p = probs[:, ra - wr0:rb - wr0, ca - wc0:cb - wc0]
        # mul and add as two separately rounded operations: identical for every block layout
        self.acc[:, ra - wr0:rb - wr0, ca - b.c0:cb - b.c0] += p * w
        self.wsum[ra - wr0:rb - wr0, ca - b.c0:cb - b.c0] += w

    def finish(self) -> tuple[np.ndarray, np.ndarray | None]:
        self._finalise(self.block.r0 + self.block.height)
        return self.codes, self.conf


def predict_block(st: _State, job: PredictJob, block: Block) -> tuple[np.ndarray, np.ndarray | None, dict]:
    """Class codes (and confidence) of one block.

    Returns:
        ``(codes, conf | None, stats)``; ``stats``: ``windows`` (windows run) and
        ``seconds_forward`` (time inside the model; meaningful on CPU only).
    """
    wg = job.windows
    T, S = wg.tile, wg.stride
    b = block
    need = _block_aoi_mask(st, job, b)
    codes = np.full((b.height, b.width), MAP_NODATA, dtype=job.dtype)
    conf = np.full((b.height, b.width), CONFIDENCE_NODATA, np.uint8) if job.confidence else None
    if not need.any():
        return codes, conf, {"windows": 0, "seconds_forward": 0.0}
    rows = wg.touching(b.r0, b.r0 + b.height, wg.n_rows)
    cols = wg.touching(b.c0, b.c0 + b.width, wg.n_cols)
    strip_c0, strip_c1 = cols.start * S, (cols.stop - 1) * S + T
    n_classes = len(job.code_lut)
    group = (torch.tensor(job.class_group, dtype=torch.int64, device=st.device)
             if job.class_group is not None else None)
    blender = _Blender(job, b, need, st.device, n_classes)
    inside = need.copy()

    def strips() -> Iterator[tuple[int, tuple]]:
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="lcmap-read") as pool:
            it = iter(rows)
            nxt = next(it, None)
            fut = pool.submit(_read_strip, st, job, nxt * S, nxt * S + T, strip_c0, strip_c1) if nxt is not None else None
            while fut is not None:
                i = nxt
                data = fut.result()
                nxt = next(it, None)
                fut = pool.submit(_read_strip, st, job, nxt * S, nxt * S + T, strip_c0, strip_c1) if nxt is not None else None
                yield i, data

    def windows() -> Iterator[tuple[int, int, np.ndarray]]:
        for i, (strip, valid, sr0, sc0) in strips():
            # validity of the block rows this strip covers
            ra, rb = max(i * S, b.r0), min(i * S + T, b.r0 + b.height)
            v = valid[ra - sr0:rb - sr0, b.c0 - sc0:b.c0 - sc0 + b.width]
            need[ra - b.r0:rb - b.r0] = inside[ra - b.r0:rb - b.r0] & v
            for j in cols:
                ca, cb = max(j * S, b.c0), min(j * S + T, b.c0 + b.width)
                if not need[ra - b.r0:rb - b.r0, ca - b.c0:cb - b.c0].any():
                    continue  # no pixel of this block inside the AOI with valid imagery
                yield i, j, _window_tile(job, strip, sr0, sc0, i, j)

    n_run = 0
    forward = [0.0]
    batch: list[tuple[int, int, np.ndarray]] = []

    def run(batch: list[tuple[int, int, np.ndarray]]) -> None:
        tiles = [t for _, _, t in batch]
        tiles += [tiles[-1]] * (job.batch_size - len(tiles))  # fixed batch shape: reproducible
        x = torch.from_numpy(np.stack(tiles)).to(st.device)
        with torch.inference_mode():
            t0 = time.perf_counter()
            probs = predict_proba(st.model, x).float()
            if group is not None:  # P(target class) = sum of its LR classes' probabilities
                probs = sum_probabilities(probs, group, n_classes)
            forward[0] += time.perf_counter() - t0
            for k, (i, j, _) in enumerate(batch):
                blender.add(i, j, probs[k])

    with torch.inference_mode():
        for item in windows():
            batch.append(item)
            if len(batch) == job.batch_size:
                run(batch)
                n_run += len(batch)
                batch = []
        if batch:
            run(batch)
            n_run += len(batch)
        codes, conf = blender.finish()
    return codes, conf, {"windows": n_run, "seconds_forward": forward[0]}


def _is_enospc(exc: BaseException | None) -> bool:
    seen = 0
    while exc is not None and seen < 10:
        if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
            return True
        text = str(exc)
        if "No space left on device" in text or "Free disk space available" in text:
            return True
        exc = exc.__cause__ or exc.__context__
        seen += 1
    return False


def _write_block(job: PredictJob, block: Block, codes: np.ndarray, conf: np.ndarray | None) -> Path:
    """Write one finished block (band 1 codes, band 2 confidence) atomically."""
    path = job.block_path(block)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.tif")
    g = job.grid
    profile = {
        "driver": "GTiff", "width": block.width, "height": block.height, "count": 2 if conf is not None else 1,
        "dtype": job.dtype, "crs": g.crs, "transform": g.transform * Affine.translation(block.c0, block.r0),
        "compress": "ZSTD", "zstd_level": 1,
    }
    if block.width >= 256 and block.height >= 256:
        profile.update(tiled=True, blockxsize=256, blockysize=256)
    try:
        with rasterio.open(tmp, "w", **profile) as dst:
            dst.write(codes, 1)
            if conf is not None:
                dst.write(conf.astype(job.dtype), 2)
        os.replace(tmp, path)
    except Exception as exc:
        if tmp.exists():
            tmp.unlink()
        if _is_enospc(exc):
            raise DiskFullError(f"No space left on device writing {path}") from exc
        raise
    return path


def _run_block(job: PredictJob, block: Block) -> dict[str, Any]:
    """The task: predict one block and write its file; returns small statistics."""
    t0 = time.perf_counter()
    # a fixed GDAL block cache (default: 5% of RAM), so that memory does not grow with the area read
    with rasterio.Env(GDAL_CACHEMAX=GDAL_CACHE_BYTES):
        st = _state(job)
        codes, conf, stats = predict_block(st, job, block)
        _write_block(job, block, codes, conf)
    return {"block": block.name, "seconds": time.perf_counter() - t0, **stats}


# ------------------------------------------------------------------------------ planning
def _files_fingerprint(files: Sequence[str]) -> list[list]:
    out = []
    for f in files:
        s = os.stat(f)
        out.append([os.path.abspath(f), s.st_size, s.st_mtime_ns])
    return out


def _check_output_folder(out: Path) -> None:
    if out.exists() and out.is_dir():
        raise LcmapInputError(f"--out {out} is a folder: give the map's file name, e.g. {out / 'map.tif'}")
    folder = out.parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".lcmap-write-test-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise LcmapInputError(
            f"cannot write to the output folder {folder} ({exc.strerror or exc}). Choose another --out "
            "in a folder you can write to."
        ) from exc


def _output_grid(ds: HRImagery, aoi_geom: shapely.Geometry | None) -> OutputGrid:
    x, y, _ = ds.bounds
    rx, ry = float(ds.res[0]), float(ds.res[1])
    ix0, iy0, ix1, iy1 = float(x.start), float(y.start), float(x.stop), float(y.stop)
    img_w = int(round((ix1 - ix0) / rx))
    img_h = int(round((iy1 - iy0) / ry))
    c0, r0, c1, r1 = 0, 0, img_w, img_h
    if aoi_geom is not None:
        ax0, ay0, ax1, ay1 = aoi_geom.bounds
        eps = 1e-6
        c0 = max(c0, math.floor((ax0 - ix0) / rx + eps))
        c1 = min(c1, math.ceil((ax1 - ix0) / rx - eps))
        r0 = max(r0, math.floor((iy1 - ay1) / ry + eps))
        r1 = min(r1, math.ceil((iy1 - ay0) / ry - eps))
    return OutputGrid(
        crs_wkt=ds.crs.to_wkt(), x0=ix0 + c0 * rx, y0=iy1 - r0 * ry, res_x=rx, res_y=ry,
        width=c1 - c0, height=r1 - r0, img_c0=-c0, img_r0=-r0, img_c1=img_w - c0, img_r1=img_h - r0,
    )


def _code_lut(legend: Legend, mode: str) -> tuple[tuple[int, ...], tuple[int, ...] | None, Legend, str]:
    """Map channels and their codes for ``--legend target|native``.

    Returns:
        ``(code_lut, class_group, out_legend, dtype)``: ``code_lut[c]`` is the code written for map
        channel ``c``; ``class_group[k]`` the map channel that model channel ``k`` adds its
        probability to (None: one map channel per model channel). With ``target``, the map
        channels are the target classes, plus one channel (written as nodata) for LR classes
        without a target: each pixel gets the target class of highest summed probability.
    """
    if mode == "target":
        scheme = legend.target
        group = tuple(int(v) for v in legend.index_to_target_group())
        lut = tuple(c.code for c in scheme.classes) + ((MAP_NODATA,) if len(scheme) in group else ())
        out_legend = target_legend(scheme)
    elif mode == "native":
        if MAP_NODATA in legend.codes:
            raise LcmapInputError(
                f"legend {legend.name!r} has a class coded {MAP_NODATA}, which is the map's nodata "
                "value: write the map with --legend target instead"
            )
        lut = tuple(legend.codes)
        group = None
        out_legend = legend
    else:
        raise LcmapInputError(f"--legend {mode!r}: choose 'target' (common classes) or 'native' (the model's legend)")
    dtype = "uint8" if max(lut + (MAP_NODATA,)) <= 255 else "uint16"
    return lut, group, out_legend, dtype


def _resolve_device(device: str) -> str:
    d = str(device).lower()
    if d == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if d not in ("cpu", "cuda") and not d.startswith("cuda:"):
        raise LcmapInputError(f"--device {device!r}: choose auto, cpu or cuda")
    if d.startswith("cuda") and not torch.cuda.is_available():
        raise LcmapInputError("--device cuda: no CUDA GPU is visible to PyTorch here; use --device cpu")
    return d


def plan_prediction(
    model: str | Path,
    images: str | Path | Sequence[str | Path],
    out: str | Path,
    *,
    bbox: Sequence[float] | None = None,
    bbox_crs: str = "EPSG:4326",
    aoi: str | Path | AOI | None = None,
    tile_px: int = 512,
    overlap_px: int = 64,
    block_px: int = 4096,
    batch_size: int = 4,
    device: str = "auto",
    confidence: bool = False,
    legend: str = "target",
    torch_threads: int | None = None,
) -> Plan:
    """Check every input and work out the grids; writes nothing but a probe file.

    Raises:
        LcmapInputError: on any bad input (see :func:`predict_map`).
    """
    if not isinstance(tile_px, int) or tile_px < TILE_MULTIPLE or tile_px % TILE_MULTIPLE:
        raise LcmapInputError(
            f"--tile-px {tile_px}: the window side must be a positive multiple of {TILE_MULTIPLE} px "
            f"(the networks downsample by {TILE_MULTIPLE}), e.g. 256, 512 or 1024"
        )
    if not isinstance(overlap_px, int) or overlap_px < 0 or 2 * overlap_px > tile_px:
        raise LcmapInputError(
            f"--overlap-px {overlap_px}: must be between 0 and half of --tile-px ({tile_px // 2}); "
            "64 px per side is a good default for 512 px windows"
        )
    if not isinstance(batch_size, int) or batch_size < 1:
        raise LcmapInputError(f"--batch-size {batch_size}: must be at least 1")
    if not isinstance(block_px, int) or block_px < 1:
        raise LcmapInputError(f"--block-px {block_px}: must be a positive number of pixels")
    if legend not in ("target", "native"):
        raise LcmapInputError(f"--legend {legend!r}: choose 'target' (common classes) or 'native' (the model's legend)")
    dev = _resolve_device(device)

    out = Path(out).expanduser().absolute()
    _check_output_folder(out)

    checkpoint = resolve_checkpoint(model)
    tm = load_trained_model(checkpoint, "cpu")
    ds = open_imagery(images)
    if ds.count != tm.in_channels:
        raise LcmapInputError(
            f"the imagery has {ds.count} band(s) ({', '.join(ds.files[:3])}{' ...' if len(ds.files) > 3 else ''}) "
            f"but model {checkpoint} was trained on {tm.in_channels}: use imagery with the same bands, "
            "in the same order, as the training imagery"
        )
    crs = CRS.from_user_input(ds.crs)
    if isinstance(aoi, (str, Path)):
        aoi_obj = resolve_aoi(aoi, tuple(bbox) if bbox is not None else None, bbox_crs)
    elif isinstance(aoi, AOI):
        if bbox is not None:
            raise LcmapInputError("give either --aoi or --bbox, not both")
        aoi_obj = aoi
    else:
        aoi_obj = resolve_aoi(None, tuple(bbox) if bbox is not None else None, bbox_crs)
    x, y, _ = ds.bounds
    img_bounds = (float(x.start), float(y.start), float(x.stop), float(y.stop))
    geom = None
    if aoi_obj is not None:
        aoi_obj.check_overlap(img_bounds, crs, f"the imagery ({ds.files[0]}{' ...' if len(ds.files) > 1 else ''})")
        geom = aoi_obj.to_crs(crs)
    grid = _output_grid(ds, geom)
    if grid.width <= 0 or grid.height <= 0:
        raise LcmapInputError(
            f"the AOI ({aoi_obj.source if aoi_obj else ''}) only touches the imagery's edge: nothing to predict"
        )
    lut, group, out_legend, dtype = _code_lut(tm.legend, legend)
    wg = WindowGrid(tile_px, overlap_px, grid.height, grid.width)
    block_size = max(1, round(block_px / wg.stride)) * wg.stride
    partial = out.with_name(out.name + ".partial")
    aoi_wkb = shapely.to_wkb(geom) if geom is not None else None
    job = PredictJob(
        checkpoint=str(checkpoint.absolute()), image_files=tuple(os.path.abspath(f) for f in ds.files),
        device=dev, torch_threads=torch_threads, grid=grid, windows=wg, block_size=block_size,
        batch_size=batch_size, code_lut=lut, class_group=group, dtype=dtype, confidence=bool(confidence),
        aoi_wkb=aoi_wkb,
        blocks_dir=str(partial / "blocks"),
    )
    fingerprint = {
        "version": MANIFEST_VERSION,
        "checkpoint": _files_fingerprint([job.checkpoint])[0],
        "images": _files_fingerprint(job.image_files),
        "grid": [grid.crs_wkt, grid.x0, grid.y0, grid.res_x, grid.res_y, grid.width, grid.height],
        "tile_px": tile_px, "overlap_px": overlap_px, "block_size": block_size,
        "code_lut": list(lut), "class_group": list(group) if group is not None else None, "dtype": dtype,
        "confidence": bool(confidence),
        "aoi_sha256": hashlib.sha256(aoi_wkb).hexdigest() if aoi_wkb else None,
    }
    fingerprint = json.loads(json.dumps(fingerprint))
    # the per-process model cache must not serve an older checkpoint saved at the same path
    model_key = json.dumps([fingerprint["checkpoint"], fingerprint["images"]])
    job = replace(job, cache_key=hashlib.sha256(model_key.encode()).hexdigest()[:16])
    return Plan(job=job, out=out, partial=partial, out_legend=out_legend, model_legend=tm.legend,
                fingerprint=fingerprint, model=tm, imagery=ds)


# ------------------------------------------------------------------------------ running
def _prepare_partial(plan: Plan) -> set[str]:
    """Create/reuse ``MAP.tif.partial``; return the names of blocks already finished."""
    partial, manifest = plan.partial, plan.partial / "manifest.json"
    blocks_dir = Path(plan.job.blocks_dir)
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
        if old != plan.fingerprint:
            log.info("%s was made with other parameters: starting over", partial)
            shutil.rmtree(partial)
    blocks_dir.mkdir(parents=True, exist_ok=True)
    if not manifest.is_file():
        tmp = manifest.with_name(".manifest.json.tmp")
        tmp.write_text(json.dumps(plan.fingerprint, indent=1))
        os.replace(tmp, manifest)
    done = set()
    expected = 2 if plan.job.confidence else 1
    for p in blocks_dir.glob("r*_c*.tif"):
        try:
            with rasterio.open(p) as src:
                if src.count == expected:
                    done.add(p.stem)
                    continue
        except rasterio.errors.RasterioError:
            pass
        p.unlink()
    for p in blocks_dir.glob(".*.tmp.tif"):
        p.unlink()
    return done


def _km2_per_px(grid: OutputGrid) -> float | None:
    crs = grid.crs
    if not crs.is_projected:
        return None
    try:
        _, factor = crs.linear_units_factor
    except Exception:
        return None
    return grid.res_x * grid.res_y * factor * factor / 1e6


class _Progress:
    """Blocks done, and the area done: pixels inside the AOI (the whole block without an AOI)."""

    def __init__(self, enabled: bool, blocks: list[Block], done: set[str], grid: OutputGrid,
                 aoi_wkb: bytes | None = None):
        self.enabled = enabled
        self.km2_px = _km2_per_px(grid)
        if aoi_wkb is None:
            self.sizes = {b.name: b.height * b.width for b in blocks}
        else:
            geom = shapely.from_wkb(aoi_wkb)
            px_area = grid.res_x * grid.res_y
            self.sizes = {b.name: shapely.box(*grid.bounds(b.r0, b.c0, b.r0 + b.height, b.c0 + b.width))
                          .intersection(geom).area / px_area for b in blocks}
        self.total_px = sum(self.sizes.values())
        self.done_px = sum(self.sizes[n] for n in done if n in self.sizes)
        self.bar = None
        if enabled:
            from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                                       TimeElapsedColumn, TimeRemainingColumn)

            self.bar = Progress(
                TextColumn("[bold]predict[/]"), BarColumn(), MofNCompleteColumn(), TextColumn("blocks"),
                TextColumn("{task.fields[area]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                transient=False,
            )
            self.task = self.bar.add_task("predict", total=len(blocks), completed=len(done), area=self._area())
            self.bar.start()

    def _area(self) -> str:
        if self.km2_px is None:
            return f"{self.done_px / 1e6:.1f}/{self.total_px / 1e6:.1f} Mpx"
        return f"{self.done_px * self.km2_px:,.2f}/{self.total_px * self.km2_px:,.2f} km²"

    def advance(self, name: str) -> None:
        self.done_px += self.sizes.get(name, 0)
        if self.bar is not None:
            self.bar.update(self.task, advance=1, area=self._area())

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()


def _local_cluster_shape(device: str, n_tasks: int) -> tuple[int, int]:
    """(workers, torch threads per worker) for a LocalCluster on this machine."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 1
    if device.startswith("cuda"):
        n = 1 if ":" in device else max(1, torch.cuda.device_count())
    else:
        # single-threaded processes up to 4 cores (intra-op threads that wait on each other are
        # slow as soon as the machine is shared), then 4 torch threads per process (memory)
        per = 1 if cores <= 4 else 4
        n = max(1, cores // per)
    n = max(1, min(n, n_tasks))
    return n, max(1, cores // n)


def _run_synchronous(plan: Plan, todo: list[Block], progress: _Progress, stats: dict) -> None:
    _state(plan.job, preloaded=plan.model, imagery=plan.imagery)
    for block in todo:
        res = _run_block(plan.job, block)
        stats["windows"] += res["windows"]
        stats["seconds_forward"] += res["seconds_forward"]
        stats["blocks_run"] += 1
        progress.advance(block.name)


def _run_distributed(plan: Plan, todo: list[Block], progress: _Progress, stats: dict, scheduler: str | None) -> None:
    from distributed import Client, LocalCluster, as_completed

    job = plan.job
    gpu = job.device.startswith("cuda")
    plan.model = plan.imagery = None  # the workers load their own; free this process's copy
    cluster = None
    if scheduler is None:
        n, threads = _local_cluster_shape(job.device, len(todo))
        job = replace(job, torch_threads=threads)
        cluster = LocalCluster(
            n_workers=n, threads_per_worker=1, processes=True, dashboard_address=None,
            silence_logs=logging.ERROR, resources={"GPU": 1} if gpu else None,
        )
        client = Client(cluster)
    else:
        try:
            client = Client(scheduler, timeout="10s")
        except (OSError, TimeoutError) as exc:
            raise LcmapInputError(f"--scheduler {scheduler}: cannot connect to a Dask scheduler there ({exc})") from exc
    try:
        workers = client.scheduler_info().get("workers", {})
        if gpu and not any(w.get("resources", {}).get("GPU") for w in workers.values()):
            raise LcmapInputError(
                f"--device cuda with --scheduler {scheduler}: no worker declares a GPU resource; start "
                "the workers with 'dask worker ... --resources GPU=1' (one per GPU)"
            )
        slots = max(1, sum(client.nthreads().values()))
        job_future = client.scatter(job, broadcast=True, hash=False)
        token = uuid.uuid4().hex[:8]
        pending = iter(todo)
        ac = as_completed()
        extra = {"resources": {"GPU": 1}} if gpu else {}

        def submit() -> bool:
            block = next(pending, None)
            if block is None:
                return False
            ac.add(client.submit(_run_block, job_future, block, key=f"lcmap-block-{block.name}-{token}",
                                 pure=False, **extra))
            return True

        for _ in range(2 * slots):  # a few blocks in flight per worker thread, not all of them
            if not submit():
                break
        for fut in ac:
            res = fut.result()
            fut.release()
            stats["windows"] += res["windows"]
            stats["seconds_forward"] += res["seconds_forward"]
            stats["blocks_run"] += 1
            progress.advance(res["block"])
            submit()
    finally:
        client.close()
        if cluster is not None:
            cluster.close()


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1024 or unit == "TB":
            return f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"


def _space_error(plan: Plan, exc: BaseException) -> DiskFullError:
    g, job = plan.job.grid, plan.job
    per_px = np.dtype(job.dtype).itemsize * (2 if job.confidence else 1)
    raw = g.width * g.height * per_px
    upper = raw * (1 + 4 / 3 + 1 / 3)  # block files + COG with overviews + GDAL's overview temp
    try:
        free = shutil.disk_usage(plan.out.parent).free
    except OSError:
        free = float("nan")
    return DiskFullError(
        f"the disk is full while writing {plan.out} ({exc}). A {g.width} x {g.height} px map needs at "
        f"most about {_fmt_bytes(upper)} free in {plan.out.parent} (uncompressed: block files, the COG with "
        f"overviews and GDAL's temporary overview file; compressed it is usually 3-10x less); "
        f"{_fmt_bytes(free)} is free now. Free some space (or choose another --out) and run the same "
        f"command again: finished blocks in {plan.partial} are kept."
    )


def _assemble(plan: Plan, blocks: list[Block], console: Any | None) -> None:
    job, g = plan.job, plan.job.grid
    out = plan.out
    colormap, names, entries = cog.map_categories(plan.out_legend)
    tags = {
        LEGEND_TAG: cog.legend_tag(plan.out_legend),
        "LCMAP_MODEL": Path(job.checkpoint).name,
        "LCMAP_MODEL_LEGEND": plan.model_legend.name,
        "LCMAP_TILE_PX": str(job.windows.tile),
        "LCMAP_OVERLAP_PX": str(job.windows.overlap),
    }
    sources = [cog.VrtSource(str(job.block_path(b)), 1, b.c0, b.r0, b.width, b.height) for b in blocks]
    common = dict(width=g.width, height=g.height, crs=g.crs, transform=g.transform)
    vrt = cog.write_mosaic_vrt(plan.partial / "map.vrt", dtype=job.dtype, nodata=MAP_NODATA, sources=sources,
                               colormap=colormap, category_names=names, tags=tags,
                               description="land cover class", **common)
    if job.confidence:
        conf_out = out.with_name(out.stem + "_confidence" + out.suffix)
        csources = [cog.VrtSource(s.path, 2, s.xoff, s.yoff, s.width, s.height) for s in sources]
        cvrt = cog.write_mosaic_vrt(
            plan.partial / "confidence.vrt", dtype="uint8", nodata=CONFIDENCE_NODATA, sources=csources,
            tags={"LCMAP_CONFIDENCE": "maximum blended class probability, percent (0-100); 255 = nodata",
                  "LCMAP_MODEL": Path(job.checkpoint).name},
            description="confidence (%)", **common)
        if console:
            console.print(f"writing {conf_out.name} (COG, average overviews)")
        cog.write_cog(cvrt, conf_out, resampling="average", predictor=True)
    if console:
        console.print(f"writing {out.name} (COG, mode overviews)")
    cog.write_cog(vrt, out, resampling="mode", sidecars={".qml": cog.write_qml(entries)})


def predict_map(
    model: str | Path,
    images: str | Path | Sequence[str | Path],
    out: str | Path,
    *,
    bbox: Sequence[float] | None = None,
    bbox_crs: str = "EPSG:4326",
    aoi: str | Path | AOI | None = None,
    tile_px: int = 512,
    overlap_px: int = 64,
    block_px: int = 4096,
    batch_size: int = 4,
    device: str = "auto",
    scheduler: str | None = None,
    confidence: bool = False,
    legend: str = "target",
    progress: bool = True,
) -> Path:
    """Predict a land-cover map over the imagery (or part of it) and write it as a COG.

    Args:
        model: RUN_DIR written by ``lcmap train`` (checkpoint chosen by
            :func:`lcmap.pipeline.runs.resolve_checkpoint`) or a ``.ckpt``.
        images: imagery files and/or folders (searched recursively); one mosaic, with the bands the
            model was trained on. The map has the imagery's CRS and pixel size (e.g. 1 m).
        out: the map to write (``MAP.tif``, a COG). Also written: ``MAP.tif.aux.xml`` (category
            names), ``MAP.qml`` (QGIS style) and, with ``confidence``, ``MAP_confidence.tif``.
            ``MAP.tif.partial/`` holds finished blocks while running (kept on failure, to resume).
        bbox: area to map, ``(west, south, east, north)`` in ``bbox_crs`` units (degrees for the
            default EPSG:4326); not with ``aoi``. Default: the whole imagery extent.
        bbox_crs: CRS of ``bbox`` (any string rasterio understands, e.g. ``EPSG:32617``).
        aoi: polygon file (GeoJSON/GeoPackage/Shapefile, any CRS) or an :class:`AOI`; the map
            covers its bounding box (snapped to the imagery's pixel grid) and pixels whose centre
            lies outside the polygon are nodata.
        tile_px: model window side in pixels (multiple of 32).
        overlap_px: pixels shared by neighbouring windows (0 to ``tile_px / 2``); the window
            stride is ``tile_px - overlap_px`` and probabilities are blended with a Hann taper
            inside the overlap. Costs about ``(tile / stride)²`` in compute (1.31x at 512/64).
        block_px: side of one task's block in pixels, rounded to a whole number of window strides
            (4096 -> 4032 with the defaults). Bigger blocks recompute fewer halo windows (~23% at
            4032 px, ~11% at 8064 px); memory per task hardly depends on it.
        batch_size: windows per model call (every call is padded to this many windows).
        device: ``auto`` (CUDA if available), ``cpu`` or ``cuda``.
        scheduler: ``None``: a local Dask cluster sized to this machine (one process per GPU; on
            CPU one per core up to 4 cores, else one per 4 cores; 1 task thread each, torch
            threads = cores / processes; its workers are spawned processes, so a script that
            calls this needs the usual ``if __name__ == "__main__":`` guard);
            ``"tcp://host:8786"``: an existing Dask cluster (with ``cuda``, tasks ask for the
            worker resource ``GPU=1``); ``"synchronous"``: in this process, no Dask.
        confidence: also write ``MAP_confidence.tif``: the blended probability of the chosen
            class in percent (uint8 0-100, nodata 255).
        legend: ``target``: codes 1..N of the target classes (1 water, 2 tree canopy, 3 low
            vegetation, 4 built-up by default), the target class of highest summed LR-class
            probability; where LR classes without a target win, 0; ``native``: the
            codes of the model's own (LR) legend. 0 is nodata either way.
        progress: show a progress bar (blocks and km²).

    Returns:
        The path of the map.

    Raises:
        LcmapInputError: bad input (checkpoint missing/corrupt, band count different from the
            model's, AOI/bbox outside the imagery, bad tile/overlap/legend/device, output folder
            not writable, scheduler unreachable) or a full disk (with the space needed). Nothing
            is written at ``out`` in that case.
    """
    t0 = time.perf_counter()
    plan = plan_prediction(
        model, images, out, bbox=bbox, bbox_crs=bbox_crs, aoi=aoi, tile_px=tile_px, overlap_px=overlap_px,
        block_px=block_px, batch_size=batch_size, device=device, confidence=confidence, legend=legend,
    )
    sched = None if scheduler in (None, "", "local") else str(scheduler)
    if sched is not None and sched != "synchronous" and "://" not in sched and ":" not in sched:
        raise LcmapInputError(
            f"--scheduler {scheduler!r}: give a Dask scheduler address (tcp://host:8786), 'synchronous', "
            "or nothing for a local cluster"
        )
    done = _prepare_partial(plan)
    blocks = plan.job.blocks()
    todo = [b for b in blocks if b.name not in done]
    stats = {"blocks": len(blocks), "blocks_resumed": len(blocks) - len(todo), "blocks_run": 0, "windows": 0,
             "seconds_forward": 0.0,
             "block_px": plan.job.block_size, "width": plan.job.grid.width, "height": plan.job.grid.height}
    LAST_RUN.clear()
    LAST_RUN.update(stats)
    console = None
    if progress:
        from rich.console import Console

        console = Console(stderr=True)
        if done:
            console.print(f"resuming: {len(blocks) - len(todo)} of {len(blocks)} blocks already done in {plan.partial}")
    bar = _Progress(progress, blocks, {b.name for b in blocks if b.name in done}, plan.job.grid,
                    plan.job.aoi_wkb if progress else None)
    try:
        if todo:
            if sched == "synchronous":
                _run_synchronous(plan, todo, bar, stats)
            else:
                _run_distributed(plan, todo, bar, stats, sched)
    except BaseException as exc:
        if _is_enospc(exc):
            raise _space_error(plan, exc) from exc
        raise
    finally:
        bar.close()
        LAST_RUN.update(stats)
    t1 = time.perf_counter()
    try:
        _assemble(plan, blocks, console)
    except BaseException as exc:
        if _is_enospc(exc):
            raise _space_error(plan, exc) from exc
        raise
    shutil.rmtree(plan.partial, ignore_errors=True)
    stats.update(seconds_predict=t1 - t0, seconds_write=time.perf_counter() - t1)
    LAST_RUN.update(stats)
    plan.model = None
    return plan.out

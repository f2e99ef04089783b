"""Imagery for model windows: raw strips of output rows read onto the map's grid, and each window
normalised into the model's batch.

:class:`StripReader` reads output rows/columns (one strip of ``tile`` rows per window row of a
task) into preallocated buffers in the imagery's own data type (1 byte per band and pixel for
8-bit imagery); :func:`window_into` cuts one window from a strip and normalises it
(``(value - mean) / std`` per band), feeding invalid pixels as the band mean (0 after
normalisation). A window that is not all imagery is classified from its *context box*
(:func:`context_box`): the imagery around its valid pixels, never empty area, so a pixel's class
depends only on the imagery around it.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import rasterio
from rasterio.enums import Resampling
from rasterio.transform import from_origin
from rasterio.vrt import WarpedVRT
from rasterio.warp import transform_bounds
from rasterio.windows import Window

from lcmap.geodata.datasets import HRImagery, imagery_valid
from lcmap.models.context import valid_bbox
from lcmap.pipeline.prediction.tile_cache import TileCache
from lcmap.pipeline.prediction.tiling import OutputGrid, WindowGrid

__all__ = ["Box", "StripReader", "context_box", "normalise_into", "window_into"]


#: How a file in another CRS (or off the map's pixel grid) is resampled onto the map's grid, in
#: one step (GDAL's warper, straight onto the map's pixels). Nearest neighbour keeps the sensor's
#: values (no water/vegetation mixtures): a per-pixel classifier's map of the sample's NAIP on
#: EPSG:32616 agrees with its own-CRS map on 99.4 % of pixels (bilinear: 91.5 %).
WARP_RESAMPLING = Resampling.nearest
#: Side (px) of the fixed tiles in which warped files are read (:meth:`StripReader._read_warped`).
WARP_TILE_PX = 512
#: Warped tiles a reader keeps (bytes): two rows of tiles of a task's widest strips (4 blocks and
#: the halo: 33 tiles of 1 MB for 4-band 8-bit imagery), so each tile is warped once per task.
WARP_CACHE_BYTES = 96 * 2**20


class StripReader:
    """Raw imagery of output rows/columns (no normalisation), into preallocated buffers.

    Files on the output grid (same CRS and pixel size, whole-pixel offsets) are read straight
    with rasterio; any other file (another CRS: zone, datum or unit; another pixel size or an
    offset grid) is read through a GDAL warped VRT laid on the map's own grid over the file's
    footprint, so its pixels are resampled once (:data:`WARP_RESAMPLING`), straight onto the
    map's pixels. Handles are kept open per process; where files overlap, the first file (in
    :attr:`HRImagery.files` order) with a valid pixel wins, as in TorchGeo's merge. Strips stay in
    the imagery's data type (:attr:`dtype`: 1 byte per band and pixel for 8-bit imagery, a
    quarter of float32); :func:`window_into` normalises each model window as it copies it into
    the batch. Invalid pixels (no file, or every band equal to the imagery's nodata) are False
    in ``valid``; their values are undefined.
    """

    def __init__(self, imagery: HRImagery, grid: OutputGrid):
        self.ds, self.grid = imagery, grid
        self.nodata = imagery.nodata
        #: path, r0, c0, r1, c1 (output px: the file's footprint), warped (not on the map's grid)
        self.files: list[tuple[str, int, int, int, int, bool]] | None = None
        self._handles: dict[str, Any] = {}
        #: warped tiles kept (:meth:`_read_warped`)
        self._tiles = TileCache(WARP_TILE_PX, WARP_CACHE_BYTES)
        #: the strips' numpy dtype: the files' (their common type)
        self.dtype: np.dtype = np.dtype(np.float32)
        #: bytes of imagery read (uncompressed), for the benchmark's bytes per km²
        self.bytes_read = 0

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_handles"] = {}
        state["_tiles"] = TileCache(WARP_TILE_PX, WARP_CACHE_BYTES)
        return state

    def _index(self) -> None:
        g = self.grid
        crs = g.crs
        files, dtypes = [], []
        for path in self.ds.files:
            with rasterio.open(path) as src:
                b = src.bounds
                dtypes.append(np.dtype(src.dtypes[0]))
                on_grid = (
                    src.crs == crs
                    and abs(src.res[0] - g.res_x) < 1e-9 * g.res_x
                    and abs(src.res[1] - g.res_y) < 1e-9 * g.res_y
                    and not src.transform.b
                    and not src.transform.d
                )
                c0f = (b.left - g.x0) / g.res_x
                r0f = (g.y0 - b.top) / g.res_y
                if on_grid and abs(c0f - round(c0f)) < 1e-6 and abs(r0f - round(r0f)) < 1e-6:
                    c0, r0 = int(round(c0f)), int(round(r0f))
                    files.append((path, r0, c0, r0 + src.height, c0 + src.width, False))
                    continue
                # its footprint on the map's CRS (edges densified), in whole output pixels
                left, bottom, right, top = b if src.crs == crs else transform_bounds(src.crs, crs, *b, densify_pts=21)
                c0, c1 = math.floor((left - g.x0) / g.res_x), math.ceil((right - g.x0) / g.res_x)
                r0, r1 = math.floor((g.y0 - top) / g.res_y), math.ceil((g.y0 - bottom) / g.res_y)
                files.append((path, r0, c0, r1, c1, True))
        self.files = files
        self.dtype = np.result_type(*dtypes) if dtypes else np.dtype(np.float32)

    def prepare(self) -> np.dtype:
        """Index the files (once) and return :attr:`dtype`, the type of the strips' buffers."""
        if self.files is None:
            self._index()
        return self.dtype

    def _read_warped(self, path: str, src: Any, r0: int, r1: int, c0: int, c1: int) -> np.ndarray:
        """Rows ``[r0, r1)`` x columns ``[c0, c1)`` of a warped file's VRT (its own pixels), cut from
        whole tiles of :data:`WARP_TILE_PX` aligned on the VRT's corner, each warped once
        (:class:`~lcmap.pipeline.prediction.tile_cache.TileCache`): a pixel's value does not depend
        on the strip asked for (GDAL's approximate transformer, asked for other windows, gave other
        values; the exact transformer cost ~4x the warp time)."""

        def load(tr: int, tc: int) -> np.ndarray:
            T = WARP_TILE_PX
            tile = src.read(window=Window(tc, tr, min(T, src.width - tc), min(T, src.height - tr)))
            self.bytes_read += tile.nbytes
            return tile

        return self._tiles.window(path, r0, r1, c0, c1, load)

    def _src(self, path: str, r0: int, c0: int, r1: int, c1: int, warped: bool):
        h = self._handles.get(path)
        if h is None:
            src = rasterio.open(path)
            if warped:  # the file on the map's grid, rows [r0, r1) x cols [c0, c1)
                g = self.grid
                h = WarpedVRT(
                    src,
                    crs=g.crs,
                    transform=from_origin(g.x0 + c0 * g.res_x, g.y0 - r0 * g.res_y, g.res_x, g.res_y),
                    width=c1 - c0,
                    height=r1 - r0,
                    resampling=WARP_RESAMPLING,
                    nodata=self.nodata,
                )
            else:
                h = src
            self._handles[path] = h
        return h

    def read(self, r0: int, r1: int, c0: int, c1: int, out: np.ndarray) -> tuple[np.ndarray, np.ndarray, int, int]:
        """Read output rows [r0, r1) x cols [c0, c1), clipped to the imagery extent, into ``out``.

        Args:
            out: a buffer ``(C, >= h, >= w)`` of :attr:`dtype` (see :meth:`prepare`).

        Returns:
            ``(image (C, h, w) raw values, a view of out; valid (h, w) bool; row0; col0)`` of what
            was read.
        """
        g = self.grid
        r0, r1 = max(r0, g.img_r0), min(r1, g.img_r1)
        c0, c1 = max(c0, g.img_c0), min(c1, g.img_c1)
        h, w = r1 - r0, c1 - c0
        self.prepare()
        assert self.files is not None
        image = out[:, :h, :w]
        valid = np.zeros((h, w), bool)
        for path, fr0, fc0, fr1, fc1, warped in self.files:
            a, z = max(r0, fr0), min(r1, fr1)
            c, d = max(c0, fc0), min(c1, fc1)
            if z <= a or d <= c:
                continue
            src = self._src(path, fr0, fc0, fr1, fc1, warped)
            if warped:
                data = self._read_warped(path, src, a - fr0, z - fr0, c - fc0, d - fc0)
            else:
                data = src.read(window=Window(c - fc0, a - fr0, d - c, z - a))
                self.bytes_read += data.nbytes
            ok = imagery_valid(data, self.nodata)
            dst_valid = valid[a - r0 : z - r0, c - c0 : d - c0]
            dst = image[:, a - r0 : z - r0, c - c0 : d - c0]
            if dst_valid.any():  # overlapping files: the first valid pixel wins
                ok &= ~dst_valid
                np.copyto(dst, data, where=ok[None], casting="unsafe")
            else:
                np.copyto(dst, data, casting="unsafe")  # invalid pixels: masked by `valid`
            dst_valid |= ok
        return image, valid, r0, c0


def window_into(
    dst: np.ndarray,
    windows: WindowGrid,
    strip: np.ndarray,
    valid: np.ndarray,
    sr0: int,
    sc0: int,
    i: int,
    j: int,
    mean: np.ndarray,
    std: np.ndarray,
) -> None:
    """Window (i, j), wholly inside the strip, normalised into ``dst`` ``(C, tile, tile)`` float32.

    ``(value - mean) / std`` per band (``mean``/``std`` ``(C, 1, 1)``); pixels not ``valid``
    (``(h, w)``, the strip's) are 0, the band mean. For windows whose context box
    (:func:`context_box`) is the window itself.
    """
    T = windows.tile
    wr0, wc0 = windows.win_r0(i) - sr0, windows.win_c0(j) - sc0
    raw = strip[:, wr0 : wr0 + T, wc0 : wc0 + T]
    ok = valid[wr0 : wr0 + T, wc0 : wc0 + T]
    normalise_into(dst, raw, ok, mean, std)


def normalise_into(dst: np.ndarray, raw: np.ndarray, ok: np.ndarray, mean: np.ndarray, std: np.ndarray) -> None:
    """``(raw - mean) / std`` into ``dst`` (same shape, float32); pixels not ``ok`` are 0 (the band mean)."""
    np.subtract(raw, mean, out=dst)
    np.divide(dst, std, out=dst)
    if not ok.all():  # imagery nodata inside the box (gaps, holes): the band mean, not ~ -3 sigma
        np.copyto(dst, 0.0, where=~ok[None])


Box = tuple[int, int, int, int]  # output rows [r0, r1) x columns [c0, c1)


def context_box(grid: OutputGrid, windows: WindowGrid, valid: np.ndarray, sr0: int, sc0: int, i: int, j: int):
    """What window (i, j) gives the model: ``(R, B)`` (output pixel boxes ``(r0, r1, c0, c1)``), or
    None when the window holds no valid imagery.

    ``R`` is the bounding box of the window's valid imagery (``valid``: the strip's ``(h, w)``
    mask, pixel ``[0, 0]`` = output pixel ``(sr0, sc0)``; the strip holds the window's part inside
    the imagery extent). ``B`` is where the model looks to classify ``R``: the window itself when
    ``R`` is the whole window; otherwise, along each axis, ``R`` extended to ``tile`` pixels on the
    side(s) where it reaches the window's edge (the imagery may go on there) and kept where the
    imagery ends inside the window, clipped to the imagery's extent. So the model never sees
    empty area beyond an edge or a gap: a window hanging over an image's edge is shifted inward,
    and an image smaller than a window is seen whole, at its own size (the caller runs the model
    on ``B``'s valid box: :func:`lcmap.models.context.predict_proba_valid`). ``B`` depends only
    on the window and the imagery, never on the block, the task or the other files listed far away.
    """
    T = windows.tile
    wr0, wc0 = windows.win_r0(i), windows.win_c0(j)
    h, w = valid.shape
    ra, rb = max(wr0, sr0), min(wr0 + T, sr0 + h)
    ca, cb = max(wc0, sc0), min(wc0 + T, sc0 + w)
    if rb <= ra or cb <= ca:
        return None
    box = valid_bbox(valid[ra - sr0 : rb - sr0, ca - sc0 : cb - sc0])
    if box is None:
        return None
    R = (ra + box[0], ra + box[1], ca + box[2], ca + box[3])

    def extend(lo: int, hi: int, w0: int, e0: int, e1: int) -> tuple[int, int]:
        first, last = lo == w0, hi == w0 + T  # R reaches the window's edge there
        if first == last:
            return lo, hi
        return (max(hi - T, e0), hi) if first else (lo, min(lo + T, e1))

    b_r = extend(R[0], R[1], wr0, grid.img_r0, grid.img_r1)
    b_c = extend(R[2], R[3], wc0, grid.img_c0, grid.img_c1)
    return R, (b_r[0], b_r[1], b_c[0], b_c[1])

"""Imagery for model windows: raw strips of output rows read onto the map's grid, and each window
normalised into the model's batch.

:class:`StripReader` reads output rows/columns (one strip of ``tile`` rows per window row of a
task) into preallocated buffers in the imagery's own data type (1 byte per band and pixel for
8-bit imagery); :func:`window_into` cuts one window from a strip, mirror-pads it where it overhangs
the imagery's extent, normalises it (``(value - mean) / std`` per band) and feeds invalid pixels
as the band mean (0 after normalisation).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import rasterio
from rasterio.warp import transform_bounds
from rasterio.windows import Window

from lcmap.geodata.datasets import HRImagery, imagery_valid, read_imagery
from lcmap.pipeline.tiling import OutputGrid, WindowGrid, window_from_strip

__all__ = ["StripReader", "window_into"]


class StripReader:
    """Raw imagery of output rows/columns (no normalisation), into preallocated buffers.

    Files on the output grid (same CRS and pixel size, whole-pixel offsets) are read straight
    with rasterio (handles kept open per process; files overlapping: the first file with a valid
    pixel wins, as in TorchGeo's merge); a strip that touches any other file is read through
    TorchGeo (:func:`lcmap.geodata.datasets.read_imagery`, which warps). Strips stay in the
    imagery's data type (:attr:`dtype`: 1 byte per band and pixel for 8-bit imagery, a quarter of
    float32); :func:`window_into` normalises each model window as it copies it into the batch.
    Invalid pixels (no file, or every band equal to the imagery's nodata) are False in ``valid``;
    their values are undefined.
    """

    def __init__(self, imagery: HRImagery, grid: OutputGrid):
        self.ds, self.grid = imagery, grid
        self.nodata = imagery.nodata
        self.files: list[tuple[str, int, int, int, int]] | None = None  # path, r0, c0, r1, c1 (output px)
        #: bounds of the files not on the grid, in the grid's CRS (their own CRS may differ)
        self.other: list[tuple[float, float, float, float]] = []
        self._handles: dict[str, Any] = {}
        #: the strips' numpy dtype: the files' (their common type), float32 when some file is warped
        self.dtype: np.dtype = np.dtype(np.float32)
        #: bytes of imagery read (uncompressed), for the benchmark's bytes per km²
        self.bytes_read = 0

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_handles"] = {}
        return state

    def _index(self) -> None:
        g = self.grid
        crs = g.crs
        files, other, dtypes = [], [], []
        for path in self.ds.files:
            with rasterio.open(path) as src:
                b = src.bounds
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
                    files.append((path, r0, c0, r0 + src.height, c0 + src.width))
                    dtypes.append(np.dtype(src.dtypes[0]))
                elif src.crs is None or src.crs == crs:
                    other.append(tuple(b))
                else:  # another CRS (zone, datum or units): its footprint on the map's CRS
                    other.append(transform_bounds(src.crs, crs, *b, densify_pts=21))
        self.files, self.other = files, other
        self.dtype = np.dtype(np.float32) if other or not dtypes else np.result_type(*dtypes)

    def prepare(self) -> np.dtype:
        """Index the files (once) and return :attr:`dtype`, the type of the strips' buffers."""
        if self.files is None:
            self._index()
        return self.dtype

    def _src(self, path: str):
        h = self._handles.get(path)
        if h is None:
            h = self._handles[path] = rasterio.open(path)
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
        if self.other and self._touches_other(r0, c0, r1, c1):
            raw, valid = self._read_torchgeo(r0, c0, r1, c1, h, w)
            np.copyto(image, raw, casting="unsafe")
            return image, valid, r0, c0
        valid = np.zeros((h, w), bool)
        for path, fr0, fc0, fr1, fc1 in self.files:
            a, z = max(r0, fr0), min(r1, fr1)
            c, d = max(c0, fc0), min(c1, fc1)
            if z <= a or d <= c:
                continue
            data = self._src(path).read(window=Window(c - fc0, a - fr0, d - c, z - a))
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

    def _touches_other(self, r0: int, c0: int, r1: int, c1: int) -> bool:
        xmin, ymin, xmax, ymax = self.grid.bounds(r0, c0, r1, c1)
        return any(b[0] < xmax and b[2] > xmin and b[1] < ymax and b[3] > ymin for b in self.other)

    def _read_torchgeo(self, r0: int, c0: int, r1: int, c1: int, h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
        raw, valid = read_imagery(self.ds, *self.grid.bounds(r0, c0, r1, c1))
        self.bytes_read += raw.nbytes
        if raw.shape[1:] != (h, w):  # defensive: rounding in the reader
            fixed = np.full((raw.shape[0], h, w), self.nodata, np.float32)
            fv = np.zeros((h, w), bool)
            hh, ww = min(h, raw.shape[1]), min(w, raw.shape[2])
            fixed[:, :hh, :ww] = raw[:, :hh, :ww]
            fv[:hh, :ww] = valid[:hh, :ww]
            raw, valid = fixed, fv
        return raw, valid


def window_into(
    dst: np.ndarray,
    grid: OutputGrid,
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
    """Window (i, j) of a raw strip, normalised into ``dst`` ``(C, tile, tile)`` float32.

    ``(value - mean) / std`` per band (``mean``/``std`` ``(C, 1, 1)``); pixels not ``valid``
    (``(h, w)``, the strip's) are 0, the band mean; mirror-padded beyond the imagery extent
    (:func:`lcmap.pipeline.tiling.window_from_strip`) only where the window overhangs it.
    """
    T, S = windows.tile, windows.stride
    wr0, wc0 = i * S, j * S
    g = grid
    if wr0 >= g.img_r0 and wc0 >= g.img_c0 and wr0 + T <= g.img_r1 and wc0 + T <= g.img_c1:
        raw = strip[:, wr0 - sr0 : wr0 - sr0 + T, wc0 - sc0 : wc0 - sc0 + T]
        ok = valid[wr0 - sr0 : wr0 - sr0 + T, wc0 - sc0 : wc0 - sc0 + T]
    else:
        raw = window_from_strip(grid, windows, strip, sr0, sc0, i, j)
        ok = window_from_strip(grid, windows, valid[None], sr0, sc0, i, j)[0]
    np.subtract(raw, mean, out=dst)
    np.divide(dst, std, out=dst)
    if not ok.all():  # imagery nodata inside the extent (gaps, holes): the band mean, not ~ -3 sigma
        np.copyto(dst, 0.0, where=~ok[None])

"""Tiling a map into model windows and blocks, and blending window probabilities (no I/O).

1. **Output grid** (:func:`output_grid`). The imagery's CRS and pixel size; extent = imagery
   extent ∩ AOI bounds, snapped outwards to the imagery's pixel grid.
2. **Windows** (:class:`WindowGrid`). One global grid of model windows anchored at the output's
   top-left pixel: windows of ``tile`` px at a stride of ``tile - overlap``, so neighbours share
   exactly ``overlap`` rows/columns. Windows that overhang the imagery's extent are filled by
   mirror reflection (:func:`window_from_strip`) so the model always sees ``tile`` x ``tile``.
3. **Blending** (:class:`BlockBlender`). Softmax probabilities are averaged with a weight that is
   1 except inside the overlap, where it follows a Hann (sin²) ramp whose two halves add up to
   exactly 1, floored at :data:`TAPER_FLOOR` (never 0); a window side on the output raster's own
   edge is not tapered (:meth:`WindowGrid.taper`). The blended probabilities give the class
   (argmax) and the confidence. :meth:`BlockBlender.add` is the one step "probabilities of one
   window -> weighted accumulation"; the accumulation is a rolling buffer of ``tile`` rows, so
   memory does not grow with the block.
4. **Blocks** (:func:`cut_blocks`). The output is cut into square blocks of a whole number of
   window strides (:func:`block_side_px`); each block sums the windows that touch it
   (:meth:`WindowGrid.touching`) in the same global order whatever the block size, so the map is
   bit-identical for any block size.

Pixel coordinates are output rows/columns counted from the output's top-left pixel.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from rasterio.crs import CRS
from rasterio.transform import Affine, from_origin

from lcmap.geodata.legends import MAP_NODATA

__all__ = [
    "CONFIDENCE_NODATA",
    "TAPER_FLOOR",
    "OutputGrid",
    "WindowGrid",
    "Block",
    "BlockBlender",
    "output_grid",
    "block_side_px",
    "cut_blocks",
    "window_from_strip",
]

#: Nodata of the confidence map (valid values are 0-100, percent).
CONFIDENCE_NODATA = 255
#: Smallest blending weight (the taper never reaches 0).
TAPER_FLOOR = 1e-3


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
        return (
            self.x0 + c0 * self.res_x,
            self.y0 - r1 * self.res_y,
            self.x0 + c1 * self.res_x,
            self.y0 - r0 * self.res_y,
        )


def output_grid(
    crs_wkt: str,
    image_bounds: tuple[float, float, float, float],
    res: tuple[float, float],
    aoi_bounds: tuple[float, float, float, float] | None = None,
) -> OutputGrid:
    """The output grid: the imagery's pixel grid over imagery extent ∩ AOI bounds.

    Args:
        crs_wkt: the imagery's CRS (WKT).
        image_bounds: the imagery's ``(xmin, ymin, xmax, ymax)`` in CRS units.
        res: the imagery's pixel size ``(x, y)`` in CRS units (both positive).
        aoi_bounds: the AOI's ``(xmin, ymin, xmax, ymax)`` in the same CRS; None: the whole imagery.
            Snapped outwards to whole imagery pixels (a side within 1e-6 px of a pixel edge stays there).

    The result may be empty (width or height <= 0) when the AOI only touches the imagery's edge.
    """
    rx, ry = float(res[0]), float(res[1])
    ix0, iy0, ix1, iy1 = (float(v) for v in image_bounds)
    img_w = int(round((ix1 - ix0) / rx))
    img_h = int(round((iy1 - iy0) / ry))
    c0, r0, c1, r1 = 0, 0, img_w, img_h
    if aoi_bounds is not None:
        ax0, ay0, ax1, ay1 = aoi_bounds
        eps = 1e-6
        c0 = max(c0, math.floor((ax0 - ix0) / rx + eps))
        c1 = min(c1, math.ceil((ax1 - ix0) / rx - eps))
        r0 = max(r0, math.floor((iy1 - ay1) / ry + eps))
        r1 = min(r1, math.ceil((iy1 - ay0) / ry - eps))
    return OutputGrid(
        crs_wkt=crs_wkt,
        x0=ix0 + c0 * rx,
        y0=iy1 - r0 * ry,
        res_x=rx,
        res_y=ry,
        width=c1 - c0,
        height=r1 - r0,
        img_c0=-c0,
        img_r0=-r0,
        img_c1=img_w - c0,
        img_r1=img_h - r0,
    )


@dataclass(frozen=True)
class WindowGrid:
    """The global grid of model windows over an output of ``height`` x ``width`` pixels.

    Window ``(i, j)`` covers rows ``[i*stride, i*stride + tile)`` and columns
    ``[j*stride, j*stride + tile)``; ``stride = tile - overlap`` (all in pixels). There are just
    enough windows to cover the output; the last ones may overhang it.
    """

    tile: int
    overlap: int
    height: int
    width: int

    @property
    def stride(self) -> int:
        return self.tile - self.overlap

    def count(self, length: int) -> int:
        """Windows along an axis of ``length`` pixels."""
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


# ----------------------------------------------------------------------------------- blocks
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


def block_side_px(block_px: int, windows: WindowGrid) -> int:
    """``block_px`` rounded to a whole number (>= 1) of window strides (4096 -> 4032 at 512/64)."""
    return max(1, round(block_px / windows.stride)) * windows.stride


def cut_blocks(height: int, width: int, block_size: int) -> list[Block]:
    """Square blocks of ``block_size`` px over ``height`` x ``width`` px, row by row; the last
    row/column of blocks is cut at the output's edge."""
    out = []
    for bi, r0 in enumerate(range(0, height, block_size)):
        for bj, c0 in enumerate(range(0, width, block_size)):
            out.append(Block(bi, bj, r0, c0, min(block_size, height - r0), min(block_size, width - c0)))
    return out


def window_from_strip(
    grid: OutputGrid, windows: WindowGrid, strip: np.ndarray, sr0: int, sc0: int, i: int, j: int
) -> np.ndarray:
    """Window (i, j) cut from a strip, mirror-padded beyond the imagery extent to tile x tile.

    Args:
        strip: ``(C, h, w)`` imagery whose pixel ``[:, 0, 0]`` is output pixel ``(sr0, sc0)``; it
            must hold the window's part inside the imagery extent.

    Returns:
        ``(C, tile, tile)``, C-contiguous.
    """
    g, wg = grid, windows
    T, S = wg.tile, wg.stride
    wr0, wc0 = i * S, j * S
    ra, rb = max(wr0, g.img_r0), min(wr0 + T, g.img_r1)
    ca, cb = max(wc0, g.img_c0), min(wc0 + T, g.img_c1)
    tile = strip[:, ra - sr0 : rb - sr0, ca - sc0 : cb - sc0]
    pads = ((0, 0), (ra - wr0, wr0 + T - rb), (ca - wc0, wc0 + T - cb))
    if any(p for pair in pads for p in pair):
        tile = np.pad(tile, pads, mode="reflect" if min(tile.shape[1:]) > 1 else "edge")
    return np.ascontiguousarray(tile)


# --------------------------------------------------------------------------------- blending
class BlockBlender:
    """Rolling accumulator of weighted probabilities over a block, ``tile`` rows at a time.

    Feed every window that touches the block, in global (i, j) order, with :meth:`add`; then
    :meth:`finish` gives the class codes and the confidence. Only pixels where ``need`` is True
    get a class; the others stay nodata.

    Args:
        windows: the global window grid.
        block: the block being blended.
        need: ``(block.height, block.width)`` bool; the caller may update rows of it until
            they are finalised (rows are finalised once no later window touches them).
        code_lut: code written for each map channel (argmax index -> code).
        dtype: numpy dtype of the codes (``uint8``/``uint16``).
        confidence: also produce the confidence (percent, uint8; nodata :data:`CONFIDENCE_NODATA`).
        device: where the accumulation runs (the model's device).
    """

    def __init__(
        self,
        windows: WindowGrid,
        block: Block,
        need: np.ndarray,
        code_lut: tuple[int, ...],
        dtype: str,
        confidence: bool,
        device: torch.device,
    ):
        self.windows, self.block, self.need = windows, block, need
        self.T = windows.tile
        self.device = device
        n_classes = len(code_lut)
        self.acc = torch.zeros((n_classes, self.T, block.width), dtype=torch.float32, device=device)
        self.wsum = torch.zeros((self.T, block.width), dtype=torch.float32, device=device)
        self.buf_r: int | None = None  # output row of buffer row 0
        self.fin = block.r0  # next output row to finalise
        self.lut = torch.tensor(code_lut, dtype=torch.int64, device=device)
        self.dtype = dtype
        self.codes = np.full((block.height, block.width), MAP_NODATA, dtype=dtype)
        self.conf = np.full((block.height, block.width), CONFIDENCE_NODATA, np.uint8) if confidence else None
        self._weights: dict[tuple[int, int], torch.Tensor] = {}
        self.n_rows, self.n_cols = windows.n_rows, windows.n_cols

    def weight(self, i: int, j: int) -> torch.Tensor:
        """2-D blending weight ``(tile, tile)`` of window (i, j) (outer product of the tapers)."""
        wg = self.windows
        key = (
            (0 if i == 0 else 1) + (2 if i == self.n_rows - 1 else 0),
            (0 if j == 0 else 1) + (2 if j == self.n_cols - 1 else 0),
        )
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
                acc = self.acc[:, a - self.buf_r : z - self.buf_r]
                top, arg = acc.max(dim=0)
                rows = slice(a - b.r0, z - b.r0)
                need = self.need[rows]
                codes = self.lut[arg].cpu().numpy().astype(self.dtype)
                self.codes[rows] = np.where(need, codes, MAP_NODATA)
                if self.conf is not None:
                    wsum = self.wsum[a - self.buf_r : z - self.buf_r].clamp_min(1e-12)
                    pct = torch.round(top / wsum * 100.0).clamp(0, 100).to(torch.uint8).cpu().numpy()
                    self.conf[rows] = np.where(need, pct, CONFIDENCE_NODATA)
        self.fin = max(self.fin, end)

    def add(self, i: int, j: int, probs: torch.Tensor) -> None:
        """Blend window (i, j)'s probabilities ``(K, tile, tile)`` (K map channels) into the block.

        Windows must come in global (i, j) order. Adds ``probs * weight`` to the accumulator and
        ``weight`` to the weight sum over the window's part inside the block.
        """
        T, S = self.T, self.windows.stride
        b = self.block
        wr0, wc0 = i * S, j * S
        if self.buf_r is None or wr0 != self.buf_r:
            self._finalise(wr0)
            shift = T if self.buf_r is None else wr0 - self.buf_r
            if shift < T:
                self.acc[:, : T - shift] = self.acc[:, shift:].clone()
                self.wsum[: T - shift] = self.wsum[shift:].clone()
                self.acc[:, T - shift :] = 0
                self.wsum[T - shift :] = 0
            else:
                self.acc.zero_()
                self.wsum.zero_()
            self.buf_r = wr0
        ra, rb = max(wr0, b.r0), min(wr0 + T, b.r0 + b.height)
        ca, cb = max(wc0, b.c0), min(wc0 + T, b.c0 + b.width)
        w = self.weight(i, j)[ra - wr0 : rb - wr0, ca - wc0 : cb - wc0]
        p = probs[:, ra - wr0 : rb - wr0, ca - wc0 : cb - wc0]
        # mul and add as two separately rounded operations: identical for every block layout
        self.acc[:, ra - wr0 : rb - wr0, ca - b.c0 : cb - b.c0] += p * w
        self.wsum[ra - wr0 : rb - wr0, ca - b.c0 : cb - b.c0] += w

    def finish(self) -> tuple[np.ndarray, np.ndarray | None]:
        """``(codes (h, w) dtype, confidence (h, w) uint8 | None)`` of the whole block."""
        self._finalise(self.block.r0 + self.block.height)
        return self.codes, self.conf

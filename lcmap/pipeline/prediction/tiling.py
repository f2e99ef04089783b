"""Tiling a map into model windows and blocks, and the blending taper (pure: no I/O).

1. **Output grid** (:func:`output_grid`). The imagery's CRS and pixel size; extent = imagery
   extent ∩ AOI bounds, snapped outwards to the imagery's pixel grid.
2. **Windows** (:class:`WindowGrid`). One lattice of model windows of ``tile`` px at a stride of
   ``tile - overlap`` (neighbours share exactly ``overlap`` rows/columns), anchored on the CRS's
   pixel grid (:func:`lattice_windows`), not on the output's corner: the windows over a pixel are
   the same whatever other files or AOI make the output larger. A window that is not all valid
   imagery is run on its *context box* (:func:`lcmap.pipeline.prediction.strips.context_box`): only
   imagery, never empty area, reaches the model.
3. **Taper** (:meth:`WindowGrid.taper`). Softmax probabilities are averaged with a weight that is
   1 except inside the overlap, where it follows a Hann (sin²) ramp whose two halves add up to
   exactly 1, floored at :data:`TAPER_FLOOR` (never 0); a window side on the output raster's own
   edge is not tapered. The blending itself is :mod:`lcmap.pipeline.prediction.blending`.
4. **Blocks** (:func:`cut_blocks`). The output is cut into square blocks of a whole number of
   window strides (:func:`block_side_px`); each block sums the windows that touch it
   (:meth:`WindowGrid.touching`) in the same global order whatever the block size, so the map is
   bit-identical for any block size.
5. **Tiles** (``--tile-km``: :func:`tile_side_blocks`, :func:`plan_tiles`). ``m`` x ``m`` blocks
   per COG tile (:mod:`lcmap.pipeline.prediction.tiled_output` writes them).

Pixel coordinates are output rows/columns counted from the output's top-left pixel.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from rasterio.crs import CRS
from rasterio.transform import Affine, from_origin

from lcmap.errors import LcmapInputError

__all__ = [
    "CONFIDENCE_NODATA",
    "TAPER_FLOOR",
    "OutputGrid",
    "WindowGrid",
    "Block",
    "block_groups",
    "group_region",
    "group_shape",
    "task_shape",
    "MAX_GROUP",
    "model_px_per_map_px",
    "output_grid",
    "lattice_start",
    "lattice_windows",
    "block_side_px",
    "block_end",
    "block_start",
    "cut_blocks",
    "Tile",
    "tile_side_blocks",
    "plan_tiles",
    "tile_grid",
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

    Window ``(i, j)`` covers rows ``[row0 + i*stride, row0 + i*stride + tile)`` and columns
    ``[col0 + j*stride, col0 + j*stride + tile)``; ``stride = tile - overlap`` (all in pixels).
    ``row0``/``col0`` (<= 0) place the lattice (:func:`lattice_windows`; 0: at the output's
    corner). There are just enough windows to cover the output (with ``lattice``: every window
    that touches it); the first and last ones may overhang it.
    """

    tile: int
    overlap: int
    height: int
    width: int
    row0: int = 0
    col0: int = 0
    #: every window that touches the output (a lattice's), not just enough to cover it
    lattice: bool = False

    @property
    def stride(self) -> int:
        return self.tile - self.overlap

    def count(self, length: int, start: int = 0) -> int:
        """Windows along an axis of ``length`` pixels, the first starting at pixel ``start`` (<= 0)."""
        if self.lattice:
            return max(1, math.ceil((length - start) / self.stride))
        if length - start <= self.tile:
            return 1
        return math.ceil((length - start - self.tile) / self.stride) + 1

    @property
    def n_rows(self) -> int:
        return self.count(self.height, self.row0)

    @property
    def n_cols(self) -> int:
        return self.count(self.width, self.col0)

    def win_r0(self, i: int) -> int:
        """First output row of window row ``i``."""
        return self.row0 + i * self.stride

    def win_c0(self, j: int) -> int:
        """First output column of window column ``j``."""
        return self.col0 + j * self.stride

    def touching(self, lo: int, hi: int, n: int, start: int = 0) -> range:
        """Indices of the windows (along one axis, ``n`` in all, the first at pixel ``start``) that
        touch pixels [lo, hi)."""
        first = max(0, (lo - start - self.tile) // self.stride + 1)
        last = min(n - 1, (hi - 1 - start) // self.stride)
        return range(first, last + 1)

    def rows_touching(self, lo: int, hi: int) -> range:
        """Window rows that touch output rows [lo, hi)."""
        return self.touching(lo, hi, self.n_rows, self.row0)

    def cols_touching(self, lo: int, hi: int) -> range:
        """Window columns that touch output columns [lo, hi)."""
        return self.touching(lo, hi, self.n_cols, self.col0)

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


def lattice_start(first_px: int, tile: int, stride: int) -> int:
    """Where (<= 0, in output pixels) the first lattice window touching the output starts.

    ``first_px``: the global index of the output's first pixel along the axis (pixels counted
    from the CRS's origin). Lattice windows start at global multiples of ``stride``; the first one
    taken is the first whose ``tile`` pixels reach the output, so every lattice window that
    touches an output pixel is in the grid, however far the output reaches.
    """
    k_first = (first_px - tile) // stride + 1
    return k_first * stride - first_px


def lattice_windows(grid: OutputGrid, tile: int, overlap: int) -> WindowGrid:
    """The window grid of ``grid`` on the CRS's pixel lattice (see :class:`WindowGrid`).

    The lattice is fixed by the pixel's position in the CRS (``x / res_x``, ``-y / res_y``), so
    a pixel is covered by the same windows, with the same taper, when other files, a larger AOI
    or a bbox change the output's extent (files on one pixel grid).
    """
    stride = tile - overlap
    gc = math.floor(grid.x0 / grid.res_x + 1e-6)
    gr = math.floor(-grid.y0 / grid.res_y + 1e-6)
    return WindowGrid(
        tile,
        overlap,
        grid.height,
        grid.width,
        row0=lattice_start(gr, tile, stride),
        col0=lattice_start(gc, tile, stride),
        lattice=True,
    )


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


def block_start(px: int, block_size: int, origin: int = 0) -> int:
    """First pixel of the block (row or column) holding pixel ``px`` (>= 0): block edges lie at
    ``origin + k * block_size`` (``origin`` <= 0, the window lattice's start) and at 0."""
    return max(0, origin + (px - origin) // block_size * block_size)


def block_end(px: int, block_size: int, origin: int = 0) -> int:
    """The first pixel after the block holding pixel ``px`` (the next edge; see :func:`block_start`)."""
    return origin + ((px - origin) // block_size + 1) * block_size


def cut_blocks(height: int, width: int, block_size: int, row0: int = 0, col0: int = 0) -> list[Block]:
    """Blocks of ``block_size`` px over ``height`` x ``width`` px, row by row, their edges on the
    window lattice (``row0 + k * block_size``, ``col0 + k * block_size``: a block edge falls where
    a window starts, so one window row/column straddles it); the first and last row/column of
    blocks are cut at the output's edges."""

    def starts(length: int, origin: int) -> list[int]:
        return [0] + [e for e in range(origin + block_size, length, block_size) if e > 0]

    rows, cols = starts(height, row0), starts(width, col0)
    out = []
    for bi, r0 in enumerate(rows):
        r1 = rows[bi + 1] if bi + 1 < len(rows) else height
        for bj, c0 in enumerate(cols):
            c1 = cols[bj + 1] if bj + 1 < len(cols) else width
            out.append(Block(bi, bj, r0, c0, r1 - r0, c1 - c0))
    return out


def block_groups(blocks: list[Block], rows: int, cols: int) -> list[list[Block]]:
    """``blocks`` grouped into tasks of up to ``rows`` x ``cols`` blocks (by block row/column),
    row-major inside a group. A task blends its whole group in one pass; the windows on the
    group's border, which its neighbours also need, run once in seam tasks
    (:mod:`lcmap.pipeline.prediction.seams`): bigger groups, fewer such windows, and the same
    memory (the accumulation holds ``tile`` rows of the group's width)."""
    groups: dict[tuple[int, int], list[Block]] = {}
    for b in blocks:
        groups.setdefault((b.row // rows, b.col // cols), []).append(b)
    return [sorted(g, key=lambda b: (b.row, b.col)) for _, g in sorted(groups.items())]


#: Blocks per task (rows, columns) at most: 4 x 4032 px wide keeps the accumulation at
#: ``K x 512 x 16128`` float32 (132 MB for 4 classes) and the border windows (seams) at ~3 %.
MAX_GROUP = (24, 4)


def group_shape(
    n_block_rows: int, n_block_cols: int, tasks_wanted: int = 1, strides_per_block: int = 9
) -> tuple[int, int]:
    """Blocks per task (rows, columns), at most :data:`MAX_GROUP`: of the shapes that give at least
    ``tasks_wanted`` tasks (or as many as there can be), the one whose tasks touch the fewest windows
    (each shared border window runs once, in a seam task, but is written to and read from a seam
    file: fewer of them, less I/O).

    A group of ``k`` blocks along an axis touches ``k * strides_per_block + 1`` windows along it (its
    border window is also touched by the neighbour), so the windows of a shape are the product of the
    two axes' sums over the map's block rows and columns. Ties go to the narrower group (its row
    buffers are smaller), then to fewer tasks.
    """
    rows_max, cols_max = min(MAX_GROUP[0], n_block_rows), min(MAX_GROUP[1], n_block_cols)

    def windows(n: int, g: int) -> int:
        return sum(min(g, n - a) * strides_per_block + 1 for a in range(0, n, g))

    def tasks(gr: int, gc: int) -> int:
        return -(-n_block_rows // gr) * -(-n_block_cols // gc)

    shapes = [(gr, gc) for gr in range(1, rows_max + 1) for gc in range(1, cols_max + 1)]
    wanted = min(tasks_wanted, max(tasks(gr, gc) for gr, gc in shapes))
    ok = [(gr, gc) for gr, gc in shapes if tasks(gr, gc) >= wanted]
    best = min(ok, key=lambda g: (windows(n_block_rows, g[0]) * windows(n_block_cols, g[1]), g[1], tasks(*g)))
    return max(1, best[0]), max(1, best[1])


def task_shape(blocks: list[Block], workers: int, block_size: int, windows: WindowGrid) -> tuple[int, int]:
    """Blocks per task (rows, columns) for a map of ``blocks`` run by ``workers`` worker threads:
    :func:`group_shape` asked for two tasks per worker (a few in flight each), one with one worker."""
    n_rows = max((b.row for b in blocks), default=0) + 1
    n_cols = max((b.col for b in blocks), default=0) + 1
    return group_shape(n_rows, n_cols, 2 * workers if workers > 1 else 1, block_size // windows.stride)


def group_region(group: list[Block]) -> Block:
    """The rectangle of output pixels covered by a group of blocks (as a :class:`Block`)."""
    r0 = min(b.r0 for b in group)
    c0 = min(b.c0 for b in group)
    r1 = max(b.r0 + b.height for b in group)
    c1 = max(b.c0 + b.width for b in group)
    return Block(group[0].row, group[0].col, r0, c0, r1 - r0, c1 - c0)


def model_px_per_map_px(windows: WindowGrid, regions: list[Block]) -> float:
    """Model pixels computed per map pixel when each region runs every window touching it (each
    counted at ``tile`` x ``tile``: an upper bound where a window runs on a smaller context box)."""
    n = 0
    for r in regions:
        n += len(windows.rows_touching(r.r0, r.r0 + r.height)) * len(windows.cols_touching(r.c0, r.c0 + r.width))
    return n * windows.tile**2 / (windows.height * windows.width)


# ----------------------------------------------------------------------------------- tiles (--tile-km)
@dataclass(frozen=True)
class Tile:
    """Output rows ``[r0, r0 + height)`` and columns ``[c0, c0 + width)``; ``blocks``: its planned
    blocks (map pixel coordinates)."""

    row: int
    col: int
    r0: int
    c0: int
    height: int
    width: int
    blocks: tuple[Block, ...]

    @property
    def name(self) -> str:
        return f"tile_r{self.row:03d}_c{self.col:03d}"

    def file(self, folder: str | Path) -> Path:
        """The tile's COG in ``folder``."""
        return Path(folder) / f"{self.name}.tif"


def tile_side_blocks(tile_km: float, grid: OutputGrid, block_size: int) -> int:
    """Blocks per tile side: ``tile_km`` over the block side in metres, rounded, at least 1.

    Raises:
        LcmapInputError: the map's CRS is not projected (its pixels are not a length).
    """
    crs = grid.crs
    if not crs.is_projected:
        raise LcmapInputError(
            f"--tile-km needs a map CRS in metres or feet; this map's ({crs.to_string()}) is in degrees: "
            "give --crs (e.g. the UTM zone, EPSG:326NN) or leave --tile-km out"
        )
    block_m = block_size * grid.res_x * crs.linear_units_factor[1]
    return max(1, round(tile_km * 1000 / block_m))


def plan_tiles(all_blocks: list[Block], planned: list[Block], side_blocks: int) -> list[Tile]:
    """The tiles of ``side_blocks`` x ``side_blocks`` blocks that hold a block of ``planned``, row by
    row; each tile's extent is that of its blocks in ``all_blocks`` (the map's whole block grid)."""
    m = side_blocks
    extent: dict[tuple[int, int], list[Block]] = {}
    inside: dict[tuple[int, int], list[Block]] = {}
    for b in all_blocks:
        extent.setdefault((b.row // m, b.col // m), []).append(b)
    for b in planned:
        inside.setdefault((b.row // m, b.col // m), []).append(b)
    tiles = []
    for key in sorted(inside):
        box = group_region(extent[key])
        blocks = tuple(sorted(inside[key], key=lambda b: (b.row, b.col)))
        tiles.append(Tile(key[0], key[1], box.r0, box.c0, box.height, box.width, blocks))
    return tiles


def tile_grid(grid: OutputGrid, tile: Tile) -> OutputGrid:
    """The output grid of one tile (same CRS and pixels, its corner and size)."""
    return replace(
        grid,
        x0=grid.x0 + tile.c0 * grid.res_x,
        y0=grid.y0 - tile.r0 * grid.res_y,
        width=tile.width,
        height=tile.height,
        img_c0=grid.img_c0 - tile.c0,
        img_r0=grid.img_r0 - tile.r0,
        img_c1=grid.img_c1 - tile.c0,
        img_r1=grid.img_r1 - tile.r0,
    )

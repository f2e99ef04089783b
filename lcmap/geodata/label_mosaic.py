"""Label mosaics: label files in any CRS and resolution read onto a target grid.

Label mosaics (:class:`LabelMosaic`): label files in any CRS and resolution are read onto a target
grid (:class:`Grid`: CRS, transform, shape) by nearest neighbour (every grid pixel takes the label
pixel under its centre). **Overlap rule**: where files overlap, the first file in sorted path order
that holds a label at the pixel wins. A pixel holds no label where it is off the file, equals the
files' nodata values, or equals one of the ``no_label_codes`` (the legend's nodata codes). Inside
one ``.vrt`` GDAL's own order applies (the last source listed is drawn on top).
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import rasterio
import rasterio.errors
from rasterio.crs import CRS
from rasterio.enums import ColorInterp, Resampling
from rasterio.transform import Affine
from rasterio.warp import reproject, transform_bounds
from rasterio.windows import Window
from rasterio.windows import transform as window_transform

from lcmap.errors import LcmapInputError
from lcmap.geodata import remote
from lcmap.geodata.io import _UNWRITTEN, check_raster_file, find_raster_files, open_raster
from lcmap.geodata.legends import IGNORE_INDEX, Legend, UnknownLabelError

__all__ = ["Grid", "LabelMosaic", "LabelRead"]

log = logging.getLogger(__name__)


def _alpha_band(src: Any) -> int:
    """1-based index of ``src``'s alpha band (0: none). Nodata values and per-dataset masks are
    honoured by the warp itself; an alpha band has to be named."""
    if src.nodata is not None:
        return 0
    for i, ci in enumerate(src.colorinterp, start=1):
        if ci == ColorInterp.alpha:
            return i
    return 0


@dataclass(frozen=True)
class Grid:
    """A pixel grid: ``crs``, ``transform`` (upper-left origin) and ``shape`` ``(height, width)`` px."""

    crs: CRS
    transform: Affine
    shape: tuple[int, int]

    @classmethod
    def of(cls, crs: CRS | str, transform: Affine, width: int, height: int) -> Grid:
        return cls(CRS.from_user_input(crs), transform, (int(height), int(width)))

    def window(self, window: Window) -> Grid:
        """The part of this grid under ``window``."""
        return Grid(self.crs, window_transform(window, self.transform), (int(window.height), int(window.width)))

    @property
    def bounds(self) -> tuple[float, float, float, float]:
        """``(xmin, ymin, xmax, ymax)`` in ``crs`` units."""
        h, w = self.shape
        xs, ys = zip(*(self.transform * (c, r) for c in (0, w) for r in (0, h)), strict=False)
        return min(xs), min(ys), max(xs), max(ys)


@dataclass
class LabelRead:
    """Labels read on a grid: ``codes`` int32 ``(H, W)`` (the fill code where there is none),
    ``has_label`` bool ``(H, W)`` and ``file_index`` int16 ``(H, W)`` (index into the mosaic's
    ``paths`` of the file each label came from; -1 where none)."""

    codes: np.ndarray
    has_label: np.ndarray
    file_index: np.ndarray


def _whole_codes(values: np.ndarray, layer: np.ndarray, path: str, what: str) -> None:
    """Copy float label ``values`` (NaN: unwritten) into int32 ``layer`` (``_UNWRITTEN`` where NaN).

    Raises:
        UnknownLabelError: a value is not a whole number (e.g. a continuous raster given as labels).
    """
    written = ~np.isnan(values)
    bad = written & ((values != np.round(values)) | (np.abs(values) >= 2**31 - 1))
    if bad.any():
        examples = ", ".join(f"{v:g}" for v in np.unique(values[bad])[:5])
        raise UnknownLabelError(
            f"{what} file {path}: label values are not whole numbers (e.g. {examples}): class codes must be "
            "integers. Is this a continuous raster (imagery, an index, a probability) given as labels?"
        )
    layer[...] = _UNWRITTEN
    layer[written] = values[written].astype(np.int32)


class LabelMosaic:
    """Label files (one or a mosaic, any CRS/resolution) read onto any grid by nearest neighbour.

    Where files overlap, the first file in sorted path order holding a label at the pixel wins (see
    the module docstring). Files are checked on construction; handles are opened lazily, one per
    file and process, and are not pickled (safe in DataLoader workers). Use as a context manager
    or call :meth:`close`.

    Args:
        paths: files, folders, globs or ``.txt`` lists (:func:`find_raster_files`).
        what: the files' role, for messages (``label``, ``reference``, ``baseline``).
        no_label_codes: codes that are no label (the legend's nodata codes), besides the files'
            nodata values (the nodata value of one file is no label in any of them).
    """

    def __init__(self, paths: Any, what: str = "label", no_label_codes: Sequence[int] = ()) -> None:
        self.what = what
        self.paths = find_raster_files(paths, what)
        self.profiles = [check_raster_file(p, what) for p in self.paths]
        file_nodata = {int(v) for v in self.file_nodata if math.isfinite(v) and float(v).is_integer()}
        self.no_label_codes = np.asarray(sorted({int(c) for c in no_label_codes} | file_nodata), dtype=np.int64)
        self._footprints: dict[str, np.ndarray] = {}
        self._handles: dict[tuple[int, str], Any] = {}

    @property
    def file_nodata(self) -> list[float]:
        """The files' nodata values (sorted, without None)."""
        return sorted({p["nodata"] for p in self.profiles if p["nodata"] is not None})

    def footprints(self, crs: CRS) -> np.ndarray:
        """Each file's bounds in ``crs``: float64 ``(N, 4)`` rows ``xmin, ymin, xmax, ymax``
        (infinite where a file cannot be projected there: it is then read everywhere)."""
        key = crs.to_wkt()
        if key not in self._footprints:
            boxes = np.empty((len(self.profiles), 4), dtype=np.float64)
            for i, prof in enumerate(self.profiles):
                try:
                    boxes[i] = transform_bounds(prof["crs"], crs, *prof["bounds"], densify_pts=21)
                except Exception:  # a projection error: test it on every read
                    boxes[i] = (-np.inf, -np.inf, np.inf, np.inf)
            boxes[~np.isfinite(boxes).all(axis=1)] = (-np.inf, -np.inf, np.inf, np.inf)
            self._footprints[key] = boxes
        return self._footprints[key]

    def files_meeting(self, grid: Grid) -> list[int]:
        """Indices (into ``paths``, ascending) of the files whose footprint meets ``grid`` (bounding boxes)."""
        xmin, ymin, xmax, ymax = grid.bounds
        b = self.footprints(grid.crs)
        hit = (b[:, 0] < xmax) & (b[:, 2] > xmin) & (b[:, 1] < ymax) & (b[:, 3] > ymin)
        return [int(i) for i in np.flatnonzero(hit)]

    def meets(self, grid: Grid) -> bool:
        """Whether any file's footprint meets ``grid``."""
        return bool(self.files_meeting(grid))

    def read(self, grid: Grid, fill_code: int = 0) -> LabelRead:
        """Labels on ``grid``, following the overlap rule; ``fill_code`` where no file has a label.

        Raises:
            LcmapInputError: a file cannot be read (named).
        """
        shape = grid.shape
        codes = np.full(shape, fill_code, dtype=np.int32)
        has_label = np.zeros(shape, dtype=bool)
        file_index = np.full(shape, -1, dtype=np.int16)
        layer = np.empty(shape, dtype=np.int32)
        for i in self.files_meeting(grid):
            path = self.paths[i]
            src = self._open(path)
            is_float = np.dtype(self.profiles[i]["dtype"]).kind in "fc"
            dest = np.full(shape, np.nan) if is_float else layer
            if not is_float:
                layer.fill(_UNWRITTEN)
            try:
                reproject(
                    source=rasterio.band(src, 1),
                    destination=dest,
                    src_nodata=src.nodata,
                    src_alpha=_alpha_band(src),
                    dst_transform=grid.transform,
                    dst_crs=grid.crs,
                    dst_nodata=np.nan if is_float else _UNWRITTEN,
                    resampling=Resampling.nearest,
                )
            except (rasterio.errors.RasterioError, OSError) as exc:
                if remote.is_remote(path):
                    raise remote.unreadable(path, self.what, exc) from exc
                raise LcmapInputError(
                    f"{self.what} file {path} could not be read ({exc}); it may be truncated or corrupt"
                ) from exc
            if is_float:
                _whole_codes(dest, layer, path, self.what)
            take = (layer != _UNWRITTEN) & ~has_label
            if self.no_label_codes.size:
                take &= ~np.isin(layer, self.no_label_codes)
            codes[take] = layer[take]
            file_index[take] = i
            has_label |= take
            if has_label.all():
                break
        return LabelRead(codes, has_label, file_index)

    def read_index(self, grid: Grid, legend: Legend, option: str | None = "--legend") -> np.ndarray:
        """Legend indices (uint8 ``grid.shape``) of the labels on ``grid``, the files' codes being in
        ``legend``; IGNORE_INDEX where there is no label. ``option``: the command-line option that
        chose ``legend`` (named when codes do not fit it).

        Raises:
            UnknownLabelError: a file holds codes its legend does not define (listed, with the file).
        """
        labels = self.read(grid, fill_code=int(legend.nodata[0]) if legend.nodata else 0)
        out = np.full(grid.shape, IGNORE_INDEX, dtype=np.uint8)
        for k in np.unique(labels.file_index[labels.has_label]):
            sel = labels.file_index == k
            out[sel] = legend.encode(labels.codes[sel], source=self.paths[int(k)], option=option)
        return out

    def read_target(self, grid: Grid, legend: Legend, option: str | None = "--legend") -> np.ndarray:
        """Target-class indices (uint8 ``grid.shape``) of the labels on ``grid`` (:meth:`read_index`);
        IGNORE_INDEX where there is no label or the class has no target.

        Raises:
            UnknownLabelError: a file holds codes its legend does not define (listed, with the file).
        """
        return legend.index_to_target_lut()[self.read_index(grid, legend, option)]  # IGNORE -> IGNORE

    def _open(self, path: str) -> Any:
        key = (os.getpid(), path)
        if key not in self._handles:
            self._handles[key] = open_raster(path, self.what)
        return self._handles[key]

    def close(self) -> None:
        """Close the handles this process opened."""
        for (pid, _), handle in list(self._handles.items()):
            if pid == os.getpid():
                handle.close()
        self._handles = {}

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_handles"] = {}
        return state

    def __enter__(self) -> LabelMosaic:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

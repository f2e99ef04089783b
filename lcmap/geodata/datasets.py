"""TorchGeo datasets for HR imagery, LR labels and HR references, and their pairing.

- :class:`HRImagery`: any band count, uint8/uint16/float, one or many files (a mosaic).
- :class:`LabelRaster`: a land-cover raster (``is_image=False``, read by nearest neighbour).
- :class:`LabelledImagery`: ``imagery & labels`` (TorchGeo's intersection: the imagery's CRS and
  resolution win, so labels in any CRS/resolution land on the 1 m grid by nearest neighbour),
  with the label codes encoded into legend indices, nodata and out-of-AOI pixels set to
  :data:`~lcmap.geodata.legends.IGNORE_INDEX`.

Inputs are found and checked by :mod:`lcmap.geodata.io` before TorchGeo sees them (TorchGeo silently
skips unreadable files): files, folders, quoted globs, ``.txt`` lists; a missing, corrupt or
truncated file, or one without a CRS, raises :class:`LcmapInputError` naming it. Label files are read
through :class:`lcmap.geodata.label_mosaic.LabelMosaic` (its overlap rule: the first file in sorted path order
holding a label wins).
"""

from __future__ import annotations

import contextlib
import io
import re
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import shapely
import torch
from rasterio.crs import CRS
from rasterio.transform import from_origin
from shapely.prepared import prep
from torchgeo.datasets import IntersectionDataset, RasterDataset

from lcmap.compat import query_bounds
from lcmap.errors import LcmapInputError
from lcmap.geodata.aoi import rasterize_aoi
from lcmap.geodata.io import RASTER_SUFFIXES, check_raster_file, find_raster_files, imagery_valid
from lcmap.geodata.label_mosaic import Grid, LabelMosaic
from lcmap.geodata.legends import IGNORE_INDEX, Legend

__all__ = [
    "HRImagery",
    "LabelRaster",
    "LabelledImagery",
    "find_raster_files",
    "check_raster_file",
    "open_imagery",
    "open_labels",
    "pair_imagery_labels",
    "read_imagery",
    "imagery_valid",
    "encode_labels",
    "RASTER_SUFFIXES",
]


class _CheckedRaster(RasterDataset):
    """RasterDataset over an explicit, pre-checked list of files."""

    filename_glob = "*"
    what = "raster"

    def query_grid(self, query: Any) -> tuple[tuple[float, float, float, float], Grid]:
        """A sampler query's bounds (CRS units) and its pixel grid in this dataset's CRS, at the
        query's step when it has one, else at the dataset's resolution."""
        xmin, ymin, xmax, ymax = query_bounds(query)
        res_x, res_y = self.res
        if isinstance(query, tuple) and query[0].step is not None:
            res_x, res_y = query[0].step, query[1].step
        w = int(round((xmax - xmin) / res_x))
        h = int(round((ymax - ymin) / res_y))
        return (xmin, ymin, xmax, ymax), Grid(self.crs, from_origin(xmin, ymax, res_x, res_y), (h, w))

    def __init__(
        self,
        paths,
        crs: CRS | None = None,
        res: float | tuple[float, float] | None = None,
        transforms=None,
        profiles=None,
    ) -> None:
        files = find_raster_files(paths, self.what)
        if profiles is None:  # LabelRaster passes the profiles its LabelMosaic has checked
            profiles = [check_raster_file(f, self.what) for f in files]
        counts = {p["count"] for p in profiles}
        if len(counts) > 1:
            raise LcmapInputError(f"{self.what} files have different band counts {sorted(counts)}: {files}")
        self.count = counts.pop()
        self.file_nodata = sorted({p["nodata"] for p in profiles if p["nodata"] is not None})
        self.file_dtype = profiles[0]["dtype"]
        #: the distinct CRSs of the files (first file's first); the dataset reads in ``self.crs``
        self.file_crs: list[CRS] = []
        for p in profiles:
            if p["crs"] is not None and p["crs"] not in self.file_crs:
                self.file_crs.append(p["crs"])
        #: each file's CRS, pixel size ``(x, y)`` in its CRS units and bounds, in file order
        self.file_grids: list[tuple[CRS | None, tuple[float, float], tuple[float, ...]]] = [
            (p["crs"], (float(p["res"][0]), float(p["res"][1])), tuple(p["bounds"])) for p in profiles
        ]
        super().__init__(files, crs=crs, res=res, transforms=transforms, cache=True)


class HRImagery(_CheckedRaster):
    """High-resolution imagery (any band count; uint8, uint16 or float), as float32 ``image``.

    ``nodata``: the files' nodata value, else 0; a pixel is invalid where every band equals it.
    """

    is_image = True
    what = "imagery"

    @property
    def nodata(self) -> float:
        return float(self.file_nodata[0]) if self.file_nodata else 0.0


class LabelRaster(_CheckedRaster):
    """A land-cover raster (LR labels or HR reference): integer codes as a long ``mask``.

    Files are read through a :class:`~lcmap.geodata.label_mosaic.LabelMosaic`: where they overlap, the first
    file in sorted path order holding a label wins (the rule every lcmap reader follows).
    """

    is_image = False
    what = "label"

    def __init__(self, paths, legend: Legend, crs=None, res=None, what: str = "label") -> None:
        self.what = what
        self.legend = legend
        self.mosaic = LabelMosaic(paths, what=what, no_label_codes=legend.nodata)
        super().__init__(self.mosaic.paths, crs=crs, res=res, profiles=self.mosaic.profiles)
        self.fill_code = int(self.file_nodata[0]) if self.file_nodata else int(legend.nodata[0])

    def _files_in(self, xmin: float, ymin: float, xmax: float, ymax: float) -> list[str]:
        """Files whose footprint (in the dataset CRS) meets the box; cheaper than GeoPandas' .cx."""
        index = self.index
        if getattr(self, "_bounds_key", None) is not id(index):  # the CRS may change the index
            self._bounds_key = id(index)
            self._file_bounds = index.geometry.bounds.to_numpy()
            self._file_paths = list(index.filepath)
        b = self._file_bounds
        hit = (b[:, 0] < xmax) & (b[:, 2] > xmin) & (b[:, 1] < ymax) & (b[:, 3] > ymin)
        return [p for p, h in zip(self._file_paths, hit, strict=False) if h]

    def __getitem__(self, query) -> dict[str, Any]:
        """Codes on the query's grid, each file warped straight onto it by nearest neighbour.

        TorchGeo's own path warps a file to an intermediate grid at the file's resolution (e.g.
        30 m) and then resamples that to the query's (e.g. 1 m): the two steps can shift a class
        edge by up to half a coarse pixel. :meth:`LabelMosaic.read <lcmap.geodata.label_mosaic.LabelMosaic.read>`
        warps each file onto the exact output grid: every 1 m pixel takes the label pixel under its
        centre; where files overlap, the first in sorted path order holding a label wins.
        Returns ``{"mask": int64 (H, W)}``; pixels without a label hold the fill (nodata) code.
        """
        (xmin, ymin, xmax, ymax), grid = self.query_grid(query)
        if not self._files_in(xmin, ymin, xmax, ymax):
            raise IndexError(f"query {query} not found in {self.what} index with bounds {self.bounds}")
        codes = self.mosaic.read(grid, self.fill_code).codes
        sample: dict[str, Any] = {"mask": torch.from_numpy(codes.astype(np.int64))}
        if self.transforms is not None:
            sample = self.transforms(sample)
        return sample


def open_imagery(
    paths: str | Path | Sequence[str | Path], crs: CRS | None = None, res: tuple[float, float] | None = None
) -> HRImagery:
    """Open imagery files/folders as one dataset.

    Args:
        crs: the CRS to read in (files in another CRS are warped on the fly); None: the first file's.
        res: pixel size ``(x, y)`` in ``crs`` units; None: the first file's (warped to ``crs``).
    """
    return HRImagery(paths, crs=crs, res=res)


def open_labels(paths, legend: Legend, what: str = "label") -> LabelRaster:
    """Open a land-cover product (any CRS/resolution) with its legend."""
    return LabelRaster(paths, legend=legend, what=what)


def encode_labels(codes: np.ndarray, labels: LabelRaster, source: str, option: str | None = "--legend") -> np.ndarray:
    """Raster codes -> legend indices; the files' own nodata values count as nodata too. ``option``:
    the command-line option that chose the legend (named when codes do not fit it)."""
    codes = np.asarray(codes)
    extra = [v for v in labels.file_nodata if v not in labels.legend.codes]
    if extra:
        codes = np.where(np.isin(codes, extra), labels.legend.nodata[0], codes)
    return labels.legend.encode(codes, source=source, option=option)


class LabelledImagery(IntersectionDataset):
    """``imagery & labels``, yielding ``{"image": float32 (C, H, W), "mask": int64 (H, W)}``.

    ``mask`` holds legend indices ``0..K-1``; IGNORE_INDEX where the label is nodata, the imagery
    is nodata, or the pixel centre lies outside ``aoi`` (a shapely geometry in the imagery CRS).
    ``image`` keeps the imagery's raw values (normalisation happens on the device).
    """

    def __init__(self, imagery: HRImagery, labels: LabelRaster, aoi: shapely.Geometry | None = None) -> None:
        try:
            with _without_grid_notices():
                super().__init__(imagery, labels)
        except RuntimeError as exc:
            raise LcmapInputError(
                f"imagery and labels do not overlap: imagery bounds {_fmt_bounds(imagery)} vs labels "
                f"in {imagery.crs.to_string()} {_fmt_bounds(labels)}. Check that both cover the same "
                "area (and their CRS)."
            ) from exc
        self.imagery = imagery
        self.labels = labels
        self.aoi = aoi

    @property
    def aoi(self) -> shapely.Geometry | None:
        """AOI geometry in the imagery CRS (None: everywhere)."""
        return self._aoi

    @aoi.setter
    def aoi(self, geometry: shapely.Geometry | None) -> None:
        self._aoi = geometry
        self._aoi_prepared = prep(geometry) if geometry is not None else None

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_aoi_prepared"] = None  # prepared geometries do not pickle
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self.aoi = state["_aoi"]

    def __getitem__(self, query) -> dict[str, Any]:
        sample = super().__getitem__(query)
        xmin, ymin, xmax, ymax = query_bounds(query)
        image = sample["image"]
        if image.ndim == 4:  # torchgeo >= 0.10 may add a time axis
            image = image[0]
        mask = sample["mask"]
        if mask.ndim == 3:
            mask = mask[0]
        h, w = mask.shape[-2:]
        idx = encode_labels(mask.numpy(), self.labels, source=", ".join(self.labels.files[:3]))
        idx = idx.astype(np.int64)
        res_x, res_y = (xmax - xmin) / w, (ymax - ymin) / h
        if self._aoi_prepared is not None and self._aoi_prepared.contains(shapely.box(xmin, ymin, xmax, ymax)):
            inside = np.ones((h, w), dtype=bool)
        else:
            inside = rasterize_aoi(self.aoi, from_origin(xmin, ymax, res_x, res_y), (h, w))
        valid = imagery_valid(image, self.imagery.nodata).numpy()
        idx[~(inside & valid)] = IGNORE_INDEX
        return {"image": image, "mask": torch.from_numpy(idx)}


#: What TorchGeo prints (``print``, every version up to 0.10) when IntersectionDataset puts the
#: second dataset on the first's CRS and resolution.
_GRID_NOTICE = re.compile(r"Converting \w+ (res|CRS) from .* to .*\n?")


@contextlib.contextmanager
def _without_grid_notices() -> Iterator[None]:
    """Drop TorchGeo's "Converting LabelRaster res from (30.0, 30.0) to (1.0, 1.0)" lines.

    Labels landing on the imagery's grid is what :class:`LabelledImagery` is for, not news for
    the user. Only those lines are dropped: anything else printed meanwhile is written to stdout
    afterwards, and warnings and logging are untouched.
    """
    printed = io.StringIO()
    try:
        with contextlib.redirect_stdout(printed):
            yield
    finally:
        kept = [line for line in printed.getvalue().splitlines(keepends=True) if not _GRID_NOTICE.fullmatch(line)]
        if kept:
            sys.stdout.write("".join(kept))


def _fmt_bounds(ds: RasterDataset) -> str:
    x, y, _ = ds.bounds
    return f"({x.start:.1f}, {y.start:.1f}, {x.stop:.1f}, {y.stop:.1f})"


def pair_imagery_labels(
    imagery_paths, label_paths, legend: Legend, aoi: shapely.Geometry | None = None
) -> LabelledImagery:
    """Open and pair imagery with LR labels (imagery first: its CRS and 1 m grid win)."""
    imagery = open_imagery(imagery_paths)
    labels = open_labels(label_paths, legend)
    return LabelledImagery(imagery, labels, aoi=aoi)


def read_imagery(ds: HRImagery, xmin: float, ymin: float, xmax: float, ymax: float) -> tuple[np.ndarray, np.ndarray]:
    """Read a window of imagery on the dataset's grid.

    Args:
        ds: the imagery dataset.
        xmin, ymin, xmax, ymax: window bounds in ``ds.crs`` units; should be whole pixels.

    Returns:
        ``(image, valid)``: float32 ``(C, H, W)`` raw values, and bool ``(H, W)`` valid pixels
        (False where no file covers the pixel or every band equals the nodata value).
    """
    res_x, res_y = ds.res
    w = int(round((xmax - xmin) / res_x))
    h = int(round((ymax - ymin) / res_y))
    x, y, _ = ds.bounds
    if xmax <= x.start or xmin >= x.stop or ymax <= y.start or ymin >= y.stop:
        return np.full((ds.count, h, w), ds.nodata, np.float32), np.zeros((h, w), bool)
    try:
        sample = RasterDataset.__getitem__(ds, (slice(xmin, xmax, res_x), slice(ymin, ymax, res_y)))
    except IndexError:
        return np.full((ds.count, h, w), ds.nodata, np.float32), np.zeros((h, w), bool)
    image = sample["image"]
    if image.ndim == 4:
        image = image[0]
    image = image.numpy().astype(np.float32, copy=False)
    return image, imagery_valid(image, ds.nodata)

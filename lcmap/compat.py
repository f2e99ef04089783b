"""The few places where TorchGeo releases differ (0.8 on Python 3.11; 0.9/0.10 on Python 3.12+).

- 0.8: samples carry ``crs`` and ``bounds`` (the query's slices); samplers are
  ``RandomGeoSampler`` / ``GridGeoSampler`` and sample inside an ROI's *bounding box*.
- 0.9: ``bounds`` became a float64 tensor and ``crs`` was dropped; ``transform`` was added.
- 0.10: ``RandomPatchSampler`` / ``GriddedPatchSampler`` (points drawn inside the ROI polygon,
  eroded by half a patch), ``trainers`` renamed ``tasks``.

lcmap never reads ``bounds``/``crs``/``transform`` from samples: it derives a window's bounds from
the query it was asked for (:func:`query_bounds`), which every release passes as slices.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import shapely
import torch
import torchgeo
from shapely.prepared import prep

from lcmap.errors import AOITooSmallError

TORCHGEO_VERSION = tuple(int(p) for p in torchgeo.__version__.split(".")[:2])
HAS_PATCH_SAMPLERS = TORCHGEO_VERSION >= (0, 10)

__all__ = ["TORCHGEO_VERSION", "query_bounds", "random_patch_sampler", "grid_patch_sampler"]


def query_bounds(query: Any) -> tuple[float, float, float, float]:
    """(xmin, ymin, xmax, ymax) of a sampler query (a tuple of 2 or 3 slices), CRS units."""
    x, y = query[0], query[1]
    return float(x.start), float(y.start), float(x.stop), float(y.stop)


if HAS_PATCH_SAMPLERS:  # torchgeo >= 0.10
    # (mypy runs against torchgeo 0.8, which lacks these names)
    from torchgeo.samplers import GriddedPatchSampler as _Grid  # type: ignore[attr-defined]
    from torchgeo.samplers import RandomPatchSampler as _Random  # type: ignore[attr-defined]

    def random_patch_sampler(dataset, size_px: int, length: int, roi=None, seed: int = 0):
        """Random patches of ``size_px`` pixels whose centres lie inside ``roi`` (a polygon)."""
        return _Random(dataset, size=size_px, length=length, roi=roi, generator=seed)

    def grid_patch_sampler(dataset, size_px: int, stride_px: int, roi=None):
        """A non-overlapping (``stride_px == size_px``) or overlapping grid of patches."""
        return _Grid(dataset, size=size_px, stride=stride_px, roi=roi)

else:  # torchgeo 0.8 / 0.9
    from torchgeo.samplers import GridGeoSampler as _Grid
    from torchgeo.samplers import RandomGeoSampler as _RandomGeo

    class _InsideROISampler(_RandomGeo):
        """RandomGeoSampler that keeps only windows whose centre lies inside the ROI polygon.

        TorchGeo 0.8 samples inside the ROI's bounding box per file; with a multi-polygon AOI
        that would mostly draw patches outside it. This draws until ``length`` windows fall
        inside (as 0.10's RandomPatchSampler does by construction).
        """

        def __init__(self, dataset, size_px: int, length: int, roi, seed: int) -> None:
            generator = torch.Generator().manual_seed(seed)
            super().__init__(dataset, size=size_px, length=length, roi=roi, generator=generator)
            self._roi = prep(roi) if roi is not None else None
            self._seed_generator = generator

        def __iter__(self) -> Iterator[tuple[slice, slice, slice]]:
            produced, tries = 0, 0
            while produced < self.length:
                for query in super().__iter__():
                    tries += 1
                    if self._roi is not None:
                        xmin, ymin, xmax, ymax = query_bounds(query)
                        if not self._roi.contains(shapely.Point((xmin + xmax) / 2, (ymin + ymax) / 2)):
                            if tries > 1000 * max(self.length, 1):
                                raise AOITooSmallError("the AOI is too small or thin to draw patches from")
                            continue
                    yield query
                    produced += 1
                    if produced >= self.length:
                        return

    def random_patch_sampler(dataset, size_px: int, length: int, roi=None, seed: int = 0):
        """Random patches of ``size_px`` pixels whose centres lie inside ``roi`` (a polygon)."""
        # torch.multinomial in RandomGeoSampler uses the global RNG for the file choice.
        torch.manual_seed(seed)
        return _InsideROISampler(dataset, size_px, length, roi, seed)

    def grid_patch_sampler(dataset, size_px: int, stride_px: int, roi=None):
        """A non-overlapping (``stride_px == size_px``) or overlapping grid of patches."""
        return _Grid(dataset, size=size_px, stride=stride_px, roi=roi)

"""The old label as a prior at prediction (``lcmap predict --label-prior LABELS``): Bayes' rule with
the legend's compositions.

For a pixel whose LR label is class ``k`` (the label files read onto the map grid by nearest
neighbour, :class:`~lcmap.geodata.label_mosaic.LabelMosaic`), the map's class is::

    argmax_t  p_t * M[k, t] / pi_t

- ``p_t``: the network's blended probability of target class ``t`` at the pixel;
- ``M``: the composition table of the model's LR legend
  (:func:`lcmap.geodata.compositions.composition_table`; e.g. NLCD 81 "Pasture/Hay" is 86 % low
  vegetation, 11 % tree canopy);
- ``pi_t = sum_k f_k M[k, t]``: the class mix the network was trained towards, ``f_k`` the
  frequency of LR class ``k`` in the training patches (recorded in the checkpoint as
  ``label_frequency``), floored at :data:`MIN_CLASS_MIX`.

This is the posterior of ``t`` given both the image and the label when the two are independent
given the class: the network's ``p_t`` already carries the training mix ``pi_t`` once, so it is
divided out before the label's own mix is multiplied in. A confident network overrules the label
(a meadow the image shows clearly inside a forest cell stays low vegetation); where the network is
unsure (imagery unlike anything it was trained on), the label decides. Pixels without a label, or
whose class has no composition, keep ``p``. No parameter is tuned: the compositions are the
legend's published ones, the mix is the training labels'.

With ``--confidence`` the confidence is the maximum of ``p_t M[k, t] / pi_t`` normalised over ``t``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from rasterio.crs import CRS
from rasterio.transform import from_bounds

from lcmap.errors import LcmapInputError
from lcmap.geodata.legends import IGNORE_INDEX, Legend
from lcmap.geodata.remote import absolute_input
from lcmap.pipeline.prediction.tile_cache import TileCache

__all__ = ["MIN_CLASS_MIX", "PredictionPrior", "PriorReader", "prediction_prior", "training_class_mix"]

#: ``pi_t`` is floored at this fraction: a target class (almost) absent from the training labels
#: would otherwise have its probability multiplied without bound.
MIN_CLASS_MIX = 0.01
#: Side (map px) of the tiles in which a worker reads the labels (on the CRS's pixel lattice).
PRIOR_TILE_PX = 512
#: Label tiles a worker keeps (bytes; 0.5 MB a tile): two rows of tiles of a task's widest strips.
PRIOR_CACHE_BYTES = 48 * 2**20


def training_class_mix(label_frequency: Any, composition: np.ndarray) -> np.ndarray:
    """``pi`` (float64 ``(T,)``, sums to 1 unless no class has a composition): the target-class mix
    of training labels whose LR classes occur with ``label_frequency`` ``(K,)`` (fractions of the
    labelled pixels), each class holding its row of ``composition`` ``(K, T)``."""
    f = np.asarray(label_frequency, dtype=np.float64)
    if f.shape != (composition.shape[0],):
        raise ValueError(f"{f.size} label frequencies for {composition.shape[0]} label classes")
    has = composition.sum(axis=1) > 0
    f = np.where(has, f, 0.0)
    total = f.sum()
    return (f @ composition) / total if total > 0 else np.zeros(composition.shape[1])


@dataclass(frozen=True)
class PredictionPrior:
    """What a worker needs to apply the prior (small, picklable).

    Attributes:
        label_files: the LR label files (absolute paths or URLs).
        legend: the LR legend (:meth:`Legend.to_dict`) the files' codes are in.
        factors: ``(K, C)`` per LR class ``k`` and map channel ``c``: ``M[k, t] / pi_t`` for the
            target class ``t`` of channel ``c``, 1 for a class without a composition and for a
            channel without a target class.
        class_mix: ``pi`` per target class (recorded with the map).
    """

    label_files: tuple[str, ...]
    legend: dict[str, Any]
    factors: tuple[tuple[float, ...], ...]
    class_mix: tuple[float, ...]

    def factor_table(self) -> np.ndarray:
        """float32 ``(K + 1, C)``: :attr:`factors` and a last row of ones (pixels without a label)."""
        f = np.asarray(self.factors, dtype=np.float32)
        return np.vstack([f, np.ones((1, f.shape[1]), np.float32)])

    def record(self) -> dict[str, Any]:
        """For the resume manifest and the map's tags (JSON types)."""
        return {
            "label_files": list(self.label_files),
            "legend": self.legend.get("name"),
            "class_mix": [round(v, 6) for v in self.class_mix],
            "factors": [[round(v, 6) for v in row] for row in self.factors],
        }


def prediction_prior(
    tm: Any, label_files: list[str], legend_mode: str, n_channels: int, grid_crs_wkt: str, grid_bounds: tuple
) -> PredictionPrior:
    """The prior of model ``tm`` (a :class:`~lcmap.pipeline.runs.TrainedModel`) with the LR labels
    ``label_files`` (already resolved), for a map of ``n_channels`` channels (``--legend``
    ``legend_mode``) over ``grid_bounds`` ``(xmin, ymin, xmax, ymax)`` in ``grid_crs_wkt``.

    Raises:
        LcmapInputError: the map is not a target-class map; the model was trained on fused label
            products or does not record its training labels' class mix; no label file meets the map.
    """
    from lcmap.geodata.compositions import composition_table
    from lcmap.geodata.label_mosaic import Grid, LabelMosaic

    hp = tm.hparams
    if legend_mode != "target":
        raise LcmapInputError(
            "--label-prior combines the network with the label on the target classes: use it with --legend target"
        )
    if (hp.get("config") or {}).get("label_products"):
        raise LcmapInputError(
            f"model {tm.checkpoint} was trained on fused label products: --label-prior needs a model trained "
            "on one LR product (--labels/--legend)"
        )
    freq = hp.get("label_frequency")
    if freq is None:
        raise LcmapInputError(
            f"model {tm.checkpoint} does not record the class mix of its training labels (trained by an older "
            "lcmap): train it again to use --label-prior"
        )
    legend = Legend.from_dict(hp.get("label_legend") or hp["legend"], source=str(tm.checkpoint))
    table = composition_table(legend).mean
    pi = np.maximum(training_class_mix(freq, table), MIN_CLASS_MIX)
    target = list(legend.target.names)
    map_names = list(tm.legend.target.names)
    if map_names != target:
        raise LcmapInputError(f"model {tm.checkpoint}: its target classes differ from its label legend's")
    factors = np.ones((len(legend), n_channels), dtype=np.float64)
    for k in range(len(legend)):
        if table[k].sum() > 0:
            factors[k, : len(target)] = table[k] / pi
    mosaic = LabelMosaic(label_files, "label-prior", no_label_codes=legend.nodata)
    probe = Grid.of(CRS.from_wkt(grid_crs_wkt), from_bounds(*grid_bounds, width=1, height=1), 1, 1)
    if not mosaic.meets(probe):
        raise LcmapInputError(
            f"--label-prior: none of the {len(mosaic.paths)} label file(s) ({mosaic.paths[0]} ...) overlaps the map"
        )
    return PredictionPrior(
        label_files=tuple(absolute_input(p) for p in mosaic.paths),  # a URL as it is
        legend=legend.to_dict(),
        factors=tuple(tuple(float(v) for v in row) for row in factors),
        class_mix=tuple(float(v) for v in pi),
    )


class PriorReader:
    """A worker's reader of the prior's factors on the map grid (label files opened lazily, in the
    process that reads them).

    Args:
        prior: the :class:`PredictionPrior`.
        crs_wkt, transform: the map grid (its pixel ``(0, 0)`` at the transform's origin).
    """

    def __init__(self, prior: PredictionPrior, crs_wkt: str, transform: Any) -> None:
        from lcmap.geodata.label_mosaic import LabelMosaic

        self.prior = prior
        self.legend = Legend.from_dict(prior.legend)
        self.table = prior.factor_table()
        self.crs = CRS.from_wkt(crs_wkt)
        self.transform = transform
        self.mosaic = LabelMosaic(list(prior.label_files), "label-prior", no_label_codes=self.legend.nodata)
        # tiles on the CRS's pixel lattice: the map's pixel (0, 0) is global (row, column) origin
        origin = (math.floor(-transform.f / -transform.e + 1e-6), math.floor(transform.c / transform.a + 1e-6))
        self._tiles = TileCache(PRIOR_TILE_PX, PRIOR_CACHE_BYTES, origin)

    def labels(self, r0: int, r1: int, c0: int, c1: int) -> np.ndarray:
        """LR legend indices (int64 ``(r1 - r0, c1 - c0)``; ``K`` = no label) of map rows
        ``[r0, r1)`` and columns ``[c0, c1)``, cut from tiles of :data:`PRIOR_TILE_PX` on the CRS's
        pixel lattice (:class:`~lcmap.pipeline.prediction.tile_cache.TileCache`), so a pixel's label
        does not depend on the block, the task or the map's extent (reprojecting each window asked
        for gave other nearest label cells at 8-65 pixels per 0.1-3 Mpx window).

        Raises:
            UnknownLabelError: a file holds codes outside the legend (listed, with the file).
        """
        from rasterio.transform import Affine

        from lcmap.geodata.label_mosaic import Grid

        def load(tr: int, tc: int) -> np.ndarray:
            T = PRIOR_TILE_PX
            grid = Grid.of(self.crs, self.transform * Affine.translation(tc, tr), T, T)
            index = self.mosaic.read_index(grid, self.legend, option="--label-prior")
            return np.where(index == IGNORE_INDEX, len(self.legend), index).astype(np.int16)

        return self._tiles.window("labels", r0, r1, c0, c1, load).astype(np.int64)

    def factors(self, r0: int, r1: int, c0: int, c1: int) -> np.ndarray:
        """float32 ``(C, r1 - r0, c1 - c0)``: the factor of each map channel at each pixel."""
        return np.ascontiguousarray(np.moveaxis(self.table[self.labels(r0, r1, c0, c1)], -1, 0))

    def close(self) -> None:
        self.mosaic.close()

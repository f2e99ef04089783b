"""Several label products fused into one training label, per 1 m pixel (SinoLC-1 style).

Each product (its files and legend, in any CRS and resolution) is read onto the imagery grid by
nearest neighbour (:meth:`lcmap.geodata.label_mosaic.LabelMosaic.read_target`) and its codes mapped to their
TARGET class (the legend's ``target``). Per pixel, over the products that have a label there
(nodata, or a class without a target, counts as "no label": the other products decide):

- ``partial`` (default): the products agree -> that target class; they disagree -> the partial
  label "one of these target classes" (trained with the partial-label cross-entropy);
- ``agree``: the products agree -> that class; they disagree -> ignored (IGNORE_INDEX);
- ``first``: the class of the first product (in the order given) that has a label there.

Encoding of the fused label: a **bit mask of acceptable target classes**, ``sum(1 << t)`` over the
target indices ``t`` (1..2**N - 1 for N target classes; 0 = no label). It is read as the codes of the
*fused legend* (:func:`fused_legend`): the N target classes first (codes ``1 << t``, in target
order, so legend index ``t`` = target class ``t`` = network output channel ``t``), then one class per
set of two or more target classes (code = its bit mask, no target, declared ``mixed`` with the set's
names). The set classes are thus ordinary mixed classes: their label accepts the plain classes of
the set (:func:`lcmap.pipeline.training.label_classes.allowed_classes_for`), and the network has only the N
target outputs.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from lcmap.geodata.datasets import LabelRaster, _CheckedRaster
from lcmap.geodata.label_mosaic import Grid
from lcmap.geodata.legends import IGNORE_INDEX, Legend, LegendClass, TargetScheme

__all__ = ["FUSION_RULES", "FusedLabelRaster", "fuse_targets", "fused_legend"]

#: The fusion rules, the default first.
FUSION_RULES = ("partial", "agree", "first")
#: The most target classes a bit-mask label can hold (2**7 - 1 = 127 fused classes < IGNORE_INDEX).
MAX_TARGET_CLASSES = 7


def fused_legend(scheme: TargetScheme) -> Legend:
    """The legend of fused labels over ``scheme`` (codes = bit masks of target classes, nodata 0).

    Classes: the ``N`` target classes first (code ``1 << t``), then every set of two or more target
    classes (code = its bit mask, ascending; no target; ``mixed`` = the set's names).
    """
    n = len(scheme)
    if n > MAX_TARGET_CLASSES:
        raise ValueError(f"label fusion handles at most {MAX_TARGET_CLASSES} target classes, not {n}")
    classes = [LegendClass(1 << t, c.name, c.color, c.name) for t, c in enumerate(scheme.classes)]
    for mask in range(1, 1 << n):
        members = [t for t in range(n) if mask >> t & 1]
        if len(members) < 2:
            continue
        names = tuple(scheme.classes[t].name for t in members)
        classes.append(LegendClass(mask, " or ".join(names), (128, 128, 128), None, names))
    return Legend(name=f"fused-{scheme.name}", classes=tuple(classes), nodata=(0,), target=scheme)


def fuse_targets(targets: np.ndarray, rule: str) -> np.ndarray:
    """Fuse per-product target classes into fused codes (bit masks; 0 = no label).

    Args:
        targets: ``(P, H, W)`` uint8 target indices of the ``P`` products, in the order given,
            IGNORE_INDEX where a product has no label (nodata or a class without a target).
        rule: ``partial``, ``agree`` or ``first`` (see the module docs). Products without a label
            at a pixel take no part there: the others decide; no product -> 0.

    Returns:
        ``(H, W)`` uint16 codes of :func:`fused_legend`.
    """
    if rule not in FUSION_RULES:
        raise ValueError(f"unknown label fusion rule {rule!r}: {', '.join(FUSION_RULES)}")
    targets = np.asarray(targets)
    valid = targets != IGNORE_INDEX
    bits = np.where(valid, np.left_shift(1, np.where(valid, targets, 0).astype(np.uint16)), 0).astype(np.uint16)
    if rule == "first":
        first = np.argmax(valid, axis=0)  # the first product with a label (0 where none: its bits are 0)
        return np.take_along_axis(bits, first[None], axis=0)[0]
    union = np.bitwise_or.reduce(bits, axis=0)
    if rule == "partial":
        return union
    single = (union & (union - 1)) == 0  # one class (or none): the products agree
    return np.where(single, union, 0).astype(np.uint16)


class FusedLabelRaster(_CheckedRaster):
    """Several label products read as one fused label raster (codes of :func:`fused_legend`).

    Its file index is the union of the products' files (any CRSs), so a pixel where only one product
    has data still has a label. ``mask`` samples hold fused codes (bit masks, 0 = no label), which
    :class:`~lcmap.geodata.datasets.LabelledImagery` encodes with ``self.legend`` like one product's.

    Args:
        products: one :class:`~lcmap.geodata.datasets.LabelRaster` per product, in order.
        rule: ``partial``, ``agree`` or ``first``.
    """

    is_image = False
    what = "label"

    def __init__(self, products: Sequence[LabelRaster], rule: str) -> None:
        if rule not in FUSION_RULES:
            raise ValueError(f"unknown label fusion rule {rule!r}: {', '.join(FUSION_RULES)}")
        schemes = {p.legend.target for p in products}
        if len(schemes) != 1:
            raise ValueError("the label products' legends map onto different target schemes")
        self.products = list(products)
        self.rule = rule
        self.legend = fused_legend(self.products[0].legend.target)
        paths = [f for p in self.products for f in p.mosaic.paths]
        profiles = [pr for p in self.products for pr in p.mosaic.profiles]
        super().__init__(paths, profiles=profiles)
        self.file_nodata = []  # samples hold fused codes, whose only nodata is 0
        self.fill_code = 0

    def read_fused(self, grid: Grid) -> np.ndarray:
        """Fused codes (uint16 ``grid.shape``) on ``grid``."""
        targets = np.stack(
            [p.mosaic.read_target(grid, p.legend, option=f"the legend of product {i + 1}")
             for i, p in enumerate(self.products)]
        )  # fmt: skip
        return fuse_targets(targets, self.rule)

    def __getitem__(self, query: Any) -> dict[str, Any]:
        """Fused codes on the query's grid: ``{"mask": int64 (H, W)}`` (0 where no product has a label)."""
        _, grid = self.query_grid(query)
        if not any(p.mosaic.meets(grid) for p in self.products):
            raise IndexError(f"query {query} not found in the label products")
        sample: dict[str, Any] = {"mask": torch.from_numpy(self.read_fused(grid).astype(np.int64))}
        if self.transforms is not None:
            sample = self.transforms(sample)
        return sample

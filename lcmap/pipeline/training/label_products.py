"""Several label products for ``lcmap train`` (``--label-product``): opened, checked and fused.

The products are fused per pixel by :class:`lcmap.geodata.fusion.FusedLabelRaster` (rules and the
bit-mask encoding there). Training then uses the fused legend's indices as labels: indices below N
are the N target classes (the network's outputs, the run's legend is the target legend), the others
are sets of target classes trained with the partial-label cross-entropy (``allowed`` rows).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from lcmap.errors import LcmapInputError
from lcmap.geodata.legends import IGNORE_INDEX, Legend, target_legend

log = logging.getLogger("lcmap.train")

__all__ = ["FusedLabels", "label_product_flag", "open_label_products"]


@dataclass
class FusedLabels:
    """The opened products, fused.

    Attributes:
        labels: the fused label dataset (:class:`~lcmap.geodata.fusion.FusedLabelRaster`).
        label_legend: the fused legend (labels' legend indices = its class indices).
        net_legend: the target legend: the network's output classes and the run's legend.
        allowed: per fused index, the target indices its label accepts (one class for indices below
            N; the labels of rules ``agree`` and ``first`` never hold the others).
        label_counts: ``{fused index: pixels}`` of the products' classes over the area used (scan).
    """

    labels: Any
    label_legend: Legend
    net_legend: Legend
    allowed: list[list[int]]
    label_counts: dict[int, int]


def label_product_flag(product: dict[str, Any]) -> str:
    """How the user chose ``product``'s legend: ``--label-product 'PATHS=LEGEND' (the legend after '=')``,
    named when its codes do not fit that legend."""
    return f"--label-product '{','.join(map(str, product['labels']))}={product['legend']}' (the legend after '=')"


def open_label_products(
    products: list[dict[str, Any]], rule: str, bounds: tuple[float, float, float, float], crs: Any
) -> FusedLabels:
    """Open ``products`` (``[{"labels": [paths], "legend": name}]``), check their codes inside
    ``bounds`` (in ``crs``) and fuse them by ``rule``.

    Raises:
        LcmapInputError: a product's files or codes do not fit its legend, the legends map onto
            different target schemes, or no product has a label over the area.
    """
    from lcmap.geodata.datasets import open_labels
    from lcmap.geodata.fusion import FusedLabelRaster
    from lcmap.geodata.legends import get_legend
    from lcmap.pipeline.training.label_classes import allowed_classes_for, scan_label_codes

    opened: list[Any] = []
    counts: dict[int, int] = {}
    for i, prod in enumerate(products):
        legend = get_legend(prod["legend"])
        ds = open_labels(prod["labels"], legend, what=f"label product {i + 1}")
        found = scan_label_codes(ds, bounds, crs, option=label_product_flag(prod))
        lut = legend.index_to_target_lut()
        for idx, n in found.items():
            t = int(lut[idx])
            if t != IGNORE_INDEX:
                counts[t] = counts.get(t, 0) + n
        log.info("label product %d: %d file(s), legend %s", i + 1, len(ds.files), legend.name)
        opened.append(ds)
    schemes = {ds.legend.target for ds in opened}
    if len(schemes) != 1:
        raise LcmapInputError("the label products' legends map onto different target schemes; use one scheme")
    if not counts:
        raise LcmapInputError("the label products hold no target class over the imagery and AOI: check the paths")
    fused = FusedLabelRaster(opened, rule)
    legend = fused.legend
    allowed = allowed_classes_for(legend, legend.default_mixed_classes())
    if allowed is None:  # a scheme of one target class has no set class
        allowed = [[0]]
    log.info("label fusion: %s over %d products -> %s target classes", rule, len(opened), len(legend.target))
    return FusedLabels(fused, legend, target_legend(legend.target), allowed, counts)

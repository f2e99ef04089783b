"""Per-class loss weights from label frequencies (``1/sqrt(frequency)`` by default), and their record.

:func:`inverse_sqrt_frequency_weights` is the rule; :func:`class_weights_record` applies the
``class_weighting`` option and the ``label_trust`` factors to pixel counts and returns what
``RUN_DIR/class_weights.json`` holds.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np

from lcmap.errors import LcmapInputError

log = logging.getLogger("lcmap.train")

__all__ = ["MIN_FREQUENCY", "class_weights_record", "inverse_sqrt_frequency_weights", "log_class_table"]

#: Frequencies are floored at this value before ``1/sqrt``: a class seen on a handful of pixels
#: gets at most ~30x the weight of a class covering the whole area.
MIN_FREQUENCY = 1e-3


def inverse_sqrt_frequency_weights(
    counts: Sequence[int] | np.ndarray,
    occurs: Sequence[bool] | np.ndarray | None = None,
    min_frequency: float = MIN_FREQUENCY,
    power: float = 0.5,
) -> np.ndarray:
    """Class weights ``~ 1/sqrt(frequency)``, normalised to mean 1 over the classes present.

    Args:
        counts: pixels per class (legend index order), counted on sampled training patches.
        occurs: per class, whether the class occurs anywhere in the label files (from the scan
            done before training). A class missed by the sampled patches but occurring in the files
            gets the largest weight of the present classes; a class that never occurs gets 0 (it is
            never a target, so its weight has no effect). None: ``counts > 0``.
        min_frequency: frequencies are floored at this value before the square root.
        power: the exponent: 0.5 for ``1/sqrt(frequency)``, 1 for ``1/frequency``.

    Returns:
        float64 ``(K,)`` weights.

    Raises:
        ValueError: if no class has any pixel.
    """
    counts = np.asarray(counts, dtype=np.float64)
    present = counts > 0
    if not present.any():
        raise ValueError("no labelled pixel to compute class weights from")
    occurs_arr = present if occurs is None else (np.asarray(occurs, dtype=bool) | present)
    freq = counts / counts.sum()
    weights = np.zeros_like(counts)
    weights[present] = np.maximum(freq[present], min_frequency) ** -power
    weights[present] /= weights[present].mean()
    weights[occurs_arr & ~present] = weights[present].max()
    return weights


def class_weights_record(
    legend: Any,
    counts: np.ndarray,
    occurs: np.ndarray,
    method: str,
    label_trust: dict[int, float],
    n_patches: int,
    patch_px: int,
) -> dict[str, Any]:
    """The CE class weights and how they were obtained (the content of ``class_weights.json``).

    Args:
        legend: the LR legend (:class:`~lcmap.geodata.legends.Legend`).
        counts: ``(K,)`` pixels per class (legend index) in the sampled training patches.
        occurs: ``(K,)`` bool, whether the class occurs anywhere in the label files.
        method: ``inv_sqrt_freq``, ``inv_freq`` or ``none``.
        label_trust: ``{LR code: factor in [0, 1]}`` multiplying the class's weight.
        n_patches, patch_px: how many patches of which side (px) ``counts`` come from.

    Returns:
        A dict whose ``weights`` is the ``(K,)`` list of weights, or None for unweighted CE.

    Raises:
        LcmapInputError: ``label_trust`` leaves no labelled class with a weight.
    """
    power = 1.0 if method == "inv_freq" else 0.5
    computed = inverse_sqrt_frequency_weights(counts, occurs, power=power)
    if method == "none":
        computed = np.ones(len(legend))
    trust = np.array([label_trust.get(c, 1.0) for c in legend.codes])
    if not (trust * counts).any():
        raise LcmapInputError("label_trust gives every labelled class a weight of 0: nothing to learn from")
    computed = computed * trust
    weights = None if method == "none" and not label_trust else computed.tolist()
    freq = counts / counts.sum()
    return {
        "method": method,
        "label_trust": {str(k): v for k, v in sorted(label_trust.items())},
        "rule": f"w ~ max(frequency, 1e-3) ** -{power:g}, mean 1 over classes in the patches; classes "
        "absent from the patches but in the label files get the largest weight; classes "
        "never in the labels 0; then times the class's label_trust (default 1)",
        "patches": n_patches,
        "patch_px": patch_px,
        "weights": weights,
        "classes": [
            {
                "index": i,
                "code": c.code,
                "name": c.name,
                "target": c.target,
                "pixels": int(counts[i]),
                "frequency": float(freq[i]),
                "in_label_files": bool(occurs[i]),
                "trust": float(trust[i]),
                "weight": (float(weights[i]) if weights is not None else 1.0),
            }
            for i, c in enumerate(legend.classes)
        ],
    }


def log_class_table(record: dict[str, Any]) -> None:
    """Log the classes present over the AOI with their frequency and weight."""
    rows = [c for c in record.get("classes", []) if c["pixels"] > 0 or c["in_label_files"]]
    log.info("label classes over the AOI (%s weighting):", record.get("method"))
    for c in rows:
        log.info("  %4d %-30s %6.2f %%  weight %.3f", c["code"], c["name"][:30], 100 * c["frequency"], c["weight"])

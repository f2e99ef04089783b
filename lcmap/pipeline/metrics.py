"""Accuracy metrics from a confusion matrix (pure numpy).

Conventions:

- Confusion matrices have **rows = reference (truth)** and **columns = prediction**.
- Pixels whose truth or prediction is :data:`~lcmap.geodata.legends.IGNORE_INDEX` are left out.
- Every score is a plain Python ``float`` or ``None`` where it is undefined (never NaN), so the
  result can be written with ``json.dumps`` as is.

mIoU rule: the mean of the per-class IoU over the classes **present in the reference or in the
prediction** (a non-empty union). A class absent from both has no IoU (``None``) and is left out
of the mean; a class absent from the reference but predicted somewhere has IoU 0 and counts.

``miou_reference_classes``: the mean IoU over the classes present in the reference only. Use it to
compare two maps of the same area (e.g. a 1 m map and the LR baseline): both are then averaged
over the same classes. (Under the rule above, a map that leaves out a class the reference lacks
drops it from its mean, while a map that predicts it there averages in a 0.)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from lcmap.geodata.legends import IGNORE_INDEX

__all__ = ["MIOU_RULE", "confusion_matrix", "scores_from_confusion"]

#: How mIoU is averaged (the rule above, in words; written into metrics.json).
MIOU_RULE = (
    "mean IoU over the target classes present in the reference or in the prediction; "
    "a class absent from both is left out, a class predicted but absent from the reference counts "
    "with IoU 0"
)


def confusion_matrix(truth_idx: np.ndarray, pred_idx: np.ndarray, num_classes: int) -> np.ndarray:
    """Count (truth, prediction) pairs into a ``(num_classes, num_classes)`` int64 matrix.

    Args:
        truth_idx: reference class indices ``0 .. num_classes - 1``, or IGNORE_INDEX.
        pred_idx: predicted class indices, same shape, or IGNORE_INDEX.
        num_classes: number of classes.

    Returns:
        ``cm[i, j]`` = number of pixels of reference class ``i`` predicted as class ``j``.

    Raises:
        ValueError: if the shapes differ or a value other than IGNORE_INDEX is out of range.
    """
    truth = np.asarray(truth_idx).ravel()
    pred = np.asarray(pred_idx).ravel()
    if truth.shape != pred.shape:
        raise ValueError(f"truth and prediction differ in size ({truth.size} vs {pred.size})")
    if num_classes < 1 or num_classes >= IGNORE_INDEX:
        raise ValueError(f"num_classes must be in 1..{IGNORE_INDEX - 1}, got {num_classes}")
    keep = (truth != IGNORE_INDEX) & (pred != IGNORE_INDEX)
    truth = truth[keep].astype(np.int64, copy=False)
    pred = pred[keep].astype(np.int64, copy=False)
    if truth.size and (truth.min() < 0 or truth.max() >= num_classes or pred.min() < 0 or pred.max() >= num_classes):
        raise ValueError(f"class indices must be in 0..{num_classes - 1} or {IGNORE_INDEX}")
    counts = np.bincount(truth * num_classes + pred, minlength=num_classes * num_classes)
    return counts.reshape(num_classes, num_classes).astype(np.int64, copy=False)


def _ratio(num: float, den: float) -> float | None:
    return float(num) / float(den) if den > 0 else None


def scores_from_confusion(cm: np.ndarray, class_names: Sequence[str]) -> dict[str, Any]:
    """Overall and per-class scores from a confusion matrix (rows = reference, cols = prediction).

    Returns:
        A JSON-ready dict:

        - ``oa``: overall accuracy (trace / total); None if the matrix is empty.
        - ``miou``: mean IoU over the classes present in the reference or the prediction (see the
          module docstring); None if there is none.
        - ``miou_reference_classes``: mean IoU over the classes present in the reference; None if
          the reference is empty.
        - ``kappa``: Cohen's kappa ``(po - pe) / (1 - pe)``; None if empty or ``pe == 1``
          (a single class in both reference and prediction: agreement by chance is total).
        - ``per_class``: ``{name: {iou, precision, recall, f1, support_px}}``; ``support_px`` is the
          number of reference pixels of the class; iou/precision/recall/f1 are None where their
          denominator is 0 (precision: never predicted; recall: absent from the reference;
          iou and f1: absent from both).
        - ``confusion``: the matrix as a nested list of ints.
        - ``class_names``: the names, in matrix order.
    """
    cm = np.asarray(cm, dtype=np.int64)
    names = [str(n) for n in class_names]
    if cm.ndim != 2 or cm.shape[0] != cm.shape[1] or cm.shape[0] != len(names):
        raise ValueError(f"confusion matrix of shape {cm.shape} does not fit {len(names)} class names")
    total = int(cm.sum())
    tp = np.diag(cm)
    ref = cm.sum(axis=1)  # reference (truth) pixels per class
    pred = cm.sum(axis=0)  # predicted pixels per class

    per_class: dict[str, dict[str, Any]] = {}
    ious: list[float] = []
    ref_ious: list[float] = []
    for k, name in enumerate(names):
        t, r, p = int(tp[k]), int(ref[k]), int(pred[k])
        iou = _ratio(t, r + p - t)
        if iou is not None:
            ious.append(iou)
            if r > 0:
                ref_ious.append(iou)
        per_class[name] = {
            "iou": iou,
            "precision": _ratio(t, p),
            "recall": _ratio(t, r),
            "f1": _ratio(2 * t, r + p),
            "support_px": r,
        }

    oa = _ratio(int(tp.sum()), total)
    kappa = None
    if total > 0:
        po = float(tp.sum()) / total
        pe = float((ref.astype(np.float64) * pred.astype(np.float64)).sum()) / (float(total) ** 2)
        if pe < 1.0:
            kappa = (po - pe) / (1.0 - pe)
    return {
        "oa": oa,
        "miou": float(np.mean(ious)) if ious else None,
        "miou_reference_classes": float(np.mean(ref_ious)) if ref_ious else None,
        "kappa": kappa,
        "per_class": per_class,
        "confusion": cm.tolist(),
        "class_names": names,
    }

"""What an LR class holds at 1 m: the expected fraction of each target class (its *composition*).

A 30 m NLCD "Developed, Open Space" cell is not 100 % built-up at 1 m: in the Chesapeake region it
is on average 42 % tree canopy, 46 % low vegetation and 11 % built-up. A legend class may carry
such a :class:`Composition` (mean fraction per target class and, where known, its spread); the
prior losses (``lcmap train --label-loss prior|prior-plat|lsr|qr``,
:mod:`lcmap.pipeline.training.losses`) train on it instead of the class's single target.

Sources, per built-in legend (the tables below carry them):

- **NLCD**: Robinson et al., "Large Scale High-Resolution Land Cover Mapping with Multi-Resolution
  Data", CVPR 2019, published with its code as ``data/nlcd_mu.txt`` (mean) and
  ``data/nlcd_sigma.txt`` (standard deviation) in github.com/calebrob6/land-cover: the mean
  fraction of each 1 m Chesapeake class inside each NLCD 2011 class (Chesapeake Bay region; their
  "impervious" = barren + impervious + roads = lcmap's built-up). Their loader also raised the
  impervious share of NLCD 21-24 by 0.25 (``do_nlcd_means_tuning``); that tuning is NOT applied
  here (a YAML legend can carry it). NLCD 12 (ice/snow) has no target class and no composition.
- **GLC_FCS30**: its forest classes follow FAO LCCS cover ranges: "open" forest 15-40 % tree
  cover, "closed" forest more than 40 %. The range is taken as uniform: mean = its midpoint
  (0.275, 0.70 tree canopy), sigma = range / sqrt(12); the rest of the cell is the ground between
  the crowns (low vegetation). Its other classes give thresholds (e.g. "sparse vegetation" below
  15 % cover), not a composition over the target classes: they take the default below.
- **WorldCover, Esri, FROM-GLC10**: their class definitions give cover thresholds only (e.g.
  WorldCover "tree cover: a cover of 10 % or more", "built-up: urban green is not included"), no
  fraction of the other classes: every class takes the default below.
- **Chesapeake** (1 m) and the 4-class target legend: each class is itself (the default).

The default, where no percentage is published (:data:`DEFAULT_SIGMA` for the spread):

- a plain class is taken at its word: 1.0 of its own target class (what the cross-entropy on the
  LR label assumes);
- a class the legend declares *mixed* (``mixed``: e.g. Esri "Rangeland" = low vegetation or tree
  canopy, or a set of target classes of fused label products) is shared evenly by those classes;
- a class without a target (ice, clouds, nodata-like) has no composition: its pixels are ignored.

A user's YAML legend gives ``composition`` per class (:func:`parse_composition`): fractions per
target class, each a number or ``{mean: M, sigma: S}``; they must be >= 0 and sum to 1 within
:data:`SUM_TOLERANCE` (then they are renormalised).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from lcmap.errors import LcmapInputError

__all__ = [
    "BUILTIN_COMPOSITIONS",
    "DEFAULT_SIGMA",
    "SUM_TOLERANCE",
    "Composition",
    "CompositionTable",
    "class_composition",
    "composition_table",
    "parse_composition",
]

#: How far from 1 the fractions of a YAML composition may sum before they are an error.
SUM_TOLERANCE = 0.05
#: Spread (standard deviation of a fraction) where none is published: the value the published
#: NLCD table itself uses for its placeholder rows (NLCD 12, 51, 72-74 in ``nlcd_sigma.txt``).
DEFAULT_SIGMA = 0.10


@dataclass(frozen=True)
class Composition:
    """The expected fraction of each target class inside one LR class.

    Attributes:
        mean: ``(target name, fraction)`` pairs; fractions >= 0 summing to 1. Target classes
            not named hold 0.
        sigma: ``(target name, standard deviation)`` pairs where the spread is known (may be empty).
    """

    mean: tuple[tuple[str, float], ...]
    sigma: tuple[tuple[str, float], ...] = ()

    @property
    def names(self) -> tuple[str, ...]:
        """The target classes named (fraction given)."""
        return tuple(n for n, _ in self.mean)

    def fraction(self, name: str) -> float:
        return dict(self.mean).get(name, 0.0)

    def spread(self, name: str) -> float | None:
        return dict(self.sigma).get(name)

    def to_dict(self) -> dict[str, Any]:
        """As a YAML legend writes it: ``{target: fraction}`` or ``{target: {mean, sigma}}``."""
        sigma = dict(self.sigma)
        return {name: ({"mean": m, "sigma": sigma[name]} if name in sigma else m) for name, m in self.mean}


def parse_composition(value: Any, target_names: list[str], where: str) -> Composition:
    """A YAML ``composition`` entry -> :class:`Composition`, checked.

    Args:
        value: ``{target name: fraction}``; a fraction is a number or ``{mean: M, sigma: S}``.
        target_names: the target classes of the legend's scheme.
        where: names the file and the class in messages (``legend.yaml: class 21 (Developed ...)``).

    Raises:
        LcmapInputError: not a mapping, an unknown target class, a fraction that is not a number
            >= 0, a negative sigma, or fractions that do not sum to 1 within :data:`SUM_TOLERANCE`.
    """
    example = "e.g. composition: {tree canopy: 0.4, low vegetation: 0.6} or {built-up: {mean: 0.6, sigma: 0.2}, ...}"
    if not isinstance(value, dict) or not value:
        raise LcmapInputError(f"{where}: composition must map target classes to fractions ({example})")
    means: dict[str, float] = {}
    sigmas: dict[str, float] = {}
    for key, item in value.items():
        name = str(key).strip()
        if name not in target_names:
            raise LcmapInputError(
                f"{where}: composition names {name!r}, which is not a target class ({', '.join(target_names)})"
            )
        if isinstance(item, dict):
            unknown = sorted(set(map(str, item)) - {"mean", "sigma"})
            if unknown or "mean" not in item:
                raise LcmapInputError(
                    f"{where}: composition of {name!r} must be a number or {{mean, sigma}} ({example})"
                )
            mean, sigma = _number(item["mean"], where, name, "fraction"), item.get("sigma")
            if sigma is not None:
                sigmas[name] = _number(sigma, where, name, "sigma")
        else:
            mean = _number(item, where, name, "fraction")
        means[name] = mean
    total = sum(means.values())
    if abs(total - 1.0) > SUM_TOLERANCE:
        raise LcmapInputError(
            f"{where}: composition fractions sum to {total:.3f}, not 1 (within {SUM_TOLERANCE}); "
            "give the fraction of each target class inside this class"
        )
    if abs(total - 1.0) > 1e-9:  # renormalised (an exact sum is kept as given: a round trip is the identity)
        means = {n: m / total for n, m in means.items()}
    order = [n for n in target_names if n in means]
    return Composition(
        mean=tuple((n, means[n]) for n in order), sigma=tuple((n, sigmas[n]) for n in order if n in sigmas)
    )


def class_composition(entry: dict[str, Any], target_names: list[str], source: str) -> Composition | None:
    """The ``composition`` of one class of a YAML legend (None when absent), checked; errors name the
    file ``source`` and the class (code and name)."""
    value = entry.get("composition")
    where = f"{source}: class {entry.get('code')} ({entry.get('name')})"
    return None if value is None else parse_composition(value, target_names, where)


def _number(value: Any, where: str, name: str, what: str) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = math.nan
    if isinstance(value, bool) or not math.isfinite(number) or number < 0:
        raise LcmapInputError(f"{where}: composition {what} of {name!r} is {value!r}: it must be a number >= 0")
    return number


# ------------------------------------------------------------------------------ built-in tables
_W, _T, _L, _B = "water", "tree canopy", "low vegetation", "built-up"


def _row(mean: tuple[float, ...], sigma: tuple[float, ...], names: tuple[str, ...] = (_W, _T, _L, _B)) -> Composition:
    """A table row (fractions in ``names`` order), renormalised as :func:`parse_composition` does."""
    where = "built-in composition table"
    return parse_composition(
        {n: {"mean": m, "sigma": s} for n, m, s in zip(names, mean, sigma, strict=True) if m > 0 or s > 0},
        list(names),
        where,
    )


# fmt: off
#: NLCD 2011 class -> fractions of (water, tree canopy, low vegetation, built-up) at 1 m and their
#: standard deviations, Chesapeake Bay region: Robinson et al. CVPR 2019, calebrob6/land-cover
#: data/nlcd_mu.txt and data/nlcd_sigma.txt (rows in the order of data/nlcd_to_lr_labels.txt).
_NLCD_CHESAPEAKE: dict[int, tuple[tuple[float, ...], tuple[float, ...]]] = {
    11: ((.97, .01, .01, .02), (.15, .06, .06, .13)),
    21: ((.00, .42, .46, .11), (.05, .34, .33, .13)),
    22: ((.01, .31, .34, .35), (.06, .24, .21, .18)),
    23: ((.01, .14, .21, .63), (.07, .17, .19, .22)),
    24: ((.01, .03, .07, .89), (.07, .07, .14, .17)),
    31: ((.09, .13, .45, .32), (.26, .26, .41, .40)),
    41: ((.00, .92, .06, .01), (.03, .19, .16, .07)),
    42: ((.00, .94, .05, .01), (.03, .18, .16, .05)),
    43: ((.00, .92, .06, .02), (.05, .18, .15, .06)),
    52: ((.00, .71, .26, .03), (.05, .35, .33, .09)),
    71: ((.01, .38, .54, .07), (.09, .40, .39, .18)),
    81: ((.00, .11, .86, .03), (.02, .21, .23, .09)),
    82: ((.00, .11, .86, .03), (.03, .22, .24, .09)),
    90: ((.01, .90, .08, .00), (.07, .22, .21, .03)),
    95: ((.11, .07, .81, .01), (.21, .22, .29, .05)),
}
# fmt: on

#: FAO LCCS cover ranges used by GLC_FCS30's forest classes, as uniform distributions over the range.
_OPEN_FOREST = _row((0.275, 0.725), (0.25 / math.sqrt(12), 0.25 / math.sqrt(12)), (_T, _L))  # 15-40 % tree cover
_CLOSED_FOREST = _row((0.70, 0.30), (0.60 / math.sqrt(12), 0.60 / math.sqrt(12)), (_T, _L))  # 40-100 % tree cover

#: Legend name -> {code: composition}, for the built-in legends (see the module docs for the
#: sources and for the classes left to the default).
BUILTIN_COMPOSITIONS: dict[str, dict[int, Composition]] = {
    "nlcd": {code: _row(mean, sigma) for code, (mean, sigma) in _NLCD_CHESAPEAKE.items()},
    "glc_fcs30": {
        **{code: _OPEN_FOREST for code in (51, 61, 71, 81, 91)},
        **{code: _CLOSED_FOREST for code in (52, 62, 72, 82, 92)},
    },
}


# ------------------------------------------------------------------------------ as a matrix
@dataclass(frozen=True)
class CompositionTable:
    """A legend's compositions as arrays (legend index ``k``, target index ``t``).

    Attributes:
        mean: float64 ``(K, T)``: fraction of target ``t`` in class ``k``; rows sum to 1, or are all
            0 for a class without a composition (its pixels are ignored by the prior losses).
        sigma: float64 ``(K, T)``: spread of each fraction (:data:`DEFAULT_SIGMA` where unknown).
        source: per class, ``declared`` (the legend's own composition) or ``default`` or ``none``.
    """

    mean: np.ndarray
    sigma: np.ndarray
    source: tuple[str, ...]

    def record(self, legend: Any) -> dict[str, Any]:
        """A plain record for RUN_DIR and the checkpoint: per LR class its code, name, source and the
        mean and sigma per target class."""
        names = list(legend.target.names)
        return {
            "legend": legend.name,
            "target_classes": names,
            "classes": [
                {
                    "code": c.code,
                    "name": c.name,
                    "source": self.source[k],
                    "mean": {n: round(float(self.mean[k, t]), 6) for t, n in enumerate(names)},
                    "sigma": {n: round(float(self.sigma[k, t]), 6) for t, n in enumerate(names)},
                }
                for k, c in enumerate(legend.classes)
            ],
        }


def composition_table(legend: Any) -> CompositionTable:
    """The compositions of every class of ``legend`` (a :class:`~lcmap.geodata.legends.Legend`):
    its declared ones, else the default (module docs)."""
    names = list(legend.target.names)
    k, t = len(legend.classes), len(names)
    mean = np.zeros((k, t), dtype=np.float64)
    sigma = np.full((k, t), DEFAULT_SIGMA, dtype=np.float64)
    source = []
    for i, cls in enumerate(legend.classes):
        comp = getattr(cls, "composition", None)
        if comp is not None:
            for n, m in comp.mean:
                mean[i, names.index(n)] = m
            for n, s in comp.sigma:
                sigma[i, names.index(n)] = s
            source.append("declared")
            continue
        members = list(cls.mixed) or ([cls.target] if cls.target is not None else [])
        for n in members:
            mean[i, names.index(n)] = 1.0 / len(members)
        source.append("default" if members else "none")
    total = mean.sum(axis=1, keepdims=True)
    mean = np.divide(mean, total, out=np.zeros_like(mean), where=total > 0)
    return CompositionTable(mean=mean, sigma=sigma, source=tuple(source))

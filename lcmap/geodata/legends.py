"""Land-cover legends (class schemes) and their mapping onto common target classes.

A :class:`Legend` describes the codes found in one land-cover product (NLCD, ESA WorldCover,
...): each class has an integer ``code`` as stored in the raster, a ``name``, an RGB ``color`` and
the name of the ``target`` class it maps to (``None``: ignored when scoring on target classes)
and, for a class that is a mixture at 1 m, the target classes it may hold (``mixed``: trained as
"one of the classes of these target classes" unless the user overrides it, see
:meth:`Legend.default_mixed_classes`).
Codes listed in ``nodata`` become :data:`IGNORE_INDEX`; any other code that is not in the legend
is an error (:class:`UnknownLabelError`) that names the codes and the file.

The network predicts *legend indices* ``0 .. len(legend) - 1`` (the order of
``legend.classes``); output maps are written either in target classes (codes ``1 .. N``, 0 =
nodata) or in the legend's own codes.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from lcmap.errors import LcmapInputError
from lcmap.geodata.compositions import BUILTIN_COMPOSITIONS, Composition, class_composition
from lcmap.geodata.yaml_files import read_yaml

#: Label value ignored by the loss and by the metrics (nodata, outside the AOI).
IGNORE_INDEX = 255

#: Output code for nodata in written maps (target and native alike).
MAP_NODATA = 0

__all__ = [
    "IGNORE_INDEX",
    "MAP_NODATA",
    "Legend",
    "LegendClass",
    "TargetScheme",
    "TargetClass",
    "UnknownLabelError",
    "DEFAULT_TARGET",
    "BUILTIN_LEGENDS",
    "get_legend",
]


class UnknownLabelError(LcmapInputError):
    """A label raster holds codes that its legend does not define."""


def _hex_to_rgb(value: str | list | tuple) -> tuple[int, int, int]:
    if isinstance(value, (list, tuple)):
        rgb = tuple(int(v) for v in value)
        if len(rgb) != 3 or not all(0 <= v <= 255 for v in rgb):
            raise ValueError(f"colour {value!r} is not three values 0-255")
        return rgb[0], rgb[1], rgb[2]
    text = str(value).lstrip("#")
    if len(text) != 6:
        raise ValueError(f"colour {value!r} is not of the form '#rrggbb'")
    return (int(text[0:2], 16), int(text[2:4], 16), int(text[4:6], 16))


def _rgb_to_hex(rgb: tuple[int, int, int]) -> str:
    return "#{:02x}{:02x}{:02x}".format(*rgb)


@dataclass(frozen=True)
class TargetClass:
    """One common class of a target scheme; ``code`` is its value in written maps (1-based)."""

    code: int
    name: str
    color: tuple[int, int, int]


@dataclass(frozen=True)
class TargetScheme:
    """Common classes every legend is mapped onto for output and scoring."""

    name: str
    classes: tuple[TargetClass, ...]

    def __post_init__(self) -> None:
        codes = [c.code for c in self.classes]
        if MAP_NODATA in codes or len(set(codes)) != len(codes):
            raise ValueError(f"target scheme {self.name!r}: codes must be unique and not {MAP_NODATA}")

    @property
    def names(self) -> list[str]:
        return [c.name for c in self.classes]

    def __len__(self) -> int:
        return len(self.classes)

    def index_of(self, name: str) -> int:
        for i, c in enumerate(self.classes):
            if c.name == name:
                return i
        raise KeyError(f"target class {name!r} is not in scheme {self.name!r} ({', '.join(self.names)})")


#: The default target: 4 common classes, written as codes 1-4 (0 = nodata).
DEFAULT_TARGET = TargetScheme(
    name="4class",
    classes=(
        TargetClass(1, "water", (65, 155, 223)),
        TargetClass(2, "tree canopy", (57, 125, 73)),
        TargetClass(3, "low vegetation", (168, 204, 92)),
        TargetClass(4, "built-up", (196, 40, 27)),
    ),
)


@dataclass(frozen=True)
class LegendClass:
    """One class of a legend: raster ``code``, ``name``, RGB ``color``, ``target`` class name and,
    for a class that is a mixture at 1 m by its definition, the target classes it may hold
    (``mixed``; empty for a pure class), and what it holds at 1 m where known (``composition``,
    :mod:`lcmap.geodata.compositions`)."""

    code: int
    name: str
    color: tuple[int, int, int]
    target: str | None
    mixed: tuple[str, ...] = ()
    composition: Composition | None = None


@dataclass(frozen=True)
class Legend:
    """The classes of one land-cover product.

    Args:
        name: short identifier (``nlcd``, ``worldcover`` ...).
        classes: the real classes, in the order of the network's output channels.
        nodata: raster codes that mean "no data" (mapped to :data:`IGNORE_INDEX`).
        target: the scheme that ``LegendClass.target`` names refer to.
    """

    name: str
    classes: tuple[LegendClass, ...]
    nodata: tuple[int, ...] = (0,)
    target: TargetScheme = field(default=DEFAULT_TARGET)

    def __post_init__(self) -> None:
        codes = self.codes
        if len(set(codes)) != len(codes):
            raise ValueError(f"legend {self.name!r} repeats a code")
        if set(codes) & set(self.nodata):
            raise ValueError(f"legend {self.name!r}: a code is both a class and nodata")
        if not all(0 <= c <= 65535 for c in (*codes, *self.nodata)):
            raise ValueError(f"legend {self.name!r}: codes must be in 0-65535")
        if len(codes) >= IGNORE_INDEX:
            raise ValueError(f"legend {self.name!r} has too many classes ({len(codes)})")
        for c in self.classes:
            if c.target is not None:
                self.target.index_of(c.target)  # raises KeyError naming the scheme
            for name in (*c.mixed, *(c.composition.names if c.composition else ())):
                self.target.index_of(name)

    # ------------------------------------------------------------------ basics
    def __len__(self) -> int:
        return len(self.classes)

    @property
    def codes(self) -> list[int]:
        return [c.code for c in self.classes]

    @property
    def names(self) -> list[str]:
        return [c.name for c in self.classes]

    def default_mixed_classes(self) -> dict[int, list[str]]:
        """``{code: [target names]}`` of the classes the legend declares mixed (``lcmap train``
        uses them unless ``--mixed-class`` overrides a code or ``--no-default-mixed`` is given)."""
        return {c.code: list(c.mixed) for c in self.classes if c.mixed}

    # ------------------------------------------------------------------ lookup tables
    def code_to_index_lut(self) -> np.ndarray:
        """A uint16 table over codes 0..65535: legend index, IGNORE_INDEX for nodata, 65535 unknown.

        Built once per legend (``encode`` runs on every training sample); read-only.
        """
        return self._code_to_index_lut

    @functools.cached_property
    def _code_to_index_lut(self) -> np.ndarray:
        lut = np.full(65536, 65535, dtype=np.uint16)
        for code in self.nodata:
            lut[code] = IGNORE_INDEX
        for i, code in enumerate(self.codes):
            lut[code] = i
        lut.flags.writeable = False
        return lut

    def index_to_target_lut(self) -> np.ndarray:
        """uint8 table: legend index -> target index (0-based), IGNORE_INDEX where untargeted.

        Has 256 entries so that ``lut[IGNORE_INDEX] == IGNORE_INDEX``.
        """
        lut = np.full(256, IGNORE_INDEX, dtype=np.uint8)
        for i, c in enumerate(self.classes):
            if c.target is not None:
                lut[i] = self.target.index_of(c.target)
        return lut

    def index_to_target_group(self) -> np.ndarray:
        """int64 ``(K,)``: legend index -> target index, ``len(self.target)`` where untargeted.

        The channel each class's probability adds to when probabilities are summed per target
        class (one extra channel gathers the classes without a target).
        """
        t = self.index_to_target_lut()[: len(self)].astype(np.int64)
        return np.where(t == IGNORE_INDEX, len(self.target), t)

    def code_to_target_lut(self) -> np.ndarray:
        """uint8 table over codes 0..65535: target index; IGNORE_INDEX for nodata/untargeted/unknown."""
        idx = self.code_to_index_lut()
        out = np.full(65536, IGNORE_INDEX, dtype=np.uint8)
        known = idx < IGNORE_INDEX
        out[known] = self.index_to_target_lut()[idx[known]]
        return out

    # ------------------------------------------------------------------ encoding
    def encode(self, codes: np.ndarray, source: str | Path = "<array>", option: str | None = "--legend") -> np.ndarray:
        """Map raster codes to legend indices (uint8); nodata -> IGNORE_INDEX.

        ``option``: the command-line option that chose this legend (named in the message), or None.

        Raises:
            UnknownLabelError: if ``codes`` holds values outside the legend; the message lists the
                unknown codes, the file ``source`` and the legend's codes.
        """
        arr = np.asarray(codes)
        if arr.dtype.kind == "f":
            if np.isnan(arr).any():
                arr = np.where(np.isnan(arr), self.nodata[0], arr)
            if not np.all(arr == np.round(arr)):
                raise UnknownLabelError(f"{source}: label values are not whole numbers")
        if arr.size and (arr.min() < 0 or arr.max() > 65535):
            bad = np.unique(arr[(arr < 0) | (arr > 65535)])[:20]
            self._raise_unknown(bad, source, option)
        idx = self.code_to_index_lut()[arr.astype(np.int64)]
        if (idx == 65535).any():
            self._raise_unknown(np.unique(arr[idx == 65535]), source, option)
        return idx.astype(np.uint8)

    def _raise_unknown(self, bad: np.ndarray, source: str | Path, option: str | None = "--legend") -> None:
        shown = ", ".join(str(int(v)) for v in bad[:20])
        more = f" (+{len(bad) - 20} more)" if len(bad) > 20 else ""
        choose = f"with {option}" if option else "for it"
        raise UnknownLabelError(
            f"{source}: label values {shown}{more} are not in legend {self.name!r} "
            f"(codes {', '.join(map(str, self.codes))}; nodata {', '.join(map(str, self.nodata))}). "
            f"Choose the legend that matches this product {choose}, or describe it in a YAML "
            "legend file (code, name, color, target for each class)."
        )

    # ------------------------------------------------------------------ (de)serialisation
    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "nodata": list(self.nodata),
            "target": {
                "name": self.target.name,
                "classes": [
                    {"code": c.code, "name": c.name, "color": _rgb_to_hex(c.color)} for c in self.target.classes
                ],
            },
            "classes": [
                {"code": c.code, "name": c.name, "color": _rgb_to_hex(c.color), "target": c.target}
                | ({"mixed": list(c.mixed)} if c.mixed else {})
                | ({"composition": c.composition.to_dict()} if c.composition else {})
                for c in self.classes
            ],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "<dict>") -> Legend:
        try:
            target = DEFAULT_TARGET
            if data.get("target"):
                t = data["target"]
                target = TargetScheme(
                    name=str(t.get("name", "custom")),
                    classes=tuple(
                        TargetClass(int(c["code"]), str(c["name"]), _hex_to_rgb(c["color"])) for c in t["classes"]
                    ),
                )
            classes = tuple(
                LegendClass(
                    code=int(c["code"]),
                    name=str(c["name"]),
                    color=_hex_to_rgb(c.get("color", "#808080")),
                    target=(None if c.get("target") in (None, "", "none", "ignore") else str(c["target"])),
                    mixed=_mixed_names(c.get("mixed")),
                    composition=class_composition(c, target.names, source),
                )
                for c in data["classes"]
            )
            nodata = data.get("nodata", [0])
            nodata = tuple(int(v) for v in (nodata if isinstance(nodata, (list, tuple)) else [nodata]))
            return cls(name=str(data.get("name", Path(source).stem)), classes=classes, nodata=nodata, target=target)
        except (KeyError, TypeError, ValueError) as exc:
            raise LcmapInputError(
                f"{source}: not a valid legend ({exc}). Expected keys: name, nodata, classes: "
                "[{code, name, color '#rrggbb', target}] with targets among "
                f"{', '.join(DEFAULT_TARGET.names)} (or null to ignore), and optionally mixed: "
                "[target, ...] for a class that is a mixture of target classes at 1 m, and composition: "
                "{target: fraction, ...} for what it holds at 1 m."
            ) from exc

    @classmethod
    def from_yaml(cls, path: str | Path) -> Legend:
        path = Path(path)
        data = read_yaml(path, "legend file")
        if not isinstance(data, dict):
            raise LcmapInputError(f"legend file {path} must hold a mapping with a 'classes' list")
        return cls.from_dict(data, source=str(path))

    def to_yaml(self, path: str | Path) -> None:
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))


def _mixed_names(value: Any) -> tuple[str, ...]:
    """A YAML ``mixed`` entry (list, or names joined by ``,``; None/empty: not mixed) -> names."""
    if value in (None, "", []):
        return ()
    items = str(value).split(",") if isinstance(value, str) else [str(v) for v in value]
    return tuple(n.strip() for n in items if n.strip())


def _legend(name: str, nodata: tuple[int, ...], rows: list[tuple]) -> Legend:
    """A legend from rows ``(code, name, colour, target)`` or ``(code, name, colour, target, mixed)``;
    compositions from :data:`~lcmap.geodata.compositions.BUILTIN_COMPOSITIONS`."""
    comps = BUILTIN_COMPOSITIONS.get(name, {})
    return Legend(
        name=name,
        nodata=nodata,
        classes=tuple(
            LegendClass(r[0], r[1], _hex_to_rgb(r[2]), r[3], tuple(r[4]) if len(r) > 4 else (), comps.get(r[0]))
            for r in rows
        ),
    )


W, T, L, B = "water", "tree canopy", "low vegetation", "built-up"

#: Built-in legends by name. Target mappings follow the Chesapeake 4-class convention
#: (``shared/notes/paraformer.md``); barren maps to low vegetation except in the Chesapeake LC
#: legend, whose convention groups barren with built-up.
#:
#: Mixed classes (a 5th entry: the target classes a 1 m pixel of the class may hold) are declared
#: only where the product's own class definition says the class is a mixture; the reason is beside
#: each. Not declared, with the reason:
#:
#: - NLCD 22 "Developed, Low Intensity" (20-49 % impervious, most commonly single-family housing:
#:   by definition a mixture of built-up, lawn and yard trees): a candidate, but declaring it changes
#:   the demo's training, and it stays out of the defaults until ``benchmarks/train_sample.py
#:   --demo-settings --set "mixed_classes=21=built-up,low vegetation;22=built-up,low vegetation,tree
#:   canopy"`` over 3 seeds shows a held-out gain no lower than 21 alone (not yet measured); until
#:   then ``--mixed-class`` gives it;
#: - NLCD 23/24 (50-79 % / 80-100 % impervious): built-up is the majority by definition;
#: - WorldCover 50 "Built-up" (10 m): its definition excludes urban green ("parks, sport facilities
#:   are not included"), and a 10 m cell is 100 px at 1 m, not 900;
#: - Esri 7 "Built area": "human made structures ... large homogeneous impervious surfaces";
#: - FROM-GLC10 80 "Impervious surface" (10 m): artificial surfaces, no cover fraction defined.
# one class per line reads as the product's own legend table
# fmt: off
BUILTIN_LEGENDS: dict[str, Legend] = {
    "nlcd": _legend("nlcd", (0, 255), [
        (11, "Open Water", "#466b9f", W),
        (12, "Perennial Ice/Snow", "#d1def8", None),
        # NLCD definition: "mostly vegetation in the form of lawn grasses ... impervious surfaces
        # account for less than 20 % of total cover"; measured on real Chesapeake patches lcmap never
        # saw: mIoU +0.13 -> +0.17 over NLCD, built-up IoU 0.22 -> 0.40 with it mixed.
        (21, "Developed, Open Space", "#dec5c5", B, (B, L)),
        (22, "Developed, Low Intensity", "#d99282", B),
        (23, "Developed, Medium Intensity", "#eb0000", B),
        (24, "Developed, High Intensity", "#ab0000", B),
        (31, "Barren Land", "#b3ac9f", L),
        (41, "Deciduous Forest", "#68ab5f", T),
        (42, "Evergreen Forest", "#1c5f2c", T),
        (43, "Mixed Forest", "#b5c58f", T),
        (52, "Shrub/Scrub", "#ccb879", L),
        (71, "Grassland/Herbaceous", "#dfdfc2", L),
        (81, "Pasture/Hay", "#dcd939", L),
        (82, "Cultivated Crops", "#ab6c28", L),
        (90, "Woody Wetlands", "#b8d9eb", T),
        (95, "Emergent Herbaceous Wetlands", "#6c9fb8", L),
    ]),
    "worldcover": _legend("worldcover", (0,), [
        (10, "Tree cover", "#006400", T),
        (20, "Shrubland", "#ffbb22", L),
        (30, "Grassland", "#ffff4c", L),
        (40, "Cropland", "#f096ff", L),
        (50, "Built-up", "#fa0000", B),
        (60, "Bare / sparse vegetation", "#b4b4b4", L),
        (70, "Snow and ice", "#f0f0f0", None),
        (80, "Permanent water bodies", "#0064c8", W),
        (90, "Herbaceous wetland", "#0096a0", L),
        (95, "Mangroves", "#00cf75", T),
        (100, "Moss and lichen", "#fae6a0", L),
    ]),
    "esri": _legend("esri", (0,), [
        (1, "Water", "#419bdf", W),
        (2, "Trees", "#397d49", T),
        (4, "Flooded vegetation", "#7a87c6", L),
        (5, "Crops", "#e49635", L),
        (7, "Built area", "#c4281b", B),
        (8, "Bare ground", "#a59b8f", L),
        (9, "Snow/ice", "#a8ebff", None),
        (10, "Clouds", "#616161", None),
        # Esri definition: open grass "with little to no taller vegetation", but also "moderate to sparse
        # cover of bushes, shrubs and tufts of grass, savannas with very sparse grasses, trees": shrubs
        # and scattered trees are tree canopy in the target convention (Chesapeake "Tree Canopy and Shrubs").
        (11, "Rangeland", "#e3e2c3", L, (L, T)),
    ]),
    "fromglc10": _legend("fromglc10", (0, 255), [
        (10, "Cropland", "#a3ff73", L),
        (20, "Forest", "#267300", T),
        (30, "Grassland", "#4ce600", L),
        (40, "Shrubland", "#70a800", L),
        (50, "Wetland", "#00ffc5", L),
        (60, "Water", "#005ce6", W),
        (70, "Tundra", "#cdcd66", L),
        (80, "Impervious surface", "#ff0000", B),
        (90, "Bareland", "#cccccc", L),
        (100, "Snow/Ice", "#e1e1e1", None),
    ]),
    "glc_fcs30": _legend("glc_fcs30", (0, 250, 255), [
        (10, "Rainfed cropland", "#ffff64", L),
        (11, "Herbaceous cover cropland", "#ffff64", L),
        # Orchards: rows of tree or shrub canopy over herbaceous ground (tree canopy at 1 m).
        (12, "Tree or shrub cover (orchard) cropland", "#ffff00", L, (L, T)),
        (20, "Irrigated cropland", "#aaf0f0", L),
        # GLC_FCS30 follows FAO LCCS: "open" forest is 15-40 % tree cover, so 60-85 % of a 30 m cell is
        # the ground cover between the crowns (low vegetation); "closed" (> 40 %) stays pure.
        (51, "Open evergreen broadleaved forest", "#4c7300", T, (T, L)),
        (52, "Closed evergreen broadleaved forest", "#006400", T),
        (61, "Open deciduous broadleaved forest", "#aac800", T, (T, L)),
        (62, "Closed deciduous broadleaved forest", "#00a000", T),
        (71, "Open evergreen needle-leaved forest", "#005000", T, (T, L)),
        (72, "Closed evergreen needle-leaved forest", "#003c00", T),
        (81, "Open deciduous needle-leaved forest", "#286400", T, (T, L)),
        (82, "Closed deciduous needle-leaved forest", "#285000", T),
        (91, "Open mixed leaf forest", "#a0b432", T, (T, L)),
        (92, "Closed mixed leaf forest", "#788200", T),
        (120, "Shrubland", "#966400", L),
        (121, "Evergreen shrubland", "#964b00", L),
        (122, "Deciduous shrubland", "#966400", L),
        (130, "Grassland", "#ffb432", L),
        (140, "Lichens and mosses", "#ffdcd2", L),
        (150, "Sparse vegetation", "#ffebaf", L),
        (152, "Sparse shrubland", "#ffd278", L),
        (153, "Sparse herbaceous", "#ffebaf", L),
        (180, "Wetlands", "#00a884", L),
        (181, "Swamp", "#00a884", T),
        (182, "Marsh", "#00dc82", L),
        (183, "Flooded flat", "#73ffdf", L),
        (184, "Saline", "#9ebb3b", L),
        (185, "Mangrove", "#828282", T),
        (186, "Salt marsh", "#f57ab6", L),
        (187, "Tidal flat", "#66cdab", L),
        (190, "Impervious surfaces", "#c31400", B),
        (200, "Bare areas", "#fff5d7", L),
        (201, "Consolidated bare areas", "#dcdcdc", L),
        (202, "Unconsolidated bare areas", "#fff5d7", L),
        (210, "Water body", "#0046c8", W),
        (220, "Permanent ice and snow", "#ffffff", None),
    ]),
    "chesapeake": _legend("chesapeake", (0, 15), [
        (1, "Water", "#0000ff", W),
        (2, "Tree Canopy and Shrubs", "#008000", T),
        (3, "Low Vegetation", "#80ff80", L),
        (4, "Barren", "#806060", B),
        (5, "Impervious Surfaces", "#808080", B),
        (6, "Impervious Roads", "#000000", B),
    ]),
}
# fmt: on


def target_legend(scheme: TargetScheme = DEFAULT_TARGET) -> Legend:
    """The target scheme itself as a legend (codes 1..N, nodata 0), e.g. to read target maps."""
    return Legend(
        name=scheme.name,
        classes=tuple(LegendClass(c.code, c.name, c.color, c.name) for c in scheme.classes),
        nodata=(MAP_NODATA,),
        target=scheme,
    )


def get_legend(name_or_path: str | Path) -> Legend:
    """A built-in legend by name (``nlcd``, ``worldcover``, ``esri``, ``fromglc10``,
    ``glc_fcs30``, ``chesapeake``, ``4class``) or a user legend from a YAML file."""
    key = str(name_or_path).lower().replace("-", "_")
    aliases = {
        "esa_worldcover": "worldcover",
        "from_glc10": "fromglc10",
        "glc_fcs30d": "glc_fcs30",
        "esri_lulc": "esri",
        "chesapeake_lc": "chesapeake",
        "lc": "chesapeake",
    }
    key = aliases.get(key, key)
    if key in BUILTIN_LEGENDS:
        return BUILTIN_LEGENDS[key]
    if key in ("4class", "target"):
        return target_legend()
    path = Path(name_or_path)
    if path.suffix.lower() in (".yaml", ".yml") or path.exists():
        return Legend.from_yaml(path)
    raise LcmapInputError(
        f"unknown legend {name_or_path!r}: use one of {', '.join(BUILTIN_LEGENDS)}, 4class, or a YAML legend file"
    )

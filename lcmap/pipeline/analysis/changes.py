"""``lcmap changes``: a from -> to change map between an older land-cover product and a new 1 m map.

Both are compared on the common target classes (``legends.DEFAULT_TARGET``: water, tree canopy,
low vegetation, built-up). The map (written by ``lcmap predict``; its codes' legend in the
``LCMAP_LEGEND`` tag) is read window by window on its own grid, so memory stays bounded whatever
its size; the old product -- one file or several (a mosaic: the first file with a class wins), in
any CRS and at any resolution -- is resampled nearest onto that grid
(:class:`~lcmap.geodata.label_mosaic.LabelMosaic`).

Codes of the change map (uint8): ``from_index * N + to_index + 1`` with N target classes and
0-based indices in the target scheme's order (``from`` = old product, ``to`` = map); 0 = nodata
(the map or the old product has no targeted class there). With the 4 default classes: 1 =
water -> water, 2 = water -> tree canopy, ..., 6 = tree canopy -> tree canopy, ..., 16 = built-up
-> built-up. Only the pairs that occur get a colour and a category name: an unchanged pair is
named ``"water (no change)"`` and drawn in a muted (greyed) colour of its class; a changed pair is
named ``"tree canopy -> built-up"`` and drawn in the colour of the class it became.

Outputs, each written under a temporary name and renamed into place (the COG last, its STAC Item
after it): ``CHANGES.tif`` (COG with colour table, category names in ``CHANGES.tif.aux.xml`` and
the ``LCMAP_CHANGES`` tag), ``CHANGES.qml`` (QGIS style), ``CHANGES.csv`` (code, from, to,
pixels, km2), ``CHANGES.md`` (summary) and ``CHANGES.stac.json`` (:mod:`lcmap.pipeline.analysis.stac`).

Areas: in a projected CRS every pixel has the area of the transform's cell (times the CRS unit's
size in metres, squared); in a geographic CRS (e.g. EPSG:4326) the area of each row's cells is
the geodesic area on the CRS's ellipsoid (:class:`pyproj.Geod`), so it shrinks towards the poles.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
from rasterio.crs import CRS
from rasterio.errors import RasterioError
from rasterio.transform import Affine
from rasterio.windows import Window

from lcmap.errors import LcmapInputError
from lcmap.geodata import io
from lcmap.geodata.io import open_raster
from lcmap.geodata.label_mosaic import Grid, LabelMosaic
from lcmap.geodata.legends import IGNORE_INDEX, MAP_NODATA, Legend, TargetScheme, get_legend
from lcmap.pipeline.analysis.evaluate import map_legend
from lcmap.pipeline.analysis.stac import IMAGERY_DATETIME_TAG, write_stac_item
from lcmap.pipeline.analysis.zonal import pixel_area_m2_per_row
from lcmap.pipeline.prediction import cog
from lcmap.pipeline.prediction.cog import LEGEND_TAG

__all__ = [
    "CHANGES_TAG",
    "ChangeResult",
    "Transition",
    "change_categories",
    "decode_transition",
    "map_changes",
    "transition_code",
]

#: GDAL metadata tag of a change map: JSON with the code scheme, the classes and the inputs
#: (defined in lcmap.geodata.io, whose input discovery skips change maps).
CHANGES_TAG = io.CHANGES_TAG

#: An unchanged pair's colour: this share of its class colour, the rest light grey (muted).
_UNCHANGED_SHARE = 0.35
_GREY = (225, 225, 225)


# ------------------------------------------------------------------------------------ the codes
def transition_code(from_index: int, to_index: int, n_classes: int) -> int:
    """Change-map code of ``from_index -> to_index`` (0-based target indices): ``from * N + to + 1``."""
    return int(from_index) * int(n_classes) + int(to_index) + 1


def decode_transition(code: int, n_classes: int) -> tuple[int, int]:
    """``(from_index, to_index)`` of a change-map code (1 .. N*N); inverse of :func:`transition_code`."""
    if not 1 <= code <= n_classes * n_classes:
        raise ValueError(f"change code {code} is outside 1..{n_classes * n_classes}")
    return divmod(int(code) - 1, int(n_classes))


@dataclass(frozen=True)
class Transition:
    """One from -> to pair found in a change map, with its extent (pixels and km²)."""

    code: int
    from_name: str
    to_name: str
    pixels: int
    km2: float

    @property
    def changed(self) -> bool:
        return self.from_name != self.to_name

    @property
    def name(self) -> str:
        """Category name: ``"tree canopy -> built-up"``, or ``"water (no change)"``."""
        return f"{self.from_name} -> {self.to_name}" if self.changed else f"{self.from_name} (no change)"


def _transition_rgb(scheme: TargetScheme, from_index: int, to_index: int) -> tuple[int, int, int]:
    to_rgb = scheme.classes[to_index].color
    if from_index != to_index:
        return to_rgb
    r, g, b = (
        round(_UNCHANGED_SHARE * c + (1 - _UNCHANGED_SHARE) * grey) for c, grey in zip(to_rgb, _GREY, strict=True)
    )
    return (r, g, b)


def change_categories(
    transitions: Sequence[Transition], scheme: TargetScheme
) -> tuple[dict[int, tuple[int, int, int, int]], list[str], list[tuple[int, str, str]]]:
    """Colour table, GDAL category names and QML entries for the pairs present (see ``cog.map_categories``)."""
    n = len(scheme)
    colormap: dict[int, tuple[int, int, int, int]] = {MAP_NODATA: (0, 0, 0, 0)}
    names = [""] * (n * n + 1)
    names[MAP_NODATA] = "nodata"
    entries = []
    for t in transitions:
        rgb = _transition_rgb(scheme, *decode_transition(t.code, n))
        colormap[t.code] = (*rgb, 255)
        names[t.code] = t.name
        entries.append((t.code, "#{:02x}{:02x}{:02x}".format(*rgb), t.name))
    return colormap, names, entries


# ------------------------------------------------------------------------------------ inputs
def _tagged_map_legend(src: Any, path: Path, override: Legend | str | Path | None) -> Legend:
    if override is not None:
        return override if isinstance(override, Legend) else get_legend(override)
    if not src.tags().get(LEGEND_TAG):
        raise LcmapInputError(
            f"map {path} has no {LEGEND_TAG} tag, so its codes' classes are unknown. Pass a map written "
            "by 'lcmap predict', or name its legend with --map-legend (e.g. 4class for codes 1-4)."
        )
    return map_legend(src, path)


def _output_paths(out: Path) -> dict[str, Path]:
    from lcmap.pipeline.analysis.stac import stac_item_path

    return {
        "map": out,
        "aux": Path(str(out) + ".aux.xml"),
        "qml": cog.qml_path(out),
        "csv": out.with_suffix(".csv"),
        "md": out.with_suffix(".md"),
        "stac": stac_item_path(out),
    }


def _check_outputs(out: Path, inputs: Sequence[Path]) -> None:
    if out.suffix.lower() not in (".tif", ".tiff"):
        raise LcmapInputError(f"--out {out} must name a GeoTIFF (.tif): the change map is a COG")
    if out.is_dir():
        raise LcmapInputError(f"--out {out} is a folder: name the change map file (CHANGES.tif)")
    files: list[str] = []
    for p in inputs:  # folders, globs and lists: the files they hold (a bad path is reported when read)
        try:
            files.extend(io.find_raster_files(p, "input"))
        except LcmapInputError:
            files.append(str(p))
    io.check_not_an_input({f"output ({what})": path for what, path in _output_paths(out).items()}, files)


def _windows(height: int, width: int, block_px: int) -> Iterator[Window]:
    for row in range(0, height, block_px):
        for col in range(0, width, block_px):
            yield Window(col, row, min(block_px, width - col), min(block_px, height - row))


def _read_map_target(src: Any, lut: np.ndarray, legend: Legend, window: Window, path: Path) -> np.ndarray:
    """The map's target indices in ``window``; IGNORE_INDEX where it has no targeted class."""
    try:
        data = src.read(1, window=window)
        valid = src.read_masks(1, window=window) > 0
    except RasterioError as exc:
        raise LcmapInputError(f"map {path} could not be read ({exc}); it may be truncated") from exc
    out = np.full(data.shape, IGNORE_INDEX, dtype=np.uint8)
    if valid.any():
        out[valid] = lut[legend.encode(data[valid], source=path)]
    return out


# ------------------------------------------------------------------------------------ the work
@dataclass(frozen=True)
class ChangeResult:
    """What :func:`map_changes` wrote and found."""

    out: Path
    csv: Path
    summary: Path
    qml: Path
    stac: Path
    transitions: tuple[Transition, ...]


def map_changes(
    map_path: str | Path,
    old: str | Path | Sequence[str | Path],
    old_legend: Legend | str | Path,
    out: str | Path,
    *,
    map_legend_override: Legend | str | Path | None = None,
    block_px: int = 2048,
    progress: bool = True,
) -> ChangeResult:
    """Write the change map from ``old`` (older product) to ``map_path`` (new map) and its tables.

    Args:
        map_path: the new map (``lcmap predict`` output); its grid is the change map's grid.
        old: the older land-cover product(s), any CRS/resolution; several files form a mosaic.
        old_legend: legend of the old product's codes (a Legend, a built-in name or a YAML file).
        out: ``CHANGES.tif``; ``CHANGES.qml``, ``.csv``, ``.md`` and ``.stac.json`` go beside it.
        map_legend_override: legend of the map's codes when it has no ``LCMAP_LEGEND`` tag.
        block_px: side of the square windows read at a time, pixels (rounded up to 512).
        progress: show a progress bar over the windows (on stderr).

    Raises:
        LcmapInputError: unreadable input, map without legend tag, unknown legend, output equal to
            an input, different target schemes, or no pixel where both inputs hold a class.
    """
    map_path, out = Path(map_path), Path(out)
    old_paths = [Path(old)] if isinstance(old, (str, Path)) else [Path(p) for p in old]
    if not old_paths:
        raise LcmapInputError("no old product given (--old)")
    if not map_path.is_file():
        raise LcmapInputError(f"map {map_path} does not exist")
    _check_outputs(out, [map_path, *old_paths])
    old_legend = old_legend if isinstance(old_legend, Legend) else get_legend(old_legend)
    block_px = max(512, -(-int(block_px) // 512) * 512)
    out.parent.mkdir(parents=True, exist_ok=True)
    work = out.parent / f".{out.name}.work-{os.getpid()}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    try:
        return _map_changes(map_path, old_paths, old_legend, out, work, map_legend_override, block_px, progress)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _map_changes(
    map_path: Path,
    old_paths: list[Path],
    old_legend: Legend,
    out: Path,
    work: Path,
    map_legend_override: Legend | str | Path | None,
    block_px: int,
    progress: bool,
) -> ChangeResult:
    with open_raster(map_path, "map") as src:  # exists, readable, has a CRS
        legend = _tagged_map_legend(src, map_path, map_legend_override)
        if legend.target.names != old_legend.target.names:
            raise LcmapInputError(
                f"the map's legend and the old product's legend {old_legend.name!r} use different target classes "
                f"({', '.join(legend.target.names)} vs {', '.join(old_legend.target.names)})"
            )
        scheme = legend.target
        n = len(scheme)
        if n * n + 1 > 255:
            raise LcmapInputError(f"{n} target classes make {n * n} pairs: too many for a uint8 change map")
        height, width, crs, transform = src.height, src.width, src.crs, src.transform
        row_area_m2 = pixel_area_m2_per_row(crs, transform, height)
        uniform_area = bool(np.all(row_area_m2 == row_area_m2[0]))
        pixels = np.zeros(n * n + 1, dtype=np.int64)
        area_m2 = np.zeros(n * n + 1, dtype=np.float64)
        map_lut = legend.index_to_target_lut()
        raw = work / "changes-raw.tif"
        profile = dict(
            driver="GTiff",
            width=width,
            height=height,
            count=1,
            dtype="uint8",
            crs=crs,
            transform=transform,
            nodata=MAP_NODATA,
            tiled=True,
            blockxsize=512,
            blockysize=512,
            compress="ZSTD",
            zstd_level=1,
            BIGTIFF="IF_SAFER",
        )
        windows = list(_windows(height, width, block_px))
        grid = Grid.of(crs, transform, width, height)
        with (
            LabelMosaic(old_paths, "old product", no_label_codes=old_legend.nodata) as old,
            rasterio.Env(GDAL_CACHEMAX=256 * 1024 * 1024),
            rasterio.open(raw, "w", **profile) as dst,
            _progress(progress) as bar,
        ):
            if not old.meets(grid):
                raise LcmapInputError(
                    f"the old product ({', '.join(map(str, old_paths))}) does not overlap the map {map_path}: "
                    "pass the product that covers the map's area"
                )
            task = bar.add_task("change map", total=len(windows))
            for window in windows:
                codes = np.zeros((int(window.height), int(window.width)), dtype=np.uint8)
                window_grid = grid.window(window)
                if old.meets(window_grid):
                    new_t = _read_map_target(src, map_lut, legend, window, map_path)
                    old_t = old.read_target(window_grid, old_legend, option="--old-legend")
                    valid = (new_t != IGNORE_INDEX) & (old_t != IGNORE_INDEX)
                    codes[valid] = old_t[valid] * n + new_t[valid] + 1
                    kept = codes[valid].astype(np.int64)
                    pixels += np.bincount(kept, minlength=n * n + 1)
                    if uniform_area:
                        area_m2 += np.bincount(kept, minlength=n * n + 1) * row_area_m2[0]
                    else:
                        rows = np.nonzero(valid)[0]
                        row0 = int(window.row_off)
                        area_m2 += np.bincount(kept, weights=row_area_m2[row0 + rows], minlength=n * n + 1)
                dst.write(codes, 1, window=window)
                bar.advance(task)
    if pixels[1:].sum() == 0:
        raise LcmapInputError(
            f"no pixel holds a target class in both the map {map_path} and the old product "
            f"({', '.join(map(str, old_paths))}): they do not overlap where both have data, or the old "
            f"legend {old_legend.name!r} does not match the product"
        )
    transitions = tuple(
        Transition(code, scheme.classes[f].name, scheme.classes[t].name, int(pixels[code]), float(area_m2[code]) / 1e6)
        for code in range(1, n * n + 1)
        if pixels[code] > 0
        for f, t in [decode_transition(code, n)]
    )
    colormap, names, entries = change_categories(transitions, scheme)
    tags = {
        CHANGES_TAG: json.dumps(
            {
                "code": f"from_index * {n} + to_index + 1; 0 = nodata",
                "classes": scheme.names,
                "from": [p.name for p in old_paths],
                "from_legend": old_legend.name,
                "to": map_path.name,
            }
        ),
    }
    with rasterio.open(map_path) as src:
        if src.tags().get(IMAGERY_DATETIME_TAG):
            tags[IMAGERY_DATETIME_TAG] = src.tags()[IMAGERY_DATETIME_TAG]
    vrt = cog.write_mosaic_vrt(
        work / "changes.vrt",
        width=width,
        height=height,
        crs=crs,
        transform=transform,
        dtype="uint8",
        nodata=MAP_NODATA,
        sources=[cog.VrtSource(str(raw), 1, 0, 0, width, height)],
        colormap=colormap,
        category_names=names,
        tags=tags,
        description="land-cover change (old -> new)",
    )
    paths = _output_paths(out)
    summary = summary_markdown(transitions, scheme, map_path, old_paths, old_legend.name, crs, transform)
    cog.write_cog(
        vrt,
        out,
        resampling="mode",
        sidecars={
            ".qml": cog.write_qml(entries),
            ".csv": transitions_csv(transitions),
            ".md": summary,
        },
    )
    stac = write_stac_item(
        out, class_pixels={t.code: t.pixels for t in transitions}, derived_from=[map_path, *old_paths]
    )
    return ChangeResult(out, paths["csv"], paths["md"], paths["qml"], stac, transitions)


def _progress(enabled: bool) -> Any:
    from rich.console import Console
    from rich.progress import Progress

    return Progress(console=Console(stderr=True), disable=not enabled)


# ------------------------------------------------------------------------------------ tables
def transitions_csv(transitions: Sequence[Transition]) -> str:
    """CSV text: ``code,from,to,pixels,km2`` (one row per pair present, by code)."""
    import csv
    import io

    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["code", "from", "to", "pixels", "km2"])
    for t in transitions:
        writer.writerow([t.code, t.from_name, t.to_name, t.pixels, f"{t.km2:.6f}"])
    return buf.getvalue()


def summary_markdown(
    transitions: Sequence[Transition],
    scheme: TargetScheme,
    map_path: Path,
    old_paths: Sequence[Path],
    old_legend: str,
    crs: CRS,
    transform: Affine,
) -> str:
    """A short markdown report: totals, the pairs by area, and each class's area before and after."""
    total = sum(t.km2 for t in transitions)
    changed = sum(t.km2 for t in transitions if t.changed)
    share = changed / total if total else 0.0
    lines = [
        f"# Land-cover change: {', '.join(p.name for p in old_paths)} -> {map_path.name}",
        "",
        f"- old product: {', '.join(str(p) for p in old_paths)} (legend {old_legend}), "
        "resampled nearest onto the map grid",
        f"- new map: {map_path}",
        f"- grid: {crs.to_string()}, pixel {abs(transform.a):g} x {abs(transform.e):g} "
        f"{crs.linear_units if crs.is_projected else 'degrees'}",
        f"- compared area (both have a class): {total:.6f} km²",
        f"- changed: {changed:.6f} km² ({share:.1%} of the compared area)",
        "",
        "## Transitions (largest first)",
        "",
        "| code | from | to | pixels | km² | share |",
        "| ---: | --- | --- | ---: | ---: | ---: |",
    ]
    for t in sorted(transitions, key=lambda t: -t.km2):
        pct = t.km2 / total if total else 0.0
        lines.append(f"| {t.code} | {t.from_name} | {t.to_name} | {t.pixels} | {t.km2:.6f} | {pct:.1%} |")
    lines += ["", "## Area per class (km²)", "", "| class | old | new | net change |", "| --- | ---: | ---: | ---: |"]
    for c in scheme.classes:
        before = sum(t.km2 for t in transitions if t.from_name == c.name)
        after = sum(t.km2 for t in transitions if t.to_name == c.name)
        lines.append(f"| {c.name} | {before:.6f} | {after:.6f} | {after - before:+.6f} |")
    return "\n".join(lines) + "\n"

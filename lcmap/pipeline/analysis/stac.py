"""STAC Items for lcmap's maps and change maps: ``MAP.tif`` -> ``MAP.stac.json`` beside it.

The Item is built with ``rio-stac`` (geometry and bbox in EPSG:4326, projection extension:
``proj:epsg``, ``proj:transform``, ``proj:shape``, ``proj:bbox``) and completed with ``pystac``:

- ``datetime``: the imagery's date when known -- the ``imagery_datetime`` argument, else the map's
  ``LCMAP_IMAGERY_DATETIME`` tag (ISO 8601 date/time, or ``START/END`` for a range) -- else the
  map file's modification time; ``lcmap:datetime_source`` says which (``imagery`` or ``created``);
- asset ``data``: the COG (role ``data``, media type COG), with the raster extension (data type,
  nodata, spatial resolution) and the classification extension's classes (value, machine name,
  title, colour as hex, nodata; pixel counts and percentages when given);
- assets for the sidecars present: ``style`` (``MAP.qml``), ``categories`` (``MAP.tif.aux.xml``,
  which holds GDAL's category names), ``thumbnail`` (``MAP.preview.png``), ``report`` /
  ``table`` (``MAP.md`` / ``MAP.csv``, as the change maps have) and any further reports given;
- ``derived_from`` links to the inputs (e.g. a change map's map and old products);
- ``lcmap:predict_options`` and ``lcmap:checkpoint``: how a map was made, from its
  ``LCMAP_PREDICT_OPTIONS`` (JSON) and ``LCMAP_CHECKPOINT`` tags (:mod:`lcmap.pipeline.prediction.predict_config`).

Every href is relative to the Item's folder (an absolute path only where none exists, e.g. another
drive), so the folder can be moved or served as is. Classes come from the raster's category names
and colour table (what GDAL and QGIS show), else from its ``LCMAP_LEGEND`` tag.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import rasterio
from rasterio.errors import RasterioError

from lcmap.errors import LcmapInputError
from lcmap.geodata.io import CHANGES_TAG, open_raster
from lcmap.geodata.legends import MAP_NODATA, Legend
from lcmap.pipeline.prediction import cog
from lcmap.pipeline.prediction.cog import LEGEND_TAG
from lcmap.pipeline.prediction.predict_config import CHECKPOINT_TAG, PREDICT_OPTIONS_TAG

__all__ = [
    "IMAGERY_DATETIME_TAG",
    "build_stac_item",
    "imagery_datetime_of",
    "map_classes",
    "save_stac",
    "stac_item_path",
    "write_stac_item",
]

#: GDAL metadata tag with the imagery's acquisition date: ISO 8601, or ``START/END`` for a range.
IMAGERY_DATETIME_TAG = "LCMAP_IMAGERY_DATETIME"

_MEDIA_TYPES = {
    ".md": "text/markdown",
    ".csv": "text/csv",
    ".json": "application/json",
    ".html": "text/html",
    ".png": "image/png",
    ".pdf": "application/pdf",
    ".xml": "application/xml",
    ".qml": "application/xml",
    ".tif": "image/tiff; application=geotiff",
    ".tiff": "image/tiff; application=geotiff",
}

DatetimeLike = dt.datetime | str | tuple[dt.datetime, dt.datetime]


def stac_item_path(map_path: str | Path) -> Path:
    """``MAP.stac.json`` for ``MAP.tif``."""
    return Path(map_path).with_suffix(".stac.json")


def _href(target: Path, folder: Path) -> str:
    try:
        return Path(os.path.relpath(target.resolve(), folder.resolve())).as_posix()
    except ValueError:  # another drive (Windows)
        return str(target.resolve())


def _rgb(rgba: Sequence[int]) -> tuple[int, int, int]:
    return (int(rgba[0]), int(rgba[1]), int(rgba[2]))


def _slug(name: str) -> str:
    """A classification ``name`` (letters, digits, ``-``, ``_``) from a class title."""
    slug = re.sub(r"[^0-9A-Za-z]+", "_", name.replace("->", "to")).strip("_").lower()
    return slug or "class"


def map_classes(src: Any, path: str | Path) -> list[tuple[int, str, tuple[int, int, int]]]:
    """``(code, name, rgb)`` of the classes of a map's band 1, nodata first when it has a name.

    From the raster's GDAL category names and colour table (what GDAL and QGIS show); when it has
    no category names (e.g. ``MAP.tif.aux.xml`` was not copied), from its ``LCMAP_LEGEND`` tag,
    the legend of its codes. Empty when neither is there.
    """
    names = cog.read_category_names(path)
    try:
        colormap = src.colormap(1)
    except ValueError:  # no colour table
        colormap = {}
    if any(names):
        return [(code, name, _rgb(colormap.get(code, (128, 128, 128, 255)))) for code, name in enumerate(names) if name]
    text = src.tags().get(LEGEND_TAG)
    if not text:
        return []
    try:
        legend = Legend.from_dict(json.loads(text), source=f"{path} ({LEGEND_TAG} tag)")
    except json.JSONDecodeError as exc:
        raise LcmapInputError(f"map {path}: its {LEGEND_TAG} tag is not valid JSON ({exc})") from exc
    return [(MAP_NODATA, "nodata", (0, 0, 0))] + [(c.code, c.name, c.color) for c in legend.classes]


def _parse_datetime(
    value: DatetimeLike, what: str
) -> tuple[dt.datetime | None, dt.datetime | None, dt.datetime | None]:
    """``(datetime, start, end)``: one instant, or a range (datetime None)."""
    from pystac.utils import str_to_datetime

    def one(v: dt.datetime | str) -> dt.datetime:
        d = v if isinstance(v, dt.datetime) else str_to_datetime(str(v).strip())
        return d if d.tzinfo else d.replace(tzinfo=dt.UTC)

    try:
        if isinstance(value, tuple):
            start, end = one(value[0]), one(value[1])
        elif isinstance(value, str) and "/" in value:
            a, b = value.split("/", 1)
            start, end = one(a), one(b)
        else:
            return one(value), None, None
    except (ValueError, OverflowError) as exc:
        raise LcmapInputError(
            f"{what} {value!r} is not an ISO 8601 date/time (e.g. 2020-04-15 or 2019-06-01/2019-09-30): {exc}"
        ) from exc
    if end < start:
        raise LcmapInputError(f"{what} {value!r}: the range ends before it starts")
    return None, start, end


#: Imagery tags read as the acquisition date, in this order (``YEAR``: the whole year, as NAIP's).
_IMAGERY_DATE_TAGS = (IMAGERY_DATETIME_TAG, "ACQUISITION_DATE", "DATE_ACQUIRED", "ACQUISITIONDATETIME", "YEAR")


def imagery_datetime_of(files: Sequence[str | Path]) -> str | None:
    """The imagery's acquisition date from its GeoTIFF tags, as ``imagery_datetime`` takes it.

    Per file the first tag of :data:`_IMAGERY_DATE_TAGS` present (``YEAR=2014`` is the range
    2014-01-01/2014-12-31; ``TIFFTAG_DATETIME`` is not used: it is the file's creation time). Several
    files give the range from the earliest to the latest. None when a file carries no date or a tag
    cannot be parsed (the Item then falls back on the map's time, ``lcmap:datetime_source`` created).
    """
    starts: list[dt.datetime] = []
    ends: list[dt.datetime] = []
    for path in files:
        try:
            with rasterio.open(path) as src:
                tags = src.tags()
        except RasterioError:
            return None
        value = next((str(tags[t]).strip() for t in _IMAGERY_DATE_TAGS if str(tags.get(t, "")).strip()), None)
        if value is None:
            return None
        if value.isdigit() and len(value) == 4:
            value = f"{value}-01-01T00:00:00Z/{value}-12-31T23:59:59Z"
        try:
            instant, start, end = _parse_datetime(value, f"{path} date tag")
        except LcmapInputError:
            return None
        starts.append(instant or start)  # type: ignore[arg-type]
        ends.append(instant or end)  # type: ignore[arg-type]
    if not starts:
        return None
    first, last = min(starts), max(ends)
    return first.isoformat() if first == last else f"{first.isoformat()}/{last.isoformat()}"


def _made_with(tags: Mapping[str, str], path: Path) -> dict[str, Any]:
    """Item properties saying how the map was made, from its tags (none for a map without them).

    Raises:
        LcmapInputError: the options tag is not a JSON object.
    """
    found: dict[str, Any] = {}
    if tags.get(PREDICT_OPTIONS_TAG):
        try:
            options = json.loads(tags[PREDICT_OPTIONS_TAG])
        except json.JSONDecodeError as exc:
            raise LcmapInputError(f"map {path}: its {PREDICT_OPTIONS_TAG} tag is not valid JSON ({exc})") from exc
        if not isinstance(options, dict):
            raise LcmapInputError(f"map {path}: its {PREDICT_OPTIONS_TAG} tag is not a JSON object")
        found["lcmap:predict_options"] = options
    if tags.get(CHECKPOINT_TAG):
        found["lcmap:checkpoint"] = tags[CHECKPOINT_TAG]
    return found


def _check_lcmap_cog(src: Any, path: Path) -> None:
    """Refuse a raster the Item would describe falsely: not an lcmap map or change map (no
    ``LCMAP_LEGEND`` / ``LCMAP_CHANGES`` tag), not a valid COG, or cut short (:func:`cog.validate_cog`)."""
    if not {LEGEND_TAG, CHANGES_TAG} & set(src.tags()):
        raise LcmapInputError(
            f"{path} is not a land-cover or change map written by lcmap (no {LEGEND_TAG} or {CHANGES_TAG} tag): "
            f"'lcmap stac' describes those only. For another raster use rio-stac ('rio stac {path}')."
        )
    try:
        cog.validate_cog(path)
    except RuntimeError as exc:
        raise LcmapInputError(
            f"{exc}. 'lcmap stac' describes complete Cloud Optimized GeoTIFFs only: copy the map again, or "
            "write it again with lcmap predict (or lcmap changes)"
        ) from None


def build_stac_item(
    map_path: str | Path,
    *,
    imagery_datetime: DatetimeLike | None = None,
    reports: Sequence[str | Path] = (),
    class_pixels: Mapping[int, int] | None = None,
    derived_from: Sequence[str | Path] = (),
    properties: Mapping[str, Any] | None = None,
) -> Any:
    """The STAC Item (``pystac.Item``) of a map COG; hrefs relative to the map's folder.

    Args:
        map_path: the map (or change map) COG.
        imagery_datetime: the imagery's date: a datetime, an ISO 8601 string, ``"START/END"`` or a
            ``(start, end)`` tuple. None: the map's ``LCMAP_IMAGERY_DATETIME`` tag, else the
            file's modification time (``lcmap:datetime_source`` = ``created``).
        reports: further files to list as ``metadata`` assets (e.g. an evaluation report.md).
        class_pixels: pixels per code, to add ``count`` and ``percentage`` to the classes.
        derived_from: input files, linked with rel ``derived_from``.
        properties: extra Item properties.

    Raises:
        LcmapInputError: the map is missing, unreadable, has no CRS, is not an lcmap map or change
            map, not a valid COG or cut short, or a date is malformed.
    """
    import pystac
    from pystac.extensions.classification import Classification, ClassificationExtension
    from pystac.extensions.raster import DataType, RasterBand, RasterExtension, Sampling
    from rio_stac.stac import create_stac_item

    from lcmap import __version__

    map_path = Path(map_path)
    folder = map_path.parent
    with open_raster(map_path, "map") as src:  # exists, readable, has a CRS (a STAC Item needs its footprint)
        _check_lcmap_cog(src, map_path)
        source = "imagery"
        if imagery_datetime is None and src.tags().get(IMAGERY_DATETIME_TAG):
            when = _parse_datetime(src.tags()[IMAGERY_DATETIME_TAG], f"{map_path} tag {IMAGERY_DATETIME_TAG}")
        elif imagery_datetime is not None:
            when = _parse_datetime(imagery_datetime, "imagery date")
        else:
            source = "created"
            mtime = dt.datetime.fromtimestamp(map_path.stat().st_mtime, tz=dt.UTC)
            when = (mtime, None, None)
        item = create_stac_item(
            src,
            input_datetime=when[0] or when[1],
            id=map_path.stem,
            asset_name="data",
            asset_roles=["data"],
            asset_media_type=pystac.MediaType.COG,
            asset_href=_href(map_path, folder),
            with_proj=True,
            with_raster=False,
            geom_densify_pts=21,
            geom_precision=8,
        )
        classes = map_classes(src, map_path)
        nodata = src.nodata
        dtype = src.dtypes[0]
        gsd_m = abs(src.transform.a) * src.crs.linear_units_factor[1] if src.crs.is_projected else None
        tags = src.tags()
    if when[0] is None:
        item.datetime = None
        item.common_metadata.start_datetime, item.common_metadata.end_datetime = when[1], when[2]
    item.properties["lcmap:datetime_source"] = source
    item.common_metadata.created = dt.datetime.now(dt.UTC)
    item.common_metadata.title = (
        f"lcmap {'change map' if 'LCMAP_CHANGES' in tags else 'land-cover map'} {map_path.stem}"
    )
    item.properties["lcmap:version"] = __version__
    item.properties.update(_made_with(tags, map_path))
    if gsd_m is not None:
        item.common_metadata.gsd = float(gsd_m)
    item.properties.update(properties or {})

    data = item.assets["data"]
    data.title = item.common_metadata.title
    band = RasterBand.create(
        data_type=DataType(dtype), nodata=nodata, sampling=Sampling.AREA, spatial_resolution=item.common_metadata.gsd
    )
    RasterExtension.ext(data, add_if_missing=True).apply(bands=[band])
    if classes:
        total = sum(v for k, v in (class_pixels or {}).items() if k != nodata)
        entries = []
        for code, name, rgb in classes:
            is_nodata = nodata is not None and code == nodata
            count = None if class_pixels is None or is_nodata else int(class_pixels.get(code, 0))
            entries.append(
                Classification.create(
                    value=int(code),
                    name=_slug(name),
                    title=name,
                    color_hint="{:02X}{:02X}{:02X}".format(*rgb),
                    nodata=True if is_nodata else None,
                    count=count,
                    percentage=None if count is None or not total else 100.0 * count / total,
                )
            )
        ClassificationExtension.ext(data, add_if_missing=True).classes = entries

    sidecars = [
        ("style", cog.qml_path(map_path), ["style"], "QGIS style (paletted renderer)"),
        ("categories", Path(str(map_path) + ".aux.xml"), ["metadata"], "GDAL category names (PAM sidecar)"),
        ("thumbnail", map_path.with_suffix(".preview.png"), ["thumbnail"], "preview with legend (PNG)"),
        ("report", map_path.with_suffix(".md"), ["metadata"], "summary"),
        ("table", map_path.with_suffix(".csv"), ["metadata"], "table"),
    ]
    for i, extra in enumerate(reports):
        sidecars.append((f"report-{i + 1}", Path(extra), ["metadata"], Path(extra).name))
    for key, path, roles, title in sidecars:
        if path.is_file():
            item.add_asset(
                key,
                pystac.Asset(
                    href=_href(path, folder), media_type=_MEDIA_TYPES.get(path.suffix.lower()), roles=roles, title=title
                ),
            )
        elif key.startswith("report-"):
            raise LcmapInputError(f"report {path} does not exist")
    for input_path in map(Path, derived_from):
        item.add_link(
            pystac.Link(
                rel="derived_from",
                target=_href(input_path, folder),
                media_type=_MEDIA_TYPES.get(input_path.suffix.lower()),
                title=input_path.name,
            )
        )
    return item


def write_stac_item(map_path: str | Path, **kwargs: Any) -> Path:
    """Build the map's STAC Item (:func:`build_stac_item`, same arguments) and write it atomically
    to ``MAP.stac.json`` beside the map; returns that path."""
    return save_stac(build_stac_item(map_path, **kwargs), stac_item_path(map_path))


def save_stac(obj: Any, path: Path) -> Path:
    """Write a pystac Item or Collection to ``path`` atomically, its hrefs as they are; returns ``path``."""
    text = json.dumps(obj.to_dict(include_self_link=False, transform_hrefs=False), indent=2) + "\n"
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path

"""STAC Items and ItemCollections as raster inputs: a JSON file holding one Item or an
ItemCollection (e.g. a ``pystac-client`` search saved with ``items.save_object("search.json")``),
given wherever a raster is (``--images``, ``--labels``, ``--reference``, a line of a ``.txt`` list).
Each Item gives one file: the href of its chosen asset.

- **Asset**: the one named by ``--stac-asset KEY`` (:func:`asset_choice`); by default ``visual``,
  else ``image``, else the Item's first asset whose media type is a GeoTIFF (``image/tiff...``).
- **Hrefs**: ``http(s)://`` URLs are read remotely (:mod:`lcmap.geodata.remote`); a relative href
  is relative to the JSON file's folder; ``file://`` and absolute paths are local files. Other
  schemes (``s3://``) are refused with the hint to use the https address.
- Items lcmap wrote itself (a map's STAC Item, property ``lcmap:version``) are skipped and logged
  at INFO, as folders skip lcmap's outputs.

pystac is imported when a STAC file is read, so that ``lcmap --help`` stays instant.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from lcmap.errors import LcmapInputError

log = logging.getLogger(__name__)

__all__ = ["ASSET_HELP", "DEFAULT_ASSETS", "STAC_SUFFIXES", "asset_choice", "choose_asset", "stac_asset_hrefs"]

#: Files read as STAC JSON where a raster is expected.
STAC_SUFFIXES = (".json", ".geojson")
#: Asset keys taken by default, in this order (then the first GeoTIFF asset).
DEFAULT_ASSETS = ("visual", "image")
#: The help of ``--stac-asset`` (every command whose rasters may be STAC Items).
ASSET_HELP = (
    "Asset to read from the STAC Items of a STAC Item or ItemCollection JSON file given as a raster input "
    "(e.g. a pystac-client search saved to search.json). Default: visual, else image, else the first GeoTIFF asset."
)
_SCHEME = re.compile(r"^[a-z][a-z0-9+.-]*://", re.IGNORECASE)
_chosen_key: str | None = None


def choose_asset(key: str | None) -> None:
    """Read asset ``key`` of STAC Items from now on in this process (None: the default choice)."""
    global _chosen_key
    _chosen_key = key or None


@contextlib.contextmanager
def asset_choice(key: str | None) -> Iterator[None]:
    """Within the block, read asset ``key`` of STAC Items (None: the default choice)."""
    before = _chosen_key
    choose_asset(key)
    try:
        yield
    finally:
        choose_asset(before)


def stac_asset_hrefs(path: Path, what: str) -> list[str]:
    """The chosen asset's href of each Item in STAC file ``path``: URLs as they are, local paths
    resolved (relative to ``path``'s folder), in the Items' order; lcmap's own Items left out.

    Raises:
        LcmapInputError: the file is not a STAC Item/ItemCollection, an Item lacks the asset, an
            href has an unsupported scheme, or no Item is left (each naming the file and Item).
    """
    items = _read_items(path, what)
    hrefs: list[str] = []
    for item in items:
        if "lcmap:version" in item.properties:
            log.info("skipped STAC item %s (in %s): an lcmap map's Item, not an input", item.id, path)
            continue
        key, asset = _asset_of(item, path, what)
        hrefs.append(_resolve(asset.href, path, f"{what} STAC item {item.id} (asset {key}) in {path}"))
    if not hrefs:
        raise LcmapInputError(f"{what} STAC file {path} holds no Item to read (lcmap's own map Items are skipped)")
    return hrefs


def _read_items(path: Path, what: str) -> list[Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise LcmapInputError(f"{what} file {path} is not readable JSON ({' '.join(str(exc).split())})") from exc
    kind = data.get("type") if isinstance(data, dict) else None
    if kind in ("Catalog", "Collection"):
        raise LcmapInputError(
            f"{what} file {path} is a STAC {kind}: search it (e.g. pystac-client) and give the saved "
            "ItemCollection, or give one Item"
        )
    features = [data] if kind == "Feature" else data.get("features") if kind == "FeatureCollection" else None
    if not isinstance(features, list) or not all(isinstance(f, dict) and "assets" in f for f in features):
        raise LcmapInputError(
            f"{what} file {path} is not a STAC Item or ItemCollection (a GeoJSON Feature or FeatureCollection "
            "whose features have assets); an area of interest belongs in --aoi"
        )
    import pystac

    try:
        if kind == "Feature":
            return [pystac.Item.from_dict(data, preserve_dict=False)]
        return list(pystac.ItemCollection.from_dict(data, preserve_dict=False))
    except Exception as exc:  # pystac's errors are of many kinds (STACTypeError, KeyError, ValueError)
        raise LcmapInputError(f"{what} STAC file {path} could not be read as STAC ({exc!r})") from exc


def _is_geotiff(asset: Any) -> bool:
    media = (asset.media_type or "").lower()
    return media.startswith("image/tiff") or "geotiff" in media


def _asset_of(item: Any, path: Path, what: str) -> tuple[str, Any]:
    assets = item.assets
    listed = ", ".join(assets) or "none"
    if _chosen_key is not None:
        if _chosen_key in assets:
            return _chosen_key, assets[_chosen_key]
        raise LcmapInputError(
            f"{what} STAC item {item.id} in {path} has no asset {_chosen_key!r} (--stac-asset); its assets: {listed}"
        )
    for key in DEFAULT_ASSETS:
        if key in assets:
            return key, assets[key]
    for key, asset in assets.items():
        if _is_geotiff(asset):
            return key, asset
    raise LcmapInputError(
        f"{what} STAC item {item.id} in {path} has no visual, image or GeoTIFF asset: choose one with "
        f"--stac-asset KEY (its assets: {listed})"
    )


def _resolve(href: str, path: Path, where: str) -> str:
    """An asset href as lcmap reads it: a URL as it is, a local path resolved against ``path``."""
    if re.match(r"^https?://", href, re.IGNORECASE):
        return href
    if href.lower().startswith("file://"):
        return urllib.parse.unquote(urllib.parse.urlparse(href).path)
    if _SCHEME.match(href):
        raise LcmapInputError(
            f"{where}: href {href}: only http(s) URLs and local files are read (use the object's https address)"
        )
    local = Path(href).expanduser()
    return os.path.normpath(local if local.is_absolute() else path.parent / local)

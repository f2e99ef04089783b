"""Rasters that are not local files: ``http(s)://`` URLs (cloud-optimized GeoTIFFs behind HTTP,
object stores' public or signed addresses) and GDAL virtual file system paths (``/vsicurl/...``,
``/vsis3/...``), read by GDAL with HTTP range requests: only the header and the tiles a read
touches travel, nothing is downloaded whole.

A remote input keeps the address the user gave (messages name it); rasterio and TorchGeo hand
``http(s)://`` to GDAL's ``/vsicurl/`` themselves.

GDAL settings for remote reads (:data:`GDAL_REMOTE_SETTINGS`) are set in ONE place,
:func:`configure_gdal`, into ``os.environ`` (``setdefault``: a user's own settings win) the first
time a process resolves a remote input (:func:`lcmap.geodata.io.find_raster_files`). Every
process that reads imagery resolves its files that way, Dask workers included (their
``ModelPlugin`` opens the job's files with ``open_imagery``), and processes started afterwards
(DataLoader workers, a local Dask cluster) inherit the environment. The settings only touch
GDAL's HTTP file systems: ``GDAL_DISABLE_READDIR_ON_OPEN=EMPTY_DIR`` is not among them because it
hides LOCAL files' sidecars too (a ``.aux.xml``'s nodata value is lost); ``TRUE`` with
``CPL_VSIL_CURL_ALLOWED_EXTENSIONS`` opens a remote COG in 3 requests, not 11 (no directory
listing, no ``.aux.xml``/``.ovr``/``.msk`` probes), and leaves local files as they were. A remote
file's sidecars are therefore not read: a COG carries its nodata, mask and overviews inside.

:func:`remote_identities` gives the resume fingerprint of remote files (size and version from one
1-byte range request each), :func:`unreadable` the one-line error of a URL that cannot be read.
"""

from __future__ import annotations

import os
import re
import urllib.error
import urllib.request
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from lcmap.errors import LcmapInputError

__all__ = [
    "GDAL_REMOTE_SETTINGS",
    "configure_gdal",
    "is_remote",
    "remote_identities",
    "unreadable",
]

_URL = re.compile(r"^https?://", re.IGNORECASE)
#: Raster extensions GDAL's HTTP file systems open (query strings aside); others are refused unprobed.
REMOTE_SUFFIXES = (".tif", ".tiff", ".vrt", ".jp2")
#: GDAL configuration for remote reads; see the module docstring.
GDAL_REMOTE_SETTINGS = {
    # no directory listing on open (an HTTP "folder" has none); local sidecars are still found
    "GDAL_DISABLE_READDIR_ON_OPEN": "TRUE",
    # no probes for .aux.xml, .ovr, .msk, ... next to a remote raster: each is a request answered 404
    "CPL_VSIL_CURL_ALLOWED_EXTENSIONS": ",".join(REMOTE_SUFFIXES),
    "GDAL_HTTP_CONNECTTIMEOUT": "10",  # seconds to connect: an unreachable host fails quickly
    "GDAL_HTTP_TIMEOUT": "60",  # seconds for one request (tiles are KB to a few MB)
    "GDAL_HTTP_MAX_RETRY": "3",  # HTTP 429 and 5xx are retried (not 404, not a refused connection)
    "GDAL_HTTP_RETRY_DELAY": "1",  # seconds, doubled at each retry
    "GDAL_HTTP_MERGE_CONSECUTIVE_RANGES": "YES",  # neighbouring tiles in one request
}
_PROBE_TIMEOUT_S = 10.0


def is_remote(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is an ``http(s)://`` URL or a GDAL virtual file system path (``/vsi...``):
    read by GDAL, not looked up on the local file system."""
    text = os.fspath(path)
    return bool(_URL.match(text)) or text.startswith("/vsi")


def configure_gdal() -> None:
    """Put :data:`GDAL_REMOTE_SETTINGS` into ``os.environ`` where the user has not set them (GDAL
    reads its configuration from the environment at each open and request)."""
    for key, value in GDAL_REMOTE_SETTINGS.items():
        os.environ.setdefault(key, value)


def check_address(url: str, what: str) -> None:
    """Refuse a URL GDAL would not open under :data:`GDAL_REMOTE_SETTINGS` (no raster extension)."""
    if _URL.match(url):
        name = url.split("?", 1)[0].split("#", 1)[0].rstrip("/").lower()
        allowed = os.environ.get("CPL_VSIL_CURL_ALLOWED_EXTENSIONS", ",".join(REMOTE_SUFFIXES))
        suffixes = tuple(s.strip().lower() for s in allowed.split(",") if s.strip())
        if suffixes and not name.endswith(suffixes):
            raise LcmapInputError(
                f"{what} URL {url} does not end in {', '.join(suffixes)}: lcmap reads remote rasters by their "
                "extension (set CPL_VSIL_CURL_ALLOWED_EXTENSIONS to allow others)"
            )


def unreadable(path: str, what: str, exc: BaseException) -> LcmapInputError:
    """The one-line error of a remote raster that cannot be opened or read (GDAL's reason included:
    ``HTTP response code: 404``, ``Could not connect to server``, a timeout)."""
    reason = " ".join(str(exc).split()) or type(exc).__name__
    return LcmapInputError(
        f"{what} URL {path} cannot be read ({reason}). Check the address, that the server is reachable and "
        "that the file is public or the URL signed (GDAL's own settings, e.g. GDAL_HTTP_HEADERS, apply)."
    )


def _http_url(path: str) -> str | None:
    """The ``http(s)`` URL behind ``path`` (a URL, or ``/vsicurl/URL``), else None."""
    if _URL.match(path):
        return path
    if path.startswith("/vsicurl/") and _URL.match(path[len("/vsicurl/") :]):
        return path[len("/vsicurl/") :]
    return None


def _identity(path: str) -> list[str | int | None]:
    """``[path, size in bytes, version]`` of a remote file, ``version`` its ETag or Last-Modified
    (``None`` where the server gives none, or the path is not HTTP)."""
    url = _http_url(path)
    if url is None:  # another GDAL file system (/vsis3/, /vsizip/): the path is all we know
        return [path, None, None]
    request = urllib.request.Request(url, headers={"Range": "bytes=0-0"})
    try:
        with urllib.request.urlopen(request, timeout=_PROBE_TIMEOUT_S) as response:
            headers = response.headers  # the body (1 byte, or all of it from a server without ranges) unread
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise unreadable(path, "input", exc) from exc
    total = (headers.get("Content-Range") or "").rpartition("/")[2]
    length = headers.get("Content-Length")  # a server that ignored the range sent the whole file
    size = int(total) if total.isdigit() else int(length) if length and length.isdigit() else None
    return [path, size, headers.get("ETag") or headers.get("Last-Modified")]


def remote_identities(paths: Iterable[str]) -> dict[str, list[str | int | None]]:
    """:func:`_identity` of each remote path (8 requests at a time), by path.

    Raises:
        LcmapInputError: a file that cannot be reached (named).
    """
    todo: Sequence[str] = sorted({p for p in paths if is_remote(p)})
    if not todo:
        return {}
    with ThreadPoolExecutor(max_workers=min(8, len(todo))) as pool:
        return dict(zip(todo, pool.map(_identity, todo), strict=True))


def absolute_input(path: str | os.PathLike[str]) -> str:
    """A local path made absolute; a remote one as it is (``os.path.abspath`` would fold its ``//``)."""
    text = os.fspath(path)
    return text if is_remote(text) else os.path.abspath(Path(text).expanduser())

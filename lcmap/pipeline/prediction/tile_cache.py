"""Reading a raster in fixed tiles, each read once and kept: a window's pixels do not depend on
the window asked for.

GDAL's warper (an approximate transformer) picks a pixel's nearest source pixel depending on the
window it is asked for, so the same map pixel read within two different windows could differ
(measured: thousands of imagery pixels per strip, tens of label pixels per Mpx). Reading only
whole tiles at fixed places, and cutting every window from them, makes a pixel's value depend
on the file and the map's grid alone. :class:`TileCache` does that for the strip reader's warped
imagery (:mod:`lcmap.pipeline.prediction.strips`) and the ``--label-prior`` labels
(:mod:`lcmap.pipeline.prediction.prediction_prior`).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable

import numpy as np

__all__ = ["TileCache"]


class TileCache:
    """Tiles of ``tile_px`` pixels kept after their first read, least recently used out once they
    hold more than ``max_bytes`` (the last window's tiles always stay).

    Tile corners lie at ``k * tile_px - origin`` (rows and columns, in the caller's pixel
    coordinates), for any whole ``k``.
    """

    def __init__(self, tile_px: int, max_bytes: int, origin: tuple[int, int] = (0, 0)):
        self.tile_px, self.max_bytes, self.origin = tile_px, max_bytes, origin
        self._tiles: OrderedDict[tuple[Hashable, int, int], np.ndarray] = OrderedDict()
        self._bytes = 0

    def window(
        self, key: Hashable, r0: int, r1: int, c0: int, c1: int, load: Callable[[int, int], np.ndarray]
    ) -> np.ndarray:
        """Rows ``[r0, r1)`` x columns ``[c0, c1)`` of raster ``key``, cut from its tiles:
        ``(..., r1 - r0, c1 - c0)`` in the tiles' dtype. ``load(tr, tc)``: the tile whose corner is
        row ``tr``, column ``tc``, ``(..., h, w)`` with ``h, w <= tile_px`` (smaller at the raster's
        edge); asked only for tiles not kept."""
        T = self.tile_px
        gr, gc = self.origin
        out: np.ndarray | None = None
        for tr in range((r0 + gr) // T * T - gr, r1, T):
            for tc in range((c0 + gc) // T * T - gc, c1, T):
                tile = self._tiles.pop((key, tr, tc), None)
                if tile is None:
                    tile = load(tr, tc)
                    self._bytes += tile.nbytes
                self._tiles[(key, tr, tc)] = tile  # most recently used last
                if out is None:
                    out = np.empty((*tile.shape[:-2], r1 - r0, c1 - c0), tile.dtype)
                a, z = max(r0, tr), min(r1, tr + tile.shape[-2])
                c, d = max(c0, tc), min(c1, tc + tile.shape[-1])
                out[..., a - r0 : z - r0, c - c0 : d - c0] = tile[..., a - tr : z - tr, c - tc : d - tc]
        while self._bytes > self.max_bytes and len(self._tiles) > 1:
            _, old = self._tiles.popitem(last=False)
            self._bytes -= old.nbytes
        assert out is not None, "an empty window"
        return out

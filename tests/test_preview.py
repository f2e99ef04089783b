"""``MAP.preview.png`` of a map larger than the preview: read small, class colours kept, small file.

(The preview of a map made by ``lcmap predict`` is checked in tests/test_predict.py.)
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import rasterio
from map_rasters import write_map_cog
from PIL import Image
from rasterio.transform import from_origin

from lcmap.geodata.legends import get_legend
from lcmap.pipeline.prediction.preview import MAX_MAP_PX, write_preview

BLOCK_PX = 250  # the map's classes come in squares of this side


def _big_map(tmp_path: Path, name: str, codes: np.ndarray) -> Path:
    return write_map_cog(
        tmp_path / name, codes, "EPSG:32617", from_origin(500_000, 4_000_000, 1, 1), legend=get_legend("nlcd")
    )


def test_large_map_preview_keeps_class_colours(tmp_path: Path) -> None:
    nlcd = get_legend("nlcd")
    h, w = 2000, 3000
    blocks = np.random.default_rng(0).choice(np.array([0, *nlcd.codes], np.uint8), (h // BLOCK_PX, w // BLOCK_PX))
    path = _big_map(tmp_path, "big.tif", blocks.repeat(BLOCK_PX, 0).repeat(BLOCK_PX, 1))
    with rasterio.open(path) as src:
        assert src.overviews(1)  # what the preview is read from
        cmap = src.colormap(1)

    png = write_preview(path)
    assert png == tmp_path / "big.preview.png"
    image = np.asarray(Image.open(png).convert("RGBA"))
    scale = MAX_MAP_PX / max(h, w)  # the map's longest side is MAX_MAP_PX
    map_h, map_w = round(h * scale), round(w * scale)
    assert max(image.shape[:2]) <= 1024 and image.shape[0] >= map_h and image.shape[1] > map_w
    for (bi, bj), code in np.ndenumerate(blocks):  # the centre of each square: its class colour
        pixel = image[int((bi + 0.5) * BLOCK_PX * scale), int((bj + 0.5) * BLOCK_PX * scale)]
        if code == 0:
            assert pixel[3] == 0, (bi, bj)  # nodata: transparent
        else:
            assert tuple(pixel) == (*cmap[code][:3], 255), (bi, bj, code)
    legend = image[:, map_w:, :3].reshape(-1, 3)
    for c in nlcd.classes:  # every class's swatch, in the map's colour
        assert (legend == cmap[c.code][:3]).all(axis=1).sum() >= 100, c.name


def test_noisy_map_preview_stays_small(tmp_path: Path) -> None:
    """Classes changing at every pixel: the worst case for PNG compression."""
    rng = np.random.default_rng(1)
    codes = rng.choice(np.array(get_legend("nlcd").codes, np.uint8), (2000, 3000))
    png = write_preview(_big_map(tmp_path, "noise.tif", codes))
    with Image.open(png) as image:
        assert max(image.size) <= 1024
    assert png.stat().st_size < 200_000

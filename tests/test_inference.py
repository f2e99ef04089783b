"""A pixel's class depends only on the imagery around it (``lcmap.pipeline.prediction.inference`` with the
window lattice of ``tiling`` and the context boxes of ``strips``): real sample patches mapped
alone and with other files listed, and a small image mapped by one forward pass over itself."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch
from rasterio.transform import from_origin
from rasterio.windows import from_bounds

import lcmap.pipeline.prediction.predict as P
from lcmap.geodata.legends import target_legend
from lcmap.geodata.sample import sample_paths
from lcmap.models import build_model, predict_proba
from lcmap.pipeline.prediction import inference
from lcmap.pipeline.runs import load_trained_model, save_checkpoint
from tests.rasters import write_raster

MEAN, STD = [120.0, 120.0, 110.0, 130.0], [50.0, 45.0, 40.0, 55.0]


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    """A random U-Net whose sharpened head makes several classes win (a deterministic function
    of the pixels and their context)."""
    torch.manual_seed(3)
    model = build_model("unet", 4, len(target_legend()))
    with torch.no_grad():
        model.net.segmentation_head[0].weight.mul_(8.0)
    return save_checkpoint(tmp_path_factory.mktemp("ck") / "m.ckpt", model, "unet", target_legend(), MEAN, STD)


def _codes_over(path: Path, bounds) -> np.ndarray:
    with rasterio.open(path) as src:
        return src.read(1, window=from_bounds(*bounds, transform=src.transform))


FAST = dict(batch_size=4, scheduler="synchronous")


def test_a_file_mapped_alone_equals_it_mapped_with_other_files(ckpt, tmp_path):
    """Real NAIP patches 7 and 3 of the sample (94 m apart): patch 7's classes are the same bit for
    bit whether patch 3 is listed or not (before: the empty space between them, fed as the band
    mean inside the windows, changed them), at two window sizes."""
    imagery = {p.stem: p for p in sample_paths()["imagery"]}
    a, b = imagery["patch-7"], imagery["patch-3"]
    with rasterio.open(a) as src:
        bounds = tuple(src.bounds)
    for tile, overlap in ((64, 16), (128, 32)):
        alone = P.predict_map(
            P.PredictConfig.of(ckpt, [a], tmp_path / f"a{tile}" / "map.tif", tile_px=tile, overlap_px=overlap, **FAST),
            progress=False,
        )
        both = P.predict_map(
            P.PredictConfig.of(
                ckpt, [a, b], tmp_path / f"b{tile}" / "map.tif", tile_px=tile, overlap_px=overlap, **FAST
            ),
            progress=False,
        )
        ca, cb = _codes_over(alone.path, bounds), _codes_over(both.path, bounds)
        assert ca.shape == cb.shape == (256, 256)
        assert (ca > 0).all() and len(np.unique(ca)) >= 2  # mapped, and not one class everywhere
        assert np.array_equal(ca, cb)


def test_a_small_image_inside_one_window_is_one_forward_pass_over_itself(ckpt, tmp_path, monkeypatch):
    """A 64 x 96 px image inside one lattice window of 128 px (and touching its neighbour): the
    model sees exactly the image, never an empty margin, and the map is the argmax of the
    whole-image forward pass."""
    rng = np.random.default_rng(1)
    yy, xx = np.mgrid[0:64, 0:96].astype(np.float32)
    data = np.stack([120 + 90 * np.sin(xx / 7), 120 + 90 * np.cos(yy / 5), 110 + 60 * np.sin((xx - yy) / 9),
                     rng.integers(1, 255, (64, 96))]).clip(1, 255).astype(np.uint8)  # fmt: skip
    # stride 96 at tile 128 / overlap 32: the lattice windows start at x = 96 k; x0 = 96 * 5000 + 10
    x0, y0 = 96 * 5000 + 10.0, 96 * 40000 - 20.0
    path = write_raster(tmp_path / "small.tif", data, transform=from_origin(x0, y0, 1.0, 1.0))
    seen: list[tuple[int, ...]] = []
    real = inference.predict_proba

    def spy(model, x):
        seen.append(tuple(x.shape))
        return real(model, x)

    monkeypatch.setattr(inference, "predict_proba", spy)
    out = P.predict_map(
        P.PredictConfig.of(ckpt, [path], tmp_path / "m" / "map.tif", tile_px=128, overlap_px=32, **FAST), progress=False
    ).path
    assert seen and set(seen) == {(1, 4, 64, 96)}  # the image itself, each time
    model = load_trained_model(ckpt).model
    x = (torch.from_numpy(data.astype(np.float32)) - torch.tensor(MEAN).view(4, 1, 1)) / torch.tensor(STD).view(4, 1, 1)
    with torch.inference_mode():
        want = predict_proba(model, x[None])[0].argmax(0).numpy()
    lut = np.array(target_legend().codes)
    with rasterio.open(out) as src:
        got = src.read(1)
    assert got.shape == (64, 96)
    assert np.array_equal(got, lut[want])

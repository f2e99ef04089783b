"""``lcmap predict --label-prior``: the LR label as a prior at each pixel (Bayes' rule with the
legend's compositions; :mod:`lcmap.pipeline.prediction.prediction_prior`)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch
from rasterio.transform import from_origin

import lcmap.pipeline.prediction.predict as P
from lcmap.errors import LcmapInputError
from lcmap.geodata.compositions import composition_table
from lcmap.geodata.legends import get_legend
from lcmap.geodata.sample import sample_paths
from lcmap.models import build_model, predict_proba, sum_probabilities
from lcmap.pipeline.prediction.prediction_prior import MIN_CLASS_MIX, training_class_mix
from lcmap.pipeline.runs import save_checkpoint
from tests.rasters import write_raster

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py

MEAN, STD = [120.0, 120.0, 110.0, 130.0], [50.0, 45.0, 40.0, 55.0]
NLCD = get_legend("nlcd")
# a training mix: mostly deciduous forest, some pasture and developed open space
FREQ = {41: 0.80, 81: 0.15, 21: 0.05}
FAST = dict(batch_size=4, scheduler="synchronous")


def _predict(model, images, out, **options):
    return P.predict_map(P.PredictConfig.of(model, images, out, **options), progress=False)


def _frequency() -> list[float]:
    return [FREQ.get(c, 0.0) for c in NLCD.codes]


def _model(seed: int = 5) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = build_model("unet", 4, len(NLCD))
    with torch.no_grad():
        model.net.segmentation_head[0].weight.mul_(4.0)
    return model.eval()


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    """A random U-Net over the NLCD legend recording its training labels' class frequencies."""
    return save_checkpoint(
        tmp_path_factory.mktemp("ck") / "m.ckpt", _model(), "unet", NLCD, MEAN, STD, label_frequency=_frequency()
    )


def test_training_class_mix_is_the_frequency_weighted_composition():
    comp = np.array([[0.9, 0.1], [0.2, 0.8], [0.0, 0.0]])
    pi = training_class_mix([0.5, 0.3, 0.2], comp)  # the class without a composition is left out
    assert np.allclose(pi, [(0.5 * 0.9 + 0.3 * 0.2) / 0.8, (0.5 * 0.1 + 0.3 * 0.8) / 0.8])
    with pytest.raises(ValueError):
        training_class_mix([1.0], comp)


def test_a_small_image_with_its_labels_is_mapped_by_bayes_rule(ckpt, tmp_path):
    """64 x 96 px inside one window (one forward pass over the whole image): the map is
    argmax_t p_t M[k, t] / pi_t with k the pixel's NLCD class (labels of 16 m cells, one of them
    nodata), computed here by hand from the network's own probabilities."""
    rng = np.random.default_rng(2)
    yy, xx = np.mgrid[0:64, 0:96].astype(np.float32)
    img = np.stack([120 + 90 * np.sin(xx / 7), 120 + 90 * np.cos(yy / 5), 110 + 60 * np.sin((xx - yy) / 9),
                    rng.integers(1, 255, (64, 96))]).clip(1, 255).astype(np.uint8)  # fmt: skip
    x0, y0 = 96 * 5000 + 10.0, 96 * 40000 - 20.0
    image = write_raster(tmp_path / "img.tif", img, transform=from_origin(x0, y0, 1.0, 1.0))
    cells = np.array([[41, 81, 21, 41, 82, 41], [81, 41, 0, 22, 41, 81],
                      [41, 41, 81, 81, 21, 41], [41, 82, 41, 41, 41, 41]])  # fmt: skip
    cell_transform = from_origin(x0, y0, 16.0, 16.0)
    labels = write_raster(tmp_path / "nlcd.tif", cells.astype(np.uint8)[None], transform=cell_transform, nodata=0)

    plain = _predict(ckpt, [image], tmp_path / "plain" / "map.tif", tile_px=128, overlap_px=32, **FAST)
    fused = _predict(ckpt, [image], tmp_path / "fused" / "map.tif", tile_px=128, overlap_px=32,
                          label_prior=[str(labels)], confidence=True, **FAST)  # fmt: skip
    assert fused.confidence_path is not None
    with rasterio.open(plain.path) as a, rasterio.open(fused.path) as b, rasterio.open(fused.confidence_path) as c:
        got_plain, got, conf = a.read(1), b.read(1), c.read(1).astype(int)
        tag = json.loads(b.tags()["LCMAP_LABEL_PRIOR"])
    assert tag["legend"] == "nlcd" and tag["label_files"] == [str(labels.absolute())]

    x = torch.from_numpy((img.astype(np.float32) - np.array(MEAN)[:, None, None]) / np.array(STD)[:, None, None])
    with torch.no_grad():
        probs = predict_proba(_model(), x[None].float())
    n_t = len(NLCD.target)
    p = sum_probabilities(probs, torch.from_numpy(NLCD.index_to_target_group()), n_t + 1)[0].numpy()
    table = composition_table(NLCD).mean
    pi = np.maximum((np.array(_frequency()) @ table) / sum(_frequency()), MIN_CLASS_MIX)
    code = np.repeat(np.repeat(cells, 16, axis=0), 16, axis=1)
    factor = np.ones_like(p)
    for c in np.unique(code[code > 0]):
        k = NLCD.codes.index(int(c))
        factor[:n_t, code == c] = (table[k] / pi)[:, None]
    score = p * factor
    code_of = np.array([*range(1, n_t + 1), 0])  # target codes 1..T; the channel without a target: nodata
    want, want_plain = code_of[score.argmax(0)], code_of[p.argmax(0)]
    top2 = np.sort(score, axis=0)[-2:]
    clear = (top2[1] - top2[0]) > 1e-4 * top2[1]  # not a near-tie (float sums in another order)
    assert clear.mean() > 0.99
    assert np.array_equal(got[clear], want[clear])
    # the confidence: the largest of p_t M[k, t] / pi_t normalised over t, in percent
    want_conf = np.round(100 * score.max(0) / score.sum(0)).astype(int)
    assert np.abs(conf - want_conf).max() <= 1
    assert np.array_equal(got_plain[(code == 0) & clear], got[(code == 0) & clear])  # no label: the network's
    assert (got != got_plain).mean() > 0.05  # the prior changes the map ...
    lab_target = np.zeros_like(code)
    for c in np.unique(code[code > 0]):
        lab_target[code == c] = int(NLCD.code_to_target_lut()[c]) + 1  # target index -> code
    assert (got == lab_target).mean() > (got_plain == lab_target).mean()  # ... towards the label
    top2 = np.sort(p, axis=0)[-2:]
    clear = (top2[1] - top2[0]) > 1e-4 * top2[1]
    assert np.array_equal(got_plain[clear], want_plain[clear])


def test_a_real_patch_with_its_nlcd_is_the_same_map_at_any_block_size(ckpt, tmp_path):
    """Sample patch 0 (NAIP) with its NLCD 30 m labels (read onto the 1 m grid by nearest
    neighbour): the same map bit for bit with 64 px and 256 px blocks."""
    paths = sample_paths()
    image, labels = paths["imagery"][0], paths["labels"][0]
    maps, blocks = [], []
    for block in (64, 256):
        r = _predict(ckpt, [image], tmp_path / f"b{block}" / "map.tif", tile_px=64, overlap_px=16,
                          block_px=block, label_prior=[str(labels)], **FAST)  # fmt: skip
        with rasterio.open(r.path) as src:
            maps.append(src.read(1))
        blocks.append(r.blocks)
    assert blocks[0] > blocks[1]  # the labels are read block by block
    assert np.array_equal(maps[0], maps[1]) and len(np.unique(maps[0])) >= 2


def test_bad_label_priors_are_clear_errors(ckpt, tmp_path):
    paths = sample_paths()
    image, labels = paths["imagery"][0], paths["labels"][0]
    out = tmp_path / "m" / "map.tif"
    old = save_checkpoint(tmp_path / "old.ckpt", _model(), "unet", NLCD, MEAN, STD)  # no label_frequency
    with pytest.raises(LcmapInputError, match="class mix of its training labels"):
        _predict(old, [image], out, tile_px=64, overlap_px=16, label_prior=[str(labels)], **FAST)
    with pytest.raises(LcmapInputError, match="--legend target"):
        _predict(ckpt, [image], out, tile_px=64, overlap_px=16, legend="native", label_prior=[str(labels)], **FAST)
    far_transform = from_origin(10.0, 40.0, 30.0, 30.0)
    far = write_raster(tmp_path / "far.tif", np.full((1, 4, 4), 41, np.uint8), transform=far_transform, nodata=0)
    with pytest.raises(LcmapInputError, match="overlaps the map"):
        _predict(ckpt, [image], out, tile_px=64, overlap_px=16, label_prior=[str(far)], **FAST)
    with pytest.raises(LcmapInputError):
        _predict(ckpt, [image], out, tile_px=64, overlap_px=16, label_prior=[str(tmp_path / "no.tif")], **FAST)
    assert not out.exists()


def test_a_pixels_label_is_the_same_in_any_window_read(tmp_path):
    """Labels in another CRS (30 m, EPSG:5070) onto a 1 m UTM map: each pixel's label the same in
    any window a worker asks for (read in fixed tiles; GDAL's approximate transformer, asked for
    other windows, gave other nearest cells at tens of pixels per Mpx before)."""
    from rasterio.crs import CRS
    from rasterio.warp import transform_bounds

    from lcmap.pipeline.prediction.prediction_prior import PredictionPrior, PriorReader

    legend = get_legend("nlcd")
    # a 1 m UTM 17N grid (about 84.0 W 35.1 N) and 30 m labels in EPSG:5070 around it
    utm = CRS.from_epsg(32617).to_wkt()
    transform = from_origin(682_000.0, 3_887_000.0, 1.0, 1.0)
    left, _, _, top = transform_bounds(utm, "EPSG:5070", 681_900.0, 3_885_100.0, 684_700.0, 3_887_100.0)
    n = 140
    rng = np.random.default_rng(1)
    codes = rng.choice(np.asarray(legend.codes, np.uint8), (n, n))
    path = tmp_path / "nlcd.tif"
    with rasterio.open(path, "w", driver="GTiff", width=n, height=n, count=1, dtype="uint8", crs="EPSG:5070",
                       transform=from_origin(left, top, 30.0, 30.0), nodata=0) as dst:  # fmt: skip
        dst.write(codes, 1)
    k, c = len(legend), 4
    prior = PredictionPrior((str(path),), legend.to_dict(), tuple((1.0,) * c for _ in range(k)), (0.25,) * c)
    whole = PriorReader(prior, utm, transform).labels(0, 1800, 0, 2600)
    assert (whole < k).mean() > 0.9  # the grid lies on the labels
    for r0, r1, c0, c1 in [(37, 700, 11, 2000), (100, 1800, 500, 2600), (0, 1024, 0, 777), (300, 812, 700, 1210)]:
        part = PriorReader(prior, utm, transform).labels(r0, r1, c0, c1)
        assert np.array_equal(part, whole[r0:r1, c0:c1]), (r0, r1, c0, c1)

"""Test-time augmentation: the transforms, the averaged probabilities, and ``lcmap predict --tta``.

Toy models with known answers (per-pixel: equivariant; a row ramp; a one-pixel shift), then the
blended predictor with a tiny random U-Net: block sizes and schedulers stay bit-identical with
TTA on, the map records the mode, the resume manifest tells the modes apart.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch
from rasters import fake_imagery
from torch import nn

import lcmap.pipeline.prediction.predict as P
from lcmap.errors import LcmapInputError
from lcmap.geodata.legends import target_legend
from lcmap.models import build_model, predict_proba
from lcmap.models.tta import TTA_MODES, apply_transform, invert_transform, predict_proba_tta, tta_transforms
from lcmap.pipeline.runs import save_checkpoint
from lcmap.pipeline.training.config import TrainConfig

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


class Counting(nn.Module):
    """Wraps a ``(B, C, H, W) -> (B, K, H, W)`` function as a one-head model; records input shapes."""

    def __init__(self, fn) -> None:
        super().__init__()
        self.fn, self.shapes = fn, []

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        self.shapes.append(tuple(x.shape))
        return [self.fn(x)]


def _sig(v: np.ndarray) -> np.ndarray:
    return 1 / (1 + np.exp(-v))


# ------------------------------------------------------------------------------ transforms
def test_transforms_are_the_group_and_invert():
    x = torch.arange(12.0).view(1, 1, 3, 4)
    assert [len(tta_transforms(m)) for m in TTA_MODES] == [1, 4, 8]
    images = {m: {tuple(apply_transform(x, k, f).flatten().tolist()) for k, f in tta_transforms(m)} for m in TTA_MODES}
    assert len(images["flips"]) == 4 and len(images["d4"]) == 8  # all distinct
    flips = {tuple(x.flip(d).flatten().tolist()) for d in [(-1,), (-2,), (-2, -1)]} | {tuple(x.flatten().tolist())}
    assert images["flips"] == flips
    for k, f in tta_transforms("d4"):
        assert torch.equal(invert_transform(apply_transform(x, k, f), k, f), x)
    with pytest.raises(ValueError, match="TTA mode"):
        tta_transforms("d8")


# ---------------------------------------------------------------------- averaged probabilities
def test_equivariant_model_gives_the_same_probabilities():
    torch.manual_seed(0)
    conv = nn.Sequential(nn.Conv2d(4, 16, 1), nn.ReLU(), nn.Conv2d(16, 5, 1))  # per-pixel MLP
    model = Counting(conv)
    x = torch.randn(3, 4, 32, 32)
    with torch.no_grad():
        base = predict_proba(model, x)
        for mode in ("flips", "d4"):
            probs = predict_proba_tta(model, x, mode)
            assert torch.allclose(probs, base, atol=1e-6)
            assert torch.equal(probs.argmax(1), base.argmax(1))
        assert torch.equal(predict_proba_tta(model, x, "none"), base)


@pytest.mark.parametrize("shape", [(8, 8), (6, 10)])
def test_row_dependent_model_gives_the_hand_computed_average(shape):
    """Logits (row index, 0): P(class 0) = sigmoid(row) in the frame the model sees. Transformed back,
    the 4 flips see rows i and H-1-i (twice each); D4 also sees columns j and W-1-j as rows."""
    h, w = shape

    def ramp(x):
        rows = torch.arange(x.shape[-2], dtype=torch.float32).view(1, 1, -1, 1).expand(x.shape[0], 1, -1, x.shape[-1])
        return torch.cat([rows, torch.zeros_like(rows)], dim=1)

    model = Counting(ramp)
    x = torch.zeros(2, 3, h, w)
    i, j = np.mgrid[0:h, 0:w].astype(np.float64)
    p0 = predict_proba_tta(model, x, "flips")[:, 0].numpy()
    assert model.shapes == [(8, 3, h, w)]  # one call, the 4 copies stacked along the batch axis
    expected = (_sig(i) + _sig(h - 1 - i)) / 2
    assert np.allclose(p0, expected[None], atol=1e-6)
    assert not np.allclose(p0, _sig(i)[None], atol=1e-3)  # TTA changed something
    model.shapes.clear()
    p0 = predict_proba_tta(model, x, "d4")[:, 0].numpy()
    expected = (_sig(i) + _sig(h - 1 - i) + _sig(j) + _sig(w - 1 - j)) / 4
    assert np.allclose(p0, expected[None], atol=1e-6)
    # square: one call of 8 copies; otherwise one per output shape (0/180 and 90/270 degrees)
    assert model.shapes == ([(16, 3, h, w)] if h == w else [(8, 3, h, w), (8, 3, w, h)])


def test_directional_kernel_averages_the_four_neighbours():
    """Logits (left neighbour's value, 0), zero-padded: D4 turns the kernel to every side."""

    def left(x):
        shifted = torch.nn.functional.pad(x[:, :1, :, :-1], (1, 0, 0, 0))
        return torch.cat([shifted, torch.zeros_like(shifted)], dim=1)

    rng = np.random.default_rng(1)
    img = rng.normal(size=(7, 7)).astype(np.float32)
    x = torch.from_numpy(img)[None, None]
    p = np.pad(img, 1)
    lf, rt, up, dn = p[1:-1, :-2], p[1:-1, 2:], p[:-2, 1:-1], p[2:, 1:-1]
    got = predict_proba_tta(Counting(left), x, "flips")[0, 0].numpy()
    assert np.allclose(got, (_sig(lf) + _sig(rt)) / 2, atol=1e-6)
    got = predict_proba_tta(Counting(left), x, "d4")[0, 0].numpy()
    assert np.allclose(got, (_sig(lf) + _sig(rt) + _sig(up) + _sig(dn)) / 4, atol=1e-6)


# --------------------------------------------------------------------- validation option
def test_val_tta_option_is_checked_and_reaches_validation(monkeypatch):
    assert TrainConfig().val_tta == "none"
    assert TrainConfig().merged(val_tta="D4").val_tta == "d4"
    bad = TrainConfig(images=["a"], labels=["b"], out="o").merged(val_tta="rot")
    with pytest.raises(LcmapInputError, match="--val-tta"):
        bad.check()

    import lcmap.pipeline.training.task as task_module

    seen = []
    real = task_module.predict_proba_tta

    def spy(model, x, mode="none", *args):
        seen.append(mode)
        return real(model, x, mode, *args)

    monkeypatch.setattr(task_module, "predict_proba_tta", spy)
    task = task_module.LandCoverTask("unet", 4, target_legend().to_dict(), [0.0] * 4, [1.0] * 4, val_tta="flips")
    with torch.no_grad():
        task.validation_step({"image": torch.randn(1, 4, 32, 32), "mask": torch.zeros(1, 32, 32, dtype=torch.long)}, 0)
    assert seen == ["flips"]


# ----------------------------------------------------------------------- lcmap predict --tta
H, W = 100, 120
FAST = dict(tile_px=64, overlap_px=16, batch_size=3, confidence=True)


def _read(path: Path, band: int = 1) -> np.ndarray:
    with rasterio.open(path) as src:
        return src.read(band)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("tta")
    image = fake_imagery(root / "img.tif", h=H, w=W)
    torch.manual_seed(3)
    model = build_model("unet", 4, len(target_legend()))
    with torch.no_grad():
        model.net.segmentation_head[0].weight.mul_(8.0)
    ckpt = save_checkpoint(root / "m.ckpt", model, "unet", target_legend(), [128.0] * 4, [60.0] * 4)
    ref = P.predict_map(
        P.PredictConfig.of(
            ckpt, image, root / "ref" / "map.tif", block_px=4096, scheduler="synchronous", tta="d4", **FAST
        ),
        progress=False,
    )
    none = P.predict_map(
        P.PredictConfig.of(ckpt, image, root / "none" / "map.tif", block_px=4096, scheduler="synchronous", **FAST),
        progress=False,
    )
    return {"root": root, "image": image, "ckpt": ckpt, "ref": ref.path, "none": none.path}


def test_tta_map_is_recorded_and_differs_from_none(data):
    with rasterio.open(data["ref"]) as src:
        assert src.tags()["LCMAP_TTA"] == "d4"
    with rasterio.open(data["none"]) as src:
        assert src.tags()["LCMAP_TTA"] == "none"
    conf = data["ref"].with_name("map_confidence.tif")
    with rasterio.open(conf) as src:
        assert src.tags()["LCMAP_TTA"] == "d4"
    # the confidence is that of the averaged probabilities: not the plain run's
    assert not np.array_equal(_read(conf), _read(data["none"].with_name("map_confidence.tif")))
    assert _read(data["ref"]).any()


def test_tta_map_is_bit_identical_across_block_sizes(data, tmp_path):
    out = P.predict_map(
        P.PredictConfig.of(
            data["ckpt"],
            data["image"],
            tmp_path / "b48" / "map.tif",
            block_px=48,
            scheduler="synchronous",
            tta="d4",
            **FAST,
        ),
        progress=False,
    )
    assert out.blocks > 4
    assert np.array_equal(_read(out.path), _read(data["ref"]))
    assert np.array_equal(_read(out.confidence_path), _read(data["ref"].with_name("map_confidence.tif")))


def test_tta_map_is_bit_identical_on_a_local_cluster(data, tmp_path):
    out = P.predict_map(
        P.PredictConfig.of(data["ckpt"], data["image"], tmp_path / "dask" / "map.tif", block_px=96, tta="d4", **FAST),
        progress=False,
    )
    assert out.blocks_run == 4
    assert np.array_equal(_read(out.path), _read(data["ref"]))
    assert np.array_equal(_read(out.confidence_path), _read(data["ref"].with_name("map_confidence.tif")))


def test_manifest_fingerprint_differs_between_modes(data, tmp_path):
    prints = [
        P.plan_prediction(P.PredictConfig.of(data["ckpt"], data["image"], tmp_path / "m.tif", tta=m)).fingerprint
        for m in TTA_MODES
    ]
    assert [p["tta"] for p in prints] == list(TTA_MODES)
    assert prints[0] != prints[1] != prints[2] != prints[0]
    with pytest.raises(LcmapInputError, match="--tta"):
        P.plan_prediction(P.PredictConfig.of(data["ckpt"], data["image"], tmp_path / "m.tif", tta="all"))

"""The prior over target classes (:mod:`lcmap.pipeline.training.label_prior`) and the losses that train on it
(:mod:`lcmap.pipeline.training.losses`): hand-computed values on tiny tensors and where their minimum is."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from pyproj import Transformer
from rasterio.transform import from_origin
from rasters import UTM17, fake_imagery, write_raster

from lcmap.geodata.compositions import composition_table
from lcmap.geodata.datasets import pair_imagery_labels
from lcmap.geodata.legends import IGNORE_INDEX, get_legend
from lcmap.pipeline.training.label_prior import gaussian_kernel, label_prior
from lcmap.pipeline.training.losses import (
    PriorSpec,
    label_loss,
    lsr_loss,
    plat_loss,
    prior_plat_loss,
    qr_loss,
    soft_ce,
    weighted_ce,
)

I = IGNORE_INDEX  # noqa: E741
NLCD = get_legend("nlcd")
#: 3 LR classes x 2 target classes; class 2 has no composition (a row of zeros)
MEAN = torch.tensor([[0.8, 0.2], [0.1, 0.9], [0.0, 0.0]])
SIGMA = torch.tensor([[0.1, 0.1], [0.05, 0.05], [0.0, 0.0]])


def _blur_by_hand(labels: np.ndarray, mean: np.ndarray, sigma_px: float) -> np.ndarray:
    """The normalised Gaussian mean of the neighbours' rows, by explicit sums over pixel pairs."""
    h, w = labels.shape
    radius = max(1, math.ceil(3 * sigma_px))
    valid = np.array([[0 <= y < len(mean) and mean[y].sum() > 0 for y in row] for row in labels])
    out = np.zeros((mean.shape[1], h, w))
    for i in range(h):
        for j in range(w):
            if not valid[i, j]:
                continue
            num, den = np.zeros(mean.shape[1]), 0.0
            for a in range(h):
                for b in range(w):
                    if valid[a, b] and abs(a - i) <= radius and abs(b - j) <= radius:
                        g = math.exp(-0.5 * ((a - i) ** 2 + (b - j) ** 2) / sigma_px**2)
                        num += g * mean[labels[a, b]]
                        den += g
            out[:, i, j] = num / den
    return out


# ------------------------------------------------------------------------------ the prior
def test_prior_of_a_hand_made_label_is_the_composition_row() -> None:
    labels = torch.tensor([[[0, 1, I], [2, 1, 0]]])
    prior, valid = label_prior(labels, MEAN)
    assert valid.tolist() == [[[True, True, False], [False, True, True]]]  # nodata, class without one
    want = torch.tensor([[[0.8, 0.1, 0], [0, 0.1, 0.8]], [[0.2, 0.9, 0], [0, 0.9, 0.2]]])
    torch.testing.assert_close(prior[0], want)


def test_blurred_prior_is_the_normalised_gaussian_mean_of_the_neighbours() -> None:
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 3, size=(9, 11))
    labels[4, 5] = I
    prior, valid = label_prior(torch.from_numpy(labels)[None].long(), MEAN, blur_px=1.3)
    want = _blur_by_hand(labels, MEAN.numpy().astype(np.float64), 1.3)
    np.testing.assert_allclose(prior[0].numpy(), want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(prior[0].sum(0).numpy(), valid[0].numpy().astype(float), atol=1e-6)
    assert gaussian_kernel(1.3).numel() == 2 * 4 + 1 and float(gaussian_kernel(1.3).sum()) == pytest.approx(1.0)


def test_prior_across_a_crs_change_through_the_training_label_path(tmp_path: Path) -> None:
    """NLCD-coded 30 m labels in UTM zone 18N under 1 m imagery in zone 17N, read as training reads
    them (:class:`~lcmap.geodata.datasets.LabelledImagery`, nearest neighbour): the prior equals the
    one computed by hand from each pixel centre projected (pyproj) into the labels' grid. Pixels
    within 1 cm of a cell edge (where GDAL's approximate projection may fall either way) are left
    out of the comparison."""
    img = fake_imagery(tmp_path / "img.tif", h=64, w=64)  # EPSG:32617, origin (500000, 4000000), 1 m
    to_labels = Transformer.from_crs(UTM17, "EPSG:32618", always_xy=True)
    cols, rows = np.meshgrid(np.arange(64), np.arange(64))
    x, y = to_labels.transform(500_000 + cols + 0.5, 4_000_000 - rows - 0.5)
    lx0, ly0 = np.floor(x.min() / 30) * 30 - 30, np.ceil(y.max() / 30) * 30 + 30
    n_x, n_y = int(np.ceil((x.max() - lx0) / 30)) + 1, int(np.ceil((ly0 - y.min()) / 30)) + 1
    rng = np.random.default_rng(5)
    codes = rng.choice(np.array([11, 21, 22, 41, 81, 95], np.uint8), size=(n_y, n_x))
    codes[1, 1] = 0  # nodata
    lbl = write_raster(tmp_path / "lbl.tif", codes, crs="EPSG:32618", transform=from_origin(lx0, ly0, 30, 30), nodata=0)
    mask = pair_imagery_labels(img, lbl, NLCD)[(slice(500_000, 500_064, 1.0), slice(3_999_936, 4_000_000, 1.0))]["mask"]
    fx, fy = (x - lx0) / 30, (ly0 - y) / 30
    hand_idx = NLCD.encode(codes[np.floor(fy).astype(int), np.floor(fx).astype(int)]).astype(np.int64)
    sure = (np.abs(fx - np.round(fx)) * 30 > 0.01) & (np.abs(fy - np.round(fy)) * 30 > 0.01)
    assert sure.mean() > 0.95 and len(np.unique(hand_idx)) >= 4  # a real mix of classes and cell edges
    np.testing.assert_array_equal(mask.numpy()[sure], hand_idx[sure])
    table = torch.tensor(composition_table(NLCD).mean)
    prior, valid = label_prior(mask[None], table)
    want = np.where(hand_idx != I, table.numpy()[np.where(hand_idx != I, hand_idx, 0)].transpose(2, 0, 1), 0.0)
    np.testing.assert_allclose(prior[0].numpy()[:, sure], want[:, sure], atol=1e-7)
    # blurred: the Gaussian mean of the hand-made labels around each pixel (all of it sure there)
    part = next(
        (slice(r, r + 14), slice(c, c + 14)) for r in range(0, 50, 2) for c in range(0, 50, 2)
        if sure[r : r + 14, c : c + 14].all() and len(np.unique(hand_idx[r : r + 14, c : c + 14])) > 1
    )  # fmt: skip
    blurred = label_prior(mask[None][(slice(None), *part)], table, blur_px=2.0)[0]
    np.testing.assert_allclose(
        blurred[0].numpy(), _blur_by_hand(hand_idx[part], table.numpy(), 2.0), rtol=1e-5, atol=1e-6
    )


# ------------------------------------------------------------------------------ losses
def test_soft_ce_by_hand_and_its_minimum_at_the_prior() -> None:
    logits = torch.tensor([[1.0, 0.0], [0.0, 2.0]]).T.reshape(1, 2, 1, 2)  # pixel 0: (1, 0), pixel 1: (0, 2)
    q = torch.tensor([[0.8, 0.2], [0.1, 0.9]]).T.reshape(1, 2, 1, 2)
    w = torch.tensor([[[1.0, 3.0]]])
    p = torch.softmax(logits, 1)[0, :, 0]
    ce = [-(q[0, :, 0, i] * p[:, i].log()).sum() for i in range(2)]
    assert soft_ce(logits, q, w).item() == pytest.approx(((ce[0] + 3 * ce[1]) / 4).item(), rel=1e-6)
    assert soft_ce(logits, q, torch.zeros_like(w)).item() == 0.0
    # minimum: p = q (the gradient vanishes at logits = log q), value = the prior's entropy
    at_q = q.log().clone().requires_grad_(True)
    value = soft_ce(at_q, q, w)
    (grad,) = torch.autograd.grad(value, at_q)
    assert grad.abs().max().item() < 1e-6
    entropy = -(q * q.log()).sum(1)[0, 0]
    assert value.item() == pytest.approx(((entropy[0] + 3 * entropy[1]) / 4).item(), rel=1e-6)
    assert soft_ce(logits, q, w).item() > value.item()


def test_lsr_by_hand_and_zero_when_the_mix_is_within_the_composition() -> None:
    # one patch, 4 pixels: two of LR class 0, two of LR class 1
    logits = torch.tensor([[2.0, 0.0, 0.0, 1.0], [0.0, 1.0, 3.0, 0.0]]).reshape(1, 2, 1, 4)
    target = torch.tensor([[[0, 0, 1, 1]]])
    valid = torch.ones_like(target, dtype=torch.bool)
    p = torch.softmax(logits, 1)[0, :, 0]  # (2 targets, 4 px)
    total = 0.0
    for k, px in ((0, [0, 1]), (1, [2, 3])):
        m = p[:, px].mean(1)
        v = (p[:, px] * (1 - p[:, px])).sum(1) / 4
        d = torch.relu((m - MEAN[k]).abs() - SIGMA[k])
        total += 2 * (d**2 / (v + SIGMA[k] ** 2 + 1e-6) + torch.log1p(v / 0.03)).sum()
    assert lsr_loss(logits, target, valid, MEAN, SIGMA).item() == pytest.approx(total.item() / 4, rel=1e-5)
    # class weights weigh the regions (3 for class 0)
    w = torch.tensor([3.0, 1.0, 1.0])
    crit0 = lsr_loss(logits, torch.zeros_like(target), valid, MEAN, SIGMA)  # sanity: runs on one region
    assert torch.isfinite(crit0)
    weighted = lsr_loss(logits, target, valid, MEAN, SIGMA, w).item()
    assert weighted != pytest.approx(total.item() / 4)
    # minimum 0: certain pixels whose mix is inside mean +- sigma (class 0: 80 % / 20 %, sigma 0.1)
    good = torch.tensor([[30.0, 30.0, 30.0, 30.0, -30.0], [-30.0, -30.0, -30.0, -30.0, 30.0]]).reshape(1, 2, 1, 5)
    zeros = torch.zeros(1, 1, 5, dtype=torch.long)
    assert lsr_loss(good, zeros, torch.ones_like(zeros, dtype=torch.bool), MEAN, SIGMA).item() == pytest.approx(
        0, abs=1e-6
    )
    bad = torch.tensor([[-30.0] * 5, [30.0] * 5]).reshape(1, 2, 1, 5)  # all of the wrong class
    assert lsr_loss(bad, zeros, torch.ones_like(zeros, dtype=torch.bool), MEAN, SIGMA).item() > 1.0


def test_qr_by_hand_and_its_minimum_at_the_prior_for_one_pixel() -> None:
    logits = torch.tensor([[1.0, 0.0, -1.0], [0.5, 0.5, 0.0]]).T.reshape(1, 3, 1, 2)
    q = torch.tensor([[0.7, 0.2, 0.1], [0.0, 0.5, 0.5]]).T.reshape(1, 3, 1, 2)
    w = torch.ones(1, 1, 2)
    p = torch.softmax(logits, 1)[0, :, 0]
    qbar = p.mean(1)
    fit = sum((p[:, i] * q[0, :, 0, i].clamp_min(1e-4).log()).sum() for i in range(2)) / 2
    want = (qbar * qbar.log()).sum() - fit
    assert qr_loss(logits, q, w).item() == pytest.approx(want.item(), rel=1e-5)
    # one pixel: KL(p || q), 0 at p = q and positive elsewhere
    q1 = torch.tensor([0.6, 0.3, 0.1]).reshape(1, 3, 1, 1)
    at_q = q1.log().clone().requires_grad_(True)
    value = qr_loss(at_q, q1, torch.ones(1, 1, 1))
    (grad,) = torch.autograd.grad(value, at_q)
    assert value.item() == pytest.approx(0.0, abs=1e-6) and grad.abs().max().item() < 1e-6
    assert qr_loss(torch.zeros(1, 3, 1, 1), q1, torch.ones(1, 1, 1)).item() > 0.01


def test_prior_plat_trains_head2_on_head1s_posterior_without_gradient_through_it() -> None:
    torch.manual_seed(0)
    head1 = torch.randn(2, 2, 3, 3, requires_grad=True)
    head2 = torch.randn(2, 2, 3, 3, requires_grad=True)
    target = torch.randint(0, 2, (2, 3, 3))
    target[0, 0, 0] = I
    q, valid = label_prior(target, MEAN)
    w = valid.float()
    total, l1, l2, agree = prior_plat_loss(head1, head2, q, w)
    pseudo = (torch.softmax(head1, 1) * q).argmax(1)
    want2 = F.cross_entropy(head2, torch.where(valid, pseudo, torch.full_like(pseudo, I)), ignore_index=I)
    assert l2.item() == pytest.approx(want2.item(), rel=1e-5)
    assert l1.item() == pytest.approx(soft_ce(head1, q, w).item(), rel=1e-6)
    same = (pseudo == head1.argmax(1)) & valid
    assert agree.item() == pytest.approx(same.sum().item() / valid.sum().item())
    g1 = torch.autograd.grad(total, head1, retain_graph=True)[0]
    torch.testing.assert_close(g1, torch.autograd.grad(l1, head1)[0])


def test_label_loss_keeps_todays_losses_and_dispatches_the_prior_ones() -> None:
    torch.manual_seed(1)
    h1, h2 = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    y = torch.randint(0, 3, (2, 4, 4))
    plat = label_loss("plat", [h1, h2], y)
    assert plat["loss"].item() == pytest.approx(plat_loss(h1, h2, y)[0].item())
    ce = label_loss("ce", [h1, h2], y)
    assert ce["loss"].item() == pytest.approx((weighted_ce(h1, y) + weighted_ce(h2, y)).item(), rel=1e-6)
    assert label_loss("plat", [h1], y)["loss"].item() == pytest.approx(weighted_ce(h1, y).item())  # one head: CE
    spec = PriorSpec(MEAN, SIGMA, 0.0)
    t1, t2 = h1[:, :2], h2[:, :2]
    q, valid = label_prior(y, MEAN)
    prior = label_loss("prior", [t1, t2], y, prior=spec)
    want = soft_ce(t1, q, valid.float()) + soft_ce(t2, q, valid.float())
    assert prior["loss"].item() == pytest.approx(want.item(), rel=1e-6)
    weights = torch.tensor([2.0, 1.0, 5.0])
    wq = label_loss("qr", [t1], y, weights, prior=spec)["loss"]
    assert wq.item() == pytest.approx(qr_loss(t1, q, weights[y] * valid).item(), rel=1e-6)
    lsr = label_loss("lsr", [t1], y, prior=spec)["loss"]
    assert lsr.item() == pytest.approx(lsr_loss(t1, y, valid, MEAN, SIGMA).item(), rel=1e-6)
    assert set(label_loss("prior-plat", [t1, t2], y, prior=spec)) == {"loss", "loss_ce", "loss_mce", "plat_kept"}
    with pytest.raises(ValueError, match="composition"):
        label_loss("prior", [t1], y)
    with pytest.raises(ValueError, match="unknown label loss"):
        label_loss("dice", [t1], y)


def test_task_with_a_prior_loss_predicts_the_target_classes() -> None:
    from lcmap.geodata.legends import target_legend
    from lcmap.pipeline.training.task import LandCoverTask

    table = composition_table(NLCD)
    task = LandCoverTask(
        "unet", 4, target_legend().to_dict(), [0.0] * 4, [1.0] * 4, class_weights=[1.0] * len(NLCD),
        label_loss="prior", composition=table.mean.tolist(), composition_sigma=table.sigma.tolist(),
        prior_blur_px=1.0, label_legend=NLCD.to_dict(),
    )  # fmt: skip
    out = task(torch.zeros(2, 4, 32, 32))
    assert out[0].shape[1] == 4  # the target classes
    y = torch.full((2, 32, 32), NLCD.codes.index(21))
    losses = task.compute_loss(out, y)
    assert torch.isfinite(losses["loss"])
    assert task.hparams["composition"][NLCD.codes.index(21)] == pytest.approx(table.mean[NLCD.codes.index(21)].tolist())
    # validated against the LR labels (no reference): their NLCD indices are read in the NLCD legend
    assert task.mask_to_target[NLCD.codes.index(41)].item() == NLCD.target.index_of("tree canopy")
    assert task.mask_to_target[NLCD.codes.index(12)].item() == I
    with pytest.raises(ValueError, match="composition table"):
        LandCoverTask("unet", 4, target_legend().to_dict(), [0.0] * 4, [1.0] * 4, label_loss="prior")

"""``lcmap train``: PLAT loss, class weights, options, and tiny runs on the embedded sample."""

from __future__ import annotations

import signal
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lcmap.errors import LcmapInputError
from lcmap.geodata.legends import IGNORE_INDEX
from lcmap.pipeline.task import inverse_sqrt_frequency_weights, plat_loss, plat_mask, weighted_ce
from lcmap.errors import TrainingInterrupted
from lcmap.pipeline.train import TrainConfig, run_train

SAMPLE = Path(__file__).resolve().parents[1] / "lcmap" / "geodata" / "sample"
I = IGNORE_INDEX


def _logits_for(argmax: list[list[int]], k: int = 3) -> torch.Tensor:
    """(1, k, H, W) logits whose argmax is ``argmax``."""
    a = torch.tensor(argmax)
    return F.one_hot(a, k).permute(2, 0, 1)[None].float() * 4.0


# ------------------------------------------------------------------------------------ PLAT
def test_plat_mask_keeps_label_only_where_head1_agrees():
    head1 = _logits_for([[0, 1, 2], [2, 0, 1]])
    target = torch.tensor([[[0, 2, 2], [I, 1, 1]]])
    mask = plat_mask(head1, target)
    assert mask.tolist() == [[[0, I, 2], [I, I, 1]]]
    assert mask.dtype == torch.int64 and not mask.requires_grad


def test_plat_loss_is_ce_on_labels_plus_ce_on_mask_without_gradient_through_mask():
    torch.manual_seed(0)
    head1 = torch.randn(2, 4, 5, 5, requires_grad=True)
    head2 = torch.randn(2, 4, 5, 5, requires_grad=True)
    target = torch.randint(0, 4, (2, 5, 5))
    target[0, 0, :] = I
    weights = torch.tensor([0.5, 1.0, 2.0, 0.5])
    total, ce, mce, kept = plat_loss(head1, head2, target, weights)
    mask = plat_mask(head1, target)
    exp_ce = F.cross_entropy(head1, target, weight=weights, ignore_index=I)
    exp_mce = F.cross_entropy(head2, mask, weight=weights, ignore_index=I)
    assert torch.allclose(ce, exp_ce) and torch.allclose(mce, exp_mce)
    assert torch.allclose(total, exp_ce + exp_mce)
    valid = (target != I).sum().item()
    assert kept.item() == pytest.approx((mask != I).sum().item() / valid)
    # head 1 receives gradient only from its own CE (the mask is a constant).
    g1 = torch.autograd.grad(total, head1, retain_graph=True)[0]
    g1_ce = torch.autograd.grad(exp_ce, head1)[0]
    assert torch.allclose(g1, g1_ce)


def test_losses_are_zero_not_nan_without_valid_pixels():
    head = torch.randn(1, 3, 4, 4, requires_grad=True)
    target = torch.full((1, 4, 4), I)
    loss = weighted_ce(head, target, torch.ones(3))
    assert loss.item() == 0.0
    loss.backward()
    assert torch.isfinite(head.grad).all()
    # A head 1 that agrees nowhere: the masked CE is 0, the total is just the CE.
    head1 = _logits_for([[1, 1], [1, 1]])
    total, ce, mce, kept = plat_loss(head1, torch.randn(1, 3, 2, 2), torch.zeros(1, 2, 2, dtype=torch.long))
    assert mce.item() == 0.0 and kept.item() == 0.0 and torch.isfinite(total)


def test_partial_label_ce_for_mixed_classes_on_a_hand_made_example():
    # 3 classes; label 0 is "mixed": class 1 or 2 (not 0) is acceptable
    allowed = torch.tensor([[False, True, True], [False, True, False], [False, False, True]])
    logits = torch.tensor([[2.0, 0.0, 1.0], [0.0, 3.0, 0.0]]).T.reshape(1, 3, 1, 2)
    target = torch.tensor([[[0, 1]]])
    p = torch.softmax(logits, dim=1)[0, :, 0]
    expected = (-torch.log(p[1, 0] + p[2, 0]) - torch.log(p[1, 1])) / 2
    assert weighted_ce(logits, target, None, allowed).item() == pytest.approx(expected.item(), rel=1e-5)
    w = torch.tensor([3.0, 1.0, 1.0])
    expected_w = (-3 * torch.log(p[1, 0] + p[2, 0]) - torch.log(p[1, 1])) / 4
    assert weighted_ce(logits, target, w, allowed).item() == pytest.approx(expected_w.item(), rel=1e-5)
    # identity rows: exactly the plain (weighted) cross-entropy, ignored pixels included
    torch.manual_seed(1)
    x, y = torch.randn(2, 4, 3, 3), torch.randint(0, 4, (2, 3, 3))
    y[0, 0] = I
    ww = torch.tensor([0.5, 1.0, 2.0, 0.7])
    assert weighted_ce(x, y, ww, torch.eye(4, dtype=torch.bool)).item() == pytest.approx(
        F.cross_entropy(x, y, weight=ww, ignore_index=I).item(), rel=1e-5)
    # PLAT: head 1 "agrees" with a mixed label where its argmax is any acceptable class
    head1 = _logits_for([[2, 0, 1]])
    mask = plat_mask(head1, torch.tensor([[[0, 0, 1]]]), allowed)
    assert mask.tolist() == [[[0, I, 1]]]


def test_mixed_classes_option_and_allowed_rows():
    from lcmap.geodata.legends import get_legend
    from lcmap.pipeline.train import allowed_classes_for

    c = TrainConfig().merged(mixed_classes="21=built-up,low vegetation")
    assert c.mixed_classes == {21: ["built-up", "low vegetation"]}
    assert TrainConfig.from_dict({"mixed_classes": {21: ["built-up"]}}).mixed_classes == {21: ["built-up"]}
    nlcd = get_legend("nlcd")
    rows = allowed_classes_for(nlcd, c.mixed_classes)
    codes = sorted(nlcd.codes[k] for k in rows[nlcd.codes.index(21)])
    assert codes == [22, 23, 24, 31, 52, 71, 81, 82, 95]  # built-up and low-vegetation classes, not 21
    assert rows[nlcd.codes.index(41)] == [nlcd.codes.index(41)]
    assert allowed_classes_for(nlcd, {}) is None
    with pytest.raises(LcmapInputError, match="not target classes"):
        allowed_classes_for(nlcd, {21: ["grass"]})
    with pytest.raises(LcmapInputError, match="does not have"):
        allowed_classes_for(nlcd, {99: ["built-up"]})
    with pytest.raises(LcmapInputError, match="CODE=TARGET"):
        TrainConfig().merged(mixed_classes="21")


# --------------------------------------------------------------------------- class weights
def test_class_weights_inverse_sqrt_frequency():
    counts = [900, 90, 10, 0, 0]
    occurs = [True, True, True, True, False]
    w = inverse_sqrt_frequency_weights(counts, occurs)
    raw = 1 / np.sqrt(np.array([0.9, 0.09, 0.01]))
    assert np.allclose(w[:3], raw / raw.mean())
    assert w[:3].mean() == pytest.approx(1.0)
    assert w[3] == pytest.approx(w[:3].max())  # in the files, missed by the sampled patches
    assert w[4] == 0.0  # never occurs
    # rare classes are floored at a frequency of 1e-3
    w2 = inverse_sqrt_frequency_weights([10**6, 1])
    assert w2[1] / w2[0] == pytest.approx(np.sqrt(1.0 / 1e-3), rel=1e-3)
    with pytest.raises(ValueError):
        inverse_sqrt_frequency_weights([0, 0])


# ------------------------------------------------------------------------------- options
def test_config_file_and_flags_are_the_same_options(tmp_path):
    cfg_file = tmp_path / "train.yaml"
    cfg_file.write_text(
        "images: a.tif\nlabels: [b.tif, c.tif]\nmodel: unet\npatch-px: 64\nepochs: 3\n"
        "augment: false\nbbox: [1, 2, 3, 4]\nprecision: 32\n"
    )
    c = TrainConfig.from_yaml(cfg_file)
    assert c.images == ["a.tif"] and c.labels == ["b.tif", "c.tif"]
    assert (c.model, c.patch_px, c.epochs, c.augment, c.bbox, c.precision) == ("unet", 64, 3, False, [1, 2, 3, 4], "32")
    m = c.merged(epochs=5, patch_px=None, steps_per_epoch="7", out="run")
    assert (m.epochs, m.patch_px, m.steps_per_epoch, m.out) == (5, 64, 7, "run")
    assert c.epochs == 3  # merged returns a copy
    d = TrainConfig()
    assert d.model == "paraformer-tiny" and d.resolved_patch_px == 128 and d.seed == 1234
    assert d.optimizer == "adamw" and d.class_weighting == "inv_sqrt_freq" and d.augment


def test_config_unknown_key_and_bad_values(tmp_path):
    cfg_file = tmp_path / "train.yaml"
    cfg_file.write_text("images: a.tif\nbatchsize: 4\n")
    with pytest.raises(LcmapInputError, match="batchsize"):
        TrainConfig.from_yaml(cfg_file)
    with pytest.raises(LcmapInputError, match="learning_rate"):
        TrainConfig().merged(learning_rate=0.1)
    with pytest.raises(LcmapInputError, match="epochs"):
        TrainConfig().merged(epochs="many")
    bad = TrainConfig(images=["a"], labels=["b"], out="o", patch_px=100, optimizer="adam")
    with pytest.raises(LcmapInputError, match="multiple of 32") as err:
        bad.check()
    assert "adam" in str(err.value)


# ---------------------------------------------------------------------- runs on the sample
def _sample_config(out: Path, **kw) -> TrainConfig:
    base = dict(
        images=[str(SAMPLE / "naip")], labels=[str(SAMPLE / "nlcd")], legend="nlcd",
        aoi=str(SAMPLE / "aoi_train.geojson"), epochs=1, steps_per_epoch=2, batch_size=2, patch_px=64,
        val_patch_px=256, accelerator="cpu", progress_bar=False, out=str(out),
    )
    base.update(kw)
    return TrainConfig(**base)


def test_legend_mismatch_is_reported_before_training(tmp_path):
    with pytest.raises(LcmapInputError) as err:
        run_train(_sample_config(tmp_path / "run", legend="worldcover"))
    msg = str(err.value)
    assert "worldcover" in msg and "41" in msg and "patch-" in msg
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_aoi_too_small_or_missing(tmp_path):
    # 40 m x 40 m inside patch 0 (EPSG:26917): smaller than one 64 px patch
    small = _sample_config(tmp_path / "a", aoi=None, bbox=[535150, 4170600, 535190, 4170640], bbox_crs="EPSG:26917")
    with pytest.raises(LcmapInputError, match="too small"):
        run_train(small)
    far = _sample_config(tmp_path / "b", aoi=None, bbox=[600000, 4100000, 601000, 4101000], bbox_crs="EPSG:26917")
    with pytest.raises(LcmapInputError, match="does not overlap|misses"):
        run_train(far)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("train") / "run"
    cfg = _sample_config(out, reference=[str(SAMPLE / "reference")], reference_legend="chesapeake",
                         precision="bf16-mixed", label_trust={21: 0.25})
    return run_train(cfg)


def test_tiny_run_writes_run_dir_and_a_loadable_checkpoint(tiny_run):
    from lcmap.models import predict_proba
    from lcmap.pipeline.runs import load_trained_model, read_checkpoint

    run = Path(tiny_run)
    for name in ("config.yaml", "legend.yaml", "normalization.json", "class_weights.json", "metrics.csv",
                 "loss.png", "train.log", "checkpoints/last.ckpt", "checkpoints/best.ckpt"):
        assert (run / name).is_file(), name
    log_text = (run / "train.log").read_text()
    assert "training ViT from scratch" in log_text and "GPUs only" in log_text
    assert "val_miou" in (run / "metrics.csv").read_text()
    tm = load_trained_model(run)
    assert tm.model_name == "paraformer-tiny" and tm.in_channels == 4 and len(tm.legend) == 16
    with torch.no_grad():
        probs = predict_proba(tm.model, torch.zeros(1, 4, 64, 64))
    assert probs.shape == (1, 16, 64, 64)
    hp = read_checkpoint(run / "checkpoints" / "last.ckpt")["hyper_parameters"]
    assert len(hp["class_weights"]) == 16 and hp["val_source"] == "reference"
    saved = TrainConfig.from_yaml(run / "config.yaml")
    assert saved.precision == "bf16-mixed" and Path(saved.images[0]).is_absolute()
    assert saved.label_trust == {21: 0.25}
    from lcmap.pipeline.runs import resolve_checkpoint

    assert resolve_checkpoint(run) == run / "checkpoints" / "best.ckpt"  # validated on the reference


def test_class_weights_are_inverse_sqrt_frequency_times_label_trust(tiny_run):
    import json

    record = json.loads((Path(tiny_run) / "class_weights.json").read_text())
    rows = record["classes"]
    plain = inverse_sqrt_frequency_weights([r["pixels"] for r in rows], [r["in_label_files"] for r in rows])
    trust = {r["code"]: r["trust"] for r in rows}
    assert trust[21] == 0.25 and all(v == 1.0 for c, v in trust.items() if c != 21)
    assert [r["weight"] for r in rows] == pytest.approx([w * trust[r["code"]] for w, r in zip(plain, rows)])
    assert record["weights"] == pytest.approx([r["weight"] for r in rows])
    assert any(r["code"] == 21 and r["pixels"] > 0 for r in rows)  # the sample's patches hold NLCD 21


def test_label_trust_option_forms_and_errors():
    assert TrainConfig().merged(label_trust="21=0.2, 22=0.5").label_trust == {21: 0.2, 22: 0.5}
    assert TrainConfig().merged(label_trust=["21=0", "24=1"]).label_trust == {21: 0.0, 24: 1.0}
    assert TrainConfig.from_dict({"label-trust": {21: 0.3}}).label_trust == {21: 0.3}
    assert TrainConfig().label_trust == {}
    with pytest.raises(LcmapInputError, match="between 0 and 1"):
        TrainConfig().merged(label_trust="21=2")
    with pytest.raises(LcmapInputError, match="CODE=FACTOR"):
        TrainConfig().merged(label_trust="21")


def test_resume_continues_the_step_count(tiny_run):
    run = Path(tiny_run)
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 2
    with pytest.raises(LcmapInputError, match="--resume"):
        run_train(TrainConfig.from_yaml(run / "config.yaml").merged(resume=False))
    # Only --out, --resume and the new epoch count: the rest comes from RUN_DIR/config.yaml.
    run_train(TrainConfig(out=str(run), resume=True, epochs=2, progress_bar=False))
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)
    assert ckpt["global_step"] == 4
    rows = [line.split(",")[:2] for line in (run / "metrics.csv").read_text().splitlines()[1:]]
    assert {e for e, _ in rows} == {"0", "1"} and max(int(s) for _, s in rows) == 3  # steps 0..3 logged


def test_ctrl_c_leaves_a_resumable_last_checkpoint(tmp_path, monkeypatch):
    from lcmap.pipeline.task import LandCoverTask

    def interrupt(self, outputs, batch, batch_idx):
        if self.trainer.global_step == 3:
            raise KeyboardInterrupt

    monkeypatch.setattr(LandCoverTask, "on_train_batch_end", interrupt, raising=False)
    handler = signal.getsignal(signal.SIGINT)
    cfg = _sample_config(tmp_path / "run", epochs=2, model="unet")
    try:
        with pytest.raises(TrainingInterrupted):
            run_train(cfg)
    finally:
        signal.signal(signal.SIGINT, handler)  # Lightning ignores SIGINT after an interrupt
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=False)["global_step"] == 3
    monkeypatch.undo()
    run_train(cfg.merged(resume=True))
    assert torch.load(last, weights_only=False)["global_step"] == 4
    # validated against the LR labels only: predicting with RUN_DIR uses last.ckpt, not best.ckpt
    from lcmap.pipeline.runs import resolve_checkpoint

    assert (tmp_path / "run" / "checkpoints" / "best.ckpt").is_file()
    assert resolve_checkpoint(tmp_path / "run") == last


def test_imagery_nodata_becomes_the_band_mean_after_normalisation():
    """Pixels where every band is nodata (outside the imagery, gaps between files) -> 0, as in predict."""
    from lcmap.pipeline.datamodule import LandCoverDataModule

    dm = LandCoverDataModule(None, None, None, patch_px=32, batch_size=1, steps_per_epoch=1,
                             mean=[100.0, 50.0], std=[10.0, 5.0], augment=False, nodata=0.0)
    image = torch.full((1, 2, 4, 4), 120.0)
    image[0, :, 0, 0] = 0.0  # nodata in every band
    image[0, 0, 1, 1] = 0.0  # a real 0 in one band only: valid
    out = dm.on_after_batch_transfer({"image": image, "mask": torch.zeros(1, 4, 4)}, 0)["image"]
    assert out[0, :, 0, 0].tolist() == [0.0, 0.0]
    assert out[0, :, 1, 1].tolist() == [-10.0, 14.0]
    assert out[0, :, 2, 2].tolist() == [2.0, 14.0]
    plain = LandCoverDataModule(None, None, None, patch_px=32, batch_size=1, steps_per_epoch=1,
                                mean=[100.0, 50.0], std=[10.0, 5.0], augment=False)
    assert plain.on_after_batch_transfer({"image": image, "mask": torch.zeros(1, 4, 4)}, 0)["image"][0, :, 0, 0].tolist() == [-10.0, -10.0]


def test_out_of_memory_says_which_batch_size_to_try():
    from lcmap.pipeline.train import _raise_if_oom

    cfg = TrainConfig(batch_size=10, model="paraformer")
    with pytest.raises(LcmapInputError, match=r"out of GPU .*--batch-size 10 .*224 px.*try --batch-size 5"):
        _raise_if_oom(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"), cfg, 224, torch)
    with pytest.raises(LcmapInputError, match=r"try a smaller --patch-px \(e\.g\. 96\)"):
        _raise_if_oom(MemoryError(), TrainConfig(batch_size=1), 224, torch)
    _raise_if_oom(ValueError("something else"), cfg, 224, torch)  # not memory: left to the caller

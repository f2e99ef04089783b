"""``lcmap train``: tiny runs on the embedded sample (run folder, resume, Ctrl-C), mixed classes, data module,
out of memory."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest
import torch

from lcmap.errors import LcmapInputError, TrainingInterrupted
from lcmap.pipeline.training.class_weights import inverse_sqrt_frequency_weights
from lcmap.pipeline.training.train import TrainConfig, run_train

SAMPLE = Path(__file__).resolve().parents[1] / "lcmap" / "geodata" / "sample"


def test_mixed_classes_option_and_allowed_rows():
    from lcmap.geodata.legends import get_legend
    from lcmap.pipeline.training.label_classes import allowed_classes_for

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


# ---------------------------------------------------------------------- runs on the sample
def _sample_config(out: Path, **kw) -> TrainConfig:
    base = dict(
        images=[str(SAMPLE / "naip")],
        labels=[str(SAMPLE / "nlcd")],
        legend="nlcd",
        aoi=str(SAMPLE / "aoi_train.geojson"),
        epochs=1,
        steps_per_epoch=2,
        batch_size=2,
        patch_px=64,
        val_patch_px=256,
        accelerator="cpu",
        progress_bar=False,
        out=str(out),
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
    cfg = _sample_config(
        out,
        reference=[str(SAMPLE / "reference")],
        reference_legend="chesapeake",
        precision="bf16-mixed",
        label_trust={21: 0.25},
    )
    return run_train(cfg)


def test_tiny_run_writes_run_dir_and_a_loadable_checkpoint(tiny_run):
    from lcmap.models import predict_proba
    from lcmap.pipeline.runs import load_trained_model, read_checkpoint

    run = Path(tiny_run)
    for name in (
        "config.yaml",
        "legend.yaml",
        "normalization.json",
        "class_weights.json",
        "metrics.csv",
        "loss.png",
        "train.log",
        "checkpoints/last.ckpt",
        "checkpoints/best.ckpt",
    ):
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
    expected = [w * trust[r["code"]] for w, r in zip(plain, rows, strict=True)]
    assert [r["weight"] for r in rows] == pytest.approx(expected)
    assert record["weights"] == pytest.approx([r["weight"] for r in rows])
    assert any(r["code"] == 21 and r["pixels"] > 0 for r in rows)  # the sample's patches hold NLCD 21


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
    from lcmap.pipeline.training.task import LandCoverTask

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
    from lcmap.pipeline.training.datamodule import LandCoverDataModule

    dm = LandCoverDataModule(
        None,
        None,
        None,
        patch_px=32,
        batch_size=1,
        steps_per_epoch=1,
        mean=[100.0, 50.0],
        std=[10.0, 5.0],
        augment=False,
        nodata=0.0,
    )
    image = torch.full((1, 2, 4, 4), 120.0)
    image[0, :, 0, 0] = 0.0  # nodata in every band
    image[0, 0, 1, 1] = 0.0  # a real 0 in one band only: valid
    out = dm.on_after_batch_transfer({"image": image, "mask": torch.zeros(1, 4, 4)}, 0)["image"]
    assert out[0, :, 0, 0].tolist() == [0.0, 0.0]
    assert out[0, :, 1, 1].tolist() == [-10.0, 14.0]
    assert out[0, :, 2, 2].tolist() == [2.0, 14.0]
    plain = LandCoverDataModule(
        None,
        None,
        None,
        patch_px=32,
        batch_size=1,
        steps_per_epoch=1,
        mean=[100.0, 50.0],
        std=[10.0, 5.0],
        augment=False,
    )
    plain_out = plain.on_after_batch_transfer({"image": image, "mask": torch.zeros(1, 4, 4)}, 0)["image"]
    assert plain_out[0, :, 0, 0].tolist() == [-10.0, -10.0]


def test_out_of_memory_says_which_batch_size_to_try():
    from lcmap.pipeline.training.oom import raise_if_out_of_memory as _raise_if_oom

    cfg = TrainConfig(batch_size=10, model="paraformer")
    with pytest.raises(LcmapInputError, match=r"out of GPU .*--batch-size 10 .*224 px.*try --batch-size 5"):
        _raise_if_oom(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"), cfg, 224)
    with pytest.raises(LcmapInputError, match=r"try a smaller --patch-px \(e\.g\. 96\)"):
        _raise_if_oom(MemoryError(), TrainConfig(batch_size=1), 224)
    _raise_if_oom(ValueError("something else"), cfg, 224)  # not memory: left to the caller


def test_validation_window_sees_only_the_imagery(monkeypatch):
    """A validation window that is not all imagery is classified from its valid box only (as lcmap
    predict's context boxes), and pixels without imagery are not scored."""
    from lcmap.geodata.legends import get_legend
    from lcmap.pipeline.training.task import LandCoverTask

    legend = get_legend("nlcd")
    task = LandCoverTask("unet", 4, legend.to_dict(), [0.0] * 4, [1.0] * 4)
    task.eval()
    seen = []
    forward = task.model.forward

    def spy(x):
        seen.append(tuple(x.shape))
        return forward(x)

    monkeypatch.setattr(task.model, "forward", spy)
    image = torch.randn(2, 4, 64, 64)
    valid = torch.ones(2, 64, 64, dtype=torch.bool)
    valid[1] = False
    valid[1, 8:40, 16:48] = True  # a 32 x 32 image in a corner of the second window
    image[1, :, ~valid[1]] = 0.0
    mask = torch.full((2, 64, 64), legend.codes.index(41), dtype=torch.long)  # every pixel labelled
    with torch.no_grad():
        task.validation_step({"image": image, "mask": mask, "valid": valid}, 0)
    assert seen == [(2, 4, 64, 64), (1, 4, 32, 32)]  # the batch, then the second window's valid box
    scored = int(task.val_confusion.compute().sum())  # a few may be predicted as no target class
    assert 64 * 64 + 32 * 32 - 64 <= scored <= 64 * 64 + 32 * 32  # only pixels with imagery

"""What an LR class holds at 1 m (:mod:`lcmap.geodata.compositions`): the built-in tables, the YAML
``composition`` of a user's legend and its errors, and the record a prior-loss run keeps."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from lcmap.errors import LcmapInputError
from lcmap.geodata.compositions import SUM_TOLERANCE, composition_table
from lcmap.geodata.legends import BUILTIN_LEGENDS, Legend, get_legend, target_legend

NLCD = get_legend("nlcd")


@pytest.mark.parametrize("name", sorted(BUILTIN_LEGENDS))
def test_every_builtin_class_with_a_target_has_a_composition_summing_to_one(name: str) -> None:
    legend = BUILTIN_LEGENDS[name]
    table = composition_table(legend)
    assert table.mean.shape == (len(legend), len(legend.target))
    for k, cls in enumerate(legend.classes):
        if cls.target is None and not cls.mixed:
            assert table.source[k] == "none" and table.mean[k].sum() == 0  # ignored by the prior losses
            continue
        assert table.mean[k].sum() == pytest.approx(1.0, abs=1e-12), cls
        assert (table.mean[k] >= 0).all() and (table.sigma[k] >= 0).all()
        if cls.composition is not None:
            assert sum(m for _, m in cls.composition.mean) == pytest.approx(1.0, abs=1e-9)
        else:  # the default: the class itself, or its mixed classes evenly
            members = list(cls.mixed) or [cls.target]
            want = np.array([1.0 / len(members) if n in members else 0.0 for n in legend.target.names])
            np.testing.assert_allclose(table.mean[k], want)
    assert Legend.from_dict(legend.to_dict()) == legend  # the compositions survive the round trip


def test_nlcd_carries_the_published_chesapeake_table() -> None:
    """Robinson et al. CVPR 2019 (calebrob6/land-cover data/nlcd_mu.txt, nlcd_sigma.txt): NLCD 21
    row .00 .42 .46 .11 (sums to .99, renormalised), sigma .05 .34 .33 .13."""
    table = composition_table(NLCD)
    names = NLCD.target.names
    k21 = NLCD.codes.index(21)
    mu = np.array([0.00, 0.42, 0.46, 0.11])
    np.testing.assert_allclose(table.mean[k21], mu / mu.sum())
    np.testing.assert_allclose(table.sigma[k21], [0.05, 0.34, 0.33, 0.13])
    assert table.mean[k21, names.index("tree canopy")] > table.mean[k21, names.index("built-up")]
    assert table.source[NLCD.codes.index(12)] == "none"  # ice/snow: no target, no composition
    # every NLCD class with a target is declared (none left to the default)
    assert all(table.source[k] == "declared" for k, c in enumerate(NLCD.classes) if c.target)


def test_glc_fcs30_open_and_closed_forests_follow_the_lccs_cover_ranges() -> None:
    glc = get_legend("glc_fcs30")
    table = composition_table(glc)
    t, low = glc.target.names.index("tree canopy"), glc.target.names.index("low vegetation")
    open_k, closed_k = glc.codes.index(61), glc.codes.index(62)
    assert table.mean[open_k, t] == pytest.approx((0.15 + 0.40) / 2)  # 15-40 % tree cover
    assert table.mean[closed_k, t] == pytest.approx((0.40 + 1.0) / 2)  # > 40 %
    assert table.mean[open_k, low] == pytest.approx(1 - (0.15 + 0.40) / 2)
    assert table.sigma[open_k, t] == pytest.approx(0.25 / np.sqrt(12))


def _yaml_legend(path: Path, composition) -> Path:
    data = {
        "name": "mine",
        "nodata": [0],
        "classes": [
            {"code": 1, "name": "Forest", "color": "#00ff00", "target": "tree canopy"},
            {"code": 21, "name": "Suburb", "color": "#ff0000", "target": "built-up", "composition": composition},
        ],
    }
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def test_yaml_composition_is_read_renormalised_and_kept(tmp_path: Path) -> None:
    path = _yaml_legend(tmp_path / "mine.yaml", {"tree canopy": 0.5, "built-up": {"mean": 0.52, "sigma": 0.2}})
    legend = get_legend(path)
    comp = legend.classes[1].composition
    assert comp is not None and legend.classes[0].composition is None
    assert comp.fraction("tree canopy") == pytest.approx(0.5 / 1.02)
    assert comp.fraction("built-up") == pytest.approx(0.52 / 1.02) and comp.spread("built-up") == 0.2
    table = composition_table(legend)
    names = legend.target.names
    np.testing.assert_allclose(table.mean[1], [0, 0.5 / 1.02, 0, 0.52 / 1.02])
    assert table.sigma[1, names.index("built-up")] == 0.2
    np.testing.assert_allclose(table.mean[0], [0, 1, 0, 0])  # no composition: the class itself
    assert table.source == ("default", "declared")
    assert Legend.from_dict(legend.to_dict()) == legend


@pytest.mark.parametrize(
    ("composition", "message"),
    [
        ({"tree canopy": -0.2, "built-up": 1.2}, "fraction of 'tree canopy' is -0.2"),
        ({"tree canopy": 0.5, "built-up": 0.8}, "sum to 1.300, not 1"),
        ({"forest": 0.5, "built-up": 0.5}, "'forest', which is not a target class"),
        ({"tree canopy": "half", "built-up": 0.5}, "fraction of 'tree canopy' is 'half'"),
        ({"tree canopy": {"mean": 0.5, "sigma": -1}, "built-up": 0.5}, "sigma of 'tree canopy'"),
        ([0.5, 0.5], "must map target classes to fractions"),
    ],
)
def test_bad_yaml_composition_is_a_clear_error_naming_the_class_and_the_file(
    tmp_path: Path, composition, message: str
) -> None:
    path = _yaml_legend(tmp_path / "bad.yaml", composition)
    with pytest.raises(LcmapInputError) as info:
        get_legend(path)
    text = str(info.value)
    assert str(path) in text and "class 21 (Suburb)" in text and message in text, text


def test_bad_composition_through_the_cli_exits_2_naming_the_class(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from lcmap.cli import app
    from lcmap.geodata.sample import sample_paths

    path = _yaml_legend(tmp_path / "bad.yaml", {"tree canopy": 0.5, "built-up": 0.8})
    files = sample_paths("train")
    args = ["train", "--images", str(files["imagery"][0]), "--labels", str(files["labels"][0])]
    result = CliRunner().invoke(
        app, [*args, "--legend", str(path), "--label-loss", "prior", "--out", str(tmp_path / "r")]
    )
    out = " ".join(result.output.split())
    assert result.exit_code == 2 and "class 21 (Suburb)" in out and "Traceback" not in out, result.output
    assert f"not 1 (within {SUM_TOLERANCE})" in out
    assert not (tmp_path / "r").exists()  # nothing left behind


def test_prior_training_records_the_compositions_for_run_dir_and_checkpoint(tmp_path: Path) -> None:
    from lcmap.pipeline.runs import RunFolder
    from lcmap.pipeline.training.label_prior import prior_training

    assert prior_training("plat", NLCD, 0.0, 1.0) is None
    prior = prior_training("prior", NLCD, 30.0, 0.6)
    assert prior is not None and prior.net_legend == target_legend(NLCD.target)
    assert prior.task_args["prior_blur_px"] == pytest.approx(50.0)
    assert np.asarray(prior.task_args["composition"]).shape == (len(NLCD), 4)
    assert Legend.from_dict(prior.task_args["label_legend"]) == NLCD  # compositions included
    run = RunFolder(tmp_path)
    run.write_composition(prior.record)
    saved = json.loads(run.composition_json.read_text())
    c21 = next(c for c in saved["classes"] if c["code"] == 21)
    assert c21["source"] == "declared" and c21["mean"]["tree canopy"] == pytest.approx(0.42 / 0.99, abs=1e-6)
    assert saved["label_loss"] == "prior" and saved["prior_blur_m"] == 30.0


@pytest.mark.slow
def test_a_prior_loss_run_predicts_target_classes_and_records_its_compositions(tmp_path: Path) -> None:
    from lcmap.geodata.sample import SAMPLE_DIR
    from lcmap.pipeline.runs import load_trained_model
    from lcmap.pipeline.training.config import TrainConfig
    from lcmap.pipeline.training.train import run_train

    config = TrainConfig(
        images=[str(SAMPLE_DIR / "naip")], labels=[str(SAMPLE_DIR / "nlcd")], legend="nlcd",
        aoi=str(SAMPLE_DIR / "aoi_train.geojson"), epochs=1, steps_per_epoch=2, batch_size=2, patch_px=64,
        val_patch_px=256, accelerator="cpu", progress_bar=False, out=str(tmp_path / "run"),
        label_loss="prior-plat", prior_blur_m=30.0,
    )  # fmt: skip
    run = run_train(config)
    tm = load_trained_model(run)
    assert tm.legend == target_legend(NLCD.target)  # the network's classes: the target classes
    assert tm.hparams["label_loss"] == "prior-plat" and tm.hparams["prior_blur_px"] == pytest.approx(30.0)
    np.testing.assert_allclose(tm.hparams["composition"], composition_table(NLCD).mean)
    assert Legend.from_dict(tm.hparams["label_legend"]) == NLCD
    assert get_legend(run / "legend.yaml") == target_legend(NLCD.target)
    saved = json.loads((run / "composition.json").read_text())
    assert saved["legend"] == "nlcd" and saved["label_loss"] == "prior-plat"
    assert TrainConfig.from_yaml(run / "config.yaml").mixed_classes == {}  # the compositions replace them
    assert "plat_kept" in (run / "metrics.csv").read_text()


def test_label_loss_options_are_checked() -> None:
    from lcmap.pipeline.training.config import TrainConfig

    base = TrainConfig(images=["i.tif"], labels=["l.tif"], out="run")
    base.merged(label_loss="prior-plat", prior_blur_m="30").check()  # fine
    for flags, message in (
        ({"label_loss": "dice"}, "--label-loss 'dice': choose one of plat, ce, prior, prior-plat, lsr, qr"),
        ({"label_loss": "prior", "prior_blur_m": -1}, "--prior-blur-m must be >= 0"),
        ({"label_loss": "prior", "mixed_classes": "21=built-up,low vegetation"}, "--mixed-class has no effect"),
    ):
        with pytest.raises(LcmapInputError, match=message):
            base.merged(**flags).check()
    base.merged(label_loss="plat", mixed_classes="21=built-up,low vegetation").check()  # today's use stays

"""Training options (:mod:`lcmap.pipeline.training.config`) and the ``lcmap train`` flags generated from them."""

from __future__ import annotations

import dataclasses

import pytest

from lcmap.errors import LcmapInputError
from lcmap.pipeline.training.config import TrainConfig


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


def test_label_trust_option_forms_and_errors():
    assert TrainConfig().merged(label_trust="21=0.2, 22=0.5").label_trust == {21: 0.2, 22: 0.5}
    assert TrainConfig().merged(label_trust=["21=0", "24=1"]).label_trust == {21: 0.0, 24: 1.0}
    assert TrainConfig.from_dict({"label-trust": {21: 0.3}}).label_trust == {21: 0.3}
    assert TrainConfig().label_trust == {}
    with pytest.raises(LcmapInputError, match="between 0 and 1"):
        TrainConfig().merged(label_trust="21=2")
    with pytest.raises(LcmapInputError, match="CODE=FACTOR"):
        TrainConfig().merged(label_trust="21")


# ------------------------------------------------------------------- the generated ``lcmap train`` flags
def _invoke_train(monkeypatch, args: list[str]):
    """Run ``lcmap train ARGS`` with run_train replaced; return (result, the TrainConfig it got or None)."""
    from typer.testing import CliRunner

    import lcmap.pipeline.training.train as train_module
    from lcmap.cli import app

    got: list[TrainConfig] = []

    def fake_run_train(cfg: TrainConfig, config_file=None):
        got.append(cfg)
        return cfg.out

    monkeypatch.setattr(train_module, "run_train", fake_run_train)
    result = CliRunner().invoke(app, ["train", *args], env={"COLUMNS": "200"})
    return result, (got[0] if got else None)


def test_config_file_bbox_crs_is_kept_without_the_flag_and_the_flag_wins_when_given(tmp_path, monkeypatch):
    cfg_file = tmp_path / "train.yaml"
    cfg_file.write_text("bbox: [535150, 4170600, 535950, 4171400]\nbbox_crs: EPSG:26917\nepochs: 3\naugment: false\n")
    result, cfg = _invoke_train(monkeypatch, ["--config", str(cfg_file), "--out", "run"])
    assert result.exit_code == 0, result.output
    assert cfg.bbox_crs == "EPSG:26917"
    # no flag's default overrides the file: epochs and augment stay as the file says
    assert (cfg.epochs, cfg.augment, cfg.out) == (3, False, "run")
    # a flag given on the command line wins, even when it spells the default value
    result, cfg = _invoke_train(
        monkeypatch, ["--config", str(cfg_file), "--out", "run", "--bbox-crs", "EPSG:4326", "--augment"]
    )
    assert result.exit_code == 0, result.output
    assert (cfg.bbox_crs, cfg.augment, cfg.epochs) == ("EPSG:4326", True, 3)


def test_every_option_is_a_flag_with_help_and_reaches_the_config(monkeypatch):
    import typer

    from lcmap.cli import app

    command = typer.main.get_command(app).commands["train"]
    params = {p.name: p for p in command.params}
    for f in dataclasses.fields(TrainConfig):
        assert f.name in params, f"no flag for option {f.name}"
        assert TrainConfig.flag_of(f.name) in params[f.name].opts
        assert params[f.name].help, f"flag of {f.name} has no help"
    assert "--mixed-class" in params["mixed_classes"].opts and "--label-trust" in params["label_trust"].opts
    # the options that used to exist only in YAML
    args = ["--out", "run", "--optimizer", "sgd", "--weight-decay", "0.01", "--no-augment", "--val-patch-px", "128",
            "--label-trust", "21=0.5", "--mixed-class", "21=built-up,low vegetation", "--devices", "auto",
            "--bbox", "1", "2", "3", "4", "--no-progress-bar", "--resume"]  # fmt: skip
    result, cfg = _invoke_train(monkeypatch, args)
    assert result.exit_code == 0, result.output
    assert (cfg.optimizer, cfg.weight_decay, cfg.augment, cfg.val_patch_px) == ("sgd", 0.01, False, 128)
    assert cfg.label_trust == {21: 0.5} and cfg.mixed_classes == {21: ["built-up", "low vegetation"]}
    assert (cfg.devices, cfg.bbox, cfg.progress_bar, cfg.resume) == ("auto", [1.0, 2.0, 3.0, 4.0], False, True)


def test_flags_left_out_give_the_dataclass_defaults(monkeypatch):
    result, cfg = _invoke_train(monkeypatch, ["--out", "run"])
    assert result.exit_code == 0, result.output
    assert cfg == TrainConfig(out="run")


def test_unknown_key_in_a_config_file_is_an_error_naming_it(tmp_path, monkeypatch):
    cfg_file = tmp_path / "train.yaml"
    cfg_file.write_text("epochs: 2\nlearning-rate: 0.1\n")
    result, cfg = _invoke_train(monkeypatch, ["--config", str(cfg_file), "--out", "run"])
    assert result.exit_code == 2 and cfg is None
    assert "learning-rate" in result.output and "unknown option" in result.output


def test_train_help_shows_units_and_flags():
    from typer.testing import CliRunner

    from lcmap.cli import app

    text = CliRunner().invoke(app, ["train", "--help"], env={"COLUMNS": "200"}).output
    for flag in ("--bbox-crs", "--optimizer", "--weight-decay", "--augment", "--val-patch-px", "--mixed-class"):
        assert flag in text
    assert "pixels" in text


def test_a_config_key_may_be_spelled_as_its_flag(tmp_path):
    from lcmap.pipeline.training.config import TrainConfig

    cfg_file = tmp_path / "train.yaml"
    cfg_file.write_text('mixed-class: ["21=built-up,low vegetation"]\npatch_px: 64\n')
    cfg = TrainConfig.from_yaml(cfg_file)
    assert cfg.mixed_classes == {21: ["built-up", "low vegetation"]} and cfg.patch_px == 64


def test_labels_with_one_label_product_is_refused_not_ignored(tmp_path):
    """--labels with one --label-product: refused naming both flags and what to do (before: --labels
    and --legend were silently replaced by the product and the run trained, exit 0)."""
    from pathlib import Path

    from typer.testing import CliRunner

    from lcmap.cli import app
    from lcmap.pipeline.training.train import run_train

    sample = Path(__file__).resolve().parents[1] / "lcmap" / "geodata" / "sample"
    both = TrainConfig(
        images=[str(sample / "naip")],
        labels=[str(sample / "reference")],
        legend="chesapeake",
        label_products=[{"labels": [str(sample / "nlcd")], "legend": "nlcd"}],
        out=str(tmp_path / "run"),
    )
    assert both.single_product() == both  # nothing dropped
    with pytest.raises(LcmapInputError, match=r"either --labels/--legend or --label-product.*PATHS=LEGEND"):
        run_train(both)
    flags = ["--images", str(sample / "naip"), "--labels", str(sample / "reference"), "--legend", "chesapeake"]
    flags += ["--label-product", f"{sample / 'nlcd'}=nlcd", "--out", str(tmp_path / "run")]
    result = CliRunner().invoke(app, ["train", *flags])
    said = " ".join(result.output.split())
    assert result.exit_code == 2 and "--labels/--legend or --label-product, not both" in said, said
    assert not (tmp_path / "run").exists()

"""Mixed classes declared by the legends: used by default, overridden per code, turned off, recorded."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lcmap.errors import LcmapInputError
from lcmap.geodata.legends import BUILTIN_LEGENDS, Legend, get_legend
from lcmap.pipeline.training.label_classes import allowed_classes_for, resolve_mixed_classes
from lcmap.pipeline.training.train import TrainConfig, run_train

SAMPLE = Path(__file__).resolve().parents[1] / "lcmap" / "geodata" / "sample"
BL = ["built-up", "low vegetation"]


def test_builtin_declarations_name_target_classes_and_round_trip():
    nlcd = get_legend("nlcd")
    assert nlcd.default_mixed_classes() == {21: BL}
    assert 22 not in nlcd.default_mixed_classes()  # not measured on the sample yet (legends.py)
    assert get_legend("esri").default_mixed_classes() == {11: ["low vegetation", "tree canopy"]}
    assert get_legend("worldcover").default_mixed_classes() == {}
    for legend in BUILTIN_LEGENDS.values():
        assert Legend.from_dict(legend.to_dict()) == legend
        for code, names in legend.default_mixed_classes().items():
            assert allowed_classes_for(legend, {code: names}) is not None  # every name is a target class


def test_defaults_applied_overridden_per_code_and_turned_off():
    nlcd = get_legend("nlcd")
    assert resolve_mixed_classes(nlcd, {}, True) == {21: BL}
    # --mixed-class wins for its code; other declared codes stay
    assert resolve_mixed_classes(nlcd, {21: ["low vegetation"]}, True) == {21: ["low vegetation"]}
    assert resolve_mixed_classes(nlcd, {22: BL}, True) == {21: BL, 22: BL}
    # --no-default-mixed: only what is given
    assert resolve_mixed_classes(nlcd, {}, False) == {}
    assert resolve_mixed_classes(nlcd, {22: BL}, False) == {22: BL}


def test_yaml_legend_declares_mixed_classes(tmp_path):
    path = tmp_path / "my.yaml"
    path.write_text(
        "name: my\nnodata: [0]\nclasses:\n"
        "  - {code: 1, name: town, color: '#ff0000', target: built-up, mixed: [built-up, low vegetation]}\n"
        "  - {code: 2, name: grass, color: '#00ff00', target: low vegetation}\n"
        "  - {code: 3, name: wood, color: '#006400', target: tree canopy, mixed: 'tree canopy, low vegetation'}\n"
    )
    legend = get_legend(path)
    assert legend.default_mixed_classes() == {1: BL, 3: ["tree canopy", "low vegetation"]}
    path.write_text("name: bad\nclasses:\n  - {code: 1, name: a, color: '#ff0000', target: built-up, mixed: [lawn]}\n")
    with pytest.raises(LcmapInputError, match="not a valid legend"):
        get_legend(path)


def test_no_default_mixed_flag_is_generated():
    from typer.testing import CliRunner

    from lcmap.cli import app

    result = CliRunner().invoke(app, ["train", "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0 and "--no-default-mixed" in result.output
    assert TrainConfig().default_mixed is True
    assert TrainConfig.from_dict({"default-mixed": "no"}).default_mixed is False


def _tiny(out: Path, **kw) -> TrainConfig:
    return TrainConfig(
        images=[str(SAMPLE / "naip")], labels=[str(SAMPLE / "nlcd")], legend="nlcd",
        aoi=str(SAMPLE / "aoi_train.geojson"), epochs=1, steps_per_epoch=2, batch_size=2, patch_px=64,
        val_patch_px=256, accelerator="cpu", progress_bar=False, out=str(out), **kw,
    )  # fmt: skip


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)["state_dict"]


@pytest.mark.slow
def test_default_equals_explicit_and_is_recorded(tmp_path):
    default = run_train(_tiny(tmp_path / "default"))
    explicit = run_train(_tiny(tmp_path / "explicit", mixed_classes={21: BL}, default_mixed=False))
    off = run_train(_tiny(tmp_path / "off", default_mixed=False))
    w_default, w_explicit, w_off = _weights(default), _weights(explicit), _weights(off)
    assert all(torch.equal(w_default[k], w_explicit[k]) for k in w_default)  # same training
    assert not all(torch.equal(w_default[k], w_off[k]) for k in w_default)  # the loss did change
    # the run folder records the mixed classes used
    assert TrainConfig.from_yaml(default / "config.yaml").mixed_classes == {21: BL}
    assert TrainConfig.from_yaml(off / "config.yaml").mixed_classes == {}
    assert "mixed LR class 21" in (default / "train.log").read_text()
    assert "mixed LR class" not in (off / "train.log").read_text()
    with pytest.raises(LcmapInputError, match="not target classes"):
        run_train(_tiny(tmp_path / "bad", mixed_classes={21: ["lawn"]}))


def test_run_folder_from_before_the_declarations_keeps_its_mixed_classes(tmp_path):
    from lcmap.pipeline.runs import RunFolder

    run = RunFolder(tmp_path)
    run.write_config(TrainConfig(mixed_classes={}))
    assert run.read_config().default_mixed is True
    text = "\n".join(line for line in run.config_yaml.read_text().splitlines() if "default_mixed" not in line)
    run.config_yaml.write_text(text)  # as written before default_mixed existed: resumes without defaults
    assert run.read_config().default_mixed is False

"""The options of ``lcmap predict``, declared once, and how a map records them.

Each :class:`PredictConfig` field is declared with :func:`~lcmap.pipeline.option_values.option`,
as :class:`~lcmap.pipeline.training.config.TrainConfig`'s are: its default, its help (with units), how a
value from YAML or the command line becomes the field's type, and its flag. The same declaration
gives the config-file key, the ``lcmap predict`` flag and its help (:mod:`lcmap.cli_options`).
``lcmap predict --config predict.yaml`` reads the file; a flag given on the command line wins.
:meth:`PredictConfig.check` holds the rules on the options alone (nothing read);
:func:`lcmap.pipeline.prediction.planning.plan_prediction` checks them against the model and the imagery.

The map says how it was made: :meth:`PredictConfig.recorded` (every option but ``--out``, paths
made absolute) goes, as JSON, into the map's :data:`PREDICT_OPTIONS_TAG` GDAL tag (and the
confidence map's), and the checkpoint used into :data:`CHECKPOINT_TAG` (:func:`map_tags`);
``lcmap stac`` copies both into the STAC Item (``lcmap:predict_options``, ``lcmap:checkpoint``).
The recorded options are a valid ``--config`` file (give ``--out``).
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lcmap.errors import LcmapInputError
from lcmap.geodata.remote import absolute_input
from lcmap.geodata.stac_inputs import ASSET_HELP
from lcmap.pipeline import option_values as v
from lcmap.pipeline.option_values import DeclaredOptions, option

__all__ = ["CHECKPOINT_TAG", "PREDICT_OPTIONS_TAG", "TILE_MULTIPLE", "PredictConfig", "map_tags"]

#: GDAL dataset tag of a map (and its confidence map): the options it was predicted with (JSON object).
PREDICT_OPTIONS_TAG = "LCMAP_PREDICT_OPTIONS"
#: GDAL dataset tag of a map (and its confidence map): the absolute path of the checkpoint it was predicted with.
CHECKPOINT_TAG = "LCMAP_CHECKPOINT"

#: ``tile_px`` must be a multiple of this (U-Net: 32; Paraformer-tiny: 16).
TILE_MULTIPLE = 32
LEGEND_MODES = ("target", "native")

TTA_HELP = (
    "Test-time augmentation: none; flips (4 flips, ~4x the model time); d4 (the 8 flips and rotations, ~8x). "
    "Each window's class probabilities are averaged before blending."
)


@dataclass
class PredictConfig(DeclaredOptions):
    """Options of ``lcmap predict`` (config-file keys = field names with ``_`` or ``-``).

    Each field's help (``PredictConfig.option_of(name).help``) says what it is and in which unit;
    ``lcmap predict --help`` prints them; :func:`lcmap.pipeline.prediction.predict.predict_map` documents each.
    """

    model: str | None = option(
        None, parse=v.text, cli_type=str, metavar="PATH", help="RUN_DIR from 'lcmap train' or a .ckpt file."
    )
    images: list[str] = option(
        default_factory=list, parse=v.as_list, cli_type=list[str], metavar="PATH",
        help="HR imagery (same bands as the model's training imagery).",
    )  # fmt: skip
    out: str | None = option(
        None, parse=v.text, cli_type=str, metavar="PATH",
        help="Output Cloud-Optimized GeoTIFF (MAP.tif); MAP.qml is written beside it. A folder (existing, ending "
        "in /, or a new path without a suffix): one COG FOLDER/FOLDER.tif up to 2 Gpx (~2,000 km² at 1 m), COG "
        "tiles of 10 km above (one COG's assembly is one process: ~30 s at 2 Gpx); with --tile-km always tiles.",
    )  # fmt: skip
    bbox: list[float] | None = option(
        None, parse=v.bbox4, cli_type=tuple[float, float, float, float],
        help="Area as W S E N, in --bbox-crs units (degrees for EPSG:4326, metres for UTM).",
    )  # fmt: skip
    bbox_crs: str = option(
        "EPSG:4326", parse=v.text, cli_type=str, help="CRS of --bbox, e.g. EPSG:4326 (default) or EPSG:26917."
    )
    aoi: str | None = option(
        None, parse=v.text, cli_type=str, metavar="PATH",
        help="Area of interest: GeoJSON, GeoPackage or Shapefile polygons, in any CRS.",
    )  # fmt: skip
    tile_px: int = option(512, parse=v.whole, cli_type=int, help="Model window side, pixels (multiple of 32).")
    overlap_px: int = option(
        64, parse=v.whole, cli_type=int, help="Overlap between neighbouring windows, pixels (blended)."
    )
    block_px: int = option(
        4096, parse=v.whole, cli_type=int, help="Side of one Dask task's block, pixels (memory per task)."
    )
    batch_size: int = option(4, parse=v.whole, cli_type=int, help="Windows per model call.")
    device: str = option("auto", parse=v.lower, cli_type=str, help="auto, cpu or cuda.")
    scheduler: str | None = option(
        None, parse=v.text, cli_type=str,
        help="dask.distributed scheduler address: tls://host:8786 (TLS from Dask's config; see README) or "
        "tcp://host:8786 (unencrypted, trusted networks only); default: a local cluster sized to this "
        "machine; 'synchronous' runs in this process.",
    )  # fmt: skip
    confidence: bool = option(
        False, parse=v.boolean, cli_type=bool,
        help="Also write MAP_confidence.tif: max class probability in percent.",
    )  # fmt: skip
    legend: str = option(
        "target", parse=v.lower, cli_type=str,
        help="target: the 4 common classes (water, tree canopy, low vegetation, built-up); native: the model's LR "
        "legend codes.",
    )  # fmt: skip
    precision: str = option(
        "32", parse=v.lower, cli_type=str, help="32 (float32) or bf16 (bfloat16 on CUDA GPUs; refused on CPU)."
    )
    devices: int | None = option(
        None, parse=v.whole, cli_type=int,
        help="GPUs to use with a local cluster (one worker per GPU; default: all visible).",
    )  # fmt: skip
    input_scale: float | None = option(
        None, parse=float, cli_type=float,
        help="Multiply the imagery's values by FACTOR before the model sees them, e.g. 0.025 for 16-bit imagery "
        "holding 40x the 8-bit values the model was trained on. Without it, imagery of another data type or "
        "far outside the training imagery's range is refused.",
    )  # fmt: skip
    tta: str = option("none", parse=v.lower, cli_type=str, help=TTA_HELP)
    stac_asset: str | None = option(None, parse=v.text, cli_type=str, metavar="KEY", help=ASSET_HELP)
    crs: str | None = option(
        None, parse=v.text, cli_type=str,
        help="CRS of the map, e.g. EPSG:32617 (imagery in other CRSs is warped onto it). Default: the imagery's "
        "when all its files share one, else the UTM zone of the AOI's (or the imagery's) centre, said in the log.",
    )  # fmt: skip
    tile_km: float | None = option(
        None, parse=float, cli_type=float, metavar="N",
        help="Write --out as a folder of COG tiles of about N km a side on the map's grid, rounded to a whole "
        "number of --block-px blocks, plus FOLDER.vrt (one QGIS layer with the legend) and a STAC "
        "collection.json; each tile is written as soon as its blocks are done. Suits province-size areas. "
        "Default: one COG (see --out).",
    )  # fmt: skip
    label_prior: list[str] = option(
        default_factory=list, parse=v.as_list, cli_type=list[str], metavar="PATH",
        help="The LR labels the model was trained on (same legend), combined with the network at each pixel by "
        "Bayes' rule: class = argmax p(class | image) x share of the class in the label's LR class (the legend's "
        "compositions) / its share in the training labels. Where the network is sure, it decides; where it is "
        "unsure, the label does. Pixels without a label keep the network's class. Default: the network alone.",
    )  # fmt: skip

    @classmethod
    def of(
        cls, model: str | Path, images: str | Path | Sequence[str | Path], out: str | Path, **options: Any
    ) -> PredictConfig:
        """The options of a prediction of ``images`` with ``model`` into ``out`` (the Python form of
        ``lcmap predict --model M --images I --out O --flag value ...``; keys: the field names).

        Raises:
            LcmapInputError: an unknown option or a value its parser refuses, naming it.
        """
        return cls.from_dict({"model": model, "images": images, "out": out, **options}, source="predict options")

    def check(self) -> None:
        """Raise :class:`LcmapInputError` for missing options or values no input can make right (each
        problem named by its flag, all in one line). Reads nothing; the model, imagery and output
        folder are checked by :func:`lcmap.pipeline.prediction.planning.plan_prediction`."""
        from lcmap.models.tta import TTA_MODES  # torch: imported when checking, not for --help
        from lcmap.pipeline.prediction.inference import PRECISIONS

        problems = []
        for name, what in (("model", "no model given"), ("images", "no imagery given"), ("out", "no map given")):
            if not getattr(self, name):
                problems.append(f"{what} ({self.flag_of(name)})")
        tile, overlap = self.tile_px, self.overlap_px
        if tile < TILE_MULTIPLE or tile % TILE_MULTIPLE:
            problems.append(
                f"--tile-px {tile}: the window side must be a positive multiple of {TILE_MULTIPLE} px "
                f"(the networks downsample by {TILE_MULTIPLE}), e.g. 256, 512 or 1024"
            )
        elif overlap < 0 or 2 * overlap > tile:
            problems.append(
                f"--overlap-px {overlap}: must be between 0 and half of --tile-px ({tile // 2}); "
                "64 px per side is a good default for 512 px windows"
            )
        if self.batch_size < 1:
            problems.append(f"--batch-size {self.batch_size}: must be at least 1")
        if self.block_px < 1:
            problems.append(f"--block-px {self.block_px}: must be a positive number of pixels")
        if self.legend not in LEGEND_MODES:
            problems.append(
                f"--legend {self.legend!r}: choose 'target' (common classes) or 'native' (the model's legend)"
            )
        if self.input_scale is not None and not (math.isfinite(self.input_scale) and self.input_scale > 0):
            problems.append(f"--input-scale {self.input_scale}: must be a positive number, e.g. 0.025")
        if self.tta not in TTA_MODES:
            problems.append(
                f"--tta {self.tta!r}: choose none, flips (4 flips, ~4x the model time) or d4 (8 flips and "
                "rotations, ~8x)"
            )
        if self.precision not in PRECISIONS:
            problems.append(f"--precision {self.precision!r}: choose 32 or bf16 (bfloat16 on CUDA GPUs)")
        if self.devices is not None and self.devices < 1:
            problems.append(f"--devices {self.devices}: must be at least 1")
        if self.bbox is not None and len(self.bbox) != 4:
            problems.append("--bbox takes 4 numbers: W S E N")
        if problems:
            raise LcmapInputError("; ".join(problems))

    def recorded(self) -> dict[str, Any]:
        """The options as the map records them: every field but ``out`` (the map itself), local paths
        made absolute (URLs as they are), JSON types only. A valid ``--config`` file's content."""
        absolute = dataclasses.replace(
            self,
            model=None if self.model is None else absolute_input(self.model),
            images=[absolute_input(p) for p in self.images],
            aoi=None if self.aoi is None else absolute_input(self.aoi),
            label_prior=[absolute_input(p) for p in self.label_prior],
        )
        options = absolute.to_dict()
        del options["out"]
        return options


def map_tags(config: PredictConfig, checkpoint: str | Path) -> dict[str, str]:
    """The GDAL tags that say how a map was made: its options (JSON, :meth:`PredictConfig.recorded`)
    and the absolute path of the checkpoint it was made with (a RUN_DIR's best or last)."""
    return {
        PREDICT_OPTIONS_TAG: json.dumps(config.recorded(), separators=(",", ":")),
        CHECKPOINT_TAG: absolute_input(checkpoint),
    }

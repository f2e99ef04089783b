"""The options of ``lcmap train``, declared once.

Each :class:`TrainConfig` field is declared with :func:`option`: its default, its help (with
units), how a value from YAML or the command line becomes the field's type, and its flag. The same
declaration gives the dataclass field, the config-file key (the field name, ``_`` or ``-``), the
command-line flag and its help (:mod:`lcmap.cli_options` builds the ``lcmap train`` flags from it).

Merging: ``TrainConfig.from_yaml(path).merged(**flags)``: the flags given win over the file (the
declaration machinery, shared with :class:`lcmap.pipeline.prediction.predict_config.PredictConfig`, is
:mod:`lcmap.pipeline.option_values`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lcmap.errors import LcmapInputError
from lcmap.geodata.remote import is_remote
from lcmap.geodata.stac_inputs import ASSET_HELP
from lcmap.pipeline import option_values as v
from lcmap.pipeline.option_values import DeclaredOptions, Option, option

__all__ = ["Option", "TrainConfig", "option"]

MODEL_CHOICES = ("paraformer", "paraformer-tiny", "unet")
PRECISIONS = ("32", "bf16-mixed", "16-mixed")
ACCELERATORS = ("auto", "cpu", "gpu")
OPTIMIZERS = ("adamw", "sgd")
CLASS_WEIGHTINGS = ("inv_sqrt_freq", "inv_freq", "none")
LABEL_FUSIONS = ("partial", "agree", "first")
#: ``--label-loss`` losses that train on the LR classes' compositions (:mod:`lcmap.pipeline.training.losses`).
PRIOR_LOSSES = ("prior", "prior-plat", "lsr", "qr")
#: Every ``--label-loss``, today's default first.
LABEL_LOSSES = ("plat", "ce", *PRIOR_LOSSES)

#: Default peak learning rate per optimiser (used when ``lr`` is not given).
DEFAULT_LR = {"adamw": 2e-3, "sgd": 0.01}
#: Default training patch side per model (px), when ``patch_px`` is not given.
DEFAULT_PATCH_PX = {"paraformer": 224, "paraformer-tiny": 128, "unet": 128}
#: Options a resumed run may change (the others must describe the same run).
RESUME_MAY_CHANGE = (
    "epochs",
    "devices",
    "num_nodes",
    "accelerator",
    "precision",
    "num_workers",
    "progress_bar",
    "images",
    "labels",
    "reference",
    "stac_asset",
)


# ------------------------------------------------------------------------------ value parsers
@dataclass
class TrainConfig(DeclaredOptions):
    """Options of ``lcmap train`` (config-file keys = field names with ``_`` or ``-``).

    Each field's help (``TrainConfig.option_of(name).help``) says what it is and in which unit;
    ``lcmap train --help`` prints them.
    """

    images: list[str] = option(
        default_factory=list, parse=v.as_list, cli_type=list[str], metavar="PATH",
        help="HR imagery (GeoTIFF; any band count; imagery CRS and resolution define the grid).",
    )  # fmt: skip
    labels: list[str] = option(
        default_factory=list, parse=v.as_list, cli_type=list[str], metavar="PATH",
        help="LR label rasters (e.g. NLCD 30 m, WorldCover 10 m), any CRS; resampled nearest onto the imagery grid; "
        "where files overlap, the first in sorted path order holding a label wins.",
    )  # fmt: skip
    legend: str = option(
        "nlcd", parse=v.text, cli_type=str,
        help="Legend of --labels: nlcd, worldcover, esri, fromglc10, glc_fcs30, chesapeake, or a YAML file.",
    )  # fmt: skip
    label_products: list[dict[str, Any]] = option(
        default_factory=list, parse=v.label_products, cli_type=list[str], flag="--label-product",
        metavar="PATHS=LEGEND",
        help="PATHS=LEGEND (repeatable, in order): several label products fused into one label (instead of "
        "--labels/--legend), e.g. --label-product 'esa/=worldcover' --label-product 'esri/*.tif=esri'. PATHS: a "
        "file, folder, quoted glob or .txt list (several joined by ','). Each product is read onto the 1 m grid "
        "in its own CRS and mapped to its target classes, then fused by --label-fusion; the network predicts the "
        "target classes. One product trains exactly as --labels/--legend. Config file: label_products: "
        "[{labels: [PATHS], legend: NAME}, ...].",
    )  # fmt: skip
    label_fusion: str = option(
        "partial", parse=v.lower, cli_type=str,
        help="How --label-product labels are fused where the products' target classes differ: partial (the label "
        "'one of these target classes', partial-label loss), agree (the pixel is ignored) or first (the first "
        "product's class). Where a product has no label the others decide.",
    )  # fmt: skip
    aoi: str | None = option(
        None, parse=v.text, cli_type=str, metavar="PATH",
        help="Area of interest: GeoJSON, GeoPackage or Shapefile polygons, in any CRS (instead of --bbox).",
    )  # fmt: skip
    bbox: list[float] | None = option(
        None, parse=v.bbox4, cli_type=tuple[float, float, float, float],
        help="Training area as W S E N, in --bbox-crs units (degrees for EPSG:4326, metres for UTM); "
        "default: the whole data.",
    )  # fmt: skip
    bbox_crs: str = option(
        "EPSG:4326", parse=v.text, cli_type=str, help="CRS of --bbox, e.g. EPSG:4326 (default) or EPSG:26917."
    )
    model: str = option(
        "paraformer-tiny", parse=v.lower, cli_type=str,
        help="paraformer (paper size, GPU), paraformer-tiny (CPU) or unet (baseline).",
    )  # fmt: skip
    epochs: int = option(8, parse=v.whole, cli_type=int, help="Number of epochs.")
    steps_per_epoch: int = option(
        30, parse=v.whole, cli_type=int,
        help="Optimizer steps (batches) per epoch on one device; an epoch draws steps-per-epoch x batch-size "
        "random patches, shared among the devices.",
    )  # fmt: skip
    batch_size: int = option(8, parse=v.whole, cli_type=int, help="Patches per batch (per device).")
    patch_px: int | None = option(
        None, parse=v.whole, cli_type=int,
        help="Training patch side in pixels of the imagery grid (multiple of 32; default 128, 224 for paraformer).",
    )  # fmt: skip
    val_patch_px: int = option(
        256, parse=v.whole, cli_type=int, help="Validation window side in pixels of the imagery grid (multiple of 32)."
    )
    val_tta: str = option(
        "none", parse=v.lower, cli_type=str,
        help="Test-time augmentation of the validation windows (as lcmap predict --tta): none, flips (~4x the "
        "validation time) or d4 (~8x).",
    )  # fmt: skip
    devices: int | str = option(
        1, parse=v.devices, cli_type=str, metavar="N|auto",
        help="Devices (GPUs, or CPU processes) per machine, or auto (all GPUs); more than one trains with DDP, one "
        "process per device (see the README: multi-GPU and multi-node training).",
    )  # fmt: skip
    num_nodes: int = option(
        1, parse=v.whole, cli_type=int,
        help="Machines (nodes) taking part in DDP training, each running the same command with --devices processes.",
    )  # fmt: skip
    accelerator: str = option("auto", parse=v.lower, cli_type=str, help="auto, cpu or gpu.")
    precision: str = option(
        "32", parse=v.precision, cli_type=str, help="32, bf16-mixed or 16-mixed (mixed precision on GPU only)."
    )
    lr: float | None = option(
        None, parse=float, cli_type=float, help="Peak learning rate (default 2e-3 for adamw, 0.01 for sgd)."
    )
    optimizer: str = option(
        "adamw", parse=v.lower, cli_type=str,
        help="adamw (warm-up + cosine decay) or sgd (momentum 0.9, poly decay, as the paper).",
    )  # fmt: skip
    weight_decay: float = option(
        1e-4, parse=float, cli_type=float, help="Weight decay (decoupled for adamw, L2 for sgd)."
    )
    class_weighting: str = option(
        "inv_sqrt_freq", parse=v.lower, cli_type=str,
        help="Loss weight per LR class: inv_sqrt_freq (1/sqrt(label frequency), default), inv_freq or none.",
    )  # fmt: skip
    augment: bool = option(
        True, parse=v.boolean, cli_type=bool, help="Random flips and 90-degree rotations of the training patches."
    )
    label_trust: dict[int, float] = option(
        default_factory=dict, parse=v.label_trust, cli_type=list[str], metavar="CODE=FACTOR",
        help="CODE=FACTOR (0..1, repeatable): scale the loss weight of an LR class that is mixed at 1 m, e.g. "
        "--label-trust 21=0.2 for NLCD 'Developed, Open Space' (mostly lawn). 0 ignores the class.",
    )  # fmt: skip
    mixed_classes: dict[int, list[str]] = option(
        default_factory=dict, parse=v.mixed_classes, cli_type=list[str], flag="--mixed-class",
        metavar="CODE=TARGET[,TARGET]",
        help="CODE=TARGET[,TARGET] (repeatable): an LR class that is a mixture at 1 m, trained as 'one of the "
        "classes of these target classes' (partial-label loss), e.g. --mixed-class '21=built-up,low vegetation' "
        "for NLCD 'Developed, Open Space'. Wins, per code, over the legend's own mixed classes.",
    )  # fmt: skip
    default_mixed: bool = option(
        True, parse=v.boolean, cli_type=bool,
        help="Use the mixed classes the legend declares from its class definitions (e.g. NLCD 21 = built-up or "
        "low vegetation); --no-default-mixed trains every class as a plain label except those given with "
        "--mixed-class. RUN_DIR/config.yaml records the mixed classes used.",
    )  # fmt: skip
    label_loss: str = option(
        "plat", parse=v.lower, cli_type=str,
        help="Training loss: plat (default: Paraformer's pseudo-label-assisted training on the LR classes), ce "
        "(cross-entropy on the LR classes, every head), or a loss on what each LR class holds at 1 m (its "
        "composition in the legend, e.g. NLCD 21 = 42 % tree canopy, 46 % low vegetation, 11 % built-up; the "
        "network then predicts the target classes): prior (cross-entropy against the composition as a soft "
        "target), prior-plat (prior on head 1, head 2 on head 1's posterior under the prior), lsr (label "
        "super-resolution: the predicted class mix per LR class and patch vs the composition's mean +- sigma) "
        "or qr (implicit-posterior loss). RUN_DIR/composition.json records the compositions used.",
    )  # fmt: skip
    prior_blur_m: float = option(
        0.0, parse=float, cli_type=float, metavar="METRES",
        help="Prior losses: standard deviation, in metres, of a Gaussian blur of the prior over neighbouring "
        "LR cells (0: none; e.g. 30 for NLCD).",
    )  # fmt: skip
    vit_weights: str | None = option(
        None, parse=v.text, cli_type=str, metavar="PATH",
        help="Local pretrained ViT weights (timm .pth/.safetensors or Google ImageNet-21k .npz). "
        "Without it the ViT trains from scratch.",
    )  # fmt: skip
    reference: list[str] | None = option(
        None, parse=v.as_list, cli_type=list[str], metavar="PATH",
        help="Optional HR reference land cover for validation (mIoU over target classes); "
        "without it validation measures agreement with the LR labels.",
    )  # fmt: skip
    reference_legend: str | None = option(
        None, parse=v.text, cli_type=str, help="Legend of --reference (name or YAML file); required with it."
    )
    stac_asset: str | None = option(None, parse=v.text, cli_type=str, metavar="KEY", help=ASSET_HELP)
    resume: bool = option(
        False, parse=v.boolean, cli_type=bool, switch=False,
        help="Continue an interrupted run from RUN_DIR/checkpoints/last.ckpt.",
    )  # fmt: skip
    seed: int = option(1234, parse=v.whole, cli_type=int, help="Random seed.")
    num_workers: int = option(0, parse=v.whole, cli_type=int, help="DataLoader worker processes.")
    progress_bar: bool = option(
        True, parse=v.boolean, cli_type=bool,
        help="Show the progress bar (on a terminal only; otherwise one log line per epoch).",
    )  # fmt: skip
    out: str | None = option(
        None, parse=v.text, cli_type=str, metavar="RUN_DIR",
        help="RUN_DIR to write checkpoints, config, legend, stats, metrics, loss plot.",
    )  # fmt: skip

    # ------------------------------------------------------------------ resolution
    @property
    def resolved_patch_px(self) -> int:
        return int(self.patch_px) if self.patch_px is not None else DEFAULT_PATCH_PX.get(self.model, 128)

    @property
    def resolved_lr(self) -> float:
        return float(self.lr) if self.lr is not None else DEFAULT_LR[self.optimizer]

    def check(self) -> None:
        """Raise :class:`LcmapInputError` for missing or invalid options."""
        problems = []
        if not self.images:
            problems.append("no imagery given (--images)")
        if not self.labels and not self.label_products:
            problems.append("no labels given (--labels or --label-product)")
        if self.labels and self.label_products:
            problems.append(
                "give either --labels/--legend or --label-product, not both: to train on both products, give "
                "--labels as one more --label-product 'PATHS=LEGEND'"
            )
        if len(self.label_products) > 1 and (self.label_trust or self.mixed_classes):
            problems.append("--label-trust and --mixed-class name one product's codes: not with several products")
        if not self.out:
            problems.append("no RUN_DIR given (--out)")
        for name, allowed in (
            ("model", MODEL_CHOICES),
            ("precision", PRECISIONS),
            ("accelerator", ACCELERATORS),
            ("optimizer", OPTIMIZERS),
            ("class_weighting", CLASS_WEIGHTINGS),
            ("label_fusion", LABEL_FUSIONS),
            ("label_loss", LABEL_LOSSES),
        ):
            if getattr(self, name) not in allowed:
                problems.append(f"{self.flag_of(name)} {getattr(self, name)!r}: choose one of {', '.join(allowed)}")
        from lcmap.models.tta import TTA_MODES  # torch: imported when checking, not for --help

        if self.val_tta not in TTA_MODES:
            problems.append(f"{self.flag_of('val_tta')} {self.val_tta!r}: choose one of {', '.join(TTA_MODES)}")
        for name in ("patch_px", "val_patch_px"):
            value = getattr(self, name)
            if value is not None and (value < 32 or value % 32):
                problems.append(f"{self.flag_of(name)} {value}: must be a positive multiple of 32 px")
        for name in ("epochs", "steps_per_epoch", "batch_size"):
            if getattr(self, name) < 1:
                problems.append(f"{self.flag_of(name)} must be >= 1")
        if self.num_workers < 0:
            problems.append("--num-workers must be >= 0")
        if self.label_loss in PRIOR_LOSSES and self.mixed_classes and not self.resume:
            problems.append(
                f"--mixed-class has no effect with {self.flag_of('label_loss')} {self.label_loss} (it trains on the "
                "compositions): give the class a composition in a YAML legend instead"
            )
        if not self.prior_blur_m >= 0:
            problems.append(f"{self.flag_of('prior_blur_m')} must be >= 0 (metres)")
        if self.lr is not None and not self.lr > 0:
            problems.append("--lr must be > 0")
        if self.bbox is not None and len(self.bbox) != 4:
            problems.append("--bbox takes 4 numbers: W S E N")
        if self.aoi is not None and self.bbox is not None:
            problems.append("give either --aoi or --bbox, not both")
        if self.reference and not self.reference_legend:
            problems.append("--reference needs --reference-legend (e.g. chesapeake, or a YAML legend)")
        if self.vit_weights is not None and self.model == "unet":
            problems.append("--vit-weights applies to Paraformer models only, not to the U-Net")
        if self.vit_weights is not None and not Path(self.vit_weights).is_file():
            problems.append(
                f"--vit-weights {self.vit_weights} does not exist (a local file is needed; nothing is downloaded)"
            )
        if isinstance(self.devices, str) and self.devices != "auto":
            problems.append(f"--devices {self.devices!r}: a number or 'auto'")
        elif isinstance(self.devices, int) and self.devices < 1:
            problems.append("--devices must be >= 1")
        if self.num_nodes < 1:
            problems.append("--num-nodes must be >= 1")
        if problems:
            raise LcmapInputError("invalid training options: " + "; ".join(problems))

    def single_product(self) -> TrainConfig:
        """One ``--label-product`` as ``--labels``/``--legend`` (today's training, unchanged); else self
        (with ``--labels`` given too: self, which :meth:`check` refuses, never ``--labels`` dropped)."""
        if len(self.label_products) != 1 or self.labels:
            return self
        prod = self.label_products[0]
        return dataclasses.replace(self, labels=list(prod["labels"]), legend=prod["legend"], label_products=[])

    def input_files(self) -> list[str]:
        """Every input path the options name, as given: imagery, labels (products included),
        reference, AOI, YAML legends and ViT weights."""
        rasters = [*self.images, *self.labels, *(p for prod in self.label_products for p in prod["labels"])]
        legends = [self.legend, self.reference_legend, *(prod["legend"] for prod in self.label_products)]
        yamls = [n for n in legends if n and Path(n).suffix.lower() in (".yaml", ".yml")]
        return [str(p) for p in [*rasters, *(self.reference or []), self.aoi, self.vit_weights, *yamls] if p]

    def with_absolute_paths(self) -> TrainConfig:
        def absolute(p: str | None) -> str | None:  # a URL as it is
            return None if p is None else p if is_remote(p) else str(Path(p).expanduser().resolve())

        def absolute_legend(name: str | None) -> str | None:
            if name is None:
                return None
            p = Path(name)
            return str(p.resolve()) if p.suffix.lower() in (".yaml", ".yml") or p.exists() else name

        return dataclasses.replace(
            self,
            images=[absolute(p) for p in self.images],  # type: ignore[misc]
            labels=[absolute(p) for p in self.labels],  # type: ignore[misc]
            label_products=[
                {"labels": [absolute(p) for p in prod["labels"]], "legend": absolute_legend(prod["legend"])}
                for prod in self.label_products
            ],
            aoi=absolute(self.aoi),
            vit_weights=absolute(self.vit_weights),
            reference=None if self.reference is None else [absolute(p) for p in self.reference],  # type: ignore[misc]
            legend=absolute_legend(self.legend),  # type: ignore[arg-type]
            reference_legend=absolute_legend(self.reference_legend),
            out=absolute(self.out),
        )

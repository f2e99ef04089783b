"""``lcmap train``: train Paraformer (PLAT) or the U-Net baseline on LR labels over an AOI.

Entry points: :class:`TrainConfig` (the options; ``TrainConfig.from_yaml(path).merged(**flags)``
makes a config file and command-line flags the same options) and :func:`run_train`, which writes
RUN_DIR (layout in :mod:`lcmap.pipeline.runs`) and returns its path::

    RUN_DIR/
      config.yaml              the options used (absolute paths, resolved defaults)
      legend.yaml              the LR legend the network predicts
      normalization.json       per-band mean/std of the imagery
      class_weights.json       CE class weights (and the label frequencies they come from)
      checkpoints/last.ckpt    every epoch, and on Ctrl-C
      checkpoints/best.ckpt    best validation mIoU (vs the reference, else vs the LR labels);
                               ``lcmap predict --model RUN_DIR`` uses it only when validated
                               against a reference, else last.ckpt
      metrics.csv              every logged metric (logs/version_*/metrics.csv merged)
      loss.png                 loss curves and validation mIoU per epoch
      train.log                a readable log of the run
      logs/                    Lightning's CSV (and TensorBoard, when installed) logs
"""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
import math
import os
import sys
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from lcmap.errors import AOITooSmallError, LcmapInputError, TrainingInterrupted
from lcmap.geodata.yaml_files import read_yaml

log = logging.getLogger("lcmap.train")

__all__ = ["TrainConfig", "run_train", "scan_label_codes"]

MODEL_CHOICES = ("paraformer", "paraformer-tiny", "unet")
PRECISIONS = ("32", "bf16-mixed", "16-mixed")
ACCELERATORS = ("auto", "cpu", "gpu")
OPTIMIZERS = ("adamw", "sgd")
CLASS_WEIGHTINGS = ("inv_sqrt_freq", "inv_freq", "none")

#: Default peak learning rate per optimiser (used when ``lr`` is not given).
DEFAULT_LR = {"adamw": 2e-3, "sgd": 0.01}
#: Default training patch side per model (px), when ``patch_px`` is not given.
DEFAULT_PATCH_PX = {"paraformer": 224, "paraformer-tiny": 128, "unet": 128}
#: Options a resumed run may change (the others must describe the same run).
RESUME_MAY_CHANGE = ("epochs", "devices", "accelerator", "precision", "num_workers", "progress_bar",
                     "images", "labels", "reference")


def _as_list(value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, (str, Path)):
        return [str(value)]
    return [str(v) for v in value]


@dataclass
class TrainConfig:
    """Options of ``lcmap train`` (config-file keys = flag names with ``_`` or ``-``).

    Attributes:
        images: HR imagery files or folders (any band count; a mosaic).
        labels: LR land-cover files or folders (any CRS/resolution; read nearest onto the 1 m grid).
        legend: the labels' legend: built-in name (``nlcd``, ``worldcover``, ...) or a YAML file.
        aoi: polygon file of the training area (any CRS), or None.
        bbox: ``[W, S, E N]`` training area in ``bbox_crs`` (instead of ``aoi``), or None (whole data).
        bbox_crs: CRS of ``bbox`` (default longitude/latitude).
        model: ``paraformer-tiny`` (CPU-sized, default), ``paraformer`` (paper size) or ``unet``.
        epochs: training epochs.
        steps_per_epoch: optimiser steps per epoch on one device; an epoch draws
            ``steps_per_epoch * batch_size`` random patches, shared among the devices (with ``n``
            devices: ``steps_per_epoch / n`` steps of ``n * batch_size`` patches).
        batch_size: patches per step and device.
        patch_px: training patch side in pixels, a multiple of 32 (default 128; 224 for paraformer).
        val_patch_px: validation window side in pixels, a multiple of 32.
        devices: number of devices (or ``auto``: all); several GPUs train with DDP.
        accelerator: ``auto``, ``cpu`` or ``gpu``.
        precision: ``32``, ``bf16-mixed`` or ``16-mixed`` (mixed precision on GPUs only).
        lr: peak learning rate (default 2e-3 for AdamW, 0.01 for SGD).
        optimizer: ``adamw`` (warm-up + cosine decay) or ``sgd`` (momentum 0.9, poly decay, as the paper).
        weight_decay: weight decay.
        class_weighting: ``inv_sqrt_freq`` (CE weights ~ 1/sqrt(label frequency)), ``inv_freq``
            (~ 1/frequency) or ``none``.
        augment: random flips and 90-degree rotations.
        label_trust: ``{LR code: factor in [0, 1]}`` multiplying that class's loss weight, for LR
            classes known to be mixed at 1 m (e.g. NLCD 21 "Developed, Open Space": mostly lawn
            grass, under 20 % impervious). 0 ignores the class's pixels; unlisted classes get 1.
        mixed_classes: ``{LR code: [target class names]}``: LR classes that are a mixture at 1 m.
            Their pixels are trained with a partial-label cross-entropy, "one of the LR classes of
            these target classes" (e.g. ``{21: [built-up, low vegetation]}``: NLCD "Developed, Open
            Space" is lawn or pavement, the image decides which); the class itself is not predicted.
        vit_weights: local file of pretrained ViT weights (Paraformer); None trains the ViT from scratch.
        reference: HR reference land-cover files for validation (mIoU over target classes), or None
            (validation then measures agreement with the LR labels).
        reference_legend: the reference's legend (name or YAML); required with ``reference``.
        resume: continue the run in ``out`` from ``checkpoints/last.ckpt``.
        seed: random seed.
        num_workers: DataLoader worker processes.
        progress_bar: show the rich progress bar.
        out: RUN_DIR to write.
    """

    images: list[str] = field(default_factory=list)
    labels: list[str] = field(default_factory=list)
    legend: str = "nlcd"
    aoi: str | None = None
    bbox: list[float] | None = None
    bbox_crs: str = "EPSG:4326"
    model: str = "paraformer-tiny"
    epochs: int = 8
    steps_per_epoch: int = 30
    batch_size: int = 8
    patch_px: int | None = None
    val_patch_px: int = 256
    devices: int | str = 1
    accelerator: str = "auto"
    precision: str = "32"
    lr: float | None = None
    optimizer: str = "adamw"
    weight_decay: float = 1e-4
    class_weighting: str = "inv_sqrt_freq"
    augment: bool = True
    label_trust: dict[int, float] = field(default_factory=dict)
    mixed_classes: dict[int, list[str]] = field(default_factory=dict)
    vit_weights: str | None = None
    reference: list[str] | None = None
    reference_legend: str | None = None
    resume: bool = False
    seed: int = 1234
    num_workers: int = 0
    progress_bar: bool = True
    out: str | None = None

    # ---------------------------------------------------------------- construction
    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in fields(cls)]

    @classmethod
    def _normalise_keys(cls, data: dict[str, Any], source: str) -> dict[str, Any]:
        known = set(cls.field_names())
        out: dict[str, Any] = {}
        unknown = []
        for key, value in data.items():
            name = str(key).replace("-", "_")
            if name not in known:
                unknown.append(str(key))
            else:
                out[name] = value
        if unknown:
            raise LcmapInputError(
                f"{source}: unknown option(s) {', '.join(sorted(unknown))}. Valid options: "
                f"{', '.join(cls.field_names())}"
            )
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "<dict>") -> "TrainConfig":
        return cls()._replace(cls._normalise_keys(data, source), source)

    @classmethod
    def from_yaml(cls, path: str | Path) -> "TrainConfig":
        """Read a YAML config file (keys: the field names); unknown keys are an error."""
        path = Path(path)
        data = read_yaml(path, "config file")
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise LcmapInputError(f"config file {path} must hold a mapping of option: value")
        return cls.from_dict(data, source=str(path))

    def merged(self, **flags: Any) -> "TrainConfig":
        """A copy with ``flags`` applied; None values mean "not given" and are skipped."""
        given = {k: v for k, v in flags.items() if v is not None}
        return self._replace(self._normalise_keys(given, "command line"), "command line")

    def _replace(self, values: dict[str, Any], source: str) -> "TrainConfig":
        coerced = {k: _coerce(k, v, source) for k, v in values.items()}
        return dataclasses.replace(self, **coerced)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self, path: str | Path) -> None:
        _atomic_write_text(Path(path), yaml.safe_dump(self.to_dict(), sort_keys=False))

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
        if not self.labels:
            problems.append("no labels given (--labels)")
        if not self.out:
            problems.append("no RUN_DIR given (--out)")
        if self.model not in MODEL_CHOICES:
            problems.append(f"--model {self.model!r}: choose one of {', '.join(MODEL_CHOICES)}")
        for name in ("patch_px", "val_patch_px"):
            value = getattr(self, name)
            if value is not None and (value < 32 or value % 32):
                problems.append(f"--{name.replace('_', '-')} {value}: must be a positive multiple of 32 px")
        for name in ("epochs", "steps_per_epoch", "batch_size"):
            if getattr(self, name) < 1:
                problems.append(f"--{name.replace('_', '-')} must be >= 1")
        if self.num_workers < 0:
            problems.append("--num-workers must be >= 0")
        if self.precision not in PRECISIONS:
            problems.append(f"--precision {self.precision!r}: choose one of {', '.join(PRECISIONS)}")
        if self.accelerator not in ACCELERATORS:
            problems.append(f"--accelerator {self.accelerator!r}: choose one of {', '.join(ACCELERATORS)}")
        if self.optimizer not in OPTIMIZERS:
            problems.append(f"--optimizer {self.optimizer!r}: choose one of {', '.join(OPTIMIZERS)}")
        if self.class_weighting not in CLASS_WEIGHTINGS:
            problems.append(f"--class-weighting {self.class_weighting!r}: choose one of {', '.join(CLASS_WEIGHTINGS)}")
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
            problems.append(f"--vit-weights {self.vit_weights} does not exist (a local file is needed; nothing is downloaded)")
        if isinstance(self.devices, str) and self.devices != "auto":
            problems.append(f"--devices {self.devices!r}: a number or 'auto'")
        elif isinstance(self.devices, int) and self.devices < 1:
            problems.append("--devices must be >= 1")
        if problems:
            raise LcmapInputError("invalid training options: " + "; ".join(problems))

    def with_absolute_paths(self) -> "TrainConfig":
        def absolute(p: str | None) -> str | None:
            return None if p is None else str(Path(p).expanduser().resolve())

        def absolute_legend(name: str | None) -> str | None:
            if name is None:
                return None
            p = Path(name)
            return str(p.resolve()) if p.suffix.lower() in (".yaml", ".yml") or p.exists() else name

        return dataclasses.replace(
            self,
            images=[absolute(p) for p in self.images],  # type: ignore[misc]
            labels=[absolute(p) for p in self.labels],  # type: ignore[misc]
            aoi=absolute(self.aoi),
            vit_weights=absolute(self.vit_weights),
            reference=None if self.reference is None else [absolute(p) for p in self.reference],  # type: ignore[misc]
            legend=absolute_legend(self.legend),  # type: ignore[arg-type]
            reference_legend=absolute_legend(self.reference_legend),
            out=absolute(self.out),
        )


_LIST_FIELDS = {"images", "labels", "reference"}
_INT_FIELDS = {"epochs", "steps_per_epoch", "batch_size", "patch_px", "val_patch_px", "seed", "num_workers"}
_FLOAT_FIELDS = {"lr", "weight_decay"}
_BOOL_FIELDS = {"augment", "resume", "progress_bar"}


def _coerce(name: str, value: Any, source: str) -> Any:
    """Bring a value from YAML or a flag to the field's type, with a clear error."""
    try:
        if value is None:
            return None
        if name in _LIST_FIELDS:
            return _as_list(value)
        if name == "bbox":
            vals = [float(v) for v in (value.replace(",", " ").split() if isinstance(value, str) else value)]
            return vals
        if name in _INT_FIELDS:
            if isinstance(value, bool) or float(value) != int(float(value)):
                raise ValueError("not a whole number")
            return int(float(value))
        if name in _FLOAT_FIELDS:
            return float(value)
        if name in _BOOL_FIELDS:
            if isinstance(value, bool):
                return value
            text = str(value).strip().lower()
            if text in ("true", "yes", "on", "1"):
                return True
            if text in ("false", "no", "off", "0"):
                return False
            raise ValueError("not true/false")
        if name == "label_trust":
            return _parse_label_trust(value)
        if name == "mixed_classes":
            return _parse_mixed_classes(value)
        if name == "devices":
            if isinstance(value, str) and value.strip().lower() == "auto":
                return "auto"
            return int(value)
        if name == "precision":
            text = str(value).strip().lower()
            return {"32": "32", "32-true": "32", "bf16": "bf16-mixed", "16": "16-mixed"}.get(text, text)
        if name in ("model", "optimizer", "class_weighting", "accelerator"):
            return str(value).strip().lower()
        return str(value)
    except (TypeError, ValueError) as exc:
        raise LcmapInputError(f"{source}: option {name} = {value!r} is invalid ({exc})") from exc


def _parse_label_trust(value: Any) -> dict[int, float]:
    """``{21: 0.2}``, ``"21=0.2,22=0.5"`` or ``["21=0.2", ...]`` -> ``{code: factor}`` (factors in [0, 1])."""
    if isinstance(value, dict):
        items = list(value.items())
    else:
        parts = [value] if isinstance(value, str) else list(value)
        items = []
        for part in parts:
            for item in str(part).replace(",", " ").split():
                code, sep, factor = item.partition("=")
                if not sep:
                    raise ValueError(f"{item!r} is not CODE=FACTOR")
                items.append((code, factor))
    trust = {}
    for code, factor in items:
        code_i, factor_f = int(code), float(factor)
        if not 0.0 <= factor_f <= 1.0:
            raise ValueError(f"trust of class {code_i} must be between 0 and 1, got {factor_f}")
        trust[code_i] = factor_f
    return trust


def _parse_mixed_classes(value: Any) -> dict[int, list[str]]:
    """``{21: [built-up, low vegetation]}``, ``"21=built-up,low vegetation"`` (several joined by
    ``;``) or a list of such strings -> ``{code: [target names]}``."""
    if isinstance(value, dict):
        items = [(k, v if isinstance(v, (list, tuple)) else str(v).split(",")) for k, v in value.items()]
    else:
        parts = [value] if isinstance(value, str) else list(value)
        items = []
        for part in parts:
            for item in str(part).split(";"):
                if not item.strip():
                    continue
                code, sep, names = item.partition("=")
                if not sep:
                    raise ValueError(f"{item!r} is not CODE=TARGET[,TARGET...]")
                items.append((code, names.split(",")))
    mixed = {}
    for code, names in items:
        clean = [str(n).strip() for n in names if str(n).strip()]
        if not clean:
            raise ValueError(f"mixed class {code} names no target class")
        mixed[int(code)] = clean
    return mixed


def allowed_classes_for(legend: Any, mixed: dict[int, list[str]]) -> list[list[int]] | None:
    """Per legend index, the indices acceptable for its label: itself, or for a mixed class the
    classes of the named target classes (itself excluded). None when nothing is mixed."""
    if not mixed:
        return None
    unknown = sorted(set(mixed) - set(legend.codes))
    if unknown:
        raise LcmapInputError(f"mixed_classes names codes {unknown} that legend {legend.name} does not have")
    targets = set(legend.target.names)
    rows = []
    for i, cls in enumerate(legend.classes):
        names = mixed.get(cls.code)
        if names is None:
            rows.append([i])
            continue
        bad = sorted(set(names) - targets)
        if bad:
            raise LcmapInputError(
                f"mixed_classes {cls.code}: {bad} are not target classes ({', '.join(legend.target.names)})")
        row = [k for k, c in enumerate(legend.classes) if c.target in names and c.code != cls.code]
        if not row:
            raise LcmapInputError(f"mixed_classes {cls.code}: no other class of {legend.name} maps to {names}")
        rows.append(row)
    return rows


# ---------------------------------------------------------------------------------- helpers
def _atomic_write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _read_window_values(path: str, bounds: tuple[float, float, float, float] | None, crs: Any,
                        max_pixels: int) -> tuple[np.ndarray, np.ndarray]:
    """Unique values and counts of a raster inside ``bounds`` (in ``crs``), decimated above ``max_pixels``."""
    import rasterio
    from rasterio.warp import transform_bounds
    from rasterio.windows import Window, from_bounds

    with rasterio.open(path) as src:
        window = Window(0, 0, src.width, src.height)
        if bounds is not None:
            b = transform_bounds(crs, src.crs, *bounds, densify_pts=21) if crs != src.crs else bounds
            w = from_bounds(*b, transform=src.transform)
            w = w.round_offsets(op="floor").round_lengths(op="ceil")
            col0, row0 = max(0, int(w.col_off) - 1), max(0, int(w.row_off) - 1)
            col1 = min(src.width, int(w.col_off + w.width) + 1)
            row1 = min(src.height, int(w.row_off + w.height) + 1)
            if col1 <= col0 or row1 <= row0:
                return np.zeros(0, np.int64), np.zeros(0, np.int64)
            window = Window(col0, row0, col1 - col0, row1 - row0)
        n = int(window.width * window.height)
        if n > max_pixels:
            f = math.sqrt(n / max_pixels)
            shape = (max(1, int(window.height / f)), max(1, int(window.width / f)))
            data = src.read(1, window=window, out_shape=shape)
        else:
            data = src.read(1, window=window)
    values, counts = np.unique(data, return_counts=True)
    return values, counts


def scan_label_codes(label_ds: Any, bounds: tuple[float, float, float, float] | None, crs: Any,
                     max_pixels: int = 20_000_000) -> dict[int, int]:
    """Check every label file's values (inside ``bounds``) against its legend, before training.

    Args:
        label_ds: a :class:`~lcmap.geodata.datasets.LabelRaster` (files, legend, file nodata).
        bounds: ``(xmin, ymin, xmax, ymax)`` in ``crs`` of the area that will be used, or None.
        crs: CRS of ``bounds``.
        max_pixels: above this many pixels per file, the window is read decimated.

    Returns:
        ``{legend index: pixel count}`` over the files (nodata left out).

    Raises:
        UnknownLabelError: a file holds codes outside the legend (the message lists them and the file).
    """
    from lcmap.geodata.datasets import encode_labels
    from lcmap.geodata.legends import IGNORE_INDEX

    counts: dict[int, int] = {}
    for path in label_ds.files:
        values, n = _read_window_values(path, bounds, crs, max_pixels)
        if values.size == 0:
            continue
        idx = encode_labels(values, label_ds, source=path)  # raises UnknownLabelError
        for i, c in zip(idx.tolist(), n.tolist()):
            if i != IGNORE_INDEX:
                counts[i] = counts.get(i, 0) + int(c)
    return counts


def _dataset_bounds(ds: Any) -> tuple[float, float, float, float]:
    x, y, _ = ds.bounds
    return (float(x.start), float(y.start), float(x.stop), float(y.stop))


def _setup_logging(run_dir: Path, is_rank_zero: bool) -> list[logging.Handler]:
    """A file handler on RUN_DIR/train.log (rank 0), and console output when nothing else prints."""
    handlers: list[logging.Handler] = []
    lcmap_logger = logging.getLogger("lcmap")
    lcmap_logger.setLevel(logging.INFO)
    if is_rank_zero:
        fh = logging.FileHandler(run_dir / "train.log", encoding="utf-8")
        fh.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%Y-%m-%d %H:%M:%S"))
        fh.setLevel(logging.INFO)
        lcmap_logger.addHandler(fh)
        handlers.append(fh)
        has_console = any(not isinstance(h, logging.FileHandler) for h in logging.getLogger().handlers) or any(
            not isinstance(h, logging.FileHandler) for h in lcmap_logger.handlers
        )
        if not has_console:
            sh = logging.StreamHandler(sys.stderr)
            sh.setFormatter(logging.Formatter("%(message)s"))
            sh.setLevel(logging.INFO)
            lcmap_logger.addHandler(sh)
            handlers.append(sh)
    return handlers


def _resume_config(config: TrainConfig, run_dir: Path) -> TrainConfig:
    """The saved run's options, with the options given now that a resumed run may change."""
    saved_path = run_dir / "config.yaml"
    if not saved_path.is_file():
        raise LcmapInputError(f"--resume: {saved_path} is missing; {run_dir} is not a run folder of 'lcmap train'")
    saved = TrainConfig.from_yaml(saved_path)
    defaults = TrainConfig()
    changes: dict[str, Any] = {}
    for f in fields(TrainConfig):
        name = f.name
        if name in ("resume", "out"):
            continue
        new, old, default = getattr(config, name), getattr(saved, name), getattr(defaults, name)
        if new == default or new == old or (name in _LIST_FIELDS and not new):
            continue
        if name in RESUME_MAY_CHANGE:
            changes[name] = new
        else:
            log.warning("--resume: keeping %s = %r of the interrupted run (ignoring %r)", name, old, new)
    return dataclasses.replace(saved, **changes, resume=True, out=config.out)


# ---------------------------------------------------------------------------------- training
def run_train(config: TrainConfig) -> Path:
    """Train a model as ``config`` says; return RUN_DIR.

    Raises:
        LcmapInputError: bad options or inputs (legend vs label values, AOI, band counts, a resumed
            checkpoint that does not fit, out of GPU memory with a batch size to try).
        TrainingInterrupted: Ctrl-C; ``checkpoints/last.ckpt`` holds the state to resume from.
    """
    import lightning.pytorch as pl
    import torch
    from lightning.pytorch.utilities import rank_zero_only

    from lcmap.geodata.aoi import resolve_aoi
    from lcmap.geodata.datasets import LabelledImagery, open_imagery, open_labels
    from lcmap.geodata.legends import get_legend
    from lcmap.geodata.normalization import BandStats, compute_band_stats
    from lcmap.pipeline.datamodule import LandCoverDataModule, check_patches_fit, sample_label_counts
    from lcmap.pipeline.task import AtomicCheckpointIO, LandCoverTask, inverse_sqrt_frequency_weights

    if not config.out:
        raise LcmapInputError("no RUN_DIR given (--out)")
    run_dir = Path(config.out).expanduser().resolve()
    last_ckpt = run_dir / "checkpoints" / "last.ckpt"
    if config.resume:
        if not last_ckpt.is_file():
            raise LcmapInputError(f"--resume: {last_ckpt} does not exist; nothing to resume in {run_dir}")
        config = _resume_config(config, run_dir)
    elif last_ckpt.exists():
        raise LcmapInputError(
            f"{run_dir} already holds a training run ({last_ckpt}). Continue it with --resume, "
            "or choose another --out."
        )
    config.check()
    config = config.with_absolute_paths()
    is_zero = rank_zero_only.rank == 0
    run_dir.mkdir(parents=True, exist_ok=True)
    handlers = _setup_logging(run_dir, is_zero)
    quiet = _QuietLightning()
    t_start = time.perf_counter()
    try:
        quiet.__enter__()
        pl.seed_everything(config.seed, workers=True, verbose=False)
        patch_px = config.resolved_patch_px
        lr = config.resolved_lr
        log.info("lcmap train -> %s%s", run_dir, " (resuming)" if config.resume else "")

        # ---------------------------------------------------------------- inputs
        legend = get_legend(config.legend)
        allowed = allowed_classes_for(legend, config.mixed_classes)  # option errors before any work
        unknown_trust = sorted(set(config.label_trust) - set(legend.codes))
        if unknown_trust:
            raise LcmapInputError(f"label_trust names codes {unknown_trust} that legend {legend.name} does not have")
        imagery = open_imagery(config.images)
        labels = open_labels(config.labels, legend)
        in_channels = int(imagery.count)
        aoi = resolve_aoi(config.aoi, tuple(config.bbox) if config.bbox else None, config.bbox_crs)
        img_bounds = _dataset_bounds(imagery)
        roi = None
        used_bounds = img_bounds
        if aoi is not None:
            aoi.check_overlap(img_bounds, imagery.crs, "the imagery")
            roi = aoi.to_crs(imagery.crs)
            import shapely

            used = shapely.box(*img_bounds).intersection(roi)
            used_bounds = tuple(used.bounds) if not used.is_empty else img_bounds
        log.info("imagery: %d file(s), %d bands, %s, %.2f m pixels", len(imagery.files), in_channels,
                 imagery.crs.to_string(), imagery.res[0])
        log.info("labels: %d file(s), legend %s (%d classes)", len(labels.files), legend.name, len(legend))
        label_counts = scan_label_codes(labels, used_bounds, imagery.crs)
        if not label_counts:
            raise LcmapInputError(
                "the label files hold no class (only nodata) over the imagery and AOI: check --labels and the AOI"
            )
        train_ds = LabelledImagery(imagery, labels, aoi=roi)
        aoi_name = f"the AOI ({aoi.source})" if aoi is not None else "the imagery"
        check_patches_fit(train_ds, roi, patch_px, aoi_name)
        if roi is not None:
            log.info("AOI: %s, %.0f m2 in %s", aoi.source, roi.area, imagery.crs.to_string())

        ref_legend = None
        val_ds = train_ds
        if config.reference:
            ref_legend = get_legend(config.reference_legend)
            ref = open_labels(config.reference, ref_legend, what="reference")
            scan_label_codes(ref, used_bounds, imagery.crs)
            val_ds = LabelledImagery(imagery, ref, aoi=roi)
            log.info("validation: mIoU over target classes vs the reference (%d file(s), legend %s)",
                     len(ref.files), ref_legend.name)
        else:
            log.info("validation: no reference given; mIoU over target classes vs the LR labels (agreement)")

        # --------------------------------------------------- resumed checkpoint checks
        if config.resume:
            from lcmap.pipeline.runs import read_checkpoint

            hp = read_checkpoint(last_ckpt)["hyper_parameters"]
            if int(hp["in_channels"]) != in_channels:
                raise LcmapInputError(
                    f"--resume: {last_ckpt} was trained on {hp['in_channels']}-band imagery but the imagery "
                    f"has {in_channels} bands"
                )
            if hp["model_name"] != config.model:
                raise LcmapInputError(f"--resume: {last_ckpt} holds a {hp['model_name']} model, not {config.model}")
            if [c["code"] for c in hp["legend"]["classes"]] != legend.codes:
                raise LcmapInputError(f"--resume: {last_ckpt} was trained with another legend than {legend.name}")

        # ------------------------------------------------------- normalisation, weights
        norm_path = run_dir / "normalization.json"
        if config.resume and norm_path.is_file():
            stats = BandStats.from_json(norm_path)
        else:
            stats = compute_band_stats(imagery)
        if len(stats.mean) != in_channels:
            raise LcmapInputError(f"{norm_path} has {len(stats.mean)} bands but the imagery has {in_channels}")
        log.info("band mean %s, std %s", [round(v, 2) for v in stats.mean], [round(v, 2) for v in stats.std])

        weights_path = run_dir / "class_weights.json"
        weights: list[float] | None
        if config.resume and weights_path.is_file():
            data = json.loads(weights_path.read_text())
            weights = data.get("weights")
        else:
            n_patches = int(min(512, max(64, config.steps_per_epoch * config.batch_size)))
            counts = sample_label_counts(train_ds, roi, patch_px, n_patches, len(legend), seed=config.seed + 17,
                                         num_workers=config.num_workers)
            if counts.sum() == 0:
                raise LcmapInputError(
                    f"no labelled pixel in {n_patches} patches drawn inside {aoi_name}: the labels are nodata there"
                )
            occurs = np.array([label_counts.get(i, 0) > 0 for i in range(len(legend))])
            power = 1.0 if config.class_weighting == "inv_freq" else 0.5
            computed = inverse_sqrt_frequency_weights(counts, occurs, power=power)
            if config.class_weighting == "none":
                computed = np.ones(len(legend))
            trust = np.array([config.label_trust.get(c, 1.0) for c in legend.codes])
            if not (trust * counts).any():
                raise LcmapInputError("label_trust gives every labelled class a weight of 0: nothing to learn from")
            computed = computed * trust
            weights = None if config.class_weighting == "none" and not config.label_trust else computed.tolist()
            freq = counts / counts.sum()
            record = {
                "method": config.class_weighting,
                "label_trust": {str(k): v for k, v in sorted(config.label_trust.items())},
                "rule": f"w ~ max(frequency, 1e-3) ** -{power:g}, mean 1 over classes in the patches; classes "
                        "absent from the patches but in the label files get the largest weight; classes "
                        "never in the labels 0; then times the class's label_trust (default 1)",
                "patches": n_patches,
                "patch_px": patch_px,
                "weights": weights,
                "classes": [
                    {"index": i, "code": c.code, "name": c.name, "target": c.target, "pixels": int(counts[i]),
                     "frequency": float(freq[i]), "in_label_files": bool(occurs[i]), "trust": float(trust[i]),
                     "weight": (float(weights[i]) if weights is not None else 1.0)}
                    for i, c in enumerate(legend.classes)
                ],
            }
            if is_zero:
                _atomic_write_text(weights_path, json.dumps(record, indent=1))
        if is_zero:
            _log_class_table(legend, weights_path)

        # ------------------------------------------------------------- run folder
        if is_zero:
            dataclasses.replace(config, resume=False).to_yaml(run_dir / "config.yaml")
            legend.to_yaml(run_dir / "legend.yaml")
            stats.to_json(norm_path)

        # ------------------------------------------------------------ model, data
        if config.model.startswith("paraformer"):
            if config.vit_weights:
                log.info("ViT weights: %s", config.vit_weights)
            else:
                log.info("no --vit-weights: training ViT from scratch")
        if allowed is not None:
            for code, names in sorted(config.mixed_classes.items()):
                log.info("mixed LR class %d: trained as one of %s (partial-label CE)", code,
                         ", ".join(legend.classes[k].name for k in allowed[legend.codes.index(code)]))
        task = LandCoverTask(
            allowed_classes=allowed,
            model_name=config.model,
            in_channels=in_channels,
            legend=legend.to_dict(),
            norm_mean=list(stats.mean),
            norm_std=list(stats.std),
            class_weights=weights,
            lr=lr,
            optimizer=config.optimizer,
            weight_decay=config.weight_decay,
            vit_weights=config.vit_weights,
            val_legend=ref_legend.to_dict() if ref_legend is not None else None,
            val_source="reference" if ref_legend is not None else "labels",
            config=config.to_dict(),
        )
        n_params = sum(p.numel() for p in task.model.parameters())
        log.info("model %s: %.2f M parameters; %d epochs x %d steps x %d patches of %d px; %s lr %.3g",
                 config.model, n_params / 1e6, config.epochs, config.steps_per_epoch, config.batch_size,
                 patch_px, config.optimizer, lr)
        datamodule = LandCoverDataModule(
            train_ds, val_ds, roi, patch_px=patch_px, batch_size=config.batch_size,
            steps_per_epoch=config.steps_per_epoch, mean=stats.mean, std=stats.std,
            val_patch_px=config.val_patch_px, augment=config.augment, num_workers=config.num_workers,
            seed=config.seed, nodata=imagery.nodata,
        )
        if not datamodule.val_windows:
            raise LcmapInputError(f"no {config.val_patch_px} px validation window touches {aoi_name}")
        log.info("validation: %d window(s) of %d px", len(datamodule.val_windows), config.val_patch_px)

        # ------------------------------------------------------------------ trainer
        accelerator, precision = _resolve_accelerator(config, torch)
        callbacks, ckpt_cb = _callbacks(run_dir, config)
        loggers = _loggers(run_dir)
        per_rank_steps = config.steps_per_epoch
        trainer = pl.Trainer(
            accelerator=accelerator,
            devices=config.devices,
            precision=precision,
            max_epochs=config.epochs,
            logger=loggers,
            callbacks=callbacks,
            plugins=[AtomicCheckpointIO()],
            use_distributed_sampler=False,
            reload_dataloaders_every_n_epochs=1,
            num_sanity_val_steps=0,
            log_every_n_steps=max(1, min(10, per_rank_steps // 3)),
            default_root_dir=str(run_dir),
            enable_progress_bar=config.progress_bar,
            enable_model_summary=False,
            deterministic=False,
        )
        try:
            trainer.fit(task, datamodule=datamodule, ckpt_path=str(last_ckpt) if config.resume else None)
        except SystemExit:
            # Lightning turns Ctrl-C into SystemExit(1) after its graceful shutdown (on_exception hooks ran).
            if trainer.interrupted:
                _finish(run_dir, is_zero)
                log.info("interrupted at step %d; last.ckpt saved; resume with --resume", trainer.global_step)
                raise TrainingInterrupted(run_dir, trainer.global_step) from None
            raise
        except KeyboardInterrupt:
            _finish(run_dir, is_zero)
            raise TrainingInterrupted(run_dir, trainer.global_step) from None
        except Exception as exc:  # noqa: BLE001 - translate the out-of-memory family
            _raise_if_oom(exc, config, patch_px, torch)
            if isinstance(exc, AOITooSmallError):
                raise AOITooSmallError(f"{aoi_name} is too small or thin to draw {patch_px} px patches from") from exc
            raise
        if trainer.interrupted:  # graceful stop without SystemExit
            _finish(run_dir, is_zero)
            raise TrainingInterrupted(run_dir, trainer.global_step)
        _finish(run_dir, is_zero)
        best = ckpt_cb.best_model_score
        log.info(
            "done in %.0f s: %d steps; best val_miou %s -> %s; last -> %s",
            time.perf_counter() - t_start, trainer.global_step,
            "n/a" if best is None else f"{float(best):.3f}", run_dir / "checkpoints" / "best.ckpt", last_ckpt,
        )
        return run_dir
    finally:
        quiet.__exit__(None, None, None)
        lcmap_logger = logging.getLogger("lcmap")
        for h in handlers:
            lcmap_logger.removeHandler(h)
            h.close()


class _QuietLightning(logging.Filter):
    """Drops Lightning's advertising tip and known-harmless deprecation warnings during a run."""

    _LOGGER = "lightning.pytorch.utilities.rank_zero"

    def filter(self, record: logging.LogRecord) -> bool:
        return "litlogger" not in record.getMessage()

    def __enter__(self) -> "_QuietLightning":
        import warnings

        self._warnings = warnings.catch_warnings()
        self._warnings.__enter__()
        warnings.filterwarnings("ignore", message=r".*LeafSpec.*")
        warnings.filterwarnings("ignore", message=r"Checkpoint directory .* exists and is not empty")
        logging.getLogger(self._LOGGER).addFilter(self)
        return self

    def __exit__(self, *exc: Any) -> None:
        logging.getLogger(self._LOGGER).removeFilter(self)
        self._warnings.__exit__(*exc)


def _log_class_table(legend: Any, weights_path: Path) -> None:
    try:
        data = json.loads(weights_path.read_text())
    except (OSError, ValueError):
        return
    rows = [c for c in data.get("classes", []) if c["pixels"] > 0 or c["in_label_files"]]
    log.info("label classes over the AOI (%s weighting):", data.get("method"))
    for c in rows:
        log.info("  %4d %-30s %6.2f %%  weight %.3f", c["code"], c["name"][:30], 100 * c["frequency"], c["weight"])


def _resolve_accelerator(config: TrainConfig, torch: Any) -> tuple[str, str]:
    accelerator = config.accelerator
    has_gpu = torch.cuda.is_available()
    if accelerator == "gpu" and not has_gpu:
        raise LcmapInputError("--accelerator gpu: no CUDA GPU is available (use --accelerator cpu or auto)")
    on_gpu = accelerator == "gpu" or (accelerator == "auto" and has_gpu)
    precision = config.precision
    if precision != "32" and not on_gpu:
        log.warning("--precision %s is for GPUs only; training on the CPU in 32-bit", precision)
        precision = "32"
    if precision == "32":
        precision = "32-true"
    return ("gpu" if on_gpu else "cpu"), precision


def _callbacks(run_dir: Path, config: TrainConfig) -> tuple[list, Any]:
    from lightning.pytorch.callbacks import ModelCheckpoint, RichProgressBar

    from lcmap.pipeline.task import EpochSummary, SaveOnInterrupt

    ckpt_dir = run_dir / "checkpoints"
    # Two callbacks: Lightning 2.6 refreshes a monitored callback's ``save_last`` copy only when the
    # monitored score improves, so last.ckpt comes from an unmonitored one (saved every epoch, after
    # the best one so that it carries the updated best score).
    ckpt_cb = ModelCheckpoint(
        dirpath=str(ckpt_dir), filename="best", monitor="val_miou", mode="max", save_top_k=1,
        auto_insert_metric_name=False, enable_version_counter=False,
    )
    last_cb = ModelCheckpoint(
        dirpath=str(ckpt_dir), filename="last", monitor=None, save_top_k=1, every_n_epochs=1,
        auto_insert_metric_name=False, enable_version_counter=False,
    )
    callbacks: list = [ckpt_cb, last_cb, SaveOnInterrupt(ckpt_dir / "last.ckpt"),
                       EpochSummary(run_dir, config.epochs)]
    if config.progress_bar:
        callbacks.append(RichProgressBar(leave=True))
    return callbacks, ckpt_cb


def _loggers(run_dir: Path) -> list:
    from lightning.pytorch.loggers import CSVLogger

    loggers: list = [CSVLogger(save_dir=str(run_dir), name="logs", flush_logs_every_n_steps=50)]
    try:
        from lightning.pytorch.loggers import TensorBoardLogger

        import importlib.util

        if importlib.util.find_spec("tensorboard") or importlib.util.find_spec("tensorboardX"):
            loggers.append(TensorBoardLogger(save_dir=str(run_dir), name="logs", version=loggers[0].version,
                                             default_hp_metric=False))
    except ImportError:  # pragma: no cover
        pass
    return loggers


def _raise_if_oom(exc: BaseException, config: TrainConfig, patch_px: int, torch: Any) -> None:
    oom_types = tuple(t for t in (getattr(torch, "OutOfMemoryError", None),
                                  getattr(torch.cuda, "OutOfMemoryError", None)) if t is not None)
    text = str(exc)
    if (oom_types and isinstance(exc, oom_types)) or "out of memory" in text.lower() or isinstance(exc, MemoryError):
        half = max(1, config.batch_size // 2)
        where = "GPU" if "cuda" in text.lower() or (oom_types and isinstance(exc, oom_types)) else "memory"
        hint = (f"try --batch-size {half}" if config.batch_size > 1
                else f"try a smaller --patch-px (e.g. {max(32, (patch_px // 2) // 32 * 32)})")
        raise LcmapInputError(
            f"out of {where} with --batch-size {config.batch_size} and {patch_px} px patches "
            f"({config.model}): {hint}, or --precision bf16-mixed on a GPU"
        ) from exc


def _finish(run_dir: Path, is_zero: bool) -> None:
    if not is_zero:
        return
    try:
        rows = flatten_metrics(run_dir)
        plot_history(epoch_history(rows), run_dir / "loss.png")
    except Exception as exc:  # noqa: BLE001 - never lose a run over a plot
        log.warning("could not write metrics.csv/loss.png: %s", exc)


# ---------------------------------------------------------------------------- run records
def _float(value: str) -> float | None:
    try:
        v = float(value)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def flatten_metrics(run_dir: Path, write: bool = True) -> list[dict[str, str]]:
    """Merge ``logs/version_*/metrics.csv`` into ``RUN_DIR/metrics.csv``; return its rows.

    A resumed run logs into a new version; rows of an earlier version at or after the step where
    the next version starts (logged after the checkpoint that was resumed) are dropped.
    """
    versions = []
    for d in (run_dir / "logs").glob("version_*"):
        f = d / "metrics.csv"
        suffix = d.name.split("_", 1)[1]
        if f.is_file() and suffix.isdigit():
            versions.append((int(suffix), f))
    versions.sort()
    tables: list[list[dict[str, str]]] = []
    for _, f in versions:
        with open(f, newline="") as fh:
            tables.append(list(csv.DictReader(fh)))
    rows: list[dict[str, str]] = []
    columns: list[str] = []
    for i, table in enumerate(tables):
        later = [_float(r.get("step", "")) for t in tables[i + 1:] for r in t]
        later = [s for s in later if s is not None]
        cutoff = min(later) if later else math.inf
        for r in table:
            step = _float(r.get("step", ""))
            if step is not None and step >= cutoff:
                continue
            rows.append(r)
            for k in r:
                if k not in columns:
                    columns.append(k)
    if write:
        order = [c for c in ("epoch", "step") if c in columns] + sorted(c for c in columns if c not in ("epoch", "step"))
        tmp = run_dir / ".metrics.csv.tmp"
        with open(tmp, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=order, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(rows)
        os.replace(tmp, run_dir / "metrics.csv")
    return rows


def epoch_history(rows: list[dict[str, str]]) -> list[dict[str, Any]]:
    """Per-epoch values (epoch means of the training losses, validation scores) from metric rows."""
    by_epoch: dict[int, dict[str, Any]] = {}
    for r in rows:
        epoch = _float(r.get("epoch", ""))
        if epoch is None:
            continue
        entry = by_epoch.setdefault(int(epoch), {"epoch": int(epoch)})
        for key, value in r.items():
            v = _float(value)
            if v is None:
                continue
            if key.endswith("_epoch"):
                entry[key[: -len("_epoch")]] = v
            elif key in ("val_miou", "val_oa", "step"):
                entry[key] = v
    return [by_epoch[e] for e in sorted(by_epoch)]


def plot_history(history: list[dict[str, Any]], path: Path) -> None:
    """Loss curves (per epoch) and validation mIoU into a PNG (matplotlib Agg), atomically."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for key, label in (("loss", "total"), ("loss_ce", "CE head 1 (LR labels)"), ("loss_mce", "CE head 2 (PLAT mask)")):
        pts = [(h["epoch"] + 1, h[key]) for h in history if h.get(key) is not None]
        if pts:
            ax1.plot(*zip(*pts), marker="o", label=label)
    ax1.set_xlabel("epoch")
    ax1.set_ylabel("training loss (epoch mean)")
    ax1.grid(alpha=0.3)
    if ax1.lines:
        ax1.legend()
    for key, label in (("val_miou", "val mIoU"), ("val_oa", "val OA")):
        pts = [(h["epoch"] + 1, h[key]) for h in history if h.get(key) is not None]
        if pts:
            ax2.plot(*zip(*pts), marker="o", label=label)
    ax2.set_xlabel("epoch")
    ax2.set_ylabel("validation score (target classes)")
    ax2.set_ylim(0, 1)
    ax2.grid(alpha=0.3)
    if ax2.lines:
        ax2.legend()
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp")
    fig.savefig(tmp, format="png", dpi=90)
    plt.close(fig)
    os.replace(tmp, path)

"""``lcmap train``: train Paraformer (PLAT) or the U-Net baseline on LR labels over an AOI.

:func:`run_train` takes a :class:`~lcmap.pipeline.training.config.TrainConfig` (the options), writes RUN_DIR
(layout and readers in :mod:`lcmap.pipeline.runs`) and returns its path. Its steps, in order:

1. :func:`_prepare_config`: resume or refuse an existing run, check options, absolute paths;
   then the Lightning trainer (:func:`lcmap.pipeline.training.trainer.build_trainer`): it knows this process's
   rank, and only rank 0 of a DDP run creates RUN_DIR and writes into it (the other ranks run the
   same steps on the same inputs, and write nothing);
2. :func:`_open_inputs`: legend, imagery, labels (codes checked against the legend), AOI, reference;
3. :func:`_check_resumed_checkpoint` (``--resume`` only): the checkpoint fits the inputs;
4. :func:`_normalization`: per-band mean/std (kept from RUN_DIR when resuming);
5. :func:`_datamodule`: the data module, set up, with the AOI checked for one patch;
6. :func:`_class_weights`: CE class weights from sampled patches (kept from RUN_DIR when resuming);
7. :func:`_write_run_record`: config, legend, normalisation into RUN_DIR;
8. :func:`_task`: the Lightning module;
9. :func:`_fit`: training, with Ctrl-C, SIGTERM and out-of-memory turned into lcmap's errors.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np

from lcmap.errors import AOITooSmallError, LcmapInputError, TrainingInterrupted
from lcmap.geodata.io import check_not_an_input
from lcmap.geodata.stac_inputs import asset_choice
from lcmap.pipeline.folder_lock import hold_folder_lock
from lcmap.pipeline.runs import RunFolder
from lcmap.pipeline.training.config import RESUME_MAY_CHANGE, TrainConfig
from lcmap.pipeline.training.signals import sigterm_as_interrupt
from lcmap.pipeline.training.train_logging import lcmap_logging, lightning_logging

log = logging.getLogger("lcmap.train")

__all__ = ["TrainConfig", "run_train"]

_LIST_FIELDS = ("images", "labels", "reference")


@dataclass
class _Inputs:
    """The opened inputs of a run (rasters hold their file index, not pixels)."""

    legend: Any
    mixed: dict[int, list[str]]
    allowed: list[list[int]] | None
    imagery: Any
    labels: Any
    ref_labels: Any
    ref_legend: Any
    roi: Any
    aoi_name: str
    label_counts: dict[int, int]
    net_legend: Any = None  # the network's classes when they differ from the labels' (fused products)

    @property
    def in_channels(self) -> int:
        return int(self.imagery.count)


# ---------------------------------------------------------------------------------- training
def run_train(config: TrainConfig, config_file: str | Path | None = None) -> Path:
    """Train a model as ``config`` says (read from ``config_file``, if any, and flags); return RUN_DIR.

    Raises:
        LcmapInputError: bad options or inputs (legend vs label values, AOI, band counts, a resumed
            checkpoint that does not fit, out of GPU memory with a batch size to try).
        TrainingInterrupted: Ctrl-C or SIGTERM; ``checkpoints/last.ckpt`` holds the state to resume from
            (its step is in the message). A run that fails on bad input or stops before its first
            checkpoint leaves no folder it created behind (a folder that existed before is kept).
    """
    import lightning.pytorch as pl

    from lcmap.pipeline.training.label_prior import prior_training
    from lcmap.pipeline.training.label_products import label_product_flag
    from lcmap.pipeline.training.oom import raise_if_disk_full
    from lcmap.pipeline.training.trainer import build_trainer, log_devices

    one = config.label_products[0] if len(config.label_products) == 1 else None  # trained as --labels/--legend
    legend_flag = label_product_flag(one) if one is not None else "--legend"  # named when codes do not fit
    config, run = _prepare_config(config.single_product(), config_file)
    created: Path | None = None
    locked = contextlib.ExitStack()  # RUN_DIR's lock, as predict's (rank 0 holds it for the ranks)
    t_start = time.perf_counter()
    try:
        with sigterm_as_interrupt() as sigterm, lightning_logging():
            # First, before anything is written: the trainer knows this process's rank (DDP, module
            # lcmap.pipeline.training.trainer); only rank 0 creates RUN_DIR, locks it and writes into it.
            trainer, best_cb = build_trainer(run, config)
            is_zero = bool(trainer.is_global_zero)
            if is_zero:
                created = run.create()
                locked.enter_context(hold_folder_lock(run.path, f"run folder {run.path}", remove=True))
                if not config.resume:
                    _refuse_existing_run(run)  # a run that finished in the folder since the check
            with lcmap_logging(run.train_log, is_zero), asset_choice(config.stac_asset):
                pl.seed_everything(config.seed, workers=True, verbose=False)
                log.info("lcmap train -> %s%s", run.path, " (resuming)" if config.resume else "")
                log_devices(trainer, config)
                inputs = _open_inputs(config, legend_flag)
                prior = prior_training(config.label_loss, inputs.legend, config.prior_blur_m, inputs.imagery.res[0])
                if prior is not None:  # a prior loss: target classes; the compositions replace the mixed classes
                    inputs.net_legend, inputs.allowed, inputs.mixed = prior.net_legend, None, {}
                config = dataclasses.replace(config, mixed_classes=inputs.mixed)  # recorded: the mixed classes used
                if config.resume:
                    _check_resumed_checkpoint(run, config, inputs)
                stats = _normalization(run, config, inputs)
                datamodule = _datamodule(config, inputs, stats)
                weights, frequency = _class_weights(run, config, inputs, datamodule, is_zero)
                if is_zero:
                    _write_run_record(run, config, inputs.net_legend or inputs.legend, stats)
                    if prior is not None:
                        run.write_composition(prior.record)
                prior_args = prior.task_args if prior is not None else {}
                task = _task(config, inputs, stats, weights, prior_args | {"label_frequency": frequency})
                log.info("validation: %d window(s) of %d px", len(datamodule.val_windows), config.val_patch_px)
                sigterm["fitting"] = True
                _fit(trainer, task, datamodule, run, config, inputs.aoi_name, is_zero)
                best = best_cb.best_model_score
                log.info(
                    "done in %.0f s: %d steps; best val_miou %s -> %s; last -> %s",
                    time.perf_counter() - t_start,
                    trainer.global_step,
                    "n/a" if best is None else f"{float(best):.3f}",
                    run.best_ckpt,
                    run.last_ckpt,
                )
    except TrainingInterrupted:
        run.remove_created(created)
        raise
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM before training started
        run.remove_created(created)
        raise TrainingInterrupted(run.path, run.saved_step()) from None
    except LcmapInputError:
        run.remove_created(created)
        raise
    except Exception as exc:  # a full disk: one line; no folder left without a checkpoint
        raise_if_disk_full(exc, run, created)
        raise
    finally:
        locked.close()
    return run.path


def _prepare_config(config: TrainConfig, config_file: str | Path | None = None) -> tuple[TrainConfig, RunFolder]:
    """The options to train with (the saved ones when resuming), checked, with absolute paths;
    refused when RUN_DIR or a file written there is an input (``config_file``: the ``--config``)."""
    if not config.out:
        raise LcmapInputError("no RUN_DIR given (--out)")
    run = RunFolder(Path(config.out).expanduser().resolve())
    if config.resume:
        if not run.last_ckpt.is_file():
            raise LcmapInputError(f"--resume: {run.last_ckpt} does not exist; nothing to resume in {run.path}")
        config = _resume_config(config, run)
    else:
        _refuse_existing_run(run)
    config.check()
    written = [run.config_yaml, run.legend_yaml, run.normalization_json, run.class_weights_json, run.metrics_csv]
    written += [run.loss_png, run.train_log, run.last_ckpt, run.best_ckpt]
    outputs = {"--out": run.path, **{f"--out's {p.relative_to(run.path)}": p for p in written}}
    config_files = [str(config_file)] if config_file and not config.resume else []  # resume: the run's own
    check_not_an_input(outputs, [*config.input_files(), *config_files])
    return config.with_absolute_paths(), run


def _refuse_existing_run(run: RunFolder) -> None:
    if run.last_ckpt.exists():
        raise LcmapInputError(
            f"{run.path} already holds a training run ({run.last_ckpt}). Continue it with --resume, "
            "or choose another --out."
        )


def _resume_config(config: TrainConfig, run: RunFolder) -> TrainConfig:
    """The saved run's options, with the options given now that a resumed run may change."""
    if not run.config_yaml.is_file():
        raise LcmapInputError(
            f"--resume: {run.config_yaml} is missing; {run.path} is not a run folder of 'lcmap train'"
        )
    saved = run.read_config()
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


def _open_inputs(config: TrainConfig, legend_flag: str = "--legend") -> _Inputs:
    """Open the legend, imagery, labels, AOI and reference; check the label codes before any work."""
    import shapely

    from lcmap.geodata.aoi import resolve_aoi
    from lcmap.geodata.datasets import open_imagery, open_labels
    from lcmap.geodata.legends import get_legend
    from lcmap.pipeline.training.label_classes import allowed_classes_for, resolve_mixed_classes, scan_label_codes

    fused = bool(config.label_products)
    legend = get_legend(config.legend if not fused else "4class")
    mixed = {} if fused else resolve_mixed_classes(legend, config.mixed_classes, config.default_mixed)
    allowed = allowed_classes_for(legend, mixed)  # option errors before any work
    unknown_trust = sorted(set(config.label_trust) - set(legend.codes))
    if unknown_trust:
        raise LcmapInputError(f"label_trust names codes {unknown_trust} that legend {legend.name} does not have")
    imagery = open_imagery(config.images)
    bbox = (config.bbox[0], config.bbox[1], config.bbox[2], config.bbox[3]) if config.bbox else None
    aoi = resolve_aoi(config.aoi, bbox, config.bbox_crs)
    x, y, _ = imagery.bounds
    img_bounds = (float(x.start), float(y.start), float(x.stop), float(y.stop))
    roi = None
    used_bounds = img_bounds
    if aoi is not None:
        aoi.check_overlap(img_bounds, imagery.crs, "the imagery")
        roi = aoi.to_crs(imagery.crs)
        used = shapely.box(*img_bounds).intersection(roi)
        used_bounds = tuple(used.bounds) if not used.is_empty else img_bounds
    log.info(
        "imagery: %d file(s), %d bands, %s, %.2f m pixels",
        len(imagery.files), int(imagery.count), imagery.crs.to_string(), imagery.res[0],
    )  # fmt: skip
    net_legend = None
    if fused:
        from lcmap.pipeline.training.label_products import open_label_products

        products = open_label_products(config.label_products, config.label_fusion, used_bounds, imagery.crs)
        labels, legend, allowed = products.labels, products.label_legend, products.allowed
        label_counts, net_legend = products.label_counts, products.net_legend
    else:
        labels = open_labels(config.labels, legend)
        log.info("labels: %d file(s), legend %s (%d classes)", len(labels.files), legend.name, len(legend))
        label_counts = scan_label_codes(labels, used_bounds, imagery.crs, option=legend_flag)
    if not label_counts:
        raise LcmapInputError(
            "the label files hold no class (only nodata) over the imagery and AOI: check --labels and the AOI"
        )
    if roi is not None and aoi is not None:
        log.info("AOI: %s, %.0f m2 in %s", aoi.source, roi.area, imagery.crs.to_string())
    ref_legend = ref_labels = None
    if config.reference:
        if not config.reference_legend:
            raise LcmapInputError("--reference needs --reference-legend (the legend of the reference's codes)")
        ref_legend = get_legend(config.reference_legend)
        ref_labels = open_labels(config.reference, ref_legend, what="reference")
        scan_label_codes(ref_labels, used_bounds, imagery.crs, option="--reference-legend")
        log.info(
            "validation: mIoU over target classes vs the reference (%d file(s), legend %s)",
            len(ref_labels.files), ref_legend.name,
        )  # fmt: skip
    else:
        log.info("validation: no reference given; mIoU over target classes vs the LR labels (agreement)")
    return _Inputs(
        legend=legend,
        mixed=mixed,
        allowed=allowed,
        imagery=imagery,
        labels=labels,
        ref_labels=ref_labels,
        ref_legend=ref_legend,
        roi=roi,
        aoi_name=f"the AOI ({aoi.source})" if aoi is not None else "the imagery",
        label_counts=label_counts,
        net_legend=net_legend,
    )


def _check_resumed_checkpoint(run: RunFolder, config: TrainConfig, inputs: _Inputs) -> None:
    """Raise LcmapInputError unless ``last.ckpt`` was trained on the same bands, model and legend."""
    from lcmap.pipeline.runs import read_checkpoint

    hp = read_checkpoint(run.last_ckpt)["hyper_parameters"]
    if int(hp["in_channels"]) != inputs.in_channels:
        raise LcmapInputError(
            f"--resume: {run.last_ckpt} was trained on {hp['in_channels']}-band imagery but the imagery "
            f"has {inputs.in_channels} bands"
        )
    if hp["model_name"] != config.model:
        raise LcmapInputError(f"--resume: {run.last_ckpt} holds a {hp['model_name']} model, not {config.model}")
    legend = inputs.net_legend or inputs.legend
    if [c["code"] for c in hp["legend"]["classes"]] != legend.codes:
        raise LcmapInputError(f"--resume: {run.last_ckpt} was trained with another legend than {legend.name}")


def _normalization(run: RunFolder, config: TrainConfig, inputs: _Inputs) -> Any:
    """Per-band mean/std of the imagery (:class:`~lcmap.geodata.normalization.BandStats`)."""
    from lcmap.geodata.normalization import compute_band_stats

    stats = run.read_normalization() if config.resume else None
    if stats is None:
        stats = compute_band_stats(inputs.imagery)
    if len(stats.mean) != inputs.in_channels:
        raise LcmapInputError(
            f"{run.normalization_json} has {len(stats.mean)} bands but the imagery has {inputs.in_channels}"
        )
    log.info("band mean %s, std %s", [round(v, 2) for v in stats.mean], [round(v, 2) for v in stats.std])
    return stats


def _datamodule(config: TrainConfig, inputs: _Inputs, stats: Any) -> Any:
    """The data module, set up; raises when the AOI cannot hold one patch or one validation window."""
    from lcmap.pipeline.training.datamodule import LandCoverDataModule, check_patches_fit

    datamodule = LandCoverDataModule(
        inputs.imagery,
        inputs.labels,
        inputs.roi,
        patch_px=config.resolved_patch_px,
        batch_size=config.batch_size,
        steps_per_epoch=config.steps_per_epoch,
        mean=stats.mean,
        std=stats.std,
        val_labels=inputs.ref_labels,
        val_patch_px=config.val_patch_px,
        augment=config.augment,
        num_workers=config.num_workers,
        seed=config.seed,
        nodata=inputs.imagery.nodata,
    )
    datamodule.setup("fit")
    check_patches_fit(datamodule.datasets()[0], inputs.roi, config.resolved_patch_px, inputs.aoi_name)
    if not datamodule.val_windows:
        raise LcmapInputError(f"no {config.val_patch_px} px validation window touches {inputs.aoi_name}")
    return datamodule


def _class_weights(
    run: RunFolder, config: TrainConfig, inputs: _Inputs, datamodule: Any, is_zero: bool
) -> tuple[list[float] | None, list[float] | None]:
    """CE class weights (None: unweighted), from patches drawn like training ones; saved to RUN_DIR;
    and the frequency of each LR class in those patches (None with fused label products), which the
    checkpoint records for ``lcmap predict --label-prior``."""
    from lcmap.pipeline.training.class_weights import class_weights_record, log_class_table
    from lcmap.pipeline.training.datamodule import sample_label_counts

    record = run.read_class_weights() if config.resume else None
    if record is None:
        legend, patch_px = inputs.legend, config.resolved_patch_px
        n_patches = int(min(512, max(64, config.steps_per_epoch * config.batch_size)))
        counts = sample_label_counts(
            datamodule.datasets()[0], inputs.roi, patch_px, n_patches, len(legend), seed=config.seed + 17,
            num_workers=config.num_workers,
        )  # fmt: skip
        if counts.sum() == 0:
            raise LcmapInputError(
                f"no labelled pixel in {n_patches} patches drawn inside {inputs.aoi_name}: the labels are nodata there"
            )
        occurs = np.array([inputs.label_counts.get(i, 0) > 0 for i in range(len(legend))])
        record = class_weights_record(
            legend, counts, occurs, config.class_weighting, config.label_trust, n_patches, patch_px
        )
        if is_zero:
            run.write_class_weights(record)
    if is_zero:
        log_class_table(record)
    frequency = None if config.label_products else [float(c["frequency"]) for c in record["classes"]]
    return record.get("weights"), frequency


def _write_run_record(run: RunFolder, config: TrainConfig, legend: Any, stats: Any) -> None:
    run.write_config(config)
    run.write_legend(legend)
    run.write_normalization(stats)


def _task(config: TrainConfig, inputs: _Inputs, stats: Any, weights: list[float] | None, prior_args: dict) -> Any:
    """The Lightning module (builds the network: consumes the seeded torch RNG); ``prior_args``: the
    prior losses' arguments (:class:`~lcmap.pipeline.training.label_prior.PriorTraining`)."""
    from lcmap.pipeline.training.task import LandCoverTask

    legend = inputs.net_legend or inputs.legend  # the network's classes
    if config.model.startswith("paraformer"):
        if config.vit_weights:
            log.info("ViT weights: %s", config.vit_weights)
        else:
            log.info("no --vit-weights: training ViT from scratch")
    if inputs.allowed is not None:
        for code in sorted(config.mixed_classes):
            accepted = inputs.allowed[legend.codes.index(code)]
            log.info(
                "mixed LR class %d: trained as one of %s (partial-label CE)",
                code, ", ".join(legend.classes[k].name for k in accepted),
            )  # fmt: skip
    task = LandCoverTask(
        allowed_classes=inputs.allowed,
        model_name=config.model,
        in_channels=inputs.in_channels,
        legend=legend.to_dict(),
        norm_mean=list(stats.mean),
        norm_std=list(stats.std),
        imagery_range=stats.range_record(),
        class_weights=weights,
        lr=config.resolved_lr,
        optimizer=config.optimizer,
        weight_decay=config.weight_decay,
        vit_weights=config.vit_weights,
        val_legend=inputs.ref_legend.to_dict() if inputs.ref_legend is not None else None,
        val_source="reference" if inputs.ref_legend is not None else "labels",
        config=config.to_dict(),
        val_tta=config.val_tta,
        **({"label_loss": config.label_loss} | prior_args),
    )
    n_params = sum(p.numel() for p in task.model.parameters())
    log.info(
        "model %s: %.2f M parameters; %d epochs x %d steps x %d patches of %d px; %s lr %.3g",
        config.model, n_params / 1e6, config.epochs, config.steps_per_epoch, config.batch_size,
        config.resolved_patch_px, config.optimizer, config.resolved_lr,
    )  # fmt: skip
    return task


def _fit(trainer: Any, task: Any, datamodule: Any, run: RunFolder, config: TrainConfig, aoi_name: str,
         is_zero: bool) -> None:  # fmt: skip
    """``trainer.fit``; Ctrl-C -> TrainingInterrupted, out of memory -> LcmapInputError naming the options."""
    from lcmap.pipeline.training.oom import raise_if_out_of_memory

    patch_px = config.resolved_patch_px
    try:
        trainer.fit(
            task, datamodule=datamodule, ckpt_path=str(run.last_ckpt) if config.resume else None, weights_only=True
        )
    except SystemExit:
        # Lightning turns Ctrl-C into SystemExit(1) after its graceful shutdown (on_exception hooks ran),
        # and SIGTERM into SIGTERMException (a SystemExit) at the next batch boundary.
        if trainer.interrupted:
            raise _interrupted(trainer, run, is_zero) from None
        raise
    except KeyboardInterrupt:
        raise _interrupted(trainer, run, is_zero) from None
    except Exception as exc:  # noqa: BLE001 - translate the out-of-memory family
        raise_if_out_of_memory(exc, config, patch_px)
        if isinstance(exc, AOITooSmallError):
            raise AOITooSmallError(f"{aoi_name} is too small or thin to draw {patch_px} px patches from") from exc
        raise
    if trainer.interrupted:  # graceful stop without SystemExit
        raise _interrupted(trainer, run, is_zero)
    _finish(run, is_zero)


def _interrupted(trainer: Any, run: RunFolder, is_zero: bool) -> TrainingInterrupted:
    """TrainingInterrupted naming the step ``last.ckpt`` actually holds (saved now, else the previous one)."""
    from lcmap.pipeline.training.callbacks import SaveOnInterrupt

    _finish(run, is_zero)
    saver = next((cb for cb in trainer.callbacks if isinstance(cb, SaveOnInterrupt)), None)
    step = saver.saved_step if saver is not None and saver.saved_step is not None else run.saved_step()
    log.info("interrupted at step %d; last.ckpt holds step %s", trainer.global_step, step)
    return TrainingInterrupted(run.path, step)


def _finish(run: RunFolder, is_zero: bool) -> None:
    if is_zero:
        run.write_metrics_and_plot()

"""The Lightning ``Trainer`` of ``lcmap train``: device, precision, processes, callbacks, loggers.

One process trains on one device. More (``--devices N`` on a machine, ``--num-nodes M`` machines)
train with DDP: one process per device, gradients averaged every step (NCCL on GPUs, gloo on CPUs).

Strategy: Lightning's ``ddp`` (``start_method="popen"``). The process the user started is rank 0;
Lightning starts the other ranks of a machine when ``fit`` begins by running the same command line
again (``python -m lcmap.cli ...``, the ``lcmap`` script, or a script calling :func:`run_train`)
with ``LOCAL_RANK``/``NODE_RANK``/``WORLD_SIZE``/``MASTER_ADDR``/``MASTER_PORT`` set. That is also
how ``torchrun`` and SLURM's ``srun`` start every rank themselves (Lightning then starts none), so
every launch runs one code path: each rank opens and checks the same inputs, and only rank 0
writes RUN_DIR. ``ddp_spawn`` was not chosen: it pickles the module, datamodule and callbacks into
fresh processes where rank 0 is not the user's process (no ``train.log`` handler, no Ctrl-C or
SIGTERM handling of its own), and it writes a temporary checkpoint into RUN_DIR to hand the
weights back.

The trainer is built before anything is written: :func:`build_trainer` gives the rank Lightning
computed for this process (from the variables above, SLURM's or torchrun's), and only rank 0
creates RUN_DIR and writes ``train.log``, the run record, logs, metrics and checkpoints.
"""

from __future__ import annotations

import importlib.util
import logging
import sys
from typing import Any, cast

from lcmap.errors import LcmapInputError
from lcmap.pipeline.runs import RunFolder
from lcmap.pipeline.training.config import TrainConfig

log = logging.getLogger("lcmap.train")

__all__ = ["build_trainer", "log_devices", "processes_per_node", "resolve_accelerator", "show_progress_bar"]


def build_trainer(run: RunFolder, config: TrainConfig) -> tuple[Any, Any]:
    """The Lightning trainer and its best-checkpoint callback; nothing is written yet.

    ``trainer.global_rank`` / ``trainer.is_global_zero`` hold this process's rank from here on.

    Raises:
        LcmapInputError: devices Lightning cannot provide (``--devices 4`` on a 2-GPU machine, DDP in a
            notebook), named with the options to change.
    """
    import lightning.pytorch as pl
    from lightning.fabric.utilities.exceptions import MisconfigurationException

    from lcmap.pipeline.training.callbacks import AtomicCheckpointIO

    accelerator, precision = resolve_accelerator(config)
    callbacks, best_cb = _callbacks(run, config)
    try:
        trainer = pl.Trainer(
            accelerator=accelerator,
            devices=config.devices,
            num_nodes=config.num_nodes,
            strategy=_strategy(config, accelerator),
            precision=cast(Any, precision),  # one of PRECISIONS, checked by TrainConfig
            max_epochs=config.epochs,
            logger=_loggers(run),
            callbacks=callbacks,
            plugins=[AtomicCheckpointIO()],
            use_distributed_sampler=False,  # the datamodule gives each rank its own patches and windows
            reload_dataloaders_every_n_epochs=1,
            num_sanity_val_steps=0,
            log_every_n_steps=max(1, min(10, config.steps_per_epoch // 3)),
            default_root_dir=str(run.path),
            enable_progress_bar=show_progress_bar(config),
            enable_model_summary=False,
            deterministic=False,
        )
    except MisconfigurationException as exc:
        raise LcmapInputError(
            f"--devices {config.devices} --num-nodes {config.num_nodes} --accelerator {config.accelerator}: {exc}"
        ) from None
    return trainer, best_cb


def log_devices(trainer: Any, config: TrainConfig) -> None:
    """What the trainer runs on: device and precision, and the processes of a DDP run."""
    if config.precision != "32" and trainer.precision == "32-true":
        log.warning("--precision %s is for GPUs only; training on the CPU in 32-bit", config.precision)
    world = int(trainer.world_size)
    strategy = trainer.strategy
    if world > 1:
        log.info(
            "DDP: %d processes (%d node(s) x %d %s device(s)), %s backend; each step averages %d batches; %s",
            world, trainer.num_nodes, world // max(1, trainer.num_nodes), strategy.root_device.type,
            getattr(strategy, "_process_group_backend", None) or "nccl", world, trainer.precision,
        )  # fmt: skip
    else:
        log.info("device: %s, %s", strategy.root_device, trainer.precision)


def processes_per_node(config: TrainConfig, accelerator: str) -> int:
    """Training processes on this machine: ``--devices`` (auto: every GPU, or one CPU process)."""
    if config.devices != "auto":
        return int(config.devices)
    if accelerator == "gpu":
        import torch

        return max(1, torch.cuda.device_count())
    return 1


def _strategy(config: TrainConfig, accelerator: str) -> Any:
    """``auto`` (one device) for one process in all; else DDP started by re-running the command (module docs)."""
    if processes_per_node(config, accelerator) * config.num_nodes <= 1:
        return "auto"
    from lightning.pytorch.strategies import DDPStrategy

    # gloo: the collective backend that runs on CPUs; on GPUs Lightning's default (NCCL)
    return DDPStrategy(start_method="popen", process_group_backend="gloo" if accelerator == "cpu" else None)


def resolve_accelerator(config: TrainConfig) -> tuple[str, str]:
    """(``cpu`` or ``gpu``, Lightning's precision name); a GPU asked for but missing is an input error."""
    import torch

    accelerator = config.accelerator
    has_gpu = torch.cuda.is_available()
    if accelerator == "gpu" and not has_gpu:
        raise LcmapInputError("--accelerator gpu: no CUDA GPU is available (use --accelerator cpu or auto)")
    on_gpu = accelerator == "gpu" or (accelerator == "auto" and has_gpu)
    precision = config.precision
    if precision != "32" and not on_gpu:  # said by log_devices, once RUN_DIR/train.log is open
        precision = "32"
    if precision == "32":
        precision = "32-true"
    return ("gpu" if on_gpu else "cpu"), precision


def show_progress_bar(config: TrainConfig) -> bool:
    """The progress bar redraws in place: only on a terminal (else EpochSummary's one line per epoch)."""
    return bool(config.progress_bar) and sys.stdout.isatty()


def _callbacks(run: RunFolder, config: TrainConfig) -> tuple[list, Any]:
    from lightning.pytorch.callbacks import ModelCheckpoint, RichProgressBar

    from lcmap.pipeline.training.callbacks import EpochSummary, PatchThroughput, SaveOnInterrupt, SigtermOnAllRanks

    # Two callbacks: Lightning 2.6 refreshes a monitored callback's ``save_last`` copy only when the
    # monitored score improves, so last.ckpt comes from an unmonitored one (saved every epoch, after
    # the best one so that it carries the updated best score).
    ckpt_cb = ModelCheckpoint(
        dirpath=str(run.checkpoints), filename="best", monitor="val_miou", mode="max", save_top_k=1,
        auto_insert_metric_name=False, enable_version_counter=False,
    )  # fmt: skip
    last_cb = ModelCheckpoint(
        dirpath=str(run.checkpoints), filename="last", monitor=None, save_top_k=1, every_n_epochs=1,
        auto_insert_metric_name=False, enable_version_counter=False,
    )  # fmt: skip
    callbacks: list = [
        ckpt_cb,
        last_cb,
        SaveOnInterrupt(run.last_ckpt),
        SigtermOnAllRanks(),
        PatchThroughput(),
        EpochSummary(run.path, config.epochs),
    ]
    if show_progress_bar(config):
        callbacks.append(RichProgressBar(leave=True))
    return callbacks, ckpt_cb


def _loggers(run: RunFolder) -> list:
    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

    loggers: list = [CSVLogger(save_dir=str(run.path), name="logs", flush_logs_every_n_steps=50)]
    if importlib.util.find_spec("tensorboard") or importlib.util.find_spec("tensorboardX"):
        loggers.append(
            TensorBoardLogger(save_dir=str(run.path), name="logs", version=loggers[0].version, default_hp_metric=False)
        )
    return loggers

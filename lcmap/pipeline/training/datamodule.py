"""Training and validation data for ``lcmap train`` (TorchGeo conventions).

- Training: random ``patch_px`` windows whose centre lies inside the AOI
  (:func:`lcmap.compat.random_patch_sampler`) from a :class:`~lcmap.geodata.datasets.
  LabelledImagery` (imagery & LR labels), collated by :func:`torchgeo.datasets.stack_samples`.
  ``steps_per_epoch * batch_size`` patches per epoch, drawn afresh every epoch.
- Validation: a fixed grid of ``val_patch_px`` windows that touch the AOI, from imagery paired with
  the HR reference (or with the LR labels when there is no reference).
- On the device (``on_after_batch_transfer``): random flips and 90-degree rotations (training
  only, image and mask together), then per-band normalisation ``(x - mean) / std``.

Distributed training: TorchGeo samplers are not distributed-aware, so each rank draws its own
``ceil(patches / world_size)`` patches with a seed derived from (seed, epoch, rank), and takes every
``world_size``-th validation window (the task sums the confusion matrices over ranks: each window counts
once).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
import numpy as np
import shapely
import torch
from torch import Tensor
from torch.utils.data import DataLoader
from torchgeo.datasets import GeoDataset, stack_samples

from lcmap.compat import HAS_PATCH_SAMPLERS, grid_patch_sampler, query_bounds, random_patch_sampler
from lcmap.errors import LcmapInputError
from lcmap.geodata.datasets import imagery_valid
from lcmap.geodata.legends import IGNORE_INDEX

__all__ = [
    "LandCoverDataModule",
    "check_patches_fit",
    "dihedral_augment",
    "make_random_sampler",
    "sample_label_counts",
    "validation_windows",
]


def _seed(*parts: int) -> int:
    """A well-mixed 31-bit seed from several integers."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0] & 0x7FFFFFFF)


def make_random_sampler(dataset: GeoDataset, patch_px: int, length: int, roi: shapely.Geometry | None, seed: int):
    """:func:`lcmap.compat.random_patch_sampler` without its side effect on the global torch RNG."""
    state = torch.random.get_rng_state()
    try:
        return random_patch_sampler(dataset, patch_px, length, roi=roi, seed=seed)
    finally:
        torch.random.set_rng_state(state)


def _footprints(dataset: GeoDataset, roi: shapely.Geometry | None) -> list[shapely.Geometry]:
    """Geometries of the dataset's index entries, clipped to ``roi`` (as the samplers do)."""
    geoms = list(dataset.index.geometry)
    if roi is None:
        return geoms
    return [g.intersection(roi) for g in geoms if g.intersects(roi)]


def check_patches_fit(
    dataset: GeoDataset, roi: shapely.Geometry | None, patch_px: int, aoi_source: str = "the AOI"
) -> None:
    """Raise a clear error unless at least one ``patch_px`` window can be drawn inside ``roi``.

    A window must lie inside one file's footprint clipped to the AOI's bounding box, with its
    centre inside the AOI (TorchGeo 0.8), or inside the AOI eroded by half a patch diagonal
    (TorchGeo 0.10).

    Raises:
        LcmapInputError: the AOI misses the data, or is too small for one patch.
    """
    res_x, res_y = dataset.res[0], dataset.res[1]
    size_x, size_y = patch_px * res_x, patch_px * res_y
    foot = _footprints(dataset, roi)
    if not foot or all(g.is_empty or g.area == 0 for g in foot):
        raise LcmapInputError(
            f"{aoi_source} misses the data: no imagery file with labels overlaps it. Check the AOI "
            "(and --bbox-crs) against the imagery's extent."
        )
    fits = False
    for g in foot:
        xmin, ymin, xmax, ymax = g.bounds
        if xmax - xmin < size_x or ymax - ymin < size_y:
            continue
        centres = shapely.box(xmin + size_x / 2, ymin + size_y / 2, xmax - size_x / 2, ymax - size_y / 2)
        if xmax - xmin == size_x or ymax - ymin == size_y:  # a degenerate box (a line or a point)
            centres = shapely.box(*centres.bounds).buffer(1e-9 * max(size_x, 1))
        allowed = roi if roi is not None else g
        if HAS_PATCH_SAMPLERS and roi is not None:
            allowed = roi.buffer(-math.hypot(size_x, size_y) / 2)
        if not centres.intersection(allowed).is_empty:
            fits = True
            break
    if not fits:
        extent = max(foot, key=lambda g: g.area).bounds
        raise LcmapInputError(
            f"{aoi_source} is too small for one {patch_px} px patch ({size_x:g} x {size_y:g} CRS units): "
            f"its largest part over the data spans {extent[2] - extent[0]:.1f} x {extent[3] - extent[1]:.1f}. "
            "Use a larger AOI or a smaller --patch-px (a multiple of 32)."
        )


def validation_windows(dataset: GeoDataset, size_px: int, roi: shapely.Geometry | None) -> list[tuple]:
    """A fixed grid of ``size_px`` windows (stride = size) over the data, keeping those that touch ``roi``."""
    windows = []
    for query in grid_patch_sampler(dataset, size_px, size_px, roi=roi):
        if roi is not None:
            box = shapely.box(*query_bounds(query))
            if box.intersection(roi).area <= 0:
                continue
        windows.append(query)
    return windows


def sample_label_counts(
    dataset: GeoDataset,
    roi: shapely.Geometry | None,
    patch_px: int,
    n_patches: int,
    num_classes: int,
    seed: int,
    batch_size: int = 16,
    num_workers: int = 0,
) -> np.ndarray:
    """Pixels per label class (legend index) over ``n_patches`` random training patches."""
    sampler = make_random_sampler(dataset, patch_px, n_patches, roi, seed)
    loader = DataLoader(
        dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers, collate_fn=stack_samples
    )
    counts = np.zeros(num_classes, dtype=np.int64)
    state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        for batch in loader:
            mask = batch["mask"].numpy().ravel()
            mask = mask[mask != IGNORE_INDEX]
            counts += np.bincount(mask, minlength=num_classes)[:num_classes]
    finally:
        torch.random.set_rng_state(state)
    return counts


def dihedral_augment(image: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """Apply one random element of the dihedral group (flip x rotations by 90 degrees) per sample.

    Args:
        image: ``(B, C, H, W)`` with ``H == W``.
        mask: ``(B, H, W)``.

    Uses the global torch RNG (seeded by ``lightning.seed_everything``).
    """
    b = image.shape[0]
    choice = torch.randint(0, 8, (b,)).tolist()
    images, masks = [], []
    for i, c in enumerate(choice):
        x, y = image[i], mask[i]
        if c >= 4:
            x, y = x.flip(-1), y.flip(-1)
        k = c % 4
        if k:
            x, y = torch.rot90(x, k, (-2, -1)), torch.rot90(y, k, (-2, -1))
        images.append(x)
        masks.append(y)
    return torch.stack(images), torch.stack(masks)


class LandCoverDataModule(pl.LightningDataModule):
    """Random training patches and a fixed validation grid from geo-datasets (see module docs).

    The rasters come opened (their file index); :meth:`setup` pairs them into the training and
    validation datasets (:class:`~lcmap.geodata.datasets.LabelledImagery`) and lays out the
    validation windows, once (Lightning calls it again in ``fit``; ``lcmap train`` calls it first
    to check the AOI and count label pixels for the class weights).

    Args:
        imagery: the HR imagery (:class:`~lcmap.geodata.datasets.HRImagery`).
        labels: the LR labels (:class:`~lcmap.geodata.datasets.LabelRaster`).
        roi: the AOI in the imagery CRS (None: the whole data).
        patch_px: training patch side (px).
        batch_size: patches per step (per device).
        steps_per_epoch: optimiser steps per epoch (all devices together: each of ``n`` devices
            draws ``ceil(steps_per_epoch * batch_size / n)`` patches).
        mean, std: per-band normalisation (imagery units).
        val_labels: the validation labels (the HR reference), or None to validate on ``labels``.
        val_patch_px: validation window side (px).
        val_batch_size: windows per validation step.
        augment: random flips and 90-degree rotations during training.
        num_workers: DataLoader workers.
        seed: base seed of the patch samplers.
        nodata: the imagery's nodata value: pixels where every band equals it (outside the
            imagery, gaps between files) are set to the band mean (0 after normalisation), as
            ``lcmap predict`` does; None leaves them as they are.
    """

    def __init__(
        self,
        imagery: Any,
        labels: Any,
        roi: shapely.Geometry | None,
        patch_px: int,
        batch_size: int,
        steps_per_epoch: int,
        mean: Sequence[float],
        std: Sequence[float],
        val_labels: Any = None,
        val_patch_px: int = 256,
        val_batch_size: int = 2,
        augment: bool = True,
        num_workers: int = 0,
        seed: int = 1234,
        nodata: float | None = None,
    ) -> None:
        super().__init__()
        self.nodata = nodata
        self.imagery = imagery
        self.labels = labels
        self.val_labels = val_labels
        self.train_dataset: GeoDataset | None = None
        self.val_dataset: GeoDataset | None = None
        self.roi = roi
        self.patch_px = patch_px
        self.batch_size = batch_size
        self.steps_per_epoch = steps_per_epoch
        self.mean = torch.tensor(list(mean), dtype=torch.float32).view(1, -1, 1, 1)
        self.std = torch.tensor(list(std), dtype=torch.float32).view(1, -1, 1, 1)
        self.val_patch_px = val_patch_px
        self.val_batch_size = val_batch_size
        self.augment = augment
        self.num_workers = num_workers
        self.seed = seed
        self.val_windows: list[tuple] = []
        self._val_unscored = False  # this rank validates a window another rank scores (see val_dataloader)

    def setup(self, stage: str | None = None) -> None:
        """Pair imagery and labels (training, validation) and lay out the validation windows (once)."""
        if self.train_dataset is not None:
            return
        from lcmap.geodata.datasets import LabelledImagery

        self.train_dataset = LabelledImagery(self.imagery, self.labels, aoi=self.roi)
        if self.val_labels is None:
            self.val_dataset = self.train_dataset
        else:
            self.val_dataset = LabelledImagery(self.imagery, self.val_labels, aoi=self.roi)
        self.val_windows = validation_windows(self.val_dataset, self.val_patch_px, self.roi)

    # ------------------------------------------------------------------------ helpers
    def _rank_world(self) -> tuple[int, int]:
        trainer = self.trainer
        if trainer is None:
            return 0, 1
        return int(trainer.global_rank), int(trainer.world_size)

    def _loader(self, dataset: GeoDataset, sampler: Any, batch_size: int) -> DataLoader:
        on_gpu = self.trainer is not None and self.trainer.accelerator.__class__.__name__ == "CUDAAccelerator"
        return DataLoader(
            dataset,
            batch_size=batch_size,
            sampler=sampler,
            num_workers=self.num_workers,
            collate_fn=stack_samples,
            pin_memory=on_gpu,
            persistent_workers=False,
        )

    def datasets(self) -> tuple[GeoDataset, GeoDataset]:
        """The training and validation datasets (after :meth:`setup`)."""
        if self.train_dataset is None or self.val_dataset is None:
            raise RuntimeError("LandCoverDataModule.setup() has not run yet")
        return self.train_dataset, self.val_dataset

    # -------------------------------------------------------------------- dataloaders
    def train_dataloader(self) -> DataLoader:
        train_dataset = self.datasets()[0]
        rank, world = self._rank_world()
        epoch = int(self.trainer.current_epoch) if self.trainer is not None else 0
        length = math.ceil(self.steps_per_epoch * self.batch_size / world)
        sampler = make_random_sampler(
            train_dataset, self.patch_px, length, self.roi, seed=_seed(self.seed, epoch, rank)
        )
        return self._loader(train_dataset, sampler, self.batch_size)

    def val_dataloader(self) -> DataLoader:
        rank, world = self._rank_world()
        windows = self.val_windows
        if not windows:
            raise LcmapInputError("no validation window touches the AOI")
        shard = windows[rank::world]  # every window on exactly one rank: summed, each counts once
        # Shards may differ by one window (the confusion matrices are summed once, at the epoch's
        # end), but every rank must validate: one left without a window validates the first one
        # unscored (its masks ignored in on_after_batch_transfer).
        self._val_unscored = not shard
        return self._loader(self.datasets()[1], shard or windows[:1], self.val_batch_size)

    # ------------------------------------------------------------- on-device transforms
    def on_after_batch_transfer(self, batch: dict[str, Any], dataloader_idx: int) -> dict[str, Any]:
        image = batch["image"].float()
        mask = batch["mask"].long()
        trainer = self.trainer
        if self.augment and trainer is not None and trainer.training:
            image, mask = dihedral_augment(image, mask)
        if self._val_unscored and trainer is not None and not trainer.training:
            mask = torch.full_like(mask, IGNORE_INDEX)
        valid = imagery_valid(image, self.nodata).unsqueeze(1) if self.nodata is not None else None
        image = (image - self.mean.to(image.device)) / self.std.to(image.device)
        if valid is not None:
            image = torch.where(valid, image, torch.zeros((), dtype=image.dtype, device=image.device))
            return {"image": image, "mask": mask, "valid": valid[:, 0]}
        return {"image": image, "mask": mask}

"""Block inference: the model and imagery of a worker process, and the class codes of one block.

A block task (:func:`predict_block`) lists the global windows that touch its block, reads their
imagery itself, one strip of ``tile`` rows at a time (its halo included; the next strip is read
in a background thread while the model runs), feeds pixels outside the imagery's valid area as
the band mean, runs the model in batches of ``batch_size`` windows and blends the probabilities
(:class:`lcmap.pipeline.tiling.BlockBlender`). With ``--legend target`` a target class's
probability is the sum of its LR classes' (e.g. NLCD 52 + 71 + 81 + 82 + ... for low
vegetation), so the map holds the most probable *target* class. Every pixel sums the same
windows in the same global order whatever the block size or the schedule, and batches are
always padded to ``batch_size``, so the map is bit-identical for any block size and scheduler.

The model is loaded once per worker process (:func:`worker_state`: the per-process cache keyed
by checkpoint, device and imagery), never shipped inside tasks; :class:`PredictJob` (small) is
all a task receives besides its :class:`~lcmap.pipeline.tiling.Block`.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import cast

import numpy as np
import shapely
import torch
from rasterio.transform import from_origin

from lcmap.geodata.aoi import rasterize_aoi
from lcmap.geodata.datasets import HRImagery, open_imagery, read_imagery
from lcmap.geodata.legends import MAP_NODATA
from lcmap.models import predict_proba, sum_probabilities
from lcmap.models.tta import predict_proba_tta
from lcmap.pipeline.runs import TrainedModel, load_trained_model
from lcmap.pipeline.tiling import (
    CONFIDENCE_NODATA,
    Block,
    BlockBlender,
    OutputGrid,
    WindowGrid,
    cut_blocks,
    window_from_strip,
)

__all__ = ["PredictJob", "WorkerState", "worker_state", "predict_block"]


@dataclass(frozen=True)
class PredictJob:
    """Everything a worker needs for any block (small: broadcast once to every worker)."""

    checkpoint: str
    image_files: tuple[str, ...]
    device: str
    torch_threads: int | None
    grid: OutputGrid
    windows: WindowGrid
    block_size: int
    batch_size: int
    code_lut: tuple[int, ...]
    dtype: str
    #: model output channel -> map channel whose probability it adds to (``--legend target``: the
    #: channel of its target class); None keeps the model's channels (``--legend native``).
    class_group: tuple[int, ...] | None
    confidence: bool
    aoi_wkb: bytes | None
    blocks_dir: str
    cache_key: str = ""
    #: test-time augmentation (:data:`lcmap.models.tta.TTA_MODES`): each window's probabilities
    #: are averaged over these transforms before the taper and the blending
    tta: str = "none"

    def blocks(self) -> list[Block]:
        """The map's blocks (:func:`lcmap.pipeline.tiling.cut_blocks`)."""
        return cut_blocks(self.grid.height, self.grid.width, self.block_size)


# -------------------------------------------------------- per-worker model cache (one place)
@dataclass
class WorkerState:
    """What a worker process keeps between tasks: the model on its device, the normalisation,
    the opened imagery and the AOI (prepared for fast tests)."""

    model: torch.nn.Module
    device: torch.device
    mean: np.ndarray  # (C, 1, 1) float32
    std: np.ndarray
    imagery: HRImagery
    aoi: shapely.Geometry | None = None
    aoi_key: bytes | None = None


_STATE: dict[tuple, WorkerState] = {}
_STATE_LOCK = threading.Lock()


def _worker_device(device: str) -> torch.device:
    if device == "cuda" and torch.cuda.device_count() > 1:
        try:  # one GPU per worker of a LocalCluster (worker names 0..n-1)
            from distributed import get_worker

            return torch.device(f"cuda:{int(get_worker().name) % torch.cuda.device_count()}")
        except (ImportError, ValueError, TypeError):
            pass
    return torch.device(device)


def worker_state(
    job: PredictJob, preloaded: TrainedModel | None = None, imagery: HRImagery | None = None
) -> WorkerState:
    """This process's model and imagery for ``job`` (loaded on first use, then cached).

    ``preloaded``/``imagery``: already loaded by the caller (the synchronous scheduler reuses
    what planning loaded). One job per process at a time: a new job frees the previous model.
    """
    key = (job.checkpoint, job.device, job.image_files, job.cache_key)
    with _STATE_LOCK:
        st = _STATE.get(key)
        if st is None:
            if job.torch_threads:
                torch.set_num_threads(job.torch_threads)
            device = _worker_device(job.device)
            tm = preloaded if preloaded is not None else load_trained_model(job.checkpoint, "cpu")
            model = tm.model.to(device).eval()
            ds = imagery if imagery is not None else open_imagery(list(job.image_files))
            _STATE.clear()  # one job per process at a time: free the previous model
            st = WorkerState(
                model=model,
                device=device,
                mean=tm.mean.reshape(-1, 1, 1).astype(np.float32),
                std=tm.std.reshape(-1, 1, 1).astype(np.float32),
                imagery=ds,
            )
            _STATE[key] = st
        if st.aoi_key != job.aoi_wkb:
            st.aoi = shapely.from_wkb(job.aoi_wkb) if job.aoi_wkb else None
            if st.aoi is not None:
                shapely.prepare(st.aoi)
            st.aoi_key = job.aoi_wkb
    return st


# ------------------------------------------------------------------------------ reading
def _block_aoi_mask(st: WorkerState, job: PredictJob, block: Block) -> np.ndarray:
    """``(block.height, block.width)`` bool: pixels whose centre is inside the AOI."""
    g = job.grid
    shape = (block.height, block.width)
    if st.aoi is None:
        return np.ones(shape, bool)
    xmin, ymin, xmax, ymax = g.bounds(block.r0, block.c0, block.r0 + block.height, block.c0 + block.width)
    box = shapely.box(xmin, ymin, xmax, ymax)
    if st.aoi.contains(box):
        return np.ones(shape, bool)
    if not st.aoi.intersects(box):
        return np.zeros(shape, bool)
    part = shapely.clip_by_rect(st.aoi, xmin - g.res_x, ymin - g.res_y, xmax + g.res_x, ymax + g.res_y)
    return rasterize_aoi(part, from_origin(xmin, ymax, g.res_x, g.res_y), shape)


def read_strip(
    st: WorkerState, job: PredictJob, r0: int, r1: int, c0: int, c1: int
) -> tuple[np.ndarray, np.ndarray, int, int]:
    """Normalised imagery and validity for output rows [r0, r1) x cols [c0, c1), clipped to the
    imagery extent; returns ``(image (C,h,w) float32, valid (h,w) bool, row0, col0)`` of what was
    read. Invalid pixels are 0 (the band mean after normalisation)."""
    g = job.grid
    r0, r1 = max(r0, g.img_r0), min(r1, g.img_r1)
    c0, c1 = max(c0, g.img_c0), min(c1, g.img_c1)
    image, valid = read_imagery(st.imagery, *g.bounds(r0, c0, r1, c1))
    h, w = r1 - r0, c1 - c0
    if image.shape[1:] != (h, w):  # defensive: rounding in the reader
        fixed = np.full((image.shape[0], h, w), st.imagery.nodata, np.float32)
        fv = np.zeros((h, w), bool)
        hh, ww = min(h, image.shape[1]), min(w, image.shape[2])
        fixed[:, :hh, :ww] = image[:, :hh, :ww]
        fv[:hh, :ww] = valid[:hh, :ww]
        image, valid = fixed, fv
    image = (image - st.mean) / st.std
    # imagery nodata inside the extent (gaps between mosaic files, nodata holes) -> the band mean,
    # i.e. 0 after normalisation, not the raw nodata value (~ -3 sigma: an input never seen on land)
    image = np.where(valid[None], image, 0.0)
    return image.astype(np.float32, copy=False), valid, r0, c0


# ---------------------------------------------------------------------------- one block
def predict_block(st: WorkerState, job: PredictJob, block: Block) -> tuple[np.ndarray, np.ndarray | None, dict]:
    """Class codes (and confidence) of one block.

    Returns:
        ``(codes (h, w) job.dtype, conf (h, w) uint8 | None, stats)``; ``stats``: ``windows``
        (windows run) and ``seconds_forward`` (time inside the model; meaningful on CPU only).
    """
    wg = job.windows
    T, S = wg.tile, wg.stride
    b = block
    need = _block_aoi_mask(st, job, b)
    codes = np.full((b.height, b.width), MAP_NODATA, dtype=job.dtype)
    conf = np.full((b.height, b.width), CONFIDENCE_NODATA, np.uint8) if job.confidence else None
    if not need.any():
        return codes, conf, {"windows": 0, "seconds_forward": 0.0}
    rows = wg.touching(b.r0, b.r0 + b.height, wg.n_rows)
    cols = wg.touching(b.c0, b.c0 + b.width, wg.n_cols)
    strip_c0, strip_c1 = cols.start * S, (cols.stop - 1) * S + T
    n_classes = len(job.code_lut)
    group = torch.tensor(job.class_group, dtype=torch.int64, device=st.device) if job.class_group is not None else None
    blender = BlockBlender(wg, b, need, job.code_lut, job.dtype, job.confidence, st.device)
    inside = need.copy()

    def strips() -> Iterator[tuple[int, tuple]]:
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="lcmap-read") as pool:

            def read(row: int | None) -> Future | None:
                """Start reading the strip of window row ``row`` in the background (None: no more)."""
                if row is None:
                    return None
                return pool.submit(read_strip, st, job, row * S, row * S + T, strip_c0, strip_c1)

            it = iter(rows)
            nxt = next(it, None)
            fut = read(nxt)
            while fut is not None:
                i = cast(int, nxt)  # fut is not None: nxt was a row
                data = fut.result()
                nxt = next(it, None)
                fut = read(nxt)
                yield i, data

    def windows() -> Iterator[tuple[int, int, np.ndarray]]:
        for i, (strip, valid, sr0, sc0) in strips():
            # validity of the block rows this strip covers
            ra, rb = max(i * S, b.r0), min(i * S + T, b.r0 + b.height)
            v = valid[ra - sr0 : rb - sr0, b.c0 - sc0 : b.c0 - sc0 + b.width]
            need[ra - b.r0 : rb - b.r0] = inside[ra - b.r0 : rb - b.r0] & v
            for j in cols:
                ca, cb = max(j * S, b.c0), min(j * S + T, b.c0 + b.width)
                if not need[ra - b.r0 : rb - b.r0, ca - b.c0 : cb - b.c0].any():
                    continue  # no pixel of this block inside the AOI with valid imagery
                yield i, j, window_from_strip(job.grid, wg, strip, sr0, sc0, i, j)

    n_run = 0
    forward = [0.0]
    batch: list[tuple[int, int, np.ndarray]] = []

    def run(batch: list[tuple[int, int, np.ndarray]]) -> None:
        tiles = [t for _, _, t in batch]
        tiles += [tiles[-1]] * (job.batch_size - len(tiles))  # fixed batch shape: reproducible
        x = torch.from_numpy(np.stack(tiles)).to(st.device)
        with torch.inference_mode():
            t0 = time.perf_counter()
            probs = predict_proba_tta(st.model, x, job.tta, predict_proba).float()
            if group is not None:  # P(target class) = sum of its LR classes' probabilities
                probs = sum_probabilities(probs, group, n_classes)
            forward[0] += time.perf_counter() - t0
            for k, (i, j, _) in enumerate(batch):
                blender.add(i, j, probs[k])

    with torch.inference_mode():
        for item in windows():
            batch.append(item)
            if len(batch) == job.batch_size:
                run(batch)
                n_run += len(batch)
                batch = []
        if batch:
            run(batch)
            n_run += len(batch)
        codes, conf = blender.finish()
    return codes, conf, {"windows": n_run, "seconds_forward": forward[0]}

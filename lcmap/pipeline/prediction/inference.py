"""Block inference: the model and imagery of a worker process, and the class codes of a group of blocks.

A task (:func:`predict_group`) blends a group of blocks (:func:`lcmap.pipeline.prediction.tiling.block_groups`)
in one pass; the windows on its border that its neighbours also need were run once by seam tasks
(:mod:`lcmap.pipeline.prediction.seams`) and are read from their files. It lists the lattice windows
(:func:`lcmap.pipeline.prediction.tiling.lattice_windows`) that touch the group, reads their imagery itself,
one strip of ``tile`` rows at a time (its halo included; the next strip is read in a background
thread while the model runs, into preallocated buffers in the imagery's own data type:
:class:`~lcmap.pipeline.prediction.strips.StripReader` reads files on the output grid straight with rasterio,
others warped once onto it), normalises each window as it copies it into a preallocated batch
(pinned memory, non-blocking copies on CUDA), feeding nodata holes inside the imagery as the band
mean, runs the model in batches of ``batch_size`` windows (``bf16`` autocast on request) and blends
the probabilities on the model's device (:class:`lcmap.pipeline.prediction.blending.RowBlender`). A window
that is not all imagery (an edge, a gap, an image smaller than a window) is run alone, in its
place in the global order, on its context box (:func:`lcmap.pipeline.prediction.strips.context_box`): the
model never sees empty area, so a pixel's class depends only on the imagery around it. Finished
rows go straight into the arrays of the group's blocks, handed back block by block. With
``--legend target`` a target class's probability is the sum of its LR classes' (e.g. NLCD 52 + 71 +
81 + 82 + ... for low vegetation), so the map holds the most probable *target* class. Every pixel
sums the same windows in the same global order whatever the block size, the grouping or the
schedule, and batches are always padded to ``batch_size``, so the map is bit-identical for any
block size and scheduler.

The model is loaded once per worker process (:func:`load_worker_state`; on Dask by the worker
plugin of :mod:`lcmap.pipeline.prediction.execution`), never shipped inside tasks; :class:`PredictJob`
(small) is all a task receives besides its blocks.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np
import shapely
import torch
from rasterio.crs import CRS
from rasterio.transform import from_origin

from lcmap.geodata.aoi import rasterize_aoi
from lcmap.geodata.datasets import HRImagery, open_imagery
from lcmap.models import predict_proba, sum_probabilities
from lcmap.models.context import predict_proba_valid
from lcmap.models.tta import predict_proba_tta
from lcmap.pipeline.prediction.blending import RowBlender
from lcmap.pipeline.prediction.prediction_prior import PredictionPrior, PriorReader
from lcmap.pipeline.prediction.seams import Given, Seam, SeamFile
from lcmap.pipeline.prediction.strips import StripReader, context_box, normalise_into, window_into
from lcmap.pipeline.prediction.tiling import (
    CONFIDENCE_NODATA,
    Block,
    OutputGrid,
    WindowGrid,
    block_end,
    block_start,
    cut_blocks,
    group_region,
)
from lcmap.pipeline.runs import TrainedModel, load_trained_model

__all__ = [
    "PredictJob",
    "WorkerState",
    "load_worker_state",
    "predict_group",
    "predict_seam",
    "predict_block",
    "PRECISIONS",
]

#: ``--precision``: ``32`` (float32) or ``bf16`` (bfloat16 autocast, CUDA only).
PRECISIONS = ("32", "bf16")


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
    precision: str = "32"
    #: blocks per task (rows, columns): :func:`lcmap.pipeline.prediction.tiling.block_groups`
    group: tuple[int, int] = (1, 1)
    #: the imagery's values are multiplied by this before normalisation (``--input-scale``).
    input_scale: float = 1.0
    #: test-time augmentation (:data:`lcmap.models.tta.TTA_MODES`): each window's probabilities
    #: are averaged over these transforms before the taper and the blending
    tta: str = "none"
    #: the LR labels as a prior on the blended probabilities (``--label-prior``), or None
    label_prior: PredictionPrior | None = None

    def blocks(self) -> list[Block]:
        """The map's blocks (:func:`lcmap.pipeline.prediction.tiling.cut_blocks`)."""
        return cut_blocks(self.grid.height, self.grid.width, self.block_size, self.windows.row0, self.windows.col0)


# ------------------------------------------------------------------- per-worker state
@dataclass
class WorkerState:
    """What a worker process keeps between tasks: the model on its device, the normalisation,
    the imagery reader and the AOI (prepared for fast tests)."""

    model: torch.nn.Module
    device: torch.device
    mean: np.ndarray  # (C, 1, 1) float32
    std: np.ndarray
    imagery: HRImagery
    reader: StripReader
    #: reads context boxes in the model's thread while ``reader`` prefetches the next strip in
    #: another: its own file handles (a GDAL dataset must not be read from two threads at once)
    context_reader: StripReader
    aoi: shapely.Geometry | None = None
    buffers: dict[Any, Any] = field(default_factory=dict)
    #: the ``--label-prior`` labels' reader (its own file handles), or None
    prior: PriorReader | None = None


def worker_device(device: str, index: int | None = None) -> torch.device:
    """The torch device of a worker: ``cuda`` with several GPUs -> ``cuda:<index % GPUs>``."""
    if device == "cuda" and index is not None and torch.cuda.device_count() > 1:
        return torch.device(f"cuda:{index % torch.cuda.device_count()}")
    return torch.device(device)


def load_worker_state(
    job: PredictJob,
    preloaded: TrainedModel | None = None,
    imagery: HRImagery | None = None,
    device_index: int | None = None,
) -> WorkerState:
    """Load the model and open the imagery of ``job`` for this process.

    ``preloaded``/``imagery``: already loaded by the caller (the synchronous scheduler reuses what
    planning loaded); ``device_index``: this worker's number (one GPU per worker with ``cuda``).
    """
    if job.torch_threads:
        torch.set_num_threads(job.torch_threads)
    device = worker_device(job.device, device_index)
    tm = preloaded if preloaded is not None else load_trained_model(job.checkpoint, "cpu")
    model = tm.model.to(device).eval()
    if imagery is not None:
        ds = imagery
    else:  # on the map's grid: files in another CRS are warped onto it
        g = job.grid
        ds = open_imagery(list(job.image_files), crs=CRS.from_wkt(g.crs_wkt), res=(g.res_x, g.res_y))
    # (x * scale - mean) / std == (x - mean / scale) / (std / scale)
    mean = (tm.mean / job.input_scale).reshape(-1, 1, 1).astype(np.float32)
    std = (tm.std / job.input_scale).reshape(-1, 1, 1).astype(np.float32)
    aoi = shapely.from_wkb(job.aoi_wkb) if job.aoi_wkb else None
    if aoi is not None:
        shapely.prepare(aoi)
    return WorkerState(
        model=model,
        device=device,
        mean=mean,
        std=std,
        imagery=ds,
        reader=StripReader(ds, job.grid),
        context_reader=StripReader(ds, job.grid),
        aoi=aoi,
        prior=PriorReader(job.label_prior, job.grid.crs_wkt, job.grid.transform) if job.label_prior else None,
    )


def _aoi_mask(st: WorkerState, job: PredictJob, r0: int, c0: int, h: int, w: int) -> np.ndarray:
    """``(h, w)`` bool: output pixels [r0, r0 + h) x [c0, c0 + w) whose centre is inside the AOI."""
    g = job.grid
    shape = (h, w)
    if st.aoi is None:
        return np.ones(shape, bool)
    xmin, ymin, xmax, ymax = g.bounds(r0, c0, r0 + h, c0 + w)
    box = shapely.box(xmin, ymin, xmax, ymax)
    if st.aoi.contains(box):
        return np.ones(shape, bool)
    if not st.aoi.intersects(box):
        return np.zeros(shape, bool)
    part = shapely.clip_by_rect(st.aoi, xmin - g.res_x, ymin - g.res_y, xmax + g.res_x, ymax + g.res_y)
    return rasterize_aoi(part, from_origin(xmin, ymax, g.res_x, g.res_y), shape)


def _buffer(st: WorkerState, key: str, shape: tuple[int, ...], pin: bool = False, dtype: Any = np.float32) -> Any:
    """A buffer of at least ``shape`` kept by the worker (numpy of ``dtype``; float32 torch if ``pin``)."""
    buf = st.buffers.get(key)
    if buf is None or buf.dtype != dtype or any(a < b for a, b in zip(buf.shape, shape, strict=True)):
        if pin:
            buf = torch.empty(shape, dtype=torch.float32, pin_memory=True)
        else:
            buf = np.empty(shape, dtype)
        st.buffers[key] = buf
    return buf


# ---------------------------------------------------------------------------- one task
Probs = tuple[int, int, torch.Tensor, np.ndarray]


def _window_probs(
    st: WorkerState,
    job: PredictJob,
    region: Block,
    stats: dict,
    only: set[tuple[int, int]] | None = None,
    given: Given | None = None,
) -> Iterator[Probs]:
    """The windows that touch ``region`` and hold one of its pixels to classify (inside the AOI,
    valid imagery), in global ``(i, j)`` order: ``(i, j, probs (K, tile, tile) on st.device, need
    (tile, region.width) bool)``, ``probs`` summed into map channels (valid until the next item).

    ``only``: run just these windows (a seam task); ``given``: windows taken from seam files
    instead of run (:mod:`lcmap.pipeline.prediction.seams`), in their place in the order.
    ``stats``: ``windows`` (run here) and ``seconds_forward`` are added to.
    """
    wg = job.windows
    T = wg.tile
    if only is None:
        rows = wg.rows_touching(region.r0, region.r0 + region.height)
        cols = wg.cols_touching(region.c0, region.c0 + region.width)
    else:
        rows = range(min(i for i, _ in only), max(i for i, _ in only) + 1)
        cols = range(min(j for _, j in only), max(j for _, j in only) + 1)
    strip_c0, strip_c1 = wg.win_c0(cols.start), wg.win_c0(cols.stop - 1) + T
    n_classes = len(job.code_lut)
    group = None  # model channel -> map channel; None: the same (nothing to sum)
    if job.class_group is not None and tuple(job.class_group) != tuple(range(n_classes)):
        group = torch.tensor(job.class_group, dtype=torch.int64, device=st.device)
    cuda = st.device.type == "cuda"
    C = st.mean.shape[0]
    raw_dtype = st.reader.prepare()
    strips_buf = [_buffer(st, f"strip{k}", (C, T, strip_c1 - strip_c0), dtype=raw_dtype) for k in range(2)]
    batch_cpu = _buffer(st, "batch", (job.batch_size, C, T, T), pin=cuda)
    batch_np = batch_cpu.numpy() if isinstance(batch_cpu, torch.Tensor) else batch_cpu
    batch_t = batch_cpu if isinstance(batch_cpu, torch.Tensor) else torch.from_numpy(batch_cpu)

    def read(k: int, row: int) -> tuple:
        """Strip of window row ``row`` into buffer ``k``, with the rows' need (AOI and valid imagery)."""
        wr0 = wg.win_r0(row)
        image, valid, sr0, sc0 = st.reader.read(wr0, wr0 + T, strip_c0, strip_c1, strips_buf[k])
        need = np.zeros((T, region.width), bool)
        ra, rb = max(wr0, region.r0, sr0), min(wr0 + T, region.r0 + region.height, sr0 + valid.shape[0])
        ca, cb = max(region.c0, sc0), min(region.c0 + region.width, sc0 + valid.shape[1])
        if rb > ra and cb > ca:
            inside = _aoi_mask(st, job, ra, ca, rb - ra, cb - ca)
            need[ra - wr0 : rb - wr0, ca - region.c0 : cb - region.c0] = (
                inside & valid[ra - sr0 : rb - sr0, ca - sc0 : cb - sc0]
            )
        return image, valid, sr0, sc0, need

    def strips() -> Iterator[tuple[int, tuple]]:
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="lcmap-read") as pool:
            it = iter(enumerate(rows))
            nxt = next(it, None)
            fut: Future | None = pool.submit(read, nxt[0] % 2, nxt[1]) if nxt is not None else None
            while fut is not None:
                i = cast(tuple, nxt)[1]
                data = fut.result()
                nxt = next(it, None)
                fut = pool.submit(read, nxt[0] % 2, nxt[1]) if nxt is not None else None
                yield i, data

    autocast = (
        torch.autocast("cuda", dtype=torch.bfloat16) if job.precision == "bf16" and cuda else contextlib.nullcontext()
    )
    # windows in order: (i, j, need, probs taken from a seam file, or None: the k-th of the batch)
    pending: list[tuple[int, int, np.ndarray, torch.Tensor | None]] = []
    in_batch = [0]
    copy_done: list[Any] = [None]

    def run() -> list[Probs]:
        n = in_batch[0]
        probs = None
        if n:
            for k in range(n, job.batch_size):  # fixed batch shape: reproducible
                batch_np[k] = batch_np[n - 1]
            if cuda:
                x = batch_t[: job.batch_size].to(st.device, non_blocking=True)
                copy_done[0] = torch.cuda.Event()
                copy_done[0].record()
            else:
                x = batch_t[: job.batch_size]
            t0 = time.perf_counter()
            with autocast:
                probs = predict_proba_tta(st.model, x, job.tta, predict_proba).float()
            stats["seconds_forward"] += time.perf_counter() - t0
            if group is not None:  # P(target class) = sum of its LR classes' probabilities
                probs = sum_probabilities(probs, group, n_classes, out=st.buffers.get("summed"))
                st.buffers["summed"] = probs
        out, k = [], 0
        for i, j, need, taken in pending:
            if taken is None:
                assert probs is not None
                out.append((i, j, probs[k], need))
                k += 1
            else:
                out.append((i, j, taken, need))
        stats["windows"] += n
        pending.clear()
        in_batch[0] = 0
        return out

    def run_context(i: int, j: int, R: tuple, B: tuple, need: np.ndarray, strip: tuple) -> Probs:
        """Window (i, j) classified from its context box B (the imagery around its valid box R);
        ``strip``: the current strip ``(image, valid, row0, col0)``, used where it holds all of B."""
        image, valid, sr0, sc0 = strip
        if sr0 <= B[0] and B[1] <= sr0 + valid.shape[0] and sc0 <= B[2] and B[3] <= sc0 + valid.shape[1]:
            # a box shifted along the row (left and right edges, gaps): already read, not read again
            raw = image[:, B[0] - sr0 : B[1] - sr0, B[2] - sc0 : B[3] - sc0]
            ok = valid[B[0] - sr0 : B[1] - sr0, B[2] - sc0 : B[3] - sc0]
            br0, bc0 = B[0], B[2]
        else:
            buf = _buffer(st, "context", (C, T, T), dtype=raw_dtype)
            raw, ok, br0, bc0 = st.context_reader.read(B[0], B[1], B[2], B[3], buf)
        x = np.empty(raw.shape, np.float32)
        normalise_into(x, raw, ok, st.mean, st.std)
        t0 = time.perf_counter()
        with autocast:
            found = predict_proba_valid(st.model, x, ok, job.tta, predict_proba, st.device)
        stats["seconds_forward"] += time.perf_counter() - t0
        assert found is not None  # R's valid pixels lie inside B
        p, box = found
        br0, bc0 = br0 + box[0], bc0 + box[2]
        if group is not None:
            p = sum_probabilities(p[None], group, n_classes)[0]
        # zeros outside R, in a buffer the worker keeps (a fresh 4 MB tensor per edge window costs its
        # page faults); the window is blended before the next one is made
        full = st.buffers.get("context_probs")
        if full is None or full.shape != (p.shape[0], T, T) or full.device != p.device:
            full = st.buffers["context_probs"] = torch.zeros((p.shape[0], T, T), dtype=torch.float32, device=p.device)
        else:
            full.zero_()
        wr0, wc0 = wg.win_r0(i), wg.win_c0(j)
        full[:, R[0] - wr0 : R[1] - wr0, R[2] - wc0 : R[3] - wc0] = p[
            :, R[0] - br0 : R[1] - br0, R[2] - bc0 : R[3] - bc0
        ]
        stats["windows"] += 1
        return i, j, full, need

    with torch.inference_mode():
        for i, (strip, valid, sr0, sc0, need) in strips():
            wr0 = wg.win_r0(i)
            ra, rb = max(wr0, region.r0), min(wr0 + T, region.r0 + region.height)
            for j in cols:
                if only is not None and (i, j) not in only:
                    continue
                wc0 = wg.win_c0(j)
                ca, cb = max(wc0, region.c0), min(wc0 + T, region.c0 + region.width)
                if not need[ra - wr0 : rb - wr0, ca - region.c0 : cb - region.c0].any():
                    continue  # no pixel of this region inside the AOI with valid imagery
                if given is not None and (i, j) in given:  # run once, by a seam task
                    taken = given.read((i, j))
                    if taken is not None:
                        pending.append((i, j, need, torch.from_numpy(taken).to(st.device)))
                    continue
                ctx = context_box(job.grid, wg, valid, sr0, sc0, i, j)
                if ctx is None:
                    continue
                R, B = ctx
                if R != (wr0, wr0 + T, wc0, wc0 + T):  # not all imagery: its own forward pass, in order
                    if pending:
                        yield from run()
                    yield run_context(i, j, R, B, need, (strip, valid, sr0, sc0))
                    continue
                if in_batch[0] == 0 and copy_done[0] is not None:
                    copy_done[0].synchronize()  # the pinned batch is free again
                window_into(batch_np[in_batch[0]], wg, strip, valid, sr0, sc0, i, j, st.mean, st.std)
                pending.append((i, j, need, None))
                in_batch[0] += 1
                if in_batch[0] == job.batch_size:
                    yield from run()
        if pending:
            yield from run()


def predict_group(
    st: WorkerState, job: PredictJob, blocks: list[Block], given: Given | None = None
) -> Iterator[tuple[Block, np.ndarray, np.ndarray | None, dict]]:
    """Class codes (and confidence) of a group of blocks, block by block as their rows finish.

    ``given``: windows to take from seam files instead of running them (their seam tasks ran
    first: :mod:`lcmap.pipeline.prediction.seams`).

    Yields:
        ``(block, codes (h, w) job.dtype, conf (h, w) uint8 | None, stats)`` for each block of
        ``blocks``; ``stats`` (on the last block of each block row, else zeros): ``windows``
        (windows run) and ``seconds_forward`` (time inside the model; meaningful on CPU only).
    """
    wg = job.windows
    region = group_region(blocks)
    wanted = {(b.r0, b.c0): b for b in blocks}
    stats = {"windows": 0, "seconds_forward": 0.0}
    done: list[tuple[Block, np.ndarray, np.ndarray | None]] = []

    # finished rows -> the arrays of the blocks of the current block row (only blocks wanted)
    cur: dict[str, Any] = {"r0": None}

    def sink(r: int, codes: np.ndarray, conf: np.ndarray | None) -> None:
        while len(codes):
            if cur["r0"] is None or r >= cur["r0"] + cur["h"]:
                start = block_start(r, job.block_size, wg.row0)
                h = min(block_end(start, job.block_size, wg.row0), region.r0 + region.height) - start
                row = [b for (br0, _), b in sorted(wanted.items()) if br0 == start]
                cur.update(r0=start, h=h, blocks=[
                    (b, np.zeros((h, b.width), job.dtype),
                     np.full((h, b.width), CONFIDENCE_NODATA, np.uint8) if job.confidence else None)
                    for b in row
                ])  # fmt: skip
            n = min(len(codes), cur["r0"] + cur["h"] - r)
            a = r - cur["r0"]
            for b, bcodes, bconf in cur["blocks"]:
                cs = slice(b.c0 - region.c0, b.c0 - region.c0 + b.width)
                bcodes[a : a + n] = codes[:n, cs]
                if conf is not None and bconf is not None:
                    bconf[a : a + n] = conf[:n, cs]
            r, codes = r + n, codes[n:]
            conf = conf[n:] if conf is not None else None
            if r == cur["r0"] + cur["h"]:
                done.extend(cur["blocks"])
                cur["blocks"] = []

    prior = st.prior.factors if st.prior is not None else None
    blender = RowBlender(wg, region, job.code_lut, job.dtype, job.confidence, st.device, sink, prior)
    if st.aoi is None or st.aoi.intersects(shapely.box(*job.grid.bounds(
        region.r0, region.c0, region.r0 + region.height, region.c0 + region.width
    ))):  # fmt: skip
        for i, j, probs, need in _window_probs(st, job, region, stats, given=given):
            blender.add(i, j, probs, need)
            yield from _flush(done, stats)
    blender.finish()  # (outside the AOI: nothing read or run, nodata)
    yield from _flush(done, stats)


def predict_seam(st: WorkerState, job: PredictJob, seam: Seam, before_rename=None) -> dict:
    """Run a seam task's windows and write its file (:class:`lcmap.pipeline.prediction.seams.SeamFile`);
    returns ``windows`` (run) and ``seconds_forward``. A file already there (a resumed run) is kept.
    ``before_rename``: called before the finished file takes its name (may raise to drop it)."""
    stats = {"windows": 0, "seconds_forward": 0.0}
    sf = SeamFile(seam)
    path = Path(seam.file)
    if path.exists():
        if path.stat().st_size == sf.size_bytes:
            return stats  # written whole by an earlier run of the same job (renamed when complete)
        path.unlink()
    wg, T = job.windows, job.windows.tile
    i0, i1 = min(i for i, _ in seam.windows), max(i for i, _ in seam.windows)
    j0, j1 = min(j for _, j in seam.windows), max(j for _, j in seam.windows)
    r0, c0 = max(0, wg.win_r0(i0)), max(0, wg.win_c0(j0))
    r1, c1 = min(job.grid.height, wg.win_r0(i1) + T), min(job.grid.width, wg.win_c0(j1) + T)
    region = Block(0, 0, r0, c0, r1 - r0, c1 - c0)  # the windows' pixels inside the map
    Path(seam.file).parent.mkdir(parents=True, exist_ok=True)
    writer = sf.writer()
    try:
        for i, j, probs, _ in _window_probs(st, job, region, stats, only=set(seam.windows)):
            writer.put((i, j), probs.cpu().numpy())
        if before_rename is not None:
            before_rename()
        writer.close()
    except BaseException:
        writer.abort()
        raise
    return stats


def _flush(done: list, stats: dict) -> Iterator[tuple[Block, np.ndarray, np.ndarray | None, dict]]:
    while done:
        b, codes, conf = done.pop(0)
        yield b, codes, conf, dict(stats)
        stats["windows"], stats["seconds_forward"] = 0, 0.0


def predict_block(st: WorkerState, job: PredictJob, block: Block) -> tuple[np.ndarray, np.ndarray | None, dict]:
    """Class codes (and confidence) of one block: ``(codes (h, w), conf (h, w) | None, stats)``."""
    _, codes, conf, stats = next(iter(predict_group(st, job, [block])))
    return codes, conf, stats

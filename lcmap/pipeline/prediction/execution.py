"""Running the tasks: in this process, or on Dask (a local cluster or a scheduler address).

A task is a group of blocks (:func:`lcmap.pipeline.prediction.tiling.block_groups`; :func:`run_group`:
predict them in one pass, write each block's file as its rows finish); Dask gets them through
``client.submit`` (no ``map_overlap``), a few in flight per worker thread, so the task graph
stays small whatever the area. Each worker loads the model once, in the :class:`ModelPlugin`
worker plugin that :func:`run_distributed` registers (:func:`run_synchronous` uses the same
loader, :func:`lcmap.pipeline.prediction.inference.load_worker_state`, without Dask); the imagery and
checkpoint paths must therefore be readable by every worker, and the output folder writable.

A local cluster is sized to this machine (:func:`local_cluster_shape`), quiet (Dask logs at
WARNING, no dashboard); with ``cuda`` every task asks for the worker resource ``GPU=1``. A
scheduler that goes away mid-run, or cannot be reached, is reported in one message
(:class:`~lcmap.errors.LcmapInputError`); finished blocks stay in ``MAP.tif.partial``.
:class:`Progress` shows blocks and the area done (the area with imagery inside the AOI).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import CancelledError
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dask
import rasterio
import shapely
import torch
from distributed import Client, LocalCluster, as_completed, get_worker
from distributed.comm.core import CommClosedError
from distributed.diagnostics.plugin import WorkerPlugin

from lcmap.errors import LcmapInputError
from lcmap.geodata.datasets import HRImagery
from lcmap.pipeline.prediction import mapfile
from lcmap.pipeline.prediction.dask_security import scheduler_security
from lcmap.pipeline.prediction.inference import (
    PredictJob,
    WorkerState,
    load_worker_state,
    predict_group,
    predict_seam,
)
from lcmap.pipeline.prediction.run_lock import RunOver, check_run
from lcmap.pipeline.prediction.seams import Given, Seam, SeamPlan
from lcmap.pipeline.prediction.tiling import Block, OutputGrid
from lcmap.pipeline.runs import TrainedModel

__all__ = [
    "RunCounts",
    "Work",
    "Progress",
    "ModelPlugin",
    "SchedulerLost",
    "GroupTask",
    "run_group",
    "run_seam",
    "run_synchronous",
    "run_distributed",
    "dask_client",
    "local_cluster_shape",
]

log = logging.getLogger(__name__)


@dataclass
class RunCounts:
    """What the tasks of one run did: blocks run, windows run, seconds inside the model."""

    blocks_run: int = 0
    windows: int = 0
    seconds_forward: float = 0.0

    def add(self, task: dict[str, Any]) -> None:
        """Count one finished task (what :func:`run_group` returned)."""
        self.windows += task["windows"]
        self.seconds_forward += task["seconds_forward"]
        self.blocks_run += len(task["blocks"])


class SchedulerLost(Exception):
    """The Dask scheduler went away (or the connection to it broke) while blocks were running."""


def _libc_malloc_trim() -> Any:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc.malloc_trim
    except (OSError, AttributeError):  # not glibc (macOS, musl, Windows)
        return None


_MALLOC_TRIM = _libc_malloc_trim()


def release_free_memory() -> None:
    """Hand the heap's free pages back to the OS once per task (glibc ``malloc_trim(0)``; no-op elsewhere).

    Keeps a worker's RSS flat across tasks at one call per task, instead of setting
    ``MALLOC_TRIM_THRESHOLD_`` low for the whole process, which trims on every ``free`` and made
    GDAL's COG assembly ~4x slower in CPU time (measured: 2.9 vs 0.7 CPU-s for a 16 Mpx map).
    """
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


@dataclass(frozen=True)
class GroupTask:
    """A group of blocks (one task) and the windows it takes from seam files (None: runs them all)."""

    blocks: tuple[Block, ...]
    given: Given | None = None

    @property
    def name(self) -> str:
        return self.blocks[0].name


def run_group(
    st: WorkerState, job: PredictJob, blocks: list[Block] | GroupTask, owner: Any = None, given: Given | None = None
) -> dict[str, Any]:
    """Predict a group of blocks and write each block's file; returns small statistics
    (``blocks``: names written, ``seconds``, ``windows``, ``seconds_forward``). ``owner``: the
    run's :attr:`~lcmap.pipeline.prediction.run_lock.RunLock.owner`; once that run is over (its scheduler
    lost, its process stopped), the task stops and writes no further block. ``given``: windows
    taken from seam files (a :class:`GroupTask` carries its own)."""
    if isinstance(blocks, GroupTask):
        given = blocks.given
        blocks = list(blocks.blocks)
    t0 = time.perf_counter()
    names, windows, forward = [], 0, 0.0
    # a fixed GDAL block cache (default: 5% of RAM), so that memory does not grow with the area read
    with rasterio.Env(GDAL_CACHEMAX=mapfile.GDAL_CACHE_BYTES):
        try:
            for block, codes, conf, stats in predict_group(st, job, blocks, given):
                path = mapfile.block_path(job.blocks_dir, block)
                check = {"owner": owner} if owner is not None else {}  # synchronous: this process is the run
                try:
                    mapfile.write_block(path, job.grid, block, codes, conf, **check)
                except RunOver as exc:
                    log.info("%s; this task stops", exc)
                    break
                names.append(block.name)
                windows += stats["windows"]
                forward += stats["seconds_forward"]
        finally:
            if given is not None:
                given.close()  # the seam files it mapped: their space is freed once they are deleted
    release_free_memory()
    return {"blocks": names, "seconds": time.perf_counter() - t0, "windows": windows, "seconds_forward": forward}


def run_seam(st: WorkerState, job: PredictJob, seam: Seam, owner: Any = None) -> dict[str, Any]:
    """Run a seam task's windows into its file (:func:`lcmap.pipeline.prediction.inference.predict_seam`);
    statistics as :func:`run_group`'s, with no blocks."""
    t0 = time.perf_counter()
    with rasterio.Env(GDAL_CACHEMAX=mapfile.GDAL_CACHE_BYTES):
        try:  # a task that outlives its run (scheduler lost, Ctrl-C) leaves no seam file behind
            stats = predict_seam(st, job, seam, lambda: check_run(owner, f"seam {seam.name}"))
        except RunOver as exc:
            log.info("%s; this task stops", exc)
            stats = {"windows": 0, "seconds_forward": 0.0}
    return {"blocks": [], "seconds": time.perf_counter() - t0, **stats}


def _drop_seams(plan: SeamPlan | None, task: int) -> None:
    """Task ``task`` finished: delete the seam files no other task needs."""
    if plan is not None:
        for seam in plan.finished(task):
            Path(seam.file).unlink(missing_ok=True)


# ------------------------------------------------------------------------ the worker plugin
def plugin_name(job: PredictJob) -> str:
    """The name of ``job``'s :class:`ModelPlugin` on the workers."""
    return f"lcmap-model-{job.cache_key or 'job'}"


class ModelPlugin(WorkerPlugin):
    """Loads the model and opens the imagery once per Dask worker (on setup, and on every worker
    that joins later); tasks find it with :func:`worker_state`. Removed when the run ends."""

    def __init__(self, job: PredictJob):
        self.job = job
        self.name = plugin_name(job)
        self.state: WorkerState | None = None

    def setup(self, worker: Any) -> None:
        try:
            index: int | None = int(worker.name)
        except (TypeError, ValueError):
            index = None
        self.state = load_worker_state(self.job, device_index=index)

    def teardown(self, worker: Any) -> None:
        self.state = None


#: What one task runs: ``work(state, job, item, owner)`` -> :func:`run_group`'s statistics; ``item``:
#: a group of blocks for :func:`run_group`, or what another ``work`` takes (e.g. a tile:
#: :func:`lcmap.pipeline.prediction.tiled_output.run_tile`). A module-level function (Dask pickles it).
Work = Callable[[WorkerState, PredictJob, Any, Any], dict[str, Any]]


def _task(
    job: PredictJob, blocks: Any, name: str, owner: Any = None, work: Work | None = None, *after: Any
) -> dict[str, Any]:
    """The Dask task: this worker's plugin state, then ``work`` (default :func:`run_group`); ``after``:
    the results of the tasks it waits for (its seam tasks), unused."""
    plugin = get_worker().plugins.get(name)
    state = getattr(plugin, "state", None)
    if state is None:  # not registered here (yet)
        raise RuntimeError(f"worker plugin {name} is missing on {get_worker().address}")
    return (work or run_group)(state, job, blocks, owner)


# ------------------------------------------------------------------------------- progress
def _km2_per_px(grid: OutputGrid) -> float | None:
    crs = grid.crs
    if not crs.is_projected:
        return None
    try:
        _, factor = crs.linear_units_factor
    except Exception:
        return None
    return grid.res_x * grid.res_y * factor * factor / 1e6


class Progress:
    """Blocks done, and the area done: pixels of ``area_wkb`` (the imagery's footprint inside the
    AOI, in the grid's CRS; the whole block without it)."""

    def __init__(
        self, enabled: bool, blocks: list[Block], done: set[str], grid: OutputGrid, area_wkb: bytes | None = None
    ):
        self.enabled = enabled
        self.km2_px = _km2_per_px(grid)
        if area_wkb is None:
            self.sizes = {b.name: b.height * b.width for b in blocks}
        else:
            geom = shapely.from_wkb(area_wkb)
            px_area = grid.res_x * grid.res_y
            self.sizes = {
                b.name: shapely.box(*grid.bounds(b.r0, b.c0, b.r0 + b.height, b.c0 + b.width)).intersection(geom).area
                / px_area
                for b in blocks
            }
        self.total_px = sum(self.sizes.values())
        self.done_px = sum(self.sizes[n] for n in done if n in self.sizes)
        self.bar = None
        if enabled:
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )
            from rich.progress import Progress as Bar

            self.bar = Bar(
                TextColumn("[bold]predict[/]"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("blocks"),
                TextColumn("{task.fields[area]}"),
                TimeElapsedColumn(),
                TimeRemainingColumn(),
                transient=False,
            )
            self.task = self.bar.add_task("predict", total=len(blocks), completed=len(done), area=self._area())
            self.bar.start()

    def _area(self) -> str:
        if self.km2_px is None:
            return f"{self.done_px / 1e6:.1f}/{self.total_px / 1e6:.1f} Mpx"
        return f"{self.done_px * self.km2_px:,.2f}/{self.total_px * self.km2_px:,.2f} km²"

    def advance(self, name: str) -> None:
        self.done_px += self.sizes.get(name, 0)
        if self.bar is not None:
            self.bar.update(self.task, advance=1, area=self._area())

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()


# ------------------------------------------------------------------------------ schedulers
def local_cluster_shape(device: str, n_tasks: int, devices: int | None = None) -> tuple[int, int]:
    """(workers, torch threads per worker) for a LocalCluster on this machine; ``devices``: GPUs
    to use with ``cuda`` (default: all visible)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 1
    if device.startswith("cuda"):
        n = 1 if ":" in device else max(1, torch.cuda.device_count())
        if devices:
            n = min(n, devices)
    else:
        # single-threaded processes up to 4 cores (intra-op threads that wait on each other are
        # slow as soon as the machine is shared), then 4 torch threads per process (memory)
        per = 1 if cores <= 4 else 4
        n = max(1, cores // per)
    n = max(1, min(n, n_tasks))
    return n, max(1, cores // n)


def run_synchronous(
    job: PredictJob,
    todo: Sequence[Any],
    progress: Progress,
    counts: RunCounts,
    model: TrainedModel | None = None,
    imagery: HRImagery | None = None,
    work: Work | None = None,
    seams: SeamPlan | None = None,
) -> None:
    """Run the groups ``todo`` one after the other in this process (``model``/``imagery``: already
    loaded by planning, reused; ``work``: what runs one item of ``todo``, default :func:`run_group`;
    ``seams``: the seam tasks of ``todo``, each run just before the first task that needs it)."""
    st = load_worker_state(job, preloaded=model, imagery=imagery)
    ran: set[int] = set()
    for t, group in enumerate(todo):
        for s in seams.needs[t] if seams is not None else ():
            if s not in ran:
                counts.add(run_seam(st, job, seams.seams[s]))  # type: ignore[union-attr]
                ran.add(s)
        res = (work or run_group)(st, job, group, None)
        counts.add(res)
        _drop_seams(seams, t)
        for name in res["blocks"]:
            progress.advance(name)


@contextmanager
def dask_client(scheduler: str | None, job: PredictJob, n_tasks: int, devices: int | None = None) -> Iterator[Any]:
    """A Dask client: ``scheduler`` None starts a quiet local cluster (no dashboard, Dask logs at
    WARNING), else connects to that address (within 10 s: Dask's connect timeout; :func:`predict_map
    <lcmap.pipeline.prediction.predict.predict_map>` has checked with
    :func:`~lcmap.pipeline.prediction.scheduler_check.check_scheduler` that a Dask scheduler answers there).

    Raises:
        LcmapInputError: the scheduler cannot be reached, the service there is not a Dask
            scheduler, or ``cuda`` without a GPU worker.
    """
    gpu = job.device.startswith("cuda")
    cluster = None
    quiet = ("distributed", "distributed.nanny", "distributed.scheduler", "distributed.worker", "distributed.core")
    levels = {name: logging.getLogger(name).level for name in quiet}
    for name in quiet:
        logging.getLogger(name).setLevel(logging.WARNING)
    try:
        if scheduler is None:
            n, threads = local_cluster_shape(job.device, n_tasks, devices)
            cluster = LocalCluster(
                n_workers=n,
                threads_per_worker=1,
                processes=True,
                dashboard_address=None,
                silence_logs=logging.WARNING,
                resources={"GPU": 1} if gpu else None,
                env={"OMP_NUM_THREADS": str(threads)},
            )
            client = Client(cluster)
        else:
            security = scheduler_security(scheduler)  # tls:// from Dask's config; warns on remote tcp://
            try:
                with dask.config.set({"distributed.comm.timeouts.connect": "10s"}):  # tls:// included
                    client = Client(scheduler, timeout="10s", security=security)
            except Exception as exc:  # OSError, TimeoutError; anything else a strange peer causes
                raise LcmapInputError(
                    f"--scheduler {scheduler}: cannot connect to a Dask scheduler there ({type(exc).__name__}). "
                    "Start one with 'dask scheduler' (and workers with 'dask worker ADDRESS'), check the "
                    "address, or leave --scheduler out to use a local cluster."
                ) from None
        try:
            if gpu:
                workers = client.scheduler_info().get("workers", {})
                if not any(w.get("resources", {}).get("GPU") for w in workers.values()):
                    raise LcmapInputError(
                        f"--device cuda with --scheduler {scheduler}: no worker declares a GPU resource; start "
                        "the workers with 'dask worker ... --resources GPU=1' (one per GPU)"
                    )
            yield client
        finally:
            try:
                client.close()
            except Exception:  # the scheduler may be gone already
                pass
            if cluster is not None:
                try:
                    cluster.close()
                except Exception:
                    pass
    finally:
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)


def run_distributed(
    client: Any,
    job: PredictJob,
    todo: Sequence[Any],
    progress: Progress,
    counts: RunCounts,
    owner: Any = None,
    work: Work | None = None,
    seams: SeamPlan | None = None,
) -> None:
    """Run the groups ``todo`` on ``client``'s cluster (local threads set ``job.torch_threads``);
    ``owner``: the run's :attr:`~lcmap.pipeline.prediction.run_lock.RunLock.owner` (tasks that outlive the
    run write nothing; see :func:`run_group`); ``work``: what runs one item (default :func:`run_group`);
    ``seams``: the seam tasks of ``todo``: each is submitted with the first task that needs it, and
    the tasks that need it wait for it (Dask dependencies).

    Raises:
        SchedulerLost: the scheduler went away or the connection broke mid-run.
    """
    gpu = job.device.startswith("cuda")
    plugin = ModelPlugin(job)
    try:
        client.register_plugin(plugin, name=plugin.name)
        slots = max(1, sum(client.nthreads().values()))
        token = uuid.uuid4().hex[:8]
        pending = iter(enumerate(todo))
        ac = as_completed()
        extra = {"resources": {"GPU": 1}} if gpu else {}
        seam_futures: dict[int, Any] = {}
        task_of: dict[str, int] = {}  # future key -> index in todo (None for a seam)

        def submit() -> bool:
            nxt = next(pending, None)
            if nxt is None:
                return False
            t, group = nxt
            after = []
            for s in seams.needs[t] if seams is not None else ():
                if s not in seam_futures:
                    seam = seams.seams[s]  # type: ignore[union-attr]
                    fut = client.submit(_task, job, seam, plugin.name, owner, run_seam,
                                        key=f"lcmap-{seam.name}-{token}", pure=False, **extra)  # fmt: skip
                    seam_futures[s] = fut
                    ac.add(fut)
                after.append(seam_futures[s])
            name = getattr(group, "name", None) or group[0].name  # a tile's, or its first block's
            key = f"lcmap-{name}-{token}"
            task_of[key] = t
            ac.add(client.submit(_task, job, group, plugin.name, owner, work, *after, key=key, pure=False, **extra))
            return True

        for _ in range(2 * slots):  # a few tasks in flight per worker thread, not all of them
            if not submit():
                break
        for fut in ac:
            res = fut.result()
            counts.add(res)
            t = task_of.pop(fut.key, None)
            if t is None:  # a seam task (kept: tasks submitted later may still wait for it)
                continue
            fut.release()
            _drop_seams(seams, t)
            for name in res["blocks"]:
                progress.advance(name)
            submit()
    except (CancelledError, CommClosedError, OSError) as exc:
        if isinstance(exc, OSError) and client.status == "running":
            raise  # e.g. a full disk on a worker
        raise SchedulerLost(str(exc)) from exc
    finally:
        if client.status == "running":
            try:
                client.unregister_worker_plugin(plugin.name)
            except Exception:
                pass

"""Running the block tasks: in this process, or on Dask (a local cluster or a scheduler address).

Each block is one task (:func:`run_block`: predict it, write its file); Dask gets them through
``client.submit`` (no ``map_overlap``), a few in flight per worker thread, so the task graph
stays small whatever the area. The :class:`~lcmap.pipeline.inference.PredictJob` is broadcast
once to every worker; each worker loads the model itself
(:func:`lcmap.pipeline.inference.worker_state`). The imagery and checkpoint paths must
therefore be readable by every worker, and the output folder writable by them.

A local cluster is sized to this machine (:func:`local_cluster_shape`); with ``cuda`` every task
asks for the worker resource ``GPU=1``. :class:`Progress` shows blocks and area done.
"""

from __future__ import annotations

import logging
import os
import time
import uuid
from dataclasses import dataclass, replace
from typing import Any

import rasterio
import shapely
import torch

from lcmap.errors import LcmapInputError
from lcmap.geodata.datasets import HRImagery
from lcmap.pipeline import mapfile
from lcmap.pipeline.inference import PredictJob, predict_block, worker_state
from lcmap.pipeline.runs import TrainedModel
from lcmap.pipeline.tiling import Block, OutputGrid

__all__ = ["RunCounts", "Progress", "run_block", "run_synchronous", "run_distributed", "local_cluster_shape"]


@dataclass
class RunCounts:
    """What the block tasks of one run did: blocks run, windows run, seconds inside the model."""

    blocks_run: int = 0
    windows: int = 0
    seconds_forward: float = 0.0

    def add(self, task: dict[str, Any]) -> None:
        """Count one finished task (what :func:`run_block` returned)."""
        self.windows += task["windows"]
        self.seconds_forward += task["seconds_forward"]
        self.blocks_run += 1


def run_block(job: PredictJob, block: Block) -> dict[str, Any]:
    """The task: predict one block and write its file; returns small statistics
    (``block`` name, ``seconds``, ``windows``, ``seconds_forward``)."""
    t0 = time.perf_counter()
    # a fixed GDAL block cache (default: 5% of RAM), so that memory does not grow with the area read
    with rasterio.Env(GDAL_CACHEMAX=mapfile.GDAL_CACHE_BYTES):
        st = worker_state(job)
        codes, conf, stats = predict_block(st, job, block)
        mapfile.write_block(mapfile.block_path(job.blocks_dir, block), job.grid, block, codes, conf)
    return {"block": block.name, "seconds": time.perf_counter() - t0, **stats}


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
    """Blocks done, and the area done: pixels inside the AOI (the whole block without an AOI)."""

    def __init__(
        self, enabled: bool, blocks: list[Block], done: set[str], grid: OutputGrid, aoi_wkb: bytes | None = None
    ):
        self.enabled = enabled
        self.km2_px = _km2_per_px(grid)
        if aoi_wkb is None:
            self.sizes = {b.name: b.height * b.width for b in blocks}
        else:
            geom = shapely.from_wkb(aoi_wkb)
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
def local_cluster_shape(device: str, n_tasks: int) -> tuple[int, int]:
    """(workers, torch threads per worker) for a LocalCluster on this machine."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 1
    if device.startswith("cuda"):
        n = 1 if ":" in device else max(1, torch.cuda.device_count())
    else:
        # single-threaded processes up to 4 cores (intra-op threads that wait on each other are
        # slow as soon as the machine is shared), then 4 torch threads per process (memory)
        per = 1 if cores <= 4 else 4
        n = max(1, cores // per)
    n = max(1, min(n, n_tasks))
    return n, max(1, cores // n)


def run_synchronous(
    job: PredictJob,
    todo: list[Block],
    progress: Progress,
    counts: RunCounts,
    model: TrainedModel | None = None,
    imagery: HRImagery | None = None,
) -> None:
    """Run the blocks ``todo`` one after the other in this process (``model``/``imagery``: already
    loaded, reused as this process's worker state)."""
    worker_state(job, preloaded=model, imagery=imagery)
    for block in todo:
        counts.add(run_block(job, block))
        progress.advance(block.name)


def run_distributed(
    job: PredictJob, todo: list[Block], progress: Progress, counts: RunCounts, scheduler: str | None
) -> None:
    """Run the blocks ``todo`` on Dask: ``scheduler`` None starts a local cluster, else its address.

    Raises:
        LcmapInputError: the scheduler is unreachable, or ``cuda`` without a GPU worker.
    """
    from distributed import Client, LocalCluster, as_completed

    from lcmap.pipeline.dask_security import scheduler_security

    gpu = job.device.startswith("cuda")
    cluster = None
    if scheduler is None:
        n, threads = local_cluster_shape(job.device, len(todo))
        job = replace(job, torch_threads=threads)
        cluster = LocalCluster(
            n_workers=n,
            threads_per_worker=1,
            processes=True,
            dashboard_address=None,
            silence_logs=logging.ERROR,
            resources={"GPU": 1} if gpu else None,
        )
        client = Client(cluster)
    else:
        security = scheduler_security(scheduler)  # tls:// from Dask's config; warns on remote tcp://
        try:
            client = Client(scheduler, timeout="10s", security=security)
        except (OSError, TimeoutError) as exc:
            raise LcmapInputError(f"--scheduler {scheduler}: cannot connect to a Dask scheduler there ({exc})") from exc
    try:
        workers = client.scheduler_info().get("workers", {})
        if gpu and not any(w.get("resources", {}).get("GPU") for w in workers.values()):
            raise LcmapInputError(
                f"--device cuda with --scheduler {scheduler}: no worker declares a GPU resource; start "
                "the workers with 'dask worker ... --resources GPU=1' (one per GPU)"
            )
        slots = max(1, sum(client.nthreads().values()))
        job_future = client.scatter(job, broadcast=True, hash=False)
        token = uuid.uuid4().hex[:8]
        pending = iter(todo)
        ac = as_completed()
        extra = {"resources": {"GPU": 1}} if gpu else {}

        def submit() -> bool:
            block = next(pending, None)
            if block is None:
                return False
            ac.add(
                client.submit(
                    run_block, job_future, block, key=f"lcmap-block-{block.name}-{token}", pure=False, **extra
                )
            )
            return True

        for _ in range(2 * slots):  # a few blocks in flight per worker thread, not all of them
            if not submit():
                break
        for fut in ac:
            res = fut.result()
            fut.release()
            counts.add(res)
            progress.advance(res["block"])
            submit()
    finally:
        client.close()
        if cluster is not None:
            cluster.close()

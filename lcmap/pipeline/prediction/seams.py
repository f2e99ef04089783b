"""Border windows computed once: the model windows that several tasks need, run by seam tasks.

A task blends a group of blocks in one pass (:func:`lcmap.pipeline.prediction.tiling.block_groups`);
the windows on a group's border also cover its neighbours' pixels (one row or column of windows
straddles each group edge, by ``overlap`` pixels). Instead of each task running them again, the
windows that touch two or more groups are planned here (:func:`plan_seams`) into *seam tasks*,
one per set of groups that share them (a vertical seam between two groups, a horizontal one, a
corner). A seam task runs its windows exactly as a group task would (same strips, same context
boxes, batches padded to the same size) and writes their map-channel probabilities to one file
in ``MAP.tif.partial/seams/`` (:class:`SeamFile`); the group tasks that need them run after it
and take those windows from the file in their place in the global order, so every pixel sums the
same windows, in the same order, as before: the map stays bit-identical for any block size,
grouping, scheduler and worker count, and each window runs once (model pixels per map pixel no
longer grow with the number of workers).

A seam file (``seam_<first window>_<digest>.f32``) holds a header of one byte per window (1: it
ran; 0: it has no valid imagery or no pixel in the map's AOI, so no group adds it) padded to
4096 bytes, then ``K x tile x tile`` float32 per window. It is written under a temporary name
and renamed, so a file that exists is complete; a resumed run (same manifest) reuses it. Files
are deleted once every task that needs them has finished, and with the partial folder at the
end. Cost: ``4 * K * tile**2`` bytes per shared window on the output's disk (4 MB at 4 classes).
"""

from __future__ import annotations

import hashlib
import math
import os
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from lcmap.pipeline.prediction.tiling import Block, WindowGrid

__all__ = ["Seam", "SeamFile", "SeamPlan", "Given", "plan_seams", "shared_model_px_per_map_px"]

#: Bytes of a seam file's header (its window flags), rounded up to this.
_HEADER_ALIGN = 4096

Window = tuple[int, int]


@dataclass(frozen=True)
class Seam:
    """One seam task: windows ``(i, j)`` in global order, written to ``file`` (``K`` channels)."""

    windows: tuple[Window, ...]
    file: str
    channels: int
    tile: int

    @property
    def name(self) -> str:
        return Path(self.file).stem


class SeamFile:
    """Reading and writing one :class:`Seam`'s file (see the module's docstring for the layout)."""

    def __init__(self, seam: Seam):
        self.seam = seam
        self.n = len(seam.windows)
        self.header = math.ceil(max(self.n, 1) / _HEADER_ALIGN) * _HEADER_ALIGN
        self.shape = (seam.channels, seam.tile, seam.tile)
        self.slot_bytes = 4 * int(np.prod(self.shape))
        self.slot = {w: k for k, w in enumerate(seam.windows)}
        #: the whole file's size (a file of another size is not a finished one)
        self.size_bytes = self.header + self.n * self.slot_bytes
        self._flags: np.ndarray | None = None
        self._data: np.memmap | None = None

    def close(self) -> None:
        """Unmap the file (reads open it again): nothing else holds the map (:meth:`read` copies)."""
        self._flags = self._data = None

    # ------------------------------------------------------------------ writing (the seam task)
    def writer(self) -> SeamWriter:
        return SeamWriter(self)

    # ------------------------------------------------------------------ reading (group tasks)
    def read(self, window: Window) -> np.ndarray | None:
        """Window ``(i, j)``'s probabilities ``(K, tile, tile)`` float32, or None where it did not run."""
        if self._flags is None:
            path = self.seam.file
            self._flags = np.fromfile(path, np.uint8, count=self.n)
            self._data = np.memmap(path, np.float32, "r", offset=self.header, shape=(self.n, *self.shape))
        k = self.slot[window]
        if not self._flags[k]:
            return None
        assert self._data is not None
        return np.array(self._data[k])


class SeamWriter:
    """Writes a seam file under a temporary name: :meth:`put` each window that ran, then :meth:`close`."""

    def __init__(self, sf: SeamFile):
        self.sf = sf
        self.final = Path(sf.seam.file)
        self.tmp = self.final.with_name(f".{self.final.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}")
        self.flags = np.zeros(max(sf.n, 1), np.uint8)
        self.f = open(self.tmp, "wb")  # noqa: SIM115 (closed by close/abort)
        self.f.truncate(sf.size_bytes)  # sparse: windows that do not run stay holes

    def put(self, window: Window, probs: np.ndarray) -> None:
        """Store window ``(i, j)``'s probabilities ``(K, tile, tile)`` (converted to float32)."""
        k = self.sf.slot[window]
        self.f.seek(self.sf.header + k * self.sf.slot_bytes)
        self.f.write(np.ascontiguousarray(probs, np.float32).tobytes())
        self.flags[k] = 1

    def close(self) -> None:
        """Write the flags, flush to disk, rename onto the final name (the file is then complete)."""
        self.f.seek(0)
        self.f.write(self.flags[: self.sf.n].tobytes())
        self.f.flush()
        os.fsync(self.f.fileno())
        self.f.close()
        os.replace(self.tmp, self.final)

    def abort(self) -> None:
        self.f.close()
        self.tmp.unlink(missing_ok=True)


class Given:
    """The windows a task takes from seam files instead of running them (pickled with the task:
    only its :class:`Seam` list travels; the files are opened where it runs)."""

    def __init__(self, seams: Iterable[Seam] = ()):
        self.seams = tuple(seams)
        self._index = {w: s for s in self.seams for w in s.windows}
        self._files: dict[str, SeamFile] = {}

    def __getstate__(self) -> dict:
        return {"seams": self.seams}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["seams"])  # type: ignore[misc]

    def __contains__(self, window: object) -> bool:
        return window in self._index

    def __len__(self) -> int:
        return len(self._index)

    def close(self) -> None:
        """Let go of the seam files' maps (a deleted file's disk space is freed once nothing maps it)."""
        for sf in self._files.values():
            sf.close()
        self._files.clear()

    def read(self, window: Window) -> np.ndarray | None:
        """Window ``(i, j)``'s probabilities from its seam file (None: it did not run there)."""
        seam = self._index[window]
        sf = self._files.get(seam.file)
        if sf is None:
            sf = self._files[seam.file] = SeamFile(seam)
        return sf.read(window)


@dataclass
class SeamPlan:
    """Seam tasks of a run and which task needs which.

    ``seams``: the seam tasks, in global order of their first window; ``needs[t]``: indices into
    ``seams`` that task ``t`` (of the ``items`` given to :func:`plan_seams`) takes windows from;
    ``given[t]``: the :class:`Given` of task ``t``.
    """

    seams: list[Seam]
    needs: list[tuple[int, ...]]
    given: list[Given]
    _left: dict[int, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for need in self.needs:
            for s in need:
                self._left[s] = self._left.get(s, 0) + 1

    @property
    def windows(self) -> int:
        """Windows in the seam tasks (each also counted once in a run's windows)."""
        return sum(len(s.windows) for s in self.seams)

    def finished(self, task: int) -> list[Seam]:
        """Task ``task`` has finished: the seams no unfinished task needs any more (their files can go)."""
        gone = []
        for s in self.needs[task]:
            self._left[s] -= 1
            if self._left[s] == 0:
                gone.append(self.seams[s])
        return gone


def _window_box(windows: WindowGrid, region: Block) -> tuple[int, int, int, int]:
    """``(i0, i1, j0, j1)``: the windows touching ``region`` (half-open ranges)."""
    rows = windows.rows_touching(region.r0, region.r0 + region.height)
    cols = windows.cols_touching(region.c0, region.c0 + region.width)
    return rows.start, rows.stop, cols.start, cols.stop


def _digest(windows: Sequence[Window], channels: int, tile: int, salt: str) -> str:
    text = f"{salt};{channels},{tile};" + ";".join(f"{i},{j}" for i, j in windows)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def plan_seams(
    windows: WindowGrid, items: Sequence[Sequence[Block]], seams_dir: str | Path, channels: int, salt: str = ""
) -> SeamPlan:
    """Plan the seam tasks of tasks ``items`` (each: the regions of its groups, as from
    :func:`lcmap.pipeline.prediction.tiling.group_region`), windows of ``windows``, ``channels``
    map channels; files in ``seams_dir``, their names also made from ``salt`` (the run's manifest:
    a file of another model or imagery never has the name of this run's).

    A window touched by two or more regions (of any tasks) goes to the seam task of exactly that
    set of regions; every other window is run by the one group that touches it.
    """
    regions = [(t, r) for t, regs in enumerate(items) for r in regs]
    boxes = np.array([_window_box(windows, r) for _, r in regions], np.int64).reshape(-1, 4)
    touching: dict[Window, set[int]] = {}
    for a in range(len(regions)):
        i0, i1, j0, j1 = boxes[a]
        rest = boxes[a + 1 :]
        ci0, ci1 = np.maximum(rest[:, 0], i0), np.minimum(rest[:, 1], i1)
        cj0, cj1 = np.maximum(rest[:, 2], j0), np.minimum(rest[:, 3], j1)
        for k in np.nonzero((ci1 > ci0) & (cj1 > cj0))[0]:
            b = a + 1 + int(k)
            for i in range(int(ci0[k]), int(ci1[k])):
                for j in range(int(cj0[k]), int(cj1[k])):
                    touching.setdefault((i, j), set()).update((a, b))
    by_key: dict[tuple[int, ...], list[Window]] = {}
    for w, regs in touching.items():
        by_key.setdefault(tuple(sorted(regs)), []).append(w)
    keyed = sorted(((sorted(ws), key) for key, ws in by_key.items()), key=lambda p: p[0][0])
    seams, needs = [], [set() for _ in items]  # type: list[Seam], list[set[int]]
    for s, (ws, key) in enumerate(keyed):
        i, j = ws[0]
        name = f"seam_i{i:06d}_j{j:06d}_{_digest(ws, channels, windows.tile, salt)}.f32"
        seams.append(Seam(tuple(ws), str(Path(seams_dir) / name), channels, windows.tile))
        for a in key:
            needs[regions[a][0]].add(s)
    return SeamPlan(
        seams=seams,
        needs=[tuple(sorted(n)) for n in needs],
        given=[Given(tuple(seams[s] for s in sorted(n))) for n in needs],
    )


def shared_model_px_per_map_px(windows: WindowGrid, regions: Iterable[Block]) -> float:
    """Model pixels per map pixel when every window touching ``regions`` runs once (seams shared;
    each window counted at ``tile`` x ``tile``: an upper bound where one runs on a smaller context
    box). Compare :func:`lcmap.pipeline.prediction.tiling.model_px_per_map_px` (borders run twice)."""
    boxes = [_window_box(windows, r) for r in regions]
    seen: set[Window] = set()
    for i0, i1, j0, j1 in boxes:
        seen.update((i, j) for i in range(i0, i1) for j in range(j0, j1))
    return len(seen) * windows.tile**2 / (windows.height * windows.width)

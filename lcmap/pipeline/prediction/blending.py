"""Blending window probabilities into class codes (no I/O): the rolling accumulator of a task.

Softmax probabilities of overlapping windows are averaged with the taper of
:meth:`lcmap.pipeline.prediction.tiling.WindowGrid.taper` (1 inside, a Hann ramp in the overlap).
:meth:`RowBlender.add` is the one step "probabilities of one window -> weighted accumulation";
the accumulation is a rolling buffer of ``tile`` rows, so memory does not grow with the region's
height, and rows are finalised (argmax class, confidence) as soon as no later window touches them.
Every pixel sums the same windows in the same global order whatever the block size or grouping,
so the map is bit-identical for any of them. :class:`BlockBlender` blends one block whole.
"""

from __future__ import annotations

import numpy as np
import torch

from lcmap.geodata.legends import MAP_NODATA
from lcmap.pipeline.prediction.tiling import CONFIDENCE_NODATA, Block, WindowGrid

__all__ = ["RowBlender", "BlockBlender"]

#: Columns finalised at a time with a label prior (its factors: a K x rows x columns temporary).
_FINALISE_COLS = 2048
#: Pixels finalised at a time on the CPU (class argmax and confidence), in bands of whole rows:
#: contiguous and cache-sized, ~3x faster than 2048-column chunks of the whole buffer's rows.
_FINALISE_PX = 1 << 18


def _max_over_classes(acc: torch.Tensor, lut: np.ndarray | None = None) -> tuple[torch.Tensor, np.ndarray]:
    """``(K, h, w)`` -> (highest value ``(h, w)`` tensor, ``lut`` of the index of the first highest
    ``(h, w)`` numpy, in ``lut``'s dtype; ``lut`` None: the index itself).

    On the CPU by K - 1 comparisons in numpy (half the time of ``torch.max(dim=0)`` for K = 4 and
    the same result: the first index among equal values), each class's code put in place by bit
    operations (``codes ^= (codes ^ code) & mask``, ``mask`` all ones where the class is higher:
    a sixth of the time of a masked ``np.copyto``); elsewhere ``torch.max`` on the device.
    """
    if lut is None:
        lut = np.arange(acc.shape[0], dtype=np.uint8 if acc.shape[0] <= 256 else np.int64)
    if acc.device.type != "cpu":
        top_t, arg_t = acc.max(dim=0)
        return top_t, lut[arg_t.cpu().numpy()]
    a = acc.numpy()
    top = a[0].copy()
    codes = np.full(top.shape, lut[0], lut.dtype)
    higher = np.empty(top.shape, bool)
    mask = np.empty(top.shape, lut.dtype)
    diff = np.empty(top.shape, lut.dtype)
    for k in range(1, a.shape[0]):
        np.greater(a[k], top, out=higher)
        np.maximum(top, a[k], out=top)
        np.negative(higher.view(np.uint8), out=mask, dtype=mask.dtype)  # all ones where higher, else 0
        np.bitwise_xor(codes, lut[k], out=diff)
        np.bitwise_and(diff, mask, out=diff)
        np.bitwise_xor(codes, diff, out=codes)  # lut[k] where higher, else unchanged
    return torch.from_numpy(top), codes


def _frame(
    y0: int, y1: int, x0: int, x1: int, iy0: int, iy1: int, ix0: int, ix1: int
) -> list[tuple[int, int, int, int]]:
    """Rectangle ``[y0, y1) x [x0, x1)`` cut into non-empty parts inside and outside the inner
    rectangle ``[iy0, iy1) x [ix0, ix1)``: rows above, rows below, then the middle rows' left
    part, inner part and right part; ``(y0, y1, x0, x1)`` each."""
    out = []
    ma, mz = max(y0, iy0), min(y1, iy1)
    if mz <= ma:  # no row inside: the whole rectangle is frame
        return [(y0, y1, x0, x1)] if y1 > y0 and x1 > x0 else []
    if ma > y0:
        out.append((y0, ma, x0, x1))
    if y1 > mz:
        out.append((mz, y1, x0, x1))
    la, lz = x0, min(x1, max(x0, ix0))
    ra_, rz = max(x0, min(x1, ix1)), x1
    if lz > la:
        out.append((ma, mz, la, lz))
    if min(x1, ix1) > max(x0, ix0):
        out.append((ma, mz, max(x0, ix0), min(x1, ix1)))
    if rz > ra_:
        out.append((ma, mz, ra_, rz))
    return [r for r in out if r[1] > r[0] and r[3] > r[2]]


class RowBlender:
    """Rolling accumulator of weighted probabilities over a region, ``tile`` rows at a time.

    Feed every window that touches the region, in global (i, j) order, with :meth:`add`; rows
    are finalised (class codes, confidence) as soon as no later window touches them and handed
    to ``sink(row0, codes (n, width), conf (n, width) | None)`` (numpy; pixels not needed hold
    nodata). Memory: ``K x tile x width`` float32 on ``device`` whatever the region's height.

    Args:
        windows: the global window grid.
        region: the output rows/columns blended (a :class:`Block`, or a band of blocks).
        code_lut: code written for each map channel (argmax index -> code).
        dtype: numpy dtype of the codes (``uint8``/``uint16``).
        confidence: also produce the confidence (percent, uint8; nodata :data:`CONFIDENCE_NODATA`).
        device: where the accumulation and the argmax run (the model's device).
        sink: receives the finalised rows.
        prior: None, or ``prior(r0, r1, c0, c1)`` -> float32 ``(K, r1 - r0, c1 - c0)`` numpy factors
            that multiply the blended probabilities of map rows ``[r0, r1)`` and columns ``[c0, c1)``
            before the argmax (``--label-prior``: :class:`lcmap.pipeline.prediction.prediction_prior.PriorReader`).
    """

    def __init__(
        self,
        windows: WindowGrid,
        region: Block,
        code_lut: tuple[int, ...],
        dtype: str,
        confidence: bool,
        device: torch.device,
        sink,
        prior=None,
    ):
        assert MAP_NODATA == 0 and CONFIDENCE_NODATA == 255  # _finalise's bit operations
        self.prior = prior
        self.windows, self.region, self.sink = windows, region, sink
        self.T = windows.tile
        self.device = device
        n_classes = len(code_lut)
        self.acc = torch.zeros((n_classes, self.T, region.width), dtype=torch.float32, device=device)
        # the weight sum is needed for the confidence only (the class is the argmax either way)
        self.wsum = torch.zeros((self.T, region.width), dtype=torch.float32, device=device) if confidence else None
        self.tmp = torch.empty((n_classes, self.T, self.T), dtype=torch.float32, device=device)
        self.buf_r: int | None = None  # output row of buffer row 0
        self.need: np.ndarray | None = None  # (tile, width) bool of rows [buf_r, buf_r + tile)
        self.fin = region.r0  # next output row to finalise
        self.lut_np = np.asarray(code_lut, dtype=dtype)
        self.dtype = dtype
        self.confidence = confidence
        self._weights: dict[tuple[int, int], torch.Tensor] = {}
        self.n_rows, self.n_cols = windows.n_rows, windows.n_cols

    def weight(self, i: int, j: int) -> torch.Tensor:
        """2-D blending weight ``(tile, tile)`` of window (i, j) (outer product of the tapers)."""
        wg = self.windows
        key = (
            (0 if i == 0 else 1) + (2 if i == self.n_rows - 1 else 0),
            (0 if j == 0 else 1) + (2 if j == self.n_cols - 1 else 0),
        )
        w = self._weights.get(key)
        if w is None:
            wy = wg.taper(i, self.n_rows)
            wx = wg.taper(j, self.n_cols)
            w = torch.from_numpy(np.outer(wy, wx).astype(np.float32)).to(self.device)
            self._weights[key] = w
        return w

    def _nodata(self, a: int, z: int) -> None:
        """Hand rows [a, z) to the sink as nodata (no window ran over them), ``tile`` rows at a time."""
        w = self.region.width
        for r in range(a, z, self.T):
            n = min(self.T, z - r)
            conf = np.full((n, w), CONFIDENCE_NODATA, np.uint8) if self.confidence else None
            self.sink(r, np.zeros((n, w), self.dtype), conf)

    def _finalise(self, upto: int) -> None:
        """Hand rows [fin, upto) to the sink (rows outside the buffer: nodata, not needed)."""
        b = self.region
        end = min(upto, b.r0 + b.height)
        if end <= self.fin:
            return
        a = z = end
        if self.buf_r is not None and self.need is not None:
            a = max(self.fin, self.buf_r)
            z = max(a, min(end, self.buf_r + self.T))
        self._nodata(self.fin, min(a, end))
        if z > a and self.buf_r is not None and self.need is not None:
            ya, yz = a - self.buf_r, z - self.buf_r
            codes = np.zeros((z - a, b.width), self.dtype)
            conf = np.full((z - a, b.width), CONFIDENCE_NODATA, np.uint8) if self.confidence else None
            # the prior's factors column chunk by column chunk (a K x rows x cols temporary); on the
            # CPU, bands of whole rows of <= _FINALISE_PX pixels: contiguous and cache-sized
            step_x = _FINALISE_COLS if self.prior is not None else b.width
            for x0 in range(0, b.width, step_x):
                x1 = min(b.width, x0 + step_x)
                acc = self.acc[:, ya:yz, x0:x1]
                if self.prior is not None:  # the label's prior (lcmap.pipeline.prediction.prediction_prior)
                    acc = acc * torch.from_numpy(self.prior(a, z, b.c0 + x0, b.c0 + x1)).to(self.device)
                step_y = max(1, _FINALISE_PX // (x1 - x0)) if self.device.type == "cpu" else z - a
                for y0 in range(0, z - a, step_y):
                    y1 = min(z - a, y0 + step_y)
                    part = acc[:, y0:y1]
                    top, cls = _max_over_classes(part, self.lut_np)
                    need = self.need[ya + y0 : ya + y1, x0:x1]
                    np.multiply(cls, need, out=codes[y0:y1, x0:x1])  # pixels not needed: 0, MAP_NODATA
                    if conf is not None:
                        assert self.wsum is not None
                        wsum = self.wsum[ya + y0 : ya + y1, x0:x1] if self.prior is None else part.sum(dim=0)
                        pct = torch.round(top.to(self.device) / wsum.clamp_min(1e-12) * 100.0)
                        pct_np = pct.clamp(0, 100).to(torch.uint8).cpu().numpy()
                        # pixels not needed: 255, CONFIDENCE_NODATA (need - 1 is 0 or 255 in uint8; pct <= 100)
                        np.bitwise_or(
                            pct_np, np.subtract(need.view(np.uint8), 1, dtype=np.uint8), out=conf[y0:y1, x0:x1]
                        )
            self.sink(a, codes, conf)
        self._nodata(z, end)
        self.fin = end

    def add(self, i: int, j: int, probs: torch.Tensor, need: np.ndarray) -> None:
        """Blend window (i, j)'s probabilities ``(K, tile, tile)`` (K map channels) into the region.

        Windows must come in global (i, j) order. ``need``: ``(tile, region.width)`` bool, the
        pixels of output rows ``[windows.win_r0(i), ... + tile)`` that get a class (rows outside
        the region: anything). Adds ``probs * weight`` to the accumulator and ``weight`` to the
        weight sum over the window's part inside the region.
        """
        T = self.T
        b = self.region
        wr0, wc0 = self.windows.win_r0(i), self.windows.win_c0(j)
        if self.buf_r is None or wr0 != self.buf_r:
            self._finalise(wr0)
            shift = T if self.buf_r is None else wr0 - self.buf_r
            kept = [self.acc] if self.wsum is None else [self.acc, self.wsum]
            for buf in kept:  # rows [wr0, buf_r + T) move to the top, the rest restarts at 0
                if shift < T:
                    keep = T - shift
                    src = buf[..., shift:, :]
                    buf[..., :keep, :] = src.clone() if shift < keep else src  # overlapping ranges
                    buf[..., keep:, :] = 0
                else:
                    buf.zero_()
            self.buf_r = wr0
        self.need = need
        ra, rb = max(wr0, b.r0), min(wr0 + T, b.r0 + b.height)
        ca, cb = max(wc0, b.c0), min(wc0 + T, b.c0 + b.width)
        w = self.weight(i, j)
        # inside the ramps the weight is exactly 1 and p * 1 == p: added as is (the same sums, bit
        # for bit); elsewhere mul and add as two separately rounded operations, identical for
        # every block layout
        o = self.windows.overlap
        ia = o if i > 0 else 0
        iz = T - o if i < self.n_rows - 1 else T
        ja = o if j > 0 else 0
        jz = T - o if j < self.n_cols - 1 else T
        for y0, y1, x0, x1 in _frame(ra - wr0, rb - wr0, ca - wc0, cb - wc0, ia, iz, ja, jz):
            dst = self.acc[:, y0:y1, x0 + wc0 - b.c0 : x1 + wc0 - b.c0]
            p = probs[:, y0:y1, x0:x1]
            if y0 >= ia and y1 <= iz and x0 >= ja and x1 <= jz:  # weight 1
                dst += p
            else:
                tmp = self.tmp[:, : y1 - y0, : x1 - x0]
                torch.mul(p, w[y0:y1, x0:x1], out=tmp)
                dst += tmp
        if self.wsum is not None:
            self.wsum[ra - wr0 : rb - wr0, ca - b.c0 : cb - b.c0] += w[ra - wr0 : rb - wr0, ca - wc0 : cb - wc0]

    def finish(self) -> None:
        """Hand the remaining rows to the sink."""
        self._finalise(self.region.r0 + self.region.height)


class BlockBlender:
    """One block blended whole (a :class:`RowBlender` whose rows are collected in arrays).

    Feed every window that touches the block, in global (i, j) order, with :meth:`add`; then
    :meth:`finish` gives the class codes and the confidence. Only pixels where ``need``
    (``(block.height, block.width)`` bool) is True get a class; the others stay nodata.
    """

    def __init__(
        self,
        windows: WindowGrid,
        block: Block,
        need: np.ndarray,
        code_lut: tuple[int, ...],
        dtype: str,
        confidence: bool,
        device: torch.device,
        prior=None,
    ):
        self.block, self.need_all = block, need
        self.codes = np.full((block.height, block.width), MAP_NODATA, dtype=dtype)
        self.conf = np.full((block.height, block.width), CONFIDENCE_NODATA, np.uint8) if confidence else None
        self.rows = RowBlender(windows, block, code_lut, dtype, confidence, device, self._take, prior)
        self.T = windows.tile

    def _take(self, r: int, codes: np.ndarray, conf: np.ndarray | None) -> None:
        a = r - self.block.r0
        self.codes[a : a + len(codes)] = codes
        if self.conf is not None and conf is not None:
            self.conf[a : a + len(codes)] = conf

    def add(self, i: int, j: int, probs: torch.Tensor) -> None:
        """Blend window (i, j)'s probabilities ``(K, tile, tile)``; windows in global (i, j) order."""
        b, wr0 = self.block, self.rows.windows.win_r0(i)
        need = np.zeros((self.T, b.width), bool)
        ra, rb = max(wr0, b.r0), min(wr0 + self.T, b.r0 + b.height)
        if rb > ra:
            need[ra - wr0 : rb - wr0] = self.need_all[ra - b.r0 : rb - b.r0]
        self.rows.add(i, j, probs, need)

    def finish(self) -> tuple[np.ndarray, np.ndarray | None]:
        """``(codes (h, w) dtype, confidence (h, w) uint8 | None)`` of the whole block."""
        self.rows.finish()
        return self.codes, self.conf

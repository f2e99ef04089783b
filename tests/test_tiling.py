"""Tiling and blending (``lcmap.pipeline.prediction.tiling``): grids, taper, blocks and the blender, no I/O."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import lcmap.pipeline.prediction.blending as B
import lcmap.pipeline.prediction.tiling as T
from lcmap.geodata.legends import MAP_NODATA


def _blend(windows: T.WindowGrid, block: T.Block, probs: dict, lut=(11, 22), need=None):
    """Codes and confidence of ``block`` from per-window probabilities ``{(i, j): (K, tile, tile)}``."""
    need = np.ones((block.height, block.width), bool) if need is None else need
    blender = B.BlockBlender(windows, block, need, lut, "uint8", True, torch.device("cpu"))
    rows = windows.touching(block.r0, block.r0 + block.height, windows.n_rows)
    cols = windows.touching(block.c0, block.c0 + block.width, windows.n_cols)
    for i in rows:
        for j in cols:
            blender.add(i, j, probs[(i, j)])
    return blender.finish()


def _mosaic(windows: T.WindowGrid, block_size: int, probs: dict, lut=(11, 22)):
    """The whole output blended block by block, as the pipeline does."""
    codes = np.zeros((windows.height, windows.width), np.uint8)
    conf = np.zeros((windows.height, windows.width), np.uint8)
    for b in T.cut_blocks(windows.height, windows.width, block_size):
        c, p = _blend(windows, b, probs, lut)
        codes[b.r0 : b.r0 + b.height, b.c0 : b.c0 + b.width] = c
        conf[b.r0 : b.r0 + b.height, b.c0 : b.c0 + b.width] = p
    return codes, conf


def _random_probs(windows: T.WindowGrid, n_classes: int, seed: int = 0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for i in range(windows.n_rows):
        for j in range(windows.n_cols):
            logits = torch.randn((n_classes, windows.tile, windows.tile), generator=gen)
            out[(i, j)] = logits.softmax(0)
    return out


# ----------------------------------------------------------------------------- grid rules
def test_taper_partition_of_unity_floor_and_edges():
    wg = T.WindowGrid(tile=64, overlap=16, height=200, width=200)
    n = wg.n_rows
    assert n == 4  # windows at 0, 48, 96, 144; 144 + 64 >= 200
    first, mid, last = wg.taper(0, n), wg.taper(1, n), wg.taper(n - 1, n)
    assert first[0] == 1 and last[-1] == 1  # no taper on the raster's own edges
    assert mid.min() >= T.TAPER_FLOOR and mid.min() < 0.01  # tapers, never to 0
    # neighbours' ramps add up to 1 over the overlap (up to the floor)
    np.testing.assert_allclose(mid[-16:] + wg.taper(2, n)[:16], 1.0, atol=2 * T.TAPER_FLOOR)
    assert np.all(mid[16:-16] == 1)


def test_window_grid_covers_and_touching_rule():
    wg = T.WindowGrid(tile=64, overlap=16, height=150, width=170)
    assert wg.stride == 48
    assert (wg.n_cols - 1) * wg.stride + wg.tile >= 170 > (wg.n_cols - 2) * wg.stride + wg.tile
    for lo, hi in ((0, 48), (48, 96), (96, 170), (50, 51)):
        got = list(wg.touching(lo, hi, wg.n_cols))
        want = [j for j in range(wg.n_cols) if j * 48 < hi and j * 48 + 64 > lo]
        assert got == want


@pytest.mark.parametrize(
    "tile, overlap, height, width", [(64, 16, 150, 170), (32, 0, 100, 33), (32, 16, 31, 200), (64, 32, 64, 65)]
)
def test_every_output_pixel_is_covered_and_weights_sum_to_one(tile, overlap, height, width):
    wg = T.WindowGrid(tile, overlap, height, width)
    cover = np.zeros((height, width), int)
    wsum = np.zeros((height, width))
    for i in range(wg.n_rows):
        for j in range(wg.n_cols):
            r0, c0 = i * wg.stride, j * wg.stride
            w2 = np.outer(wg.taper(i, wg.n_rows), wg.taper(j, wg.n_cols))
            h, w = min(tile, height - r0), min(tile, width - c0)
            assert h > 0 and w > 0  # no window lies wholly outside the output
            cover[r0 : r0 + h, c0 : c0 + w] += 1
            wsum[r0 : r0 + h, c0 : c0 + w] += w2[:h, :w]
    assert cover.min() >= 1
    # the tapers of all windows over a pixel add up to 1 (2-D: product of two 1-D partitions)
    np.testing.assert_allclose(wsum, 1.0, atol=3 * T.TAPER_FLOOR)


def test_block_cuts_are_whole_window_strides_and_tile_the_output():
    wg = T.WindowGrid(512, 64, 40000, 40000)
    assert T.block_side_px(4096, wg) == 4032 and T.block_side_px(8192, wg) == 8064
    assert T.block_side_px(1, wg) == wg.stride  # never 0
    for tile, overlap, block_px in ((64, 16, 48), (64, 16, 100), (256, 32, 1000), (32, 0, 7)):
        small = T.WindowGrid(tile, overlap, 150, 170)
        size = T.block_side_px(block_px, small)
        assert size % small.stride == 0 and size >= small.stride
        assert abs(size - block_px) <= small.stride / 2 or size == small.stride
        blocks = T.cut_blocks(150, 170, size)
        seen = np.zeros((150, 170), int)
        for b in blocks:
            assert b.r0 % size == 0 and b.c0 % size == 0
            assert b.name == f"r{b.row:05d}_c{b.col:05d}" and (b.r0, b.c0) == (b.row * size, b.col * size)
            seen[b.r0 : b.r0 + b.height, b.c0 : b.c0 + b.width] += 1
        assert np.all(seen == 1)
        assert len({b.name for b in blocks}) == len(blocks)


def test_output_grid_snaps_the_aoi_outwards_to_the_imagery_pixels():
    image = (500_000.0, 3_999_850.0, 500_170.0, 4_000_000.0)  # 170 x 150 px of 1 m
    full = T.output_grid("WKT", image, (1.0, 1.0))
    assert (full.width, full.height, full.x0, full.y0) == (170, 150, 500_000.0, 4_000_000.0)
    assert (full.img_c0, full.img_r0, full.img_c1, full.img_r1) == (0, 0, 170, 150)
    part = T.output_grid("WKT", image, (1.0, 1.0), (500_010.4, 3_999_900.0, 500_120.0, 3_999_979.5))
    assert (part.x0, part.y0, part.width, part.height) == (500_010.0, 3_999_980.0, 110, 80)
    assert (part.img_c0, part.img_r0, part.img_c1, part.img_r1) == (-10, -20, 160, 130)
    assert part.bounds(0, 0, part.height, part.width) == (500_010.0, 3_999_900.0, 500_120.0, 3_999_980.0)
    beyond = T.output_grid("WKT", image, (1.0, 1.0), (499_000.0, 3_999_000.0, 500_050.0, 4_001_000.0))
    assert (beyond.x0, beyond.y0, beyond.width, beyond.height) == (500_000.0, 4_000_000.0, 50, 150)


def test_lattice_windows_do_not_depend_on_the_output_extent():
    """Two outputs on one 1 m pixel grid (one inside the other): the windows over a shared pixel
    start at the same CRS coordinates, and every lattice window touching the output is in the grid."""
    tile, overlap = 64, 16
    small = T.output_grid("WKT", (500_037.0, 3_999_877.0, 500_101.0, 3_999_941.0), (1.0, 1.0))
    large = T.output_grid("WKT", (499_800.0, 3_999_500.0, 500_400.0, 4_000_100.0), (1.0, 1.0))
    for g in (small, large):
        wg = T.lattice_windows(g, tile, overlap)
        assert -tile < wg.row0 <= -overlap and -tile < wg.col0 <= -overlap
        # windows start on global multiples of the stride
        assert (g.x0 + wg.col0) % wg.stride == 0 and (-(g.y0 - wg.row0)) % wg.stride == 0
        assert wg.win_c0(wg.n_cols - 1) < g.width <= wg.win_c0(wg.n_cols - 1) + wg.stride
    ws, wl = T.lattice_windows(small, tile, overlap), T.lattice_windows(large, tile, overlap)

    def starts(g, wg, r0, c0, r1, c1):  # CRS x/y of the windows touching output px box
        rows, cols = wg.rows_touching(r0, r1), wg.cols_touching(c0, c1)
        return [(g.x0 + wg.win_c0(j), g.y0 - wg.win_r0(i)) for i in rows for j in cols]

    dc, dr = int(small.x0 - large.x0), int(large.y0 - small.y0)
    assert starts(small, ws, 0, 0, small.height, small.width) == starts(
        large, wl, dr, dc, dr + small.height, dc + small.width
    )


# ------------------------------------------------------------------------------- blending
def test_blending_two_known_windows_gives_the_hand_computed_map():
    """Two windows side by side (tile 8, overlap 4): P(class 0) is 0.9 in the left one and 0.2
    in the right one; in the overlap the result follows the sin² ramp."""
    wg = T.WindowGrid(tile=8, overlap=4, height=8, width=12)
    assert (wg.n_rows, wg.n_cols) == (1, 2)
    left = torch.tensor([0.9, 0.1]).view(2, 1, 1).expand(2, 8, 8)
    right = torch.tensor([0.2, 0.8]).view(2, 1, 1).expand(2, 8, 8)
    codes, conf = _blend(wg, T.Block(0, 0, 0, 0, 8, 12), {(0, 0): left, (0, 1): right})
    # overlap column 4 + k: left weight sin²(π/2 (4 - k - 0.5) / 4), right weight sin²(π/2 (k + 0.5) / 4)
    p0 = [0.9] * 4
    for k in range(4):
        wl, wr = math.sin(math.pi / 2 * (3.5 - k) / 4) ** 2, math.sin(math.pi / 2 * (k + 0.5) / 4) ** 2
        p0.append((0.9 * wl + 0.2 * wr) / (wl + wr))
    p0 += [0.2] * 4
    # by hand: 0.9 * 0.962 + 0.2 * 0.038 = 0.873, 0.684, 0.416, 0.227
    np.testing.assert_allclose(p0[4:8], [0.873, 0.684, 0.416, 0.227], atol=1e-3)
    want_codes = [11 if p > 0.5 else 22 for p in p0]
    want_conf = [round(100 * max(p, 1 - p)) for p in p0]
    assert want_codes == [11] * 6 + [22] * 6
    assert np.all(codes == np.array(want_codes, np.uint8)) and codes.dtype == np.uint8
    assert np.all(conf == np.array(want_conf, np.uint8))


def test_blending_is_the_same_for_every_block_size_and_matches_a_whole_raster_sum():
    wg = T.WindowGrid(tile=32, overlap=8, height=70, width=90)
    probs = _random_probs(wg, 3)
    lut = (1, 2, 3)
    ref_codes, ref_conf = _mosaic(wg, 1000, probs, lut)
    for block_px in (24, 48, 72):
        codes, conf = _mosaic(wg, T.block_side_px(block_px, wg), probs, lut)
        assert np.array_equal(codes, ref_codes) and np.array_equal(conf, ref_conf)
    # against a plain float64 accumulation over the whole raster
    acc = np.zeros((3, 70 + 32, 90 + 32))
    wsum = np.zeros((70 + 32, 90 + 32))
    for (i, j), p in probs.items():
        w2 = np.outer(wg.taper(i, wg.n_rows), wg.taper(j, wg.n_cols)).astype(np.float64)
        rs, cs = slice(i * wg.stride, i * wg.stride + 32), slice(j * wg.stride, j * wg.stride + 32)
        acc[:, rs, cs] += p.double().numpy() * w2
        wsum[rs, cs] += w2
    acc, wsum = acc[:, :70, :90], wsum[:70, :90]
    top2 = np.sort(acc, axis=0)[-2:]
    clear = (top2[1] - top2[0]) / wsum > 1e-4  # no near-tie between float32 and float64
    assert clear.mean() > 0.99
    want = np.array(lut)[acc.argmax(0)]
    assert np.array_equal(ref_codes[clear], want[clear])
    assert np.abs(ref_conf.astype(int) - np.round(100 * acc.max(0) / wsum)).max() <= 1


def test_pixels_not_needed_stay_nodata():
    wg = T.WindowGrid(tile=16, overlap=4, height=30, width=30)
    probs = _random_probs(wg, 2, seed=1)
    need = np.ones((30, 30), bool)
    need[5:9, 10:20] = False
    codes, conf = _blend(wg, T.Block(0, 0, 0, 0, 30, 30), probs, need=need)
    assert np.all(codes[~need] == MAP_NODATA) and np.all(conf[~need] == T.CONFIDENCE_NODATA)
    assert np.all(codes[need] != MAP_NODATA) and np.all(conf[need] <= 100)


@pytest.mark.parametrize("rect", [(0, 32, 0, 32), (3, 20, 5, 29), (0, 7, 0, 32), (25, 32, 10, 12), (8, 24, 0, 8)])
def test_frame_cuts_a_rectangle_into_inner_and_frame_parts_that_tile_it(rect):
    inner = (8, 24, 6, 26)
    covered = np.zeros((32, 32), int)
    for y0, y1, x0, x1 in B._frame(*rect, *inner):
        assert y1 > y0 and x1 > x0
        part = np.zeros((32, 32), bool)
        part[y0:y1, x0:x1] = True
        in_inner = np.zeros((32, 32), bool)
        in_inner[inner[0] : inner[1], inner[2] : inner[3]] = True
        assert not part[in_inner].any() or not part[~in_inner].any()  # a part is inner or frame, not both
        covered[y0:y1, x0:x1] += 1
    want = np.zeros((32, 32), int)
    want[rect[0] : rect[1], rect[2] : rect[3]] = 1
    assert np.array_equal(covered, want)


def test_max_over_classes_matches_torch_max_including_ties():
    g = torch.Generator().manual_seed(3)
    acc = torch.randint(0, 4, (5, 40, 60), generator=g).float()  # many exact ties
    top, arg = B._max_over_classes(acc)
    want_top, want_arg = acc.max(dim=0)
    assert torch.equal(top, want_top)
    assert np.array_equal(arg, want_arg.numpy())  # the first index among equal values
    assert torch.equal(acc.gather(0, torch.from_numpy(arg).long()[None])[0], want_top)


def test_max_over_classes_gives_the_code_of_the_first_highest_class_in_the_luts_type():
    g = torch.Generator().manual_seed(4)
    acc = torch.randint(0, 3, (5, 30, 70), generator=g).float()[:, 3:27, 5:60]  # ties; a strided view
    for lut in (np.array([7, 1, 250, 3, 9], np.uint8), np.array([11, 300, 65535, 0, 4096], np.uint16)):
        top, codes = B._max_over_classes(acc, lut)
        want_top, want_arg = acc.max(dim=0)
        assert torch.equal(top, want_top)
        assert codes.dtype == lut.dtype and np.array_equal(codes, lut[want_arg.numpy()])


def test_blender_without_confidence_gives_the_same_codes_and_keeps_no_weight_sum():
    wg = T.WindowGrid(tile=32, overlap=8, height=70, width=90)
    probs = _random_probs(wg, 3, seed=2)
    block = T.Block(0, 0, 0, 0, 70, 90)
    need = np.ones((70, 90), bool)
    with_conf = B.BlockBlender(wg, block, need, (1, 2, 3), "uint8", True, torch.device("cpu"))
    without = B.BlockBlender(wg, block, need, (1, 2, 3), "uint8", False, torch.device("cpu"))
    assert without.rows.wsum is None
    for i in range(wg.n_rows):
        for j in range(wg.n_cols):
            with_conf.add(i, j, probs[(i, j)])
            without.add(i, j, probs[(i, j)])
    codes, conf = with_conf.finish()
    codes2, conf2 = without.finish()
    assert conf2 is None and conf is not None
    assert np.array_equal(codes, codes2)


@pytest.mark.parametrize("n_blocks, tasks_wanted", [((1, 1), 1), ((5, 7), 1), ((5, 7), 4), ((23, 23), 16), ((3, 2), 9)])
def test_group_shape_runs_the_fewest_windows_among_shapes_with_enough_tasks(n_blocks, tasks_wanted):
    wg = T.WindowGrid(tile=64, overlap=8, height=n_blocks[0] * 168 - 5, width=n_blocks[1] * 168 - 9)
    size = T.block_side_px(168, wg)  # 3 strides of 56 px
    blocks = T.cut_blocks(wg.height, wg.width, size)

    def cost(shape):
        groups = T.block_groups(blocks, *shape)
        return T.model_px_per_map_px(wg, [T.group_region(g) for g in groups]), len(groups)

    shape = T.group_shape(*n_blocks, tasks_wanted, size // wg.stride)
    assert shape[0] <= T.MAX_GROUP[0] and shape[1] <= T.MAX_GROUP[1]
    rows = range(1, min(T.MAX_GROUP[0], n_blocks[0]) + 1)
    cols = range(1, min(T.MAX_GROUP[1], n_blocks[1]) + 1)
    most = max(cost((gr, gc))[1] for gr in rows for gc in cols)
    ratio, tasks = cost(shape)
    assert tasks >= min(tasks_wanted, most)
    others = [cost((gr, gc))[0] for gr in rows for gc in cols if cost((gr, gc))[1] >= min(tasks_wanted, most)]
    assert ratio <= min(others) + 1e-12


def test_blocks_on_the_lattice_tile_the_output_and_start_where_windows_start():
    wg = T.WindowGrid(64, 16, 150, 170, row0=-32, col0=-20, lattice=True)
    blocks = T.cut_blocks(150, 170, 96, wg.row0, wg.col0)
    cover = np.zeros((150, 170), int)
    for b in blocks:
        cover[b.r0 : b.r0 + b.height, b.c0 : b.c0 + b.width] += 1
        assert b.r0 == T.block_start(b.r0 + b.height - 1, 96, wg.row0)
    assert (cover == 1).all()
    assert sorted({b.r0 for b in blocks}) == [0, 64]  # -32 + 96
    assert sorted({b.c0 for b in blocks}) == [0, 76]  # -20 + 96; -20 + 192 > 170
    inner = {b.c0 for b in blocks} - {0}
    assert all((c - wg.col0) % wg.stride == 0 for c in inner)  # a window starts at each inner edge

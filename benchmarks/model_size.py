"""Model size benchmark: parameters (total, per branch), GFLOPs per 224 px patch, CPU timings.

Usage::

    python benchmarks/model_size.py [--threads 2] [--bands 4] [--classes 17] [--repeats 5]

GFLOPs are counted by ``torch.utils.flop_counter.FlopCounterMode`` for one forward pass of a
``1 x bands x 224 x 224`` patch. They are FLOPs, not MACs: one multiply-accumulate counts as 2 FLOPs.
Only convolutions, matrix products and attention are counted (norms, activations and interpolation
are not). The paper-size model is counted on the ``meta`` device (no memory, no compute).

CPU timings (tiny model only, ``torch.set_num_threads(threads)``): eval-mode forward per 224 px patch
(batch 1 and batch 8) and one training step (forward + backward + SGD) on 8 x 128 px patches; median
and minimum of ``--repeats`` runs (on a shared machine the minimum is the steadier figure).

The last line printed is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from lcmap.models.paraformer import CONFIGS, build_paraformer

PATCH_PX = 224


def count_gflops(name: str, bands: int, classes: int) -> float:
    """Forward GFLOPs (FLOPs / 1e9, 2 per MAC) for one ``bands x 224 x 224`` patch."""
    device = torch.device("meta")
    with device:
        model = build_paraformer(name, bands, classes).eval()
        x = torch.zeros(1, bands, PATCH_PX, PATCH_PX)
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(x)
    return counter.get_total_flops() / 1e9


def time_it(fn, repeats: int) -> tuple[float, float]:
    """Median and minimum wall time (s) of ``fn()`` over ``repeats`` runs after one warm-up.

    On a shared machine the minimum is the better estimate of the model's own cost.
    """
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    parser.add_argument("--bands", type=int, default=4, help="input bands (default 4, NAIP RGBN)")
    parser.add_argument("--classes", type=int, default=17, help="output classes (default 17: 16 NLCD + nodata)")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per measurement (median)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    result: dict[str, object] = {
        "patch_px": PATCH_PX,
        "bands": args.bands,
        "classes": args.classes,
        "flops_unit": "GFLOPs = FLOPs/1e9, 1 MAC = 2 FLOPs (FlopCounterMode: conv/matmul/attention only)",
        "threads": args.threads,
        "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(),
    }
    for name in ("paraformer", "paraformer-tiny"):
        with torch.device("meta"):
            counts = build_paraformer(name, args.bands, args.classes).branch_parameters()
        gflops = count_gflops(name, args.bands, args.classes)
        cfg = CONFIGS[name]
        print(
            f"{name}: {counts['total'] / 1e6:.2f} M parameters "
            f"(CNN {counts['cnn'] / 1e6:.2f} M, ViT {counts['vit'] / 1e6:.2f} M incl. token projection, "
            f"decoder {counts['decoder'] / 1e6:.2f} M); {gflops:.1f} GFLOPs per {PATCH_PX} px "
            f"{args.bands}-band patch (FLOPs, 2 per MAC; {gflops / 2:.1f} GMACs)"
        )
        print(
            f"  config: width {cfg.cnn_width}, pyramid {cfg.downsample_channels}, ViT {cfg.hidden_size} x "
            f"{cfg.num_layers} layers x {cfg.num_heads} heads (MLP {cfg.mlp_dim}), decoder {cfg.decoder_channels}"
        )
        result[name] = {"params": counts, "gflops_per_patch": round(gflops, 2)}

    model = build_paraformer("paraformer-tiny", args.bands, args.classes)
    model.eval()
    timings = {}
    for batch in (1, 8):
        x = torch.randn(batch, args.bands, PATCH_PX, PATCH_PX)
        with torch.no_grad():
            t, t_min = time_it(lambda x=x: model(x), args.repeats)
        timings[f"forward_ms_per_patch_b{batch}"] = round(1000 * t / batch, 1)
        timings[f"forward_ms_per_patch_b{batch}_min"] = round(1000 * t_min / batch, 1)
        print(
            f"paraformer-tiny CPU forward ({args.threads} threads, batch {batch}): "
            f"{1000 * t / batch:.1f} ms per {PATCH_PX} px patch (median; min {1000 * t_min / batch:.1f})"
        )
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x = torch.randn(8, args.bands, 128, 128)
    y = torch.randint(0, args.classes, (8, 128, 128))

    def step() -> None:
        out = model(x)
        loss = sum(torch.nn.functional.cross_entropy(o, y) for o in out)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    t, t_min = time_it(step, args.repeats)
    timings["train_step_s_8x128"] = round(t, 3)
    timings["train_step_s_8x128_min"] = round(t_min, 3)
    print(
        f"paraformer-tiny CPU training step ({args.threads} threads, 8 x 128 px, fwd+bwd+SGD): {t:.3f} s "
        f"median, {t_min:.3f} s min ({1 / t:.2f} steps/s)"
    )
    result["paraformer-tiny"]["cpu"] = timings  # type: ignore[index]
    print(json.dumps(result))


if __name__ == "__main__":
    main()

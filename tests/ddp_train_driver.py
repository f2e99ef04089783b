"""``lcmap train`` (the CLI's ``main``) with a record of what each DDP process did, for tests/test_train_ddp.py.

Run as ``python tests/ddp_train_driver.py train ...flags``. Lightning starts the other ranks by running
this same file again (as it re-runs ``lcmap train``), so every rank records. Each process appends JSON
lines to ``$LCMAP_DDP_RECORD/rank<R>.jsonl``: the bounds of every training patch and validation window
it read, and at each validation end its own confusion matrix and the one summed over the ranks.
``LCMAP_DDP_SIGTERM=RANK:STEP`` makes that rank send itself SIGTERM after that training step.
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path
from typing import Any


def _record(rank: int, entry: dict[str, Any]) -> None:
    folder = Path(os.environ["LCMAP_DDP_RECORD"])
    with open(folder / f"rank{rank}.jsonl", "a") as f:
        f.write(json.dumps(entry) + "\n")


def _install() -> None:
    from lcmap.compat import query_bounds
    from lcmap.pipeline.training.datamodule import LandCoverDataModule
    from lcmap.pipeline.training.task import LandCoverTask

    loader = LandCoverDataModule._loader

    def recording_loader(self, dataset, sampler, batch_size):
        kind = "val" if isinstance(sampler, list) else "train"  # validation shards are lists of windows
        rank, world = self._rank_world()
        epoch = int(self.trainer.current_epoch) if self.trainer is not None else -1

        class Recorded:
            def __len__(self) -> int:
                return len(sampler)

            def __iter__(self):
                for query in sampler:
                    _record(rank, {"kind": kind, "epoch": epoch, "world": world, "bounds": query_bounds(query)})
                    yield query

        return loader(self, dataset, Recorded(), batch_size)

    epoch_end = LandCoverTask.on_validation_epoch_end

    def recording_epoch_end(self) -> None:
        own = self.val_confusion.confmat.clone()  # this rank's counts (before compute() sums them)
        summed = self.val_confusion.compute()
        _record(
            self.global_rank,
            {"kind": "val_end", "epoch": int(self.current_epoch), "own": own.tolist(), "summed": summed.tolist()},
        )
        epoch_end(self)

    LandCoverDataModule._loader = recording_loader
    LandCoverTask.on_validation_epoch_end = recording_epoch_end
    if os.environ.get("LCMAP_DDP_SIGTERM"):  # "RANK:STEP": that rank sends itself SIGTERM after that step
        rank, step = (int(v) for v in os.environ["LCMAP_DDP_SIGTERM"].split(":"))

        def sigterm_after(self, outputs, batch, batch_idx) -> None:
            if self.global_rank == rank and self.trainer.global_step == step:
                os.kill(os.getpid(), signal.SIGTERM)

        LandCoverTask.on_train_batch_end = sigterm_after  # type: ignore[method-assign]


if __name__ == "__main__":
    _install()
    from lcmap.cli import main

    main()

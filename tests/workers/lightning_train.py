"""A tiny Lightning training for tests/test_lightning.py, checkpointing through BucketsnapCheckpointIO.

    python lightning_train.py <run url> <storage options json> <dirpath> <max_epochs> <kill_at_epoch|-1>
        <ckpt_path|none> <out.json>

trains a linear model on fixed data (deterministic: no shuffling, seeded) with ModelCheckpoint(dirpath,
monitor="val_loss", save_top_k=2, save_last=True); with kill_at_epoch >= 0, SIGKILLs itself when that epoch starts
(after the previous epoch's checkpoints were committed). At the end writes out.json: the weights, the epoch and
step it started from, and the optimizer state it started with.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import warnings
from typing import Any

import torch

warnings.filterwarnings("ignore")
import lightning.pytorch as pl  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

from bucketsnap.integrations.lightning import BucketsnapCheckpointIO  # noqa: E402


class Linear(pl.LightningModule):
    def __init__(self, lr: float = 0.05) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.layer = torch.nn.Linear(4, 1)

    def training_step(self, batch: Any, index: int) -> torch.Tensor:
        x, y = batch
        return torch.nn.functional.mse_loss(self.layer(x), y)

    def validation_step(self, batch: Any, index: int) -> None:
        x, y = batch
        self.log("val_loss", torch.nn.functional.mse_loss(self.layer(x), y))

    def configure_optimizers(self) -> Any:
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)


def data() -> tuple[DataLoader, DataLoader]:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(64, 4, generator=generator)
    y = x @ torch.tensor([[1.0], [-2.0], [0.5], [3.0]]) + 0.1
    return DataLoader(TensorDataset(x, y), batch_size=16), DataLoader(TensorDataset(x, y), batch_size=32)


class Record(pl.Callback):
    """Kills the process at an epoch's start, and records where training started."""

    def __init__(self, kill_at: int) -> None:
        self.kill_at = kill_at
        self.started: dict[str, Any] = {}

    def on_train_start(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        state = trainer.optimizers[0].state_dict()["state"]
        self.started = {
            "epoch": trainer.current_epoch,
            "global_step": trainer.global_step,
            "exp_avg": {str(k): v["exp_avg"].flatten().tolist() for k, v in state.items()},
        }

    def on_train_epoch_start(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        if trainer.current_epoch == self.kill_at:
            os.kill(os.getpid(), signal.SIGKILL)


def main(argv: list[str]) -> None:
    url, options, dirpath, max_epochs, kill_at, ckpt_path, out = argv
    pl.seed_everything(0, verbose=False)
    record = Record(int(kill_at))
    checkpoints = pl.callbacks.ModelCheckpoint(dirpath=dirpath, monitor="val_loss", save_top_k=2, save_last=True)
    trainer = pl.Trainer(
        max_epochs=int(max_epochs),
        plugins=[BucketsnapCheckpointIO(url, storage_options=json.loads(options))],
        callbacks=[record, checkpoints],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        deterministic=True,
    )
    model = Linear()
    trainer.fit(model, *data(), ckpt_path=None if ckpt_path == "none" else ckpt_path)
    weights = {k: v.flatten().tolist() for k, v in model.state_dict().items()}
    result = {"weights": weights, "started": record.started, "best": checkpoints.best_model_path}
    with open(out, "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main(sys.argv[1:])

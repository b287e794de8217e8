"""BucketsnapCheckpointIO with a real Lightning Trainer and ModelCheckpoint (docs/lightning.md)."""

from __future__ import annotations

import json
import os
import shutil
import sys
import uuid
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("lightning")
warnings.filterwarnings("ignore")

import lightning.pytorch as pl  # noqa: E402
from lightning.pytorch.plugins.io import AsyncCheckpointIO  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent / "workers"))
import lightning_train  # noqa: E402

from bucketsnap import SnapshotStore  # noqa: E402
from bucketsnap.errors import SnapshotNotFoundError  # noqa: E402
from bucketsnap.integrations.lightning import PATH_METRIC, BucketsnapCheckpointIO  # noqa: E402
from helpers import Worker  # noqa: E402

WORKER = Path(__file__).parent / "workers" / "lightning_train.py"


class Scripted(lightning_train.Linear):
    """Logs a scripted val_loss per epoch, so the best checkpoints are known in advance."""

    def __init__(self, losses: list[float]) -> None:
        super().__init__()
        self.losses = losses

    def validation_step(self, batch: Any, index: int) -> None:
        self.log("val_loss", self.losses[min(self.current_epoch, len(self.losses) - 1)])


def trainer(io: Any, dirpath: Path, epochs: int, **checkpoint: Any) -> pl.Trainer:
    options = {"monitor": "val_loss", "save_top_k": 2, "save_last": True, **checkpoint}
    return pl.Trainer(
        max_epochs=epochs,
        plugins=[io],
        callbacks=[pl.callbacks.ModelCheckpoint(dirpath=dirpath, **options)],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )


def paths(store: SnapshotStore) -> list[str]:
    return sorted(str(i.metrics[PATH_METRIC]) for i in store.infos())


@pytest.mark.parametrize("where", ["memory", pytest.param("s3", marks=pytest.mark.s3), "local"])
def test_top_k_keeps_exactly_the_two_best_and_last(request: pytest.FixtureRequest, where: str, tmp_path: Path) -> None:
    store = request.getfixturevalue(f"{where}_backend").store()
    io = BucketsnapCheckpointIO(store)
    t = trainer(io, tmp_path / "ck", 5)
    t.fit(Scripted([5.0, 3.0, 4.0, 1.0, 2.0]), *lightning_train.data())
    callback = t.checkpoint_callback
    best = {str(tmp_path / "ck" / n) for n in ("epoch=3-step=16.ckpt", "epoch=4-step=20.ckpt")}
    assert set(callback.best_k_models) == best
    assert paths(store) == sorted([*best, str(tmp_path / "ck" / "last.ckpt")])
    assert callback.best_model_path == str(tmp_path / "ck" / "epoch=3-step=16.ckpt")
    # The files Lightning sees are pointers of a few bytes; the checkpoints are in the run.
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == [
        "epoch=3-step=16.ckpt",
        "epoch=4-step=20.ckpt",
        "last.ckpt",
    ]
    assert all(p.stat().st_size < 300 for p in (tmp_path / "ck").iterdir())
    best_state = io.load_checkpoint(callback.best_model_path)
    assert best_state["epoch"] == 3 and best_state["global_step"] == 16
    assert set(best_state) >= {"state_dict", "optimizer_states", "loops", "callbacks", "hyper_parameters"}
    t.validate(ckpt_path="best", dataloaders=lightning_train.data()[1], verbose=False)


# On local disk it proves nothing the S3 run does not (the same worker, a store on another backend; local disk's
# store is held by test_top_k_keeps_exactly_the_two_best_and_last[local]): on demand, with `-m slow`.
@pytest.mark.parametrize(
    "where", [pytest.param("local", marks=pytest.mark.slow), pytest.param("s3", marks=pytest.mark.s3)]
)
def test_a_killed_training_resumes_from_last_on_a_fresh_machine(
    request: pytest.FixtureRequest, where: str, tmp_path: Path
) -> None:
    """SIGKILL at the start of epoch 3, a new machine (no local files), fit(ckpt_path="last"): same optimizer
    state and step as saved, and the same final weights as a training that was never interrupted."""
    process_backend = request.getfixturevalue(f"{where}_backend")
    url, options = process_backend.url("lightning"), json.dumps(process_backend.options)

    def train(dirpath: Path, kill_at: int, ckpt_path: str, out: Path) -> tuple[int, str]:
        """The worker's exit status and stderr."""
        argv = [url, options, str(dirpath), "5", str(kill_at), ckpt_path, str(out)]
        worker = Worker(str(WORKER), argv, out.with_suffix(".out"), out.with_suffix(".err"))
        return worker.wait(300), out.with_suffix(".err").read_text()

    killed, stderr = train(tmp_path / "ck", 3, "none", tmp_path / "killed.json")
    assert killed == -9, stderr[-2000:]
    store = SnapshotStore(url, storage_options=process_backend.options)
    last = next(i for i in store.infos() if str(i.metrics[PATH_METRIC]).endswith("last.ckpt"))
    assert last.metrics["global_step"] == 12
    saved_exp_avg = store.load(last.itr, keys=["optimizer_states"])["optimizer_states"][0]["state"]
    shutil.rmtree(tmp_path / "ck")  # a fresh machine: the pointers are gone too

    resumed, stderr = train(tmp_path / "ck", -1, "last", tmp_path / "resumed.json")
    assert resumed == 0, stderr[-3000:]
    result = json.loads((tmp_path / "resumed.json").read_text())
    assert (result["started"]["epoch"], result["started"]["global_step"]) == (3, 12)
    assert result["started"]["exp_avg"] == {str(k): v["exp_avg"].flatten().tolist() for k, v in saved_exp_avg.items()}

    # The same training, never interrupted (in this process: the worker's code, seeded the same way).
    lightning_train.main([memory_url(), "{}", str(tmp_path / "ref"), "5", "-1", "none", str(tmp_path / "ref.json")])
    assert result["weights"] == json.loads((tmp_path / "ref.json").read_text())["weights"]


def memory_url() -> str:
    return f"memory://lightning-reference-{uuid.uuid4().hex[:8]}"


def test_async_checkpoint_io_wraps_it(memory_backend: Any, tmp_path: Path) -> None:
    store = memory_backend.store()
    t = trainer(AsyncCheckpointIO(BucketsnapCheckpointIO(store)), tmp_path / "ck", 4)
    t.fit(Scripted([4.0, 3.0, 2.0, 1.0]), *lightning_train.data())
    assert paths(store) == sorted(
        str(tmp_path / "ck" / n) for n in ("epoch=2-step=12.ckpt", "epoch=3-step=16.ckpt", "last.ckpt")
    )
    assert store.load("last", keys=["global_step"])["global_step"] == 16


def test_pruning_never_drops_the_checkpoint_it_resumed_from(memory_backend: Any, tmp_path: Path) -> None:
    store = memory_backend.store()
    io = BucketsnapCheckpointIO(store)
    trainer(io, tmp_path / "ck", 2).fit(Scripted([2.0, 1.0]), *lightning_train.data())
    resumed_from = str(tmp_path / "ck" / "epoch=0-step=4.ckpt")
    fresh = BucketsnapCheckpointIO(store)
    fresh.load_checkpoint(resumed_from)
    fresh.remove_checkpoint(resumed_from)
    assert resumed_from in paths(store) and os.path.exists(resumed_from)
    fresh.remove_checkpoint(str(tmp_path / "ck" / "epoch=1-step=8.ckpt"))
    assert str(tmp_path / "ck" / "epoch=1-step=8.ckpt") not in paths(store)
    assert not (tmp_path / "ck" / "epoch=1-step=8.ckpt").exists()


def test_last_ckpt_saved_again_replaces_the_old_snapshot_after_the_commit(memory_backend: Any, tmp_path: Path) -> None:
    store = memory_backend.store()
    io = BucketsnapCheckpointIO(store)
    path = tmp_path / "last.ckpt"
    io.save_checkpoint({"global_step": 1, "state_dict": {"w": torch.ones(2)}}, path)
    io.save_checkpoint({"global_step": 2, "state_dict": {"w": torch.zeros(2)}}, path)
    assert [i.itr for i in store.infos()] == [1]
    assert io.load_checkpoint(path)["global_step"] == 2


def test_pointers_come_back_dated_when_saved(memory_backend: Any, tmp_path: Path) -> None:
    store = memory_backend.store()
    BucketsnapCheckpointIO(store).save_checkpoint({"global_step": 7}, tmp_path / "a" / "x.ckpt")
    shutil.rmtree(tmp_path / "a")
    io = BucketsnapCheckpointIO(store)
    pointer = tmp_path / "a" / "x.ckpt"
    assert pointer.exists()
    assert abs(pointer.stat().st_mtime - store.info("last").created.timestamp()) < 1e-3
    assert io.load_checkpoint(pointer)["global_step"] == 7


def test_odd_keys_and_a_checkpoint_lightning_wrote_itself(memory_backend: Any, tmp_path: Path) -> None:
    io = BucketsnapCheckpointIO(memory_backend.store())
    io.save_checkpoint({"state_dict": {"w": torch.ones(1)}, "my key/with slash": 3}, tmp_path / "odd.ckpt")
    assert io.load_checkpoint(tmp_path / "odd.ckpt") == {"state_dict": {"w": torch.ones(1)}, "my key/with slash": 3}
    torch.save({"global_step": 99}, tmp_path / "plain.ckpt")
    assert io.load_checkpoint(tmp_path / "plain.ckpt")["global_step"] == 99
    with pytest.raises(SnapshotNotFoundError, match="holds no checkpoint saved as"):
        io.load_checkpoint(tmp_path / "missing.ckpt")
    with pytest.raises(TypeError, match="takes no storage_options"):
        io.save_checkpoint({"a": 1}, tmp_path / "b.ckpt", storage_options={"x": 1})


class StartsAt(pl.Callback):
    def on_train_start(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        self.step = trainer.global_step


def resume(store: SnapshotStore, dirpath: Path, epochs: int, **checkpoint: Any) -> int:
    t = trainer(BucketsnapCheckpointIO(store), dirpath, epochs, **checkpoint)
    starts = StartsAt()
    t.callbacks.append(starts)
    t.fit(Scripted([5.0, 4.0, 3.0, 2.0, 1.0, 0.5, 0.4]), *lightning_train.data(), ckpt_path="last")
    return starts.step


def test_every_fresh_machine_resumes_from_the_newest_last(memory_backend: Any, tmp_path: Path) -> None:
    """Each resume supersedes the last.ckpt it resumed from: a second preemption must not go back to it."""
    store = memory_backend.store()
    trainer(BucketsnapCheckpointIO(store), tmp_path / "ck", 3).fit(Scripted([3.0, 2.0, 1.0]), *lightning_train.data())
    shutil.rmtree(tmp_path / "ck")
    assert resume(store, tmp_path / "ck", 5) == 12
    shutil.rmtree(tmp_path / "ck")
    assert resume(store, tmp_path / "ck", 7) == 20
    assert sum(str(p).endswith("last.ckpt") for p in paths(store)) == 1


def test_save_last_link_resumes_on_the_same_machine(memory_backend: Any, tmp_path: Path) -> None:
    store = memory_backend.store()
    io = BucketsnapCheckpointIO(store)
    trainer(io, tmp_path / "ck", 3, save_last="link").fit(Scripted([3.0, 2.0, 1.0]), *lightning_train.data())
    assert (tmp_path / "ck" / "last.ckpt").is_symlink()
    assert resume(store, tmp_path / "ck", 5, save_last="link") == 12

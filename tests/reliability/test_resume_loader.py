"""ResumableLoader under Lightning's own loops (one process, default strategy): a fit resumed from any
checkpoint, after any step or at an epoch end, consumes exactly the batches the straight fit consumed next.

Lightning fetches one batch ahead for a loader without a length, so these tests cover both kinds: a sized
map-style dataset and a stateful IterableDataset.
"""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import Dataset, IterableDataset
from torchdata.stateful_dataloader import StatefulDataLoader

from lightning_sparse.data.loading import ResumableLoader, fit_progress

BATCHES = 5


class Numbers(Dataset):
    """Map-style: item ``i`` is the batch ``[[i]]``."""

    def __len__(self) -> int:
        return BATCHES

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.tensor([[float(i)]])


class NumberStream(IterableDataset):
    """Iterable with a position (torchdata's Stateful protocol): yields ``[[0]] .. [[BATCHES - 1]]``."""

    def __init__(self) -> None:
        self.next = 0
        self._resume_at = 0

    def state_dict(self) -> dict:
        return {"next": self.next}

    def load_state_dict(self, state: dict) -> None:
        self._resume_at = state["next"]

    def __iter__(self):
        start, self._resume_at = self._resume_at, 0
        for i in range(start, BATCHES):
            self.next = i + 1
            yield torch.tensor([[float(i)]])


class Recorder(pl.LightningModule):
    """Records the batch each training step consumed (the batch value is its index)."""

    def __init__(self, dataset_kind: str, plain: bool = False) -> None:
        super().__init__()
        self.dataset_kind, self.plain = dataset_kind, plain
        self.layer = torch.nn.Linear(1, 1)
        self.seen: list[int] = []

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        self.seen.append(int(batch.item()))
        return self.layer(batch).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self):
        dataset = Numbers() if self.dataset_kind == "sized" else NumberStream()
        if self.plain:
            return StatefulDataLoader(dataset, batch_size=None)
        return ResumableLoader(dataset, batch_size=None, consumed=fit_progress(self.trainer))


def _fit(tmp: Path, kind: str, ckpt: Path | None = None, plain: bool = False, save: bool = False) -> list[int]:
    model = Recorder(kind, plain)
    callbacks = []
    if save:
        callbacks = [
            ModelCheckpoint(dirpath=tmp, filename="{epoch}-{step}", every_n_train_steps=1, save_top_k=-1),
            ModelCheckpoint(
                dirpath=tmp, filename="end-{epoch}", every_n_epochs=1, save_top_k=-1, save_on_train_epoch_end=True
            ),
        ]
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, max_epochs=2, logger=False, enable_progress_bar=False,
        enable_model_summary=False, enable_checkpointing=save, callbacks=callbacks, num_sanity_val_steps=0,
    )  # fmt: skip
    trainer.fit(model, ckpt_path=ckpt)
    return model.seen


def _steps_in(ckpt: Path) -> int:
    return torch.load(ckpt, weights_only=False)["global_step"]


@pytest.mark.parametrize("kind", ["sized", "iterable"])
def test_resume_from_every_step_and_epoch_end_continues_the_straight_stream(tmp_path, single_process_env, kind):
    straight = _fit(tmp_path, kind, save=True)
    assert straight == list(range(BATCHES)) * 2
    checkpoints = sorted(tmp_path.glob("*.ckpt"))
    assert len(checkpoints) == 2 * BATCHES + 2  # one per step and one per epoch end
    for ckpt in checkpoints:
        done = _steps_in(ckpt)
        resumed = _fit(tmp_path / "resumed", kind, ckpt=ckpt)
        assert resumed == straight[done:], f"resumed from {ckpt.name} (step {done})"


def test_plain_stateful_loader_loses_batches_on_resume(tmp_path, single_process_env):
    """Why ResumableLoader exists: torchdata's loader alone, under Lightning, is not resumed exactly."""
    _fit(tmp_path / "iterable", "iterable", plain=True, save=True)
    resumed = _fit(tmp_path / "r1", "iterable", ckpt=tmp_path / "iterable" / "epoch=0-step=2.ckpt", plain=True)
    assert resumed[0] == 3  # the straight run's third step consumed batch 2: it is never seen again
    _fit(tmp_path / "sized", "sized", plain=True, save=True)
    resumed = _fit(tmp_path / "r2", "sized", ckpt=tmp_path / "sized" / "epoch=0-step=5.ckpt", plain=True)
    assert resumed == []  # saved after the first epoch's last step: the second epoch found no batches left


def _mid_pass_state(world_size: int, num_workers: int = 0) -> dict:
    loader = ResumableLoader(NumberStream(), batch_size=None)
    it = iter(loader)
    next(it)
    (rank_state,) = loader.state_dict()["ranks"]
    return {"world_size": world_size, "ranks": [dict(rank_state, num_workers=num_workers)] * world_size}


def test_mid_pass_position_of_another_world_size_or_worker_count_is_refused():
    loader = ResumableLoader(NumberStream(), batch_size=None)
    with pytest.raises(ValueError, match="saved mid-epoch by 2 processes; this run has 1.*resume on 2 processes"):
        loader.load_state_dict(_mid_pass_state(world_size=2))
    with pytest.raises(ValueError, match="saved with num_workers=3; this loader has num_workers=0"):
        loader.load_state_dict(_mid_pass_state(world_size=1, num_workers=3))


def test_end_of_pass_position_loads_anywhere_and_starts_a_fresh_pass():
    loader = ResumableLoader(NumberStream(), batch_size=None)
    assert [int(b.item()) for b in loader] == list(range(BATCHES))
    state = loader.state_dict()
    assert state["ranks"][0]["loader"] is None  # the pass ended: nothing to resume
    other = ResumableLoader(NumberStream(), batch_size=None)
    other.load_state_dict({"world_size": 4, "ranks": state["ranks"] * 4})
    assert [int(b.item()) for b in other] == list(range(BATCHES))

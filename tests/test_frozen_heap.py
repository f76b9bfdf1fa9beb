"""The heap alive at fit start is frozen while fitting (no full GC pass over it in mid-step) and given back
to the collector at teardown; a freeze made by someone else, or a disabled collector, is left alone."""

from __future__ import annotations

import gc

import lightning.pytorch as pl
import pytest
from torch.utils.data import DataLoader

from lightning_sparse import SparseStrategy
from lightning_sparse.data import SyntheticClickStream
from lightning_sparse.frozen_heap import FrozenHeap
from lightning_sparse.models import DLRMModule


@pytest.fixture
def unfrozen():
    """Each test starts and ends with nothing frozen and the collector enabled."""
    gc.unfreeze()
    gc.enable()
    yield
    gc.unfreeze()
    gc.enable()


class FreezeCounts(pl.Callback):
    def __init__(self) -> None:
        self.during: list[int] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.during.append(gc.get_freeze_count())


def _fit(callback: pl.Callback) -> None:
    sizes = [50, 30]
    model = DLRMModule(
        num_embeddings_per_feature=sizes, embedding_dim=4, dense_arch_layer_sizes=[8, 4], over_arch_layer_sizes=[8, 1]
    )
    stream = SyntheticClickStream(num_batches=3, batch_size=8, num_embeddings_per_feature=sizes)
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, max_epochs=1, strategy=SparseStrategy(sharding="table_wise"), logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, callbacks=[callback],
    )  # fmt: skip
    trainer.fit(model, DataLoader(stream, batch_size=None))


def test_fit_freezes_the_heap_and_teardown_gives_it_back(single_process_env, unfrozen):
    counts = FreezeCounts()
    _fit(counts)
    assert len(counts.during) == 3 and min(counts.during) > 0  # every training step ran with the heap frozen
    assert gc.get_freeze_count() == 0


def test_a_freeze_made_by_someone_else_is_left_alone(single_process_env, unfrozen):
    gc.freeze()
    theirs = gc.get_freeze_count()
    counts = FreezeCounts()
    _fit(counts)
    # nothing frozen on top of theirs (the count only drops, as frozen objects are freed by reference counting;
    # a freeze at fit start would add the model, the Trainer and everything built since)
    assert len(counts.during) == 3 and max(counts.during) <= theirs
    assert 0 < gc.get_freeze_count() <= theirs  # and theirs not undone


def test_nothing_is_frozen_while_the_collector_is_disabled(unfrozen):
    gc.disable()
    heap = FrozenHeap()
    heap.freeze()
    assert not heap.frozen and gc.get_freeze_count() == 0
    heap.release()
    assert not gc.isenabled()  # the user's choice stays


def test_release_unfreezes_only_what_freeze_froze(unfrozen):
    heap = FrozenHeap()
    heap.release()  # nothing frozen yet: a no-op
    heap.freeze()
    heap.freeze()  # twice: one freeze
    assert heap.frozen and gc.get_freeze_count() > 0
    heap.release()
    assert not heap.frozen and gc.get_freeze_count() == 0

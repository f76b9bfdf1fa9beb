"""Bad batches never train silently (one process, in-process Trainers; the 2-process runs are in test_cli.py).

Each case feeds a hand-made batch to ``SparseStrategy`` + ``DLRMModule`` and asserts what happens: an error
naming the table, feature, sample or value, or (opted in) the bad part dropped and counted as a metric.
"""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from torch.distributed._shard.sharded_tensor import ShardedTensor
from torch.utils.data import DataLoader
from torchrec.datasets.utils import Batch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from lightning_sparse import SparseStrategy, TableConfig
from lightning_sparse.dynamic import DynamicTableConfig
from lightning_sparse.models import DLRMModule

SIZES = [100, 200, 50]
KEYS = ["cat_0", "cat_1", "cat_2"]
B = 16


def make_batch(seed: int = 0, ids: dict[int, int] | None = None) -> Batch:
    """B samples, one id per feature; ``ids`` overrides single values of feature cat_0 (sample -> id)."""
    g = torch.Generator().manual_seed(seed)
    values = torch.cat([torch.randint(0, n, (B,), generator=g) for n in SIZES])
    for sample, value in (ids or {}).items():
        values[sample] = value
    return Batch(
        dense_features=torch.randn(B, 13, generator=g),
        sparse_features=KeyedJaggedTensor(
            keys=KEYS, values=values, lengths=torch.ones(len(KEYS) * B, dtype=torch.int32)
        ),
        labels=torch.randint(0, 2, (B,), generator=g).float(),
    )


class FixedBatches(pl.LightningDataModule):
    """Yields the given batches (the same ones every epoch), so a test knows exactly what the model saw."""

    def __init__(self, batches: list[Batch]) -> None:
        super().__init__()
        self.batches = batches

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.batches, batch_size=None)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.batches, batch_size=None)


def fit(batches: list[Batch], validate: bool = False, learning_rate: float = 1e-3, **strategy) -> pl.Trainer:
    model = DLRMModule(
        num_embeddings_per_feature=SIZES,
        embedding_dim=4,
        dense_arch_layer_sizes=[8, 4],
        over_arch_layer_sizes=[8, 1],
        learning_rate=learning_rate,
    )
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=1,
        strategy=SparseStrategy(sharding="table_wise", **strategy),
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=None if validate else 0,
        num_sanity_val_steps=0,
    )
    trainer.fit(model, FixedBatches(batches))
    return trainer


def all_finite(trainer: pl.Trainer) -> bool:
    for value in trainer.lightning_module.state_dict().values():
        tensors = [s.tensor for s in value.local_shards()] if isinstance(value, ShardedTensor) else [value]
        if not all(bool(torch.isfinite(t).all()) for t in tensors if t.is_floating_point()):
            return False
    return True


# ------------------------------------------------------------------------------------- ids of static tables
@pytest.mark.parametrize("bad", [100, 10**7, 2**40, -1])
def test_out_of_range_id_of_a_static_table_is_an_error_naming_table_feature_and_value(bad, single_process_env):
    batch = make_batch(ids={5: bad})
    before = batch.sparse_features.values().clone()
    with pytest.raises(
        ValueError,
        match=rf"(?s)feature 'cat_0' of table 't_cat_0' \(100 rows\): 1 id\(s\) outside \[0, 100\), e.g. {bad}\b.*bad_ids='drop'",
    ):
        fit([make_batch(1), batch])
    assert torch.equal(batch.sparse_features.values(), before)  # the caller's batch is never edited


def test_out_of_range_ids_are_an_error_in_validation_too(single_process_env):
    with pytest.raises(ValueError, match="feature 'cat_0' of table 't_cat_0'"):
        fit([make_batch(0, ids={0: 100})], validate=True, bad_ids="error")


def test_drop_policy_removes_out_of_range_ids_counts_them_and_leaves_the_batch_alone(single_process_env):
    batches = [make_batch(0, ids={1: 100, 2: 2**40}), make_batch(1, ids={3: -5})]
    before = [b.sparse_features.values().clone() for b in batches]
    trainer = fit(batches, bad_ids="drop")
    metrics = trainer.callback_metrics
    assert metrics["input/dropped_ids"] == 3 and metrics["input/dropped_ids/t_cat_0"] == 3
    assert metrics["input/dropped_ids/t_cat_1"] == 0
    assert trainer.strategy.input_checks.dropped_ids == {"t_cat_0": 3, "t_cat_1": 0, "t_cat_2": 0}
    for batch, values in zip(batches, before):
        assert torch.equal(batch.sparse_features.values(), values)


def test_drop_policy_keeps_the_other_ids_of_the_bag():
    from lightning_sparse.validation import InputChecks, StaticTable

    checks = InputChecks({"a": StaticTable("t_a", 10), "b": StaticTable("t_b", 5)}, bad_ids="drop")
    kjt = KeyedJaggedTensor(
        keys=["a", "b", "c"], values=torch.tensor([1, 10, 2, 4, 5, -1, 99]), lengths=torch.tensor([3, 0, 2, 1, 1, 0])
    )
    out = checks.check_kjt(kjt)
    assert out.values().tolist() == [1, 2, 4, 99]  # 'c' has no static table: not bounds-checked
    assert out.lengths().tolist() == [2, 0, 1, 0, 1, 0]
    assert checks.dropped_ids == {"t_a": 1, "t_b": 2}


@pytest.mark.parametrize("lengths", [[2, 2, 2, 2, 2, 2], [1, 0, 2, 1, 4, 2], [0, 0, 3, 2, 1, 4]])
def test_the_one_pass_id_check_finds_every_out_of_range_id(lengths):
    """The per-key min/max pass (a [keys, length] view under fixed pooling, one reduction per key otherwise,
    empty keys included) lets no bad id through, wherever it sits, and passes every valid batch."""
    from lightning_sparse.validation import InputChecks, StaticTable

    checks = InputChecks({"a": StaticTable("t_a", 10), "b": StaticTable("t_b", 5)})
    per_key = [lengths[0] + lengths[1], lengths[2] + lengths[3], lengths[4] + lengths[5]]  # 2 samples per key
    owner = [key for key, n in zip("abc", per_key) for _ in range(n)]
    for position, key in enumerate(owner):
        for bad in (-1, 10, 2**40):
            values = torch.zeros(len(owner), dtype=torch.int64)
            values[position] = bad
            kjt = KeyedJaggedTensor(keys=["a", "b", "c"], values=values, lengths=torch.tensor(lengths))
            if key == "c":
                assert checks.check_kjt(kjt) is kjt  # 'c' has no static table: any id
                continue
            rows = {"a": 10, "b": 5}[key]
            with pytest.raises(
                ValueError, match=rf"feature '{key}' of table 't_{key}' \({rows} rows\): 1 id\(s\).*e.g. {bad}\b"
            ):
                checks.check_kjt(kjt)
    valid = KeyedJaggedTensor(keys=["a", "b", "c"], values=torch.full((len(owner),), 4), lengths=torch.tensor(lengths))
    assert checks.check_kjt(valid) is valid


def test_dynamic_tables_take_any_raw_id(single_process_env):
    batch = make_batch(0, ids={0: 2**40, 1: -7, 2: 10**7})
    trainer = fit([batch], tables={"t_cat_0": TableConfig(dynamic=DynamicTableConfig(capacity=100))})
    assert trainer.global_step == 1
    assert "t_cat_0" not in trainer.strategy.input_checks.dropped_ids  # only static tables are checked


# ------------------------------------------------------------------------------------ malformed KJTs, batch
def test_kjt_whose_lengths_do_not_sum_to_its_values_is_an_error(single_process_env):
    good = make_batch(0)
    kjt = good.sparse_features
    short = KeyedJaggedTensor(keys=KEYS, values=kjt.values()[:-2], lengths=kjt.lengths())
    with pytest.raises(
        ValueError,
        match=r"(?s)malformed KeyedJaggedTensor \(keys \['cat_0', 'cat_1', 'cat_2'\], 46 values\).*48 and 46",
    ):
        fit([Batch(good.dense_features, short, good.labels)])


def test_kjt_with_negative_lengths_is_an_error(single_process_env):
    good = make_batch(0)
    lengths = good.sparse_features.lengths().clone()
    lengths[0], lengths[1] = -1, 2  # still sums to the number of values
    kjt = KeyedJaggedTensor(keys=KEYS, values=good.sparse_features.values(), lengths=lengths)
    with pytest.raises(ValueError, match="has negative lengths"):
        fit([Batch(good.dense_features, kjt, good.labels)])


@pytest.mark.parametrize("label", [2.0, -1.0])
def test_labels_outside_zero_one_are_an_error(label, single_process_env):
    batch = make_batch(0)
    batch.labels[3] = label
    with pytest.raises(ValueError, match=rf"1 label\(s\) outside \[0, 1\], e.g. \[{label}\]"):
        fit([batch])


def test_empty_batch_is_an_error(single_process_env):
    empty = Batch(
        dense_features=torch.zeros(0, 13),
        sparse_features=KeyedJaggedTensor(
            keys=KEYS, values=torch.zeros(0, dtype=torch.int64), lengths=torch.zeros(0, dtype=torch.int32), stride=0
        ),
        labels=torch.zeros(0),
    )
    with pytest.raises(ValueError, match=r"empty batch \(0 samples\)"):
        fit([make_batch(1), empty])


def test_batch_whose_parts_disagree_on_the_sample_count_is_an_error(single_process_env):
    batch = make_batch(0)
    with pytest.raises(ValueError, match="batch sizes disagree: 15 labels, 16 rows of dense_features, 16 samples"):
        fit([Batch(batch.dense_features, batch.sparse_features, batch.labels[:-1])])


# ----------------------------------------------------------------------------------------- non-finite values
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_dense_feature_is_an_error_naming_sample_and_feature(value, single_process_env):
    batch = make_batch(0)
    batch.dense_features[7, 4] = value
    with pytest.raises(
        ValueError,
        match=rf"(?s)1 sample\(s\) of the batch are not finite; the first, sample 7: dense feature 4 is {value}.*non_finite='skip'",
    ):
        fit([batch])


def test_skip_policy_drops_non_finite_samples_counts_them_and_keeps_weights_finite(single_process_env):
    first, second = make_batch(0), make_batch(1)
    first.dense_features[2, 0] = float("nan")
    first.dense_features[9, 12] = float("-inf")
    second.labels[4] = float("nan")
    trainer = fit([first, second], non_finite="skip")
    assert trainer.callback_metrics["input/skipped_samples"] == 3
    assert trainer.callback_metrics["train/loss"].isfinite()
    assert all_finite(trainer)


def test_non_finite_loss_from_finite_inputs_is_an_error(single_process_env):
    """A dense learning rate of 1e30 makes the weights overflow after one step: the next loss is NaN."""
    with pytest.raises(ValueError, match="the training loss is nan at step 1, from finite inputs: training diverged"):
        fit([make_batch(i) for i in range(3)], learning_rate=1e30)

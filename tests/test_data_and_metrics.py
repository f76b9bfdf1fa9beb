"""Synthetic click stream and click metrics."""

from __future__ import annotations

import math

import torch
from torchmetrics.classification import BinaryAUROC

from lightning_sparse.data import SyntheticClickStream
from lightning_sparse.data.synthetic import zipf_ranks
from lightning_sparse.models.metrics import LogLoss, NormalizedEntropy


def _stream(**kwargs) -> SyntheticClickStream:
    defaults = dict(
        num_batches=4, batch_size=2048, num_embeddings_per_feature=[5000, 300], num_dense_features=3, seed=7
    )
    defaults.update(kwargs)
    return SyntheticClickStream(**defaults)


def test_batches_are_pure_functions_of_seed_and_index():
    a, b = _stream()[2], _stream()[2]
    assert torch.equal(a.dense_features, b.dense_features)
    assert torch.equal(a.sparse_features.values(), b.sparse_features.values())
    assert torch.equal(a.labels, b.labels)
    assert not torch.equal(_stream()[1].labels, a.labels)
    assert not torch.equal(_stream(seed=8)[2].sparse_features.values(), a.sparse_features.values())


def test_batch_layout_matches_a_keyed_jagged_tensor_of_one_id_per_feature():
    batch = _stream()[0]
    kjt = batch.sparse_features
    assert kjt.keys() == ["cat_0", "cat_1"]
    assert torch.equal(kjt.lengths(), torch.ones(2 * 2048, dtype=torch.int32))
    assert 0 <= int(kjt["cat_0"].values().min()) and int(kjt["cat_0"].values().max()) < 5000
    assert int(kjt["cat_1"].values().max()) < 300
    assert batch.dense_features.shape == (2048, 3) and batch.labels.shape == (2048,)


def test_ids_are_zipf_skewed():
    ranks = zipf_ranks(torch.rand(200_000, dtype=torch.float64), 10_000, 1.1)
    counts = torch.bincount(ranks, minlength=10_000).double()
    assert counts[0] > 20 * counts[100]  # rank 0 is far more popular than rank 100
    assert counts[:100].sum() > 0.4 * counts.sum()


def test_hidden_model_makes_labels_predictable():
    stream = _stream()
    batch = stream[0]
    logit = (batch.dense_features @ stream._dense_weights) * stream._dense_scale
    for feature, name in enumerate(stream.feature_names):
        logit = logit + stream.hidden_weight(feature, batch.sparse_features[name].values()) * stream._sparse_scale
    auc = BinaryAUROC()(torch.sigmoid(logit), batch.labels.long())
    assert 0.7 < float(auc) < 0.95  # learnable, not trivial
    assert 0.3 < float(batch.labels.mean()) < 0.7


def test_drift_moves_the_popular_ids():
    stream = _stream(drift_period=2)
    early = torch.bincount(stream[0].sparse_features["cat_0"].values(), minlength=5000)
    late = torch.bincount(stream[2].sparse_features["cat_0"].values(), minlength=5000)
    top_early = set(early.topk(20).indices.tolist())
    top_late = set(late.topk(20).indices.tolist())
    assert len(top_early & top_late) < 5


def test_log_loss_and_normalized_entropy_match_hand_computation():
    probs = torch.tensor([0.9, 0.2, 0.6, 0.4])
    labels = torch.tensor([1, 0, 1, 1])
    expected_ll = -(math.log(0.9) + math.log(0.8) + math.log(0.6) + math.log(0.4)) / 4
    p = 0.75
    expected_ne = expected_ll / -(p * math.log(p) + (1 - p) * math.log(1 - p))
    ll, ne = LogLoss(), NormalizedEntropy()
    ll.update(probs[:2], labels[:2])
    ll.update(probs[2:], labels[2:])
    ne.update(probs, labels)
    assert abs(float(ll.compute()) - expected_ll) < 1e-6
    assert abs(float(ne.compute()) - expected_ne) < 1e-6


def test_uneven_split_is_padded_so_ranks_run_the_same_number_of_steps(monkeypatch):
    """5 batches on 2 ranks: rank 0 reads 0, 2, 4 and rank 1 reads 1, 3 and batch 0 again (DistributedSampler)."""
    import lightning.pytorch as pl

    from lightning_sparse.data import SyntheticClickDataModule

    read = {}
    for rank in (0, 1):
        monkeypatch.setenv("LOCAL_RANK", str(rank))  # a 2-process trainer's view from rank `rank`, not launched
        trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp", logger=False)
        assert (trainer.global_rank, trainer.world_size) == (rank, 2)
        data = SyntheticClickDataModule(num_embeddings_per_feature=[50, 60], batch_size=4, num_train_batches=5)
        data.trainer = trainer
        batches = list(data.train_dataloader())
        read[rank] = [
            next(
                i
                for i in range(5)
                if torch.equal(b.labels, data.train_set[i].labels)
                and torch.equal(b.dense_features, data.train_set[i].dense_features)
            )
            for b in batches
        ]
    assert read == {0: [0, 2, 4], 1: [1, 3, 0]}

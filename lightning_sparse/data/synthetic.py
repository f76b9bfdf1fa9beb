"""A synthetic click stream with a hidden ground-truth model, so AUC measures real learning.

Every sample has ``num_dense_features`` standard-normal dense features and one id per sparse feature,
drawn from a truncated Zipf distribution over that feature's id space (a few ids are very popular,
most are rare, as in real click logs). The label is drawn from ``sigmoid(logit)`` where the logit sums
a hidden weight per (feature, id) and a hidden linear function of the dense features. Hidden weights
come from a counter-based hash, so id spaces of any size cost no memory and every process agrees.

With ``pooling_factor = k > 1`` every sparse feature of a sample holds k ids (multi-hot, as in
histories of clicked items) and contributes the mean of their hidden weights.

With ``drift_period > 0`` the mapping from popularity rank to id shifts every ``drift_period`` batches:
the ids that are popular now stop being seen later and new ones appear (the setting of continual
learning with feature admission/expiry).

Batch ``i`` of a split is a pure function of ``(seed, split, i)``: any process can generate it. The data
module's train loader is a :class:`~lightning_sparse.data.loading.ResumableLoader`: its position is part of
the checkpoint, so a run resumed at any step, mid-epoch included, reads the batches the straight run reads.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import Dataset, DistributedSampler
from torchrec.datasets.utils import Batch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from lightning_sparse.data.loading import ResumableLoader, fit_progress

_MASK63 = (1 << 63) - 1
# Odd 64-bit constants of splitmix64, written as signed int64 for torch arithmetic (which wraps).
_GOLDEN = -7046029254386353131  # 0x9E3779B97F4A7C15
_MIX1 = -4658895280553007687  # 0xBF58476D1CE4E5B9
_MIX2 = -7723592293110705685  # 0x94D049BB133111EB
_ID_STRIDE = 2654435761  # odd multiplier spreading popularity ranks over the id space


def _splitmix64(x: torch.Tensor) -> torch.Tensor:
    """Counter-based hash of int64 tensors (splitmix64 finaliser; int64 overflow wraps in torch)."""
    x = x + _GOLDEN
    x = (x ^ ((x >> 30) & (_MASK63 >> 29))) * _MIX1
    x = (x ^ ((x >> 27) & (_MASK63 >> 26))) * _MIX2
    return x ^ ((x >> 31) & (_MASK63 >> 30))


def _uniform(key: torch.Tensor) -> torch.Tensor:
    """Uniform floats in (0, 1) from int64 keys."""
    bits = (_splitmix64(key) >> 11) & ((1 << 53) - 1)
    return (bits.double() + 0.5) / float(1 << 53)


def _gaussian(key: torch.Tensor) -> torch.Tensor:
    """Standard-normal floats from int64 keys (Box-Muller over two hashed uniforms)."""
    u1 = _uniform(key * 2)
    u2 = _uniform(key * 2 + 1)
    return (torch.sqrt(-2.0 * torch.log(u1)) * torch.cos(2 * math.pi * u2)).float()


def zipf_ranks(u: torch.Tensor, num_ids: int, exponent: float) -> torch.Tensor:
    """Maps uniforms to popularity ranks in [0, num_ids) of a truncated Zipf law (inverse CDF, continuous)."""
    if abs(exponent - 1.0) < 1e-6:
        ranks = torch.exp(u * math.log(num_ids + 1.0)) - 1.0
    else:
        a = 1.0 - exponent
        ranks = torch.pow(u * ((num_ids + 1.0) ** a - 1.0) + 1.0, 1.0 / a) - 1.0
    return ranks.long().clamp_(0, num_ids - 1)


class SyntheticClickStream(Dataset):
    """Map-style dataset whose item ``i`` is a whole :class:`torchrec.datasets.utils.Batch`.

    Use it with ``DataLoader(dataset, batch_size=None)``; under Lightning's distributed sampler each
    rank gets different batch indices.
    """

    def __init__(
        self,
        num_batches: int,
        batch_size: int,
        num_embeddings_per_feature: list[int],
        num_dense_features: int = 13,
        zipf_exponent: float = 1.1,
        drift_period: int = 0,
        seed: int = 0,
        split_offset: int = 0,
        pooling_factor: int = 1,
    ) -> None:
        if num_batches < 1 or batch_size < 1:
            raise ValueError(f"num_batches and batch_size must be >= 1, got {num_batches} and {batch_size}")
        if not num_embeddings_per_feature or min(num_embeddings_per_feature) < 1:
            raise ValueError(
                f"num_embeddings_per_feature must be a non-empty list of ints >= 1, got {num_embeddings_per_feature}"
            )
        if zipf_exponent <= 0:
            raise ValueError(f"zipf_exponent must be > 0, got {zipf_exponent}")
        if pooling_factor < 1:
            raise ValueError(f"pooling_factor must be >= 1, got {pooling_factor}")
        self.pooling_factor = pooling_factor
        self.num_batches = num_batches
        self.batch_size = batch_size
        self.num_embeddings_per_feature = list(num_embeddings_per_feature)
        self.num_dense_features = num_dense_features
        self.zipf_exponent = zipf_exponent
        self.drift_period = drift_period
        self.seed = seed
        self.split_offset = split_offset
        self.feature_names = feature_names(len(num_embeddings_per_feature))
        num_sparse = len(num_embeddings_per_feature)
        # Scales chosen so the hidden logit has a standard deviation of about 1.5 (a learnable, not trivial, task).
        self._sparse_scale = 1.2 / math.sqrt(num_sparse)
        self._dense_scale = 0.9 / math.sqrt(max(num_dense_features, 1))
        self._dense_weights = _gaussian(torch.arange(num_dense_features) + (seed << 20) + 7_000_003)

    def __len__(self) -> int:
        return self.num_batches

    def ids_at(self, ranks: torch.Tensor, feature: int, batch_index: int) -> torch.Tensor:
        """Ids of the given popularity ranks, at the time of ``batch_index`` (shifted under drift)."""
        num_ids = self.num_embeddings_per_feature[feature]
        epoch_of_drift = batch_index // self.drift_period if self.drift_period > 0 else 0
        shift = epoch_of_drift * (num_ids // 7 + 1)
        return (ranks * _ID_STRIDE + shift + feature * 977) % num_ids

    def hidden_weight(self, feature: int, ids: torch.Tensor) -> torch.Tensor:
        """The ground-truth contribution of each id of ``feature`` to the logit."""
        return _gaussian(ids + ((self.seed * 1009 + feature + 1) << 40))

    def __getitem__(self, index: int) -> Batch:
        if not 0 <= index < self.num_batches:
            raise IndexError(index)
        stream_index = index + self.split_offset
        base = ((self.seed + 1) << 44) + stream_index * (
            self.batch_size * (len(self.feature_names) + self.num_dense_features + 1)
        )
        positions = torch.arange(self.batch_size, dtype=torch.long)
        dense = _gaussian(
            base + positions.unsqueeze(1) * self.num_dense_features + torch.arange(self.num_dense_features) + (1 << 42)
        )
        logit = (dense @ self._dense_weights) * self._dense_scale
        ids_per_feature = []
        k = self.pooling_factor
        slots = positions.unsqueeze(1) * k + torch.arange(k)  # [B, k]: the k ids of each sample
        for feature, num_ids in enumerate(self.num_embeddings_per_feature):
            if k == 1:
                u = _uniform(base + positions * len(self.feature_names) + feature).unsqueeze(1)
            else:
                u = _uniform(base + (slots * len(self.feature_names) + feature) * 3 + (1 << 41))
            ids = self.ids_at(zipf_ranks(u, num_ids, self.zipf_exponent), feature, stream_index)
            logit = logit + self.hidden_weight(feature, ids).mean(dim=1) * self._sparse_scale
            ids_per_feature.append(ids.reshape(-1))
        labels = (_uniform(base + positions + (1 << 43)) < torch.sigmoid(logit).double()).float()
        values = torch.stack(ids_per_feature).reshape(-1)  # feature-major, as a KeyedJaggedTensor wants
        sparse = KeyedJaggedTensor.from_lengths_sync(
            keys=self.feature_names,
            values=values,
            lengths=torch.full((self.batch_size * len(self.feature_names),), k, dtype=torch.int32),
        )
        return Batch(dense_features=dense, sparse_features=sparse, labels=labels)


def feature_names(num_sparse_features: int) -> list[str]:
    """The sparse feature keys used by the data modules and models: ``cat_0 .. cat_{n-1}``."""
    return [f"cat_{i}" for i in range(num_sparse_features)]


class SyntheticClickDataModule(LightningDataModule):
    """Train/val/test/predict splits of :class:`SyntheticClickStream` (disjoint stream positions).

    Rank ``r`` of ``W`` reads batches ``r, r + W, r + 2W, ...`` of a split, in stream order (never shuffled).
    When a split's batches do not divide evenly over the ranks, the last round is padded with the split's
    first batches (``DistributedSampler``'s padding), so every rank runs the same number of steps: with 5
    batches on 2 ranks, rank 0 reads 0, 2, 4 and rank 1 reads 1, 3, 0. The train loader's position is part of
    the checkpoint (:class:`~lightning_sparse.data.loading.ResumableLoader`): resuming at any step continues
    with the batch the straight run would read next.

    Args:
        num_embeddings_per_feature: rows of each feature's table (what models read), and by default also
            the range of its raw ids.
        id_space_per_feature: range of each feature's raw ids when it is larger than its table: such a
            table must be dynamic (``TableConfig(dynamic=...)``), which maps the raw ids to its rows.
        num_dense_features: number of dense (float) features.
        batch_size: samples per batch.
        num_train_batches: batches of the train split (per epoch).
        num_val_batches: batches of the validation split.
        num_test_batches: batches of the test split.
        zipf_exponent: skew of id popularity (larger = more skewed).
        drift_period: shift popular ids every this many batches (0 = stationary stream).
        seed: seed of the hidden model and of the stream.
        pooling_factor: ids per sparse feature per sample (1 = one-hot, as in Criteo).
    """

    def __init__(
        self,
        num_embeddings_per_feature: list[int] = [1000] * 8,  # a YAML-friendly default, never mutated
        id_space_per_feature: Optional[list[int]] = None,
        num_dense_features: int = 13,
        batch_size: int = 256,
        num_train_batches: int = 64,
        num_val_batches: int = 8,
        num_test_batches: int = 8,
        zipf_exponent: float = 1.1,
        drift_period: int = 0,
        seed: int = 0,
        pooling_factor: int = 1,
    ) -> None:
        super().__init__()
        self.num_embeddings_per_feature = list(num_embeddings_per_feature)
        id_space = list(id_space_per_feature) if id_space_per_feature is not None else self.num_embeddings_per_feature
        if len(id_space) != len(self.num_embeddings_per_feature):
            raise ValueError(
                f"id_space_per_feature has {len(id_space)} entries for {len(self.num_embeddings_per_feature)} features; "
                "give one per feature (or leave it out to use num_embeddings_per_feature)"
            )
        self.num_dense_features = num_dense_features
        self.feature_names = feature_names(len(self.num_embeddings_per_feature))
        self.batch_size = batch_size
        common: dict[str, Any] = dict(
            batch_size=batch_size,
            num_embeddings_per_feature=id_space,
            num_dense_features=num_dense_features,
            zipf_exponent=zipf_exponent,
            drift_period=drift_period,
            seed=seed,
            pooling_factor=pooling_factor,
        )
        # Splits read consecutive stretches of one stream: train, then val, then test.
        self.train_set = SyntheticClickStream(num_train_batches, split_offset=0, **common)
        self.val_set = SyntheticClickStream(num_val_batches, split_offset=num_train_batches, **common)
        self.test_set = SyntheticClickStream(
            num_test_batches, split_offset=num_train_batches + num_val_batches, **common
        )

    def _loader(self, dataset: SyntheticClickStream, train: bool = False) -> ResumableLoader:
        """Batches in stream order, split across ranks (rank r reads batches r, r + W, ...).

        The stream is time-ordered (drift makes order matter), so it is never shuffled. Giving Lightning a
        ``DistributedSampler`` already keeps it from injecting a shuffling one, whose epoch-dependent order
        would also make resuming at an epoch boundary replay a different order.
        """
        world_size = self.trainer.world_size if self.trainer is not None else 1
        rank = self.trainer.global_rank if self.trainer is not None else 0
        sampler: DistributedSampler[Any] = DistributedSampler(
            dataset, num_replicas=world_size, rank=rank, shuffle=False
        )
        consumed = fit_progress(self.trainer) if train and self.trainer is not None else None
        return ResumableLoader(dataset, batch_size=None, sampler=sampler, consumed=consumed)

    def train_dataloader(self) -> ResumableLoader:
        return self._loader(self.train_set, train=True)

    def val_dataloader(self) -> ResumableLoader:
        return self._loader(self.val_set)

    def test_dataloader(self) -> ResumableLoader:
        return self._loader(self.test_set)

    def predict_dataloader(self) -> ResumableLoader:
        return self._loader(self.test_set)

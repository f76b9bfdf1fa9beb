"""Shared training/evaluation logic of the click-prediction LightningModules.

Subclasses hold TorchRec EmbeddingBagCollections anywhere in their module tree (SparseStrategy finds
and shards them; register each one once) and implement :meth:`forward` returning one logit per sample.
The collections are built on ``meta`` (:func:`embedding_bag_collection`): under SparseStrategy each rank
materialises only its shards; any other use materialises the full tables on the host first.
"""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch import LightningModule
from torchmetrics import MetricCollection
from torchmetrics.classification import BinaryAUROC
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig
from torchrec.datasets.utils import Batch

from lightning_sparse.models.metrics import LogLoss, NormalizedEntropy
from lightning_sparse.table_init import materialise_on_host, meta_embedding_bag_collection
from lightning_sparse.validation import check_click_batch, check_loss


def embedding_bag_collection(
    num_embeddings_per_feature: list[int], embedding_dim: int, feature_names: list[str], device: str = "meta"
) -> EmbeddingBagCollection:
    """One table per sparse feature, named ``t_<feature>``.

    On ``meta`` (the default) no table is allocated; its values, whenever materialised (per shard by
    SparseStrategy, whole by :func:`~lightning_sparse.table_init.materialise_on_host`), and the global
    random generator afterwards are exactly those of a build on ``"cpu"`` (today's TorchRec default).
    """
    if len(feature_names) != len(num_embeddings_per_feature):
        raise ValueError(
            f"{len(feature_names)} feature names for {len(num_embeddings_per_feature)} table sizes; they must match"
        )
    tables = [
        EmbeddingBagConfig(name=f"t_{name}", embedding_dim=embedding_dim, num_embeddings=num, feature_names=[name])
        for name, num in zip(feature_names, num_embeddings_per_feature)
    ]
    if torch.device(device).type == "meta":
        return meta_embedding_bag_collection(tables)
    return EmbeddingBagCollection(tables=tables, device=torch.device(device))


class LearnedDenseVector(torch.nn.Module):
    """The bottom MLP of a model without dense features (``num_dense_features=0``): one learned vector.

    DLRM, DCN-v2 and DeepFM put the bottom MLP's output next to the embeddings (DLRM dots it with each of
    them). Without dense features there is nothing to feed the MLP; an MLP over a zero-width input would be
    its biases under a dead first layer. A learned vector keeps that slot meaningful (DLRM's dot products
    with it are a learned linear term per embedding) without a fake dense column in the data.
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.vector = torch.nn.Parameter(torch.zeros(dim))

    def forward(self, dense_features: torch.Tensor) -> torch.Tensor:
        if dense_features.dim() != 2 or dense_features.shape[1] != 0:
            raise ValueError(
                f"this model was built with num_dense_features=0, but the batch has dense_features of shape "
                f"{tuple(dense_features.shape)}; build it with num_dense_features={dense_features.shape[-1]}"
            )
        return self.vector.unsqueeze(0).expand(dense_features.shape[0], -1)


def check_num_dense_features(num_dense_features: int) -> int:
    """The dense width a TorchRec arch is built with: 1 when there are none (that arch is then replaced by a
    :class:`LearnedDenseVector`; TorchRec's ``DenseArch`` cannot be built over zero inputs without warnings)."""
    if isinstance(num_dense_features, bool) or not isinstance(num_dense_features, int) or num_dense_features < 0:
        raise ValueError(f"num_dense_features must be an int >= 0, got {num_dense_features!r}")
    return max(num_dense_features, 1)


def _tables_on_host_before_first_call(module: "ClickModule", args: Any) -> None:
    materialise_on_host(module)  # a no-op once sharded (no TorchRec collection is left on meta)
    module._host_tables_hook.remove()


def check_dlrm_layer_sizes(
    embedding_dim: int, dense_arch_layer_sizes: list[int], over_arch_layer_sizes: list[int]
) -> None:
    """DLRM-style nets (DLRM, DCN-v2): the bottom MLP ends at the embedding width, the top MLP at one logit."""
    if dense_arch_layer_sizes[-1] != embedding_dim:
        raise ValueError(
            f"dense_arch_layer_sizes[-1]={dense_arch_layer_sizes[-1]} must equal embedding_dim={embedding_dim}"
        )
    if over_arch_layer_sizes[-1] != 1:
        raise ValueError(f"over_arch_layer_sizes[-1] must be 1 (one logit), got {over_arch_layer_sizes[-1]}")


class ClickModule(LightningModule):
    """Binary click prediction: BCE loss, AUC / log-loss / normalized entropy in validation and test.

    Every training, validation and test batch is checked first
    (:func:`~lightning_sparse.validation.check_click_batch`): an empty batch, sizes that disagree, labels
    outside [0, 1] and non-finite dense features or labels are errors, and so is a non-finite training
    loss, rather than NaN spreading silently into every weight.

    Args:
        learning_rate: learning rate of the dense optimizer (Adam over the non-embedding parameters;
            the embedding tables are updated by the strategy's fused sparse optimizer).
    """

    def __init__(self, learning_rate: float = 1e-3) -> None:
        super().__init__()
        self.learning_rate = learning_rate
        metrics = MetricCollection({"auc": BinaryAUROC(), "log_loss": LogLoss(), "ne": NormalizedEntropy()})
        self.val_metrics = metrics.clone(prefix="val/")
        self.test_metrics = metrics.clone(prefix="test/")
        # Called directly (no Trainer), a model built on meta first gets its full tables on the host.
        self._host_tables_hook = self.register_forward_pre_hook(_tables_on_host_before_first_call)

    def configure_model(self) -> None:
        """Under a strategy other than SparseStrategy (registry name ``sparse``), which shards the tables
        from ``meta`` itself, the tables built on ``meta`` are materialised whole on the host first."""
        if getattr(self.trainer.strategy, "strategy_name", None) != "sparse":
            materialise_on_host(self)

    def forward(self, dense_features: torch.Tensor, sparse_features: Any) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    def _logits(self, batch: Batch) -> torch.Tensor:
        return self(batch.dense_features, batch.sparse_features).reshape(-1)

    def training_step(self, batch: Batch, batch_idx: int) -> dict[str, torch.Tensor]:
        """The loss, plus the batch's logits (detached) and labels: the predictions made before this batch's
        update, which :class:`~lightning_sparse.callbacks.PrequentialEvaluation` scores (test-then-train).
        The labels are returned too because the strategy may have dropped samples from the batch the loader
        gave (``non_finite: skip``)."""
        check_click_batch(batch)
        logits = self._logits(batch)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, batch.labels)
        check_loss(loss, self.global_step)
        self.log("train/loss", loss, prog_bar=True, batch_size=batch.labels.numel())
        return {"loss": loss, "logits": logits.detach(), "labels": batch.labels}

    def _evaluate(self, batch: Batch, metrics: MetricCollection, prefix: str) -> torch.Tensor:
        check_click_batch(batch)
        logits = self._logits(batch)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, batch.labels)
        # Probabilities, not logits: BinaryAUROC would take a batch of logits that all fall in [0, 1] for probabilities.
        metrics.update(torch.sigmoid(logits.detach().double()), batch.labels.long())
        self.log(f"{prefix}/loss", loss, sync_dist=True, batch_size=batch.labels.numel())
        self.log_dict(metrics, batch_size=batch.labels.numel())
        return loss

    def validation_step(self, batch: Batch, batch_idx: int) -> torch.Tensor:
        return self._evaluate(batch, self.val_metrics, "val")

    def test_step(self, batch: Batch, batch_idx: int) -> torch.Tensor:
        return self._evaluate(batch, self.test_metrics, "test")

    def predict_step(self, batch: Batch, batch_idx: int) -> torch.Tensor:
        return torch.sigmoid(self._logits(batch))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        # Passing every parameter is fine: SparseStrategy removes the fused embedding weights.
        return torch.optim.Adam(self.parameters(), lr=self.learning_rate)
